"""What the step benchmarks share: a trainer brought to its first step after the warm-up, and
one step of it through the trainer's own augmentation.

Used by ``framework_overhead.py`` (hooks against a plain function), ``channels_last_step.py``
(NCHW against channels_last) and ``step_ab.py`` (any two sets of overrides), which time
``Trainer.step`` on the same footing; the last two also share their options, the interleaved
timing loop and the head of their report.
"""

from __future__ import annotations

import argparse
import atexit
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
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


def add_step_options(parser: argparse.ArgumentParser, default_out: str) -> None:
    """The options of the two-trainer step benchmarks: ``--recipe``, ``--set`` (both trainers),
    ``--threads``, ``--warmup``, ``--steps`` and ``--out``."""
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="applied to both trainers")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5, help="untimed pairs first")
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each")
    parser.add_argument("--out", default=default_out)


def interleaved_seconds(trainers: dict[str, Trainer], warmup: int, steps: int) -> dict[str, list[float]]:
    """Time the two ``trainers`` on the first one's first loader batch, interleaved with the order
    alternating per pair (A B, B A, ...), after ``warmup`` untimed pairs: ``steps`` seconds each."""
    first, second = trainers
    batch = next(iter(trainers[first].loader))
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for pair in range(warmup + steps):
        for name in (first, second) if pair % 2 == 0 else (second, first):
            seconds = timed_step(trainers[name], batch)
            if pair >= warmup:
                times[name].append(seconds)
    return times


def report_head(title: str, script: str, args: argparse.Namespace, trainer: Trainer, what: str) -> list[str]:
    """The first lines of a step benchmark's markdown: title, command (relative to the repository),
    date and machine, and the recipe with the timing protocol (``what`` names the timed steps)."""
    recipe = trainer.recipe
    command = " ".join(["python", script, *sys.argv[1:]])
    return [
        f"# {title}",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {torch.get_num_threads()} torch threads, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, Python {platform.python_version()}.",
        "",
        f"Recipe: `{args.recipe}` {' '.join(f'`--set {o}`' for o in args.overrides)}".rstrip()
        + f" (`{recipe.model.backbone}` {recipe.model.backbone_kwargs or ''}, batch {recipe.data.batch_size}, "
        f"{recipe.data.image_size} px, plugins {', '.join(recipe.plugins)}). One loader batch reused; "
        f"{args.warmup} untimed pairs, then {args.steps} timed steps of {what}, interleaved.",
        "",
    ]


def write_report(lines: list[str], out: str) -> None:
    """Write a report's ``lines`` to ``out`` (relative to the repository root) and print them."""
    text = "\n".join(lines)
    path = REPO / out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
