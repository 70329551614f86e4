"""Bytewax recovery directories, and erasing one user from their snapshots.

Bytewax gathers the recovery partitions (`part-<i>.sqlite3`) of every process of a
cluster when it resumes; each process may hold a different subset on its own disk, as
long as together they hold all of them with the same partition count. So one machine's
cluster shares one directory, and a Kubernetes StatefulSet gives each pod its own
volume holding its share (`init_recovery(..., share=(index, processes))`).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from typing import Any, Callable

from dataflows.state import UserWindows


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


# -- erasing one user from the snapshots ------------------------------------------------
# Snapshots are pickles of what the logics in dataflows/state.py return: the window state
# (a pickled UserWindows, keyed by user), the sink batches (lists of events) and the
# dedupe state, which holds only 64-bit hashes of org/event_id and no user id.

Holds = Callable[[str | None, str | None], bool]
"""holds(org_id, user_id): is this the user being erased?"""


def partition_files(directory: str | os.PathLike) -> list[str]:
    return [os.path.join(directory, name) for name in recovery_files(directory)]


def without_user(value: Any, holds: Holds) -> tuple[Any, bool]:
    """(the snapshot value without the user's state, whether anything was removed)."""
    if isinstance(value, UserWindows):
        gone = [key for key, totals in value.users.items() if holds(totals.org_id, totals.user_id)]
        for key in gone:
            del value.users[key]
        return value, bool(gone)
    if isinstance(value, bytes):
        try:
            inner = pickle.loads(value)
        except Exception:  # noqa: BLE001 - not every snapshot is a nested pickle
            return value, False
        inner, changed = without_user(inner, holds)
        return (pickle.dumps(inner, protocol=pickle.HIGHEST_PROTOCOL) if changed else value), changed
    if isinstance(value, list):
        kept = [item for item in value
                if not (isinstance(item, dict) and holds(item.get("org_id"), item.get("user_id")))]
        return kept, len(kept) != len(value)
    return value, False


def _user_snapshots(connection: sqlite3.Connection, holds: Holds) -> list[tuple[tuple, bytes | None]]:
    """[((step_id, state_key, snap_epoch), the snapshot re-pickled without the user)]"""
    changed = []
    for step_id, state_key, epoch, blob in connection.execute(
            "SELECT step_id, state_key, snap_epoch, ser_change FROM snaps WHERE ser_change IS NOT NULL"):
        value, removed = without_user(pickle.loads(blob), holds)
        if removed:
            changed.append(((step_id, state_key, epoch), pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)))
    return changed


def snapshots_holding(directory: str | os.PathLike, holds: Holds) -> dict[str, int]:
    """{partition file: snapshots that hold state of the user}"""
    found = {}
    for path in partition_files(directory):
        with contextlib.closing(sqlite3.connect(path)) as connection:
            count = len(_user_snapshots(connection, holds))
        if count:
            found[path] = count
    return found


def scrub(directory: str | os.PathLike, holds: Holds) -> int:
    """Rewrite every snapshot holding the user without them, then VACUUM so the old pages
    (which still hold the bytes) are gone from the file; return the snapshots rewritten.

    Run it with the flows stopped: a running flow snapshots its memory, user included."""
    rewritten = 0
    for path in partition_files(directory):
        with contextlib.closing(sqlite3.connect(path)) as connection:
            changed = _user_snapshots(connection, holds)
            with connection:
                connection.executemany(
                    "UPDATE snaps SET ser_change = ? WHERE step_id = ? AND state_key = ? AND snap_epoch = ?",
                    [(blob, *key) for key, blob in changed])
            connection.execute("VACUUM")
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        rewritten += len(changed)
    return rewritten
