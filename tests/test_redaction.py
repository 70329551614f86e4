"""PII redaction (issue 4): every entity type, every operator, classification, events, the
fail-closed path, the CLI and a generated corpus. One Redactor per module (building one
loads Presidio and the gazetteers, ~3 s); spaCy is loaded once, by the thorough-mode test."""

from __future__ import annotations

import gc
import hashlib
import json
import random
import re
import time

import pytest
from click.testing import CliRunner

from redaction import RedactionError, RedactionResult, RedactionSettings, Redactor, native
from redaction.settings import ClassificationPolicy


@pytest.fixture(scope="module", params=["native", "python"])
def redactor(request) -> Redactor:
    """Every test that takes it runs on both paths: the C half of the fast tier
    (redaction/_native.c) and the pure-Python one it falls back to."""
    if request.param == "native" and native.extension is None:
        pytest.skip("redaction/_native.c is not built here (no C compiler at install): only the Python path runs")
    return Redactor(RedactionSettings(), native=request.param == "native")


def kinds(result: RedactionResult) -> list[str]:
    return [e.type for e in result.entities]


# -- every entity type ---------------------------------------------------------------------

POSITIVE = [
    ("EMAIL_ADDRESS", "write to {} today", "ana.lopez+news@example.co.uk"),
    ("EMAIL_ADDRESS", "mailto:{}", "j.smith@uni-heidelberg.de"),
    ("PHONE_NUMBER", "call me on {} please", "+1 415 555 2671"),
    ("PHONE_NUMBER", "my number is {}", "(415) 555-2671"),
    ("PHONE_NUMBER", "tel {} (office)", "+44 20 7946 0958"),
    ("PHONE_NUMBER", "mobile: {}", "+33 6 12 34 56 78"),
    ("PHONE_NUMBER", "Ruf mich an: {}", "030 12345678"),
    ("PHONE_NUMBER", "whatsapp {}", "+919876543210"),
    ("CREDIT_CARD", "card {} exp 09/27", "4111 1111 1111 1111"),
    ("CREDIT_CARD", "visa19 {}", "4000-0000-0000-0000-006"),
    ("CREDIT_CARD", "mastercard 2-series {}", "2223003122003222"),
    ("CREDIT_CARD", "amex {}", "3782 822463 10005"),
    ("CREDIT_CARD", "maestro {}", "6759649826438453"),
    ("IBAN_CODE", "IBAN {} please", "DE89 3704 0044 0532 0130 00"),
    ("IBAN_CODE", "pay to {}.", "GB82WEST12345698765432"),
    ("US_SSN", "my SSN is {}", "536-22-8726"),
    ("US_SSN", "social security number {}", "536 22 8726"),
    ("IP_ADDRESS", "login from {} failed", "8.8.4.4"),
    ("IP_ADDRESS", "v6 {} blocked", "2a01:4f8:c17:b8f::2"),
    ("CRYPTO", "send BTC to {}", "1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa"),
    ("CRYPTO", "bech32 {}", "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq"),
    ("SECRET", "OPENAI_API_KEY={}", "sk-proj-" + "aB3" * 16),
    ("SECRET", "key {} leaked", "sk-ant-api03-" + "x9Y_" * 24),
    ("SECRET", "token {}", "ghp_" + "A1b2C3d4E5" * 3 + "f6g7h8"),
    ("SECRET", "AWS_ACCESS_KEY_ID={}", "AKIAIOSFODNN7EXAMPL3"),
    ("SECRET", "slack {}", "xoxb-123456789012-123456789012-abcdefABCDEF123456"),
    ("SECRET", "stripe {}", "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc"),
    ("SECRET", "maps {}", "AIza" + "SyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q"),
    ("SECRET", "hf {}", "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"),
    ("SECRET", "jwt {}", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NSJ9.dBjftJeZ4CVPmB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
    ("SECRET", "Authorization: Bearer {}", "mF_9.B5f-4.1JqM1234567890abcdef"),
    ("SECRET", "password: {}", "Sommer2024!"),
    ("SECRET", "postgres://app:{}@db.internal:5432/prod", "S3cretPass"),
    ("PERSON", "Dear {}, thanks for the update.", "Priya Raghunathan"),
    ("PERSON", "my name is {} and I need help", "ana lópez"),
    ("PERSON", "I met with {} yesterday.", "Łukasz Kowalski"),
    ("PERSON", "Ask {} whether the numbers are final.", "Akise Tevetoğlu"),
    ("PERSON", "Dr. {} prescribed a higher dose.", "Okafor"),
    ("PERSON", "Best regards,\n{}", "Grace Hopper"),
    ("PERSON", "Hi, I'm {}. Can you help?", "John"),
]


@pytest.mark.parametrize("entity,template,value", POSITIVE, ids=[f"{p[0]}-{i}" for i, p in enumerate(POSITIVE)])
def test_every_entity_type_is_found_and_replaced(redactor, entity, template, value):
    text = template.format(value)
    result = redactor.redact(text)
    assert entity in kinds(result), (text, result.entities)
    assert value not in result.text
    assert f"<{entity}>" in result.text
    for e in result.entities:  # offsets point into the original text
        assert 0 <= e.start < e.end <= len(text)
        assert 0 < e.score <= 1
    found = [e for e in result.entities if e.type == entity][0]
    assert value in text[found.start:found.end] or text[found.start:found.end] in value


@pytest.mark.parametrize("text", [
    "keep DE89 3704 0044 0532 0130 00 and GB82WEST12345698765432 safe",
    "de89370400440532013000, gb82west12345698765432",
])
def test_an_iban_followed_by_words_and_another_iban_finds_both(redactor, text):
    """The IBAN pattern runs on over spaces into the next words; the second IBAN must not be
    swallowed by the first one's match."""
    result = redactor.redact(text)
    assert kinds(result) == ["IBAN_CODE", "IBAN_CODE"]
    assert "GB82" not in result.text.upper()


@pytest.mark.parametrize("text", ["ID 4111 1111 1111 1111", "account 4111 1111 1111 1111", "ref 3782 822463 10005"])
def test_a_card_printed_in_card_groups_is_a_card_after_any_word(redactor, text):
    """Identifier words keep contiguous order and tracking numbers that pass Luhn; a number
    grouped the way cards are printed is redacted whatever stands before it."""
    assert kinds(redactor.redact(text)) == ["CREDIT_CARD"]


@pytest.mark.parametrize("text, value", [
    ("pay with xy4111111111111111 now", "4111111111111111"),
    ("ref4111111111111111", "4111111111111111"),
    ("IBAN:ibanDE89370400440532013000 ok", "DE89370400440532013000"),
    ("see refDE89 3704 0044 0532 0130 00", "DE89 3704 0044 0532 0130 00"),
    ("acct gb82west12345698765432", "gb82west12345698765432"),
])
def test_a_card_or_iban_glued_to_letters_is_still_found(redactor, text, value):
    """A letter prefix stuck to the number hides no card or IBAN whose checksum passes."""
    result = redactor.redact(text)
    assert value not in result.text
    assert [text[e.start:e.end] for e in result.entities] == [value]


@pytest.mark.parametrize("text", [
    "digest a3f94111111111111111 ok",          # inside a token that mixes letters and digits
    "sha 9f2e1c4111111111111111",
    "xy4111111111111112 is not Luhn-valid",
    "build_4111111111111111",                 # after "_": part of an identifier
    "tokenDE89370400440532013001 fails mod 97",
])
def test_glued_digits_inside_identifiers_or_failing_checksums_stay(redactor, text):
    assert redactor.redact(text).entities == []


def test_iban_layout_check_agrees_with_presidio_on_checksum_valid_candidates():
    """_iban_layout_ok replaces Presidio's IbanRecognizer.validate_result after our mod-97
    check: every candidate that passes mod 97 (check digits 00-99, every country Presidio
    knows and two it does not) gets the same answer."""
    import string

    from presidio_analyzer.predefined_recognizers import IbanRecognizer
    from presidio_analyzer.predefined_recognizers.generic.iban_patterns import regex_per_country

    from redaction.patterns import _iban_layout_ok, _mod97

    presidio = IbanRecognizer()
    rnd = random.Random(5)
    checked = valid = 0
    for _ in range(3000):
        country = rnd.choice(sorted(regex_per_country) + ["XX", "ZZ"])
        body = "".join(rnd.choice(string.digits * 3 + string.ascii_uppercase) for _ in range(rnd.randint(11, 30)))
        for check in range(100):
            candidate = f"{country}{check:02d}{body}"
            if _mod97(candidate):
                checked += 1
                ours = _iban_layout_ok(candidate)
                valid += ours
                assert ours == bool(presidio.validate_result(candidate)), candidate
    assert checked > 2000 and valid > 20


def test_ipv4_octet_checks_agree_with_ipaddress():
    """find_ip tests bare IPv4 candidates on their octets instead of building an address."""
    import ipaddress

    from redaction.patterns import _is_ipv4, _not_personal, _private_v4

    rnd = random.Random(9)
    for _ in range(20000):
        octets = [str(rnd.choice([rnd.randint(0, 999), rnd.randint(0, 255), rnd.choice([0, 10, 127, 169, 172, 192, 224])]))
                  .zfill(rnd.choice([1, 1, 2, 3])) for _ in range(4)]
        candidate = ".".join(octets)
        try:
            address = ipaddress.ip_address(candidate)
        except ValueError:
            assert not _is_ipv4(candidate), candidate
            continue
        assert _is_ipv4(candidate) and _private_v4(candidate) == _not_personal(address), candidate


@pytest.mark.parametrize("ssn, found", [("536-22-1234", True), ("123-45-6789", False), ("078-05-1120", False),
                                         ("555-55-5555", False), ("536 22 1234", True)])
def test_ssn_sample_and_one_digit_numbers_are_not_ssns(redactor, ssn, found):
    assert ("US_SSN" in kinds(redactor.redact(f"SSN {ssn}"))) is found


def test_private_key_block_is_removed_whole(redactor):
    key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\nq1w2e3r4t5y6\n-----END RSA PRIVATE KEY-----"
    result = redactor.redact(f"why does ssh reject this?\n{key}\nthanks")
    assert "MIIEow" not in result.text and "q1w2e3" not in result.text
    assert result.text.endswith("\nthanks")
    unterminated = redactor.redact("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC")
    assert "MIIEvQ" not in unterminated.text  # no END marker: everything after BEGIN goes


CLEAN = [
    "Python 3.11.7 was released on 2024-05-01 at 12:30:45 UTC.",
    "Request 3f2b6c1e-9a4d-4e8b-b5a1-2c7d9e0f1a2b failed after 3 retries (commit 9fceb02d0ae598e95dc970b74767f19372d61af8).",
    "The service listens on localhost:8080 and talks to Redis at 127.0.0.1:6379 and 10.0.0.12.",
    "Order #4839201845 shipped; revenue grew 12.5% to $4,210,000 in Q3 2024.",
    "Our New York and San Francisco offices close early on Friday; Paris stays open.",
    "The Unicode standard says In CPython the id is the address. See the docs.",
    "Set the PASSWORD environment variable; password = getpass() reads it.",
    "Card 4111 1111 1111 1112 fails the Luhn check.",
    "Will you review the Pull Request before May?",
]


@pytest.mark.parametrize("text", CLEAN)
def test_clean_text_is_left_untouched(redactor, text):
    result = redactor.redact(text)
    assert result.text == text, result.entities
    assert result.entities == []


def test_non_ascii_offsets_point_into_the_original(redactor):
    text = "Grüße aus Köln – schreib an jürgen.müller@example.de oder Łukasz Kowalski, Tel. +49 30 1234567 ✓"
    result = redactor.redact(text)
    values = {e.type: text[e.start:e.end] for e in result.entities}
    assert values["EMAIL_ADDRESS"] == "jürgen.müller@example.de"
    assert values["PHONE_NUMBER"] == "+49 30 1234567"
    assert values["PERSON"] == "Łukasz Kowalski"
    assert result.text.endswith("✓")


def test_too_many_gate_hits_still_redacts(redactor):
    text = " ".join(["1.2.3"] * 50) + " mail bob@example.com " + " ".join(["7 8"] * 50)
    limit = redactor.gate.max_hits
    redactor.gate.max_hits = 5
    try:
        result = redactor.redact(text + " ")  # new text, not cached
    finally:
        redactor.gate.max_hits = limit
    assert "bob@example.com" not in result.text


# -- operators -------------------------------------------------------------------------------

def test_replace_template():
    r = Redactor(RedactionSettings(entities=["EMAIL_ADDRESS"], replace_template="[{type}]"))
    assert r.redact("mail a@example.com").text == "mail [EMAIL_ADDRESS]"


def test_mask_operator_keeps_configured_tail():
    r = Redactor(RedactionSettings(entities=["CREDIT_CARD", "EMAIL_ADDRESS"], operator="mask",
                                   mask_keep_last={"credit_card": 4}))
    out = r.redact("card 4111 1111 1111 1111 mail a@example.com").text
    assert out == "card **** **** **** 1111 mail *************"


def test_hash_operator_is_keyed_stable_normalised_and_not_reversible():
    settings = RedactionSettings(operators={"PHONE_NUMBER": "hash", "EMAIL_ADDRESS": "hash"}, hash_key="k1")
    one, two = Redactor(settings), Redactor(settings)
    a = one.redact("call +1 415 555 2671 or mail Ana@Example.com").text
    b = two.redact("mail ana@example.com, call +1 (415) 555-2671").text
    phone_a = a.split()[1]
    assert phone_a.startswith("<PHONE_NUMBER:") and len(phone_a) == len("<PHONE_NUMBER:>") + 16
    assert phone_a in b  # same value, other formatting, other process -> same token
    email_token = [w for w in a.split() if w.startswith("<EMAIL_ADDRESS:")][0]
    assert email_token.rstrip(",") in b
    assert "415" not in a and "ana" not in a.lower()
    # Not a plain digest of the value: without the key the token cannot be recomputed.
    digest = phone_a.split(":")[1].rstrip(">")
    for candidate in ("+14155552671", "14155552671", "+1 415 555 2671"):
        assert hashlib.sha256(candidate.encode()).hexdigest()[:16] != digest
    other = Redactor(RedactionSettings(operators={"PHONE_NUMBER": "hash"}, hash_key="k2"))
    assert phone_a not in other.redact("call +1 415 555 2671").text
    # PERSON mixed with replace: only the configured entity is hashed
    assert "<PERSON>" in one.redact("Dear Priya Raghunathan,").text


def test_hash_operator_requires_a_key():
    with pytest.raises(ValueError, match="hash_key"):
        RedactionSettings(operators={"PERSON": "hash"})


# -- settings ------------------------------------------------------------------------------

def test_settings_accept_environment_style_values():
    s = RedactionSettings(entities="email_address, PERSON", operators={"person": "mask"},
                          classification={"levels": {"person": "restricted"}})
    assert s.entities == ["EMAIL_ADDRESS", "PERSON"]
    assert s.operator_for("PERSON") == "mask" and s.operator_for("EMAIL_ADDRESS") == "replace"
    assert s.classification.levels == {"PERSON": "restricted"}
    with pytest.raises(ValueError, match="thorough"):
        RedactionSettings(entities=["LOCATION"])
    with pytest.raises(ValueError):
        RedactionSettings(mode="quick")


def test_extra_presidio_pattern_entity():
    r = Redactor(RedactionSettings(entities=["EMAIL_ADDRESS", "UK_NHS"]))
    out = r.redact("NHS number 943 476 5919, mail a@example.com")
    assert "UK_NHS" in kinds(out) and "943 476 5919" not in out.text


# -- events, flags and classification ------------------------------------------------------

def test_redact_event_returns_a_new_event_with_flags_and_classification(redactor):
    event = {"event_id": "e1", "prompt": "I'm Priya Raghunathan, mail priya@example.com",
             "response": None, "feedback": {"comment": "call +44 20 7946 0958", "score": 1},
             "comment": "card 4111 1111 1111 1111", "policy_flags": ["safety:ok"], "user_id": "u1"}
    out = redactor.redact_event(event)
    assert out is not event and event["prompt"].startswith("I'm Priya")  # input untouched
    assert out["prompt"] == "I'm <PERSON>, mail <EMAIL_ADDRESS>"
    assert out["response"] is None
    assert out["feedback"] == {"comment": "call <PHONE_NUMBER>", "score": 1}
    assert out["comment"] == "card <CREDIT_CARD>"
    assert out["policy_flags"] == ["safety:ok", "pii_redacted", "pii:CREDIT_CARD", "pii:EMAIL_ADDRESS",
                                   "pii:PERSON", "pii:PHONE_NUMBER"]
    assert out["pii_entity_counts"] == {"PERSON": 1, "EMAIL_ADDRESS": 1, "PHONE_NUMBER": 1, "CREDIT_CARD": 1}
    assert out["classification"] == "restricted"
    assert out["user_id"] == "u1"


@pytest.mark.parametrize("prompt,response,level", [
    (None, None, "public"),
    ("", "", "public"),
    ("summarise the report", "here it is", "internal"),
    ("my server is 8.8.8.8", None, "internal"),
    ("mail ana@example.com", None, "confidential"),
    ("key sk-proj-" + "a" * 30, None, "restricted"),
    ("Dear Ana Lopez, mail ana@example.com or call +1 415 555 2671", None, "restricted"),  # 3 types
])
def test_default_classification_policy(redactor, prompt, response, level):
    out = redactor.redact_event({"prompt": prompt, "response": response, "policy_flags": []})
    assert out["classification"] == level
    assert ("pii_redacted" in out["policy_flags"]) == (level not in ("public", "internal") or "8.8.8.8" in (prompt or ""))


def test_configurable_classification_policy():
    policy = ClassificationPolicy(no_pii="public", levels={"EMAIL_ADDRESS": "internal"}, default_pii="restricted",
                                  restricted_at_types=None)
    r = Redactor(RedactionSettings(classification=policy))
    assert r.redact_event({"prompt": "hello"})["classification"] == "public"
    assert r.redact_event({"prompt": "mail a@example.com"})["classification"] == "internal"
    assert r.redact_event({"prompt": "call +1 415 555 2671"})["classification"] == "restricted"


def test_redact_events_batch_keeps_order_and_fails_per_event(redactor):
    events = [{"prompt": "mail a@example.com"}, {"prompt": 42}, "not a dict", {"prompt": "fine", "response": "ok"}]
    out = redactor.redact_events(events)
    assert out[0]["prompt"] == "mail <EMAIL_ADDRESS>"
    assert isinstance(out[1], RedactionError) and isinstance(out[2], RedactionError)
    assert out[3]["prompt"] == "fine" and out[3]["policy_flags"] == []
    with pytest.raises(RedactionError):
        redactor.redact_event({"prompt": 42})


# -- fail closed ---------------------------------------------------------------------------

def test_time_budget_exceeded_fails_closed():
    r = Redactor(RedactionSettings(entities=["EMAIL_ADDRESS"], time_budget_ms=5, time_budget_ms_per_kb=0,
                                   cache_size=0))
    detector = r.detectors[0]
    slow = detector.finder

    def sleepy(text, lo, hi):  # burns CPU: the budget counts the thread's CPU time
        until = time.thread_time() + 0.02
        while time.thread_time() < until:
            pass
        return slow(text, lo, hi)

    object.__setattr__(detector, "finder", sleepy)
    secret_text = "mail ana@example.com"
    with pytest.raises(RedactionError) as info:
        r.redact(secret_text)
    assert "time budget" in str(info.value) and "ana" not in str(info.value)
    out = r.redact_events([{"prompt": secret_text}])
    assert isinstance(out[0], RedactionError)


def test_time_spent_off_the_cpu_is_not_charged_to_the_text():
    """The wall clock decides only whether the CPU time is measured (on a second pass):
    a thread that waits (preempted by other processes; here asleep) keeps its text."""
    r = Redactor(RedactionSettings(entities=["EMAIL_ADDRESS"], time_budget_ms=5, time_budget_ms_per_kb=0,
                                   cache_size=0))
    detector = r.detectors[0]
    fast = detector.finder
    passes = []

    def waiting(text, lo, hi):
        passes.append(lo)
        time.sleep(0.02)
        return fast(text, lo, hi)

    object.__setattr__(detector, "finder", waiting)
    result = r.redact("mail ana@example.com")
    assert result.text == "mail <EMAIL_ADDRESS>" and len(passes) == 2


def test_a_garbage_collection_is_not_charged_to_the_text_it_interrupts():
    r = Redactor(RedactionSettings(entities=["EMAIL_ADDRESS"], time_budget_ms=20, time_budget_ms_per_kb=0,
                                   cache_size=0))

    def slow_collection(phase, _info):  # a full one takes ~170 ms in a flow process
        if phase == "start":
            until = time.thread_time() + 0.002
            while time.thread_time() < until:
                pass

    threshold = gc.get_threshold()
    gc.callbacks.append(slow_collection)
    gc.set_threshold(1, 1, 1)  # a collection at nearly every allocation
    try:
        result = r.redact("mail ana@example.com or bo@example.org, " * 20)
    finally:
        gc.callbacks.remove(slow_collection)
        gc.set_threshold(*threshold)
    assert kinds(result).count("EMAIL_ADDRESS") == 40 and gc.isenabled()


def test_a_raising_recognizer_fails_closed():
    r = Redactor(RedactionSettings(entities=["EMAIL_ADDRESS"], cache_size=0))

    def broken(text, lo, hi):
        raise ValueError(f"cannot parse {text[lo:hi]}")

    object.__setattr__(r.detectors[0], "finder", broken)
    with pytest.raises(RedactionError) as info:
        r.redact("mail ana@example.com")
    assert "ana" not in str(info.value) and "ValueError" in str(info.value)
    [result] = r.redact_events([{"prompt": "mail ana@example.com", "response": None}])
    assert isinstance(result, RedactionError)


def test_overlong_text_is_refused():
    r = Redactor(RedactionSettings(entities=["EMAIL_ADDRESS"], max_text_chars=10))
    with pytest.raises(RedactionError, match="max_text_chars"):
        r.redact("x" * 11)


# -- the CLI ---------------------------------------------------------------------------------

def test_cli_round_trip():
    from ops.cli.redact import redact

    lines = "\n".join([
        json.dumps({"text": "mail ana@example.com or call +44 20 7946 0958", "id": 1}),
        "this is not json",
        json.dumps({"text": 5}),
        json.dumps({"text": "nothing to see"}),
    ]) + "\n"
    result = CliRunner().invoke(redact, [], input=lines)
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in result.output.splitlines()]
    assert len(out) == 4
    assert out[0]["text"] == "mail <EMAIL_ADDRESS> or call <PHONE_NUMBER>" and out[0]["id"] == 1
    assert out[0]["entities"][0] == {"type": "EMAIL_ADDRESS", "start": 5, "end": 20, "score": 0.95}
    assert out[0]["policy_flags"] == ["pii_redacted", "pii:EMAIL_ADDRESS", "pii:PHONE_NUMBER"]
    assert out[0]["classification"] == "confidential"
    assert "ana@example.com" not in result.output
    assert out[1]["line"] == 2 and "error" in out[1]
    assert out[2]["line"] == 3 and "error" in out[2]
    assert out[3] == {"text": "nothing to see", "entities": [], "policy_flags": [], "classification": "internal",
                      "pii_entity_counts": {}}
    strict = CliRunner().invoke(redact, ["--strict"], input=lines)
    assert strict.exit_code == 1
    assert "Usage" in CliRunner().invoke(redact, ["--help"]).output


