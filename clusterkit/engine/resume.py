"""Checkpoints of a training run: what one holds, and resuming from one.

:class:`Checkpoints` writes the payload at each epoch's end (rank 0; every rank's RNG state
under torchrun) and restores the newest readable checkpoint on ``--resume`` after checking that
the run can go on: the same recipe (or one that only extends a constant-lr run to more epochs,
:meth:`Checkpoints.extends`) and the same training data (the data fingerprint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..checkpoint import (
    restore_training_state,
    rng_state,
    set_rng_state,
)
from ..cluster import KMeansPredictor
from ..errors import RecipeError, RunDirError
from ..errors import warn as _warn
from ..recipe import Recipe, differing_keys, load_recipe
from ..rundir import CHECKPOINTS, RECIPE, RunDir
from ..state import TrainState
from .divergence import Divergence
from .evaluation import RunEvaluation
from .setup import seed_everything

__all__ = ["Checkpoints", "saved_recipe", "recipe_changes"]


def recipe_changes(a: dict, b: dict) -> list[str]:
    """``"key: old -> new"`` lines for the dotted keys where two recipe dicts differ."""
    return [f"{key}: {va!r} -> {vb!r}" for key, (va, vb) in differing_keys([a, b])]


def saved_recipe(ckpt: dict) -> dict:
    """The recipe a checkpoint was written with, re-read through today's schema, so that keys
    added to clusterkit since then (at their defaults) do not count as a change; as saved
    when it no longer validates."""
    try:
        return load_recipe(data=ckpt["recipe"]).to_dict()
    except RecipeError:
        return ckpt["recipe"]


def _some(names: list[str], most: int = 5) -> str:
    """The first ``most`` names, quoted, and how many more."""
    shown = ", ".join(f"'{n}'" for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


class Checkpoints:
    """Writes a run's checkpoints into ``run_dir/checkpoints`` and resumes from them.

    Its collaborators are the run's parts whose state a checkpoint holds: ``state`` (model,
    steps, pseudo-labels, centres, extra), ``optimizer``, ``plugins`` (their ``state_dict()``),
    ``core_predictor``, ``divergence`` (skipped steps) and ``evaluation`` (collapse records);
    ``train_ds`` gives the data fingerprint."""

    def __init__(self, recipe: Recipe, run_dir: Path, state: TrainState, optimizer: torch.optim.Optimizer,
                 plugins: dict, core_predictor: KMeansPredictor, train_ds: Any, divergence: Divergence,
                 evaluation: RunEvaluation):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.state = state
        self.optimizer = optimizer
        self.plugins = plugins
        self.core_predictor = core_predictor
        self.train_ds = train_ds
        self.divergence = divergence
        self.evaluation = evaluation
        self._fingerprint: dict | None = None

    def fingerprint(self) -> dict:
        """The training data's fingerprint (computed once a run: it stats every file)."""
        if self._fingerprint is None:
            self._fingerprint = self.train_ds.fingerprint()
        return self._fingerprint

    def save(self, epoch: int, wall: float, history: list[dict]) -> None:
        """The checkpoint of epoch ``epoch`` (0-based), written by rank 0 (every rank's RNG state
        under torchrun); ``wall``: seconds trained so far; ``history``: the per-epoch records."""
        s = self.state
        rng = rng_state()
        rng_ranks: list[Any] | None = None
        if distributed.is_distributed():
            rng_ranks = [None] * distributed.world_size()
            torch.distributed.all_gather_object(rng_ranks, rng)
        if not distributed.is_main():
            return
        RunDir(self.run_dir).save_checkpoint({
            "epoch": epoch, "step": s.step, "model": s.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": rng, "rng_ranks": rng_ranks, "world_size": distributed.world_size(),
            "pseudo_labels": s.pseudo_labels, "centers": s.centers, "extra": s.extra,
            "plugins": {name: plugin.state_dict() for name, plugin in self.plugins.items()},
            "core": {"predict": self.core_predictor.state_dict()},
            "history": history, "wall_time": wall, "recipe": self.recipe.to_dict(),
            "recipe_hash": self.recipe.hash(), "data_fingerprint": self.fingerprint(),
            "skipped_steps": self.divergence.skipped_steps,
            "collapse_warnings": self.evaluation.collapse_warnings,
        }, epoch, self.recipe.run.keep_last)

    def restore(self) -> tuple[int, list, float]:
        """Load the newest readable checkpoint (after checking the recipe and the data are the
        same); returns (first epoch to train, the per-epoch history so far, the wall time spent
        so far)."""
        found = RunDir(self.run_dir).load_latest_checkpoint()  # the newest readable one
        if found is None:
            raise RunDirError(f"Cannot resume '{self.run_dir}': it holds no checkpoint ({CHECKPOINTS}/epoch_*.pt). "
                              "A run writes its first checkpoint at the end of its first epoch; start it anew "
                              "with --force, or point --resume at another run directory.")
        _, ckpt = found
        saved = saved_recipe(ckpt)
        if saved != self.recipe.to_dict() and not self.extends(saved, ckpt):
            diff = "; ".join(recipe_changes(saved, self.recipe.to_dict())) or "(formatting only)"
            raise RunDirError(f"Cannot resume '{self.run_dir}' with a changed recipe: {diff}. Resume with the "
                              f"recipe and --set overrides the run started with (its {RECIPE}), or start a new run.")
        self.check_same_data(ckpt)
        s = self.state
        restore_training_state(s, self.plugins, self.core_predictor, ckpt)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        s.epoch = ckpt["epoch"] + 1
        self.divergence.skipped_steps = ckpt.get("skipped_steps", 0)
        self.evaluation.collapse_warnings = list(ckpt.get("collapse_warnings", []))
        self._restore_rng(ckpt)
        if distributed.is_main():
            RunDir(self.run_dir).trim_metrics_log(ckpt["epoch"] + 1, s.step)
        return ckpt["epoch"] + 1, ckpt["history"], ckpt["wall_time"]

    def _restore_rng(self, ckpt: dict) -> None:
        """Every process's RNG state as checkpointed; reseeded (with a warning) when the process
        count changed."""
        world, saved_world = distributed.world_size(), ckpt.get("world_size", 1)
        if world == saved_world:
            set_rng_state(ckpt["rng_ranks"][distributed.rank()] if world > 1 else ckpt["rng"])
        else:
            seed_everything(self.recipe.run.seed + 7919 * distributed.rank() + 104_729 * self.state.epoch)
            _warn(f"resuming a run of {saved_world} process(es) with {world}: the data order and random draws "
                  "differ from an uninterrupted run from here on (the training itself is the same recipe).")

    def check_same_data(self, ckpt: dict) -> None:
        """Refuse to resume on training data that changed since the checkpoint (files added,
        removed or rewritten): the resumed run would not equal an uninterrupted one."""
        saved = ckpt.get("data_fingerprint")
        if saved is None:
            _warn(f"the checkpoint of '{self.run_dir}' predates data fingerprints, so clusterkit cannot check "
                  "that the training data are the ones it started with.")
            return
        now = self.fingerprint()
        if saved["sha256"] == now["sha256"] and saved["count"] == now["count"]:
            return
        what = f"{saved['count']} training images then, {now['count']} now"
        if saved.get("files") is not None and now.get("files") is not None:
            before, after = set(saved["files"]), set(now["files"])
            for label, names in (("gone or changed", before - after), ("new or changed", after - before)):
                if names:
                    what += f"; {label}: {_some(sorted(names))}"
        elif saved["count"] == now["count"]:
            what += ", with different content"
        raise RunDirError(f"Cannot resume '{self.run_dir}': its training data changed since the checkpoint "
                          f"({what}). A resumed run equals an uninterrupted one only on the same data. Put the data "
                          "back as it was (data.root), or start a new run on the data as they are now.")

    def extends(self, saved: dict, ckpt: dict) -> bool:
        """Whether this resume extends the run to more epochs: the recipes differ only in
        ``schedule.epochs``, which grew, and the learning rate does not depend on it (a constant
        schedule past the warm-up).  A cosine schedule, planned for the old length, is refused
        with the reason; so is fewer epochs than were trained."""
        changed = recipe_changes(saved, self.recipe.to_dict())
        if len(changed) != 1 or not changed[0].startswith("schedule.epochs:"):
            return False
        old, new = saved["schedule"]["epochs"], self.recipe.schedule.epochs
        if new <= ckpt["epoch"]:
            raise RunDirError(f"Cannot resume '{self.run_dir}' with schedule.epochs = {new}: it has trained "
                              f"{ckpt['epoch'] + 1} epochs already. Resume with schedule.epochs = {old} (as it "
                              "started), or a larger value to extend it.")
        if self.recipe.schedule.lr_schedule != "constant":
            raise RunDirError(f"Cannot extend '{self.run_dir}' from {old} to {new} epochs: its "
                              f"{self.recipe.schedule.lr_schedule} learning-rate schedule was planned for {old} epochs "
                              "(the lr of every epoch depends on the total), so the longer run would not be the run "
                              f"a {new}-epoch recipe trains. Start a new run with --set schedule.epochs={new}; only "
                              "runs with schedule.lr_schedule: constant can be extended.")
        _warn(f"extending '{self.run_dir}' from {old} to {new} epochs (schedule.lr_schedule: constant).")
        if distributed.is_main():
            RunDir(self.run_dir).write_recipe(self.recipe)
        return True
