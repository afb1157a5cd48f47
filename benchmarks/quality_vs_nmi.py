"""Which label-free quality measure can be trusted?  Spearman rank correlation with NMI.

For each run directory given, the run's model embeds its evaluation data; the labels (dropped
for training when the run was unlabeled) are read back for this measurement only.  Two rankings
are compared with NMI:

* over K: spherical k-means of the final features for every K of ``--k`` (as ``clusterkit
  choose-k``), each clustering scored by every measure and by NMI;
* over the run's evaluations: the per-epoch records of ``metrics.jsonl`` that hold NMI (labelled
  runs only).

A measure that ranks clusterings as NMI does has Spearman rho near +1 (near -1 for
Davies-Bouldin, where lower is better).  Also printed: the run's final clustering (the run's own
K and prediction rule) with its NMI/ACC/ARI next to its label-free scores.

    python benchmarks/quality_vs_nmi.py RUN_DIR... [--k 2:30] [--labels CSV] [--out benchmarks/results/quality_vs_nmi]

``--labels CSV`` (columns ``path,label``) gives the labels of a run on a folder of images without
class folders (the Fashion-MNIST demo of docs/own-images.md keeps them aside that way).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from scipy.stats import spearmanr

from clusterkit.choose_k import parse_ks, recommend, score_ks
from clusterkit.cluster import cluster_metrics
from clusterkit.cluster.quality import QUALITY_KEYS, quality_metrics
from clusterkit.data import load_dataset
from clusterkit.inference import load
from clusterkit.show import epoch_records

MEASURES = ("silhouette", "calinski_harabasz", "davies_bouldin", "size_entropy", "min_share", "mean_confidence")


def _rho(rows: list[dict], key: str) -> float | None:
    pairs = [(r[key], r["nmi"]) for r in rows if r.get(key) is not None and r.get("nmi") is not None]
    if len(pairs) < 3:
        return None
    rho = spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic
    return None if rho != rho else float(rho)  # nan (a constant series) -> None


def measure(run_dir: Path, ks: list[int], labels_csv: Path | None = None) -> dict:
    t0 = time.perf_counter()
    model = load(run_dir)
    d = model.recipe.data
    ds = load_dataset(d.dataset, d.root, d.eval_split or d.split, d.image_size, cache=d.cache,
                      skip_corrupt=d.skip_corrupt, labels="auto")  # the labels, for this measurement only
    if not ds.has_labels and labels_csv is not None and ds.paths is not None:
        import torch

        truth = {str(Path(r["path"]).resolve()): int(r["label"]) for r in csv.DictReader(labels_csv.open())}
        ds.targets = torch.tensor([truth[str(Path(p).resolve())] for p in ds.paths])
        ds.has_labels = True
    if not ds.has_labels:
        raise SystemExit(f"{run_dir}: its data has no labels to measure against (pass --labels CSV)")
    feats = model.embed_dataset(ds)
    pred = model.predict_features(feats, fit=False)
    final = {**cluster_metrics(ds.targets, pred.labels.cpu()),
             **quality_metrics(feats, pred.labels, model.num_clusters, pred.confidence, seed=model.recipe.run.seed)}
    rows = score_ks(feats, ks, seed=model.recipe.run.seed, targets=ds.targets)
    picks = {c: recommend(rows, c).k for c in ("silhouette", "calinski_harabasz", "davies_bouldin")}
    evals = [r for r in epoch_records(run_dir) if r.get("nmi") is not None]
    return {"run_dir": str(run_dir), "name": model.recipe.name, "dataset": d.dataset, "labels_in_training": d.labels,
            "epoch": model.epoch, "num_images": len(ds), "k": model.num_clusters, "final": final,
            "rows": rows, "picks": picks, "nmi_best_k": max(rows, key=lambda r: r["nmi"])["k"],
            "rho_over_k": {m: _rho(rows, m) for m in MEASURES},
            "rho_over_epochs": {m: _rho(evals, m) for m in MEASURES}, "evaluations": len(evals),
            "seconds": time.perf_counter() - t0}


def _f(v, digits=3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def markdown(results: list[dict], command: str) -> str:
    lines = ["# Label-free quality against NMI", "", f"`{command}`", "",
             "Each run's final clustering (its own K and prediction rule), labels used for NMI/ACC/ARI only:", "",
             "| run | data (labels in training) | epoch | NMI | ACC | ARI | silhouette | Calinski-H | Davies-B | "
             "size entropy | min share | max share | mean confidence |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        f = r["final"]
        lines.append(f"| {r['name']} | {r['dataset']} ({r['labels_in_training']}) | {r['epoch']} | {_f(f['nmi'])} | "
                     f"{_f(f['acc'])} | {_f(f['ari'])} | "
                     + " | ".join(_f(f[k], 1 if k == "calinski_harabasz" else 3) for k in QUALITY_KEYS) + " |")
    lines += ["", "Spearman rho with NMI (+1: ranks clusterings exactly as NMI does; Davies-Bouldin is lower-is-"
              "better, so -1 is its ideal), over K = " + f"{results[0]['rows'][0]['k']}..{results[0]['rows'][-1]['k']}"
              " (spherical k-means of the final features) and over the run's own evaluations (epochs):", "",
              "| run | ranking over | " + " | ".join(MEASURES) + " |", "|---|---|" + "---:|" * len(MEASURES)]
    for r in results:
        lines.append(f"| {r['name']} | K ({len(r['rows'])}) | " + " | ".join(_f(r['rho_over_k'][m]) for m in MEASURES)
                     + " |")
        if r["evaluations"] >= 3:
            lines.append(f"| {r['name']} | epochs ({r['evaluations']}) | "
                         + " | ".join(_f(r['rho_over_epochs'][m]) for m in MEASURES) + " |")
    lines += ["", "K chosen by each criterion against the K of the highest NMI (true classes: 10):", "",
              "| run | silhouette | Calinski-Harabasz | Davies-Bouldin | best K by NMI |", "|---|---:|---:|---:|---:|"]
    for r in results:
        p = r["picks"]
        lines.append(f"| {r['name']} | {p['silhouette']} | {p['calinski_harabasz']} | {p['davies_bouldin']} | "
                     f"{r['nmi_best_k']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--k", default="2:30")
    p.add_argument("--labels", type=Path, help="path,label CSV for runs on folders without class folders")
    p.add_argument("--out", default="benchmarks/results/quality_vs_nmi")
    args = p.parse_args(argv)
    ks = parse_ks(args.k)
    results = [measure(run, ks, args.labels) for run in args.runs]
    command = "python " + " ".join(["benchmarks/quality_vs_nmi.py", *map(str, args.runs), "--k", args.k]
                                   + (["--labels", str(args.labels)] if args.labels else []))
    text = markdown(results, command)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
