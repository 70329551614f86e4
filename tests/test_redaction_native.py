"""The C half of the fast tier (redaction/_native.c) against the Python it replaces: the same
spans, scores, tiers and redacted texts on generated corpora and on fuzzed strings, piece by
piece (gate-hit sink, phone candidate scan and shape test, card scan) and whole. Seeded, a few
seconds in all. The other redaction tests run both paths through their `redactor` fixture."""

from __future__ import annotations

import random

import pytest

from redaction import RedactionSettings, Redactor, native, patterns
from redaction.engine import _end

pytestmark = pytest.mark.skipif(
    native.extension is None,
    reason="redaction/_native.c is not built here (no C compiler at install): only the Python path runs")

# Characters the scans care about, with their look-alikes: Unicode digits (Arabic-Indic, a
# superscript that is a digit but not decimal), no-break space, accented and CJK letters, an
# emoji (4 UTF-8 bytes) and a lone surrogate (encoded by surrogatepass: invalid UTF-8).
_PIECES = (list("0123456789" * 3 + "()+ .-/#x:T_\n\t,|") + ["\u00a0", "ext", "ext.", "extension", "(0)", "\u0663",
           "\u00b2", "é", "Ä", "名", "😀", "\ud800", "+1 ", "00", "Ana ", "Dear ", "Mr ", "my name is ", "call ",
           "ISBN ", "order ", "card ", "4111 1111 1111 1111", "378282246310005", "DE89 3704 0044 0532 0130 00",
           "8.8.8.8", "2001:db8::1", "ana@example.com", "password=", "536-22-1234", "030 1234567"])


def _fuzzed(rng: random.Random, count: int, longest: int = 30) -> list[str]:
    texts = ["", " ", "0", "\ud800", "😀" * 3, "1" * 400, ("4111 1111 1111 1111 " * 60)[:1200]]
    texts += ["".join(rng.choice(_PIECES) for _ in range(rng.randint(1, longest))) for _ in range(count)]
    return texts


@pytest.fixture(scope="module")
def both() -> tuple[Redactor, Redactor]:
    settings = RedactionSettings(cache_size=0, time_budget_ms=10_000)
    return Redactor(settings, native=True), Redactor(settings, native=False)


@pytest.fixture(scope="module")
def corpus_texts() -> list[str]:
    from ops.bench.redaction_corpus import generate_corpus

    texts = [s.text for s in generate_corpus(1200, seed=13, pii_ratio=0.5, kind="realworld")]
    return texts + [s.text for s in generate_corpus(400, seed=13, pii_ratio=0.5, kind="synthetic")]


def _spans(redactor: Redactor, text: str):
    result = redactor.redact(text)
    return result.text, [(e.type, e.start, e.end, e.score, e.tier) for e in result.entities]


def test_native_and_python_redact_the_corpora_alike(both, corpus_texts):
    fast, reference = both
    assert fast._native is not None and reference._native is None
    different = [i for i, text in enumerate(corpus_texts) if _spans(fast, text) != _spans(reference, text)]
    assert different == []
    assert sum(bool(fast.redact(t).entities) for t in corpus_texts) > len(corpus_texts) // 3  # it did find PII


def test_native_and_python_redact_fuzzed_strings_alike(both):
    fast, reference = both
    texts = _fuzzed(random.Random(5), 1500, longest=40)
    different = [text for text in texts if _spans(fast, text) != _spans(reference, text)]
    assert different == []


def _python_sink(redactor: Redactor, text: str, data: bytes):
    on_match, (windows, given, cues, weak, to_char), status = redactor._hit_sink(text, data)
    redactor.gate.feed(data, on_match)
    return windows, given, cues, weak, status, to_char


