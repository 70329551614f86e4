"""The Redactor: tiers wired together, operators applied, events flagged and classified.

fast mode (default), per text:
  1. one hyperscan scan of the UTF-8 bytes (all pattern gates, capitalised words, cue
     phrases); a text with no hit is done here (most clean texts);
  2. each detector whose gate fired runs its precise regex + validator on merged windows
     around the hits (Presidio's validators, our card ranges and secrets);
  3. the names tier turns capitalised-word and cue hits into PERSON spans;
  4. optional extra Presidio pattern entities (URL, UK_NHS, ...) on the whole text.
thorough mode adds spaCy NER through Presidio (PERSON and any of LOCATION/NRP/ORGANIZATION
named in `entities`), run over whole batches with nlp.pipe.

Fail closed: any exception or a text over its time budget becomes RedactionError; the
caller (the flow) sends such an event to the DLQ without its text.
"""

from __future__ import annotations

import functools
import gc
import logging
import re
import time
from collections import OrderedDict
from typing import Any

from redaction import gazetteer as gazetteer_mod
from redaction.gazetteer import PARTICLES
from redaction.gate import Gate, GatePattern
from redaction import native as native_mod
from redaction.names import LOWERCASE_CUES, STRONG_CUES, TITLES, WEAK_CUES, NameFinder
from redaction.operators import Operators
from redaction.patterns import Detector, RunGate, pattern_detectors
from redaction.structure import structure_detectors
from redaction.settings import FAST_ENTITIES, LEVELS, NER_ENTITIES, RedactionSettings
from redaction.types import Entity, RedactionError, RedactionResult

log = logging.getLogger(__name__)

_KIND_DETECTOR, _KIND_WORD, _KIND_CUE, _KIND_WEAK, _KIND_RUN = 0, 1, 2, 3, 4
# Bytes that continue a word: ASCII letters and digits, "_", and any byte of a non-ASCII character.
_WORD_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_") | frozenset(range(0x80, 0x100))
_CAPITAL = rb"(?:[A-Z]|\xc3[\x80-\x9e]|[\xc4\xc5\xc8][\x80-\xbf])"
_LETTER = rb"(?:[A-Za-z]|[\xc3\xc4\xc5\xc8][\x80-\xbf])"
# Between a cue and the name: a colon, comma or dash (not a full stop: "the class name. Use
# ISO"), a JSON/YAML key's quotes ("name": "Ana"), up to two line breaks
# (a signature's blank line).
_CUE_SEP = rb"(?:[\"']?[ \t]*:[ \t]*[\"']?|[ \t]*[:,\-]?)[ \t]*(?:\r?\n[ \t]*){0,2}"
# "Dr. Ana", "Ms Ito", "Dr. van der Berg"; never across lines ("time=14 ms\n\nThe").
_TITLE_SEP = rb"\.?[ \t]+(?:(?:" + "|".join(sorted(PARTICLES)).encode() + rb")[ \t]+){0,3}"
TEXT_FIELDS = ("prompt", "response")
_FIELD_PATHS = tuple(((name,), name) for name in TEXT_FIELDS)
_COMMENT_PATH, _FEEDBACK_COMMENT_PATH = ("comment",), ("feedback", "comment")
_NAME_WORD = re.compile(r"[^\W\d_]+(?:['’\-.][^\W\d_]*)*")
# Which type wins a tie between overlapping spans of equal score.
_PRIORITY = {"SECRET": 9, "CREDIT_CARD": 8, "IBAN_CODE": 7, "US_SSN": 6, "CRYPTO": 5, "EMAIL_ADDRESS": 4,
             "PHONE_NUMBER": 3, "IP_ADDRESS": 2, "PERSON": 1}


def _end(hit: tuple[int, int, int]) -> int:
    return hit[2]


def _tagged(entities: list[Entity], tier: str) -> list[Entity]:
    # (the constructor, not dataclasses.replace: this runs for every span of every text)
    return [e if e.tier else Entity(e.type, e.start, e.end, e.score, tier) for e in entities]


