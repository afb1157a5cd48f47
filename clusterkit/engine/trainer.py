"""The Trainer: one recipe's run, as the composition of the engine's parts.

:func:`~clusterkit.engine.setup.build_training` builds the run (device, plugins, data, model,
optimiser, DDP); the loop is :class:`~clusterkit.engine.step.Stepper` (one optimisation step and
the lr), :class:`~clusterkit.engine.divergence.Divergence` (the non-finite policy),
:class:`~clusterkit.engine.evaluation.RunEvaluation` (features, metrics, baselines),
:class:`~clusterkit.engine.resume.Checkpoints` (checkpoints and resume) and
:class:`~clusterkit.engine.reporting.Reporter` (progress, metrics.jsonl, summary.json).
Plugins do the method-specific work through the hooks of :mod:`clusterkit.hookspecs`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, TypeVar

import torch
from timm.utils import distribute_bn
from torch import nn

from .. import distributed
from ..cluster import KMeansPredictor
from ..data.pipeline import TrainPipeline
from ..plugin_manager import HookDispatcher
from ..recipe import Recipe
from ..rundir import RunDir
from ..state import Prediction, TrainState
from .divergence import Divergence, NonfiniteWatch
from .evaluation import Evaluator, RunEvaluation
from .reporting import EpochProgress, Reporter
from .resume import Checkpoints
from .setup import build_training
from .setup import load_data as load_recipe_data
from .step import Stepper

__all__ = ["Trainer", "built"]

T = TypeVar("T")


def built(part: T | None) -> T:
    """``part``, one of the trainer's attributes that :meth:`Trainer.build` makes (RuntimeError
    while it is None, before build())."""
    if part is None:
        raise RuntimeError("The trainer is not built yet: call build() (fit() does) before the loop's steps.")
    return part


class Trainer:
    """Runs one recipe: ``Trainer(recipe, run_dir).fit()`` returns the summary dict.

    :meth:`fit` is the composition of the public steps, which notebooks, benchmarks and
    ``clusterkit.testing`` may also call one by one::

        trainer.build()                      # plugins, data, model, optimiser
        first = trainer.begin_run()          # resume or start; recipe.yaml, baselines
        for epoch in range(first, epochs):
            trainer.begin_epoch(epoch)       # stage, data order, on_epoch_start, e_step
            for batch in trainer.loader:
                trainer.train_step(batch)    # lr, augment, one optimiser step, logging
            trainer.end_epoch()              # evaluate, on_epoch_end, metrics, checkpoint
        trainer.summary()                    # summary.json

    Lower level: :meth:`set_lr` and :meth:`step` (one optimiser step on given views),
    :meth:`evaluate`, :meth:`embed`, :meth:`embed_dataset`, :meth:`predict`; ``hooks`` (a
    :class:`~clusterkit.plugin_manager.HookDispatcher`) calls the plugins.  Every attribute
    exists from construction on; those :meth:`build` makes are None before it.
    """

    #: the hook dispatcher class (``clusterkit.testing`` uses one that records ``setup``)
    dispatcher_class: type[HookDispatcher] = HookDispatcher

    def __init__(self, recipe: Recipe, run_dir: Path | str, resume: bool = False, available_plugins=None):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.available_plugins = available_plugins
        self.history: list[dict] = []          # the per-epoch records of this run (resumed ones included)
        self.eval_metrics: dict = {}           # the last evaluation's metrics
        # what build() makes (see clusterkit.engine.setup): the run's components ...
        self.device: torch.device | None = None
        self.pm: Any = None
        self.plugins: dict[str, Any] | None = None    # {recipe name: plugin instance}
        self.hooks: HookDispatcher | None = None
        self.train_ds: Any = None
        self.eval_ds: Any = None
        self.pipeline: TrainPipeline | None = None
        self.loader: Any = None                        # pipeline.loader: the batches of an epoch
        self.augment: Any = None                       # pipeline.augment (None with data.pipeline: per_image)
        self.state: TrainState | None = None
        self.core_predictor: KMeansPredictor | None = None
        self.producers: dict | None = None             # step outputs {name: fn(cache, view)}
        self.optimizer: torch.optim.Optimizer | None = None
        self.base_lr: float | None = None
        self.step_losses: nn.Module | None = None      # the loss computation (DDP-wrapped under torchrun)
        self.use_amp = False                           # bf16 autocast on CUDA (run.amp)
        self.cpu_amp = False                           # bf16 autocast of the model's modules on the CPU (run.amp_cpu)
        # ... and the parts of the loop
        self.divergence: Divergence | None = None
        self.nonfinite: NonfiniteWatch | None = None   # divergence.watch
        self.stepper: Stepper | None = None
        self.evaluator: Evaluator | None = None
        self.evaluation: RunEvaluation | None = None
        self.checkpoints: Checkpoints | None = None
        self.reporter: Reporter | None = None
        self._epoch: EpochProgress | None = None
        self._wall_before = 0.0                        # seconds trained before a resume
        self._t_start = time.perf_counter()

    def load_data(self) -> tuple[Any, Any]:
        """(training dataset, evaluation dataset): :func:`clusterkit.engine.setup.load_data`
        (``clusterkit.testing`` builds its synthetic data here)."""
        return load_recipe_data(self.recipe)

    # -- the run ----------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train the recipe (or resume it, ``resume=True``) to its last epoch; returns the
        summary that is also written to ``summary.json``."""
        self.build()
        first_epoch = self.begin_run()
        for epoch in range(first_epoch, self.recipe.schedule.epochs):
            self.begin_epoch(epoch)
            for batch in self.loader:
                self.train_step(batch)
            self.end_epoch()
        return self.summary()

    def build(self) -> None:
        """Load the plugins and the data, build the model, the plugins' modules, the optimiser
        and (under torchrun) DDP, then the parts of the loop: everything a run needs before its
        first epoch."""
        r = self.recipe
        run = build_training(r, self.load_data, self.available_plugins, self.dispatcher_class)
        m, ps = run.model, run.model.plugin_set
        self.device, self.pm, self.plugins, self.hooks = run.device, ps.pm, ps.plugins, ps.hooks
        self.train_ds, self.eval_ds, self.pipeline = run.train_ds, run.eval_ds, run.pipeline
        self.loader, self.augment = run.pipeline.loader, run.pipeline.augment
        self.state, self.core_predictor, self.producers = m.state, m.core_predictor, m.producers
        self.optimizer, self.base_lr, self.step_losses = run.optimizer, run.base_lr, run.step_losses
        self.use_amp, self.cpu_amp = m.use_amp, run.cpu_amp
        self.divergence = Divergence(r, m.state, self.run_dir)
        self.nonfinite = self.divergence.watch
        self.stepper = Stepper(r, m.state, ps.hooks, run.optimizer, m.producers, run.step_losses, self.divergence,
                               run.base_lr)
        self.evaluator, self.evaluation = m.evaluator, built(m.evaluation)
        self.checkpoints = Checkpoints(r, self.run_dir, m.state, run.optimizer, ps.plugins, m.core_predictor,
                                       run.train_ds, self.divergence, self.evaluation)
        self.reporter = Reporter(r, self.run_dir, run.device)

    def begin_run(self) -> int:
        """Resume from the run directory's checkpoint (``resume=True``; the checkpoint and the
        recipe are checked before anything is written) or write ``recipe.yaml``; compute the
        baselines.  Returns the first epoch to train (0-based)."""
        evaluation = built(self.evaluation)
        if self.resume:
            first_epoch, self.history, self._wall_before = built(self.checkpoints).restore()
        else:
            first_epoch, self.history, self._wall_before = 0, [], 0.0
            if distributed.is_main():
                RunDir(self.run_dir).write_recipe(self.recipe)
        evaluation.compute_baselines()
        self._t_start = time.perf_counter()
        self.eval_metrics = next((h for h in reversed(self.history) if "collapse_share" in h), {})  # last evaluation
        return first_epoch

    def begin_epoch(self, epoch: int) -> None:
        """Enter epoch ``epoch`` (0-based): its stage and the plugins it switches off, its data
        order (a function of run.seed and the epoch only), ``on_epoch_start``, and the E-step
        when one is due (before the first epoch, then every ``e_step.every`` epochs)."""
        state, hooks, r = built(self.state), built(self.hooks), self.recipe
        previous = state.stage
        state.epoch = epoch
        stage = r.stage_at(epoch)
        state.stage = stage.name if stage is not None else None
        hooks.inactive = frozenset(r.inactive_plugins(epoch))
        if stage is not None and stage.name != previous:
            built(self.reporter).stage(stage.name, epoch, [n for n in r.plugins if n not in hooks.inactive])
        state.scalars.clear()  # what plugins log (state.log) belongs to the epoch that logged it
        self._epoch = built(self.reporter).open_epoch(epoch, state.steps_per_epoch)
        sampler = self.loader.sampler
        if isinstance(sampler, torch.utils.data.DistributedSampler):
            sampler.set_epoch(epoch)
        else:
            self.loader.generator.manual_seed(r.run.seed * 100_003 + epoch)
        hooks.call("on_epoch_start")
        if epoch == 0 or epoch % r.e_step.every == 0:
            t0 = time.perf_counter()
            hooks.call("e_step")
            built(self.evaluation).check_pseudo_labels()
            self._epoch.e_step_seconds = time.perf_counter() - t0

    def train_step(self, batch) -> dict[str, torch.Tensor] | None:
        """One training iteration on a batch of :attr:`loader`: set the lr, make the two views
        (``data.pipeline``), run :meth:`step`, and account for it (epoch means, metrics.jsonl
        every ``run.log_every`` steps, the progress bar).  Returns the detached loss terms, or
        None for a step skipped as non-finite (``run.nonfinite: skip``)."""
        state, ep, stepper, run = built(self.state), built(self._epoch), built(self.stepper), self.recipe.run
        divergence, reporter = built(self.divergence), built(self.reporter)
        state.step_in_epoch = ep.batches
        ep.lr = stepper.set_lr(state.epoch * state.steps_per_epoch + ep.batches)
        ep.batches += 1
        views, index = built(self.pipeline).views(batch)
        terms = stepper.step(views, index)
        ep.bar.update(1)
        if terms is None:
            return None
        ep.add(terms, index.shape[0] * distributed.world_size())
        # host syncs of the loop: here every run.log_every and run.sync_every steps (and in
        # the step every step under run.nonfinite: skip)
        if state.step % run.log_every == 0:
            divergence.check_finite()
            reporter.log_step(state, ep.lr, terms)
        if ep.done % run.sync_every == 0:
            divergence.check_finite()
            reporter.show_progress(ep, state.scalars)
        return terms

    def end_epoch(self) -> dict:
        """Close the epoch: evaluate when due (every ``eval.every`` epochs and at the last),
        ``on_epoch_end``, the epoch's record in metrics.jsonl and the checkpoint.  Returns the
        record (loss means, lr, NMI/ACC/ARI and quality measures when evaluated, seconds)."""
        state, r, ep, reporter = built(self.state), self.recipe, built(self._epoch), built(self.reporter)
        epoch = state.epoch
        ep.bar.close()
        built(self.divergence).check_finite()  # before anything is evaluated or checkpointed
        if distributed.is_distributed():
            distribute_bn(state.model, distributed.world_size(), reduce=True)  # one BN state on every rank
        metrics = {"epoch": epoch + 1, "step": state.step, "lr": ep.lr, **reporter.epoch_means(ep.sums, ep.done),
                   **state.scalars}
        if state.stage is not None:
            metrics["stage"] = state.stage
        if ep.e_step_seconds is not None:
            metrics["e_step_seconds"] = ep.e_step_seconds  # part of "seconds": the E-step opens the epoch
        if (epoch + 1) % r.eval.every == 0 or epoch + 1 == r.schedule.epochs:
            t0 = time.perf_counter()
            self.eval_metrics = built(self.evaluation).evaluate()
            metrics.update(self.eval_metrics)
            metrics["eval_seconds"] = time.perf_counter() - t0  # its feature pass is reused by the next E-step
        built(self.hooks).call("on_epoch_end", metrics=metrics)
        metrics["seconds"] = time.perf_counter() - ep.start
        self.history.append(metrics)
        reporter.write_jsonl(metrics)
        built(self.checkpoints).save(epoch, self._wall(), self.history)
        reporter.epoch_line(metrics, self.history)
        return metrics

    def summary(self) -> dict:
        """The run's summary (rank 0 also writes it to ``summary.json``): final metrics and
        label-free quality, the baselines, the evaluation protocol, time, memory, versions."""
        return built(self.reporter).summary(
            evaluation=built(self.evaluation), hooks=built(self.hooks), state=built(self.state),
            history=self.history, eval_metrics=self.eval_metrics, wall=self._wall(),
            skipped_steps=built(self.divergence).skipped_steps)

    def _wall(self) -> float:
        """Seconds this run has trained, those before a resume included."""
        return self._wall_before + time.perf_counter() - self._t_start

    # -- lower level ------------------------------------------------------------------------------
    def set_lr(self, iteration: int) -> float:
        """Set every parameter group's lr for training iteration ``iteration`` (0-based)."""
        return built(self.stepper).set_lr(iteration)

    def step(self, views, index: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """One optimiser step on two views (B, C, S, S) and their indices (B,): :meth:`Stepper.step`."""
        return built(self.stepper).step(views, index)

    def evaluate(self) -> dict:
        """Metrics of the eval data now: :meth:`RunEvaluation.evaluate`."""
        return built(self.evaluation).evaluate()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Features (B, D) of transformed evaluation images (B, C, S, S): :meth:`Evaluator.embed`."""
        return built(self.evaluator).embed(images)

    def embed_dataset(self, ds, batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
        """Features (N, D) of every image of ``ds``: :meth:`Evaluator.embed_dataset`."""
        return built(self.evaluator).embed_dataset(ds, batch_size, progress)

    def predict(self, features: torch.Tensor, fit: bool = True) -> Prediction:
        """Predictions for features (N, D): :meth:`Evaluator.predict`."""
        return built(self.evaluator).predict(features, fit)

    @property
    def last_prediction(self) -> Prediction | None:
        """The last evaluation's predictions (None before one)."""
        return None if self.evaluation is None else self.evaluation.last_prediction

    @property
    def skipped_steps(self) -> int:
        """Optimiser steps skipped as non-finite so far (``run.nonfinite: skip``)."""
        return 0 if self.divergence is None else self.divergence.skipped_steps

    @property
    def collapse_warnings(self) -> list[dict]:
        """``[{epoch, kind, value}]``: the collapse warnings of the run so far."""
        return [] if self.evaluation is None else self.evaluation.collapse_warnings
