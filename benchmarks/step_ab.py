"""A training step under two sets of recipe overrides, side by side in one process.

Builds two trainers for the same recipe (default ``recipes/quickstart.yaml``), A with the
``--a`` overrides and B with the ``--b`` overrides, does one E-step in each, and times their full
``Trainer.step`` on the same loader batch (augmentation of the uint8 batch, forwards, every loss,
backward, optimiser step, EMA, plugin updates) interleaved, A, B, B, A, ..., after ``--warmup``
untimed pairs.  Reported: the median and minimum ms per step of each and their ratio.  This is
how to ask what one setting costs per step without two runs' machine noise between them.

Usage (from the repository root; nothing else should run on the machine)::

    python benchmarks/step_ab.py --a data.augment.rotation=0 --b data.augment.rotation=15 \\
        --out benchmarks/results/rotation_step.md

Writes ``--out`` (default benchmarks/results/step_ab.md) and prints it.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from step_setup import add_step_options, interleaved_seconds, report_head, trainer_after_warmup, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_options(parser, "benchmarks/results/step_ab.md")
    parser.add_argument("--a", action="append", default=[], metavar="KEY=VALUE", help="A's own overrides")
    parser.add_argument("--b", action="append", default=[], metavar="KEY=VALUE", help="B's own overrides")
    args = parser.parse_args()
    if not args.a and not args.b:
        parser.error("give --a and/or --b overrides: with neither, A and B are the same trainer setting")

    torch.set_num_threads(args.threads)
    variants = {"A": args.a, "B": args.b}
    trainers = {
        name: trainer_after_warmup(args.recipe, [*args.overrides, "run.device=cpu", *own], args.threads,
                                   "clusterkit-step-ab-")
        for name, own in variants.items()
    }
    times = interleaved_seconds(trainers, args.warmup, args.steps)

    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    low = {k: min(v) * 1000 for k, v in times.items()}

    def shown(sets: list[str]) -> str:
        return " ".join(f"`{s}`" for s in sets) or "(none)"

    lines = [
        *report_head("A training step under two sets of overrides (CPU)", "benchmarks/step_ab.py", args,
                     trainers["A"], "each"),
        "| variant | overrides | median ms / step | min ms / step |",
        "|---|---|---:|---:|",
        *(f"| {k} | {shown(variants[k])} | {med[k]:.1f} | {low[k]:.1f} |" for k in trainers),
        "",
        f"B / A: **{med['B'] / med['A']:.3f}x** (medians), {low['B'] / low['A']:.3f}x (minima).",
        "",
    ]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
