"""The words every package shares: token kinds, the keys that name a user, an event and a
window, and the pipeline's topics.

One home, so that a new token kind or a change of key layout is made once: the flow's
dedupe and windows, the sinks (Parquet file names, billing ids, quota updates, the vault),
the producer's partition key and the quota client all build their keys here. The DLQ
record's builders live with its layout in ``schemas.dlq`` (``dlq_record``,
``event_dlq_record``); prices in ``schemas.pricing``.
"""

from __future__ import annotations

TOKEN_KINDS = ("input", "output", "cache_read", "cache_write")
"""Kinds of tokens an event counts, each in its own ``<kind>_tokens`` field and priced on
its own (cache reads are inside ``input`` at the gateway, never added twice)."""

TOKEN_FIELDS = tuple(f"{kind}_tokens" for kind in TOKEN_KINDS)

COUNTED_TOKEN_FIELDS = (*TOKEN_FIELDS, "reasoning_tokens")
"""Every token count an event may carry. Reasoning tokens (schema v2) are part of
``output_tokens``: stored and shown, never priced or added on top."""


def user_key(org_id: str, user_id: str) -> str:
    """``org/user``: a user is only unique within its org. The producer's partition key,
    so that a user's events stay in order, and the key of per-user state and quotas."""
    return f"{org_id}/{user_id}"


def event_key(org_id: str, event_id: str) -> str:
    """``org/event_id``: what dedupe remembers and what deterministic file names, text
    sampling and trace ids are derived from (event ids are unique within an org)."""
    return f"{org_id}/{event_id}"


def window_id(total: dict) -> str:
    """``org/user/model/window start``: one user's usage of one model in one window, the id
    of its billing event and quota update."""
    return f"{user_key(total['org_id'], total['user_id'])}/{total['model']}/{total['window_start_ms']}"


def topic_partitions(kafka, partitions: int) -> dict[str, int]:
    """Every topic the pipeline reads or writes, with its partition count: the topics keyed
    by user (events, billing, feedback) get ``partitions``, the DLQ and quota alerts one.
    ``kafka`` is the settings' kafka section (its ``*_topic`` names)."""
    return {kafka.events_topic: partitions, kafka.dlq_topic: 1, kafka.billing_topic: partitions,
            kafka.quota_alerts_topic: 1, kafka.feedback_topic: partitions}
