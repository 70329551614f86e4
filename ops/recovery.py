"""Bytewax recovery directories."""

from __future__ import annotations

import os
import subprocess
import sys


def init_recovery(directory: str | os.PathLike, partitions: int = 1) -> None:
    """Create the recovery partitions once; an initialised directory is left as it is."""
    directory = os.fspath(directory)
    if os.path.isdir(directory) and any(name.endswith(".sqlite3") for name in os.listdir(directory)):
        return
    os.makedirs(directory, exist_ok=True)
    subprocess.check_call([sys.executable, "-m", "bytewax.recovery", directory, str(partitions)],
                          stdout=subprocess.DEVNULL)