def test_cli_operator_override():
    from ops.cli.redact import redact

    result = CliRunner().invoke(redact, ["--operator", "hash", "--hash-key", "k"],
                                input=json.dumps({"text": "mail ana@example.com"}) + "\n")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["text"].startswith("mail <EMAIL_ADDRESS:")


# -- a generated corpus: nothing of the PII survives -----------------------------------------

@pytest.fixture(scope="module")
def corpus():
    from ops.bench.redaction import generate_corpus

    return generate_corpus(400, seed=2024, pii_ratio=0.6)


def test_no_pattern_pii_or_secret_of_a_generated_corpus_survives(redactor, corpus):
    leaked = []
    person_total = person_leaked = 0
    for sample in corpus:
        out = redactor.redact(sample.text).text
        for label, start, end in sample.spans:
            value = sample.text[start:end]
            if label == "PERSON":
                person_total += 1
                person_leaked += value in out
            elif value in out:
                leaked.append((label, value))
    assert not leaked
    # Names are the one heuristic tier: bounded, not zero (the bench reports the recall).
    assert person_total > 50 and person_leaked / person_total < 0.2


def test_clean_texts_of_the_corpus_are_mostly_untouched(redactor, corpus):
    clean = [s for s in corpus if not s.has_pii]
    untouched = sum(redactor.redact(s.text).text == s.text for s in clean)
    assert untouched / len(clean) >= 0.95


