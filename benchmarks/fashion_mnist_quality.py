"""Clustering quality on Fashion-MNIST: DigPro vs ProPos (and HaDis, CC) vs k-means on pixels.

Trains the twin recipes benchmarks/recipes/fmnist_digpro.yaml and fmnist_propos.yaml (they
differ only in the momentum_grouping plugin) on the 10,000 Fashion-MNIST test images (28x28,
resized to 32x32; timm resnet18 with its standard stem; batch 256) for a fixed number of
epochs, once per seed.  ``--methods`` adds fmnist_hadis.yaml (ProPos's recipe plus
hardness_aware_distillation), fmnist_cc.yaml (CC on the same data, backbone, batch and
epochs, with CC's Adam optimiser and its cluster head's argmax as the prediction) and
fmnist_pici.yaml (PICI: a small masked ViT, same data, batch and epochs, its three stages scaled
to the budget).  Each (method, seed) is its own subprocess::

    clusterkit run RECIPE --set schedule.epochs=E --set run.seed=S --out WORKDIR/<method>_s<S>

so that its peak memory is its own.  k-means on the raw pixels (clusterkit's torch k-means,
euclidean, n_init 10, seeded with the run's seed, on the same 10,000 images) is the
``pixel_kmeans`` entry of each run's summary.json.

A finished run (summary.json of the same resolved recipe) is reused when the script is run
again, and an interrupted one is resumed from its last checkpoint, so an interrupted benchmark
is continued by running the same command again.

Usage (from the repo root)::

    python benchmarks/fashion_mnist_quality.py [--epochs 8] [--seeds 0 1 2]
        [--methods digpro propos [hadis cc pici]] [--workdir runs/bench_fmnist]
        [--out benchmarks/results/fashion_mnist_quality.md] [--extra-set KEY=VALUE ...]

Writes a markdown table (mean +- sample std over seeds of NMI/ACC/ARI, seconds per epoch and
peak memory, plus the per-seed values) to ``--out`` and the same data as JSON next to it
(``.json``).  The data come from Debian's ``dataset-fashion-mnist`` package
(/usr/share/datasets/fashion-mnist); when they are missing the script installs the package
if it runs as root with apt-get, and otherwise says how to install it.

``--extra-set`` passes further ``--set`` overrides to every run (for smoke tests, e.g.
``--extra-set model.backbone=resnet10t --extra-set data.batch_size=64``); results made with
it are not the benchmark, so it refuses to write them to the default ``--out``.
There is no option to train on a subset of the images: the recipe schema has no such key.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from clusterkit.errors import ClusterkitError, DataError  # noqa: E402
from clusterkit.recipe import load_recipe  # noqa: E402

RECIPES = {m: HERE / "recipes" / f"fmnist_{m}.yaml" for m in ("digpro", "propos", "hadis", "cc", "pici")}
LABELS = {"digpro": "DigPro", "propos": "ProPos", "hadis": "HaDis", "cc": "CC", "pici": "PICI",
          "pixels": "k-means on pixels"}
#: The plugin each method adds to ProPos's recipe (its twin); CC is a different recipe altogether.
ADDS_TO_PROPOS = {"digpro": "momentum_grouping", "hadis": "hardness_aware_distillation"}
METRICS = ("nmi", "acc", "ari")
DEFAULT_OUT = HERE / "results" / "fashion_mnist_quality.md"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
POLL_S = 5.0


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- data


def ensure_data(root: str | None) -> None:
    """Make sure the Fashion-MNIST test split loads; install Debian's package if allowed."""
    from clusterkit.data import load_dataset
    from clusterkit.data.datasets import DATASETS

    default_root = DATASETS["fashion_mnist"].default_root
    try:
        load_dataset("fashion_mnist", root, "test")
        return
    except DataError as exc:
        error = str(exc).split("\n\n")[0]
    at_default = root is None or Path(root).resolve() == Path(default_root).resolve()
    can_install = at_default and os.geteuid() == 0 and shutil.which("apt-get") is not None
    if not can_install:
        how = (f"install Debian's package: `sudo apt-get update && sudo apt-get install -y {DEBIAN_PACKAGE}` "
               f"(it puts the files in {default_root}, the default root)")
        if not at_default:
            how = (f"put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
                   f"t10k-labels-idx1-ubyte.gz in {root}, or drop the data.root override and {how}")
        raise SystemExit(f"Fashion-MNIST is missing ({error}).\nTo get it, {how}; then run this command again.")
    log(f"Fashion-MNIST not found in {default_root}: installing Debian's {DEBIAN_PACKAGE} (apt-get) ...")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", DEBIAN_PACKAGE]):
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"`{shlex.join(cmd)}` failed; install {DEBIAN_PACKAGE} by hand (or put the four "
                             f"Fashion-MNIST .gz files in {default_root}) and run this command again.")
    try:
        load_dataset("fashion_mnist", root, "test")
    except DataError as exc:
        raise SystemExit(f"Installed {DEBIAN_PACKAGE}, but Fashion-MNIST still does not load: {exc}") from None


