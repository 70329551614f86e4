"""The codecs of the pipeline's own records: billing events, quota updates and quota
alerts (the DLQ record is in ``schemas.dlq``), with the shipped local schema ids.
"""

from __future__ import annotations

import functools

from schemas.codec import RecordCodec
from schemas.registry import default_local_registry
from schemas.rules import InvalidEvent, shown
from schemas.vocabulary import TOKEN_KINDS, window_id


@functools.cache
def record_codec(name: str) -> RecordCodec:
    """Codec of one of the pipeline's own record schemas, with the shipped local ids.

    Pipeline-produced records (DLQ, billing events, quota updates and alerts) always use
    the local ids, also when a Confluent registry serves the gateway events: the pipeline
    owns these schemas and `gatewatch schemas check` gates their evolution."""
    return RecordCodec(default_local_registry(), name)


def encode_billing_event(record: dict) -> bytes:
    return record_codec("billing_event").encode(record)


def decode_billing_event(value: bytes) -> dict:
    return record_codec("billing_event").decode(value)


def encode_quota_alert(record: dict) -> bytes:
    return record_codec("quota_alert").encode(record)


def decode_quota_alert(value: bytes) -> dict:
    return record_codec("quota_alert").decode(value)


def quota_update(total: dict) -> dict:
    """A window total of the flow (org_id, user_id, model, window_start_ms, window_length_ms,
    n, input, output, cache_read, cache_write) as a QuotaUpdate record."""
    return {
        "update_id": f"{window_id(total)}#{total['n']}",
        "org_id": total["org_id"], "user_id": total["user_id"], "model": total["model"],
        "window_start_ms": total["window_start_ms"], "window_length_ms": total["window_length_ms"],
        "events": total["n"],
        **{f"{kind}_tokens": total[kind] for kind in TOKEN_KINDS},
    }


def encode_quota_update(total: dict) -> bytes:
    """Accepts a flow window total or a QuotaUpdate record."""
    try:
        record = total if "update_id" in total else quota_update(total)
    except KeyError as exc:
        raise InvalidEvent("missing_field", f"the window total has no {shown(exc.args[0])}") from None
    return record_codec("quota_update").encode(record)


def decode_quota_update(value: bytes) -> dict:
    return record_codec("quota_update").decode(value)
