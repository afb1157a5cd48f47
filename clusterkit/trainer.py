"""The run directory's functions (``make_run_dir``, ``check_resumable``, ``trim_metrics_log``,
``RUN_OUTPUTS``), and the names the training engine used to hold here: the :class:`Trainer`
and its companions now live in :mod:`clusterkit.engine` and are re-exported from this module
(``from clusterkit.trainer import Trainer`` keeps working).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from .checkpoint import atomic_write_text, latest_checkpoint
from .engine import DivergenceError, Trainer, lr_at, lr_for_step
from .errors import RunDirError
from .errors import warn as _warn
from .plugin_manager import STAGED_HOOKS
from .recipe import Recipe
from .runlock import LOCK_NAME, lock_run_dir

__all__ = ["Trainer", "make_run_dir", "check_resumable", "trim_metrics_log", "RUN_OUTPUTS", "lr_at", "lr_for_step",
           "DivergenceError", "STAGED_HOOKS"]


#: What a run writes in its directory: ``--force`` removes exactly these before a new run starts.
RUN_OUTPUTS = ("recipe.yaml", "metrics.jsonl", "summary.json", "error.txt", "checkpoints", "plots")


def make_run_dir(recipe: Recipe, out: str | None, force: bool) -> Path:
    """A fresh run directory (``out``, or ``run.out_dir/<name>/<time>``), locked for this process
    (:mod:`clusterkit.runlock`; release it with ``release_run_dir``).

    An existing non-empty ``out`` is refused unless ``force``; with ``force`` the previous run's
    outputs (:data:`RUN_OUTPUTS`, plots included) are removed once the lock is held, and any other
    file is left where it is, with a note.
    """
    if out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(recipe.run.out_dir) / recipe.name / stamp
        n = 1
        while path.exists():
            path = Path(recipe.run.out_dir) / recipe.name / f"{stamp}-{n}"
            n += 1
    else:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise RunDirError(f"Cannot use '{path}' as the run directory: it is a file, not a folder. Choose "
                              "another --out (a folder that does not exist yet, or an empty one).")
        if path.is_dir() and _user_entries(path) and not force:
            raise RunDirError(f"Run directory '{path}' already exists and is not empty. Use --resume {path} "
                              "to continue that run, --force to overwrite it, or choose another --out.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"Cannot create the run directory '{path}': {exc.strerror or exc}. Choose another --out "
                          f"(or run.out_dir) in a folder you can write to.") from None
    lock_run_dir(path)
    if out is not None and force:
        _clear_run_outputs(path)
    return path


def check_resumable(run_dir: Path) -> None:
    """RunDirError unless ``run_dir`` is a run directory with a checkpoint to resume from;
    checked before anything is read or written there."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"Cannot resume '{run_dir}': no such directory. Pass the run directory that "
                          "holds recipe.yaml and checkpoints/ (printed when the run started).")
    if not (run_dir / "checkpoints").is_dir():
        raise RunDirError(f"Cannot resume '{run_dir}': it is not a run directory (it has no checkpoints/ folder, "
                          "so it holds no checkpoint). --resume takes the folder a run wrote (printed when the run "
                          "started, e.g. runs/<name>/<time>); nothing in this folder was changed.")
    if latest_checkpoint(run_dir / "checkpoints") is None:
        raise RunDirError(f"Cannot resume '{run_dir}': it holds no checkpoint (checkpoints/epoch_*.pt). A run "
                          "writes its first checkpoint at the end of its first epoch; start it anew with --out "
                          f"{run_dir} --force, or point --resume at another run directory.")


def _user_entries(path: Path) -> list[Path]:
    """The entries of a run directory other than its lock file."""
    return [p for p in path.iterdir() if p.name != LOCK_NAME]


def _clear_run_outputs(path: Path) -> None:
    """``--force``: remove the previous run's outputs (and temporary files) from ``path``."""
    import shutil

    for name in RUN_OUTPUTS:
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    for tmp in path.glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)
    others = sorted(p.name for p in _user_entries(path))
    if others:
        _warn(f"--force removed the previous run's files from '{path}' but left what clusterkit did not "
              f"write there: {', '.join(others)}.")


def trim_metrics_log(run_dir: Path, epochs_done: int, step: int) -> None:
    """metrics.jsonl after a crash: keep the records up to the checkpoint (``epochs_done`` epochs,
    ``step`` optimiser steps), drop those of the killed epoch and a line torn by the kill."""
    log = Path(run_dir) / "metrics.jsonl"
    if not log.exists():
        return
    keep = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step and record.get("epoch", 0) <= epochs_done:
            keep.append(line)
    atomic_write_text(log, "".join(line + "\n" for line in keep))
