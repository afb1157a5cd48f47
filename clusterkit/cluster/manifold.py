"""Clustering on a UMAP manifold: the strong baseline and the manifold k-means rule.

Two uses of UMAP (umap-learn, an optional extra: ``pip install 'clusterkit[umap]'``)
followed by scikit-learn's k-means (K clusters, ``n_init`` 10) on the embedding, as in
N2D (McConville et al., 2019):

* :func:`umap_kmeans_scores` -- "UMAP + k-means on pixels": UMAP of the raw pixels
  (euclidean; ``n_components=10, n_neighbors=20, min_dist=0`` by default) then k-means.
  summary.json keeps it as ``umap_kmeans`` beside ``pixel_kmeans``.  Labelled data: NMI /
  ACC / ARI; every run (labelled or not): the label-free quality measures of
  :mod:`clusterkit.cluster.quality`, computed on the UMAP embedding that was clustered
  (as a run's own quality is computed on the features it clustered).  Note that UMAP
  draws tight, separated clumps by design, so its silhouette is not a like-for-like
  competitor of a deep model's; the size measures are.
* :class:`ManifoldKMeans` -- k-means on the UMAP (cosine metric) of learned features:
  the ``kmeans_e_step`` plugin's ``reduce: umap`` option (E-step and prediction) and the
  evaluation view "k-means on UMAP of the final features" (summary.json ``umap_view``).

Both are seeded (UMAP ``random_state`` and k-means ``random_state`` = the run's seed; UMAP
with a ``random_state`` runs single-threaded, which is what makes it reproducible) and
their wall time is recorded.  Without umap-learn installed, :func:`umap_kmeans_scores`
returns ``{"unavailable": <how to install it>}`` and the tables print that instead.

Predicting new images (safe checkpoints)
----------------------------------------
Checkpoints are loaded with ``torch.load(weights_only=True)`` (tensors and plain data),
so the fitted ``umap.UMAP`` object is never saved.  :class:`ManifoldKMeans` keeps, as
tensors: the L2-normalised training features it was fitted on (N, D), their UMAP
embedding (N, C) and the k-means centres in the embedding (K, C).  A new feature vector is
placed in the embedding the way umap-learn's ``transform`` initialises new points: its
``n_neighbors`` nearest training features (cosine distance) are weighted by UMAP's fuzzy
membership ``exp(-(d - rho) / sigma)`` (``rho``: distance to the nearest neighbour,
``sigma`` solved so that the weights sum to ``log2(n_neighbors)``, as ``smooth_knn_dist``),
and the point's embedding is the weighted mean of theirs (umap-learn then refines that
position by a few epochs of its optimisation; this rule stops at the initialisation, so it
is deterministic, needs neither umap-learn nor numba at prediction time, and costs one
matmul per batch).  A feature equal to a training feature (cosine distance below
``1e-6``) gets that training point's embedding, so an image of the training data is
assigned the cluster it had in training.  The new point then goes to the nearest centre;
confidence = minus the euclidean distance to it in the embedding.

The cost: the checkpoint holds the training features (N x D float32), e.g. 50,000 x 512
features = 100 MB.
"""

from __future__ import annotations

import math
import time
from typing import Any

import attrs
import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["UMAP_INSTALL", "UmapParams", "ManifoldKMeans", "feature_centers", "umap_kmeans_scores",
           "umap_available", "umap_embed", "umap_kmeans", "wanted"]

#: How to get umap-learn; printed wherever a UMAP row cannot be computed.
UMAP_INSTALL = "pip install 'clusterkit[umap]'"
_MISSING = f"umap-learn is not installed; install it with: {UMAP_INSTALL}"
#: Cosine distance under which a new feature counts as a training feature (see the module doc).
EXACT_MATCH = 1e-6


@attrs.frozen
class UmapParams:
    """UMAP's parameters (umap-learn's names); the defaults are N2D's."""

    n_components: int = 10
    n_neighbors: int = 20
    min_dist: float = 0.0
    metric: str = "euclidean"

    def as_dict(self) -> dict:
        return attrs.asdict(self)


def umap_available() -> bool:
    """Whether umap-learn can be imported."""
    import importlib.util

    return importlib.util.find_spec("umap") is not None