@pytest.mark.parametrize("ordered", [True, False], ids=["end-order", "reversed"])
def test_the_c_sink_builds_the_windows_and_name_positions_of_the_python_one(both, corpus_texts, ordered):
    """Hit by hit as hyperscan reports them (end order), and reversed (what the re fallback
    may do), on corpus and fuzzed texts: windows, name positions and status agree; so do the
    byte-to-character offsets, also inside multi-byte characters and around surrogates."""
    fast, _ = both
    texts = corpus_texts[:400] + _fuzzed(random.Random(9), 600)
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        hits, overflow = fast.gate.scan(data)
        assert not overflow
        if not ordered:
            hits.reverse()
        on_match, (windows, given, cues, weak, to_char), status = fast._hit_sink(text, data)
        sink = fast._native.sink(text, data)
        for pattern_id, start, end in hits:
            if on_match(pattern_id, start, end, 0, None):
                break
        for pattern_id, start, end in hits:
            if sink(pattern_id, start, end, 0, None):
                break
        assert (sink.windows(), sink.given_words, sink.cue_ends, sink.weak_starts) == (windows, given, cues, weak), text
        assert sink.status() == status
        assert [sink.to_char(i) for i in range(-2, len(data) + 3)] == [to_char(i) for i in range(-2, len(data) + 3)]


def test_the_c_sink_stops_at_the_hit_limit_like_the_python_one(both):
    fast, _ = both
    text = "1234567 " * 3000  # one phone/ssn gate hit per number: over max_hits
    data = text.encode()
    sink = fast._native.sink(text, data)
    on_match, _tiers, status = fast._hit_sink(text, data)
    assert fast.gate.feed(data, sink) is True and fast.gate.feed(data, on_match) is True
    assert sink.status() == status == [True, False, True]
    assert fast.redact(text).entities == both[1].redact(text).entities


def test_phone_candidate_scan_and_shape_test_agree_with_the_regexes():
    rng = random.Random(3)
    texts = _fuzzed(rng, 3000, longest=20)
    found = 0
    for text in texts:
        for lo, hi in ((0, len(text)), (rng.randint(0, len(text)), len(text) + 3), (1, max(1, len(text) - 2))):
            for shortest, screen in ((1, False), (7, True)):
                expected = list(patterns.phone_candidates(text, lo, hi, shortest, screen))
                assert native.extension.phone_candidates(text, lo, hi, shortest, screen) == expected, (text, lo, hi)
                found += len(expected)
    assert found > 1000
    shapes = ["2024-01-02", "02/01/2024 ", "12:30", "12:30:45\n", "1.2.3", "1.22.333\n", "123-45-6789", "1.1.1.1",
              "255.255.255.255", "01.1.1.1", "(0)30 1234567", "+49 (0)30 123", "123456789012345", "1234567890123456"]
    candidates = shapes + [text[:rng.randint(0, 22)] for text in texts]
    rejected = [patterns.phone_shape_rejected(c) for c in candidates]
    assert [native.extension.phone_shape_rejected(c) for c in candidates] == rejected
    assert 0 < sum(rejected) < len(rejected)


# Phone and identifier words, units, and what re's case-insensitive Unicode matching takes for their
# letters (U+0130/U+0131 for i, U+017F for s, U+212A for k, É for é), with \w, \W and \s
# characters around them.
_CONTEXT_PIECES = ["phone", "tel", "telephone", "calls", "mobile", "whatsapp", "signal", "number", "contact", "fax",
                   "sms", "text me", "ring", "dial-in", "mob", "ph", "on-call", "telefon", "téléphone", "TÉLÉPHONE",
                   "teléfono", "handy", "cellulare", "celular", "M:", "T :", "f\t:", "send_sms(", "phone_number",
                   "\u0130", "\u0131", "\u017f", "É", "\u212a", "\ud800", "ü", "\u0660", "_", "-", ":", " ", "\t",
                   "\n", "a", "e", "I", "S", "x", "1"]
_IDENTIFIER_PIECES = ["isbn", "ISBN-10", "isbn-13", "isbn-1", "ean", "gtin", "upc", "sku", "\u212au", "po", "order",
                      "invoice", "tracking", "parcel", "shipment", "ref", "reference", "build", "version", "ver", "v",
                      "release", "sha", "id", "\u0130d", "\u0131D", "epoch", "ts", "timestamp", "\u017fha", "driver",
                      "account", "acct", "no", "nr", "number", "num", ".", " ", "\t", "\n", ":", "#", "=", "\"", "'",
                      "-", "\u00a0", "\u2003", "\x1c", "_", "a", "1", "é", "\ud800", "\u0660"]
