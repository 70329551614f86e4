"""Supervision of local server processes: launch in their own session, wait until the
server answers, stop by the recorded PID of the binary itself; :class:`Service` records one.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
S3_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


class ServiceUnavailable(RuntimeError):
    """A server binary is missing, or the server did not answer in time.

    ``service`` is the (stopped) Service when a process had been launched, else None.
    """

    def __init__(self, message: str, service: Service | None = None) -> None:
        super().__init__(message)
        self.service = service


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
        """SIGTERM (or the service's ``stop_signal``) to the server binary, wait up to
        ``timeout`` s, then SIGKILL.

        Returns True if the process had to be killed. Safe to call twice.
        """
        killed = False
        was_alive = self.alive()
        if was_alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, self.extra.get("stop_signal", signal.SIGTERM))
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
    run_as: str | None = None,
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
            **({"user": run_as, "group": run_as, "extra_groups": []} if run_as else {}),
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
    run_as: str | None = None,
) -> Service:
    """Launch, wait, and when we picked the port ourselves retry on a port race."""
    data_dir = Path(data_dir).absolute()
    attempts = 1 if port is not None else 3
    error: ServiceUnavailable | None = None
    for _ in range(attempts):
        chosen = port if port is not None else free_port()
        command, extra = build(data_dir, chosen)
        proc, log_path, offset = _launch(name, kind, command, data_dir, log_name or f"{name}.log",
                                 env=env, die_with_parent=die_with_parent, run_as=run_as)
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