def _umap_module():
    if not umap_available():
        from ..errors import RecipeError

        raise RecipeError(f"This recipe clusters on a UMAP embedding, but {_MISSING}. Or switch it off "
                          "(plugins.kmeans_e_step.reduce: none).")
    import warnings

    with warnings.catch_warnings():  # umap-learn's import warns about optional packages (tensorflow, ...)
        warnings.simplefilter("ignore")
        import umap
    return umap


def _numpy(x) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    return x.reshape(len(x), -1)


def umap_embed(x, params: UmapParams, seed: int) -> np.ndarray:
    """UMAP embedding (N, C) float32 of ``x`` (N, ...), seeded by ``seed``.  ``n_neighbors`` is
    capped at N - 1 and ``n_components`` at N - 2 (so that tiny data still embeds)."""
    import warnings

    umap = _umap_module()
    x = _numpy(x)
    n = len(x)
    if n < 4:
        raise ValueError(f"UMAP needs at least 4 points, got {n}")
    reducer = umap.UMAP(n_components=min(params.n_components, n - 2), n_neighbors=min(params.n_neighbors, n - 1),
                        min_dist=params.min_dist, metric=params.metric, random_state=seed)
    with warnings.catch_warnings():  # "n_jobs overridden to 1 by setting random_state": intended
        warnings.simplefilter("ignore")
        return np.asarray(reducer.fit_transform(x), dtype=np.float32)


def umap_kmeans(x, k: int, params: UmapParams, seed: int, n_init: int = 10) -> tuple[np.ndarray, np.ndarray,
                                                                                        np.ndarray]:
    """UMAP of ``x`` then scikit-learn k-means: (labels (N,), embedding (N, C), centres (K, C))."""
    from sklearn.cluster import KMeans

    emb = umap_embed(x, params, seed)
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(emb)
    return km.labels_.astype(np.int64), emb, km.cluster_centers_.astype(np.float32)


def wanted(mode: str, pixel_mode: str, n: int, dims: int) -> bool:
    """Whether a UMAP row set to ``mode`` (``eval.umap_baseline`` / ``eval.umap_view``) is computed.

    ``always``: yes; ``never``: no; ``auto``: exactly when the pixel baseline would be
    (``eval.pixel_baseline`` always, or auto and N x pixels <= 2e7), so the test recipes that
    set ``pixel_baseline: never`` skip UMAP too."""
    if mode != "auto":
        return mode == "always"
    return pixel_mode == "always" or (pixel_mode == "auto" and n * dims <= 2e7)


def _scored(labels: np.ndarray, space, k: int, targets, seed: int, confidence=None) -> dict:
    from .metrics import cluster_metrics
    from .quality import quality_metrics

    out: dict[str, Any] = dict.fromkeys(("nmi", "acc", "ari"))
    if targets is not None:
        out.update(cluster_metrics(targets, torch.as_tensor(labels)))
    out["quality"] = quality_metrics(space, labels, k, confidence, seed=seed)
    return out


def umap_kmeans_scores(x, k: int, targets=None, params: UmapParams | None = None, seed: int = 0) -> dict:
    """"UMAP + k-means on pixels" of ``x`` (N, ...): ``{"nmi", "acc", "ari"`` (None without
    ``targets``), ``"quality"`` (label-free, on the embedding), ``"seconds"``, ``"umap"``
    (the parameters)``}``; ``{"unavailable": message}`` without umap-learn."""
    params = params or UmapParams()
    if not umap_available():
        return {"unavailable": _MISSING}
    start = time.perf_counter()
    labels, emb, _ = umap_kmeans(x, k, params, seed)
    seconds = time.perf_counter() - start
    return {**_scored(labels, emb, k, targets, seed), "seconds": seconds, "umap": params.as_dict()}


