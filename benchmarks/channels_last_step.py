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
import statistics

import torch
from step_setup import add_step_options, interleaved_seconds, report_head, trainer_after_warmup, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_options(parser, "benchmarks/results/channels_last_step.md")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    trainers = {}
    for layout in ("NCHW", "channels_last"):
        sets = [*args.overrides, "run.device=cpu", f"run.channels_last={str(layout == 'channels_last').lower()}"]
        trainers[layout] = trainer_after_warmup(args.recipe, sets, args.threads, "clusterkit-channels-last-")
    times = interleaved_seconds(trainers, args.warmup, args.steps)

    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    low = {k: min(v) * 1000 for k, v in times.items()}
    lines = [
        *report_head("A training step with and without `run.channels_last` (CPU)", "benchmarks/channels_last_step.py",
                     args, trainers["NCHW"], "each layout"),
        "| layout | median ms / step | min ms / step |",
        "|---|---:|---:|",
        *(f"| {k} | {med[k]:.1f} | {low[k]:.1f} |" for k in trainers),
        "",
        f"NCHW / channels_last: **{med['NCHW'] / med['channels_last']:.2f}x** (medians), "
        f"{low['NCHW'] / low['channels_last']:.2f}x (minima).",
        "",
    ]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
