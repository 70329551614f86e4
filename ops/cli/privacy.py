"""`gatewatch forget`, `gatewatch export` (GDPR) and `gatewatch audit` (who touched stored data)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ops.cli.options import config_option, settings_from
from sinks.audit_log import keyed_hash


@click.command()
@click.option("--user", "user_id", required=True, help="The user id to forget.")
@click.option("--org", "org_id", help="Only in this org (default: the user id in every org).")
@click.option("--dry-run", is_flag=True, help="Show what would be deleted; delete nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--recovery-dir", "recovery_dirs", multiple=True, type=click.Path(file_okay=False),
              help="A flow's Bytewax recovery directory besides recovery.dir (repeatable).")
@config_option
def forget(user_id, org_id, dry_run, yes, recovery_dirs, config) -> None:
    """Delete every trace of a user: ClickHouse rows in every region's database, their rows
    in raw Parquet (files are rewritten without them), their Redis quota state, their
    window and batch state in the recovery snapshots (stop the flows first), and their
    vault data keys. A user id found nowhere is an error."""
    from ops.privacy import gdpr
    from ops.privacy.audit import audited, hash_key

    settings = settings_from(config)
    subject = gdpr.Subject(user_id, org_id)
    scope = {"subject": subject.pseudonym(hash_key(settings)), "dry_run": dry_run}
    with audited(settings, "forget", scope):
        found = gdpr.find(settings, subject, recovery_dirs)
        click.echo(f"found: {json.dumps(found.summary())}", err=True)
        if found.empty:
            raise click.ClickException("user not found: no store holds anything of this user id"
                                       + (" in this org" if org_id is not None else "") + "; nothing was deleted")
        if dry_run:
            click.echo(json.dumps({"dry_run": True, **found.summary()}))
            return
        if not yes:
            click.confirm("Delete all of it for good?", abort=True, err=True)
        gdpr.forget(settings, subject, recovery_dirs)
        left = gdpr.find(settings, subject, recovery_dirs)
        if not left.empty:
            raise click.ClickException(f"something is left after the delete: {json.dumps(left.summary())}")
        click.echo(json.dumps({"forgotten": True, **found.summary()}))


@click.command()
@click.option("--user", "user_id", required=True, help="The user id to export.")
@click.option("--org", "org_id", help="Only in this org (default: the user id in every org).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Directory to write.")
@config_option
def export(user_id, org_id, out, config) -> None:
    """Write everything held about a user (ClickHouse rows, raw Parquet rows, Redis state,
    and their vault records if the actor may read the vault) as JSON lines under --out."""
    from ops.privacy import gdpr
    from ops.privacy.audit import audited, hash_key

    settings = settings_from(config)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".gatewatch-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise click.ClickException(f"cannot write the export to {out}: {exc.strerror or exc}") from None
    subject = gdpr.Subject(user_id, org_id)
    key = hash_key(settings)
    # The path often names the person (exports/alice): the audit keeps its keyed hash only.
    scope = {"subject": subject.pseudonym(key), "out": keyed_hash(key, str(out.resolve()))}
    with audited(settings, "export", scope):
        written = gdpr.export(settings, subject, out)
    for name, records in written.items():
        click.echo(f"{out / name}: {records} records", err=True)
    click.echo(json.dumps({"out": str(out), "files": written}))


@click.command()
@click.option("--since", type=click.DateTime(), help="Only records from this time on (UTC).")
@click.option("--command", "command_name", help="Only this command (forget, export, replay, ...).")
@config_option
def audit(since, command_name, config) -> None:
    """Print the access audit: who ran which data command, on what, when, and how it ended."""
    from datetime import timezone

    from ops.privacy.audit import AccessAudit

    settings = settings_from(config)
    for row in AccessAudit(settings).read(since.replace(tzinfo=timezone.utc) if since else None, command_name):
        click.echo(json.dumps(row))


@click.group()
def vault() -> None:
    """The prompt/response vault: original text sealed per user, for compliance reads."""


@vault.command("read")
@click.option("--request-id", required=True, help="The request whose original prompt and response to open.")
@click.option("--reason", required=True, help="Why (recorded in the access audit before anything is read).")
@config_option
def vault_read(request_id, reason, config) -> None:
    """Open one request's vault record for an actor with the auditor or admin role; every
    read, allowed or refused, is in the access audit first."""
    from ops.privacy import vault as vaults
    from ops.privacy.audit import audited
    from sinks.vault import VaultKeyError

    settings = settings_from(config)
    if not reason.strip():
        raise click.BadParameter("give the reason for reading the vault", param_hint="--reason")
    if not vaults.vault_configured(settings):
        raise click.ClickException("the vault has no key-encryption key configured (vault.keks, vault.kek_id)")
    scope = {"request_id": request_id, "reason": reason, "role": vaults.role_of(settings) or "none"}
    try:
        with audited(settings, "vault read", scope):
            vaults.require_reader(settings)
            records = vaults.read_request(settings, request_id)
    except vaults.VaultRefused as exc:
        raise click.ClickException(f"refused: {exc}") from None
    except VaultKeyError:
        raise click.ClickException(f"request {request_id} cannot be opened: its user's data key was destroyed when "
                                   "the user was forgotten") from None
    if not records:
        raise click.ClickException(f"no vault record of request {request_id} (never stored, or its user was forgotten)")
    for record in records:
        click.echo(json.dumps(record, default=str, sort_keys=True))


@vault.command("rotate")
@config_option
def vault_rotate(config) -> None:
    """Re-wrap every data key with the active KEK (vault.kek_id); vault files are not rewritten.
    Keep the old KEK in vault.keks until this has run."""
    from ops.privacy import vault as vaults
    from ops.privacy.audit import audited

    settings = settings_from(config)
    if not vaults.vault_configured(settings):
        raise click.ClickException("the vault has no key-encryption key configured (vault.keks, vault.kek_id)")
    with audited(settings, "vault rotate", {"kek_id": settings.vault.kek_id}):
        keys = vaults.key_store(settings)
        try:
            rewrapped = keys.rotate()
            by_kek = keys.kek_ids()
        finally:
            keys.close()
    click.echo(json.dumps({"rewrapped": rewrapped, "data_keys_by_kek": by_kek}))
