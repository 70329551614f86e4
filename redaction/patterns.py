"""Tier 1: pattern entities.

Each detector has loose gate patterns (compiled together into one hyperscan database by
`redaction.gate`) and a precise finder that runs only on windows around the gate's hits:
a Python regex plus the validator that decides (Luhn and card ranges, IBAN mod-97 through
Presidio's IbanRecognizer, phone validity through `phonenumbers`, Presidio's SSN, IP and
crypto validators, an offline public-suffix check for e-mail domains). Our own detectors
cover what Presidio misses: every card range (Mastercard 2-series, 19-digit Visa, Maestro,
UnionPay, Mir) and secrets (provider key prefixes, AWS keys, bearer tokens, JWTs,
private-key blocks, passwords in key=value and URLs).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Callable

from redaction import native as native_mod
from redaction.types import Entity

Finder = Callable[[str, int, int], list[Entity]]


@dataclass(frozen=True)
class RunGate:
    """A gate for patterns that match at every end along a run ("\\d{7,13}" ends after each
    digit of a long number: one hit per digit). `first` matches only where the run's first
    end is, and `extend` (a bytes regex matched from there) reaches its last end: the two
    give the same window as all the ends in between, for one hit instead of many."""
    first: bytes
    extend: bytes
    replaces: bytes  # the plain gate pattern whose windows these give (tests/test_redaction.py checks it)


@dataclass(frozen=True)
class Detector:
    name: str  # checker key; several gate patterns may share one detector
    entity: str
    gates: tuple[bytes | RunGate, ...]
    pad_before: int  # window start = END of the gate hit - pad_before (the gate reports ends only)
    pad_after: int
    finder: Finder
    caseless: bool = False


@functools.lru_cache(maxsize=1)
def _tld():
    import tldextract

    # The bundled public-suffix snapshot only: never fetch the list over the network.
    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


def _context(text: str, start: int, words: re.Pattern, reach: int = 48) -> bool:
    return words.search(text, max(0, start - reach), start) is not None


def finditer_from(regex: re.Pattern, starts: re.Pattern, text: str, lo: int, hi: int):
    """The matches of regex.finditer(text, lo, hi), with `regex` tried only where `starts`
    matches. `starts` must match at the start of every match of `regex` (a prefix of it
    without the lookbehind): re tries a pattern that opens with a lookbehind at every
    position of the window, which costs more than a search for the prefix and one anchored
    match per place it is found."""
    search, match = starts.search, regex.match
    pos = lo
    while (found := search(text, pos, hi)) is not None:
        at = found.start()
        m = match(text, at, hi)
        if m is None:
            pos = at + 1
            continue
        yield m
        pos = m.end() if m.end() > at else at + 1


# -- e-mail ---------------------------------------------------------------------------------

EMAIL_RE = re.compile(r"(?<![\w.+\-%'])[\w.+\-%']{1,64}@(?:[^\W_](?:[\w\-]{0,62}[^\W_])?\.)+[^\W\d_]{2,24}(?![\w\-])")


@functools.lru_cache(maxsize=4096)
def _known_suffix(domain: str) -> bool:
    return _tld()(domain).suffix != ""


_USERINFO = re.compile(r"://[^\s/@]*:$")


def email_candidates(text: str, lo: int, hi: int):
    """(start, end) of each match of EMAIL_RE.finditer(text, lo, hi). (redaction/_native.c has
    the same scan in C.)"""
    return [m.span() for m in EMAIL_RE.finditer(text, lo, hi)]


def make_email_finder(native: bool = False) -> Finder:
    candidates = native_mod.extension.email_candidates if native else email_candidates

    def find_email(text: str, lo: int, hi: int) -> list[Entity]:
        out = []
        for start, end in candidates(text, lo, hi):
            if start > 3 and _USERINFO.search(text, max(0, start - 80), start):
                continue  # scheme://user:password@host: the password is a secret, not a mailbox
            local, _, domain = text[start:end].rpartition("@")
            if local.startswith(".") or ".." in local:
                continue
            if _known_suffix(domain.lower()):
                out.append(Entity("EMAIL_ADDRESS", start, end, 0.95))
        return out

    return find_email


# -- credit cards ---------------------------------------------------------------------------

# A CSV cell starts right after a comma; thousands separators ("1,234,567") never give 12
# digits in a row, and an identifier column (id, order, sku) is told by its header.
CARD_RE = re.compile(r"(?<![\w\-./])\d(?:[ \-]?\d){11,22}(?![\d])")
_SEP = re.compile(r"[ \-]")
# A card number written right after letters ("xy4111111111111111"): CARD_RE's boundary
# skips it; a whole unseparated number that passes Luhn in a card range is taken.
GLUED_CARD_RE = re.compile(r"[A-Za-z]\d{12,19}(?!\w)")
CARD_CONTEXT = re.compile(r"(?i)\b(?:card|cards|credit|debit|visa|mastercard|amex|maestro|cc|pan|payment|charged?)\b")


# A digit's contribution when the Luhn check doubles it.
_LUHN_DOUBLED = {str(d): 2 * d - 9 if 2 * d > 9 else 2 * d for d in range(10)}


def luhn(digits: str) -> bool:
    if digits.isascii() and digits.isdigit():
        # (Every other digit from the right is doubled: two sums over slices, no Python loop.)
        backwards = digits[::-1]
        return (sum(map(int, backwards[0::2])) + sum(map(_LUHN_DOUBLED.__getitem__, backwards[1::2]))) % 10 == 0
    total = 0
    parity = len(digits) % 2
    for i, ch in enumerate(digits):
        d = ord(ch) - 48
        if i % 2 == parity:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _ean13(digits: str) -> bool:
    return len(digits) == 13 and digits.isdigit() and \
        sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(digits)) % 10 == 0


def card_brand(d: str) -> str | None:
    """The scheme a card number belongs to by its IIN range and length, or None."""
    n = len(d)
    p2, p3, p4, p6 = int(d[:2]), int(d[:3]), int(d[:4]), int(d[:6])
    if d[0] == "4":
        return "visa" if n in (13, 16, 19) else None
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        return "mastercard" if n == 16 else None
    if p2 in (34, 37):
        return "amex" if n == 15 else None
    if 2200 <= p4 <= 2204:
        return "mir" if 16 <= n <= 19 else None
    if p4 == 6011 or 644 <= p3 <= 649 or p2 == 65 or 622126 <= p6 <= 622925:
        return "discover" if 16 <= n <= 19 else None
    if p2 == 35:
        return "jcb" if 16 <= n <= 19 else None
    if p4 in (2131, 1800):
        return "jcb" if n == 15 else None
    if 300 <= p3 <= 305 or p2 in (36, 38, 39) or p4 == 3095:
        return "diners" if 14 <= n <= 19 else None
    if p2 in (62, 81):
        return "unionpay" if 16 <= n <= 19 else None
    if p2 == 50 or 56 <= p2 <= 69 or p4 == 604:
        return "maestro" if 12 <= n <= 19 else None
    return None


_CARD_SHAPES = ([4, 4, 4, 4], [4, 4, 4, 4, 3], [4, 6, 5], [4, 6, 4])


def card_runs(text: str, lo: int, hi: int):
    """(match start, card start, card end, printed as cards are) for each match of
    CARD_RE.finditer(text, lo, hi) that holds a card number (redaction/_native.c has the same
    scan in C)."""
    for m in CARD_RE.finditer(text, lo, hi):
        groups = _SEP.split(m.group())
        found = _card_groups(groups)
        if found is not None:
            first, last = found
            start = m.start() + sum(len(g) + 1 for g in groups[:first])
            end = start + sum(len(g) + 1 for g in groups[first:last + 1]) - 1
            yield m.start(), start, end, [len(g) for g in groups[first:last + 1]] in _CARD_SHAPES


def _card_groups(groups: list[str]) -> tuple[int, int] | None:
    """The first and last group of the card number among a number's digit groups, or None.
    Runs of whole groups, longest first, then leftmost: "4111 1111 1111 1111 123" is a card +
    CVV, "ref 12 4111 1111 1111 1111" a number + a card."""
    n = len(groups)
    for size in range(n, 0, -1):
        for first in range(0, n - size + 1):
            if size > 1 and (len(groups[first]) < 4 or any(len(g) < 3 for g in groups[first + 1:first + size - 1])):
                continue  # written cards come in groups of 4 (4-6-5, ...); not "6 6 110 7 7 7 111"
            digits = "".join(groups[first:first + size])
            if 12 <= len(digits) <= 19 and luhn(digits) and card_brand(digits):
                return first, first + size - 1
    return None


def make_card_finder(native: bool = False) -> Finder:
    runs = native_mod.extension.card_runs if native else card_runs

    def find_card(text: str, lo: int, hi: int) -> list[Entity]:
        out = []
        for match_start, start, end, card_shaped in runs(text, lo, hi):
            # Grouped as cards are printed (4-4-4-4, 4-4-4-4-3, Amex 4-6-5, Diners 4-6-4), a Luhn-valid
            # number of a card range is a card whatever word stands before it ("ID", "account").
            if not card_shaped and not _context(text, match_start, CARD_CONTEXT) and (
                    (end - start == 13 and _ean13(text[start:end]))
                    or NOT_PHONE_CONTEXT.search(text, max(0, match_start - 24), match_start)
                    or table_header_says(text, match_start, NOT_PHONE_HEADER)):
                continue  # a barcode, or a tracking/order number, that happens to pass Luhn too
            out.append(Entity("CREDIT_CARD", start, end, 0.9))
        for m in GLUED_CARD_RE.finditer(text, lo, hi):
            start = m.start() + 1
            digits = m.group()[1:]
            if _glued_to_word(text, start) and luhn(digits) and card_brand(digits) and not (
                    len(digits) == 13 and _ean13(digits) and not _context(text, start, CARD_CONTEXT)):
                out.append(Entity("CREDIT_CARD", start, m.end(), 0.9))
        return out

    return find_card


def _glued_to_word(text: str, start: int) -> bool:
    """Whether the value at `start` follows letters that begin a token ("ref4111...",
    "xyDE89..."): not the middle of a hash or identifier that mixes letters and digits."""
    i = start
    while i > 0 and text[i - 1].isascii() and text[i - 1].isalpha():
        i -= 1
    return i < start and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] in "_-./"))


# -- IBAN -----------------------------------------------------------------------------------

# (A match may start right after letters, "refDE89...", but then only at the start of a
# token of letters: see _glued_to_word.)
IBAN_RE = re.compile(r"(?<![0-9])[A-Za-z]{2}\d{2}(?:[ \-]?[A-Za-z0-9]){11,32}")


# ISO 13616: each letter becomes its number (A=10 ... Z=35) before the mod-97 check.
_IBAN_LETTERS = str.maketrans({chr(c): str(c - 55) for c in range(ord("A"), ord("Z") + 1)}
                              | {chr(c): str(c - 87) for c in range(ord("a"), ord("z") + 1)})


def _mod97(compact: str) -> bool:
    moved = (compact[4:] + compact[:4]).translate(_IBAN_LETTERS)
    if not moved.isdecimal():
        return False
    return int(moved) % 97 == 1


@functools.lru_cache(maxsize=1)
def _iban_formats() -> dict[str, re.Pattern]:
    """Presidio's per-country IBAN layouts, compiled once with the standard library's re:
    its IbanRecognizer.validate_result looks each one up in the `regex` module's pattern
    cache on every call (about 10 µs) and repeats the checksum _mod97 has already done."""
    # Read from its file: importing it as a module imports the presidio_analyzer package and with it
    # spaCy (~1.5 s and ~100 MB per process), which fast mode never uses. The file has no imports.
    package = importlib.util.find_spec("presidio_analyzer").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location(
        "gatewatch_presidio_iban_patterns", os.path.join(package, "predefined_recognizers", "generic", "iban_patterns.py"))
    layouts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layouts)
    regex_per_country = layouts.regex_per_country

    # (Unanchored at the end, as Presidio matches them: exact_match is off by default.)
    return {country: re.compile(layout) for country, layout in regex_per_country.items() if layout}


def _iban_layout_ok(compact: str) -> bool:
    """What IbanRecognizer.validate_result says of a compact, upper-case IBAN whose mod-97
    checksum passed: its check digits are ones it computes (02-98: 00, 01 and 99 also pass
    mod 97) and its country's layout matches."""
    if compact[2:4] in ("00", "01", "99"):
        return False
    layout = _iban_formats().get(compact[:2])
    return layout is not None and layout.match(compact) is not None


