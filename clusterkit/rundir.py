"""The run directory: its layout, and every way clusterkit makes, locks, clears and reads one.

A run writes ``runs/<name>/<time>/`` (or ``--out``)::

    recipe.yaml        the resolved recipe, written when the run starts
    metrics.jsonl      one JSON record per ``run.log_every`` steps and one per epoch
    checkpoints/       epoch_XXXX.pt, the newest ``run.keep_last`` (:mod:`clusterkit.checkpoint`)
    summary.json       final metrics, protocol, time, memory, versions: the run finished
    error.txt          why a run of ``clusterkit compare`` failed
    plots/             ``clusterkit plot``'s figures
    .clusterkit.lock   held while a run writes here (:mod:`clusterkit.runlock`)

This module is the one place those names are spelled.  :class:`RunDir` wraps a folder with
them; the trainer, the CLI, compare, show, plots and inference ask it where a file lies and
to read or write it, so a change of layout is a change here.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import atomic_write_text, checkpoint_file, latest_checkpoint, load_latest_checkpoint, save_checkpoint
from .errors import RecipeError, RunDirError
from .errors import warn as _warn

if TYPE_CHECKING:
    from .recipe import Recipe

__all__ = ["RunDir", "RECIPE", "METRICS_LOG", "CHECKPOINTS", "SUMMARY", "ERROR", "PLOTS", "LOCK_NAME",
           "RUN_OUTPUTS", "CONTENTS", "TIMING_KEYS", "make_run_dir", "check_resumable", "trim_metrics_log",
           "read_summary"]

#: The resolved recipe.
RECIPE = "recipe.yaml"
#: The metrics log: per-step and per-epoch JSON records, one a line.
METRICS_LOG = "metrics.jsonl"
#: The checkpoint folder.
CHECKPOINTS = "checkpoints"
#: The final summary; its presence means the run finished.
SUMMARY = "summary.json"
#: What made a run of ``clusterkit compare`` fail.
ERROR = "error.txt"
#: ``clusterkit plot``'s default folder.
PLOTS = "plots"
#: The lock file of the run that writes here.
LOCK_NAME = ".clusterkit.lock"
#: What a run writes in its directory: ``--force`` removes exactly these before a new run starts.
RUN_OUTPUTS = (RECIPE, METRICS_LOG, SUMMARY, ERROR, CHECKPOINTS, PLOTS)
#: What a run directory holds, in the words of error messages.
CONTENTS = f"{RECIPE}, {METRICS_LOG} and {CHECKPOINTS}/"
#: The wall-clock keys of an epoch record in the metrics log: the epoch's seconds, and those of the
#: E-step that opened it and the evaluation that closed it.  They differ between two runs of the
#: same recipe; everything else in a record is computed.
TIMING_KEYS = frozenset({"seconds", "e_step_seconds", "eval_seconds"})


class RunDir:
    """One run's folder: where each of its files lies, and the operations on them.

    ``RunDir(path)`` touches nothing; :meth:`create` makes (and locks) a new one.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir('{self.path}')"

    # -- the layout ------------------------------------------------------------------------------

    @property
    def recipe_file(self) -> Path:
        return self.path / RECIPE

    @property
    def metrics_log(self) -> Path:
        return self.path / METRICS_LOG

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY

    @property
    def error_file(self) -> Path:
        return self.path / ERROR

    @property
    def plots(self) -> Path:
        return self.path / PLOTS

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_NAME

    # -- making, locking, clearing ---------------------------------------------------------------

    @classmethod
    def create(cls, recipe: Recipe, out: str | os.PathLike | None, force: bool) -> RunDir:
        """A fresh run directory (``out``, or ``run.out_dir/<name>/<time>``), locked for this
        process (release it with :meth:`release`).

        An existing non-empty ``out`` is refused unless ``force``; with ``force`` the previous run's
        outputs (:data:`RUN_OUTPUTS`, plots included) are removed once the lock is held, and any
        other file is left where it is, with a note.
        """
        run = cls(_new_path(recipe) if out is None else _checked_out(Path(out), force))
        try:
            run.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"Cannot create the run directory '{run.path}': {exc.strerror or exc}. Choose another "
                              f"--out (or run.out_dir) in a folder you can write to.") from None
        run.lock()
        if out is not None and force:
            run.clear_outputs()
        return run

    def check_resumable(self) -> None:
        """RunDirError unless this is a run directory with a checkpoint to resume from; checked
        before anything is read or written there."""
        where = self.path
        if not where.is_dir():
            raise RunDirError(f"Cannot resume '{where}': no such directory. Pass the run directory that "
                              f"holds {RECIPE} and {CHECKPOINTS}/ (printed when the run started).")
        if not self.checkpoints.is_dir():
            raise RunDirError(f"Cannot resume '{where}': it is not a run directory (it has no {CHECKPOINTS}/ "
                              "folder, so it holds no checkpoint). --resume takes the folder a run wrote (printed "
                              "when the run started, e.g. runs/<name>/<time>); nothing in this folder was changed.")
        if self.latest_checkpoint() is None:
            raise RunDirError(f"Cannot resume '{where}': it holds no checkpoint ({CHECKPOINTS}/epoch_*.pt). A run "
                              "writes its first checkpoint at the end of its first epoch; start it anew with --out "
                              f"{where} --force, or point --resume at another run directory.")

    def lock(self) -> Path:
        """Take the directory's lock for this process (:func:`clusterkit.runlock.lock_run_dir`)."""
        from .runlock import lock_run_dir

        return lock_run_dir(self.path)

    def release(self) -> None:
        """Give the lock back if this process holds it."""
        from .runlock import release_run_dir

        release_run_dir(self.path)

    def user_entries(self) -> list[Path]:
        """The entries of the directory other than its lock file."""
        return [p for p in self.path.iterdir() if p.name != LOCK_NAME]

    def clear_outputs(self) -> None:
        """``--force``: remove the previous run's outputs (and temporary files)."""
        for name in RUN_OUTPUTS:
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        for tmp in self.path.glob(".*.tmp-*"):
            tmp.unlink(missing_ok=True)
        others = sorted(p.name for p in self.user_entries())
        if others:
            _warn(f"--force removed the previous run's files from '{self.path}' but left what clusterkit did not "
                  f"write there: {', '.join(others)}.")

    def remove_if_empty(self) -> None:
        """A run that failed before writing anything (a plugin or data error) leaves no empty
        run directory behind: release the lock and remove the folder if nothing else is there."""
        if self.path.is_dir() and not self.user_entries():
            self.release()
            try:
                self.path.rmdir()
            except OSError:
                pass

    # -- the metrics log -------------------------------------------------------------------------

    def append_record(self, record: dict) -> None:
        """Add one record to the metrics log."""
        with open(self.metrics_log, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def trim_metrics_log(self, epochs_done: int, step: int) -> None:
        """The metrics log after a crash: keep the records up to the checkpoint (``epochs_done``
        epochs, ``step`` optimiser steps), drop those of the killed epoch and a line torn by the kill."""
        log = self.metrics_log
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

    def records(self) -> list[dict]:
        """Every record of the metrics log, in order (a line torn by a kill is passed over);
        RunDirError for a record whose epoch is not a whole number."""
        path = self.metrics_log
        if not path.exists():
            return []
        out = []
        for number, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a kill
                continue
            if not isinstance(record, dict):
                continue
            epoch = record.get("epoch")
            if "epoch" in record and (isinstance(epoch, bool) or not isinstance(epoch, int)):
                raise RunDirError(f"Line {number} of '{path}' has epoch {epoch!r}, not a whole number, so clusterkit "
                                  "did not write it (the file was edited or damaged). Delete or correct that line "
                                  "(epochs count 1, 2, ...) and run the command again.")
            out.append(record)
        return out

    def epoch_records(self) -> list[dict]:
        """The end-of-epoch records (loss means, NMI/ACC/ARI when evaluated, lr, seconds), one
        per epoch (the last record of an epoch wins after a resume)."""
        by_epoch: dict[int, dict] = {}
        for record in self.records():  # every epoch there is a whole number (records() checks)
            if "seconds" in record and "epoch" in record:
                by_epoch[record["epoch"]] = record
        return [by_epoch[e] for e in sorted(by_epoch)]

    def step_records(self) -> list[dict]:
        """The every-``run.log_every``-steps records."""
        return [r for r in self.records() if "seconds" not in r and "step" in r]

    # -- recipe, summary, checkpoints, error -----------------------------------------------------

    def write_recipe(self, recipe: Recipe) -> None:
        """Write the resolved recipe (atomically)."""
        from .recipe import dump_recipe

        atomic_write_text(self.recipe_file, dump_recipe(recipe))

    def read_recipe(self) -> dict:
        """The run's resolved recipe as a mapping; RunDirError when there is none or it cannot be
        read, RecipeError when it is not a mapping."""
        import yaml

        path = self.recipe_file
        if not path.exists():
            raise RunDirError(f"'{self.path}' holds no {RECIPE}, so it is not a clusterkit run directory (a run "
                              f"writes {RECIPE} when it starts). Pass the folder a run wrote, e.g. "
                              "runs/quickstart/<time>.")
        try:
            data = yaml.safe_load(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            problem = getattr(exc, "problem", None) or getattr(exc, "strerror", None) or type(exc).__name__
            raise RunDirError(f"The run's recipe '{path}' cannot be read ({problem}): it is damaged or was edited by "
                              f"hand. The resolved recipe is also stored in every checkpoint; restore {RECIPE} "
                              "from a copy of the run, or rerun the recipe.") from None
        if not isinstance(data, dict):
            raise RecipeError(f"'{path}' does not hold a recipe mapping.")
        return data

    def write_summary(self, summary: dict) -> None:
        """Write the final summary (atomically): from now on the run counts as finished."""
        atomic_write_text(self.summary_file, json.dumps(summary, indent=2))

    def read_summary(self) -> dict | None:
        """The run's summary (None while the run is unfinished); RunDirError when it exists but
        is not a JSON object (a truncated copy)."""
        path = self.summary_file
        if not path.exists():
            return None
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RunDirError(f"The run's summary '{path}' cannot be read ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())}); it is truncated or corrupt. Resume the run with "
                              "--resume to write it again, or delete it to use the run as an unfinished one.") from None
        if not isinstance(summary, dict):
            raise RunDirError(f"The run's summary '{path}' holds no JSON object; resume the run with --resume to "
                              "write it again, or delete it.")
        return summary

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint file, or None."""
        return latest_checkpoint(self.checkpoints)

    def load_latest_checkpoint(self) -> tuple[Path, dict] | None:
        """The newest readable checkpoint as ``(path, contents)``, or None
        (:func:`clusterkit.checkpoint.load_latest_checkpoint`)."""
        return load_latest_checkpoint(self.checkpoints)

    def save_checkpoint(self, payload: dict, epoch: int, keep_last: int) -> Path:
        """Write the checkpoint of ``epoch`` (0-based) and keep the newest ``keep_last``."""
        return save_checkpoint(payload, self.checkpoints, epoch, keep_last)

    def checkpoint_of(self, epoch: int) -> Path:
        """The file the checkpoint of ``epoch`` (0-based) is written to."""
        return checkpoint_file(self.checkpoints, epoch)

    def write_error(self, text: str) -> None:
        """Record why the run failed (the folder is made if need be)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.error_file.write_text(text)


def _new_path(recipe: Recipe) -> Path:
    """``run.out_dir/<name>/<time>`` (with ``-N`` appended while that exists)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(recipe.run.out_dir) / recipe.name / stamp
    n = 1
    while path.exists():
        path = Path(recipe.run.out_dir) / recipe.name / f"{stamp}-{n}"
        n += 1
    return path


def _checked_out(path: Path, force: bool) -> Path:
    """``--out``, refused when it is a file, or a non-empty folder without ``force``."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"Cannot use '{path}' as the run directory: it is a file, not a folder. Choose "
                          "another --out (a folder that does not exist yet, or an empty one).")
    if path.is_dir() and RunDir(path).user_entries() and not force:
        raise RunDirError(f"Run directory '{path}' already exists and is not empty. Use --resume {path} "
                          "to continue that run, --force to overwrite it, or choose another --out.")
    return path


# -- the functions clusterkit had before RunDir (tests, benchmarks and notebooks call them) --------

def make_run_dir(recipe: Recipe, out: str | None, force: bool) -> Path:
    """:meth:`RunDir.create`'s path: a fresh run directory, locked for this process."""
    return RunDir.create(recipe, out, force).path


def check_resumable(run_dir: str | os.PathLike) -> None:
    """:meth:`RunDir.check_resumable` of ``run_dir``."""
    RunDir(run_dir).check_resumable()


def trim_metrics_log(run_dir: str | os.PathLike, epochs_done: int, step: int) -> None:
    """:meth:`RunDir.trim_metrics_log` of ``run_dir``."""
    RunDir(run_dir).trim_metrics_log(epochs_done, step)


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """:meth:`RunDir.read_summary` of ``run_dir``."""
    return RunDir(run_dir).read_summary()