# -- thorough mode (loads spaCy once) ----------------------------------------------------------

def test_thorough_mode_adds_spacy_ner_batched():
    r = Redactor(RedactionSettings(mode="thorough", entities=["PERSON", "LOCATION", "EMAIL_ADDRESS"]))
    events = [{"prompt": "She moved from Lisbon to Nairobi last spring with Mr. Ekanta Cheema."},
              {"prompt": "mail ana@example.com", "response": "The weather in Oslo is mild."},
              {"prompt": 3}]
    out = r.redact_events(events)
    assert "Lisbon" not in out[0]["prompt"] and "Nairobi" not in out[0]["prompt"]
    assert "pii:LOCATION" in out[0]["policy_flags"] and "pii:PERSON" in out[0]["policy_flags"]
    assert out[1]["prompt"] == "mail <EMAIL_ADDRESS>" and "Oslo" not in out[1]["response"]
    assert isinstance(out[2], RedactionError)


# -- the names tier ------------------------------------------------------------------------------

@pytest.mark.parametrize("text,name", [
    ("I met with Maria de la Cruz today.", "Maria de la Cruz"),
    ("Best regards,\nRoan van Dagsburg\nSales", "Roan van Dagsburg"),
    ("(account holder: Gautami Hayer)", "Gautami Hayer"),
    ("Customer: Mücevher Şama\nEmail", "Mücevher Şama"),
    ("Will Smith and Grace Okafor joined.", "Grace Okafor"),
    ("Priya reviewed the pull request.", "Priya"),
])
def test_names_tier_finds(redactor, text, name):
    result = redactor.redact(text)
    assert name not in result.text and "<PERSON>" in result.text, result.entities


