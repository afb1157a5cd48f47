"""One optimisation step and the learning-rate schedule.

:class:`Stepper` takes the step the trainer takes for every batch (and ``clusterkit.testing``
for its checks): the step cache and the ``on_step_start`` hooks (:meth:`Stepper.prepare`), the
loss terms of the ``compute_losses`` hooks (:func:`compute_terms`, run through the DDP-wrapped
:class:`StepLosses`), backward, the non-finite policy
(:class:`~clusterkit.engine.divergence.Divergence`), ``before_optimizer_step``, the optimiser
step and ``after_step``.  :func:`lr_at` and :func:`lr_for_step` are the schedule.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import ClusterkitError, PluginError, RecipeError
from ..plugin_manager import HookDispatcher
from ..recipe import Recipe
from ..state import StepCache, TrainState
from .divergence import Divergence

__all__ = ["lr_at", "lr_for_step", "plugin_terms", "compute_terms", "StepLosses", "Stepper"]


def lr_at(t: float, sched, base_lr: float) -> float:
    """Learning rate at fractional epoch ``t``: linear warm-up, then cosine (or constant).

    With ``cosine_denominator="total"`` (the official ProPos/DigPro code) the cosine runs
    over ``(t - warmup) / epochs``, so the last lr is small but not 0; with
    ``"after_warmup"`` it runs over ``(t - warmup) / (epochs - warmup)`` and ends at 0.
    """
    warm = sched.warmup_epochs
    if t < warm:
        return base_lr * t / warm
    if sched.lr_schedule == "constant":
        return base_lr
    span = sched.epochs if sched.cosine_denominator == "total" else max(sched.epochs - warm, 1)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (t - warm) / span))


def lr_for_step(step: int, steps_per_epoch: int, sched, base_lr: float) -> float:
    """Learning rate of the training iteration after ``step`` iterations (0-based).

    ``schedule.lr_clock: official`` reads the schedule at fractional epoch
    ``(step + 1) / steps_per_epoch``, as the official code's ``n_iter`` counted from 1 (its
    first step trains with a small positive lr); ``zero_based`` at ``step / steps_per_epoch``.
    """
    tick = step + 1 if sched.lr_clock == "official" else step
    return lr_at(tick / steps_per_epoch, sched, base_lr)


def plugin_terms(hooks: HookDispatcher, cache: StepCache) -> list[tuple[str, str, Any]]:
    """``(plugin, term name, value)`` for every loss term the ``compute_losses`` hooks return, in
    call order, the values as returned; PluginError when two plugins return the same name."""
    terms: list[tuple[str, str, Any]] = []
    names: set[str] = set()
    for impl, result in hooks.call("compute_losses", cache=cache):
        for name, value in (result or {}).items():
            if name in names:
                raise PluginError(f"Plugin '{impl}' returns loss term '{name}', which another plugin "
                                  "also returns. Term names must be unique across plugins.")
            names.add(name)
            terms.append((impl, name, value))
    return terms


def compute_terms(hooks: HookDispatcher, cache: StepCache, use_amp: bool) -> dict[str, torch.Tensor]:
    """The step's loss terms {name: float32 scalar tensor} (under bfloat16 autocast with
    ``use_amp``); RecipeError when no plugin returns one."""
    device = cache.state.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        terms = {name: value for _, name, value in plugin_terms(hooks, cache)}
    if not terms:
        raise RecipeError("No plugin in the recipe returns a loss (compute_losses); add at least one loss "
                          "plugin under plugins:, e.g. diffused_sampling.")
    return {k: v.float() if torch.is_tensor(v) else torch.tensor(float(v), device=device)
            for k, v in terms.items()}


class StepLosses(nn.Module):
    """The step's loss computation as one module, so that DDP can wrap it: its forward is
    :func:`compute_terms`; its parameters are the whole model's (``state.model``)."""

    def __init__(self, model: nn.ModuleDict, hooks: HookDispatcher, use_amp: bool):
        super().__init__()
        self.model = model
        self.hooks = hooks
        self.use_amp = use_amp

    def forward(self, cache: StepCache) -> dict[str, torch.Tensor]:
        return compute_terms(self.hooks, cache, self.use_amp)


class Stepper:
    """One optimiser step on two views, and the learning rate of each iteration.

    ``losses``: :class:`StepLosses`, wrapped in DistributedDataParallel under torchrun;
    ``producers``: the step outputs ({name: fn(cache, view)}) of ``register_outputs``;
    ``base_lr``: the lr the schedule scales (``optim.lr``, linearly scaled by the batch when
    the recipe says so)."""

    def __init__(self, recipe: Recipe, state: TrainState, hooks: HookDispatcher, optimizer: torch.optim.Optimizer,
                 producers: dict, losses: nn.Module, divergence: Divergence, base_lr: float):
        self.recipe = recipe
        self.state = state
        self.hooks = hooks
        self.optimizer = optimizer
        self.producers = producers
        self.losses = losses
        self.divergence = divergence
        self.base_lr = base_lr

    def set_lr(self, iteration: int) -> float:
        """Set every parameter group's lr for training iteration ``iteration`` (0-based); returns
        the schedule's lr (before each group's ``lr_scale``)."""
        lr = lr_for_step(iteration, self.state.steps_per_epoch, self.recipe.schedule, self.base_lr)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        return lr

    def prepare(self, views, index: torch.Tensor) -> StepCache:
        """The first half of a step: the step cache of two views (B, C, S, S) and their dataset
        indices (B,), in the model's memory format, after the ``on_step_start`` hooks."""
        channels_last = self.recipe.run.channels_last
        views = [v.contiguous(memory_format=torch.channels_last) if channels_last else v for v in views]
        cache = StepCache(views, index, self.producers, self.state)
        self._call_state_hook("on_step_start", cache)
        return cache

    def step(self, views, index: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """One optimiser step on two augmented views (B, C, S, S) and their dataset indices (B,).

        Returns the detached loss terms plus ``loss`` (their sum), or None when a non-finite
        loss skipped the step (``run.nonfinite: skip``).  No host-device sync happens here
        except with ``nonfinite: skip``; non-finite terms are noted on the device and checked
        every ``run.sync_every`` steps (:meth:`Divergence.check_finite`).
        """
        cache = self.prepare(views, index)
        terms = self.losses(cache)
        total = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        if total.requires_grad:
            total.backward()  # under DDP every rank must run it, even for a step skipped below
        bad = self.divergence.check_step(terms)
        if bad is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self.divergence.nonfinite(bad, terms[bad].detach())
            return None
        self.hooks.call("before_optimizer_step", cache=cache)
        self.optimizer.step()
        self.state.step += 1
        self._call_state_hook("after_step", cache)
        terms["loss"] = total.detach()
        return {k: v.detach() for k, v in terms.items()}

    def _call_state_hook(self, hook: str, cache: StepCache) -> None:
        """Call ``on_step_start`` or ``after_step``, the hooks that update plugin state (EMA,
        banks, regrouping k-means) and so fail first on a diverged model: such a failure is
        reported as the divergence it is (:meth:`Divergence.check_diverged`)."""
        try:
            self.hooks.call(hook, cache=cache)
        except ClusterkitError:
            raise
        except Exception:  # a plugin failing on NaN/inf (a diverged step) is a divergence, said as such
            self.divergence.check_diverged(hook)
            raise
