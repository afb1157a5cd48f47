"""The strong baseline: k-means on pixels vs UMAP + k-means on pixels (N2D), per data set and seed.

Data sets (the pixels as clusterkit's datasets give them, ``ImageDataset.pixels()``, in [0, 1]):

* ``digits``: scikit-learn's 1,797 8x8 digits (the quickstart's data);
* ``fashion_mnist``: the first 5,000 Fashion-MNIST test images (28x28; Debian's
  dataset-fashion-mnist package, /usr/share/datasets/fashion-mnist);
* ``digits_folder``: the same digits written as PNGs upscaled to 28x28 (bilinear) into a
  temporary folder and read back by clusterkit's ``imagefolder`` loader.

Methods, each seeded with the seed:

* ``k-means on pixels``: clusterkit's torch k-means (euclidean, n_init 10), as a run's
  ``pixel_kmeans`` row;
* ``UMAP + k-means on pixels``: :func:`clusterkit.cluster.manifold.umap_kmeans_scores`, as a
  run's ``umap_kmeans`` row: UMAP (``n_components=10, n_neighbors=20, min_dist=0``, euclidean,
  ``random_state`` = the seed, so single-threaded) then scikit-learn k-means (n_init 10).

Times are wall seconds of each method alone (UMAP's numba compile is paid once, by a warm-up
on 200 points before anything is timed).

Usage (from the repo root)::

    python benchmarks/strong_baseline.py [--seeds 0 1 2] [--threads 2]
        [--out benchmarks/results/strong_baseline.md]
    python benchmarks/strong_baseline.py --write-digits-folder DIR   # only write the digits folder

The second form writes ``digits_folder``'s images (class sub-folders ``0``-``9``, 28x28 grey PNGs)
into DIR and stops: the data of the digits parity run (``benchmarks/parity.py --data-root DIR``,
issue 25 item 8).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch


def digits_folder(root: Path) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    for i, (row, label) in enumerate(zip(x, y, strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray((row.reshape(8, 8) * 255 / 16).astype(np.uint8), mode="L")
        im.resize((28, 28), Image.BILINEAR).save(folder / f"{i:04d}.png")
    return root


def load(name: str, tmp: Path):
    from clusterkit.data import load_dataset

    if name == "digits":
        ds = load_dataset("digits", None, "all")
        return ds.pixels(), ds.targets
    if name == "fashion_mnist":
        ds = load_dataset("fashion_mnist", None, "test")
        return ds.pixels()[:5000], torch.as_tensor(ds.targets)[:5000]
    ds = load_dataset("imagefolder", digits_folder(tmp / "digits28"), "all")
    return ds.pixels(), ds.targets


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--datasets", nargs="+", default=["digits", "fashion_mnist", "digits_folder"])
    ap.add_argument("--out", default="benchmarks/results/strong_baseline.md")
    ap.add_argument("--write-digits-folder", type=Path, metavar="DIR",
                    help="only write scikit-learn's digits as 28x28 PNGs in class folders under DIR, then stop")
    args = ap.parse_args()
    if args.write_digits_folder is not None:
        if args.write_digits_folder.exists() and any(args.write_digits_folder.iterdir()):
            ap.error(f"--write-digits-folder '{args.write_digits_folder}' is not empty: name a new or empty folder, "
                     "so that no file of yours is overwritten")
        print(f"wrote 1797 digits to {digits_folder(args.write_digits_folder)}", file=sys.stderr)
        return 0
    torch.set_num_threads(args.threads)
    from clusterkit.cluster import cluster_metrics, kmeans
    from clusterkit.cluster.manifold import UmapParams, umap_kmeans_scores

    params = UmapParams()
    umap_kmeans_scores(np.random.default_rng(0).random((200, 16)), 3, None, params, 0)  # numba compile
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            x, y = load(name, Path(tmp))
            for seed in args.seeds:
                t = time.perf_counter()
                res = kmeans(x, 10, metric="euclidean", n_init=10, seed=seed)
                secs = time.perf_counter() - t
                rows.append((name, len(x), x.shape[1], "k-means on pixels", seed,
                             cluster_metrics(y, res.labels.cpu()), secs))
                u = umap_kmeans_scores(x, 10, y, params, seed)
                rows.append((name, len(x), x.shape[1], "UMAP + k-means on pixels", seed, u, u["seconds"]))
                print(*rows[-2][:5], rows[-2][5], f"{rows[-2][6]:.1f}s", file=sys.stderr)
                print(*rows[-1][:5], {k: rows[-1][5][k] for k in ("nmi", "acc", "ari")}, f"{rows[-1][6]:.1f}s",
                      file=sys.stderr)
    load_after = os.getloadavg()
    cmd = "python " + " ".join([sys.argv[0], *sys.argv[1:]])
    out = ["# Strong baseline: k-means on pixels vs UMAP + k-means on pixels", "",
           f"`{cmd}`  ", f"{datetime.now().strftime('%Y-%m-%d %H:%M')}; {platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} CPUs, torch threads {args.threads}; load average {load_before[0]:.2f} before, "
           f"{load_after[0]:.2f} after.", "",
           f"UMAP {params.as_dict()} then scikit-learn k-means (K 10, n_init 10); k-means on pixels: clusterkit's "
           "torch k-means (euclidean, n_init 10). Seeded with the seed. Seconds: wall time of the method alone "
           "(UMAP's numba compile excluded by a warm-up).", "",
           "## Mean ± sample std over seeds " + ", ".join(map(str, args.seeds)), "",
           "| data | N | pixels | method | NMI | ACC | ARI | seconds |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    for name in args.datasets:
        for method in ("k-means on pixels", "UMAP + k-means on pixels"):
            sel = [r for r in rows if r[0] == name and r[3] == method]
            cells = []
            for k in ("nmi", "acc", "ari"):
                v = np.array([r[5][k] for r in sel])
                cells.append(f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}")
            secs = np.array([r[6] for r in sel])
            out.append(f"| {name} | {sel[0][1]} | {sel[0][2]} | {method} | " + " | ".join(cells)
                       + f" | {secs.mean():.1f} |")
    out += ["", "## Per seed", "", "| data | method | seed | NMI | ACC | ARI | seconds |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r[0]} | {r[3]} | {r[4]} | " + " | ".join(f"{r[5][k]:.3f}" for k in ("nmi", "acc", "ari"))
                   + f" | {r[6]:.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(out) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
