"""Seconds per epoch of clusterkit against the official ProPos / DigPro (/ CC) code in the parity setting (issue 24).

Item 4 of issue 24: the speed benchmark against the code clusterkit replaces.

Trains each method's official code and clusterkit's parity recipe (``benchmarks/parity/*_fmnist.yaml``)
through the machinery of ``benchmarks/parity.py`` (its children run each system in its own process, with
the same data, setting, shims and per-epoch records), **one run at a time, alternating** official and
clusterkit (the order reversed on every repeat), and times every epoch: the wall time from one E-step's
end to the next, i.e. an epoch of training plus the E-step (feature pass and k-means) and each system's
own per-epoch bookkeeping (clusterkit: its checkpoint and evaluation metrics, which share the E-step's
features and k-means; official: its logger).  CC has no E-step: its epoch is training plus the
evaluation pass of the cluster head.

Each run trains ``--untimed-epochs`` (default 1: data loading, allocator and cache warm-up) and then
``--timed-epochs`` (default 3) epochs of a ``--schedule-epochs`` schedule.  The report gives, per method,
the median s/epoch over the timed epochs of every run of each system and the ratio clusterkit / official
(issue 24's target: at most 0.6), and per run its epochs, the load average (``os.getloadavg``) before and
after it and the share of the CPUs other processes used while it ran (``/proc/stat`` minus this
benchmark's own processes; Linux only): a run that shared the cores is not a timing.

Levers, each measurable alone: ``--set KEY=VALUE`` overrides every clusterkit run's recipe (e.g.
``data.pipeline=batched``, ``run.channels_last=true``, ``run.amp_cpu=true``, ``run.compile=true``);
``--variant NAME KEY=VALUE ...`` adds a further clusterkit system with those overrides on top, timed in
the same alternation (e.g. ``--variant batched data.pipeline=batched --variant cl run.channels_last=true``).

Usage (from the repo root, in clusterkit's environment, on an otherwise idle machine)::

    python benchmarks/speed_vs_official.py --methods propos digpro        # 1 untimed + 3 timed epochs, 2 threads

    python benchmarks/speed_vs_official.py --methods propos --variant batched data.pipeline=batched \\
        --out benchmarks/results/speed_batched.md

    # any image folder instead of Fashion-MNIST (class sub-folders, or unlabeled images):
    python benchmarks/speed_vs_official.py --data-root ~/data/my_images --out /tmp/speed_mine.md

    # a smoke test of the plumbing (a few minutes; writes elsewhere):
    python benchmarks/speed_vs_official.py --methods propos --limit 256 --batch-size 128 \\
        --timed-epochs 1 --threads 1 --out /tmp/speed_smoke.md

The official side needs the checkouts and environment of ``bash benchmarks/setup_official.sh``
(``--official-root``, ``--official-python``); ``--systems clusterkit`` times clusterkit alone.
Writes ``--out`` (markdown) and the raw records next to it (``.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import parity  # noqa: E402  (benchmarks/parity.py: the runs, the data, the children)

DEFAULT_OUT = HERE / "results" / "speed_vs_official.md"
DEFAULT_WORK = Path("/tmp/clusterkit-speed")
#: Issue 24's target: clusterkit's s/epoch at most this fraction of the official code's.
TARGET = 0.6
#: A run during which other processes used more than this share of the CPUs is flagged.
BUSY_SHARE = 0.05


def log(msg: str) -> None:
    """Print a progress line at once."""
    print(msg, flush=True)


# --------------------------------------------------------------------------- CPU accounting


def cpu_snapshot() -> dict:
    """Wall clock, the machine's busy CPU seconds (``/proc/stat``, all cores; None off Linux) and the
    CPU seconds of this process and its waited-for children (the runs and their loader workers)."""
    import resource

    busy = None
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
        if fields and fields[0] == "cpu":
            ticks = [int(x) for x in fields[1:]]
            idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
            busy = (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user .. steal (guest is inside user)
    except (OSError, ValueError, IndexError):
        busy = None
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall": time.perf_counter(), "busy": busy, "self": own.ru_utime + own.ru_stime,
            "ours": own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime}


def _self_cpu(snapshot: dict) -> float:
    return float(snapshot.get("self", 0.0))


def descendant_cpu(root: int, proc: Path = Path("/proc")) -> dict[tuple[int, int], float]:
    """CPU seconds (user + system) so far of every live descendant of process ``root``, keyed by
    (pid, start time): one scan of ``/proc``. Empty off Linux."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, int, float]] = {}  # pid -> (parent, start, cpu seconds)
    for entry in proc.glob("[0-9]*"):
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue  # ended while we looked
        fields = raw[raw.rfind(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
        try:
            stats[int(entry.name)] = (int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / tick)
        except (IndexError, ValueError):
            continue
    out, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start, cpu) in stats.items():
            if ppid == parent:
                out[(pid, start)] = cpu
                frontier.append(pid)
    return out


class DescendantMeter:
    """Samples :func:`descendant_cpu` of this process every ``interval`` seconds in a thread, so
    that the CPU time of grandchildren that are never waited for (loader workers a run's process
    leaves behind) is counted as the benchmark's own, not as other work.  Use it as a context
    manager; ``seconds`` after the block: the CPU seconds of all descendants seen (the last up to
    ``interval`` seconds of each one's life are missed)."""

    def __init__(self, interval: float = 0.5):
        import threading

        self.interval, self.seen = interval, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while True:
            self.seen.update(descendant_cpu(os.getpid()))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> DescendantMeter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def seconds(self) -> float:
        return float(sum(self.seen.values()))


def others_share(before: dict, after: dict) -> float | None:
    """The share of all CPUs that processes other than this benchmark's kept busy between two snapshots."""
    if before["busy"] is None or after["busy"] is None:
        return None
    wall = after["wall"] - before["wall"]
    if wall <= 0:
        return None
    others = (after["busy"] - before["busy"]) - (after["ours"] - before["ours"])
    return max(0.0, others / (wall * (os.cpu_count() or 1)))


# --------------------------------------------------------------------------- runs


def systems_of(args) -> list[tuple[str, list[str]]]:
    """``(label, clusterkit overrides)`` of every system timed, official first: ``official`` (no
    overrides), ``clusterkit`` (``--set``) and each ``--variant`` (``--set`` plus its own)."""
    out: list[tuple[str, list[str]]] = []
    if "official" in args.systems:
        out.append(("official", []))
    if "clusterkit" in args.systems:
        out.append(("clusterkit", list(args.overrides)))
    for name, *overrides in args.variant:
        out.append((name, [*args.overrides, *overrides]))
    return out


def schedule(args) -> list[tuple[str, int, str, list[str]]]:
    """The runs in the order they are made: per method and repeat, every system once, one at a time,
    the order of the systems reversed on every other repeat (official, clusterkit, ... then ...,
    clusterkit, official).  Items: ``(method, repeat, label, overrides)``."""
    runs = []
    systems = systems_of(args)
    for method in args.methods:
        for rep in range(args.repeats):
            order = systems if rep % 2 == 0 else systems[::-1]
            runs += [(method, rep, label, overrides) for label, overrides in order]
    return runs


def parity_args(args, overrides: list[str]) -> argparse.Namespace:
    """The options of one run as ``parity.run_one`` takes them (always a fresh run: a timing is never reused)."""
    p = copy.copy(args)
    p.epochs = args.untimed_epochs + args.timed_epochs
    p.extra_set = list(overrides)
    p.clusterkit_raw_pixels = False
    p.rerun = True
    return p


def time_run(args, method: str, label: str, overrides: list[str], data_root: Path, dataset: str) -> dict:
    """One run of one system: its per-epoch records, load average and CPU accounting."""
    system = "official" if label == "official" else "clusterkit"
    load_before = os.getloadavg()
    before = cpu_snapshot()
    with DescendantMeter() as meter:
        records = parity.run_one(parity_args(args, overrides), method, system, args.seed, data_root, dataset)
    after = cpu_snapshot()
    load_after = os.getloadavg()
    # the waited-for children are in "ours" already; descendants never waited for (the official
    # code's loader workers) only in what the meter saw
    reaped = after["ours"] - before["ours"]
    after = {**after, "ours": before["ours"] + max(reaped, meter.seconds + _self_cpu(after) - _self_cpu(before))}
    return {"method": method, "system": label, "overrides": overrides, "records": records,
            "load_before": list(load_before), "load_after": list(load_after),
            "others_share": others_share(before, after), "wall_seconds": after["wall"] - before["wall"]}


def epoch_seconds(run: dict, untimed: int) -> tuple[list[float], list[float]]:
    """(untimed, timed) seconds per epoch of a run: epoch 0 is the untrained network's E-step (no
    training), epochs 1..untimed are the warm-up, the rest are timed."""
    secs = {r["epoch"]: r["seconds"] for r in run["records"] if r["epoch"] > 0 and r.get("seconds") is not None}
    epochs = sorted(secs)
    return [secs[e] for e in epochs[:untimed]], [secs[e] for e in epochs[untimed:]]


def e_step_seconds(run: dict) -> list[float]:
    """The seconds of each E-step that closed a trained epoch (records that have them: the
    feature pass over the data set and k-means, part of that epoch's seconds)."""
    return [r["e_step_seconds"] for r in run["records"] if r["epoch"] > 0 and r.get("e_step_seconds") is not None]


def summarise(runs: list[dict], untimed: int) -> dict:
    """Per method: each system's median s/epoch over the timed epochs of all its runs, each
    clusterkit system's ratio to the official median, and each system's median E-step seconds
    (where its records time the E-step)."""
    out: dict = {}
    e_steps: dict = {}
    for run in runs:
        _, timed = epoch_seconds(run, untimed)
        out.setdefault(run["method"], {}).setdefault(run["system"], []).extend(timed)
        e_steps.setdefault(run["method"], {}).setdefault(run["system"], []).extend(e_step_seconds(run))
    summary: dict = {}
    for method, by_system in out.items():
        medians = {system: statistics.median(v) for system, v in by_system.items() if v}
        official = medians.get("official")
        summary[method] = {
            "median": medians,
            "epochs": {system: len(v) for system, v in by_system.items()},
            "ratio": {system: m / official for system, m in medians.items() if system != "official" and official},
            "e_step_median": {system: statistics.median(v) for system, v in e_steps[method].items() if v},
        }
    return summary


# --------------------------------------------------------------------------- report


def command_line(args) -> str:
    """The benchmark's command, with repo-relative paths only (machine paths are left out)."""
    parts = ["python", "benchmarks/speed_vs_official.py", "--methods", *args.methods]
    if args.systems != ["official", "clusterkit"]:
        parts += ["--systems", *args.systems]
    defaults = {"untimed_epochs": 1, "timed_epochs": 3, "repeats": 1, "seed": 0, "schedule_epochs": 30,
                "batch_size": 256, "threads": 2}
    for key, default in defaults.items():
        if getattr(args, key) != default:
            parts += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.data_root is not None:
        path = Path(args.data_root).resolve()
        parts += ["--data-root", str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name]
    if args.limit is not None and (args.data_root is not None or args.limit != 5000):
        parts += ["--limit", str(args.limit)]
    if args.device != "cpu":
        parts += ["--device", args.device]
    for item in args.overrides:
        parts += ["--set", item]
    for name, *overrides in args.variant:
        parts += ["--variant", name, *overrides]
    out = Path(args.out).resolve()
    parts += ["--out", str(out.relative_to(REPO)) if out.is_relative_to(REPO) else out.name]
    return shlex.join(parts)


def _f(x, digits=1) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _machine() -> str:
    import torch

    from clusterkit.amp import cpu_features, cpu_model_name

    cpu = cpu_model_name()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} CPUs visible ({cpu_features()}){gpu}; clusterkit's torch {torch.__version__}"