_UNIT_PIECES = ["ms", "s", "sec", "secs", "seconds", "min", "bytes", "kb", "KiB", "mb", "mib", "gb", "GiB", "tb", "tib",
                "%", "tokens", "rows", "items", "km", "kg", "eur", "usd", "€", "$", "\u212ab", "\u017f", "\u0131tems",
                "\u0130", " ", "\u00a0", "  ", "_", "1", "a", ".", "\n", "é", "\ud800", "\u0660", "b", "i"]


@pytest.mark.parametrize("name, pieces", [("phone_word_before", _CONTEXT_PIECES),
                                          ("identifier_word_before", _IDENTIFIER_PIECES),
                                          ("unit_after", _UNIT_PIECES)])
def test_context_word_tests_agree_with_their_regexes(name, pieces):
    rng = random.Random(5)
    python_test, native_test = getattr(patterns, name), getattr(native.extension, name)
    matched = 0
    for _ in range(20000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        text = "".join(ch.upper() if rng.random() < 0.3 else ch for ch in text)
        start = rng.randint(0, len(text) + 2)
        expected = python_test(text, start)
        assert native_test(text, start) is expected, (text, start)
        matched += expected
    assert 1000 < matched < 18000

def test_column_header_agrees_with_the_python_walk():
    rng = random.Random(6)
    pieces = ["|", "|", ",", ",", "\n", "\n", "name", "phone", " ", "---", "1", "é", "\ud800", "😀", "||", ",,", "\n\n"]
    headers = 0
    for _ in range(20000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        start = rng.randint(0, len(text))
        expected = patterns.column_header(text, start)
        assert native.extension.column_header(text, start) == expected, (text, start)
        headers += expected is not None
    assert headers > 200
    # a one-character line under its copy: a header (the walk moved), not "this line"
    assert patterns.column_header(",\n,", 3) == native.extension.column_header(",\n,", 3) == ""
    table = "name,phone\nAna,030 1234567\nBo,040 7654321"
    assert native.extension.column_header(table, table.rindex("040")) == "phone"


def test_card_scan_agrees_with_the_regex_and_checks():
    rng = random.Random(4)
    cards = ["4111111111111111", "5555555555554444", "378282246310005", "6011111111111117", "3530111333300000",
             "2200123456789010", "6200000000000005", "30569309025904", "4111111111111", "\u0664111111111111111"]
    texts = []
    for _ in range(3000):
        parts = []
        for _ in range(rng.randint(1, 5)):
            pick = rng.random()
            if pick < 0.35:
                card, sep = rng.choice(cards), rng.choice([" ", "-", ""])
                parts.append(sep.join(card[i:i + 4] for i in range(0, len(card), 4)) if rng.random() < 0.6 else card)
            elif pick < 0.65:
                parts.append("".join(rng.choice("0123456789 -") for _ in range(rng.randint(1, 30))))
            else:
                parts.append(rng.choice(["ID ", "a", "x.", "/", "_", "\u0663\u0664", "\n", "-", "é", " ", "4" * 23]))
        texts.append("".join(parts))
    found = 0
    for text in texts:
        for lo, hi in ((0, len(text)), (rng.randint(0, len(text)), len(text) + 2)):
            expected = list(patterns.card_runs(text, lo, hi))
            assert native.extension.card_runs(text, lo, hi) == expected, (text, lo, hi)
            found += len(expected)
    assert found > 500


def test_native_true_needs_the_extension_and_none_falls_back(monkeypatch):
    monkeypatch.setattr(native, "extension", None)
    with pytest.raises(RuntimeError, match="not built"):
        Redactor(RedactionSettings(entities=["EMAIL_ADDRESS"]), native=True)
    fallback = Redactor(RedactionSettings(entities=["EMAIL_ADDRESS", "PHONE_NUMBER"]))
    assert fallback._native is None
    assert fallback.redact("mail ana@example.com, call +1 415 555 2671").text == \
        "mail <EMAIL_ADDRESS>, call <PHONE_NUMBER>"


def test_hits_sorted_by_end_give_the_windows_of_hits_in_end_order(both):
    """The sorted-hits path of _detect_native replays the hits into a new sink."""
    fast, reference = both
    text = "Call +1 415 555 2671, card 4111 1111 1111 1111; Dear Ana Lopez"
    data = text.encode()
    hits, _ = fast.gate.scan(data)
    sink = fast._native.sink(text, data)
    for pattern_id, start, end in sorted(hits, key=_end):
        assert not sink(pattern_id, start, end, 0, None)
    assert sink.windows() == _python_sink(reference, text, data)[0]


needs_libhs = pytest.mark.skipif(
    native.extension is None or native.extension.HYPERSCAN_VERSION is None,
    reason="redaction/_native.c was built without libhs (no hs/hs.h at install): the hyperscan package scans the gate")


@needs_libhs
def test_libhs_reports_the_gate_hits_of_the_hyperscan_package(both, corpus_texts):
    """The same patterns and flags compiled by libhs in the C half and by the hyperscan
    package (another hyperscan version) give the same hits in the same order, and stop
    at the same hit limit."""
    fast, reference = both
    assert fast.gate.native_databases and not reference.gate.native_databases
    texts = corpus_texts + _fuzzed(random.Random(11), 3000, longest=60) + ["1234567 " * 3000]
    hits = 0
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        expected = reference.gate.scan(data)
        assert fast.gate.scan(data) == expected, text
        hits += len(expected[0])
    assert hits > 20_000 and fast.gate.scan(texts[-1].encode())[1] is True


@needs_libhs
def test_the_c_scan_fills_the_sink_the_python_scan_does(both, corpus_texts):
    """Tables.scan (hyperscan calling the C sink) against the Python sink fed by the hyperscan
    package: windows, name positions, status, and whether the scan stopped."""
    fast, reference = both
    for text in corpus_texts[:600] + _fuzzed(random.Random(12), 1500) + ["1234567 " * 3000]:
        data = text.encode("utf-8", "surrogatepass")
        sink = fast._native.scan(text, data)
        on_match, (windows, given, cues, weak, _to_char), status = reference._hit_sink(text, data)
        stopped = reference.gate.feed(data, on_match)
        assert (sink.windows(), sink.given_words, sink.cue_ends, sink.weak_starts) == (windows, given, cues, weak), text
        assert (sink.status(), bool(sink.stopped)) == (status, stopped)


@needs_libhs
def test_a_libhs_database_survives_serialization_and_bad_input_is_refused(both):
    fast, _ = both
    text = "Dear Ana Lopez, call +1 415 555 2671 or mail ana@example.com"
    data = text.encode()
    loaded = tuple(native.extension.load_database(db.serialize()) for db in fast.gate.native_databases)
    reloaded = native.extension.Tables((), (), fast.gate.max_hits, loaded)
    assert reloaded.gate_hits(data) == fast.gate.scan(data) and len(fast.gate.scan(data)[0]) >= 4
    with pytest.raises(ValueError, match="not a hyperscan database"):
        native.extension.load_database(b"not a database")
    with pytest.raises(ValueError, match="could not compile expression 1"):
        native.extension.compile_database([b"a", b"(b"], [0, 0], [0, 1], False)
    with pytest.raises(RuntimeError, match="no hyperscan databases"):
        native.extension.Tables((), (), 10).scan(text, data)


@needs_libhs
def test_the_package_scanning_for_the_c_sink_redacts_like_the_c_scan(both, corpus_texts, monkeypatch):
    """An extension built without libhs: the hyperscan package scans, the C sink takes the hits."""
    fast, reference = both
    monkeypatch.setattr(native, "gate_scanner", lambda extension: None)
    middle = Redactor(RedactionSettings(cache_size=0, time_budget_ms=10_000), native=True)
    assert middle._native is not None and not middle.gate.native_databases
    texts = corpus_texts[:500] + _fuzzed(random.Random(13), 500)
    assert [_spans(middle, t) for t in texts] == [_spans(fast, t) for t in texts] == [_spans(reference, t) for t in texts]


@needs_libhs
def test_c_scans_from_several_threads_share_the_scratch_safely(both, corpus_texts):
    import concurrent.futures

    fast, _ = both
    texts = corpus_texts[:300]
    expected = [_spans(fast, t) for t in texts]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: [_spans(fast, t) for t in texts], range(4)))
    assert results == [expected] * 4


