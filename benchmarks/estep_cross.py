"""Both clustering rules on each run's last checkpoint: the training effect of the E-step's rule.

Issue 26, item 2. A run whose E-step clusters with ``kmeans_e_step.reduce: umap`` trains on other
pseudo-labels than one with ``reduce: none``; its E-step NMI alone cannot tell whether the features
got better or only the rule that reads them. This script reads the features of each run's newest
checkpoint (its evaluation data, embedded as the run's own evaluation does) and clusters them with
both rules, so that runs can be compared under one rule:

* ``spherical k-means``: clusterkit's k-means, cosine metric, n_init 10 (the E-step's ``reduce: none``);
* ``UMAP + k-means``: UMAP (cosine, 10 components, 20 neighbours, min_dist 0) then k-means,
  n_init 10 (the E-step's ``reduce: umap`` with its defaults).

Both seeded with ``--seed``. Usage (repo root)::

    python benchmarks/estep_cross.py RUN_DIR [RUN_DIR ...] [--seed 0] [--threads 2] [--out FILE.md]
        [--drop-plugin parity_probe]

Each RUN_DIR is a clusterkit run folder with a checkpoint, e.g. the run folders that
``benchmarks/parity.py`` keeps under its ``--work`` folder (``runs/<run key>``). Those runs carry
the harness's own ``parity_probe`` plugin, which no installed package provides:
``--drop-plugin parity_probe`` reads a copy of the checkpoint without it (written to a temporary
folder; the run folder is not changed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _without_plugins(run_dir: Path, drop: list[str], into: Path) -> Path:
    """A run folder under ``into`` holding only a copy of ``run_dir``'s newest checkpoint with the
    plugins ``drop`` taken out of its recipe and its plugin states."""
    import torch

    from clusterkit.rundir import RunDir

    found = RunDir(run_dir).load_latest_checkpoint()
    if found is None:
        raise SystemExit(f"'{run_dir}' holds no checkpoint: pass a run folder that has trained an epoch")
    path, ckpt = found
    for name in drop:
        ckpt["recipe"]["plugins"].pop(name, None)
        ckpt["plugins"].pop(name, None)
    copy = into / run_dir.name
    (copy / path.parent.name).mkdir(parents=True)
    torch.save(ckpt, copy / path.parent.name / path.name)
    return copy


def cross_scores(run_dir: Path, seed: int, drop: list[str] | None = None) -> dict:
    """``{"run", "epoch", "reduce", "rules": {rule: {"nmi", "acc", "ari"}}}`` of one run folder's
    newest checkpoint; ``reduce`` is its E-step's setting; ``drop``: plugins to leave out."""
    import tempfile

    import torch.nn.functional as F

    from clusterkit.cluster import cluster_metrics, kmeans
    from clusterkit.cluster.manifold import UmapParams, umap_kmeans_scores
    from clusterkit.inference import load

    with tempfile.TemporaryDirectory() as tmp:
        model = load(_without_plugins(run_dir, drop, Path(tmp)) if drop else run_dir, device="cpu")
    ds = model.eval_dataset()
    feats = model.embed_dataset(ds, progress=False).float().cpu()
    targets = ds.targets
    spherical = kmeans(F.normalize(feats, dim=1), model.num_clusters, metric="cosine", n_init=10, seed=seed)
    umap = umap_kmeans_scores(feats.numpy(), model.num_clusters, targets, UmapParams(10, 20, 0.0, "cosine"), seed)
    e_step = model.recipe.plugins.get("kmeans_e_step") or {}
    return {"run": Path(run_dir).name, "epoch": model.epoch, "reduce": e_step.get("reduce", "none"),
            "rules": {"spherical k-means": cluster_metrics(targets, spherical.labels.cpu()),
                      "UMAP + k-means": {k: umap[k] for k in ("nmi", "acc", "ari")}}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--drop-plugin", action="append", default=[], metavar="NAME",
                    help="read a copy of each checkpoint without this plugin (repeatable)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    lines = ["| run | E-step rule it trained with | epoch | rule applied here | NMI | ACC | ARI |",
             "|---|---|---:|---|---:|---:|---:|"]
    from clusterkit.errors import ClusterkitError

    for run in args.runs:
        try:
            res = cross_scores(run, args.seed, args.drop_plugin)
        except ClusterkitError as exc:  # not a run folder, or a plugin no package provides
            ap.exit(2, f"estep_cross.py: {exc}\n")
        for rule, m in res["rules"].items():
            lines.append(f"| {res['run']} | reduce: {res['reduce']} | {res['epoch']} | {rule} | "
                         + " | ".join(f"{m[k]:.3f}" for k in ("nmi", "acc", "ari")) + " |")
        print(lines[-2], lines[-1], sep="\n", file=sys.stderr)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