def _compact_iban(raw: str) -> str:
    return "".join(ch for ch in raw if ch not in " -").upper()  # people paste IBANs in lowercase too


def iban_checksum_cuts(raw: str):
    """(length, end in raw) of each cut of an IBAN_RE match, its compact form from the longest
    (34) down to 15 characters, that ends a group and passes mod 97 (redaction/_native.c has
    the same loop in C)."""
    positions = [i for i, ch in enumerate(raw) if ch not in " -"]
    compact = _compact_iban(raw)
    for length in range(min(34, len(compact)), 14, -1):
        end = positions[length - 1] + 1
        if end < len(raw) and raw[end].isalnum():
            continue  # would cut a group in half
        if _mod97(compact[:length]):
            yield length, end


def make_iban_finder(native: bool = False) -> Finder:
    cuts = native_mod.extension.iban_checksum_cuts if native else iban_checksum_cuts

    def find_iban(text: str, lo: int, hi: int) -> list[Entity]:
        out = []
        position = lo
        while (m := IBAN_RE.search(text, position, hi)) is not None:
            if m.start() > 0 and text[m.start() - 1].isalpha() and not _glued_to_word(text, m.start()):
                position = m.start() + 1
                continue
            raw = m.group()
            # A match can run on into the next words ("DE89 ... 00 and GB82..."): the search goes on
            # right after the IBAN found, not after the match, or a second IBAN is swallowed.
            position = m.start() + 1
            for length, end in cuts(raw):
                if _iban_layout_ok(_compact_iban(raw)[:length]):
                    out.append(Entity("IBAN_CODE", m.start(), m.start() + end, 0.95))
                    position = m.start() + end
                    break
        return out

    return find_iban


