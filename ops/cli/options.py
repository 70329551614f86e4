"""What every command that reads the settings shares: the one `--config` option and the
one way to load settings, with a bad value reported as a usage error naming its source."""

from __future__ import annotations

import click

from ops.settings import Settings, SettingsError, load_settings

config_option = click.option(
    "--config", "config", type=click.Path(dir_okay=False), envvar="GATEWATCH_CONFIG",
    help="TOML settings file (default: $GATEWATCH_CONFIG); environment variables GATEWATCH_* still win.")


def settings_from(config: str | None, overrides: dict | None = None) -> Settings:
    """The effective settings for a command, or a ClickException that says what is wrong."""
    try:
        return load_settings(config, overrides=overrides)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
