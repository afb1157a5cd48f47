"""A training step with and without ``run.channels_last``, side by side in one process.

Builds two trainers for the same recipe (default ``recipes/quickstart.yaml``), identical but
for ``run.channels_last`` (false: the model and the views in torch's default NCHW layout;
true: both in channels_last), does one E-step in each, and times their full ``Trainer.step``
(augmentation of one loader batch, forward of both views through the online and target
networks, every loss, backward, optimiser step, EMA, plugin updates) interleaved: NCHW,
channels_last, NCHW, ... with the order alternating per pair, after ``--warmup`` pairs.
Reported: the median and minimum ms per step of each layout and their ratios.

The two layouts use different convolution kernels, so their float rounding differs and a run
with one layout does not repeat a run with the other step for step (the clustering it reaches
is another draw of the same method); this script measures speed only.

Usage (from the repository root; nothing else should run on the machine)::

    python benchmarks/channels_last_step.py                       # quickstart, 2 threads
    python benchmarks/channels_last_step.py --recipe benchmarks/recipes/fmnist_digpro.yaml --set data.batch_size=64

Writes ``--out`` (default benchmarks/results/channels_last_step.md) and prints it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from step_setup import timed_step, trainer_after_warmup  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5, help="untimed pairs first")
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each layout")
    parser.add_argument("--out", default="benchmarks/results/channels_last_step.md")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    trainers = {}
    for layout in ("NCHW", "channels_last"):
        sets = [*args.overrides, "run.device=cpu", f"run.channels_last={str(layout == 'channels_last').lower()}"]
        trainers[layout] = trainer_after_warmup(args.recipe, sets, args.threads, "clusterkit-channels-last-")
    batch = next(iter(trainers["NCHW"].loader))
    times: dict[str, list[float]] = {layout: [] for layout in trainers}
    for pair in range(args.warmup + args.steps):
        order = list(trainers) if pair % 2 == 0 else list(reversed(trainers))
        for layout in order:
            seconds = timed_step(trainers[layout], batch)
            if pair >= args.warmup:
                times[layout].append(seconds)

    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    low = {k: min(v) * 1000 for k, v in times.items()}
    recipe = trainers["NCHW"].recipe
    command = " ".join(["python", "benchmarks/channels_last_step.py", *sys.argv[1:]])
    lines = [
        "# A training step with and without `run.channels_last` (CPU)",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {torch.get_num_threads()} torch threads, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, Python {platform.python_version()}.",
        "",
        f"Recipe: `{args.recipe}` {' '.join(f'`--set {o}`' for o in args.overrides)}".rstrip()
        + f" (`{recipe.model.backbone}` {recipe.model.backbone_kwargs or ''}, batch {recipe.data.batch_size}, "
        f"{recipe.data.image_size} px, plugins {', '.join(recipe.plugins)}). One loader batch reused; "
        f"{args.warmup} untimed pairs, then {args.steps} timed steps of each layout, interleaved.",
        "",
        "| layout | median ms / step | min ms / step |",
        "|---|---:|---:|",
        *(f"| {k} | {med[k]:.1f} | {low[k]:.1f} |" for k in trainers),
        "",
        f"NCHW / channels_last: **{med['NCHW'] / med['channels_last']:.2f}x** (medians), "
        f"{low['NCHW'] / low['channels_last']:.2f}x (minima).",
        "",
    ]
    text = "\n".join(lines)
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
