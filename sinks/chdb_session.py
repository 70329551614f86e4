"""The process's embedded ClickHouse (chdb), without pyarrow: sinks.clickhouse uses it in a
flow process, and the chdb host (ops/chdb_host.py) in a process that must stay as small as
chdb itself allows (it never maps pyarrow).

Since chdb 4.0 a process hosts one engine, bound to one data path, and any number of handles
(chdb.session.Session) open on it at once; statements on different handles run in parallel,
while one handle takes one statement at a time (a streaming insert open on it refuses the
next: "Cannot run a query while a streaming insert is active on this connection"). So each
thread gets its own handle: a thread's statements follow one another, and the threads of a
process (Bytewax workers, `-w N`; the host's connections) never wait for each other's."""

from __future__ import annotations

import threading
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlparse

_handles: dict[int, object] = {}
"""The open path's handles, by thread id."""
_open_path: str | None = None
_open_url = ""
"""path?settings of the first handle: the engine's, which later handles open again."""
_handles_lock = threading.Lock()
"""Held while a handle opens or closes, and while the path changes."""

migration_lock = threading.RLock()
"""Held around a migration of a chdb database in this process: every worker of a process
migrates its databases when it starts (nobody else can reach them), and the second one then
finds every migration recorded instead of creating the same tables again. Statements of other
threads go on meanwhile, as on a server."""

insert_turn = threading.Lock()
"""Held by the insert that runs on the process's chdb: each insert's block sets chdb's memory
peak (~290 MB of transient heap for a 20,000-row block, ops/bench/FINDINGS.md), so the inserts
of a process's workers (`-w N`), and of a chdb host's connections, take turns; queries run
beside them."""

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
    """The calling thread's handle on the chdb database at path, opened on first use. The
    first handle's server settings are the engine's. chdb opens one path per process: asking
    for another closes every handle of the previous one (only tests and CLI tools switch
    paths). chdb is imported here, not at module level: a flow writing to a ClickHouse server
    never maps chdb's ~230 MB library."""
    from chdb import session

    global _open_path, _open_url
    thread = threading.get_ident()
    with _handles_lock:
        if path != _open_path:
            _close_all()
            Path(path).mkdir(parents=True, exist_ok=True)
            query = urlencode(sorted((server_settings or {}).items()))
            _open_path, _open_url = path, f"{path}?{query}" if query else path
        if thread not in _handles:
            _handles[thread] = session.Session(_open_url)
        return _handles[thread]


def close_thread_chdb() -> None:
    """Close the calling thread's handle, if it has one (a thread that ends: a host's
    connection); the engine stays open while other handles are."""
    with _handles_lock:
        handle = _handles.pop(threading.get_ident(), None)
        if handle is not None:
            handle.close()


def close_chdb() -> None:
    with _handles_lock:
        _close_all()


def _close_all() -> None:
    global _open_path
    for handle in _handles.values():
        handle.close()
    _handles.clear()
    _open_path = None
