"""`gatewatch redact`: try the redaction policy on your own data.

    $ echo '{"text": "mail ana@example.com"}' | gatewatch redact
    {"text": "mail <EMAIL_ADDRESS>", "entities": [{"type": "EMAIL_ADDRESS", "start": 5, ...}], ...}

One JSON line in ({"text": ...}, optionally an "id" that is echoed back), one JSON line out
with the redacted text, the entities (type, start, end, score: offsets into the input,
never the value), the policy flags and the classification the pipeline would record. A line
that is not a JSON object with a string "text" gets {"error": ..., "line": N} and the run
goes on (exit code 0; with --strict, 1 when any line failed).

With --explain each output line also lists, per span, which tier found it and the operator
applied (`"explain": [{"type", "start", "end", "score", "tier", "operator"}]`), so that a
policy can be tuned; the original value is never printed.
"""

from __future__ import annotations

import json
import sys

import click

from ops.cli.options import config_option, settings_from


def redaction_settings(config: str | None, mode: str | None, entities: str | None, operator: str | None,
                       hash_key: str | None):
    """The [redaction] section of the settings, with the command line's overrides on top."""
    from redaction import RedactionSettings

    base = settings_from(config).redaction if config else RedactionSettings()
    values = base.model_dump()
    if base.hash_key is not None:
        values["hash_key"] = base.hash_key.get_secret_value()
    for key, value in (("mode", mode), ("entities", entities), ("operator", operator), ("hash_key", hash_key)):
        if value is not None:
            values[key] = value
    try:
        return RedactionSettings(**values)
    except ValueError as exc:
        raise click.ClickException(f"invalid redaction settings: {exc}") from None


def _record(redactor, result, ident, explain: bool = False) -> dict:
    counts = result.counts()
    flags = (["pii_redacted"] + [f"pii:{t}" for t in sorted(counts)]) if counts else []
    out = {"text": result.text, "entities": [e.to_dict() for e in result.entities], "policy_flags": flags,
           "classification": redactor.classify(counts, bool(result.text)), "pii_entity_counts": counts}
    if explain:
        out["explain"] = [{**e.explain(), "operator": redactor.settings.operator_for(e.type)} for e in result.entities]
    if ident is not None:
        out["id"] = ident
    return out


@click.command("redact")
@config_option
@click.option("--mode", type=click.Choice(["fast", "thorough"]), help="Override redaction.mode.")
@click.option("--entities", help="Override redaction.entities (comma-separated, e.g. EMAIL_ADDRESS,PERSON).")
@click.option("--operator", type=click.Choice(["replace", "mask", "hash"]), help="Override the default operator.")
@click.option("--hash-key", envvar="GATEWATCH_REDACTION__HASH_KEY", help="Key for the hash operator.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1),
              help="Lines redacted together in thorough mode (spaCy batches).")
@click.option("--strict", is_flag=True, help="Exit with status 1 when any line could not be redacted.")
@click.option("--input", "source", type=click.File("r", encoding="utf-8"), default="-", show_default=True,
              help="JSON lines to redact (default: stdin).")
@click.option("--explain", is_flag=True,
              help="Per span, the tier that found it and the operator applied (never the value).")
def redact(config, mode, entities, operator, hash_key, batch_size, strict, source, explain) -> None:
    """Redact JSON lines {"text": ...} from stdin (or --input); one JSON line per input on stdout."""
    from redaction import RedactionError, Redactor

    settings = redaction_settings(config, mode, entities, operator, hash_key)
    redactor = Redactor(settings)
    failed = False
    pending: list[tuple[int, str, object]] = []

    def flush() -> None:
        nonlocal failed
        if not pending:
            return
        results = redactor.redact_texts([text for _, text, _ in pending])
        for (number, _text, ident), result in zip(pending, results):
            if isinstance(result, RedactionError):
                failed = True
                record = {"error": f"redaction failed: {result.reason}", "line": number}
                if ident is not None:
                    record["id"] = ident
            else:
                record = _record(redactor, result, ident, explain)
            click.echo(json.dumps(record, ensure_ascii=False))
        sys.stdout.flush()
        pending.clear()

    size = batch_size if settings.mode == "thorough" else 1
    for number, line in enumerate(source, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            flush()
            failed = True
            click.echo(json.dumps({"error": f"not JSON: {exc.msg} at column {exc.colno}", "line": number}))
            continue
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            flush()
            failed = True
            click.echo(json.dumps({"error": 'expected an object with a string "text"', "line": number}))
            continue
        pending.append((number, item["text"], item.get("id")))
        if len(pending) >= size:
            flush()
    flush()
    sys.exit(1 if failed and strict else 0)