def test_ipv4_scan_agrees_with_the_regex_and_checks():
    """Product tokens (also before a line break), prefix lengths, leading zeros, octets over
    255, non-ASCII digits, private ranges on and off."""
    rng = random.Random(6)
    pieces = list("0123456789" * 3 + "..../ :-_a\n") + ["Chrome/", "x/", "1.2.3.4", "10.0.0.1", "192.168.1.1",
                                                        "8.8.8.8", "256.1.1.1", "01.2.3.4", "\u0663", "é", "/24",
                                                        "172.16.0.1", "a-b/"]
    found = 0
    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 14)))
        for lo, hi in ((0, len(text)), (rng.randint(0, len(text)), len(text) + 2)):
            for ranges in (None, patterns._NOT_PERSONAL_V4_RANGES):
                expected = list(patterns.ipv4_candidates(text, lo, hi, ranges))
                assert native.extension.ipv4_candidates(text, lo, hi, ranges) == expected, (text, lo, hi)
                found += len(expected)
    assert found > 200


def test_ipv6_verdict_agrees_with_ipaddress():
    """The C parse and ranges against ipaddress (patterns.ipv6_verdict): "::" placement, too
    many or too few groups, IPv4 tails with leading zeros or octets over 255, prefix lengths
    (leading zeros, over 128, empty, two slashes), each not-personal range and its neighbours,
    non-ASCII values left to Python (-1)."""
    rng = random.Random(13)
    pieces = (list("0123456789abcdefABCDEFg:::::..//") + ["::", "ffff:", "::ffff:", "0:", "1", "fe80:", "fc00:", "fd",
              "fb", "ff02:", "fe", "10.0.0.1", "127.0.0.1", "172.16.0.1", "172.32.0.1", "169.254.1.1", "192.168.0.1",
              "192.169.0.1", "224.0.0.1", "223.255.255.255", "8.8.8.8", "01.2.3.4", "256.1.1.1", "/128", "/129",
              "/0", "/064", "\u0663", "é", "2001:db8:"])
    examples = ["::", "::1", "::2", "1::", ":::", "::ffff:0.0.0.0", "::ffff:255.255.255.255", "0:0:0:0:0:ffff:a00:1",
                "1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7::", "::2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8:9", "1:2:3:4:5:6:1.2.3.4",
                "1:2:3:4:5:6:7:1.2.3.4", "::1.2.3.4", "fcff::", "fe00::", "ff00::", "::1/", "::1//8", "1::/1a"]
    verdicts = set()
    for _ in range(30000):
        examples.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))))
    for value in (v for v in examples if v.count(":") >= 2):  # find_ip asks of no other value
        expected = patterns.ipv6_verdict(value)
        got = native.extension.ipv6_verdict(value)
        assert got == expected or got == -1 and not value.isascii(), value
        verdicts.add(got)
    assert verdicts == {-1, patterns.IPV6_INVALID, patterns.IPV6_PERSONAL, patterns.IPV6_NOT_PERSONAL}


