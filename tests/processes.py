"""Running our CLI in a child process from a test, without ever hanging the test run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict | None = None, timeout: float = 300,
            module: str = "ops.cli") -> subprocess.CompletedProcess:
    """``python -m ops.cli ARGS`` with its output captured.

    The child gets a session of its own so that a timeout kills everything it started: a
    server or flow process left holding the captured pipes would otherwise keep
    ``communicate`` waiting forever."""
    command = [sys.executable, "-m", module, *args]
    with subprocess.Popen(command, cwd=REPO, env={**os.environ, **(env or {})}, text=True, start_new_session=True,
                          stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            raise AssertionError(f"{' '.join(args)} did not finish within {timeout:g} s; "
                                 f"it printed:\n{stdout[-2000:]}\n{stderr[-4000:]}") from None
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