@pytest.mark.parametrize("text", [
    "Regards,\nThe Team", "Best regards,\nSupport Team", "Hi all, thanks for joining.",
    "We flew from Paris to Berlin via San Francisco.", "a function called Checksum returns it",
    "Grace periods default to five minutes.", "She hides a class attribute.",
])
def test_names_tier_leaves_alone(redactor, text):
    assert redactor.redact(text).text == text


def test_strict_names_need_a_cue():
    strict = Redactor(RedactionSettings(entities=["PERSON"], names_min_context="strict"))
    assert strict.redact("Priya reviewed the pull request.").text == "Priya reviewed the pull request."
    assert strict.redact("Thanks, Priya").text == "Thanks, <PERSON>"
    assert strict.redact("Priya Raghunathan reviewed it.").text == "<PERSON> reviewed it."


def test_results_are_cached_by_text():
    r = Redactor(RedactionSettings(entities=["EMAIL_ADDRESS"], cache_size=2))
    first = r.redact("mail a@example.com")
    assert r.redact("mail a@example.com") is first
    r.redact("x"), r.redact("y")  # evicts the oldest
    assert r.redact("mail a@example.com") is not first
    uncached = Redactor(RedactionSettings(entities=["EMAIL_ADDRESS"], cache_size=0))
    assert uncached.redact("mail a@example.com") is not uncached.redact("mail a@example.com")