def test_ssn_scan_agrees_with_the_regex_and_rules():
    """Separated and unseparated forms, mixed separators, the invalid areas, groups and
    serials, published samples, one digit repeated, Unicode digits."""
    rng = random.Random(8)
    pieces = list("0123456789" * 3 + " .-x\n") + ["536-22-1234", "536 22 1234", "536221234", "000-12-3456",
                                                  "666-12-3456", "900-12-3456", "536-00-1234", "536-22-0000",
                                                  "123-45-6789", "078-05-1120", "111-11-1111", "536-22.1234",
                                                  "\u0665\u0663\u0666-22-1234", "é"]
    found = 0
    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 10)))
        for lo, hi in ((0, len(text)), (rng.randint(0, len(text)), len(text) + 2), (0, max(0, len(text) - 1))):
            expected = list(patterns.ssn_candidates(text, lo, hi))
            assert native.extension.ssn_candidates(text, lo, hi) == expected, (text, lo, hi)
            found += len(expected)
    assert found > 100


def test_iban_checksum_cuts_agree_with_mod97():
    """Valid IBANs (upper and lower case, grouped, running on into words or a second IBAN),
    random alphanumeric runs (about one cut in 97 passes by chance) and Unicode digits."""
    rng = random.Random(10)
    ibans = ["DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432", "fr14 2004 1010 0505 0001 3m02 606",
             "NL91-ABNA-0417-1643-00", "DE\u0668\u0669370400440532013000"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789" + "0123456789" * 3 + " -"
    found = 0
    for _ in range(4000):
        tail = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24))).replace("  ", " ").replace("--", "-")
        raw = (rng.choice(ibans) + rng.choice(["", " ", "-"]) + tail).strip(" -")
        expected = list(patterns.iban_checksum_cuts(raw))
        assert native.extension.iban_checksum_cuts(raw) == expected, raw
        found += len(expected)
    assert found > 1000


