"""One embedded ClickHouse (chdb) per machine, shared by every flow process on it: the wire
protocol and the client side (the host itself is ops/chdb_host.py).

Each flow process that embeds chdb maps its ~224 MB of library code and keeps its own heap
(ops/bench/FINDINGS.md, issue 17); a host process owns the one chdb engine of a database
directory instead, and flow processes reach it over a Unix domain socket with the URL

    chdb+unix:///path/to/host.sock

(sinks.clickhouse.ClickHouse picks HostSession for it). Statements are chdb's, as with
chdb://: Arrow IPC bytes in and out, migrations run by the writers through the host. Each
thread of a flow process has its own connection, and the host its own chdb handle per
connection: the statements of different threads and processes run in parallel.

Frames are a 4-byte big-endian length and a body. A request body is one op byte, a 4-byte
SQL length, the SQL (UTF-8) and the payload (ArrowStream bytes of an insert); a reply body
is one status byte (0: ok, 1: the statement failed) and the result bytes or the error text.
This module imports neither pyarrow nor chdb: the host passes the bytes straight through.
"""

from __future__ import annotations

import socket
import struct
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlparse

HOST_SCHEME = "chdb+unix"

OP_EXECUTE = 1
"""A statement whose result the caller does not read."""
OP_QUERY = 2
"""A statement whose result comes back in the format named in the payload (Arrow)."""
OP_INSERT = 3
"""An INSERT whose rows are the payload, in ArrowStream format."""
OP_LOCK = 4
"""Begin this connection's exclusive block: no other connection's begins until OP_UNLOCK or
until this one closes. Other statements go on (migrations exclude each other only)."""
OP_UNLOCK = 5
OP_PING = 6
OP_NAMES = {OP_EXECUTE: "execute", OP_QUERY: "query", OP_INSERT: "insert", OP_LOCK: "lock",
            OP_UNLOCK: "unlock", OP_PING: "ping"}

STATUS_OK = 0
STATUS_ERROR = 1

_LENGTH = struct.Struct(">I")
_OP_SQL = struct.Struct(">BI")
MAX_FRAME = 2**32 - 1

CONNECT_TIMEOUT_S = 30.0
"""How long a client waits to connect. A reply has no deadline: the host finishes a statement
even when its client gave up, so a retry after a timeout would queue behind the abandoned
statement and time out in turn (an aggregate refresh over a large history can run for
minutes); a host that dies closes the socket, which ends the wait at once (HostGone)."""


class HostGone(ConnectionError):
    """The host cannot be reached or closed the connection: an outage, retried like a
    ClickHouse server's (sinks.retry); the next call connects again."""


class HostStatementError(RuntimeError):
    """chdb refused the statement inside the host: the same error chdb raises in-process."""


def host_socket(url: str) -> str:
    """The socket path of a chdb+unix:///PATH URL."""
    parsed = urlparse(url)
    if parsed.scheme != HOST_SCHEME or parsed.netloc:
        raise ValueError(f"expected {HOST_SCHEME}:///absolute/path/to/host.sock, got {url!r}")
    return unquote(parsed.path)


def host_url(socket_path: str | Path) -> str:
    return f"{HOST_SCHEME}://{Path(socket_path).resolve()}"


def recv_exactly(sock: socket.socket, size: int) -> bytearray | None:
    """size bytes from sock, or None when the peer closed before the first byte."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return None
            raise ConnectionError(f"connection closed after {got} of {size} bytes")
        got += n
    return buffer


def recv_frame(sock: socket.socket) -> bytearray | None:
    """One frame's body, or None at a clean end of the connection."""
    header = recv_exactly(sock, _LENGTH.size)
    if header is None:
        return None
    (length,) = _LENGTH.unpack(header)
    body = recv_exactly(sock, length) if length else bytearray()
    if body is None:
        raise ConnectionError("connection closed inside a frame")
    return body


