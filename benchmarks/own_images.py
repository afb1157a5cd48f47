"""Own images: ``recipes/own_images.yaml`` on a flat folder of Fashion-MNIST PNGs against both baselines.

Issue 26's user story: somebody brings a folder of images without labels.  The folder here is
the first 5,000 Fashion-MNIST test images written as flat 28x28 grayscale PNGs (Debian's
dataset-fashion-mnist package); their labels are written beside the folder
(``labels.csv``), never inside it, and are used only for the scores below.

1. ``clusterkit run recipes/own_images.yaml --set data.root=FOLDER`` trains as a user would
   run it (``data.labels: none``: training and the run's summary never see a label); its
   seconds are the run's wall time from its summary.
2. The run's clusters of the folder are read back as a user gets them,
   ``clusterkit.load(RUN).predict(paths)`` (the same rule ``clusterkit export`` writes), and
   scored against ``labels.csv``.
3. The two baselines run on the pixels the recipe reads (the imagefolder loader at the recipe's
   ``data.image_size``): clusterkit's k-means on pixels (n_init 10) and UMAP + k-means on
   pixels (:func:`clusterkit.cluster.manifold.umap_kmeans_scores`, N2D's setting).

Usage (from the repo root; one run at a time, nothing else on the cores)::

    python benchmarks/own_images.py [--seeds 0] [--threads 2] [--work /tmp/clusterkit-own-images]
        [--set KEY=VALUE ...] [--out benchmarks/results/own_images.md]

``--set`` overrides pass to the run (e.g. ``--set schedule.epochs=10``); results are appended to
``--out`` as one section per invocation.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
N_IMAGES = 5000


def write_folder(work: Path) -> tuple[Path, Path]:
    """The flat PNG folder and ``labels.csv`` (file name, label) beside it; reused when present."""
    from PIL import Image

    from clusterkit.data import load_dataset

    images, labels_csv = work / "images", work / "labels.csv"
    if labels_csv.is_file() and len(list(images.glob("*.png"))) == N_IMAGES:
        return images, labels_csv
    images.mkdir(parents=True, exist_ok=True)
    ds = load_dataset("fashion_mnist", None, "test")
    pixels = (ds.pixels()[:N_IMAGES].reshape(N_IMAGES, 28, 28) * 255).round().byte().numpy()
    rows = []
    for i in range(N_IMAGES):
        name = f"fmnist_{i:05d}.png"
        Image.fromarray(pixels[i], mode="L").save(images / name)
        rows.append((name, int(ds.targets[i])))
    with open(labels_csv, "w", newline="") as f:
        csv.writer(f).writerows([("file", "label"), *rows])
    return images, labels_csv


def read_labels(labels_csv: Path) -> dict[str, int]:
    with open(labels_csv, newline="") as f:
        return {row["file"]: int(row["label"]) for row in csv.DictReader(f)}


def train(images: Path, run_dir: Path, seed: int, threads: int, sets: list[str]) -> float:
    cmd = [sys.executable, "-m", "clusterkit", "run", str(REPO / "recipes" / "own_images.yaml"),
           "--set", f"data.root={images}", "--set", f"run.seed={seed}", "--set", f"run.threads={threads}",
           "--set", "run.progress=false", "--out", str(run_dir), "--force"]
    for s in sets:
        cmd += ["--set", s]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    return time.perf_counter() - t


def score_run(run_dir: Path, images: Path, labels: dict[str, int]) -> dict:
    import clusterkit
    from clusterkit.cluster import cluster_metrics

    paths = sorted(images.glob("*.png"))
    pred = clusterkit.load(run_dir).predict([str(p) for p in paths])
    y = np.array([labels[p.name] for p in paths])
    return cluster_metrics(y, pred.labels.numpy())


def baselines(images: Path, labels: dict[str, int], image_size: int, seed: int) -> dict[str, dict]:
    import torch

    from clusterkit.cluster import cluster_metrics, kmeans
    from clusterkit.cluster.manifold import UmapParams, umap_kmeans_scores
    from clusterkit.data import load_dataset

    ds = load_dataset("imagefolder", images, "all", image_size=image_size, labels="none")
    y = torch.as_tensor([labels[Path(p).name] for p in ds.paths])
    x = ds.pixels()
    t = time.perf_counter()
    km = kmeans(x, 10, metric="euclidean", n_init=10, seed=seed)
    out = {"k-means on pixels": {**cluster_metrics(y, km.labels.cpu()), "seconds": time.perf_counter() - t}}
    out["UMAP + k-means on pixels"] = umap_kmeans_scores(x, 10, y, UmapParams(), seed)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/clusterkit-own-images", help="the PNG folder, labels and run folders")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--label", default="", help="a name for this configuration in the results")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/own_images.md")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from clusterkit.recipe import load_recipe

    work = Path(args.work)
    images, labels_csv = write_folder(work)
    labels = read_labels(labels_csv)
    recipe = load_recipe(REPO / "recipes" / "own_images.yaml", [f"data.root={images}", *args.sets])
    load_before = os.getloadavg()
    rows = []
    for seed in args.seeds:
        run_dir = work / "runs" / f"{args.label or 'own_images'}_seed{seed}"
        wall = train(images, run_dir, seed, args.threads, args.sets)
        summary = json.loads((run_dir / "summary.json").read_text())
        scores = score_run(run_dir, images, labels)
        rows.append((seed, "clusterkit own_images", scores, summary.get("wall_time_s"), wall))
        print(seed, scores, summary.get("wall_time_s"), file=sys.stderr)
        if not args.no_baselines:
            for name, s in baselines(images, labels, recipe.data.image_size, seed).items():
                rows.append((seed, name, s, s["seconds"], None))
    load_after = os.getloadavg()
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]).replace(str(work), "WORK")
    text = [f"## {args.label or 'own_images as shipped'} ({datetime.now().strftime('%Y-%m-%d %H:%M')})", "",
            f"`{cmd}`  ",
            f"{platform.machine()}, {os.cpu_count()} CPUs, threads {args.threads}; load average "
            f"{load_before[0]:.2f} before, {load_after[0]:.2f} after. Overrides: {args.sets or 'none'}.", "",
            "| seed | method | NMI | ACC | ARI | seconds |", "|---:|---|---:|---:|---:|---:|"]
    for seed, name, s, secs, _ in rows:
        text.append(f"| {seed} | {name} | {s['nmi']:.3f} | {s['acc']:.3f} | {s['ari']:.3f} | "
                    + (f"{secs:.0f}" if secs is not None else "?") + " |")
    out = Path(args.out)
    if not out.exists():
        out.write_text("# Own images: recipes/own_images.yaml on 5,000 Fashion-MNIST PNGs in a flat folder\n\n"
                       + __doc__.split("\n\n", 1)[1].split("Usage")[0].strip() + "\n\n"
                       "Seconds: the run's wall time from its summary (training, E-steps and evaluations; "
                       "clusterkit), or the baseline's own wall time.\n\n")
    with open(out, "a") as f:
        f.write("\n".join(text) + "\n\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