def test_kv_secret_scan_agrees_with_the_regex():
    """KV_RE's matches: every key and its re backtracking order ("pass" before "passphrase",
    optional separators and prefixes), quotes, "=>" after a failed "=", \\bis\\b, the
    200-character value caps, re's case-insensitive Unicode equivalents (İ ı ſ K), windows."""
    rng = random.Random(8)
    keys = ["password", "passwd", "passwort", "pwd", "pass", "passphrase", "secret", "client_secret", "clientsecret",
            "secret-key", "api-key", "apikey", "api_token", "access_token", "accessKey", "auth_token", "refresh-token",
            "private_key", "aws_secret_access_key", "token", "key", "auth", "credentials", "phpsessid", "PHPSESSION_ID",
            "jsession", "session-token", "session_", "sessid", "csrf_token", "XSRF-TOKEN", "\u017fecret", "\u212aey",
            "passwordX", "my_password", "apass", "1token", "\u0130"]
    separators = ["=", ":", " = ", "\t:\t", "=>", " => ", " is ", "is", " IS ", " \u0130s ", " \u0131s ", "\"=", "'  :",
                  "==", ": >", "=\n", " isx "]
    values = ["hunter22", "\"abc def\"", "'abcd'", "\"ab\"", "ab", "abcd.", "abc(", "x" * 230, "\"" + "y" * 205 + "\"",
              "\"abc\ndef\"", "getpass()", "\u00a0abcd", "名名名名", "a\u2003bcde", "'abcde", "ab,cd", "<YOUR_KEY>", "\ud800abcd"]
    texts = ["", "password=hunter22", "key => 'abcd'"]
    for _ in range(6000):
        text = rng.choice(["", "x", " ", "1", "_", "\"", "é"]) + rng.choice(keys) + rng.choice(["", "\"", "'"])
        text += rng.choice(separators) + rng.choice(values)
        texts.append(text + (rng.choice(separators) + rng.choice(values) if rng.random() < 0.3 else ""))
    found = 0
    for text in texts:
        for lo, hi in ((0, len(text)), (rng.randint(-2, len(text)), len(text) + 2), (0, rng.randint(0, len(text)))):
            expected = list(patterns.kv_candidates(text, lo, hi))
            assert native.extension.kv_candidates(text, lo, hi) == expected, (text, lo, hi)
            found += len(expected)
    assert found > 2000


def test_email_scan_agrees_with_the_regex():
    """EMAIL_RE's matches: local parts of 64 and 65 characters, labels of 64 and 65, top-level
    domains of 2 and 25 letters, labels given back until the domain fits, Unicode letters,
    digits that are not decimal (², Ⅷ), surrogates, windows cutting addresses."""
    rng = random.Random(10)
    pieces = ["ana", "@", ".", "-", "_", "+", "%", "'", "example", "com", "co", "uk", "x", "1", "2a", "é", "名", "\u0663",
              "\u00b2", "\u2167", "\u01c5", " ", "\n", ",", "<", "a" * 63, "b" * 64, "c" * 65, "d" * 24, "e" * 25, "\ud800",
              "😀", "@@", "..", "mail.", "x.y.z.", "-a", "a-", "_a", "ana.lopez@example.com", "A@b.cd"]
    texts = ["", "@", "a@b.cd", "a@b.c", "x" * 70 + "@a.bc", "a." * 150 + "@" + "b." * 150 + "cd"]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))) for _ in range(8000)]
    found = 0
    for text in texts:
        for lo, hi in ((0, len(text)), (rng.randint(-2, len(text)), len(text) + 2), (0, rng.randint(0, len(text)))):
            expected = patterns.email_candidates(text, lo, hi)
            assert native.extension.email_candidates(text, lo, hi) == expected, (text, lo, hi)
            found += len(expected)
    assert found > 3000


