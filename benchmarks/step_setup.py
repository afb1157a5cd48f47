"""What the step benchmarks share: a trainer brought to its first step after the warm-up, and
one step of it through the trainer's own augmentation.

Used by ``framework_overhead.py`` (hooks against a plain function), ``channels_last_step.py``
(NCHW against channels_last) and ``step_ab.py`` (any two sets of overrides), which time
``Trainer.step`` on the same footing.
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clusterkit.recipe import load_recipe  # noqa: E402
from clusterkit.trainer import Trainer  # noqa: E402


def trainer_after_warmup(recipe_path: str, sets: list[str], threads: int, scratch_prefix: str) -> Trainer:
    """A trainer for ``recipe_path`` with ``sets`` (``KEY=VALUE`` overrides; ``run.threads`` and
    ``run.progress=false`` are added) built (model, plugins, optimiser, augmentation), one E-step
    done, in the first epoch after the warm-up so that every loss term is active, its lr set for
    that epoch.  Its run folder is a scratch folder removed at exit (a step writes nothing there)."""
    recipe = load_recipe(recipe_path, [*sets, f"run.threads={threads}", "run.progress=false"])
    run_dir = Path(tempfile.mkdtemp(prefix=scratch_prefix))
    atexit.register(shutil.rmtree, run_dir, ignore_errors=True)
    trainer = Trainer(recipe, run_dir)
    trainer.build()
    torch.set_num_threads(threads)
    epoch = recipe.schedule.warmup_epochs
    trainer.begin_epoch(epoch)
    trainer.set_lr(epoch * trainer.state.steps_per_epoch)
    return trainer


def augmented_step(trainer: Trainer, images: torch.Tensor, index: torch.Tensor):
    """The trainer's step on one loader batch of uint8 images: its view pipeline, then
    ``Trainer.step`` (``train_step`` without the lr schedule and the epoch accounting)."""
    views, index = trainer.pipeline.views((images, None, index))
    return trainer.step(views, index)


def timed_step(trainer: Trainer, batch) -> float:
    """Seconds for one :func:`augmented_step` on a loader ``batch`` (augmentation included)."""
    images, _, index = batch
    start = time.perf_counter()
    augmented_step(trainer, images, index)
    return time.perf_counter() - start