# -- US SSN ---------------------------------------------------------------------------------

SSN_RE = re.compile(r"(?<![\d\-.])(\d{3})([ .\-]?)(\d{2})\2(\d{4})(?![\d\-])")
SSN_CONTEXT = re.compile(r"(?i)\b(?:ssn|ssns|social security|soc\.? sec|ss#|ss no|taxpayer)")


# Published sample numbers (UsSsnRecognizer.invalidate_result's list).
_SAMPLE_SSNS = frozenset(("123456789", "987654320", "078051120"))


_SSN_SCORES = {"-": 0.85, " ": 0.6, ".": 0.6}


def ssn_candidates(text: str, lo: int, hi: int):
    """(start, end, separator) of each match of SSN_RE.finditer(text, lo, hi) that Presidio's
    UsSsnRecognizer.invalidate_result keeps (SSN_RE already makes both separators the same).
    (redaction/_native.c has the same scan in C.)"""
    for m in SSN_RE.finditer(text, lo, hi):
        area, sep, group, serial = m.groups()
        if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
            continue
        # not one digit repeated, not a published sample
        digits = area + group + serial
        if digits in _SAMPLE_SSNS or digits.count(digits[0]) == 9:
            continue
        yield m.start(), m.end(), sep


def make_ssn_finder(native: bool = False) -> Finder:
    candidates = native_mod.extension.ssn_candidates if native else ssn_candidates

    def find_ssn(text: str, lo: int, hi: int) -> list[Entity]:
        out = []
        for start, end, sep in candidates(text, lo, hi):
            score = _SSN_SCORES.get(sep, 0.3)
            if _context(text, start, SSN_CONTEXT, 64):
                score = min(1.0, score + 0.4)
            out.append(Entity("US_SSN", start, end, score))
        return out

    return find_ssn


# -- phone numbers --------------------------------------------------------------------------

# +CC, (+CC), 00CC or a national number; groups joined by space, dot, dash, slash or nothing
# around "(0)" / "(area)"; an optional extension (x211, ext. 204, #204).
# (The leading lookahead repeats what a match must start with: most positions then fail
# before the lookbehinds and the alternation are tried.)
PHONE_RE = re.compile(
    r"(?=[(+\d])(?:(?<![\w+])(?:\(\+\d{1,3}\)[ \u00a0]?|\+)|(?<![\w.\-/+#])(?=[(\d]))"
    r"\(?\d{1,14}\)?(?:(?:[ \u00a0.\-/]{1,2}|(?<=\))|(?=\())\(?\d{1,12}\)?){0,7}"
    r"(?P<ext>[ \u00a0]?(?:x|ext\.?|extension|#)[ \u00a0]?\d{1,6})?(?![\w]|-[0-9A-Za-z])")
PHONE_CONTEXT = re.compile(
    r"(?i)(?=[cdfhmnoprstw])(?:\b(?:phone|tel|telephone|call|calls|mobile|cell|whatsapp|signal|number|contact|reach|fax|sms|text me|"
    r"ring|dial|dial-in|mob|ph|oncall|on-call|telefon|t[ée]l[ée]phone|handy|cellulare|celular|tel[ée]fono)\b"
    r"|\b[MmTtFf][ \t]?:"  # a signature's "T: ", "M: ", "F: "
    r"|(?i:sms|phone|mobile|whatsapp|fax)(?=[\W_]))")  # send_sms(to=...), phone_number=
# Right before a number that is an identifier, not a phone: "ISBN 978...", "order #...", "PO-".
NOT_PHONE_CONTEXT = re.compile(
    r"(?i)(?=[abdegioprstuv])\b(?:isbn(?:-1[03])?|ean|gtin|upc|sku|po|order|invoice|tracking|parcel|shipment|ref|reference|build|"
    r"version|ver|v|release|sha|id|epoch|ts|timestamp|driver|account|acct)\b[\s:#=\"'\-]*(?:(?:no|nr|number|num)\.?\s*)?$")
_NOT_PHONE = re.compile(
    r"^(?:\d{4}[-/.]\d{1,2}[-/.]\d{1,2}(?:\D|$)|\d{1,2}[-/.]\d{1,2}[-/.](?:\d{4}|\d\d)(?:[ T]|$)|\d{1,2}:\d{2}(?::\d{2})?$|"
    r"\d{1,3}(?:\.\d{1,3}){1,2}$|\d{3}([ .\-])\d\d\1\d{4}$)")
# Written the way phone numbers are and rarely anything else: North American 3-3-4, a
# national number with its trunk 0 ("030 1234567", "(0161) 496 0066"), an international
# prefix 00.
_PHONE_SHAPE = re.compile(
    r"^(?:(?:\+?1[ .\-]?)?\(?\d{3}\)?[ .\-]?\d{3}[ .\-]\d{4}|\(\d{1,5}\)[ .\-]?\d{2,10}(?:[ .\-]\d{2,5}){0,3}|\(?0\d{1,5}\)?(?:[ .\-/]{1,2}\d{2,8}){1,4}|"
    r"00\d{1,3}(?:[ .\-]?\d{2,8}){1,5})$")
_TRUNK = re.compile(r"\(0\)")
# Every character PHONE_RE matches that is not a \d digit (see phone_score).
_PHONE_PUNCTUATION = str.maketrans("", "", "()+ \u00a0.-/")
_LEADING_ZERO_GROUP = re.compile(r"(?<=[ .\-/)])0")
DECIMAL = re.compile(r"^\+?[1-9]\d*[.,]\d+$")
UNIT_AFTER = re.compile(r"(?i)[ \u00a0]?(?:ms|s|sec|secs|seconds|min|bytes|[kmgt]i?b|%|tokens|rows|items|km|kg|eur|usd|€|\$)\b")
NOT_PHONE_HEADER = re.compile(r"(?i)\b(?:id|ids|sku|ean|gtin|upc|isbn|order|invoice|po|tracking|ref|build|version|"
                              r"amount|price|total|qty|quantity|count|size|ts|timestamp|epoch|zip|postcode)\b")


def table_header_says(text: str, start: int, words: re.Pattern) -> bool:
    """Whether the CSV or markdown-table column holding `start` has a header matching
    `words` ("phone", "id")."""
    header = column_header(text, start)
    return header is not None and words.search(header) is not None