def test_phone_score_in_c_agrees_with_shaped_phone_score(corpus_texts):
    """Every rule of the score after the shape test (trunk "(0)", decimals, card numbers,
    international zeros, leading-zero groups, the shape regex, barcodes and epochs, context
    words and table headers), on the candidates of corpus and fuzzed texts; None back means
    the numbering plan decides."""
    rng = random.Random(14)
    extra = ["(0)", "+44 (0)20 7946 0958", "0301234567", "4111111111111111", "4006123456789", "1700000000000",
             "+000000120", "+3.140000", "01 012 0123 01234", "\n| phone | id |\n|---|---|\n| ", "\nname,phone,order\nx,",
             " tokens", "ISBN ", "\u0663" * 8, "(0)(0)", "((0)0))", "x211", "+1 (415) 555-2671", "1234567890"]
    pieces = _PIECES + _CONTEXT_PIECES + extra
    texts = corpus_texts + ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))) for _ in range(5000)]
    regions = ("US", "GB", "DE")
    regexes = (patterns.NOT_PHONE_HEADER.search, patterns.PHONE_CONTEXT.search, patterns._PHONE_SHAPE.match)
    scores = set()
    for text in texts:
        for start, extension_start, _end, candidate_end in patterns.phone_candidates(text, 0, len(text), 7, True):
            candidate, extension = text[start:candidate_end], extension_start >= 0
            expected = patterns.shaped_phone_score(text, start, candidate, regions, extension)
            got = native.extension.phone_score(text, start, candidate_end, extension, *regexes)
            if got is None:
                got = 0.7 if patterns._valid_phone(candidate, regions) else 0.0
            assert got == expected and type(got) is float, (text, start, candidate_end)
            scores.add(expected)
    assert scores == {0.0, 0.7, 0.75, 0.8, 0.9, 0.95}
    assert native.extension.phone_score("1\n2", 0, 3, False, *regexes) is NotImplemented  # not PHONE_RE's characters


def test_names_token_walk_in_c_agrees_with_follow(corpus_texts):
    """NameFinder._follow and its C walk: particles before a capitalised word, possessives
    (' and ’), hyphens and apostrophes inside names, digits, "_" and "@" after a word, letters
    of every case class (titlecase ǅ, dotted İ, ß, ligatures), digits that are not decimal,
    each caller's flags."""
    from redaction import gazetteer
    from redaction.names import NameFinder

    reference = NameFinder(gazetteer.load())
    walk = reference.natively()
    assert walk._follow is not reference._follow and walk.given is reference.given
    rng = random.Random(15)
    pieces = ["Ana", "ana", "Lopez", "López", "van", "der", "de", "la", "Van", "Berg", "O'Neil", "Jean-Luc", "Grace",
              "grace", "Will", "the", "The", "and", "Smith", "Wu", "Fang", "'s", "’s", "s", "'", "’", "-", " ", "  ", "\t",
              "\n", "1", "_", "@", ".", ",", "Ł", "ukasz", "ǅ", "\u0130stanbul", "ı", "ß", "ﬁ", "²", "\u0663", "名", "😀",
              "\ud800", "Paris", "Okafor", "chidi", "okonkwo", "Mücevher", "Şama", "X", "x", "A1", "Ann", "ann", "of"]
    texts = corpus_texts[::4] + ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 14))) for _ in range(4000)]
    flags = ((3, True, True, 1, False), (3, False), (3, True, True, 1, True), (3, False, False, 0), (1, True),
             (2, True, False, 5, True))
    tokens = 0
    for text in texts:
        starts = [i for i in range(len(text)) if i == 0 or text[i - 1] in " \t\n"][:6] + [len(text), len(text) + 2]
        for pos in starts:
            for args in flags:
                expected = reference._follow(text, pos, *args)
                assert walk._follow(text, pos, *args) == expected, (text, pos, args)
                tokens += len(expected)
    assert tokens > 10_000


