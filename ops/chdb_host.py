"""The chdb host: one process that owns a chdb database directory and runs the statements of
every flow process on the machine, which reach it at chdb+unix:///path/to/host.sock
(protocol and client: sinks.chdb_host).

Why: each flow process embedding chdb carried its ~224 MB of library code and its own heap,
and a Bytewax cluster could not write chdb at all (one database lives in one process). With
the host, chdb's code and heap are resident once per machine, and every process of a
cluster on that machine writes the same database.

Started by `gatewatch chdb-host --url chdb://DIR --socket PATH [--metrics-port N]`, which
runs this module in a fresh interpreter: the host imports chdb, prometheus_client and the
standard library, never pyarrow (Arrow IPC bytes pass through untouched), so its resident
set is chdb's code and heap and a bare interpreter. One thread and one chdb handle per
connection: the statements of different connections run in parallel, except inserts, which
take turns (sinks.chdb_session.insert_turn says why). Prometheus metrics on --metrics-port;
JSON logs on stderr, one request_id per request.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from ops.allocators import HOST_ALLOCATOR_ENV, malloc_report
from ops.logs import configure as configure_logs
from sinks.chdb_host import (OP_EXECUTE, OP_INSERT, OP_LOCK, OP_NAMES, OP_PING, OP_QUERY, OP_UNLOCK, STATUS_ERROR,
                             STATUS_OK, HostGone, HostSession, MalformedRequest, Payload, host_url, recv_request,
                             send_frame)
from sinks.chdb_session import chdb_location, chdb_session, close_chdb, close_thread_chdb, insert_turn

log = logging.getLogger("ops.chdb_host")

STATEMENTS = Counter("gatewatch_chdb_host_statements", "Requests the chdb host answered, by op", ["op"])
ERRORS = Counter("gatewatch_chdb_host_errors", "Requests chdb refused, by op", ["op"])
SECONDS = Histogram("gatewatch_chdb_host_statement_seconds",
                    "Seconds per request, by op; an insert's wait for its turn and a lock's wait included",
                    ["op"], buckets=(0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120))
BYTES = Counter("gatewatch_chdb_host_bytes", "Payload bytes received (in) and sent back (out)", ["direction"])
CONNECTIONS = Gauge("gatewatch_chdb_host_connections", "Open client connections")

_ERROR_CODE = re.compile(r"Code: (\d+)")
_ERROR_NAME = re.compile(r"\(([A-Z_]+)\)\s*(?:\(version [^)]*\))?\s*$")


def error_summary(text: str) -> dict[str, str | None]:
    """The ClickHouse error code and name of an error, for the log: the message itself may
    quote the statement, whose literals are the caller's data."""
    code, name = _ERROR_CODE.search(text), _ERROR_NAME.search(text.strip())
    return {"error_code": code.group(1) if code else None, "error_name": name.group(1) if name else None}


STOP_GRACE_S = 60
"""How long a stopping host waits for the requests under way before it closes chdb."""
SEND_TIMEOUT_S = 60


class Stopping(Exception):
    """The host began to stop: a request that arrives now has its connection closed unanswered,
    and an exclusive block still waiting for its turn is refused."""