def column_header(text: str, start: int) -> str | None:
    """The header cell of the CSV or markdown-table column holding `start`, or None: the
    header is the first line of the block of lines with as many separators as this one.
    (redaction/_native.c has the same walk in C.)"""
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", start)
    line = text[line_start:line_end if line_end >= 0 else len(text)]
    sep = "|" if line.count("|") >= 2 else ("," if line.count(",") >= 1 else None)
    if sep is None or line_start == 0:
        return None
    column = text.count(sep, line_start, start)
    cells = line.count(sep)
    header = None
    pos = line_start
    for _ in range(50):  # walk up over rows (and a markdown |---| rule) with as many cells
        if pos == 0:
            break
        prev_start = text.rfind("\n", 0, pos - 1) + 1
        prev = text[prev_start:pos - 1]
        if prev.count(sep) != cells:
            break
        header, pos = prev, prev_start
    if header is None:  # (not `header is line`: a one-character line and its copy above may be one object)
        return None
    names = header.split(sep)
    return names[column] if column < len(names) else None


def _is_ipv4(candidate: str) -> bool:
    """What ipaddress.IPv4Address accepts (four ASCII decimal octets up to 255, no leading
    zeros), without building the address or raising its ValueError."""
    if candidate.count(".") != 3:
        return False
    for octet in candidate.split("."):
        if not (octet.isascii() and octet.isdigit()) or len(octet) > 3 or (len(octet) > 1 and octet[0] == "0") \
                or int(octet) > 255:
            return False
    return True


def _plausible(region: str, digits: str) -> bool:
    """Cheap length and leading-digit test before the (~80 µs) parse for a region."""
    n = len(digits)
    first = digits[0]
    if region in ("US", "CA"):
        return (n == 10 and first in "23456789") or (n == 11 and first == "1")
    if region == "GB":
        return first == "0" and n in (10, 11) and digits[1] in "1235789"
    if region in ("FR", "NL"):
        return first == "0" and n == 10
    if region == "AU":
        return first == "0" and n == 10 and digits[1] in "23478"
    if region == "DE":
        return first == "0" and 6 <= n <= 13 and digits[1] != "0"
    if region == "IT":
        return first in "03" and 6 <= n <= 12
    if region == "IL":
        return first == "0" and n in (9, 10)
    if region == "BR":
        return (n in (10, 11) and first != "0") or (first == "0" and n in (11, 12))
    if region == "IN":
        return (n == 10 and first in "6789") or (n == 11 and first == "0")
    if region == "ES":
        return n == 9 and first in "6789"
    return 6 <= n <= 15


@functools.lru_cache(maxsize=8192)
def _valid_phone(candidate: str, regions: tuple[str, ...]) -> bool:
    import phonenumbers

    digits = "".join(ch for ch in candidate if ch.isdigit())
    try:
        for region in regions:
            if _plausible(region, digits) and phonenumbers.is_valid_number(phonenumbers.parse(candidate, region)):
                return True
    except phonenumbers.NumberParseException:
        return False
    return False


def phone_score(text: str, start: int, candidate: str, regions: tuple[str, ...], extension: bool = False) -> float:
    """How sure we are that `candidate` (no extension) at `start` is a phone number; 0: it is not.

    Shape first: a number with its international prefix, or grouped the way phone numbers
    are written, is somebody's phone even when no numbering plan assigns it (typos, fake-
    looking real numbers). Unseparated digit runs need a numbering plan or a phone word
    nearby; identifiers (ISBN, EAN, order and tracking numbers, builds) are left alone."""
    if phone_shape_rejected(candidate):
        return 0.0  # dates, times, versions, SSNs, IPv4 addresses
    return shaped_phone_score(text, start, candidate, regions, extension)


def phone_shape_rejected(candidate: str) -> bool:
    """phone_score's first test (redaction/_native.c has it in C too): fewer than 7 or more
    than 15 digits besides a trunk "(0)", a date, time, version, SSN or IPv4 address."""
    main = _TRUNK.sub("", candidate) if "(0)" in candidate else candidate
    digits = len(main.translate(_PHONE_PUNCTUATION))  # (PHONE_RE's other characters: what \D would remove)
    return not 7 <= digits <= 15 or _NOT_PHONE.match(candidate) is not None or _is_ipv4(candidate)


def phone_word_before(text: str, start: int) -> bool:
    """Whether a phone word ("Tel.", "M:", "send_sms(") is in the 48 characters before start.
    (redaction/_native.c has the same test in C.)"""
    return _context(text, start, PHONE_CONTEXT)


def identifier_word_before(text: str, start: int) -> bool:
    """Whether an identifier word ("ISBN", "order #", "PO-") ends right before start.
    (redaction/_native.c has the same test in C.)"""
    return NOT_PHONE_CONTEXT.search(text, max(0, start - 24), start) is not None


def unit_after(text: str, end: int) -> bool:
    """Whether a unit ("ms", "tokens", "MiB", "%") follows at end. (redaction/_native.c has
    the same test in C.)"""
    return UNIT_AFTER.match(text, end) is not None


class _PythonPhoneContext:
    """The context tests shaped_phone_score calls; redaction/_native.c has them under these names."""
    phone_word_before = staticmethod(phone_word_before)
    identifier_word_before = staticmethod(identifier_word_before)
    unit_after = staticmethod(unit_after)
    column_header = staticmethod(column_header)


def shaped_phone_score(text: str, start: int, candidate: str, regions: tuple[str, ...],
                       extension: bool = False, tests=_PythonPhoneContext) -> float:
    """phone_score of a candidate phone_shape_rejected let through; tests: where its context
    tests come from (_PythonPhoneContext or the native module)."""
    main = _TRUNK.sub("", candidate) if "(0)" in candidate else candidate
    compact = main.translate(_PHONE_PUNCTUATION)
    digits = len(compact)
    international = candidate.startswith(("+", "(+"))
    # Every later exit for a national number with a unit after it is 0 as well: decide it
    # here, before the context searches.
    if not international and tests.unit_after(text, start + len(candidate)):
        return 0.0  # "8751007310 ms", "1 234 567 tokens"
    header: str | None | bool = False  # (False: not looked up yet; the walk up a table is the dearer part)
    if not international:
        if tests.identifier_word_before(text, start):
            return 0.0
        header = tests.column_header(text, start)
        if header is not None and NOT_PHONE_HEADER.search(header):
            return 0.0
    context = tests.phone_word_before(text, start)
    if not context:
        if header is False:
            header = tests.column_header(text, start)
        context = header is not None and PHONE_CONTEXT.search(header) is not None
    if (DECIMAL.match(candidate) and not context) or (international and compact[0] == "0" and candidate[1:].isdigit()):
        return 0.0  # "+3.140000", "+000000120": numbers, not phones
    if digits >= 12 and not international and luhn(compact) and card_brand(compact):
        return 0.0  # a card number
    if international:
        return 0.95 if context else 0.8
    separated = not candidate.isdigit()
    if separated and not context and len(_LEADING_ZERO_GROUP.findall(candidate)) >= 2:
        return 0.0  # "01 012 0123 01234": after the trunk prefix, groups rarely start with 0
    if extension or (separated and (_PHONE_SHAPE.match(candidate) or candidate != main)):
        return 0.95 if context else 0.75
    if not separated:
        if digits < 10 and not context:
            return 0.0
        if (_ean13(compact) or (digits == 13 and compact[0] == "1")) and not context:
            return 0.0  # a barcode or an epoch in milliseconds
    if context and (separated or compact[0] in "0+" or digits >= 8):
        return 0.9
    return 0.7 if _valid_phone(candidate, regions) else 0.0