# --------------------------------------------------------------------------- runs


def clusterkit_command() -> list[str]:
    exe = Path(sys.executable).parent / "clusterkit"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("clusterkit")
    return [found] if found else [sys.executable, "-m", "clusterkit"]


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def saved_recipe_hash(run_dir: Path) -> str | None:
    """Hash of the resolved recipe a (possibly unfinished) run directory was started with."""
    import yaml

    try:
        data = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        return load_recipe(data=data).hash()
    except (OSError, yaml.YAMLError, ClusterkitError):
        return None


def epoch_records(metrics_file: Path, seen: int) -> tuple[list[dict], int]:
    """End-of-epoch records of metrics.jsonl after the first ``seen`` lines."""
    try:
        lines = metrics_file.read_text().splitlines()
    except OSError:
        return [], seen
    out = []
    for line in lines[seen:]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            return out, seen
        seen += 1
        if "seconds" in rec:
            out.append(rec)
    return out, seen


def run_one(method: str, seed: int, args, tag: str) -> dict:
    """Run (or reuse, or resume) one (method, seed); returns its summary plus bookkeeping."""
    recipe = RECIPES[method]
    overrides = [f"schedule.epochs={args.epochs}", f"run.seed={seed}", *args.extra_set]
    expected = load_recipe(recipe, overrides).hash()
    run_dir = Path(args.workdir) / f"{method}_s{seed}"
    log_file = Path(args.workdir) / f"{method}_s{seed}.log"

    summary = read_json(run_dir / "summary.json")
    if summary is not None:
        if summary.get("recipe_hash") == expected:
            log(f"{tag} {LABELS[method]} seed {seed}: reusing the finished run in {run_dir}")
            return {**summary, "reused": True, "resumed": False}
        raise SystemExit(f"{run_dir} holds a finished run of a different recipe (hash {summary.get('recipe_hash')}, "
                         f"this benchmark wants {expected}: other --epochs or --extra-set?). Delete it or choose "
                         "another --workdir.")

    cmd = [*clusterkit_command(), "run", str(recipe)]
    for o in overrides:
        cmd += ["--set", o]
    resumed = False
    if run_dir.is_dir() and any(run_dir.iterdir()):
        has_ckpt = any((run_dir / "checkpoints").glob("epoch_*.pt")) if (run_dir / "checkpoints").is_dir() else False
        if has_ckpt:
            if saved_recipe_hash(run_dir) != expected:
                raise SystemExit(f"{run_dir} holds an unfinished run of a different recipe (other --epochs or "
                                 "--extra-set?). Delete it or choose another --workdir.")
            cmd += ["--resume", str(run_dir)]
            resumed = True
        else:  # started but killed before its first checkpoint: start it anew
            cmd += ["--out", str(run_dir), "--force"]
    else:
        cmd += ["--out", str(run_dir)]

    log(f"{tag} {LABELS[method]} seed {seed}: {'resuming' if resumed else 'starting'} "
        f"({args.epochs} epochs) -> {run_dir}  [log: {log_file}]")
    log(f"    $ {shlex.join(cmd)}")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    seen = 0
    if resumed:  # do not re-print the epochs done before
        seen = len((run_dir / "metrics.jsonl").read_text().splitlines()) if (run_dir / "metrics.jsonl").exists() else 0
    t0 = time.perf_counter()
    with open(log_file, "a") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=POLL_S)
                except subprocess.TimeoutExpired:
                    rc = None
                records, seen = epoch_records(run_dir / "metrics.jsonl", seen)
                for rec in records:
                    shown = "  ".join(f"{k} {rec[k]:.3f}" for k in ("loss", *METRICS) if k in rec)
                    log(f"    epoch {rec['epoch']}/{args.epochs}  {shown}  ({rec['seconds']:.1f}s; "
                        f"{time.perf_counter() - t0:.0f}s elapsed)")
                if rc is not None:
                    break
        except KeyboardInterrupt:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise SystemExit(f"\nInterrupted. Run the same command again to resume {run_dir} from its last "
                             "checkpoint (finished runs are reused).") from None
    summary = read_json(run_dir / "summary.json")
    if rc != 0 or summary is None:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-25:])
        raise SystemExit(f"{LABELS[method]} seed {seed} failed (exit status {rc}); the end of {log_file}:\n{tail}")
    log(f"    done in {time.perf_counter() - t0:.0f}s: " + "  ".join(
        f"{k} {summary['metrics'][k]:.3f}" for k in METRICS if summary["metrics"].get(k) is not None))
    return {**summary, "reused": False, "resumed": resumed}


