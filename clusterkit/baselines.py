"""The UMAP rows of a run's summary: the strong baseline and the manifold evaluation view.

summary.json keys (see :mod:`clusterkit.cluster.manifold` for the methods):

* ``umap_kmeans`` -- "UMAP + k-means on pixels" of the evaluation data (``eval.umap_baseline``);
* ``umap_view`` -- "k-means on UMAP of the final features": the final evaluation's features,
  UMAP (cosine) then k-means, scored like the run (``eval.umap_view``).

Each is ``{"nmi", "acc", "ari"`` (None on unlabeled data), ``"quality"`` (label-free, on the
embedding), ``"seconds"``, ``"umap"`` (its parameters)``}``, ``{"unavailable": how to install
umap-learn}`` when umap-learn is missing, or None when switched off (``never``, or ``auto``
where the pixel baseline is not computed: large data, or ``eval.pixel_baseline: never``).
Both are computed on rank 0 only.  The trainer calls :func:`umap_baseline` once per run
(beside the pixel baseline) and :func:`umap_view` when it writes the summary.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from . import distributed
from .cluster import manifold
from .cluster.manifold import UmapParams, umap_kmeans_scores, wanted

__all__ = ["BASELINE_ROWS", "umap_baseline", "umap_params", "umap_view"]

#: summary.json key -> the row's name in every table (``pixel_kmeans`` is the older row).
BASELINE_ROWS = {"pixel_kmeans": "k-means on pixels", "umap_kmeans": "UMAP + k-means on pixels",
                 "umap_view": "k-means on UMAP of the final features"}


def umap_params(recipe, metric: str) -> UmapParams:
    e = recipe.eval
    return UmapParams(n_components=e.umap_components, n_neighbors=e.umap_neighbors, min_dist=e.umap_min_dist,
                      metric=metric)


def _wanted(trainer, mode: str) -> bool:
    ds = trainer.eval_ds
    if len(ds) < 4:
        return False
    return wanted(mode, trainer.recipe.eval.pixel_baseline, len(ds), int(np.prod(ds[0][0].shape)))


def umap_baseline(trainer) -> dict | None:
    """"UMAP + k-means on pixels" of ``trainer.eval_ds`` (summary.json's ``umap_kmeans``)."""
    r = trainer.recipe
    if not distributed.is_main() or not _wanted(trainer, r.eval.umap_baseline):
        return None
    ds = trainer.eval_ds
    if not manifold.umap_available():
        return umap_kmeans_scores(None, r.e_step.k)
    return umap_kmeans_scores(ds.pixels(), r.e_step.k, ds.targets if ds.has_labels else None,
                           umap_params(r, "euclidean"), r.run.seed)


def umap_view(trainer, features: Callable[[], torch.Tensor]) -> dict | None:
    """"k-means on UMAP of the final features" of ``trainer.eval_ds``; ``features()`` returns them
    (N, D); every rank calls it (embedding may be collective under torchrun), rank 0 clusters."""
    r = trainer.recipe
    if not _wanted(trainer, r.eval.umap_view):
        return None
    feats = features()
    if not distributed.is_main():
        return None
    ds = trainer.eval_ds
    if not manifold.umap_available():
        return umap_kmeans_scores(None, r.e_step.k)
    return umap_kmeans_scores(feats, r.e_step.k, ds.targets if ds.has_labels else None,
                           umap_params(r, "cosine"), r.run.seed)