def phone_candidates(text: str, lo: int, hi: int, shortest: int, screen: bool):
    """(start, extension start or -1, end, candidate end) of each match of
    PHONE_RE.finditer(text, lo, hi) at least `shortest` characters long; the candidate is the
    match before its extension, without trailing separators. With screen, the candidates
    phone_shape_rejected refuses are left out. (redaction/_native.c has the same scan in C.)"""
    for m in PHONE_RE.finditer(text, lo, hi):
        start = m.start()
        if m.end() - start >= shortest:
            extension_start = m.start("ext")
            candidate = text[start:extension_start if extension_start >= 0 else m.end()].rstrip(" .-/\u00a0")
            if not (screen and phone_shape_rejected(candidate)):
                yield start, extension_start, m.end(), start + len(candidate)


def make_phone_finder(regions: tuple[str, ...], min_score: float = 0.0, native: bool = False) -> Finder:
    candidates = native_mod.extension.phone_candidates if native else phone_candidates
    context_tests = native_mod.extension if native else _PythonPhoneContext

    def python_score(text: str, start: int, candidate_end: int, extension: bool, *_regexes) -> float:
        return shaped_phone_score(text, start, text[start:candidate_end], regions, extension, context_tests)

    # (the C score takes the header and shape regexes; None back: the numbering plan decides)
    score_of = native_mod.extension.phone_score if native else python_score
    regexes = (NOT_PHONE_HEADER.search, PHONE_CONTEXT.search, _PHONE_SHAPE.match)

    def find_phone(text: str, lo: int, hi: int) -> list[Entity]:
        out = []
        # (fewer than 7 characters hold fewer than the 7 digits phone_score wants)
        for start, extension_start, end, candidate_end in candidates(text, lo, hi, 7, True):
            extension = extension_start >= 0
            score = score_of(text, start, candidate_end, extension, *regexes)
            if score is None:
                score = 0.7 if _valid_phone(text[start:candidate_end], regions) else 0.0
            elif score is NotImplemented:
                score = python_score(text, start, candidate_end, extension)
            if score and score >= min_score:
                out.append(Entity("PHONE_NUMBER", start, end if extension else candidate_end, score))
        return out

    return find_phone


# -- IP addresses ---------------------------------------------------------------------------

IPV4_RE = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?:/\d{1,2})?(?![\w]|\.\d)")
_IPV4_START = re.compile(r"\d{1,3}\.\d")
# Full, compressed ("::"), with an embedded IPv4, a zone id ("%eth0") or a prefix length;
# brackets and ":port" stay outside the match.
IPV6_RE = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?"
                     r"(?:%[0-9A-Za-z_.\-]+)?(?:/\d{1,3})?(?!\w|:[0-9A-Fa-f:]|\.\d)")
# "Chrome/121.0.0.0", "Firefox/115.0.2.1": a product version, not an address.
_PRODUCT_TOKEN = re.compile(r"[A-Za-z][\w\-]*/$")

# An IPv4 address that is not loopback (127.), unspecified (0.), private (10., 192.168.,
# 172.16-31.) or link-local (169.254.), or any IPv6 candidate.
# (Two searches, not one alternation: the IPv6 half, rewritten to start at its first ":",
# is found by re's literal-prefix search instead of being tried at every position.)
_PUBLIC_V4_HINT = re.compile(r"(?<![\d.])(?!127\.|0\.|10\.|192\.168\.|169\.254\.|172\.(?:1[6-9]|2\d|3[01])\.)\d{1,3}\.\d")
_V6_HINT = re.compile(r":[0-9A-Fa-f]{0,4}:")
_ULA = ipaddress.ip_network("fc00::/7")
# Ranges no person is ever reached through. Documentation ranges (192.0.2.0/24,
# 203.0.113.0/24, 2001:db8::/32) are NOT here: people paste real addresses into examples
# and example addresses into real data, and redacting one costs nothing.
_NOT_PERSONAL_V4 = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/4",
    "240.0.0.0/4"))
_NOT_PERSONAL_V4_RANGES = tuple((int(n.network_address), int(n.broadcast_address)) for n in _NOT_PERSONAL_V4)


def _not_personal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Addresses that identify no one: loopback, unspecified, private, multicast. IPv6
    link-local addresses (often with a zone id) carry the device's interface id, and
    addresses in unassigned ranges are still somebody's typo or test data: both stay PII."""
    if address.version == 6:
        mapped = address.ipv4_mapped
        if mapped is not None:
            return _not_personal(mapped)
        return address.is_loopback or address.is_unspecified or address.is_multicast or address in _ULA
    number = int(address)
    return any(first <= number <= last for first, last in _NOT_PERSONAL_V4_RANGES)


def _private_v4(valid: str) -> bool:
    """_not_personal of the address of a string _is_ipv4 accepted."""
    return _in_ranges(valid, _NOT_PERSONAL_V4_RANGES)


def _in_ranges(valid: str, ranges: tuple[tuple[int, int], ...]) -> bool:
    """Whether the address of a string _is_ipv4 accepted is in one of the (first, last) ranges."""
    a, b, c, d = valid.split(".")
    number = (int(a) << 24) | (int(b) << 16) | (int(c) << 8) | int(d)
    return any(first <= number <= last for first, last in ranges)