# --------------------------------------------------------------------------- statistics


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for fewer than two values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def fmt(ms: tuple[float | None, float | None], digits: int = 3) -> str:
    m, s = ms
    if m is None:
        return "–"
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def pixel_kmeans_per_seed(runs: dict[str, dict[int, dict]], seeds: list[int],
                          args) -> tuple[dict[int, dict], list[str]]:
    """Per seed, the k-means-on-pixels metrics from the runs' summaries (they agree: same data,
    same seed); computed here, as the trainer does, when no summary has them."""
    notes = []
    out: dict[int, dict] = {}
    for seed in seeds:
        found = [runs[m][seed]["pixel_kmeans"] for m in runs if runs[m][seed].get("pixel_kmeans")]
        if found:
            out[seed] = {k: found[0].get(k) for k in METRICS}
            if any(any(abs((f.get(k) or 0) - (found[0].get(k) or 0)) > 1e-9 for k in METRICS) for f in found[1:]):
                notes.append(f"seed {seed}: the runs' pixel k-means results differ; the first method's is shown.")
            continue
        from clusterkit.cluster import cluster_metrics, kmeans
        from clusterkit.data import load_dataset

        recipe = load_recipe(RECIPES[next(iter(runs))], [f"run.seed={seed}", *args.extra_set])
        ds = load_dataset(recipe.data.dataset, recipe.data.root, recipe.data.split)
        res = kmeans(ds.pixels(), recipe.e_step.k, metric="euclidean", n_init=10, seed=seed)
        out[seed] = {k: v for k, v in cluster_metrics(ds.targets, res.labels.cpu()).items() if k in METRICS}
        notes.append(f"seed {seed}: pixel k-means computed by this script (not in the run summaries).")
    return out, notes