def test_resolve_in_c_agrees_with_resolve(both):
    """Overlapping, nested, equal and empty spans, equal scores and priorities, types not
    asked for, scores under the minimum: the C walk returns _resolve's spans (the same
    objects) or None where _resolve merges spans or a score is not a float."""
    from redaction.engine import _PRIORITY
    from redaction.types import Entity

    fast, reference = both
    rng = random.Random(16)
    types = ["PERSON", "PHONE_NUMBER", "EMAIL_ADDRESS", "SECRET", "CREDIT_CARD", "US_SSN", "LOCATION", "UNKNOWN"]
    mirrored = 0
    for _ in range(20000):
        found = []
        for _ in range(rng.randint(0, 7)):
            start = rng.randint(0, 30)
            score = rng.choice([0.0, 0.3, 0.6, 0.75, 0.75, 0.9, 0.95, 1.0, float("nan"), 1])
            found.append(Entity(rng.choice(types), start, start + rng.randint(-1, 8), score, rng.choice(["a", "b"])))
        expected = reference._resolve(list(found))
        got = native.extension.resolve_spans(list(found), reference.settings.score_for, reference.entities, _PRIORITY)
        if got is not None:
            mirrored += 1
            assert [id(e) for e in got] == [id(e) for e in expected], found
        else:
            assert any(type(e.score) is not float or e.score != e.score for e in found) or \
                any(e not in found for e in expected), found  # not mirrored: a merge made a new span
    assert mirrored > 5000
    assert fast._resolve(found) == reference._resolve(found)


@needs_libhs
def test_libhs_databases_are_kept_on_disk_and_a_bad_file_is_compiled_again(tmp_path, monkeypatch):
    from redaction import gate as gate_mod
    from redaction.gate import Gate, GatePattern

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(gate_mod, "_COMPILED", {})
    monkeypatch.setattr(gate_mod, "_KEYS", {})
    patterns = [GatePattern("phone", rb"\d{3}-\d{4}"), GatePattern("cue", rb"\bDear\b", caseless=True),
                GatePattern("given", b"Ana", literal=True)]
    data = b"dear Ana, call 555-1234"
    compiled = Gate(patterns, native=native.extension)
    files = sorted((tmp_path / "gatewatch").glob("gate-*.hsdb"))
    assert len(files) == 2  # the regexes and the literals
    expected = Gate(patterns).scan(data)  # the hyperscan package's
    assert compiled.scan(data) == expected and len(expected[0]) == 3
    monkeypatch.setattr(gate_mod, "_COMPILED", {})
    assert Gate(patterns, native=native.extension).scan(data) == expected  # loaded from the files
    for path in files:
        path.write_bytes(b"not a database")
    monkeypatch.setattr(gate_mod, "_COMPILED", {})
    assert Gate(patterns, native=native.extension).scan(data) == expected  # compiled again
    assert all(path.read_bytes() != b"not a database" for path in files)


@needs_libhs
def test_the_short_path_of_a_text_the_gate_does_not_hit_redacts_like_the_full_one(both, corpus_texts):
    """_redact_one ends a text with no gate hit after the scan; the same redactor with that
    short path off (every text through detect, resolve and apply) gives the same results."""
    fast, _ = both
    full = Redactor(RedactionSettings(cache_size=0, time_budget_ms=10_000), native=True)
    full._scan_first = False
    assert fast._scan_first
    texts = corpus_texts + _fuzzed(random.Random(15), 1500) + ["summarise the quarterly report. " * 40, ""]
    assert [_spans(fast, t) for t in texts] == [_spans(full, t) for t in texts]
    assert sum(not fast.gate.scan(t.encode("utf-8", "surrogatepass"))[0] for t in texts) > 100  # short path taken
