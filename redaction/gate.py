"""The compiled gate: one hyperscan database that finds every place worth a closer look.

Scanning ~1.5 KB costs ~10-20 µs whatever the number of patterns; the precise (Python)
detectors then run only on windows around the hits. The databases are compiled by libhs
through the C half (`redaction._native`, where it was built against libhs: it then scans
them itself, with no Python call per hit) or by the `hyperscan` package. Without either (an
unsupported platform) the same patterns run through Python's `re`, much slower but equally
correct.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass

try:  # pragma: no cover - exercised by the import itself
    import hyperscan
except ImportError:  # pragma: no cover
    hyperscan = None


@dataclass(frozen=True)
class GatePattern:
    key: str  # what the engine does with a hit (detector name, "name_word", "cue:<phrase>")
    pattern: bytes
    caseless: bool = False
    som: bool = False
    """Report where the match starts (hyperscan's start-of-match tracking costs about twice
    the scan time, so only patterns whose users need the start turn it on)."""
    literal: bool = False
    """A plain string, compiled by hyperscan's literal compiler (tens of thousands are cheap)."""


# hs_compile.h's values (the same in the hyperscan package), for a build without that package.
_SOM_LEFTMOST, _CASELESS = 256, 1
_WORDISH = re.compile(rb"[A-Za-z\x80-\xff][A-Za-z\x80-\xff'\-]*")
_COMPILED: dict[str, object] = {}
_KEYS: dict[tuple, str] = {}  # big literal sets (the same tuple object each time): digest once
_LOCK = threading.Lock()


def _cache_dir() -> str | None:
    # (not a GATEWATCH_* variable: those are settings, and the settings model forbids extras)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gatewatch") if base else None


class _Binding:
    """Compiles and stores databases through the hyperscan package."""

    version = getattr(hyperscan, "__version__", "")

    @staticmethod
    def compile(expressions: list[bytes], flags: list[int], ids: list[int], literal: bool):
        db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        db.compile(expressions=expressions, ids=ids, elements=len(expressions), flags=flags, literal=literal)
        return db

    @staticmethod
    def load(data: bytes):
        return hyperscan.loadb(data, mode=hyperscan.HS_MODE_BLOCK)

    @staticmethod
    def dump(db) -> bytes:
        return hyperscan.dumpb(db)


class _Libhs:
    """Compiles and stores databases through the C half, linked against libhs."""

    def __init__(self, extension):
        self.extension = extension
        self.version = f"libhs {extension.HYPERSCAN_VERSION}"

    def compile(self, expressions: list[bytes], flags: list[int], ids: list[int], literal: bool):
        return self.extension.compile_database(expressions, flags, ids, literal)

    def load(self, data: bytes):
        return self.extension.load_database(data)

    @staticmethod
    def dump(db) -> bytes:
        return db.serialize()


def _compiled(patterns: tuple[GatePattern, ...], ids: tuple[int, ...], literal: bool, backend=_Binding):
    """A hyperscan database, compiled once per process and kept on disk between processes
    (the literal database of given names takes ~3 s to compile, ~50 ms to load)."""
    memo = (id(patterns[0]), len(patterns), ids[0], literal, backend.version) if literal else None
    key = _KEYS.get(memo) if memo else None
    if key is None:
        digest = hashlib.sha256(repr((backend.version, literal, ids,
                                      [(p.pattern, p.caseless, p.som) for p in patterns])).encode())
        key = digest.hexdigest()[:32]
        if memo:
            _KEYS[memo] = key
    with _LOCK:
        db = _COMPILED.get(key)
        if db is not None:
            return db
        directory = _cache_dir()
        path = os.path.join(directory, f"gate-{key}.hsdb") if directory else None
        if path and os.path.exists(path):
            try:
                with open(path, "rb") as handle:
                    db = backend.load(handle.read())
            except Exception:  # a database of another platform or version: compile again
                db = None
        if db is None:
            flags = [(_SOM_LEFTMOST if p.som else 0) | (_CASELESS if p.caseless else 0) for p in patterns]
            db = backend.compile([p.pattern for p in patterns], flags, list(ids), literal)
            if path:
                try:
                    os.makedirs(directory, exist_ok=True)
                    tmp = f"{path}.{os.getpid()}.tmp"
                    with open(tmp, "wb") as handle:
                        handle.write(backend.dump(db))
                    os.replace(tmp, path)
                except OSError:
                    pass
        _COMPILED[key] = db
        return db


