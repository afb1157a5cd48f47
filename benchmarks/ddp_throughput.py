"""DDP on the CPU: 2 gloo processes x 1 thread against 1 process x 2 threads (issue 6, for information).

The same recipe (default ``recipes/quickstart.yaml``: DigPro on scikit-learn's digits), the
same *global* batch (``data.batch_size``; torchrun splits it evenly over the processes) and the
same number of epochs, trained in three configurations, each its own subprocess:

  a. ``1p x 2t``  one process, ``run.threads=2`` (OMP_NUM_THREADS=2)::

         python -m clusterkit run RECIPE --out WORKDIR/a_1p2t_rN --force --set run.threads=2 ...

  b. ``2p x 1t``  two processes started by torchrun, gloo, ``run.threads=1`` (OMP_NUM_THREADS=1)::

         python -m torch.distributed.run --standalone --nproc_per_node=2 \\
             -m clusterkit run RECIPE --out WORKDIR/b_2p1t_rN --force --set run.threads=1 ...

  c. ``1p x 1t``  one process, ``run.threads=1`` (only with ``--reference``): what one core does.

All runs get CUDA_VISIBLE_DEVICES="" and ``--set run.device=cpu run.progress=false
eval.pixel_baseline=never eval.every=<epochs>`` (the model is evaluated only after the last
epoch; the pixel k-means baseline is skipped: neither is training).  Within one script run the
configurations alternate (repeat 1: a, b[, c]; repeat 2: [c,] b, a; ...), so that a slow phase
of the machine does not land on one configuration only.  Each run's folder is deleted before the
run (and ``--force`` is passed as well).

What is timed.  clusterkit's trainer records, per epoch, the seconds from the start of the
epoch to the end of its checkpoint (metrics.jsonl ``seconds``; summary.json
``seconds_per_epoch`` is their mean).  The per-step records of metrics.jsonl carry no time, so
the pure training loop cannot be isolated from the outside; the script reports:

* **steady epochs**: the median ``seconds`` of the epochs that are neither the first (start-up:
  allocator, first batches) nor the last (it holds the evaluation).  Such an epoch is the
  training loop over all its steps *plus* the E-step that the recipe runs at its start
  (``e_step.every: 1`` in the quickstart: features of all 1,797 images and k-means, sharded
  over the processes under DDP), the end-of-epoch hooks, the BN synchronisation (DDP) and
  the checkpoint.  Needs at least 3 epochs (the default is 5), so ``--quick`` has none.
* **all epochs**: summary.json's ``seconds_per_epoch``, the mean over every epoch, the first
  and the evaluated last included.
* images/s = images trained per epoch / seconds, where images per epoch = optimiser steps per
  epoch x global batch (summary.json ``steps`` / ``epochs`` x ``data.batch_size``; with
  drop_last this is a little less than ``num_train``, the dataset size, also shown).
* the launch wall time of the subprocess (Python start-up, imports, torchrun's rendezvous, data
  loading, all epochs): for information.

The final NMI of every run is listed for information: DDP changes the data order, the
per-process batch statistics and the E-step's sharding, so runs do not agree bit for bit.

Usage (from the repository root)::

    python benchmarks/ddp_throughput.py [--recipe recipes/quickstart.yaml] [--epochs 5]
        [--repeats 2] [--reference] [--workdir runs/bench_ddp]
        [--out benchmarks/results/ddp_throughput.md] [--extra-set KEY=VALUE ...]
    python benchmarks/ddp_throughput.py --quick     # 1 epoch, 1 repeat, prints the table only

The default (5 epochs, 2 repeats, a and b) takes about 2-3 minutes on 2 idle cores.  Run it
on an idle machine: the comparison is of two ways to use the same 2 cores, and any other job
on them distorts it (the load average before and after is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "results" / "ddp_throughput.md"


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    procs: int
    threads: int


CONFIGS = {
    "a": Config("a", "1 process x 2 threads", 1, 2),
    "b": Config("b", "2 processes x 1 thread (torchrun, gloo)", 2, 1),
    "c": Config("c", "1 process x 1 thread (reference)", 1, 1),
}


@dataclass
class Run:
    config: Config
    repeat: int
    launch_s: float
    summary: dict
    epoch_secs: list[float]
    steady_secs: list[float]
    batch_size: int
    extra: dict = field(default_factory=dict)

    @property
    def images_per_epoch(self) -> float:
        return self.summary["steps"] / self.summary["epochs"] * self.batch_size

    @property
    def s_epoch_all(self) -> float:
        return self.summary["seconds_per_epoch"]

    @property
    def s_epoch_steady(self) -> float | None:
        return statistics.median(self.steady_secs) if self.steady_secs else None

    @property
    def nmi(self) -> float | None:
        return (self.summary.get("metrics") or {}).get("nmi")


def command(cfg: Config, recipe: str, out: Path, sets: list[str]) -> list[str]:
    run = ["-m", "clusterkit", "run", recipe, "--out", str(out), "--force"]
    for s in sets + [f"run.threads={cfg.threads}"]:
        run += ["--set", s]
    if cfg.procs == 1:
        return [sys.executable, *run]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.procs}", *run]


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def run_one(cfg: Config, repeat: int, args, sets: list[str]) -> Run:
    out = Path(args.workdir) / f"{cfg.key}_{cfg.procs}p{cfg.threads}t_r{repeat}"
    shutil.rmtree(out, ignore_errors=True)
    log = Path(args.workdir) / "logs" / f"{out.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(cfg, args.recipe, out, sets)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(cfg.threads),
               MKL_NUM_THREADS=str(cfg.threads), PYTHONUNBUFFERED="1")
    print(f"[{cfg.key} r{repeat}] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=args.timeout)
        except subprocess.TimeoutExpired:
            sys.exit(f"[{cfg.key} r{repeat}] timed out after {args.timeout} s; log {log}:\n{tail(log)}")
    launch = time.perf_counter() - t0
    summary_path = out / "summary.json"
    if proc.returncode != 0 or not summary_path.is_file():
        sys.exit(f"[{cfg.key} r{repeat}] failed (exit code {proc.returncode}"
                 f"{'' if summary_path.is_file() else ', no summary.json'}); last lines of {log}:\n{tail(log)}")
    summary = json.loads(summary_path.read_text())
    if summary.get("world_size") != cfg.procs:
        sys.exit(f"[{cfg.key} r{repeat}] summary.json says world_size {summary.get('world_size')}, "
                 f"expected {cfg.procs}; log {log}")
    from clusterkit.show import epoch_records

    epochs = epoch_records(out)  # the per-epoch records (per-step ones carry no time)
    last = max(e["epoch"] for e in epochs)
    steady = [e["seconds"] for e in epochs if e["epoch"] not in (1, last) and "nmi" not in e]
    import yaml  # clusterkit's own dependency

    batch = yaml.safe_load((out / "recipe.yaml").read_text())["data"]["batch_size"]
    r = Run(cfg, repeat, launch, summary, [e["seconds"] for e in epochs], steady, batch)
    steady_txt = f"{r.s_epoch_steady:.2f}" if steady else "n/a"
    print(f"[{cfg.key} r{repeat}] done in {launch:.1f} s: s/epoch all {r.s_epoch_all:.2f}, steady {steady_txt}, "
          f"NMI {r.nmi}", file=sys.stderr, flush=True)
    return r


def environment() -> list[str]:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "?") if Path("/proc/cpuinfo").exists() \
        else platform.processor() or "?"
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    return [
        f"- CPU: {cpu}; {os.cpu_count()} logical CPUs, {affinity} usable by this process",
        f"- {platform.platform()}; Python {platform.python_version()}; torch {torch.__version__} "
        f"(gloo available: {torch.distributed.is_available() and torch.distributed.is_gloo_available()})",
        f"- clusterkit commit {commit} (working tree as it was)",
    ]


def busy_warning(load: tuple) -> list[str]:
    """A warning when other jobs shared the cores: with more runnable threads than cores, a
    multi-threaded process (a) can wait at each parallel region for a descheduled thread and
    slow down far more than the single-threaded ones (b, c), so the ratio then means little."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if max(load[0][0], load[1][0]) < 0.5 * cores:
        return []
    return ["", f"**Warning: the machine was busy** (1-min load average {load[0][0]:.2f} before, {load[1][0]:.2f} "
            f"after, on {cores} cores).  Under contention the 2-thread process (a) can stall at each parallel "
            "region until its descheduled thread runs again, which slows it far more than the single-threaded "
            "processes; these numbers may not measure DDP.  Rerun on an idle machine."]