def write_report(args, runs: list[dict], finished: bool) -> None:
    """The markdown report and the raw JSON next to it (rewritten after every run)."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = summarise(runs, args.untimed_epochs)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    labels = [label for label, _ in systems_of(args)]
    smoke = is_smoke(args)
    lines = [
        "# Seconds per epoch: clusterkit vs the official code",
        "",
        f"Generated {now} by `{command_line(args)}` on {_machine()}, {args.threads} torch threads per run, "
        f"device {args.device}." + ("" if finished else " **Partial: the benchmark has not finished.**"),
        "",
    ]
    if smoke:
        lines += ["**A smoke run of the plumbing (fewer than 3 timed epochs or a shrunk data set): not a timing.**",
                  ""]
    lines += [
        f"Setting: the parity setting of benchmarks/parity.py (issue 13) on {parity.data_words(args)}, batch "
        f"{args.batch_size}, epochs of a {args.schedule_epochs}-epoch schedule, seed {args.seed}. Each run trains "
        f"{args.untimed_epochs} untimed epoch(s), then {args.timed_epochs} timed epoch(s); runs one at a time, "
        "alternating the systems (the order reversed on every repeat). An epoch's time is the wall time from "
        "one E-step's end to the next: training, the E-step (feature pass and k-means) and each system's "
        "per-epoch bookkeeping (clusterkit: its checkpoint and its evaluation, which shares the E-step's "
        "features and k-means; official: its logger, checkpoints off). CC has no E-step: training plus the "
        "evaluation pass.",
        "",
        "clusterkit: `benchmarks/parity/<method>_fmnist.yaml` (git "
        f"{parity._git_commit(REPO)[:12]}, source digest {parity._source_digest()})"
        + (f", overrides of every clusterkit run: `{' '.join(args.overrides)}`" if args.overrides else "")
        + ". " + " ".join(f"Variant `{name}`: `{' '.join(ov)}`." for name, *ov in args.variant),
        "",
        "## Median seconds per epoch (timed epochs)",
        "",
        "| method | " + " | ".join(labels) + " | " + " | ".join(f"{lab} / official" for lab in labels[1:])
        + (f" | target ≤ {TARGET}" if "official" in labels and len(labels) > 1 else "") + " |",
        "|---|" + "---|" * (len(labels) + max(0, len(labels) - 1)
                            + (1 if "official" in labels and len(labels) > 1 else 0)),
    ]
    for method, s in summary.items():
        cells = [f"{_f(s['median'].get(lab))} ({s['epochs'].get(lab, 0)} ep.)" for lab in labels]
        ratios = [_f(s["ratio"].get(lab), 2) for lab in labels[1:]]
        met = ""
        if "official" in labels and len(labels) > 1:
            best = min(s["ratio"].values()) if s["ratio"] else None
            met = "" if best is None else ("met" if best <= TARGET else f"not met (best {best:.2f})")
        lines.append(f"| {parity.LABELS.get(method, method)} | " + " | ".join(cells)
                     + (" | " + " | ".join(ratios) if ratios else "") + (f" | {met}" if met else "") + " |")
    busy = [r for r in runs if (r["others_share"] or 0) > BUSY_SHARE]
    e_step_rows = [f"{parity.LABELS.get(m, m)}: " + ", ".join(
        f"{lab} {s['e_step_median'][lab]:.1f} s ({s['e_step_median'][lab] / s['median'][lab]:.0%})"
        for lab in labels if lab in s["e_step_median"] and s["median"].get(lab)) for m, s in summary.items()]
    e_step_rows = [row for row in e_step_rows if not row.endswith(": ")]
    if e_step_rows:
        lines += ["", "Median seconds of the E-step (feature pass and k-means; part of the epoch, its share in "
                  "brackets): " + "; ".join(e_step_rows) + "."]
    lines += [
        "",
        "A ratio below 1 means clusterkit is faster. "
        + (f"**{len(busy)} of {len(runs)} runs shared the CPUs with other work (more than {BUSY_SHARE:.0%} of "
           "them busy with other processes): their times are not timings.**" if busy
           else "No run shared the CPUs with other work above "
           f"{BUSY_SHARE:.0%} of them (where /proc/stat could tell)."),
        "",
        "## Runs, in the order they ran",
        "",
        "| method | system | untimed s | timed s/epoch | median | load avg before (1/5/15 min) | after | "
        "others' CPU share | last epoch NMI | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        untimed, timed = epoch_seconds(r, args.untimed_epochs)
        last = r["records"][-1] if r["records"] else {}
        share = r["others_share"]
        lines.append("| " + " | ".join([
            parity.LABELS.get(r["method"], r["method"]), r["system"], " ".join(_f(x) for x in untimed),
            " ".join(_f(x) for x in timed), _f(statistics.median(timed)) if timed else "",
            " / ".join(f"{x:.2f}" for x in r["load_before"]), " / ".join(f"{x:.2f}" for x in r["load_after"]),
            "?" if share is None else f"{share:.1%}", _f(last.get("nmi"), 3) if last.get("nmi") is not None else "",
            _f(r["wall_seconds"], 0)]) + " |")
    lines += ["", "The last column but one is the run's own quality at its last epoch (the harness's NMI of the "
              "E-step labels), to show it trained; benchmarks/parity.py checks parity.", ""]
    out.write_text("\n".join(lines))
    raw = {"command": command_line(args), "generated": now, "finished": finished, "smoke": smoke,
           "machine": _machine(), "device": args.device, "threads": args.threads, "target": TARGET,
           "untimed_epochs": args.untimed_epochs, "timed_epochs": args.timed_epochs,
           "data": getattr(args, "data_meta", None) or {"fashion_mnist_test_first": args.limit or 5000},
           "overrides": args.overrides, "variants": {name: ov for name, *ov in args.variant},
           "summary": summary, "runs": runs}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1))


# --------------------------------------------------------------------------- CLI


def is_smoke(args) -> bool:
    """Fewer than 3 timed epochs or fewer Fashion-MNIST images than the setting's 5000: a check of the
    plumbing, not a timing."""
    return args.timed_epochs < 3 or (args.data_root is None and args.limit not in (None, 5000))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=("propos", "digpro", "cc"), default=["propos", "digpro"])
    p.add_argument("--systems", nargs="+", choices=("official", "clusterkit"), default=["official", "clusterkit"],
                   help="official and/or clusterkit (the --variant systems are clusterkit runs too)")
    p.add_argument("--untimed-epochs", type=int, default=1, help="epochs trained before the timed ones (at least 1)")
    p.add_argument("--timed-epochs", type=int, default=3, help="epochs timed per run (issue 24: at least 3)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each system per method, alternating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule-epochs", type=int, default=30, help="length of the lr schedule")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--limit", type=int, default=None,
                   help="Fashion-MNIST: the first N test images (default 5000); --data-root: a seeded random N")
    p.add_argument("--data-root", type=Path, default=None, metavar="DIR",
                   help="an image folder instead of Fashion-MNIST (as benchmarks/parity.py --data-root)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both systems train")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override for every clusterkit run (e.g. run.channels_last=true); repeatable")
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                   help="a further clusterkit system: a name, then its overrides (on top of --set); repeatable")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--work", type=Path, default=DEFAULT_WORK,
                   help="images, per-run records, logs and run folders (outside the repo; default %(default)s)")
    p.add_argument("--official-root", type=Path, default=Path("/work/official"),
                   help="the official checkouts (bash benchmarks/setup_official.sh; default %(default)s)")
    p.add_argument("--official-python", type=Path, default=Path("/work/official-venv/bin/python"),
                   help="the official code's python (bash benchmarks/setup_official.sh; default %(default)s)")
    args = p.parse_args(argv)
    args.child = None
    if args.untimed_epochs < 1:
        p.error("--untimed-epochs must be at least 1: the first epoch warms the loaders and caches up")
    if args.timed_epochs < 1:
        p.error("--timed-epochs must be at least 1 (3 or more for a result)")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.untimed_epochs + args.timed_epochs > args.schedule_epochs:
        p.error("--untimed-epochs plus --timed-epochs must not exceed --schedule-epochs")
    for text in [*args.overrides, *(o for _, *ov in args.variant for o in ov)]:
        if "=" not in text or text.startswith("="):
            p.error(f"override '{text}' must look like KEY=VALUE, e.g. run.channels_last=true")
    names = ["official", "clusterkit"]
    for name, *ov in args.variant:
        if "=" in name:
            p.error(f"--variant {name}: the first word is the variant's name, then its KEY=VALUE overrides "
                    "(e.g. --variant channels_last run.channels_last=true)")
        if not ov:
            p.error(f"--variant {name} has no KEY=VALUE override: it would time the clusterkit runs again")
        if name in names:
            p.error(f"--variant name '{name}' is used twice (or is official / clusterkit): give each its own")
        names.append(name)
    if not args.systems and not args.variant:
        p.error("nothing to time")
    if (is_smoke(args) or args.data_root is not None) and Path(args.out).resolve() == DEFAULT_OUT.resolve():
        p.error(f"{'--data-root' if args.data_root else 'fewer than 3 timed epochs or --limit'} would overwrite "
                "the recorded Fashion-MNIST result: pass --out elsewhere")
    parity.check_data_args(p, args)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    args.work = args.work.resolve()
    if "official" in args.systems and not Path(args.official_python).exists():
        raise SystemExit(f"The official code's python '{args.official_python}' does not exist. Build the official "
                         "checkouts and their environment with `bash benchmarks/setup_official.sh` (see "
                         "benchmarks/README.md), pass --official-python, or time clusterkit alone with "
                         "--systems clusterkit.")
    data_root, dataset = parity.prepare_data(args)
    runs: list[dict] = []
    plan = schedule(args)
    for i, (method, rep, label, overrides) in enumerate(plan):
        log(f"run {i + 1} of {len(plan)}: {method} {label} (repeat {rep + 1}), load average "
            f"{os.getloadavg()[0]:.2f}")
        runs.append(time_run(args, method, label, overrides, data_root, dataset))
        write_report(args, runs, finished=i + 1 == len(plan))
    for method, s in summarise(runs, args.untimed_epochs).items():
        log(f"{method}: median s/epoch " + ", ".join(f"{k} {v:.1f}" for k, v in s["median"].items())
            + "".join(f"; {k} / official {v:.2f}" for k, v in s["ratio"].items()))
    log(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}")


if __name__ == "__main__":
    main()