def test_redact_texts_returns_errors_in_place(redactor):
    out = redactor.redact_texts(["mail a@example.com", None, "plain"])
    assert out[0].text == "mail <EMAIL_ADDRESS>" and isinstance(out[1], RedactionError) and out[2].text == "plain"


# -- gate windows ------------------------------------------------------------------------------

def _merged(windows: list[tuple[int, int]]) -> list[list[int]]:
    merged: list[list[int]] = []
    for lo, hi in sorted(windows):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return merged


def test_run_gates_give_the_windows_of_the_patterns_they_replace():
    """A RunGate reports one hit per run instead of one per match end; the windows around
    its hits must be the windows around every end of the plain pattern, on any input."""
    from redaction.gate import Gate, GatePattern
    from redaction.patterns import RunGate, pattern_detectors

    run_gates = [(gate, d.pad_before, d.pad_after) for d in pattern_detectors(("US",), True)
                 for gate in d.gates if isinstance(gate, RunGate)]
    assert len(run_gates) >= 4
    rng = random.Random(13)
    alphabet = b"0123456789" * 4 + b" -./a(+"
    samples = [bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    samples += [b"4155552671", b"call 020 7946 0958 or 2024-01-15 10:30", b"12345678901234567890", b"1 22 333 4444 55555"]
    for gate, before, after in run_gates:
        plain = re.compile(gate.replaces)
        extend = re.compile(gate.extend)
        scanner = Gate([GatePattern("run", gate.first)])
        checked = 0
        for data in samples:
            ends = [e for e in range(1, len(data) + 1) if any(plain.fullmatch(data, s, e) for s in range(e))]
            expected = _merged([(e - before, e + after) for e in ends])
            hits, overflow = scanner.scan(data)
            assert not overflow
            got = _merged([(end - before, extend.match(data, end).end() + after) for _id, _start, end in hits])
            assert got == expected, (gate.replaces, data)
            checked += bool(ends)
        assert checked > 50  # the samples exercise the pattern


def test_the_ipv4_shape_check_agrees_with_ipaddress():
    import ipaddress

    from redaction.patterns import _is_ipv4

    def reference(candidate: str) -> bool:
        try:
            ipaddress.IPv4Address(candidate)
            return True
        except ValueError:
            return False

    rng = random.Random(4)
    candidates = ["1.2.3.4", "01.2.3.4", "0.0.0.0", "255.255.255.255", "256.1.1.1", "1.2.3.", "1.2.3.4 ",
                  "\u0661.2.3.4", "1.2.3.0004", "10.0.0.1", "1..2.3"]
    candidates += ["".join(rng.choice("0123456789.. -") for _ in range(rng.randint(7, 15))) for _ in range(20000)]
    assert sum(reference(c) for c in candidates) > 5
    assert [c for c in candidates if _is_ipv4(c) != reference(c)] == []


def test_full_form_ipv6_read_agrees_with_ipaddress():
    """find_ip reads eight-group IPv6 addresses as one hexadecimal number instead of
    ip_address's per-group parse: same address, same rejections."""
    import ipaddress

    from redaction.patterns import _full_ipv6

    rng = random.Random(6)
    hexdigits = "0123456789abcdefABCDEF"
    odd = hexdigits + "g_ +-\u0661"  # what int(..., 16) would also accept or a Unicode digit
    candidates = ["2001:db8:0:0:0:0:0:1", "0:0:0:0:0:ffff:c000:0201", "fe80:0:0:0:0:0:0:1", "1:2:3:4:5:6:7",
                  "1:2:3:4:5:6:7:8:9", "12345:0:0:0:0:0:0:1", "1_0:0:0:0:0:0:0:1", " 1:0:0:0:0:0:0:1"]
    for _ in range(20000):
        groups = ["".join(rng.choice(hexdigits if rng.random() < 0.98 else odd) for _ in range(rng.randint(1, 5)))
                  for _ in range(rng.choice([7, 8, 8, 8, 9]))]
        candidates.append(":".join(groups))
    valid = 0
    for candidate in candidates:
        try:
            expected = ipaddress.ip_address(candidate)
        except ValueError:
            expected = None
        try:
            got = _full_ipv6(candidate)
        except ValueError:
            got = None
        assert got == expected, candidate
        valid += expected is not None
    assert valid > 1000


def test_ip_prefilters_find_what_the_plain_regexes_find():
    """find_ip's window test (two searches instead of one alternation) and its IPv4 scan
    (the regex tried only where its prefix matches) agree with the plain forms."""
    from redaction.patterns import _IPV4_START, _PUBLIC_V4_HINT, _V6_HINT, IPV4_RE, finditer_from

    one_alternation = re.compile(r"(?<![\d.])(?!127\.|0\.|10\.|192\.168\.|169\.254\.|172\.(?:1[6-9]|2\d|3[01])\.)"
                                 r"\d{1,3}\.\d|[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:")
    rng = random.Random(8)
    pieces = ["1", "10", "127", "172", "192", "168", "25", "255", "300", "0", ".", ".", ":", "::", "a", "ff", "/", " ",
              "x", "\u0661", "Chrome/", "-"]

    def piece() -> str:
        if rng.random() < 0.1:  # a dotted quad, now and then one of the private ranges
            return ".".join(rng.choice(["1", "10", "127", "172", "16", "192", "168", "0", "8", "255", "300", "01"])
                            for _ in range(rng.choice([3, 4, 4, 5])))
        return rng.choice(pieces)

    texts = ["".join(piece() for _ in range(rng.randint(1, 30))) for _ in range(20000)]
    texts += ["host 8.8.8.8", "10.0.0.1 and 192.168.1.1", "fe80::1%eth0", "1.2.3.4.5", "v1.2.3.4/24"]
    hinted = 0
    for text in texts:
        expected = one_alternation.search(text) is not None
        assert (_V6_HINT.search(text) is not None or _PUBLIC_V4_HINT.search(text) is not None) == expected, text
        hinted += expected
        lo = rng.randint(0, len(text))
        hi = rng.randint(lo, len(text))
        assert [m.span() for m in finditer_from(IPV4_RE, _IPV4_START, text, lo, hi)] == \
               [m.span() for m in IPV4_RE.finditer(text, lo, hi)], (text, lo, hi)
    assert 1000 < hinted < len(texts) - 1000
    assert sum(bool(IPV4_RE.search(t)) for t in texts) > 500  # the texts hold addresses to find


def test_gate_hits_out_of_end_order_are_sorted_first(redactor):
    """The engine builds its windows as hyperscan reports hits, in end order; hits that come
    out of order (the re fallback of platforms without hyperscan) are collected and sorted
    instead, with the same result."""
    texts = ["Call +1 415 555 2671 or mail ana@example.com, card 4111 1111 1111 1111, host 8.8.8.8",
             "Dear Ana Lopez, IBAN DE89 3704 0044 0532 0130 00; SSN 536-22-1234; build 20260517.3",
             "| Name | Phone |\n|---|---|\n| Priya Raghunathan | 020 7946 0958 |"]
    expected = [redactor.redact(text) for text in texts]
    gate = redactor.gate
    real_feed, real_native = gate.feed, redactor._native
    reversed_calls = []

    def feed_reversed(data, on_match):
        gate.feed = real_feed  # (the Python gate's scan feeds itself)
        try:
            hits, overflow = gate.scan(data)
        finally:
            gate.feed = feed_reversed
        reversed_calls.append(len(hits))
        for pattern_id, start, end in reversed(hits):
            if on_match(pattern_id, start, end, 0, None):
                return True
        return overflow

    class ReversedSink:
        def __init__(self, sink, stopped):
            self.sink, self.stopped = sink, stopped

        def __getattr__(self, name):
            return getattr(self.sink, name)

    class ScanReversed:
        """The C half's own scan (built against libhs), handing the hits over in reverse."""

        def sink(self, text, data):
            return real_native.sink(text, data)

        def scan(self, text, data):
            sink = real_native.sink(text, data)
            return ReversedSink(sink, feed_reversed(data, sink))

    gate.feed = feed_reversed
    if gate.native_databases:
        redactor._native = ScanReversed()
    redactor._cache.clear()
    try:
        got = [redactor.redact(text) for text in texts]
    finally:
        gate.feed, redactor._native = real_feed, real_native
        redactor._cache.clear()
    assert len(reversed_calls) >= len(texts) and all(n > 3 for n in reversed_calls)
    assert got == expected
    assert all(result.entities for result in got)


def test_luhn_and_phone_digits_agree_with_their_plain_forms():
    """luhn sums slices when the digits are ASCII, and phone_score removes PHONE_RE's
    punctuation with str.translate: both agree with the per-character loop and with \\D."""
    from redaction.patterns import _PHONE_PUNCTUATION, PHONE_RE, luhn

    def luhn_loop(digits: str) -> bool:
        total = 0
        for i, ch in enumerate(reversed(digits)):
            d = ord(ch) - 48
            if i % 2:
                d = d * 2 - 9 if d * 2 > 9 else d * 2
            total += d
        return total % 10 == 0

    rng = random.Random(12)
    numbers = ["4111111111111111", "4111111111111112", "79927398713", "0", "\u0664\u0661\u0661\u0661"]
    numbers += ["".join(rng.choice("0123456789" if rng.random() < 0.99 else "\u0661\u0662")
                        for _ in range(rng.randint(1, 22))) for _ in range(30000)]
    assert [n for n in numbers if luhn(n) != luhn_loop(n)] == []
    assert sum(map(luhn, numbers)) > 2000

    not_digit = re.compile(r"\D")
    candidates = 0
    for _ in range(20000):
        text = "".join(rng.choice("0123456789()+ \u00a0.-/x#ext\u0661") for _ in range(rng.randint(1, 40)))
        for m in PHONE_RE.finditer(text):
            candidate = text[m.start():m.start("ext") if m.group("ext") else m.end()]
            assert candidate.translate(_PHONE_PUNCTUATION) == not_digit.sub("", candidate), candidate
            candidates += 1
    assert candidates > 10000


def _base58check(payload: bytes) -> str:
    alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
    raw = payload + hashlib.sha256(hashlib.sha256(payload).digest()).digest()[:4]
    number, out = int.from_bytes(raw, "big"), ""
    while number:
        number, digit = divmod(number, 58)
        out = alphabet[digit] + out
    return "1" * (len(raw) - len(raw.lstrip(b"\0"))) + out


def _bech32(hrp: str, data: list[int], const: int) -> str:
    """BIP-173/350 encoding (the reference's create_checksum)."""
    charset = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"

    def polymod(values):
        chk = 1
        for value in values:
            top = chk >> 25
            chk = (chk & 0x1FFFFFF) << 5 ^ value
            for i, gen in enumerate((0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)):
                chk ^= gen if (top >> i) & 1 else 0
        return chk

    expanded = [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]
    mod = polymod(expanded + data + [0] * 6) ^ const
    return hrp + "1" + "".join(charset[d] for d in data + [(mod >> 5 * (5 - i)) & 31 for i in range(6)])


def test_bitcoin_address_check_agrees_with_presidio():
    """Fast mode validates wallets without importing presidio_analyzer (it imports spaCy):
    the check must say what Presidio's CryptoRecognizer says, on valid addresses and on
    every one-character corruption of them."""
    from presidio_analyzer.predefined_recognizers import CryptoRecognizer

    from redaction.patterns import valid_bitcoin_address

    rng = random.Random(5)
    valid = [_base58check(bytes([version]) + rng.randbytes(20)) for version in (0, 5) for _ in range(40)]
    valid += [_base58check(b"\0\0" + rng.randbytes(19)) for _ in range(5)]  # leading zero bytes: '1's
    valid += [_bech32("bc", [0] + [rng.randrange(32) for _ in range(32)], 1) for _ in range(20)]
    valid += [_bech32("bc", [1] + [rng.randrange(32) for _ in range(52)], 0x2BC830A3) for _ in range(20)]
    candidates = list(valid) + [v.upper() for v in valid if v.startswith("bc1")]
    for address in valid:
        for _ in range(6):
            i = rng.randrange(len(address))
            candidates.append(address[:i] + rng.choice("13abcqpzXY0O!") + address[i + 1:])
    presidio = CryptoRecognizer()
    verdicts = [(address, valid_bitcoin_address(address)) for address in candidates]
    assert verdicts == [(address, presidio.validate_result(address)) for address in candidates]
    assert all(ok for address, ok in verdicts if address in valid)
    assert sum(not ok for _address, ok in verdicts) > len(candidates) // 3  # corruptions are refused


def test_fast_mode_never_imports_presidio_or_spacy():
    """~90 MB and ~1.5 s per flow process that fast mode does not use."""
    code = ("import sys; from redaction import Redactor, RedactionSettings; "
            "Redactor(RedactionSettings()).redact('wallet 1BoatSLRHtKNngkdXEeobR76b53LETtpyT, Ann Lee +1 415 555 0101'); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'presidio_analyzer', 'spacy', 'mimesis'}))")
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_the_result_cache_keeps_the_newest_texts_up_to_its_size():
    redactor = Redactor(RedactionSettings(cache_size=3))
    texts = [f"write to user{i}@example.com" for i in range(5)]
    results = [redactor.redact(text) for text in texts]
    assert list(redactor._cache) == texts[2:]
    assert redactor.redact(texts[4]) is results[4]  # served from the cache
    assert redactor.redact(texts[0]).text == results[0].text == "write to <EMAIL_ADDRESS>"
    assert list(redactor._cache) == [*texts[3:], texts[0]]


def test_redact_events_drops_every_text_of_an_event_with_a_field_that_is_not_text(redactor):
    """An event with one text and one non-text field fails alone: its text is not redacted in
    the batch, so the texts of the events after it keep their own results."""
    events = [{"prompt": "mail a@example.com", "response": 7}, {"prompt": "x", "feedback": {"comment": b"y"}},
              {"prompt": "call +1 415 555 2671", "response": "mail b@example.com"}]
    out = redactor.redact_events(events)
    assert [out[0].reason, out[1].reason] == ["response is not text", "feedback.comment is not text"]
    assert (out[2]["prompt"], out[2]["response"]) == ("call <PHONE_NUMBER>", "mail <EMAIL_ADDRESS>")
    assert list(redactor.redact_event({"prompt": "hi"})) == ["prompt", "policy_flags", "classification",
                                                              "pii_entity_counts"]