class Gate:
    """Scan bytes, return (pattern_index, start, end) for every hit; offsets are byte
    offsets; start equals end for patterns compiled without start-of-match."""

    def __init__(self, patterns: list[GatePattern], max_hits: int = 20000, native=None):
        """native: the C half, to compile with and scan through libhs (only where it was
        built against libhs: `HYPERSCAN_VERSION` set); None: the hyperscan package."""
        self.patterns = patterns
        self.keys = [p.key for p in patterns]
        self.max_hits = max_hits
        self._local = threading.local()
        self._dbs = []
        self._regexes = None
        self.native_databases: tuple = ()
        """The databases the C half scans (regexes, then literals), when native."""
        self._native_scanner = None
        if native is not None:
            backend = _Libhs(native)
            self.native_databases = tuple(_compiled(tuple(patterns[i] for i in chosen), tuple(chosen), literal, backend)
                                          for literal, chosen in self._split())
            self._native_scanner = native.Tables((), (), max_hits, self.native_databases)
        elif hyperscan is not None:
            for literal, chosen in self._split():
                self._dbs.append((_compiled(tuple(patterns[i] for i in chosen), tuple(chosen), literal), literal))
        else:  # pragma: no cover - slow path for platforms without hyperscan
            self._regexes = [(i, re.compile(p.pattern, re.IGNORECASE if p.caseless else 0))
                             for i, p in enumerate(patterns) if not p.literal]
            self._literals = {p.pattern: i for i, p in enumerate(patterns) if p.literal}

    def _split(self) -> list[tuple[bool, list[int]]]:
        """(literal, pattern indexes) of each database: the regexes first, then the literals."""
        split = []
        for literal in (False, True):
            chosen = [i for i, p in enumerate(self.patterns) if p.literal == literal]
            if chosen:
                split.append((literal, chosen))
        return split

    def _prepared(self) -> list:
        """(database, scratch) pairs of this thread: hyperscan scratch space is per thread
        (Bytewax may run several worker threads)."""
        try:
            return self._local.prepared
        except AttributeError:
            prepared = self._local.prepared = [(db, hyperscan.Scratch(db)) for db, _literal in self._dbs]
            return prepared

    def feed(self, data: bytes, on_match) -> bool:
        """Call on_match(pattern_index, start, end, flags, context) for every hit, database
        by database as hyperscan reports them (in end order within each); True if on_match
        stopped the scan by returning True."""
        if self._native_scanner is not None:
            # (the C half collects up to max_hits hits, then they are handed on)
            hits, _stopped = self._native_scanner.gate_hits(data)
            return any(on_match(pattern_id, start, end, 0, None) for pattern_id, start, end in hits)
        if self._regexes is None:
            for db, scratch in self._prepared():
                try:
                    # (positional: the binding parses keyword arguments slowly, ~2 µs a call)
                    db.scan(data, on_match, 0, None, scratch)
                except hyperscan.ScanTerminated:
                    return True
            return False
        for index, regex in self._regexes:  # pragma: no cover
            for m in regex.finditer(data):
                if on_match(index, m.start(), m.end(), 0, None):
                    return True
        if self._literals:  # pragma: no cover - whole words only
            for m in _WORDISH.finditer(data):
                index = self._literals.get(m.group())
                if index is not None and on_match(index, m.start(), m.end(), 0, None):
                    return True
        return False

    def scan(self, data: bytes) -> tuple[list[tuple[int, int, int]], bool]:
        """Hits, and whether the scan stopped early because there were more than max_hits
        (the caller then treats every detector as hit on the whole text)."""
        if self._native_scanner is not None:
            return self._native_scanner.gate_hits(data)
        hits: list[tuple[int, int, int]] = []
        limit = self.max_hits
        append = hits.append

        def on_match(pattern_id, start, end, _flags, _context):
            append((pattern_id, start, end))
            return len(hits) >= limit  # True stops the scan

        return hits, self.feed(data, on_match)