def versus(agg: dict, runs: dict, seeds: list[int], a: str, b: str) -> list[str]:
    """Plain sentences saying whether method ``a`` beats method ``b`` on the mean NMI, ACC and ARI."""
    A, B = LABELS[a], LABELS[b]
    d, p = agg[a], agg[b]
    diffs = {k: d[k][0] - p[k][0] for k in METRICS}
    wins = {k: sum(runs[a][s]["metrics"][k] > runs[b][s]["metrics"][k] for s in seeds) for k in METRICS}
    detail = "; ".join(f"{k.upper()} {d[k][0]:.3f} vs {p[k][0]:.3f} ({diffs[k]:+.3f}, {A} higher on "
                       f"{wins[k]} of {len(seeds)} seeds)" for k in METRICS)
    better = [k.upper() for k in METRICS if diffs[k] > 0]
    if len(better) == len(METRICS):
        verdict = f"{A} beats {B} on mean NMI, ACC and ARI"
    elif not better:
        verdict = f"{A} does NOT beat {B}: its mean NMI, ACC and ARI are all lower or equal"
    else:
        worse = [k.upper() for k in METRICS if diffs[k] <= 0]
        verdict = (f"{A} does NOT beat {B} overall: its mean is higher on {', '.join(better)} but lower "
                   f"or equal on {', '.join(worse)}")
    lines = [f"**{A} vs {B} (mean over {len(seeds)} seed(s)): {verdict}.** {detail}."]
    if len(seeds) > 1:
        noisy = [k.upper() for k in METRICS
                 if abs(diffs[k]) <= max(d[k][1] or 0.0, p[k][1] or 0.0)]
        if noisy:
            lines.append(f"The gap in {', '.join(noisy)} is within one seed-to-seed standard deviation, "
                         "so it is not distinguishable from noise at this budget.")
    return lines


def compare(agg: dict, runs: dict, seeds: list[int]) -> list[str]:
    """Plain sentences comparing DigPro, HaDis and CC with ProPos (and every method with k-means on pixels)."""
    lines = []
    for m in ("digpro", "hadis", "cc"):
        if m in agg and "propos" in agg:
            lines += versus(agg, runs, seeds, m, "propos")
    if "hadis" in agg and "digpro" in agg:
        lines += versus(agg, runs, seeds, "hadis", "digpro")
    if "pici" in agg and "cc" in agg:
        lines += versus(agg, runs, seeds, "pici", "cc")
    for m in [m for m in agg if m != "pixels"]:
        if "pixels" in agg:
            beats = [k.upper() for k in METRICS if agg[m][k][0] > agg["pixels"][k][0]]
            what = ("beats k-means on pixels on mean NMI, ACC and ARI" if len(beats) == len(METRICS) else
                    f"beats k-means on pixels only on {', '.join(beats)}" if beats else
                    "does NOT beat k-means on pixels on any metric")
            lines.append(f"{LABELS[m]} {what} (NMI {agg[m]['nmi'][0]:.3f} vs {agg['pixels']['nmi'][0]:.3f}).")
    return lines


# --------------------------------------------------------------------------- environment


def machine_info(summaries: list[dict]) -> dict:
    import torch

    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    devices = sorted({s.get("device", "?") for s in summaries})
    info = {
        "cpu_count": os.cpu_count(), "cpus_usable": usable, "cpu_model": cpu_model or platform.machine(),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "devices": devices, "torch_threads": torch.get_num_threads(),
    }
    if any(d.startswith("cuda") for d in devices) and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    versions = next((s.get("versions") for s in summaries if s.get("versions")), None)
    if versions:
        info["versions"] = versions
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if rev:
            info["git"] = rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# --------------------------------------------------------------------------- report


def optim_text(rec) -> str:
    """The optimiser and schedule of a recipe, in words."""
    o = rec.optim
    momentum = f", momentum {o.momentum:g}" if o.name == "sgd" else f", betas ({o.betas[0]:g}, {o.betas[1]:g})"
    return (f"{o.name.upper()} lr {o.lr:g}{' x batch/256' if o.lr_scaling == 'linear' else ''}{momentum}, "
            f"wd {o.weight_decay:g}, {rec.schedule.warmup_epochs} warm-up epoch(s), {rec.schedule.lr_schedule}")