def shown(path: str) -> str:
    """``path`` relative to the repository root when it lies inside it."""
    try:
        return str(Path(path).relative_to(REPO))
    except ValueError:
        return path


def fmt(x: float | None, nd: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def table(runs: list[Run], args, argv: list[str], sets: list[str], load: tuple, started: str) -> str:
    keys = [k for k in CONFIGS if any(r.config.key == k for r in runs)]
    by = {k: [r for r in runs if r.config.key == k] for k in keys}
    ipe = {k: statistics.median(r.images_per_epoch for r in by[k]) for k in keys}

    def stats(k: str, attr: str) -> tuple[float | None, float | None, float | None, float | None]:
        secs = [getattr(r, attr) for r in by[k]]
        if any(s is None for s in secs):
            return None, None, None, None
        med, best = statistics.median(secs), min(secs)
        return ipe[k] / med, ipe[k] / best, med, best

    lines = [
        "# DDP throughput on the CPU: 2 gloo processes x 1 thread vs 1 process x 2 threads",
        "",
        "For information (issue 6): no target.  Generated by `benchmarks/ddp_throughput.py`.",
        "",
        f"- Command: `{shlex.join(['python', *argv])}`",
        f"- Date: {started}",
        f"- Recipe: `{shown(args.recipe)}`, {args.epochs} epoch(s), global batch {by[keys[0]][0].batch_size}, "
        f"{by[keys[0]][0].summary['num_train']} training images; {args.repeats} repeat(s), order alternating",
        f"- Overrides for every run: `{' '.join('--set ' + s for s in sets)}` plus `--set run.threads=T`; "
        "CUDA_VISIBLE_DEVICES=\"\", OMP_NUM_THREADS=MKL_NUM_THREADS=T",
        f"- Load average (1/5/15 min) before: {' / '.join(f'{x:.2f}' for x in load[0])}; "
        f"after: {' / '.join(f'{x:.2f}' for x in load[1])}",
        *environment(),
        *busy_warning(load),
        "",
        "## Throughput",
        "",
        "images/s = images trained per epoch (optimiser steps per epoch x global batch) / seconds per epoch.  ",
        "*steady*: median epoch time over the epochs that are neither the first nor the last (training "
        "loop + the E-step at the start of every epoch + end-of-epoch hooks + BN sync under DDP + checkpoint; "
        "no evaluation).  *all*: summary.json's seconds_per_epoch, the mean over all epochs (first one and "
        "the evaluated last one included).  median / best over the repeats.",
        "",
        "| configuration | runs | images/epoch | steady images/s (median / best) | steady s/epoch (median / best) "
        "| all-epochs images/s (median / best) | all-epochs s/epoch (median / best) | launch wall s (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in keys:
        st, al = stats(k, "s_epoch_steady"), stats(k, "s_epoch_all")
        lines.append(f"| ({k}) {CONFIGS[k].label} | {len(by[k])} | {ipe[k]:.0f} "
                     f"| {fmt(st[0], 0)} / {fmt(st[1], 0)} | {fmt(st[2])} / {fmt(st[3])} "
                     f"| {fmt(al[0], 0)} / {fmt(al[1], 0)} | {fmt(al[2])} / {fmt(al[3])} "
                     f"| {statistics.median(r.launch_s for r in by[k]):.1f} |")
    lines.append("")
    if len({round(v) for v in ipe.values()}) > 1:
        lines += ["**Note**: the configurations train different numbers of images per epoch "
                  f"({', '.join(f'{k}: {ipe[k]:.0f}' for k in keys)}); images/s accounts for it, s/epoch does not.",
                  ""]
    for other in [k for k in keys if k != "a"]:
        if "a" not in keys:
            break
        parts = []
        for name, attr in (("steady", "s_epoch_steady"), ("all epochs", "s_epoch_all")):
            so, sa = stats(other, attr), stats("a", attr)
            if so[0] is None or sa[0] is None:
                parts.append(f"{name}: n/a")
            else:
                parts.append(f"{name}: {so[0] / sa[0]:.2f} (medians), {so[1] / sa[1]:.2f} (bests)")
        lines.append(f"- Ratio images/s ({other}) / (a): " + "; ".join(parts))
    lines += [
        "",
        "## Every run",
        "",
        "| configuration | repeat | order | world size | steps | s/epoch per epoch | steady s/epoch "
        "| summary s/epoch | wall_time_s | launch wall s | final NMI |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs):
        lines.append(f"| ({r.config.key}) {r.config.label} | {r.repeat} | {i + 1} | {r.summary['world_size']} "
                     f"| {r.summary['steps']} | {' '.join(f'{s:.2f}' for s in r.epoch_secs)} "
                     f"| {fmt(r.s_epoch_steady)} | {fmt(r.s_epoch_all)} | {r.summary['wall_time_s']:.1f} "
                     f"| {r.launch_s:.1f} | {fmt(r.nmi, 3)} |")
    lines += ["", "Final NMI for information only: the runs differ in data order, per-process batch "
              "statistics and E-step sharding, and a few epochs are far from the recipe's budget.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--recipe", default="recipes/quickstart.yaml")
    p.add_argument("--epochs", type=int, default=5, help="epochs per run (>= 3 for steady epochs)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--reference", action="store_true", help="also run (c) 1 process x 1 thread")
    p.add_argument("--workdir", default="runs/bench_ddp")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="markdown table (not written with --quick)")
    p.add_argument("--extra-set", action="append", default=[], metavar="KEY=VALUE",
                   help="further --set overrides for every run (results then are not the benchmark's)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run before giving up")
    p.add_argument("--quick", action="store_true", help="1 epoch, 1 repeat; prints the table, writes nothing")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.repeats = 1, 1
    if not Path(args.recipe).is_file():
        p.error(f"no recipe file {args.recipe!r}")
    args.recipe = str(Path(args.recipe).resolve())  # the runs start in the repository root
    args.workdir = str(Path(args.workdir).resolve())
    if args.epochs < 1 or args.repeats < 1:
        p.error("--epochs and --repeats must be at least 1")
    if args.extra_set and not args.quick and Path(args.out).resolve() == DEFAULT_OUT.resolve():
        p.error("--extra-set changes the benchmark; give another --out for its results")

    sets = [f"schedule.epochs={args.epochs}", "run.device=cpu", "run.progress=false",
            "eval.pixel_baseline=never", f"eval.every={args.epochs}", *args.extra_set]
    keys = ["a", "b"] + (["c"] if args.reference else [])
    started = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    load_before = os.getloadavg()
    runs: list[Run] = []
    for rep in range(1, args.repeats + 1):
        for k in (keys if rep % 2 else keys[::-1]):
            runs.append(run_one(CONFIGS[k], rep, args, sets))
    load_after = os.getloadavg()
    text = table(runs, args, ["benchmarks/ddp_throughput.py", *argv], sets, (load_before, load_after), started)
    print(text)
    if not args.quick:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