def _parse_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address of "a.b.c.d", "a.b.c.d/nn" or an IPv6 form; ValueError if it is none.
    Without a prefix this is ip_address: ip_interface would also build a network object,
    which costs more than the parse."""
    return ipaddress.ip_interface(value).ip if "/" in value else ipaddress.ip_address(value)


def _full_ipv6(value: str) -> ipaddress.IPv6Address:
    """ip_address() of an IPv6 address written in full (eight groups, no "::", no embedded
    IPv4): its groups read as one hexadecimal number, without ip_address's per-group parse.
    ValueError if it is none."""
    if _FULL_IPV6.fullmatch(value) is None:
        raise ValueError(value)
    return ipaddress.IPv6Address(int("".join(group.zfill(4) for group in value.split(":")), 16))


_FULL_IPV6 = re.compile(r"(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}")


def ipv4_candidates(text: str, lo: int, hi: int, not_personal: tuple[tuple[int, int], ...] | None):
    """(start, end, checked) of each match of IPV4_RE.finditer(text, lo, hi) that does not follow
    a product token ("Chrome/121.0.0.0"). One without a prefix length is checked here (octets,
    and not in a `not_personal` range unless that is None); one with a prefix length is left
    to ipaddress, unchecked. (redaction/_native.c has the same scan in C.)"""
    for m in finditer_from(IPV4_RE, _IPV4_START, text, lo, hi):
        if _PRODUCT_TOKEN.search(text, max(0, m.start() - 32), m.start()):
            continue
        value = m.group()
        if "/" in value:
            yield m.start(), m.end(), False
        # (Most candidates: the octets' own check and range test cost a fraction of building
        # an IPv4Address.)
        elif _is_ipv4(value) and not (not_personal is not None and _in_ranges(value, not_personal)):
            yield m.start(), m.end(), True


IPV6_INVALID, IPV6_PERSONAL, IPV6_NOT_PERSONAL = 0, 1, 2


def ipv6_verdict(bare: str) -> int:
    """What ipaddress makes of an IPv6 candidate (two colons or more) without its zone id,
    "/nn" read as ip_interface does: IPV6_INVALID, IPV6_PERSONAL, or IPV6_NOT_PERSONAL where
    _not_personal is true of it. (redaction/_native.c has the same parse and ranges in C for
    ASCII values.)"""
    try:
        address = _parse_ip(bare) if "." in bare or "/" in bare or "::" in bare else _full_ipv6(bare)
    except ValueError:
        return IPV6_INVALID
    return IPV6_NOT_PERSONAL if _not_personal(address) else IPV6_PERSONAL


def make_ip_finder(ignore_private: bool, native: bool = False) -> Finder:
    v4_candidates = native_mod.extension.ipv4_candidates if native else ipv4_candidates
    v6_verdict = native_mod.extension.ipv6_verdict if native else ipv6_verdict
    not_personal = _NOT_PERSONAL_V4_RANGES if ignore_private else None

    def find_ip(text: str, lo: int, hi: int) -> list[Entity]:
        out = []
        window = text[lo:hi]
        if ignore_private and "." in window and not (_V6_HINT.search(window) or _PUBLIC_V4_HINT.search(window)):
            return out  # only loopback/private/link-local IPv4 and no ':' (IPv6) in sight
        if "." in window:
            for start, end, checked in v4_candidates(text, lo, hi, not_personal):
                if not checked:
                    try:
                        address = _parse_ip(text[start:end])
                    except ValueError:
                        continue
                    if ignore_private and _not_personal(address):
                        continue
                out.append(Entity("IP_ADDRESS", start, end, 0.85))
        # An IPv6 address has a "::" or 7 colons (6 before an embedded IPv4): a window with
        # neither (timestamps, "host:port") holds none.
        if "::" in window or window.count(":") >= 6:
            for m in IPV6_RE.finditer(text, lo, hi):
                value = m.group()
                if value.endswith(":") and not value.endswith("::"):
                    value = value[:-1]  # "from 2001:db8::1: icmp_seq=1"
                if value.count(":") < 2 or value.startswith(":") and not value.startswith("::"):
                    continue
                bare = value.split("%")[0]
                if "::" not in bare and bare.count(":") != (6 if "." in bare else 7):
                    continue  # what ip_address would reject, without the cost of its ValueError
                verdict = v6_verdict(bare)
                if verdict < 0:
                    verdict = ipv6_verdict(bare)  # non-ASCII: the C parse leaves it to ipaddress
                if verdict == IPV6_INVALID or ignore_private and verdict == IPV6_NOT_PERSONAL:
                    continue
                out.append(Entity("IP_ADDRESS", m.start(), m.start() + len(value), 0.85))
        return out

    return find_ip


# -- crypto wallets -------------------------------------------------------------------------

CRYPTO_RE = re.compile(r"(?<![\w])(?:bc1[ac-hj-np-z02-9]{11,71}|[13][a-km-zA-HJ-NP-Z1-9]{25,34})(?![\w])")


_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_BECH32_GENERATOR = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


def valid_bitcoin_address(value: str) -> bool:
    """Presidio's CryptoRecognizer.validate_result, here so that fast mode never imports the
    presidio_analyzer package (it imports spaCy: ~1.5 s and ~90 MB in every flow process).
    Base58Check (P2PKH/P2SH, '1'/'3') or a Bech32/Bech32m checksum ('bc1')."""
    if value[:1] in ("1", "3"):
        stripped = value.lstrip("1")
        number = 0
        for char in stripped:
            digit = _BASE58.find(char)
            if digit < 0:
                return False
            number = number * 58 + digit
        raw = number.to_bytes(len(value) - len(stripped) + (number.bit_length() + 7) // 8, "big")
        return raw[-4:] == hashlib.sha256(hashlib.sha256(raw[:-4]).digest()).digest()[:4]
    if not value.startswith("bc1"):
        return False
    if any(ord(c) < 33 or ord(c) > 126 for c in value) or (value.lower() != value and value.upper() != value):
        return False
    value = value.lower()
    pos = value.rfind("1")
    if pos < 1 or pos + 7 > len(value) or len(value) > 90 or any(c not in _BECH32 for c in value[pos + 1:]):
        return False
    hrp = value[:pos]
    checksum = 1
    for item in [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp] + [_BECH32.find(c) for c in value[pos + 1:]]:
        top = checksum >> 25
        checksum = (checksum & 0x1FFFFFF) << 5 ^ item
        for i in range(5):
            checksum ^= _BECH32_GENERATOR[i] if (top >> i) & 1 else 0
    return checksum in (1, 0x2BC830A3)  # Bech32, Bech32m


def find_crypto(text: str, lo: int, hi: int) -> list[Entity]:
    return [Entity("CRYPTO", m.start(), m.end(), 0.9) for m in CRYPTO_RE.finditer(text, lo, hi)
            if valid_bitcoin_address(m.group())]


# -- secrets --------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"(?i)^(?:<[^>]*>|\*+|x+|\.+|your[_\-].*|changeme|none|null|nil|true|false|"
                          r"undefined|redacted|example|placeholder|\$\{?(?-i:[A-Z_][A-Z0-9_]*|[a-z_][a-z0-9_]*)\}?|%\w+%|\{\{.*\}\}|os\.environ.*|"
                          r"getenv.*|env\b.*|process\.env.*|input|getpass|secret|password|token|string|str|int|"
                          r"(?:var|local|module|data|each|self|secrets|vars|env)\..*)$")
# "sk-...", "sk-xxxxxxxx", "sk-your-key-here", "ghp_XXXXXXXX": a placeholder shaped like a key.
_PLACEHOLDER_PART = re.compile(r"(?i)x{6,}|\.{3}|\*{3}|your|here|example|placeholder|dummy|redacted|changeme|insert|<|>")


def _regex_finder(regex: re.Pattern, score: float, group: int = 0, check: Callable[[str], bool] | None = None) -> Finder:
    def find(text: str, lo: int, hi: int) -> list[Entity]:
        out = []
        for m in regex.finditer(text, lo, hi):
            value = m.group(group)
            if not value or (check is not None and not check(value)):
                continue
            out.append(Entity("SECRET", m.start(group), m.end(group), score))
        return out

    return find


def _looks_secret(value: str) -> bool:
    return not (len(value) < 6 or _PLACEHOLDER.match(value) or _PLACEHOLDER_PART.search(value))


def _quoted_or_bare(m: re.Match) -> tuple[str, int, bool]:
    """(value, start, quoted) of whichever value group of KV_RE / ENV_VALUE_RE matched."""
    for group in ("dq", "sq"):
        if m.group(group) is not None:
            return m.group(group), m.start(group), True
    return m.group("value").rstrip("."), m.start("value"), False


def kv_candidates(text: str, lo: int, hi: int):
    """(key start, key end, quote after the key, value start, value end, quoted value) of each
    match of KV_RE.finditer(text, lo, hi). (redaction/_native.c has the same scan in C.)"""
    for m in KV_RE.finditer(text, lo, hi):
        group = "dq" if m.group("dq") is not None else "sq" if m.group("sq") is not None else "value"
        yield m.start("key"), m.end("key"), bool(m.group("quote")), m.start(group), m.end(group), group != "value"


def make_kv_finder(native: bool = False) -> Finder:
    candidates = native_mod.extension.kv_candidates if native else kv_candidates

    def find_kv_secret(text: str, lo: int, hi: int) -> list[Entity]:
        out = []
        for key_start, key_end, key_quoted, start, end, quoted in candidates(text, lo, hi):
            value = text[start:end] if quoted else text[start:end].rstrip(".")
            end = start + len(value)
            if end < len(text) and text[end] in "(.[" and not quoted and not key_quoted:
                continue  # password = getpass(), token = self.token
            if not _looks_secret(value):
                continue
            key = text[key_start:key_end].lower().replace("-", "_")
            strong = key not in ("token", "key", "pass", "auth") and "session" not in key and "sessid" not in key
            if not strong and not (any(ch.isdigit() for ch in value) or len(value) >= 16):
                continue
            out.append(Entity("SECRET", start, end, 0.9 if strong else 0.75))
        return out

    return find_kv_secret


def _env_block_secret(text: str, lo: int, hi: int) -> list[Entity]:
    """Kubernetes / compose env lists: the secret's name on one line, its value on the next."""
    out = []
    for m in ENV_VALUE_RE.finditer(text, lo, hi):
        value, start, _quoted = _quoted_or_bare(m)
        if _looks_secret(value):
            out.append(Entity("SECRET", start, start + len(value), 0.9))
    return out


