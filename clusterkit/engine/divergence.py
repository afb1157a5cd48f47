"""The non-finite policy: what a run does when a loss term becomes NaN or infinite.

``run.nonfinite: stop`` (the default) notes the first bad step on the device without a host
sync (:class:`NonfiniteWatch`) and stops the run with a :class:`DivergenceError` at the next
sync point (every ``run.sync_every`` steps, and before evaluations and checkpoints, so no
checkpoint holds a diverged model).  ``run.nonfinite: skip`` checks every step (one sync),
skips a bad step and stops after ``run.max_skipped_steps`` of them.  The messages say where
the run stopped, what it left to resume from, and what to change.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import distributed
from ..errors import RecipeError
from ..errors import warn as _warn
from ..recipe import Recipe
from ..rundir import RunDir
from ..state import TrainState

__all__ = ["DivergenceError", "NonfiniteWatch", "Divergence"]


class DivergenceError(RecipeError):
    """A loss term became NaN or infinite (or, with ``run.nonfinite: skip``, did so too often)."""


class NonfiniteWatch:
    """Notes, on the device and without a host sync, the first step whose loss terms were not
    all finite (its global step, term and value); read at the sync points."""

    def __init__(self, device: torch.device):
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.term = torch.zeros((), dtype=torch.long, device=device)
        self.value = torch.zeros((), device=device)

    def update(self, terms: list[torch.Tensor], step: int) -> None:
        """Note step ``step`` if one of ``terms`` (scalar tensors) is not finite and no earlier step was."""
        # a term's sum is non-finite when an element is (nan if one is nan, else +-inf)
        values = torch.stack([t.detach().float().sum() for t in terms])
        bad = ~torch.isfinite(values)
        first = bad.int().argmax()
        new = bad.any() & (self.step < 0)
        self.step = torch.where(new, torch.full_like(self.step, step), self.step)
        self.term = torch.where(new, first, self.term)
        self.value = torch.where(new, values[first], self.value)

    def read(self) -> tuple[int, int, float] | None:
        """(step, term index, value) of the earliest bad step on any rank, or None (a host sync)."""
        packed = torch.stack([self.step.double(), self.term.double(), self.value.double()])[None]
        bad = [row for row in distributed.gather(packed).tolist() if row[0] >= 0]
        if not bad:
            return None
        step, term, value = min(bad, key=lambda row: row[0])
        return int(step), int(term), value


class Divergence:
    """The stop/skip policy of one run (``run.nonfinite``, ``run.max_skipped_steps``).

    ``watch``: the :class:`NonfiniteWatch` of ``stop``; ``skipped_steps``: steps skipped so far
    under ``skip`` (checkpointed, and restored on resume)."""

    def __init__(self, recipe: Recipe, state: TrainState, run_dir: Path):
        self.recipe = recipe
        self.state = state
        self.run_dir = Path(run_dir)
        self.watch = NonfiniteWatch(state.device)
        self.term_names: list[str] = []  # the loss terms' names, in the order the watch indexes them
        self.skipped_steps = 0

    def check_step(self, terms: dict[str, torch.Tensor]) -> str | None:
        """After the backward pass of a step: the name of a non-finite term to skip the step for
        (``skip``: one host sync, the same answer on every rank), else None (``stop``: the terms
        are noted on the device for :meth:`check_finite`, without a sync)."""
        if self.recipe.run.nonfinite == "skip":
            finite = torch.stack([torch.isfinite(v).all() for v in terms.values()]).float()
            if not bool(distributed.all_reduce(finite, "min").all()):  # a sync every step, on every rank alike
                return next(n for n, f in zip(terms, finite.tolist(), strict=True) if not f)  # bad on some rank
            return None
        self.watch.update(list(terms.values()), self.state.step)
        self.term_names = list(terms)
        return None

    def check_finite(self) -> None:
        """``run.nonfinite: stop``: raise DivergenceError if a step since the start noted a
        non-finite term (a host sync; called every ``run.sync_every`` steps and before
        evaluations and checkpoints, so no checkpoint holds a diverged model)."""
        if self.recipe.run.nonfinite != "stop":
            return
        bad = self.watch.read()
        if bad is None:
            return
        step, term, value = bad
        spe = self.state.steps_per_epoch
        self.state.epoch, self.state.step_in_epoch, self.state.step = step // spe, step % spe, step
        self.nonfinite(self.term_names[term], torch.tensor(value))

    def check_diverged(self, hook: str) -> None:
        """A ``hook`` implementation raised: a DivergenceError instead when the run diverged (a
        noted non-finite loss term, or parameters that an optimiser step made NaN/inf)."""
        self.check_finite()
        bad = [name for name, p in self.state.model.named_parameters() if not torch.isfinite(p).all()]
        if not bad:
            return
        raise DivergenceError(f"The model's parameters became NaN or infinite {self._where()} ({len(bad)} tensors, "
                              f"e.g. '{bad[0]}'), so the {hook} hooks could not go on; the run stopped and "
                              f"{self.kept_checkpoint()}.")

    def kept_checkpoint(self) -> str:
        """What a stopped run leaves to resume from, and what to change (for divergence messages)."""
        ckpts = RunDir(self.run_dir).checkpoints
        if RunDir(self.run_dir).latest_checkpoint() is None:
            return ("no checkpoint was written yet (it diverged in its first epoch). Lower optim.lr (or raise "
                    "schedule.warmup_epochs), check the plugins' parameters, and start it again")
        return (f"the last good checkpoint in '{ckpts}' is kept. Lower optim.lr, check the plugin's parameters, "
                "or resume from that checkpoint with --resume")

    def nonfinite(self, name: str, value: torch.Tensor) -> None:
        """A NaN/inf loss term ``name`` (``value``: the term): stop (``run.nonfinite: stop``), or
        count a skipped step and warn (DivergenceError past ``run.max_skipped_steps``)."""
        run = self.recipe.run
        shown = value.item() if value.numel() == 1 else "non-finite"
        where = self._where()
        keep = self.kept_checkpoint()
        if run.nonfinite == "stop":
            raise DivergenceError(f"Loss term '{name}' became {shown} {where}; the run stopped and {keep} "
                                  "(run.nonfinite: skip skips such steps instead).")
        self.skipped_steps += 1
        if self.skipped_steps > run.max_skipped_steps:
            raise DivergenceError(f"Loss term '{name}' became {shown} {where}: {self.skipped_steps} steps skipped, "
                                  f"more than run.max_skipped_steps = {run.max_skipped_steps}; the run "
                                  f"stopped and {keep}.")
        _warn(f"loss term '{name}' became {shown} {where}; skipped this optimiser step "
              f"({self.skipped_steps} of at most run.max_skipped_steps = {run.max_skipped_steps}).")

    def _where(self) -> str:
        s = self.state
        return f"at epoch {s.epoch + 1}, step {s.step_in_epoch + 1} (after {s.step} optimiser steps)"
