"""The process's one embedded ClickHouse (chdb) session, without pyarrow: sinks.clickhouse
uses it in a flow process, and the chdb host (ops/chdb_host.py) in a process that must stay
as small as chdb itself allows (it never maps pyarrow)."""

from __future__ import annotations

import threading
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlparse

_chdb_sessions: dict[str, object] = {}
_chdb_lock = threading.RLock()
"""Held around every use of the process's chdb session, not only its opening: every Bytewax
worker of a process (threads, `-w N`) and every sink in it share that one session, and chdb
refuses a second statement while one runs on it ("Cannot run a query while a streaming insert
is active on this connection"). Reentrant: a migration or an insert queries the session again
inside. chdb releases the GIL while a statement runs, so a waiting worker's Python work goes on."""

CHDB_SESSION_SETTINGS: dict[str, str] = {}
"""Server settings of every embedded session unless its URL says otherwise. Empty: chdb's
own defaults (ops/bench/FINDINGS.md measured the caches and pools against them)."""

def chdb_location(url: str) -> tuple[str, dict[str, str]]:
    """(the absolute directory, the server settings) of a chdb://PATH[?name=value&...] URL.
    The settings are ClickHouse server settings (system.server_settings: mark_cache_size,
    max_server_memory_usage, background_pool_size, ...) that chdb applies when its session
    opens; the URL's own values override CHDB_SESSION_SETTINGS."""
    parsed = urlparse(url)
    if parsed.scheme != "chdb":
        raise ValueError(f"not a chdb:// URL: {url!r}")
    path = unquote(url[len("chdb://"):].split("?", 1)[0])
    return str(Path(path).resolve()), {**CHDB_SESSION_SETTINGS, **dict(parse_qsl(parsed.query))}


def chdb_session(path: str, server_settings: dict[str, str] | None = None):
    """chdb allows one session per process: every caller of a path shares it, and asking
    for another path closes the previous one (only tests and CLI tools switch paths). The
    first caller's server settings are the session's. chdb is imported here, not at module
    level: a flow writing to a ClickHouse server never maps chdb's ~230 MB library."""
    from chdb import session

    with _chdb_lock:
        if path not in _chdb_sessions:
            for old in _chdb_sessions.values():
                old.close()
            _chdb_sessions.clear()
            Path(path).mkdir(parents=True, exist_ok=True)
            query = urlencode(sorted((server_settings or {}).items()))
            _chdb_sessions[path] = session.Session(f"{path}?{query}" if query else path)
        return _chdb_sessions[path]


def close_chdb() -> None:
    with _chdb_lock:
        for sess in _chdb_sessions.values():
            sess.close()
        _chdb_sessions.clear()
