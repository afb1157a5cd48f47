"""Clustering metrics: ACC (Hungarian), NMI (arithmetic) and ARI.

Inputs may be lists, numpy arrays or torch tensors (any device), each 1-D with
one integer label per sample.  Label ids are arbitrary integers (need not be
``0..K-1``), and the number of predicted clusters may differ from the number
of classes in either direction.

ACC convention (one-to-one matching, as in the deep-clustering literature):
the predicted clusters and the classes are matched one-to-one so that the
number of agreeing samples is largest (``scipy.optimize.linear_sum_assignment``
on the ``(clusters, classes)`` contingency table).  Only ``min(#clusters,
#classes)`` pairs can be matched, so the samples of a cluster left without a
class (more clusters than classes) and of a class left without a cluster
(fewer clusters than classes) all count as errors.  ACC is never silently 0
because the counts differ.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

__all__ = ["cluster_acc", "cluster_metrics", "hungarian_match"]


def _as_labels(y, name: str) -> np.ndarray:
    """Return ``y`` as a 1-D int64 numpy array; ``ValueError`` if impossible."""
    if hasattr(y, "detach") and hasattr(y, "cpu"):  # torch tensor on any device
        y = y.detach().cpu().numpy()
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per sample), got shape {arr.shape}")
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64)
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        return arr.astype(np.int64)
    if arr.size == 0:
        return arr.astype(np.int64)
    raise ValueError(f"{name} must hold integer labels, got dtype {arr.dtype}")


def _validated(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    t = _as_labels(y_true, "y_true")
    p = _as_labels(y_pred, "y_pred")
    if t.shape[0] != p.shape[0]:
        raise ValueError(f"y_true and y_pred differ in length: {t.shape[0]} vs {p.shape[0]}")
    if t.shape[0] == 0:
        raise ValueError("y_true and y_pred are empty")
    return t, p


def _contingency(t: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(clusters, classes, table)``: sorted ids and the ``(n_clusters, n_classes)`` counts."""
    classes, t_idx = np.unique(t, return_inverse=True)
    clusters, p_idx = np.unique(p, return_inverse=True)
    table = np.zeros((len(clusters), len(classes)), dtype=np.int64)
    np.add.at(table, (p_idx, t_idx), 1)
    return clusters, classes, table


def hungarian_match(y_true, y_pred) -> dict[int, int]:
    """One-to-one map from predicted cluster id to class id maximising agreement.

    Args:
        y_true: ``(N,)`` class ids; y_pred: ``(N,)`` cluster ids.

    Returns:
        ``{cluster_id: class_id}`` for every cluster present in ``y_pred``;
        clusters left unmatched (when there are more clusters than classes)
        map to ``-1`` and their samples count as errors for :func:`cluster_acc`.
    """
    t, p = _validated(y_true, y_pred)
    clusters, classes, table = _contingency(t, p)
    rows, cols = linear_sum_assignment(table, maximize=True)
    mapping = {int(c): -1 for c in clusters}
    for r, c in zip(rows, cols, strict=True):
        mapping[int(clusters[r])] = int(classes[c])
    return mapping


def cluster_acc(y_true, y_pred) -> float:
    """Accuracy after the best one-to-one matching of clusters to classes.

    Args:
        y_true: ``(N,)`` class ids; y_pred: ``(N,)`` cluster ids.

    Returns:
        fraction in ``[0, 1]`` of samples whose cluster is matched to their class.
    """
    t, p = _validated(y_true, y_pred)
    _, _, table = _contingency(t, p)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / t.shape[0])


def cluster_metrics(y_true, y_pred) -> dict[str, float]:
    """NMI (arithmetic normalisation), ACC (Hungarian) and ARI.

    Args:
        y_true: ``(N,)`` class ids; y_pred: ``(N,)`` cluster ids.

    Returns:
        ``{"nmi": float, "acc": float, "ari": float}``.
    """
    t, p = _validated(y_true, y_pred)
    return {
        "nmi": float(normalized_mutual_info_score(t, p, average_method="arithmetic")),
        "acc": cluster_acc(t, p),
        "ari": float(adjusted_rand_score(t, p)),
    }
