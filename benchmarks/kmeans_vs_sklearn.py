"""Time clusterkit's torch k-means against scikit-learn's KMeans on CPU.

Both run Lloyd with k-means++ init, n_init=10, max_iter=300, tol=1e-4 on
L2-normalised features made from gaussian blobs (euclidean metric: the only
one scikit-learn has).  Each case runs the two side by side (alternating which
goes first over repeats), with the same number of threads for both.

Usage:
    python benchmarks/kmeans_vs_sklearn.py [--threads 2] [--repeats 5] [--quick]

Writes a markdown table to benchmarks/results/kmeans_vs_sklearn.md (and prints it).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clusterkit.cluster import kmeans  # noqa: E402

DIM = 256
CLUSTER_STD = 8.0
SETTINGS = dict(n_init=10, max_iter=300, tol=1e-4)
# (N, K): four sizes at K=10, and K=200 at the largest size
CASES = [(2_500, 10), (5_000, 10), (10_000, 10), (20_000, 10), (20_000, 200)]


def make_features(n: int, k: int, seed: int = 0) -> np.ndarray:
    """``(n, DIM)`` float32 unit-norm rows from ``k`` gaussian blobs."""
    x, _ = make_blobs(n_samples=n, n_features=DIM, centers=k, cluster_std=CLUSTER_STD, random_state=seed)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def time_ours(x: np.ndarray, k: int) -> tuple[float, float, int]:
    xt = torch.from_numpy(x)
    t0 = time.perf_counter()
    res = kmeans(xt, k, seed=0, **SETTINGS)
    return time.perf_counter() - t0, res.inertia, res.n_iter


def time_sklearn(x: np.ndarray, k: int, threads: int) -> tuple[float, float, int]:
    with threadpool_limits(limits=threads):
        t0 = time.perf_counter()
        est = KMeans(n_clusters=k, init="k-means++", algorithm="lloyd", random_state=0, **SETTINGS).fit(x)
        return time.perf_counter() - t0, float(est.inertia_), int(est.n_iter_)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="runs per case; the minimum time is reported")
    parser.add_argument("--quick", action="store_true", help="smoke test on tiny sizes (not for reporting)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "kmeans_vs_sklearn.md"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cases = list(CASES)
    if args.quick:
        cases = [(n // 20, min(k, 20)) for n, k in cases]

    # Warm both code paths up (thread pools, lazy imports) outside the timings.
    warm = make_features(500, 5)
    time_ours(warm, 5)
    time_sklearn(warm, 5, args.threads)

    load_before = os.getloadavg()
    rows = []
    for n, k in cases:
        x = make_features(n, k)
        ours, ref = [], []
        for rep in range(args.repeats):
            pair = [("ours", lambda x=x, k=k: time_ours(x, k)),
                    ("sk", lambda x=x, k=k: time_sklearn(x, k, args.threads))]
            if rep % 2:
                pair.reverse()
            for name, fn in pair:
                (ours if name == "ours" else ref).append(fn())
            print(f"N={n} K={k} rep {rep}: ours {ours[-1][0]:.2f}s  sklearn {ref[-1][0]:.2f}s", flush=True)
        t_o = min(r[0] for r in ours)
        t_s = min(r[0] for r in ref)
        rows.append((n, k, t_o, t_s, t_o / t_s, ours[0][1] / ref[0][1], ours[0][2], ref[0][2]))
    load_after = os.getloadavg()

    lines = [
        "# clusterkit k-means vs scikit-learn KMeans (CPU)",
        "",
        f"Command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}` (from the repo root)",
        "",
        f"Data: `make_blobs(N, {DIM}, centers=K, cluster_std={CLUSTER_STD}, random_state=0)`, rows L2-normalised, "
        "float32. Both: euclidean Lloyd, k-means++ init, "
        f"n_init={SETTINGS['n_init']}, max_iter={SETTINGS['max_iter']}, tol={SETTINGS['tol']}, seed 0; "
        f"{args.threads} threads each (`torch.set_num_threads`, `threadpoolctl.threadpool_limits`); "
        f"best of {args.repeats} run(s), order alternated.",
        "",
        f"Environment: torch {torch.__version__}, scikit-learn {sklearn.__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); "
        f"load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f}.",
        "",
        "| N | K | ours (s) | sklearn (s) | time ratio ours/sklearn | inertia ratio ours/sklearn "
        "| iters ours | iters sklearn |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, k, t_o, t_s, ratio, inertia_ratio, it_o, it_s in rows:
        lines.append(f"| {n:,} | {k} | {t_o:.2f} | {t_s:.2f} | {ratio:.2f} | {inertia_ratio:.4f} | {it_o} | {it_s} |")
    lines += [
        "",
        "Time ratio < 1: ours faster. Inertia ratio < 1: ours found the lower (better) inertia. "
        "Iterations are those of the returned (best) restart.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"written to {out}")


if __name__ == "__main__":
    main()