def feature_centers(features: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(K, D) L2-normalised mean feature of each cluster (zeros for an empty one): what the
    E-step publishes as ``state.centers`` when the clusters were found on a manifold."""
    f = F.normalize(features.float(), dim=1)
    sums = torch.zeros(k, f.shape[1], device=f.device, dtype=f.dtype).index_add_(0, labels.to(f.device), f)
    return F.normalize(sums, dim=1)


class ManifoldKMeans:
    """k-means (scikit-learn) on the UMAP embedding of features, with a tensor-only state.

    :meth:`fit` embeds the features (UMAP, ``params.metric``, default cosine), runs k-means
    and keeps what :meth:`assign` needs (see the module doc); :meth:`state_dict` /
    :meth:`load_state_dict` carry it through checkpoints as tensors and plain data.

    Example::

        >>> rule = ManifoldKMeans(3, seed=0)                       # doctest: +SKIP
        >>> pred = rule.fit(train_features)                        # UMAP + k-means, kept
        >>> rule.assign(new_features).labels                       # kNN placement, nearest centre
    """

    def __init__(self, k: int, params: UmapParams | None = None, *, n_init: int = 10, seed: int = 0,
                 owner: str = "the manifold k-means", missing_error: type[Exception] | None = None):
        self.k, self.n_init, self.seed = k, n_init, seed
        self.params = params or UmapParams(metric="cosine")
        self.owner, self.missing_error = owner, missing_error
        self.train_features: torch.Tensor | None = None  # (N, D) L2-normalised, CPU
        self.embedding: torch.Tensor | None = None  # (N, C), CPU
        self.centers: torch.Tensor | None = None  # (K, C) in the embedding, CPU
        self.seconds = 0.0

    def cluster(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fit to ``features`` (N, D): (labels (N,), confidences (N,)) on the features' device."""
        start = time.perf_counter()
        labels, emb, centers = umap_kmeans(features, self.k, self.params, self.seed, self.n_init)
        self.seconds = time.perf_counter() - start
        self.train_features = F.normalize(features.detach().float(), dim=1).cpu()
        self.embedding, self.centers = torch.from_numpy(emb), torch.from_numpy(centers)
        lab = torch.from_numpy(labels)
        conf = -(self.embedding - self.centers[lab]).norm(dim=1)
        return lab.to(features.device), conf.to(features.device)

    def fit(self, features: torch.Tensor):
        """Predictions for ``features`` (N, D) by UMAP + k-means fitted to them (kept)."""
        from ..state import Prediction

        return Prediction(*self.cluster(features))

    def place(self, features: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Embedding (M, C) of new ``features`` (M, D) by the kNN rule of the module doc."""
        if self.train_features is None or self.embedding is None or self.centers is None:
            from ..errors import RunDirError

            raise (self.missing_error or RunDirError)(
                f"{self.owner} cannot assign new images: the checkpoint holds no fitted UMAP manifold (it was "
                "written before any evaluation). Resume or rerun the run to write it.")
        train = self.train_features
        emb = self.embedding
        knn = min(self.params.n_neighbors, len(train))
        target = math.log2(knn) if knn > 1 else 1.0
        out = []
        for part in F.normalize(features.detach().float().cpu(), dim=1).split(chunk):
            sim, idx = (part @ train.T).topk(knn, dim=1)
            d = (1 - sim).clamp_min(0)
            rel = (d - d[:, :1]).clamp_min(0)  # d - rho
            lo = torch.zeros(len(part), 1)
            hi = torch.full((len(part), 1), 1e3)
            for _ in range(64):  # bisection for sigma: sum exp(-rel / sigma) = log2(k)
                mid = (lo + hi) / 2
                too_big = torch.exp(-rel / mid).sum(1, keepdim=True) > target
                hi = torch.where(too_big, mid, hi)
                lo = torch.where(too_big, lo, mid)
            w = torch.exp(-rel / hi.clamp_min(1e-12))
            placed = (w.unsqueeze(2) * emb[idx]).sum(1) / w.sum(1, keepdim=True)
            exact = d[:, 0] <= EXACT_MATCH
            placed[exact] = emb[idx[exact, 0]]
            out.append(placed)
        return torch.cat(out) if out else torch.zeros(0, emb.shape[1])

    def assign(self, features: torch.Tensor):
        """Predictions for new ``features`` (M, D): placed on the kept manifold, nearest centre."""
        from ..state import Prediction

        placed = self.place(features)
        dist = torch.cdist(placed, self.centers)  # type: ignore[arg-type]
        conf, labels = (-dist).max(1)
        return Prediction(labels.to(features.device), conf.to(features.device))

    def state_dict(self) -> dict:
        """Tensors and plain data only (``torch.load(weights_only=True)`` reads them)."""
        return {"train_features": self.train_features, "embedding": self.embedding, "centers": self.centers,
                "umap": self.params.as_dict(), "k": self.k, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.train_features = state.get("train_features")
        self.embedding = state.get("embedding")
        self.centers = state.get("centers")
