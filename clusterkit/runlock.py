"""One run at a time in a run directory: an exclusive lock file that holds the owner's pid.

``clusterkit run`` takes ``RUN_DIR/.clusterkit.lock`` (:data:`clusterkit.rundir.LOCK_NAME`)
before it writes anything there (and before ``--force`` removes the old run's files) and
removes it when the run ends, however it ends.  A second run into the same directory gets a
:class:`~clusterkit.errors.RunDirError` naming the process that holds it.  A lock left by a
process that no longer exists (a run killed with SIGKILL, a machine that rebooted) is stale:
it is taken over with a note.

The lock is created with ``O_CREAT | O_EXCL``, so two processes that start at the same
moment cannot both get it.  A lock written on another host cannot be checked from here and
counts as held (the message says how to remove it when no run is going on).
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
from pathlib import Path

from .errors import RunDirError
from .rundir import LOCK_NAME

__all__ = ["LOCK_NAME", "lock_run_dir", "release_run_dir"]

_held: dict[Path, Path] = {}  # run directory -> its lock file, held by this process


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # a killed process its parent has not reaped yet (a zombie) no longer runs
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read_owner(lock: Path) -> tuple[int, str] | None:
    """(pid, host) written in ``lock``; None when it cannot be read or parsed (a torn write)."""
    try:
        pid, _, host = lock.read_text().strip().partition(" ")
        return int(pid), host
    except (OSError, ValueError):
        return None


def _create(lock: Path) -> bool:
    """Create ``lock`` holding this process's pid and host; False if it already exists."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{os.getpid()} {socket.gethostname()}\n")
    return True


def lock_run_dir(run_dir: str | os.PathLike) -> Path:
    """Take the lock of ``run_dir`` (which must exist) for this process; returns the lock file.

    Raises RunDirError when another live process holds it.  Taking a lock this process
    already holds is a no-op.
    """
    run_dir = Path(run_dir)
    lock = run_dir / LOCK_NAME
    if run_dir.resolve() in _held:
        return lock
    for _ in range(3):  # a stale lock is removed, then the creation is retried
        try:
            if _create(lock):
                _held[run_dir.resolve()] = lock
                return lock
        except OSError as exc:
            raise RunDirError(f"Cannot write the lock file '{lock}' of the run directory: {exc.strerror}. "
                              "The run directory must be writable; choose another --out.") from None
        owner = _read_owner(lock)
        if owner is not None and owner[0] == os.getpid() and owner[1] == socket.gethostname():
            _held[run_dir.resolve()] = lock
            return lock
        if owner is not None and owner[1] != socket.gethostname():
            raise RunDirError(f"Run directory '{run_dir}' is in use by process {owner[0]} on host '{owner[1]}' "
                              f"(its lock file '{lock}'). Wait for that run to end, or choose another --out; if "
                              "no run is going on there, delete the lock file.")
        if owner is not None and _pid_alive(owner[0]):
            raise RunDirError(f"Run directory '{run_dir}' is in use by another clusterkit run (process "
                              f"{owner[0]}, lock file '{lock}'); two runs in one directory would mix their "
                              "metrics and checkpoints. Wait for it to end, stop it, or choose another --out.")
        what = f"process {owner[0]}, which no longer runs" if owner else "an unreadable lock"
        print(f"clusterkit: note: '{run_dir}' was locked by {what} (a run that was killed); "
              "taking the lock over.", file=sys.stderr)
        lock.unlink(missing_ok=True)
    raise RunDirError(f"Cannot take the lock file '{lock}': other processes keep creating it. Make sure no "
                      "other run uses this directory, or choose another --out.")


def release_run_dir(run_dir: str | os.PathLike) -> None:
    """Remove the lock of ``run_dir`` if this process holds it."""
    lock = _held.pop(Path(run_dir).resolve(), None)
    if lock is not None:
        owner = _read_owner(lock)
        if owner is None or owner[0] == os.getpid():
            lock.unlink(missing_ok=True)


@atexit.register
def _release_all() -> None:
    for run_dir in list(_held):
        release_run_dir(run_dir)
