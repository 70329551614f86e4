"""The one-pass tests in front of ``EventCodec.clean_strings`` and ``validate`` against the
rules applied one by one (what both did before): on events with tricky strings, lists and
numbers, the same event comes out, or the same exception with the same code and reason."""

from __future__ import annotations

import copy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ops.settings import ValidationSettings
from schemas.codec import EventCodec
from schemas.registry import LocalRegistry
from tests.test_codec import NOW, event

CODEC = EventCodec(LocalRegistry(), ValidationSettings())
FEEDBACK = EventCodec(LocalRegistry(), ValidationSettings(), schema="feedback_event")
MANY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

IDS = ("event_id", "request_id", "user_id", "org_id", "conversation_id", "experiment_id", "provider", "endpoint",
       "model", "model_version", "error_code", "variant", "prompt", "response", "trace_id", "span_id")
tricky_text = st.one_of(
    st.sampled_from(["", "ok", "two words", "e\u0301", "\u00e9", "a\u200db", "tab\there", "\ud800", "x" * 128,
                     "x" * 129, "\u00e9" * 129, "e\u0301" * 100, "0af7651916cd43dd8448eb211c80319c", "0" * 32,
                     "B7AD6B7169203331", "line\nbreak", "\u3000", "\ue000"]),
    st.text(max_size=12), st.text(st.characters(max_codepoint=127), max_size=140))
field_value = st.one_of(tricky_text, st.none(), st.integers(-3, 3))
numbers = st.one_of(st.integers(-2, 2), st.integers(-10, 20_000_000), st.sampled_from([None, 0.5, float("nan")]))
lists = st.one_of(st.lists(tricky_text, max_size=4), st.lists(st.just("a"), min_size=255, max_size=258),
                  st.none(), st.lists(st.integers(), max_size=2))


def outcome(run, record: dict):
    record = copy.deepcopy(record)
    try:
        run(record)
    except Exception as exc:  # noqa: BLE001 - the comparison covers every exception, not only InvalidEvent
        return ("raised", type(exc).__name__, getattr(exc, "code", None), getattr(exc, "reason", str(exc)))
    return ("event", record)


def one_pass(codec: EventCodec):
    return lambda record: codec.validate(codec.clean_strings(record), NOW)


def one_by_one(codec: EventCodec):
    return lambda record: codec._validate_one_by_one(codec._clean_strings_one_by_one(record), NOW)


@MANY
@given(st.dictionaries(st.sampled_from(IDS), field_value, max_size=4),
       st.dictionaries(st.sampled_from(["safety_decisions", "policy_flags"]), lists, max_size=2))
def test_strings_and_lists_answer_as_the_rules_one_by_one(strings, list_fields):
    record = event(**strings, **list_fields)
    assert outcome(one_pass(CODEC), record) == outcome(one_by_one(CODEC), record)


@MANY
@given(st.dictionaries(st.sampled_from(["input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
                                        "reasoning_tokens", "latency_ms", "time_to_first_token_ms", "status_code",
                                        "schema_version"]), numbers, max_size=4),
       st.sampled_from(["eu", "us", "mars", ""]),
       st.sampled_from([NOW, NOW - 7 * 86400 * 1000, NOW - 7 * 86400 * 1000 - 1, NOW + 300_000, NOW + 300_001]),
       st.dictionaries(st.sampled_from(["event_id", "model", "user_id"]), st.sampled_from(["", None, "m"])))
def test_numbers_regions_and_times_answer_as_the_rules_one_by_one(numbers_, region, at, required):
    record = event(**numbers_, region=region, event_time=at, **required)
    assert outcome(one_pass(CODEC), record) == outcome(one_by_one(CODEC), record)


def test_the_one_pass_tests_do_not_hide_a_rule():
    """Each rule still refuses on the fast path (a predicate that always said yes would pass
    the comparisons above only where both accept)."""
    for changes, code in [({"user_id": "a b"}, "bad_id"), ({"prompt": "\ud800"}, "bad_text"),
                          ({"model": "x" * 129}, "too_long"), ({"policy_flags": ["a"] * 257}, "too_large"),
                          ({"trace_id": "0" * 32}, "bad_id"), ({"input_tokens": -1}, "out_of_range"),
                          ({"status_code": 600}, "out_of_range"), ({"region": "mars"}, "unknown_region"),
                          ({"event_time": NOW + 300_001}, "future_timestamp"), ({"org_id": ""}, "missing_field")]:
        assert outcome(one_pass(CODEC), event(**changes))[2] == code, changes


@MANY
@given(st.dictionaries(st.sampled_from(["event_id", "user_id", "comment", "region"]), field_value, max_size=3),
       st.sampled_from([NOW, NOW + 300_001]))
def test_feedback_events_answer_as_the_rules_one_by_one(fields, at):
    record = {"event_id": "f-1", "request_id": "req-1", "schema_version": 1, "event_time": at, "user_id": "u",
              "org_id": "o", "region": "eu", "rating": "THUMBS_UP", "comment": None, "conversation_id": None,
              "experiment_id": None, "variant": None, "policy_flags": [], **fields}
    assert outcome(one_pass(FEEDBACK), record) == outcome(one_by_one(FEEDBACK), record)