def relation(methods: list[str]) -> str:
    """How the recipes of ``methods`` relate to each other."""
    if sorted(methods) == ["digpro", "propos"]:
        return "twins differing only in `momentum_grouping`"
    parts = [f"{LABELS[m]} = ProPos's recipe + `{ADDS_TO_PROPOS[m]}`" for m in methods if m in ADDS_TO_PROPOS]
    if "cc" in methods:
        parts.append("CC: the same data, backbone, batch and epochs with CC's plugins and optimiser, no E-step")
    if "pici" in methods:
        parts.append("PICI: the same data, batch and epochs, a small masked ViT with PISD, CC's losses and CLI "
                     "in three stages, PICI's Adam optimiser, no E-step")
    return "; ".join(parts) if parts else "one recipe"


def write_report(args, runs, pixels, pixel_notes, started: datetime, load_before, load_after) -> None:
    seeds = list(args.seeds)
    methods = list(args.methods)
    summaries = [runs[m][s] for m in methods for s in seeds]
    agg: dict[str, dict] = {}
    for m in methods:
        rs = [runs[m][s] for s in seeds]
        agg[m] = {k: mean_std([r["metrics"].get(k) for r in rs]) for k in METRICS}
        agg[m]["seconds_per_epoch"] = mean_std([r.get("seconds_per_epoch") for r in rs])
        agg[m]["peak_memory_mb"] = mean_std([r.get("peak_memory_mb") for r in rs])
        agg[m]["wall_time_s"] = mean_std([r.get("wall_time_s") for r in rs])
    agg["pixels"] = {k: mean_std([pixels[s].get(k) for s in seeds]) for k in METRICS}
    machine = machine_info(summaries)
    verdict = compare(agg, runs, seeds)
    # the command as run from the repository root, with no path of this machine in it
    command = shlex.join(["python", "benchmarks/fashion_mnist_quality.py",
                          *(a.replace(f"{REPO}{os.sep}", "") for a in sys.argv[1:])])
    now = datetime.now(timezone.utc).astimezone()
    first = summaries[0]
    rec = load_recipe(RECIPES[methods[0]], [f"schedule.epochs={args.epochs}", *args.extra_set])
    proto = first.get("protocol", {})
    reused = sum(r["reused"] for r in summaries)
    resumed = sum(r["resumed"] for r in summaries)
    on_cuda = any(str(r.get("device", "")).startswith("cuda") for r in summaries)
    mem_what = "peak CUDA memory allocated (MB)" if on_cuda else "peak RSS of the run's process (MB)"
    recs = {m: load_recipe(RECIPES[m], [f"schedule.epochs={args.epochs}", *args.extra_set]) for m in methods}
    optims = {m: optim_text(r) for m, r in recs.items()}
    optim = (next(iter(optims.values())) if len(set(optims.values())) == 1 else
             "optimiser per method: " + "; ".join(f"{LABELS[m]} {o}" for m, o in optims.items()))
    kmeans_methods = [m for m in methods if "kmeans_e_step" in recs[m].plugins]
    if len(kmeans_methods) == len(methods):
        predicted = "spherical k-means on the target features"
    else:
        others = [LABELS[m] for m in methods if m not in kmeans_methods]
        predicted = ("predictions: " + (f"spherical k-means on the target features for "
                                         f"{', '.join(LABELS[m] for m in kmeans_methods)}, " if kmeans_methods else "")
                     + f"the cluster head's argmax for {', '.join(others)}")

    lines = [
        f"# Clustering quality on Fashion-MNIST: {' vs '.join(LABELS[m] for m in methods)} vs k-means on pixels",
        "",
        f"Command (from the repository root): `{command}`",
        "",
        f"Date: {now.strftime('%Y-%m-%d %H:%M %Z')} (benchmark started {started.strftime('%Y-%m-%d %H:%M')}; "
        f"{reused} of {len(summaries)} runs reused from an earlier invocation, {resumed} resumed).",
        "",
        f"Machine: {machine['cpu_count']} CPUs ({machine['cpus_usable']} usable; {machine['cpu_model']}), "
        f"device {', '.join(machine['devices'])}{' (' + machine['gpu'] + ')' if 'gpu' in machine else ''}, "
        f"torch {machine['torch']}, Python {machine['python']}"
        f"{', clusterkit git ' + machine['git'] if 'git' in machine else ''}; "
        f"load average before/after: {load_before:.1f} / {load_after:.1f}.",
        "",
        f"Setting: `{rec.data.dataset}` `{rec.data.split}` split ({first.get('num_train')} images; Fashion-MNIST: "
        f"28x28x1), resized to {rec.data.image_size}x{rec.data.image_size}, trained and evaluated on the same images "
        f"(protocol: train `{proto.get('train_split')}`, eval `{proto.get('eval_split')}`, test data used for "
        f"training: {proto.get('test_data_used_for_training')}); timm `{rec.model.backbone}`, batch "
        f"{rec.data.batch_size}, {args.epochs} epoch(s) ({first.get('steps')} steps), {optim}; K = {rec.e_step.k}; "
        f"metrics of the final epoch's {predicted} (no model selection). Seeds: {', '.join(map(str, seeds))}. "
        "Recipes: " + ", ".join(f"`{RECIPES[m].relative_to(REPO)}`" for m in methods)
        + f" ({relation(methods)})."
        + (f" Extra overrides: `{' '.join(args.extra_set)}` (NOT the benchmark setting)." if args.extra_set else ""),
        "",
        "k-means on pixels: clusterkit's torch k-means, euclidean, k-means++ init, n_init 10, seeded with the "
        "run's seed, on the same images' native pixels scaled to [0, 1] (Fashion-MNIST: 28x28 = 784-d).",
        "",
        f"Mean ± sample std (n-1) over {len(seeds)} seed(s). Seconds per epoch include the E-step k-means and "
        f"the evaluation; memory is the {mem_what}.",
        "",
        "| method | NMI | ACC | ARI | s / epoch | peak memory (MB) | wall time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in methods:
        a = agg[m]
        lines.append(f"| {LABELS[m]} | {fmt(a['nmi'])} | {fmt(a['acc'])} | {fmt(a['ari'])} | "
                     f"{fmt(a['seconds_per_epoch'], 1)} | {fmt(a['peak_memory_mb'], 0)} | {fmt(a['wall_time_s'], 0)} |")
    a = agg["pixels"]
    lines.append(f"| {LABELS['pixels']} | {fmt(a['nmi'])} | {fmt(a['acc'])} | {fmt(a['ari'])} | – | – | – |")
    for sentence in verdict:
        lines += ["", sentence]
    lines += ["", "Per seed:", "",
              "| method | seed | NMI | ACC | ARI | s / epoch | peak memory (MB) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        for s in seeds:
            r = runs[m][s]
            mm = r["metrics"]
            lines.append(f"| {LABELS[m]} | {s} | {mm['nmi']:.3f} | {mm['acc']:.3f} | {mm['ari']:.3f} | "
                         f"{r['seconds_per_epoch']:.1f} | {r['peak_memory_mb']:.0f} |")
    for s in seeds:
        p = pixels[s]
        lines.append(f"| {LABELS['pixels']} | {s} | {p['nmi']:.3f} | {p['acc']:.3f} | {p['ari']:.3f} | – | – |")
    if pixel_notes:
        lines += ["", *pixel_notes]
    lines += ["", f"Run directories: `{args.workdir}/<method>_s<seed>` (summary.json, metrics.jsonl, recipe.yaml)."]
    text = "\n".join(lines) + "\n"

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    payload = {
        "command": command, "date": now.isoformat(timespec="seconds"),
        "started": started.isoformat(timespec="seconds"), "machine": machine,
        "load_average": {"before": load_before, "after": load_after},
        "config": {"epochs": args.epochs, "seeds": seeds, "methods": methods, "extra_set": args.extra_set,
                   "recipes": {m: str(RECIPES[m].relative_to(REPO)) for m in methods}, "workdir": args.workdir},
        "protocol": proto,
        "per_seed": {
            **{m: [{"seed": s, **{k: runs[m][s]["metrics"].get(k) for k in METRICS},
                    **{k: runs[m][s].get(k) for k in ("seconds_per_epoch", "peak_memory_mb", "wall_time_s",
                                                       "epochs", "steps", "num_train", "device", "recipe_hash",
                                                       "run_dir", "reused", "resumed")}}
                   for s in seeds] for m in methods},
            "pixel_kmeans": [{"seed": s, **pixels[s]} for s in seeds],
        },
        "mean_std": {m: {k: {"mean": v[0], "std": v[1]} for k, v in a.items()} for m, a in agg.items()},
        "comparison": verdict, "notes": pixel_notes,
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    log("\n" + text)
    log(f"written to {out} and {out.with_suffix('.json')}")


# --------------------------------------------------------------------------- main


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8,
                        help="epochs per run (8: one run takes ~6 min on 2 idle CPU cores, an epoch ~40 s: "
                             "~40 steps plus the E-step and evaluation)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run.seed of the runs")
    parser.add_argument("--methods", nargs="+", choices=sorted(RECIPES), default=["digpro", "propos"],
                        help="recipes benchmarks/recipes/fmnist_<method>.yaml to run")
    parser.add_argument("--workdir", default="runs/bench_fmnist", help="run directories go here")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results markdown (the .json goes next to it)")
    parser.add_argument("--extra-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra --set override for every run (smoke tests; not for reported results)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _sigterm)  # stop the running child too, as on Ctrl-C
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    args.seeds = list(dict.fromkeys(args.seeds))
    args.methods = list(dict.fromkeys(args.methods))
    if args.extra_set and Path(args.out).resolve() == DEFAULT_OUT.resolve():
        parser.error("--extra-set changes the benchmark's setting; pass --out elsewhere (e.g. /tmp/smoke.md) "
                     f"so that {DEFAULT_OUT.relative_to(REPO)} keeps the real results")

    try:  # resolve the recipes once up front: a bad --extra-set fails here, not after an hour
        recipes = {m: load_recipe(RECIPES[m], [f"schedule.epochs={args.epochs}", *args.extra_set])
                   for m in args.methods}
    except ClusterkitError as exc:
        raise SystemExit(f"error: {exc}") from None
    ensure_data(recipes[args.methods[0]].data.root)

    started = datetime.now(timezone.utc).astimezone()
    load_before = os.getloadavg()[0]
    jobs = [(m, s) for s in args.seeds for m in args.methods]
    log(f"Fashion-MNIST quality benchmark: {len(jobs)} runs ({', '.join(args.methods)} x seeds "
        f"{' '.join(map(str, args.seeds))}), {args.epochs} epochs each, in {args.workdir}")
    runs: dict[str, dict[int, dict]] = {m: {} for m in args.methods}
    t0 = time.perf_counter()
    for i, (m, s) in enumerate(jobs, 1):
        runs[m][s] = run_one(m, s, args, f"[{i}/{len(jobs)}]")
        fresh = [r for mm in runs for r in runs[mm].values() if not r["reused"]]
        if fresh and i < len(jobs):
            per_run = (time.perf_counter() - t0) / len(fresh)
            log(f"    ~{per_run * (len(jobs) - i) / 60:.0f} min left at {per_run / 60:.1f} min per run")
    pixels, notes = pixel_kmeans_per_seed(runs, args.seeds, args)
    write_report(args, runs, pixels, notes, started, load_before, os.getloadavg()[0])


if __name__ == "__main__":
    main()