class Host:
    """The chdb engine and what each request does with it."""

    def __init__(self, url: str):
        self.url = url
        self.path, settings = chdb_location(url)
        chdb_session(self.path, settings)  # this thread's handle keeps the engine open between connections
        self.connection_ids = itertools.count(1)
        self.exclusive = threading.RLock()
        """Held from a connection's OP_LOCK to its OP_UNLOCK (or its end): exclusive blocks
        (migrations) run one at a time. Statements outside one are not held up, as on a
        ClickHouse server, which gives writers no exclusion either."""
        self.running = 0
        self.stopping = False
        self.state = threading.Condition()
        """Guards running (requests under way) and stopping."""

    @contextmanager
    def request(self):
        """Counts the request as running while it runs; Stopping once the host stops."""
        with self.state:
            if self.stopping:
                raise Stopping
            self.running += 1
        try:
            yield
        finally:
            with self.state:
                self.running -= 1
                self.state.notify_all()

    def close(self, grace_s: float = STOP_GRACE_S) -> None:
        """Close chdb once the requests that run now have finished, or after grace_s; later
        ones are refused."""
        with self.state:
            self.stopping = True
            if not self.state.wait_for(lambda: self.running == 0, timeout=grace_s):
                log.warning("chdb host stopping with requests unfinished", extra={"requests": self.running})
        close_chdb()

    def answer(self, op: int, sql: str, payload: Payload, held: list[int]) -> bytes:
        """The result bytes of one request; raises what chdb raises."""
        if op == OP_PING:
            return b""
        if op == OP_LOCK:
            while not self.exclusive.acquire(timeout=1):  # a stopping host does not wait for a block
                if self.stopping:
                    raise Stopping("the chdb host is stopping")
            held.append(1)
            return b""
        if op == OP_UNLOCK:
            if held:
                held.pop()
                self.exclusive.release()
            return b""
        session = chdb_session(self.path)  # this connection's handle
        if op == OP_EXECUTE:
            session.query(sql)
            return b""
        if op == OP_QUERY:
            return session.query(sql, payload.read().decode()).bytes()
        if op == OP_INSERT:
            # chdb parses an ArrowStream as it comes. The turn is held while the frame arrives:
            # a client sends it while Arrow writes it (HostSession.insert), and one that dies
            # mid-frame closes the socket, which cancels the insert before any of its rows are
            # a part (one block).
            with insert_turn, session.send_insert(sql, "ArrowStream") as stream:
                for chunk in payload.chunks():
                    stream.append(chunk)
                stream.finish()
            return b""
        raise ValueError(f"unknown op {op}")

    def respond(self, conn: socket.socket, request_id: str, op: int, sql: str, payload: Payload,
                held: list[int]) -> bool:
        """Answer one request; False when the reply could not be delivered."""
        name = OP_NAMES.get(op, str(op))
        BYTES.labels("in").inc(payload.size)
        started = time.perf_counter()
        try:
            reply, status = self.answer(op, sql, payload, held), STATUS_OK
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the client
            reply, status = str(exc).encode(), STATUS_ERROR
            ERRORS.labels(name).inc()
            log.warning("statement failed", extra={"request_id": request_id, "op": name, **error_summary(str(exc))})
        SECONDS.labels(name).observe(time.perf_counter() - started)
        STATEMENTS.labels(name).inc()
        BYTES.labels("out").inc(len(reply))
        try:
            payload.skip_rest()
            send_frame(conn, bytes([status]), reply)
        except OSError as exc:
            log.warning("reply not delivered", extra={"request_id": request_id, "error": str(exc)})
            return False
        return True

    def serve_connection(self, conn: socket.socket) -> None:
        connection = next(self.connection_ids)
        held: list[int] = []  # OP_LOCKs this connection holds, released if it goes away holding them
        CONNECTIONS.inc()
        log.info("connection opened", extra={"connection": connection})
        try:
            for number in itertools.count(1):
                try:
                    request = recv_request(conn)
                except OSError as exc:
                    log.warning("connection broken", extra={"connection": connection, "error": str(exc)})
                    return
                except MalformedRequest as exc:
                    log.warning("malformed request, connection closed", extra={"connection": connection,
                                                                               "error": type(exc).__name__})
                    return
                if request is None:
                    return
                op, sql, payload = request
                try:
                    with self.request():  # until the reply is out: a stopping host closes chdb after it
                        if not self.respond(conn, f"{connection}-{number}", op, sql, payload, held):
                            return
                except Stopping:
                    return
        finally:
            for _ in held:
                self.exclusive.release()
            close_thread_chdb()
            conn.close()
            CONNECTIONS.dec()
            log.info("connection closed", extra={"connection": connection})