def send_frame(sock: socket.socket, *parts: bytes, size: int | None = None) -> None:
    """A frame of parts; with size, only its start: the frame's size bytes begin with the
    parts, and the caller sends the rest."""
    length = sum(len(part) for part in parts) if size is None else size
    if length > MAX_FRAME:
        raise ValueError(f"a frame of {length:,} bytes is over the protocol's {MAX_FRAME:,}")
    # sendall, not one sendmsg: a stream socket may take part of a large frame per call.
    *head, last = parts
    sock.sendall(b"".join([_LENGTH.pack(length), *head]))
    if last:
        sock.sendall(last)


def encode_request(op: int, sql: str = "") -> bytes:
    """A request's start: its op, SQL length and SQL; the payload follows."""
    encoded = sql.encode()
    return _OP_SQL.pack(op, len(encoded)) + encoded


class MalformedRequest(ValueError):
    pass


class Payload:
    """A request's payload, still in the socket: read whole, or in chunks of one reused
    buffer. An insert's payload is the size of its batch (~25 MB at 6,000 events); passed
    on in 64 KB pieces it is never held whole, and no fresh pages are touched per insert."""

    CHUNK = 65536

    def __init__(self, sock: socket.socket, size: int):
        self.sock = sock
        self.size = size
        self.left = size

    def read(self) -> bytes:
        whole = recv_exactly(self.sock, self.left) if self.left else bytearray()
        if whole is None:
            raise ConnectionError("connection closed inside a frame")
        self.left = 0
        return bytes(whole)

    def chunks(self):
        """The payload in pieces, each valid until the next is read."""
        buffer = memoryview(bytearray(min(self.left, self.CHUNK)))
        while self.left:
            n = self.sock.recv_into(buffer[:min(self.left, len(buffer))])
            if n == 0:
                raise ConnectionError(f"connection closed with {self.left} bytes of a frame unread")
            self.left -= n
            yield buffer[:n]

    def skip_rest(self) -> None:
        """Read what a failed statement left unread, so the next request starts in step."""
        for _chunk in self.chunks():
            pass


def recv_request(sock: socket.socket) -> tuple[int, str, Payload] | None:
    """(op, sql, payload) of the next request, or None at a clean end of the connection. A
    malformed request is read to its end before MalformedRequest: closing a socket with
    bytes unread resets it, and the client would never see the end of its connection."""
    header = recv_exactly(sock, _LENGTH.size)
    if header is None:
        return None
    (length,) = _LENGTH.unpack(header)
    if length < _OP_SQL.size:
        Payload(sock, length).skip_rest()
        raise MalformedRequest(f"a request of {length} bytes has no op and SQL length")
    op, sql_length = _OP_SQL.unpack(Payload(sock, _OP_SQL.size).read())
    payload_size = length - _OP_SQL.size - sql_length
    if payload_size < 0:
        Payload(sock, length - _OP_SQL.size).skip_rest()
        raise MalformedRequest(f"an SQL of {sql_length} bytes in a request of {length}")
    payload = Payload(sock, payload_size)
    try:
        return op, Payload(sock, sql_length).read().decode(), payload
    except UnicodeDecodeError as exc:
        payload.skip_rest()
        raise MalformedRequest("the SQL is not UTF-8") from exc


class Result:
    """What chdb's session.query returns, as far as sinks.clickhouse reads it."""

    def __init__(self, data: bytes):
        self._data = data

    def bytes(self) -> bytes:
        return self._data