def _pem_block(text: str, lo: int, hi: int) -> list[Entity]:
    out = []
    for m in PEM_BEGIN.finditer(text, lo, hi):
        end = PEM_END.search(text, m.end())
        # No END marker: the key runs to the end of the text, so everything after BEGIN goes.
        out.append(Entity("SECRET", m.start(), end.end() if end else len(text), 1.0))
    return out


_VALUE = r"(?:\"(?P<dq>[^\"\n]{4,200})\"|'(?P<sq>[^'\n]{4,200})'|(?P<value>[^\s\"',;<>`()\[\]{}]{4,200}))"
# The lookahead lists the keys' first letters: at most positions it fails at once, where the
# lookbehind and the alternation would be tried (about twice as fast over a window).
KV_RE = re.compile(
    r"(?i)(?=[acjkprstx])(?<![A-Za-z0-9])(?P<key>password|passwd|passwort|pwd|pass|passphrase|secret|client[_\-]?secret|secret[_\-]?key|"
    r"api[_\-]?key|apikey|api[_\-]?token|access[_\-]?token|access[_\-]?key|auth[_\-]?token|refresh[_\-]?token|"
    r"private[_\-]?key|aws_secret_access_key|token|key|auth|credentials?|(?:php|j)?session[_\-]?(?:id|token|key)?|"
    r"sessid|[cx]srf[_\-]?token)(?P<quote>[\"']?)[ \t]*(?:[:=]|=>|\bis\b)[ \t]*"
    + _VALUE)
ENV_VALUE_RE = re.compile(
    r"(?i)\bname:[ \t]*[\"']?[A-Z0-9_]*(?:PASSWORD|PASSWD|PWD|SECRET|TOKEN|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|"
    r"CREDENTIALS?)[A-Z0-9_]*[\"']?[ \t]*\r?\n[ \t]*(?:-[ \t]*)?value:[ \t]*" + _VALUE)
