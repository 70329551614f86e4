"""PII redaction and data classification for gateway events; imports nothing of `ops`
or `dataflows` (its settings section nests into `ops.settings`).

    from redaction import Redactor, RedactionSettings, RedactionError
    redactor = Redactor(RedactionSettings(operators={"PERSON": "hash"}, hash_key="..."))
    redactor.redact("mail me at ana@example.com").text      # 'mail me at <EMAIL_ADDRESS>'
    redactor.redact_event(event)                             # new dict, flags + classification
    redactor.redact_events(events)                           # list of dict | RedactionError

See redaction/engine.py for the tiers and docs in RedactionSettings for every knob.
"""

from redaction.settings import ClassificationPolicy, RedactionSettings
from redaction.types import Entity, RedactionError, RedactionResult


def __getattr__(name: str):
    # The engine pulls in hyperscan, Presidio and the gazetteers: load it on first use, so
    # that `from redaction import RedactionSettings` (ops.settings) stays cheap.
    if name == "Redactor":
        from redaction.engine import Redactor

        return Redactor
    raise AttributeError(name)


__all__ = ["ClassificationPolicy", "Entity", "RedactionError", "RedactionResult", "RedactionSettings", "Redactor"]