class HostSession:
    """The client side of one connection to a chdb host: chdb session's query, and an insert
    that takes its payload's size first. One request in flight at a time (host_session gives
    each thread its own). A broken connection raises HostGone and is opened again on the next call."""

    def __init__(self, socket_path: str, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 reply_timeout_s: float | None = None):
        self.socket_path = socket_path
        self.connect_timeout_s = connect_timeout_s
        self.reply_timeout_s = reply_timeout_s
        """None for the flows (CONNECT_TIMEOUT_S says why); a probe's ping sets one."""
        self.lock = threading.RLock()
        self._sock: socket.socket | None = None
        self._locked_by: socket.socket | None = None
        """The connection that began the exclusive block, while one runs."""

    def _connected(self) -> socket.socket:
        if self._sock is None:
            if self._locked_by is not None:
                # A new connection would run the rest of the block outside it.
                raise HostGone(f"chdb host at {self.socket_path}: the connection holding its lock was lost")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.connect_timeout_s)
            try:
                sock.connect(self.socket_path)
            except OSError as exc:
                sock.close()
                raise HostGone(f"chdb host at {self.socket_path} is not reachable: {exc}") from exc
            sock.settimeout(self.reply_timeout_s)
            self._sock = sock
        return self._sock

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def request(self, op: int, sql: str = "", payload: bytes = b"") -> bytes:
        """Send one request and return the result bytes; HostStatementError when chdb
        refused it, HostGone when the host is unreachable or went away before answering."""
        return self._exchange(op, sql, len(payload), lambda send: send(payload) if payload else None)

    def insert(self, sql: str, size: int, write_payload: Callable[[Callable[[memoryview], None]], None]) -> None:
        """An OP_INSERT whose payload of size bytes write_payload passes to the send it is given,
        in pieces: each goes to the socket as it comes, and the payload is never held whole."""
        self._exchange(OP_INSERT, sql, size, write_payload)

    def _exchange(self, op: int, sql: str, size: int, write_payload: Callable[[Callable], None]) -> bytes:
        with self.lock:
            sock = self._connected()
            sent = 0

            def send(piece) -> None:
                nonlocal sent
                sent += memoryview(piece).nbytes
                if sent > size:
                    raise ValueError(f"a payload past its announced {size:,} bytes")
                sock.sendall(piece)

            try:
                head = encode_request(op, sql)
                send_frame(sock, head, size=len(head) + size)
                write_payload(send)
                if sent != size:
                    raise ValueError(f"a payload of {sent:,} bytes announced as {size:,}")
                reply = recv_frame(sock)
            except OSError as exc:
                self._drop()
                raise HostGone(f"chdb host at {self.socket_path} went away during {OP_NAMES[op]}: {exc}") from exc
            except BaseException:
                # Interrupted between request and reply (a flow stopped by a signal), or a payload
                # cut short: the connection is out of step, and the host cancels an insert whose
                # frame ends early. A reply would otherwise answer the connection's next request.
                self._drop()
                raise
            if reply is None:
                self._drop()
                raise HostGone(f"chdb host at {self.socket_path} closed the connection during {OP_NAMES[op]}")
            if reply[0] != STATUS_OK:
                raise HostStatementError(bytes(reply[1:]).decode(errors="replace"))
            return bytes(memoryview(reply)[1:])

    def query(self, sql: str, fmt: str | None = None) -> Result:
        if fmt is None:
            self.request(OP_EXECUTE, sql)
            return Result(b"")
        return Result(self.request(OP_QUERY, sql, fmt.encode()))

    def ping(self) -> None:
        self.request(OP_PING)

    @contextmanager
    def exclusive(self):
        """The block alone among the host's exclusive blocks (a migration: two flow processes
        starting together would otherwise both apply it)."""
        with self.lock:
            self.request(OP_LOCK)
            self._locked_by = self._sock
            try:
                yield
            finally:
                held, self._locked_by = self._locked_by is self._sock, None
                if held:
                    try:
                        self.request(OP_UNLOCK)
                    except HostGone:
                        pass  # the host released the lock when the connection closed

    def close(self) -> None:
        with self.lock:
            self._drop()


_sessions: dict[tuple[str, int], HostSession] = {}
_sessions_lock = threading.Lock()


def host_session(socket_path: str) -> HostSession:
    """The calling thread's connection to the host at socket_path: a thread's requests follow
    one another, and no thread waits for another's reply."""
    key = (socket_path, threading.get_ident())
    with _sessions_lock:
        if key not in _sessions:
            _sessions[key] = HostSession(socket_path)
        return _sessions[key]