PEM_BEGIN = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
PEM_END = re.compile(r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
BEARER_RE = re.compile(r"(?i)\b(?:bearer|token|basic)\s+([A-Za-z0-9\-._~+/]{16,}=*)")
# The password may hold "@" and "/": it ends at the last "@" that a host name follows.
URL_PASSWORD_RE = re.compile(r"(?i)\b[a-z][a-z0-9+.\-]{1,20}://[^\s:/@]{1,64}:(\S{3,128})@"
                             r"(?=[A-Za-z0-9\-.]+(?::\d+)?(?:[/?#\s\"']|$))")

# (name, gate pattern(s), precise regex, score)
_PREFIXED: list[tuple[str, bytes, str]] = [
    ("anthropic", rb"sk-ant-(?:api|admin)\d\d-", r"\bsk-ant-(?:api|admin)\d\d-[A-Za-z0-9_\-]{20,}"),
    ("openai", rb"sk-(?:proj|svcacct|admin|None)-", r"\bsk-(?:proj|svcacct|admin|None)-[A-Za-z0-9_\-]{20,}"),
    ("sk", rb"\bsk-[A-Za-z0-9]{20}", r"\bsk-[A-Za-z0-9]{20,}(?:T3BlbkFJ[A-Za-z0-9]{20,})?"),
    ("github", rb"\bgh[pousr]_[A-Za-z0-9]{30}", r"\bgh[pousr]_[A-Za-z0-9]{30,}"),
    ("github_pat", rb"\bgithub_pat_[A-Za-z0-9_]{20}", r"\bgithub_pat_[A-Za-z0-9_]{20,}"),
    ("gitlab", rb"\bglpat-[A-Za-z0-9_\-]{20}", r"\bglpat-[A-Za-z0-9_\-]{20,}"),
    ("slack", rb"\bxox[abposr]-[A-Za-z0-9]", r"\bxox[abposr]-[A-Za-z0-9\-]{10,}"),
    ("slack_webhook", rb"hooks\.slack\.com/services/", r"https?://hooks\.slack\.com/services/[A-Za-z0-9/_\-]+"),
    ("stripe", rb"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{10}", r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{10,}"),
    ("aws_key_id", rb"\b(?:AKIA|ASIA|ABIA|ACCA|AIDA|AROA|AIPA|ANPA|ANVA|AGPA)[A-Z0-9]{16}\b",
     r"\b(?:AKIA|ASIA|ABIA|ACCA|AIDA|AROA|AIPA|ANPA|ANVA|AGPA)[A-Z0-9]{16}\b"),
    ("google", rb"\bAIza[0-9A-Za-z_\-]{30}", r"\bAIza[0-9A-Za-z_\-]{35}"),
    ("huggingface", rb"\bhf_[A-Za-z0-9]{30}", r"\bhf_[A-Za-z0-9]{30,}"),
    ("npm", rb"\bnpm_[A-Za-z0-9]{36}", r"\bnpm_[A-Za-z0-9]{36,}"),
    ("pypi", rb"\bpypi-AgE", r"\bpypi-AgE[A-Za-z0-9_\-]{50,}"),
    ("sendgrid", rb"\bSG\.[A-Za-z0-9_\-]{16}", r"\bSG\.[A-Za-z0-9_\-]{16,}\.[A-Za-z0-9_\-]{16,}"),
    ("groq", rb"\bgsk_[A-Za-z0-9]{40}", r"\bgsk_[A-Za-z0-9]{40,}"),
    ("xai", rb"\bxai-[A-Za-z0-9]{40}", r"\bxai-[A-Za-z0-9]{40,}"),
    ("twilio", rb"\bSK[0-9a-f]{32}\b", r"\bSK[0-9a-f]{32}\b"),
    ("jwt", rb"\beyJ[A-Za-z0-9_\-]{5,}\.eyJ", r"\beyJ[A-Za-z0-9_\-]{5,}\.eyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{8,}"),
    ("azure_conn", rb"AccountKey=", r"AccountKey=[A-Za-z0-9+/=]{40,}"),
]


def secret_detectors(native: bool = False) -> list[Detector]:
    detectors = [
        Detector(f"secret:{name}", "SECRET", (gate,), 200 if name == "jwt" else 48, 600,
                 _regex_finder(re.compile(precise), 1.0))
        for name, gate, precise in _PREFIXED
    ]
    detectors += [
        Detector("secret:pem", "SECRET", (rb"-----BEGIN ",), 12, 64, _pem_block),
        Detector("secret:bearer", "SECRET", (rb"\b(?:bearer|token|basic)\s+[A-Za-z0-9\-._~+/]{16}",), 40, 600,
                 _regex_finder(BEARER_RE, 0.9, group=1, check=_looks_secret), caseless=True),
        Detector("secret:url_password", "SECRET", (rb"://[^\s:/@]{1,64}:\S{3,128}@",), 240, 16,
                 _regex_finder(URL_PASSWORD_RE, 0.95, group=1, check=_looks_secret)),
        Detector("secret:kv", "SECRET",
                 (rb"(?:pass|pwd|secret|key|token|auth|credential|sess)[a-z_\-]{0,12}[\"']?\s*(?:[:=]|=>|\bis\b)",), 64, 240,
                 make_kv_finder(native), caseless=True),
        Detector("secret:env_block", "SECRET",
                 (rb"(?:pass|pwd|secret|token|key|credential)[a-z0-9_]{0,12}[\"']?[ \t]*\r?\n[ \t]*(?:-[ \t]*)?value:",),
                 120, 240, _env_block_secret, caseless=True),
    ]
    return detectors


# -- the table of pattern detectors ---------------------------------------------------------

# A run of at least 7 (9) digits: its first end is 7 (9) digits after a non-digit or the
# start, its last end where the digits stop.
_DIGIT_RUN_FROM_7 = RunGate(rb"(?:^|\D)\d{7}", rb"\d*", rb"\d{7,13}")
_DIGIT_RUN_FROM_9 = RunGate(rb"(?:^|\D)\d{9}", rb"\d*", rb"\d{9}")


def pattern_detectors(phone_regions: tuple[str, ...], ip_ignore_private: bool,
                      phone_min_score: float = 0.0, native: bool = False) -> list[Detector]:
    """native: the finders use redaction/_native.c where it has their scans (same results)."""
    return [
        Detector("email", "EMAIL_ADDRESS", (rb"[A-Za-z0-9_.+\-%'\x80-\xff]@[A-Za-z0-9\x80-\xff][A-Za-z0-9\-\x80-\xff]*\.",),
                 132, 280, make_email_finder(native)),
        Detector("card", "CREDIT_CARD", (rb"\d(?:[ \-]?\d){11}",), 26, 40, make_card_finder(native)),
        Detector("iban", "IBAN_CODE", (rb"[A-Z]{2}\d\d[ \-]?[A-Z0-9]{4}[ \-]?[A-Z0-9]{4}",), 18, 60, make_iban_finder(native),
                 caseless=True),
        # (ssn: \d{3}[ .\-]?\d\d[ .\-]?\d{4}, split by separator, the unseparated form a run gate)
        Detector("ssn", "US_SSN", (rb"\d{3}[ .\-]\d\d[ .\-]?\d{4}", rb"\d{5}[ .\-]\d{4}", _DIGIT_RUN_FROM_9), 15, 3,
                 make_ssn_finder(native)),
        Detector("phone", "PHONE_NUMBER",
                 (rb"\+\d[\d \-.()/]{5,}\d", rb"\(\+\d{1,3}\)", rb"\(\d{1,5}\)[ \-.]?\d{2,}",
                  RunGate(rb"\d{1,5}[ \-./]\d{2,}[ \-.]\d{3}", rb"\d*", rb"\d{1,5}[ \-./]\d{2,}[ \-.]\d{3,}"),
                  rb"\d\d[ \-.]\d\d[ \-.]\d\d[ \-.]\d\d", RunGate(rb"\d{2,5}[ \-./]\d{5}", rb"\d*", rb"\d{2,5}[ \-./]\d{5,}"),
                  rb"\d{4}[ \-.]\d{4}", _DIGIT_RUN_FROM_7),
                 30, 24, make_phone_finder(phone_regions, phone_min_score, native)),
        Detector("ip", "IP_ADDRESS", (rb"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", rb"[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{1,4}",
                                      rb"::[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{0,4}[:.]"),
                 48, 44, make_ip_finder(ip_ignore_private, native)),
        Detector("crypto", "CRYPTO", (rb"\b(?:bc1[ac-hj-np-z02-9]{11}|[13][a-km-zA-HJ-NP-Z1-9]{25})",), 30, 80, find_crypto),
        *secret_detectors(native),
    ]