def bind(socket_path: str) -> socket.socket:
    """A listening socket at socket_path; a stale file from a host that died is replaced,
    a live host's is not."""
    path = Path(socket_path)
    if path.exists():
        try:
            HostSession(socket_path, connect_timeout_s=5, reply_timeout_s=5).ping()
        except HostGone:
            path.unlink()
        else:
            raise SystemExit(f"a chdb host already serves {socket_path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    os.chmod(socket_path, 0o600)  # the database's owner only, as the directory itself
    listener.listen(64)
    return listener


def serve(url: str, socket_path: str, metrics_port: int | None = None, metrics_host: str = "127.0.0.1") -> None:
    listener = bind(socket_path)  # first: a second host on a live socket stops before opening chdb
    try:
        host = Host(url)
    except BaseException:
        Path(socket_path).unlink(missing_ok=True)
        raise
    if metrics_port is not None:
        start_http_server(metrics_port, metrics_host)
    stopping = threading.Event()

    def stop(signum, _frame) -> None:
        stopping.set()
        listener.close()  # ends accept() below

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("chdb host ready", extra={"socket": socket_path, "database_dir": host.path, "pid": os.getpid(),
                                        "metrics_port": metrics_port, **malloc_report()})
    try:
        while not stopping.is_set():
            try:
                conn, _address = listener.accept()
                # A reply to a client that stopped reading fails instead of holding its request
                # (and a stopping host) forever; reads wait as long as the client is idle.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT_S, 0))
            except OSError:
                if stopping.is_set():
                    break
                raise
            threading.Thread(target=host.serve_connection, args=(conn,), daemon=True,
                             name="chdb-host-connection").start()
    finally:
        host.close()
        Path(socket_path).unlink(missing_ok=True)
        log.info("chdb host stopped", extra={"socket": socket_path})


def host_command(url: str, socket_path: str | Path, metrics_port: int | None = None) -> list[str]:
    """The command line of a host process (what `gatewatch chdb-host` execs)."""
    command = [sys.executable, "-m", "ops.chdb_host", "--url", url, "--socket", str(socket_path)]
    return command + (["--metrics-port", str(metrics_port)] if metrics_port is not None else [])


def host_env(env: dict[str, str]) -> dict[str, str]:
    """env with the host's allocator settings (ops.allocators) where it sets none of its own."""
    return {**HOST_ALLOCATOR_ENV, **env}


@dataclass
class RunningHost:
    """A host process started by start_host (the benchmark's, the demo's, a test's)."""

    proc: subprocess.Popen
    socket_path: Path
    database_url: str
    """The chdb:// URL of the directory it owns."""
    metrics_port: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        """What the flows set clickhouse.url to."""
        return host_url(self.socket_path)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def seconds_by_op(self) -> dict[str, float]:
        """Seconds the host spent on each kind of request so far (waits included), from
        its metrics; empty without a metrics port."""
        if self.metrics_port is None:
            return {}
        from urllib.request import urlopen

        text = urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        found = re.findall(r'^gatewatch_chdb_host_statement_seconds_sum\{op="(\w+)"\} (\S+)$', text, re.MULTILINE)
        return {op: round(float(value), 2) for op, value in found}

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM: the host finishes the statements it runs and closes chdb."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_host(url: str, socket_path: str | Path, log_path: Path, metrics_port: int | None = None,
               env: dict[str, str] | None = None, timeout_s: float = 60) -> RunningHost:
    """A host process serving url at socket_path, returned once it answers a ping."""
    socket_path = Path(socket_path).resolve()
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(host_command(url, socket_path, metrics_port), env=host_env(dict(env or os.environ)),
                                stdout=log_file, stderr=subprocess.STDOUT)
    wait_until_serving(proc, str(socket_path), log_path, timeout_s)
    return RunningHost(proc, socket_path, url, metrics_port)


def wait_until_serving(proc: subprocess.Popen, socket_path: str, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    probe = HostSession(socket_path, connect_timeout_s=5, reply_timeout_s=5)
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the chdb host exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            probe.ping()
            probe.close()
            return
        except HostGone:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"the chdb host did not answer on {socket_path} within {timeout_s:g} s")
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.chdb_host", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="chdb://DIR[?server_setting=value&...]: the database it owns")
    parser.add_argument("--socket", required=True, help="Unix socket path the flows reach (chdb+unix://PATH)")
    parser.add_argument("--metrics-port", type=int, default=None)
    parser.add_argument("--log-level", default=os.environ.get("GATEWATCH_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    # chdb imports pyarrow when it can and works without it (Arrow bytes pass through here
    # untouched): kept out, its ~100 MB of libraries stay unmapped.
    sys.modules.setdefault("pyarrow", None)  # type: ignore[arg-type]
    configure_logs(args.log_level)
    serve(args.url, str(Path(args.socket).resolve()), args.metrics_port)


if __name__ == "__main__":
    main()
