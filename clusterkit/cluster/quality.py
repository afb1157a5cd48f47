"""Label-free clustering quality: how good a clustering looks without any labels.

:func:`quality_metrics` scores predicted clusters on the features they were made from,
for every run, labelled or not:

==================== ============================================================ ==========
key                  measure                                                      better
==================== ============================================================ ==========
``silhouette``       mean silhouette, cosine distance (scikit-learn), on a seeded   higher
                     random sample of at most :data:`SILHOUETTE_SAMPLE` points
``calinski_harabasz`` between / within dispersion ratio (scikit-learn)             higher
``davies_bouldin``   mean worst-case cluster similarity (scikit-learn)             lower
``size_entropy``     entropy of the cluster sizes over ``log K``: 1 = equal sizes, higher (balanced data)
                     0 = one cluster holds everything
``min_share``        the smallest cluster's share of the samples (0: an empty one)  --
``max_share``        the largest cluster's share                                   --
``mean_confidence``  mean of the prediction rule's confidence (cosine to the        higher
                     centre for k-means, max probability for a cluster head)
==================== ============================================================ ==========

The methods cluster by cosine, so Calinski-Harabasz and Davies-Bouldin are computed on the
L2-normalised features (Euclidean distance on the unit sphere is a monotone function of the
cosine); the silhouette uses the cosine distance directly.  Measures that need at least two
non-empty clusters (silhouette, CH, DB) are None when there is one.  ``mean_confidence``
depends on the prediction rule, so compare it between runs of the same method only.

Example::

    >>> feats = torch.randn(300, 16); labels = torch.arange(300) % 3
    >>> q = quality_metrics(feats, labels, k=3)
    >>> sorted(q)                                               # doctest: +NORMALIZE_WHITESPACE
    ['calinski_harabasz', 'davies_bouldin', 'max_share', 'mean_confidence', 'min_share', 'silhouette',
     'size_entropy']
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["QUALITY_KEYS", "QUALITY_NAMES", "HIGHER_IS_BETTER", "SILHOUETTE_SAMPLE", "quality_metrics",
           "size_measures"]

#: The keys :func:`quality_metrics` returns, in display order.
QUALITY_KEYS = ("silhouette", "calinski_harabasz", "davies_bouldin", "size_entropy", "min_share", "max_share",
                "mean_confidence")
#: Short display names.
QUALITY_NAMES = {"silhouette": "silhouette", "calinski_harabasz": "Calinski-Harabasz",
                 "davies_bouldin": "Davies-Bouldin", "size_entropy": "size entropy", "min_share": "min share",
                 "max_share": "max share", "mean_confidence": "mean confidence"}
#: Whether a larger value means a better clustering (None: neither, a description).
HIGHER_IS_BETTER = {"silhouette": True, "calinski_harabasz": True, "davies_bouldin": False,
                    "size_entropy": True, "min_share": None, "max_share": None, "mean_confidence": True}
#: The silhouette is O(n^2): it is computed on a seeded random sample of this many points.
SILHOUETTE_SAMPLE = 4000


def _labels_numpy(labels) -> np.ndarray:
    if torch.is_tensor(labels):
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels).reshape(-1).astype(np.int64)


def size_measures(labels, k: int | None = None) -> dict[str, float]:
    """``size_entropy`` (normalised by ``log K``), ``min_share`` and ``max_share`` of ``labels`` (N,).

    ``k``: the number of clusters asked for (empty clusters count, with share 0); default:
    the number of distinct labels.
    """
    y = _labels_numpy(labels)
    n = len(y)
    if n == 0:
        raise ValueError("no labels to measure")
    ids, counts = np.unique(y, return_counts=True)
    k = max(int(k or 0), len(ids))
    shares = counts / n
    entropy = float(-(shares * np.log(shares)).sum())
    return {"size_entropy": min(1.0, max(0.0, entropy / math.log(k))) if k > 1 else 0.0,
            "min_share": float(shares.min()) if len(ids) == k else 0.0,
            "max_share": float(shares.max())}


def quality_metrics(features, labels, k: int | None = None, confidence=None, sample: int = SILHOUETTE_SAMPLE,
                    seed: int = 0) -> dict[str, float | None]:
    """Label-free quality of the clustering ``labels`` (N,) of ``features`` (N, D).

    Args:
        features: the features the clusters were predicted from (torch or numpy, any device).
        labels: predicted cluster ids (N,).
        k: the number of clusters asked for (empty ones count in the size measures).
        confidence: the prediction's confidence (N,) for ``mean_confidence`` (None: None).
        sample: the silhouette is computed on at most this many points, drawn with ``seed``
            (all points when N <= sample), so its cost is bounded and it is reproducible.
        seed: the sample's seed.

    Returns:
        ``{key: value}`` for every key of :data:`QUALITY_KEYS` (None where undefined).
    """
    from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

    x = features.detach().float().cpu().numpy() if torch.is_tensor(features) else np.asarray(features, np.float32)
    x = x.reshape(len(x), -1).astype(np.float32, copy=False)
    y = _labels_numpy(labels)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} feature rows but {len(y)} labels")
    out: dict[str, float | None] = dict.fromkeys(QUALITY_KEYS)
    out.update(size_measures(y, k))
    if confidence is not None:
        c = confidence.detach().float().cpu().numpy() if torch.is_tensor(confidence) else np.asarray(confidence)
        out["mean_confidence"] = float(np.mean(c))
    unit = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float64)
    n_clusters = len(np.unique(y))
    if 2 <= n_clusters <= len(y) - 1:
        out["calinski_harabasz"] = float(calinski_harabasz_score(unit, y))
        out["davies_bouldin"] = float(davies_bouldin_score(unit, y))
        idx = np.arange(len(y))
        if len(y) > sample:
            idx = np.sort(np.random.default_rng(seed).choice(len(y), sample, replace=False))
        if 2 <= len(np.unique(y[idx])) <= len(idx) - 1:
            out["silhouette"] = float(silhouette_score(unit[idx], y[idx], metric="cosine"))
    return out
