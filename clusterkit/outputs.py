"""Output files of the commands that write beside a run (export, predict, choose-k, plot, compare).

Two rules, one place:

* :func:`check_output_folder`: a folder a command will write into is checked *before* the command
  loads a model or computes anything, so that a folder that cannot be written costs the user one
  clear error, not minutes of computation followed by a traceback.  The check tries what the
  command will do (create the folder, or a file in the nearest folder that exists), so it also
  holds for root (whom file modes do not stop) on read-only file systems, under ``/proc`` and
  under a path that passes through a regular file.
* :func:`write_csv`: a CSV is written to a temporary file beside its target and renamed over it,
  so a failure part-way leaves no partial CSV.

File names in CSVs.  Paths are written as ``os.fsdecode`` gives them: UTF-8 text, where the
bytes of a file name that are not valid UTF-8 (a name made on another system, e.g. Latin-1
``b"\\xff\\xfe.png"``) are kept as lone surrogates and written back out as those same bytes
(``encoding="utf-8", errors="surrogateescape"``, Python's file-system encoding on POSIX).  Every
name therefore round-trips: read the CSV with ``open(path, encoding="utf-8",
errors="surrogateescape", newline="")`` and ``csv.reader``, and the ``path`` column is a string
that ``os.fsencode`` turns back into the original bytes (and that ``open``/``Path`` accept as the
original file).  A name that is valid UTF-8 is written as itself.
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from .checkpoint import atomic_write
from .errors import RunDirError

__all__ = ["CSV_ENCODING", "CSV_ERRORS", "check_output_folder", "write_csv"]

#: How CSVs that hold file paths are encoded (see the module doc): every file name round-trips.
CSV_ENCODING = "utf-8"
CSV_ERRORS = "surrogateescape"


def check_output_folder(folder: str | os.PathLike, flag: str = "--out") -> None:
    """RunDirError unless files can be written into ``folder`` (``flag`` names the option it came
    from in the message).  Nothing is left behind: a folder that does not exist yet is not
    created; the check writes (and removes) one empty temporary file in the nearest existing
    folder above it, or in ``folder`` itself."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():  # a dangling link: mkdir would fail on it
            raise RunDirError(f"Cannot write {flag} '{folder}': '{probe}' is a broken symbolic link; nothing was "
                              f"computed or written. Pass {flag} a folder you can write to.")
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == folder else f"lies under '{probe}', which is a file"
        raise RunDirError(f"Cannot write {flag} '{folder}': it {where}, not a folder; nothing was computed or "
                          f"written. Pass {flag} a folder (new or existing) you can write to.")
    try:
        fd, name = tempfile.mkstemp(prefix=".clusterkit-write-check-", dir=probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RunDirError(f"Cannot write {flag} '{folder}': writing in '{probe}' fails ({reason}); nothing was "
                          f"computed or written. Pass {flag} a folder you can write to.") from None
    os.close(fd)
    os.unlink(name)


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
    """Write a CSV (``\n`` line ends) so that ``path`` holds the old file or the whole new one
    (:func:`~clusterkit.checkpoint.atomic_write`: a temporary file renamed over ``path`` once
    complete, removed if anything fails).  Paths are encoded as the module doc says."""
    def rows_out(fh) -> None:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)

    atomic_write(path, rows_out, "w", newline="", encoding=CSV_ENCODING, errors=CSV_ERRORS)
    return Path(path)