class CollectionsHeld:
    """Holds the garbage collector off while a text is timed against its budget: a full
    collection that happens to start inside it (about 170 ms in a flow process, more than
    a text's whole budget) is not the text's doing and must not fail it."""

    def __enter__(self) -> None:
        self._was_enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *_exc) -> None:
        if self._was_enabled:
            gc.enable()


@functools.lru_cache(maxsize=4)
def _names_tier(strict: bool, native: bool = False) -> tuple[NameFinder, tuple[GatePattern, ...]]:
    """The names tier and its literal gate patterns, built once per process (~0.5 s);
    native: its token walk in C."""
    if native:
        finder, literals = _names_tier(strict)
        return finder.natively(), literals
    finder = NameFinder(gazetteer_mod.load(), strict=strict)
    forms = {form.encode("utf-8") for name in finder.given for form in (name.capitalize(), name.title())}
    return finder, tuple(GatePattern("given", form, literal=True) for form in sorted(forms) if len(form) >= 3)


class Redactor:
    """Thread-safe after construction (the cache is a plain dict; races only cost a miss)."""

    def __init__(self, settings: RedactionSettings | None = None, native: bool | None = None):
        """native: the C gate-hit handling (True: required, False: the pure-Python path,
        None: C where it was built). Both give the same spans."""
        self.settings = settings = settings or RedactionSettings()
        self.entities = set(settings.entities)
        self.operators = Operators(settings)
        regions = tuple(r.upper() for r in settings.phone_regions)
        extension = native_mod.chosen(native)
        self.detectors: list[Detector] = [d for d in pattern_detectors(regions, settings.ip_ignore_private,
                                                                            settings.score_for("PHONE_NUMBER"),
                                                                            native=extension is not None)
                                          if d.entity in self.entities]
        if "PERSON" in self.entities:
            self.detectors += structure_detectors(gazetteer_mod.load().common)
        self.names: NameFinder | None = None
        patterns: list[GatePattern] = []
        self._kinds: list[tuple[int, Any]] = []
        run_extends = set()
        for index, detector in enumerate(self.detectors):
            for gate in detector.gates:
                if isinstance(gate, RunGate):
                    patterns.append(GatePattern(detector.name, gate.first, detector.caseless))
                    self._kinds.append((_KIND_RUN, (index, re.compile(gate.extend).match)))
                    run_extends.add(gate.extend)
                else:
                    patterns.append(GatePattern(detector.name, gate, detector.caseless))
                    self._kinds.append((_KIND_DETECTOR, index))
        if "PERSON" in self.entities:
            self.names, literals = _names_tier(settings.names_min_context == "strict", extension is not None)
            # Given names as literals (capitalised as in prose); a hit inside a longer word
            # is dropped by the boundary check in _detect_hits.
            for literal in literals:
                patterns.append(literal)
                self._kinds.append((_KIND_WORD, len(literal.pattern)))
            # A cue hit ends on the first letter after the cue; titles and most cues want a
            # capital there, the others any letter (lowercase names).
            for cue in sorted(set(STRONG_CUES) | TITLES):
                escaped = cue.replace("'", "['\u2019]").replace(" ", r"[ \t]+").encode()
                follow = _LETTER if cue in LOWERCASE_CUES else _CAPITAL
                sep = _TITLE_SEP if cue in TITLES else _CUE_SEP
                patterns.append(GatePattern(f"cue:{cue}", rb"\b(?i:" + escaped + rb")\b" + sep + follow, som=False))
                self._kinds.append((_KIND_CUE, cue))
            weak = "|".join(WEAK_CUES).encode()
            patterns.append(GatePattern("weak_cue", rb"\b(?i:" + weak + rb")\b(?:[ \t]+|:[ \t]*)" + _CAPITAL, som=False))
            self._kinds.append((_KIND_WEAK, None))
        self.gate = Gate(patterns, native=native_mod.gate_scanner(extension)) if patterns else None
        self._pads = [(d.pad_before, d.pad_after) for d in self.detectors]
        self._native = self._native_tables(extension, native, run_extends)

        known = set(FAST_ENTITIES) | set(NER_ENTITIES)
        extra = sorted(e for e in self.entities if e not in known)
        self._extra = []
        if extra:
            from redaction.presidio_setup import pattern_recognizers

            self._extra = pattern_recognizers(extra)
        self._extra_entities = extra
        # Where the C half scans the gate and no extra recognizer runs on every text, a text the
        # gate does not hit (most texts) is done after the scan: _redact_one's short path.
        self._scan_first = self._native is not None and bool(self.gate.native_databases) and not extra

        self._ner = None
        self._ner_entities: list[str] = []
        if settings.mode == "thorough":
            from redaction.presidio_setup import analyzer

            self._ner_entities = sorted(e for e in self.entities if e in NER_ENTITIES)
            if self._ner_entities:
                self._ner = analyzer(settings.spacy_model, patterns=False, ner=True)
                # NER needs only tok2vec + ner: the parser, tagger and lemmatizer would more
                # than double the time per text.
                nlp = self._ner.nlp_engine.nlp["en"]
                for pipe in list(nlp.pipe_names):
                    if pipe not in ("tok2vec", "ner"):
                        nlp.disable_pipe(pipe)
                if self.names is None:
                    gaz = gazetteer_mod.load()
                    self._common, self._places = gaz.common, gaz.places
                else:
                    self._common, self._places = self.names.common, self.names.places

        # Oldest first, evicted with popitem: deleting a plain dict's first key each time
        # leaves dummies its next iteration walks past (7 against 1 µs per text when full).
        self._cache: OrderedDict[str, RedactionResult] = OrderedDict()
        self._cache_size = settings.cache_size
        self._budget_s = settings.time_budget_ms / 1000
        self._budget_per_char_s = settings.time_budget_ms_per_kb / 1000 / 1024
        self._ner_budget_per_char_s = settings.ner_time_budget_ms_per_kb / 1000 / 1024
        self._classification = settings.classification
        self._rank = {level: i for i, level in enumerate(LEVELS)}
        self._warm_up()

    def _native_tables(self, extension, wanted: bool | None, run_extends: set[bytes]):
        """The C sink's tables, or None for the Python path. The C sink extends a run gate's
        hit over ASCII digits only: a run gate with any other extension keeps Python."""
        if extension is None or self.gate is None:
            return None
        if not run_extends <= {rb"\d*"}:
            if wanted:
                raise RuntimeError("a run gate extends by other than \\d*: the native sink cannot")
            return None
        kinds = [(kind, payload[0] if kind == _KIND_RUN else payload) for kind, payload in self._kinds]
        return extension.Tables(kinds, self._pads, self.gate.max_hits, self.gate.native_databases)

    def _warm_up(self) -> None:
        # Import the validators' libraries and fill lazy tables now, not inside the first
        # event's time budget.
        sample = ("Dear Ana Lopez, mail ana@example.com or call +1 415 555 2671 / (415) 555-2671; card "
                  "4111 1111 1111 1111, IBAN DE89 3704 0044 0532 0130 00, SSN 123-45-6789, host 8.8.8.8, "
                  "btc 1BoatSLRHtKNngkdXEeobR76b53LBCrubm, password=hunter22 sk-abcdefghijklmnopqrstuvwx")
        self._detect(sample)

    # -- detection -----------------------------------------------------------------------------

    def _budget(self, text: str) -> float:
        return self._budget_s + self._budget_per_char_s * len(text)

    def _too_long(self, text: str) -> RedactionError | None:
        """The error of a text over max_text_chars, None for one within it."""
        if len(text) > self.settings.max_text_chars:
            return RedactionError(f"text of {len(text)} characters is over max_text_chars")
        return None

    def detect(self, text: str) -> list[Entity]:
        """Entities of one text by the fast tiers (no NER), resolved and thresholded."""
        if (error := self._too_long(text)) is not None:
            raise error
        return self._detect(text)

    def _detect(self, text: str) -> list[Entity]:
        found: list[Entity] = []
        if self._native is not None and text:
            found = self._detect_native(text, text.encode("utf-8", "surrogatepass"))
        elif self.gate is not None and text:
            data = text.encode("utf-8", "surrogatepass")
            on_match, tiers, status = self._hit_sink(text, data)
            if self.gate.feed(data, on_match) and status[1]:
                # Hits out of end order (never seen from hyperscan, which reports by end
                # offset; the re fallback does not): collect them all, sort, take them again.
                hits, overflow = self.gate.scan(data)
                if not overflow:
                    hits.sort(key=_end)
                    on_match, tiers, status = self._hit_sink(text, data)
                    for pattern_id, hit_start, hit_end in hits:
                        on_match(pattern_id, hit_start, hit_end, 0, None)
                status[0] = overflow
            if status[0]:
                found = self._detect_everywhere(text)
            elif status[2]:
                found = self._detect_windows(text, data, *tiers)
        for recognizer in self._extra:
            for r in recognizer.analyze(text, self._extra_entities, None):
                found.append(Entity(r.entity_type, r.start, r.end, r.score, f"presidio:{recognizer.name}"))
        return found

    def _detect_native(self, text: str, data: bytes) -> list[Entity]:
        """_detect's gate and window steps with the C sink (the same steps as the Python
        path: see _hit_sink). Where the C half scans the gate itself (built against libhs),
        hyperscan hands each hit to the sink with no Python call."""
        if self.gate.native_databases:
            sink = self._native.scan(text, data)
            return self._found_by_sink(text, data, sink, sink.stopped)
        sink = self._native.sink(text, data)
        return self._found_by_sink(text, data, sink, self.gate.feed(data, sink))

    def _found_by_sink(self, text: str, data: bytes, sink, stopped: bool) -> list[Entity]:
        """The entities of a text from the C sink that took its gate hits (stopped: a hit
        stopped the scan)."""
        if stopped and sink.out_of_order:
            hits, overflow = self.gate.scan(data)
            if overflow:
                return self._detect_everywhere(text)
            hits.sort(key=_end)
            sink = self._native.sink(text, data)
            for pattern_id, hit_start, hit_end in hits:
                sink(pattern_id, hit_start, hit_end, 0, None)
        elif sink.too_many:
            return self._detect_everywhere(text)
        if not sink.any:
            return []
        found = sink.find(self.detectors, _tagged, [])
        self._find_names(text, found, sink.given_words, sink.cue_ends, sink.weak_starts)
        return found

    def _hit_sink(self, text: str, data: bytes):
        """The gate's match callback for one text, and what it fills: the hits are taken as
        hyperscan reports them (by end offset), with no list of hits built and sorted first.
        Each detector hit opens its window [end - pad_before, end + pad_after] or extends
        the detector's last one, so each detector's merged windows build up in one pass;
        name-word, cue and weak-cue hits become the names tier's positions. status:
        [too many hits, a detector hit came before the previous one's end, any hit]."""
        ascii_only = len(data) == len(text)
        if ascii_only:
            def to_char(offset: int) -> int:
                return offset
        else:
            def to_char(offset: int) -> int:
                return len(data[:offset].decode("utf-8", "ignore"))
        kinds = self._kinds
        pads = self._pads
        windows: dict[int, list[list[int]]] = {}
        given_words: list[int] = []
        cue_ends: list[tuple[int, str]] = []
        weak_starts: list[int] = []
        size = len(data)
        limit = self.gate.max_hits
        status = [False, False, False]
        count = 0
        previous = 0

        def on_match(pattern_id: int, _start: int, end: int, _flags: int, _context) -> bool:
            nonlocal count, previous
            count += 1
            if count >= limit:
                status[0] = True
                return True  # stop: the caller runs every detector on the whole text
            kind, payload = kinds[pattern_id]
            if kind == _KIND_WORD:
                start = end - payload
                if start > 0 and (data[start - 1] in _WORD_BYTES):
                    return False  # "Anna" inside "Hanna"
                if end < size and data[end] in _WORD_BYTES:
                    return False  # "Ann" in "Announcement"
                given_words.append(to_char(start))
                status[2] = True
                return False
            if end < previous:
                status[1] = True
                return True
            previous = end
            status[2] = True
            if kind == _KIND_DETECTOR or kind == _KIND_RUN:
                if kind == _KIND_RUN:
                    payload, extend = payload
                    last_end = extend(data, end).end()
                else:
                    last_end = end
                before, after = pads[payload]
                lo, hi = end - before, last_end + after
                mine = windows.get(payload)
                if mine is None:
                    windows[payload] = [[lo, hi]]
                else:
                    last = mine[-1]
                    if lo <= last[1]:
                        if hi > last[1]:
                            last[1] = hi
                    else:
                        mine.append([lo, hi])
            else:
                at = to_char(end - 1 if data[end - 1] < 0x80 else end - 2)
                if kind == _KIND_CUE:
                    cue_ends.append((at, payload))
                else:
                    weak_starts.append(at)
            return False

        return on_match, (windows, given_words, cue_ends, weak_starts, to_char), status

    def _detect_windows(self, text: str, data: bytes, windows: dict[int, list[list[int]]], given_words: list[int],
                        cue_ends: list[tuple[int, str]], weak_starts: list[int], to_char) -> list[Entity]:
        """Each detector's finder on its merged windows (byte offsets), then the names tier."""
        found: list[Entity] = []
        chars = len(text)
        size = len(data)
        detectors = self.detectors
        for index, merged in windows.items():  # in the order of each detector's first hit
            detector = detectors[index]
            finder, name = detector.finder, detector.name
            # (Merged in byte space: a UTF-8 character is at most 4 bytes, so padding by the
            # character count in bytes covers at least as much; converted once per window.)
            for lo, hi in merged:
                spans = finder(text, to_char(max(0, lo)), min(chars, to_char(min(size, hi))))
                if spans:  # (most windows hold nothing)
                    found.extend(_tagged(spans, name))
        self._find_names(text, found, given_words, cue_ends, weak_starts)
        return found

    def _find_names(self, text: str, found: list[Entity], given_words: list[int], cue_ends: list[tuple[int, str]],
                    weak_starts: list[int]) -> None:
        """The names tier on the gate's name-word, cue and weak-cue positions, into found."""
        if self.names is not None and (given_words or cue_ends or weak_starts):
            if len(given_words) > 1:
                given_words = sorted(set(given_words))
            found.extend(_tagged(self.names.find(text, given_words, cue_ends, weak_starts), "names"))

    def _detect_everywhere(self, text: str) -> list[Entity]:
        """Too many gate hits to track one by one: run every detector on the whole text."""
        import re

        found: list[Entity] = []
        for detector in self.detectors:
            found.extend(_tagged(detector.finder(text, 0, len(text)), detector.name))
        if self.names is not None:
            starts = [m.start() for m in re.finditer(r"(?<![^\W\d_])[^\W\d_a-z]", text)]
            cues = []
            for cue in sorted(set(STRONG_CUES) | TITLES):
                sep = _TITLE_SEP if cue in TITLES else _CUE_SEP
                pattern = (r"(?i)\b" + re.escape(cue).replace(r"\ ", r"[ \t]+") + r"\b" + sep.decode()
                           + r"(?=[^\W\d_])")
                cues.extend((m.end(), cue) for m in re.finditer(pattern, text))
            weak = [m.end() for m in re.finditer(r"(?i)\b(?:" + "|".join(WEAK_CUES) + r")(?:[ \t]+|:[ \t]*)(?=[^\W\d_])",
                                                 text)]
            found.extend(_tagged(self.names.find(text, starts, cues, weak), "names"))
        return found

    def _resolve(self, found: list[Entity]) -> list[Entity]:
        settings = self.settings
        if self._native is not None:
            # (the C walk mirrors this one; merges and unusual spans come back None)
            accepted = native_mod.extension.resolve_spans(found, settings.score_for, self.entities, _PRIORITY)
            if accepted is not None:
                return accepted
        kept = [e for e in found if e.end > e.start and e.score >= settings.score_for(e.type)
                and e.type in self.entities]
        if len(kept) <= 1:
            return kept
        # Highest score first, then the longest; a span overlapping a kept one is dropped
        # unless it reaches past it, in which case the uncovered part would leak: merge it.
        kept.sort(key=lambda e: (-e.score, -_PRIORITY.get(e.type, 0), -(e.end - e.start), e.start))
        accepted: list[Entity] = []
        for entity in kept:
            overlapping = [a for a in accepted if entity.start < a.end and a.start < entity.end]
            if not overlapping:
                accepted.append(entity)
                continue
            if all(a.start <= entity.start and entity.end <= a.end for a in overlapping):
                continue
            # Extend the strongest overlapping span to cover this one as well.
            best = overlapping[0]
            for a in overlapping:
                accepted.remove(a)
            start = min([entity.start] + [a.start for a in overlapping])
            end = max([entity.end] + [a.end for a in overlapping])
            accepted.append(Entity(best.type, start, end, best.score,
                                   "+".join(dict.fromkeys([best.tier] + [a.tier for a in overlapping] + [entity.tier]))))
        accepted.sort(key=lambda e: e.start)
        return accepted

    def _apply(self, text: str, entities: list[Entity]) -> str:
        if not entities:
            return text
        parts = []
        pos = 0
        apply = self.operators.apply
        for e in entities:
            parts.append(text[pos:e.start])
            parts.append(apply(e.type, text[e.start:e.end]))
            pos = e.end
        parts.append(text[pos:])
        return "".join(parts)

    # -- public API ----------------------------------------------------------------------------

    def redact(self, text: str) -> RedactionResult:
        """Redact one text. Raises RedactionError when it cannot be done safely in time."""
        with CollectionsHeld():
            return self._redact_held(text)

    def _redact_held(self, text: str) -> RedactionResult:
        """redact() with the garbage collector already held off by the caller."""
        if not isinstance(text, str):
            raise RedactionError(f"expected text, got {type(text).__name__}")
        cached = self._cache.get(text)
        if cached is not None:
            return cached
        if self._ner is not None:
            return self._redact_many([text])[0]
        budget = self._budget(text)
        # The budget is CPU time, but reading the thread's CPU clock is a system call
        # (~0.8 µs, twice per text): time by the wall clock, which never runs slower
        # than the thread's CPU time, and measure the CPU time only when the wall clock
        # says the budget may have been exceeded, on a second pass.
        started = time.perf_counter()
        result = self._redact_one(text)
        elapsed = time.perf_counter() - started
        if elapsed > budget:
            started = time.thread_time()
            result = self._redact_one(text)
            elapsed = time.thread_time() - started
        if elapsed > budget:
            raise RedactionError(f"redaction exceeded its time budget ({len(text)} characters)")
        self._remember(text, result)
        return result

    def _redact_one(self, text: str) -> RedactionResult:
        try:
            if not self._scan_first or not text:
                entities = self._resolve(self.detect(text))
            elif (error := self._too_long(text)) is not None:
                raise error
            else:
                data = text.encode("utf-8", "surrogatepass")
                sink = self._native.scan(text, data)
                if not sink.any and not sink.stopped:  # (no gate hit: nothing to find, resolve or replace)
                    return RedactionResult(text)
                entities = self._resolve(self._found_by_sink(text, data, sink, sink.stopped))
            return RedactionResult(self._apply(text, entities), entities)
        except RedactionError:
            raise
        except Exception as exc:  # fail closed, without echoing anything of the text
            raise RedactionError(f"redaction failed: {type(exc).__name__}") from None

    def _remember(self, text: str, result: RedactionResult) -> None:
        if self._cache_size <= 0:
            return
        if len(self._cache) >= self._cache_size:
            try:
                self._cache.popitem(last=False)
            except KeyError:  # emptied by another thread meanwhile
                pass
        self._cache[text] = result

    def _redact_many(self, texts: list[str]) -> list[RedactionResult | RedactionError]:
        """Thorough mode: fast tiers per text + spaCy NER over the whole batch (nlp.pipe)."""
        out: list[RedactionResult | RedactionError | None] = [None] * len(texts)
        todo: list[int] = []
        for i, text in enumerate(texts):
            cached = self._cache.get(text)
            if cached is not None:
                out[i] = cached
            elif (error := self._too_long(text)) is not None:
                out[i] = error
            else:
                todo.append(i)
        if not todo:
            return out  # type: ignore[return-value]
        with CollectionsHeld():
            started = time.thread_time()
            try:
                batch = [texts[i] for i in todo]
                ner_found = self._ner_batch(batch)
            except Exception as exc:
                error = RedactionError(f"NER failed: {type(exc).__name__}")
                for i in todo:
                    out[i] = error
                return out  # type: ignore[return-value]
            elapsed = time.thread_time() - started
        budget_total = sum(self._budget(texts[i]) + self._ner_budget_per_char_s * len(texts[i]) for i in todo)
        for i, ner_entities in zip(todo, ner_found):
            text = texts[i]
            try:
                entities = self._resolve(self.detect(text) + ner_entities)
                result = RedactionResult(self._apply(text, entities), entities)
            except RedactionError as exc:
                out[i] = exc
                continue
            except Exception as exc:
                out[i] = RedactionError(f"redaction failed: {type(exc).__name__}")
                continue
            if elapsed > budget_total:
                out[i] = RedactionError("redaction exceeded its time budget (NER batch)")
                continue
            self._remember(text, result)
            out[i] = result
        return out  # type: ignore[return-value]

    def _ner_batch(self, texts: list[str]) -> list[list[Entity]]:
        if self._ner is None:
            return [[] for _ in texts]
        analyzer = self._ner
        artifacts = analyzer.nlp_engine.process_batch(texts, "en", batch_size=self.settings.ner_batch_size)
        found = []
        threshold = self.settings.ner_min_score
        for text, nlp_artifacts in artifacts:
            results = analyzer.analyze(text, language="en", entities=self._ner_entities, nlp_artifacts=nlp_artifacts,
                                       score_threshold=threshold)
            found.append([Entity(r.entity_type, r.start, r.end, r.score, "ner") for r in results
                          if r.entity_type != "PERSON" or self._plausible_person(text[r.start:r.end])])
        return found

    def _plausible_person(self, span: str) -> bool:
        """spaCy sm tags many capitalised phrases PERSON ("Pull Request", "Paris"); keep a
        span only if some word of it is neither an English word nor a place."""
        words = [w.strip(".,'’\"") for w in span.split()]
        if not words or len(words) > 5 or not all(_NAME_WORD.fullmatch(w) for w in words):
            return False
        if " ".join(words).lower() in self._places:
            return False
        return any(w and w.lower() not in self._common and w.lower() not in self._places for w in words)

    def redact_texts(self, texts: list[str]) -> list[RedactionResult | RedactionError]:
        """Batch form of redact(): errors are returned in place, never raised."""
        if self._ner is not None:
            bad = {i for i, t in enumerate(texts) if not isinstance(t, str)}
            good = [t for i, t in enumerate(texts) if i not in bad]
            results = iter(self._redact_many(good))
            return [RedactionError("expected text") if i in bad else next(results) for i in range(len(texts))]
        out: list[RedactionResult | RedactionError] = []
        # One hold for the whole batch: every text's garbage but reference cycles is freed as
        # it goes, and toggling the collector per text costs more than its collections.
        with CollectionsHeld():
            for text in texts:
                try:
                    out.append(self._redact_held(text))
                except RedactionError as exc:
                    out.append(exc)
        return out

    # -- events --------------------------------------------------------------------------------

    def classify(self, counts: dict[str, int], has_text: bool) -> str:
        policy = self._classification
        if not counts:
            return policy.no_text if not has_text else policy.no_pii
        rank = self._rank
        level = max((policy.levels.get(t, policy.default_pii) for t in counts), key=rank.__getitem__)
        if policy.restricted_at_types is not None and len(counts) >= policy.restricted_at_types:
            level = "restricted"
        return level

    @staticmethod
    def _text_slots(event: dict) -> list[tuple[tuple[str, ...], str]]:
        get = event.get
        slots = [(path, value) for path, name in _FIELD_PATHS if (value := get(name)) is not None]
        comment = get("comment")
        if comment is not None:
            slots.append((_COMMENT_PATH, comment))
        feedback = get("feedback")
        if isinstance(feedback, dict) and feedback.get("comment") is not None:
            slots.append((_FEEDBACK_COMMENT_PATH, feedback["comment"]))
        return slots

    def _finish_event(self, event: dict, slots, results) -> dict:
        new = dict(event)
        counts: dict[str, int] = {}
        has_text = False
        for (path, original), result in zip(slots, results):
            if original:
                has_text = True
            if len(path) == 1:
                new[path[0]] = result.text
            else:
                new[path[0]] = {**new[path[0]], path[1]: result.text}
            for entity in result.entities:
                counts[entity.type] = counts.get(entity.type, 0) + 1
        flags = list(event.get("policy_flags") or ())
        if counts:
            wanted = ["pii_redacted"] + [f"pii:{t}" for t in sorted(counts)]
            flags.extend(f for f in wanted if f not in flags)
            level = self.classify(counts, has_text)
        else:  # (classify's answer without entities, without the call: most events)
            level = self._classification.no_pii if has_text else self._classification.no_text
        new["policy_flags"] = flags
        new["classification"] = level
        new["pii_entity_counts"] = counts
        return new

    def redact_event(self, event: dict) -> dict:
        """A new event with prompt, response and feedback comment redacted, policy flags,
        classification and entity counts added. Raises RedactionError (fail closed)."""
        result = self.redact_events([event])[0]
        if isinstance(result, RedactionError):
            raise result
        return result

    def redact_events(self, events: list[dict]) -> list[dict | RedactionError]:
        """Batch form: one redacted event or one RedactionError per input, in order."""
        slots_per_event: list[list | RedactionError] = []
        texts: list[str] = []
        for event in events:
            if not isinstance(event, dict):
                slots_per_event.append(RedactionError("event is not a mapping"))
                continue
            try:
                slots = self._text_slots(event)
            except Exception as exc:
                slots_per_event.append(RedactionError(f"unreadable event: {type(exc).__name__}"))
                continue
            for _path, value in slots:
                if not isinstance(value, str):
                    wrong = [".".join(path) for path, value in slots if not isinstance(value, str)]
                    slots_per_event.append(RedactionError(f"{', '.join(wrong)} is not text"))
                    break
            else:
                slots_per_event.append(slots)
                for _path, value in slots:
                    texts.append(value)
        results = self.redact_texts(texts) if texts else []
        out: list[dict | RedactionError] = []
        pos = 0
        for event, slots in zip(events, slots_per_event):
            if isinstance(slots, RedactionError):
                out.append(slots)
                continue
            mine = results[pos:pos + len(slots)]
            pos += len(slots)
            for result in mine:
                if isinstance(result, RedactionError):
                    out.append(RedactionError(result.reason))
                    break
            else:
                try:
                    out.append(self._finish_event(event, slots, mine))
                except Exception as exc:
                    out.append(RedactionError(f"redaction failed: {type(exc).__name__}"))
        return out
