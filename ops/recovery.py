"""Bytewax recovery directories.

Bytewax gathers the recovery partitions (`part-<i>.sqlite3`) of every process of a
cluster when it resumes; each process may hold a different subset on its own disk, as
long as together they hold all of them with the same partition count. So one machine's
cluster shares one directory, and a Kubernetes StatefulSet gives each pod its own
volume holding its share (`init_recovery(..., share=(index, processes))`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile


def recovery_files(directory: str | os.PathLike) -> list[str]:
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    return sorted(name for name in os.listdir(directory) if name.endswith(".sqlite3"))


def share_of(partitions: int, index: int, processes: int) -> list[int]:
    """The recovery partitions process `index` of `processes` keeps: every Nth."""
    if not 0 <= index < processes:
        raise ValueError(f"process index {index} is outside a cluster of {processes}")
    return list(range(index, partitions, processes))


def init_recovery(directory: str | os.PathLike, partitions: int = 1,
                  share: tuple[int, int] | None = None) -> None:
    """Create the recovery partitions once; an initialised directory is left as it is.
    share=(index, processes) keeps only that process's share of the partitions."""
    directory = os.fspath(directory)
    if recovery_files(directory):
        return
    if share is not None and partitions < share[1]:
        raise ValueError(f"{partitions} recovery partition(s) cannot be shared by {share[1]} processes: "
                         "every process needs at least one (raise recovery.partitions)")
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".init-") as staging:
        subprocess.check_call([sys.executable, "-m", "bytewax.recovery", staging, str(partitions)],
                              stdout=subprocess.DEVNULL)
        kept = range(partitions) if share is None else share_of(partitions, *share)
        # Moved in only once all exist, so a crash mid-init leaves nothing half made.
        for index in kept:
            shutil.move(os.path.join(staging, f"part-{index}.sqlite3"), os.path.join(directory, f"part-{index}.sqlite3"))
