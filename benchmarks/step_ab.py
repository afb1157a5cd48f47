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
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="applied to both A and B")
    parser.add_argument("--a", action="append", default=[], metavar="KEY=VALUE", help="A's own overrides")
    parser.add_argument("--b", action="append", default=[], metavar="KEY=VALUE", help="B's own overrides")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5, help="untimed pairs first")
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each")
    parser.add_argument("--out", default="benchmarks/results/step_ab.md")
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
    batch = next(iter(trainers["A"].loader))
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for pair in range(args.warmup + args.steps):
        for name in ("A", "B") if pair % 2 == 0 else ("B", "A"):
            seconds = timed_step(trainers[name], batch)
            if pair >= args.warmup:
                times[name].append(seconds)

    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    low = {k: min(v) * 1000 for k, v in times.items()}
    recipe = trainers["A"].recipe
    command = " ".join(["python", "benchmarks/step_ab.py", *sys.argv[1:]])

    def shown(sets: list[str]) -> str:
        return " ".join(f"`{s}`" for s in sets) or "(none)"

    lines = [
        "# A training step under two sets of overrides (CPU)",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {torch.get_num_threads()} torch threads, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, Python {platform.python_version()}.",
        "",
        f"Recipe: `{args.recipe}` {' '.join(f'`--set {o}`' for o in args.overrides)}".rstrip()
        + f" (`{recipe.model.backbone}`, batch {recipe.data.batch_size}, {recipe.data.image_size} px, "
        f"plugins {', '.join(recipe.plugins)}). One loader batch reused; {args.warmup} untimed pairs, then "
        f"{args.steps} timed steps of each, interleaved.",
        "",
        "| variant | overrides | median ms / step | min ms / step |",
        "|---|---|---:|---:|",
        *(f"| {k} | {shown(variants[k])} | {med[k]:.1f} | {low[k]:.1f} |" for k in trainers),
        "",
        f"B / A: **{med['B'] / med['A']:.3f}x** (medians), {low['B'] / low['A']:.3f}x (minima).",
        "",
    ]
    text = "\n".join(lines)
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
