"""K-means in torch, on whatever device the features live on.

Two metrics are supported:

* ``"euclidean"`` -- Lloyd's algorithm; the inertia is the sum of squared
  euclidean distances of the points to their assigned centre.
* ``"cosine"`` -- spherical k-means: the points are L2-normalised, every point
  goes to the centre of largest cosine similarity, and the centres are
  re-normalised after each update; the inertia is ``sum(1 - cos)``.

All ``n_init`` restarts run side by side: one matmul per chunk of points
scores every point against the centres of every still-running restart, so the
cost of a restart is a few wide GEMMs rather than many narrow ones.  Distances
use the ``|x|^2 - 2 x.c + |c|^2`` form and at most ``chunk_size`` rows of any
point-by-centre matrix exist at a time.

Conventions follow scikit-learn's ``KMeans`` (``algorithm="lloyd"``) so that
the two agree closely: greedy k-means++ with ``2 + int(log k)`` local trials,
``tol`` relative to the mean per-feature variance of the data and compared with
the squared centre shift summed over all centres, stop early when the labels no
longer change, and a final assignment step so that the labels match the
returned centres.  Randomness comes only from a private ``torch.Generator`` on
the device of ``x`` seeded with ``seed``; the global RNG is never touched.
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F

__all__ = ["KMeansResult", "assign", "kmeans", "pairwise_scores"]

METRICS = ("euclidean", "cosine")
INITS = ("k-means++", "random")


@attrs.frozen
class KMeansResult:
    """Outcome of :func:`kmeans` (the best of the ``n_init`` restarts).

    Attributes:
        labels: ``(N,)`` int64 cluster index of every point, on the device of ``x``.
        centers: ``(K, D)`` centres, same device; unit norm for ``metric="cosine"``.
        inertia: euclidean: sum of squared distances of the points to their
            centre; cosine: sum of ``1 - cos(point, centre)``.
        n_iter: Lloyd iterations run by the returned restart.
    """

    labels: torch.Tensor
    centers: torch.Tensor
    inertia: float
    n_iter: int


# ----------------------------------------------------------------------------
# validation and preparation
# ----------------------------------------------------------------------------


def _as_float_matrix(x, name: str) -> torch.Tensor:
    """Return ``x`` as a 2-D floating tensor (float64 kept, anything else float32)."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) tensor, got shape {tuple(x.shape)}")
    if x.is_complex():
        raise ValueError(f"{name} must be real, got dtype {x.dtype}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dtype)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


# ----------------------------------------------------------------------------
# chunked scoring
# ----------------------------------------------------------------------------


def _best_centre(
    x: torch.Tensor, x_sq: torch.Tensor | None, centers: torch.Tensor, metric: str, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre of every point, for R sets of centres at once.

    Args:
        x: ``(N, D)`` points (unit norm for cosine).
        x_sq: ``(N,)`` squared norms of ``x`` (euclidean only, else ``None``).
        centers: ``(R, K, D)`` centres of R restarts (unit norm for cosine).

    Returns:
        ``labels`` ``(R, N)`` int64 and ``cost`` ``(R, N)``: squared distance
        (euclidean, clamped at 0) or ``1 - cos`` (cosine, clamped at 0).
    """
    r, k, _ = centers.shape
    n = x.shape[0]
    flat_t = centers.reshape(r * k, -1).T
    labels = torch.empty(r, n, dtype=torch.long, device=x.device)
    cost = torch.empty(r, n, dtype=x.dtype, device=x.device)
    if metric == "euclidean":
        c_sq = (centers * centers).sum(-1).reshape(1, r * k)
    for start in range(0, n, chunk_size):
        xc = x[start : start + chunk_size]
        if metric == "euclidean":
            # |c|^2 - 2 x.c: |x|^2 is constant per row and added back after the min.
            part = torch.addmm(c_sq, xc, flat_t, alpha=-2.0).view(-1, r, k)
            val, idx = part.min(dim=2)
            val = (val + x_sq[start : start + chunk_size, None]).clamp_(min=0)
        else:
            sim = (xc @ flat_t).view(-1, r, k)
            val, idx = sim.max(dim=2)
            val = (1.0 - val).clamp_(min=0)
        labels[:, start : start + chunk_size] = idx.T
        cost[:, start : start + chunk_size] = val.T
    return labels, cost


def _point_costs(x: torch.Tensor, x_sq: torch.Tensor | None, points: torch.Tensor, metric: str) -> torch.Tensor:
    """``(M, N')`` cost between M ``points`` ``(M, D)`` and a chunk ``x`` ``(N', D)``."""
    if metric == "euclidean":
        p_sq = (points * points).sum(-1, keepdim=True)
        return torch.addmm(p_sq + x_sq[None, :], points, x.T, alpha=-2.0).clamp_(min=0)
    return (1.0 - points @ x.T).clamp_(min=0)


# ----------------------------------------------------------------------------
# initialisation
# ----------------------------------------------------------------------------


def _init_random(x: torch.Tensor, k: int, n_init: int, gen: torch.Generator) -> torch.Tensor:
    """``(R, K, D)`` centres: K distinct points drawn uniformly per restart."""
    idx = torch.stack(
        [torch.randperm(x.shape[0], generator=gen, device=x.device)[:k] for _ in range(n_init)]
    )
    return x[idx]


def _init_kmeans_pp(
    x: torch.Tensor, x_sq: torch.Tensor | None, k: int, n_init: int, metric: str, chunk_size: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """Greedy k-means++ for R restarts at once; returns ``(R, K, D)`` centres.

    Each new centre is the best (lowest potential) of ``2 + int(log k)``
    candidates sampled with probability proportional to the current cost of a
    point (squared distance, or ``1 - cos`` which is half the squared distance
    on the unit sphere).
    """
    n, dev = x.shape[0], x.device
    r = n_init
    n_trials = 2 + int(math.log(k))
    rows = torch.arange(r, device=dev)
    chosen = torch.empty(r, k, dtype=torch.long, device=dev)
    chosen[:, 0] = torch.randint(n, (r,), generator=gen, device=dev)

    closest = _chunked_costs(x, x_sq, x[chosen[:, 0]], metric, chunk_size)  # (R, N)
    for c in range(1, k):
        cum = torch.cumsum(closest.double(), dim=1)  # (R, N)
        pot = cum[:, -1:]
        rand = torch.rand(r, n_trials, generator=gen, device=dev, dtype=torch.float64) * pot
        cand = torch.searchsorted(cum, rand).clamp_(max=n - 1)  # (R, L)
        # Potential of each candidate: sum_i min(closest_i, cost(candidate, x_i)).
        cand_pot = torch.zeros(r, n_trials, dtype=torch.float64, device=dev)
        keep = []
        for s in range(0, n, chunk_size):
            xs = x[s : s + chunk_size]
            xs_sq = None if x_sq is None else x_sq[s : s + chunk_size]
            d = _point_costs(xs, xs_sq, x[cand.reshape(-1)], metric).view(r, n_trials, -1)
            d = torch.minimum(d, closest[:, None, s : s + chunk_size])
            cand_pot += d.sum(-1, dtype=torch.float64)
            if n <= chunk_size:
                keep.append(d)
        best = cand_pot.argmin(dim=1)
        chosen[:, c] = cand[rows, best]
        if keep:
            closest = keep[0][rows, best]
        else:
            new = _chunked_costs(x, x_sq, x[chosen[:, c]], metric, chunk_size)
            closest = torch.minimum(closest, new)
    return x[chosen]


def _chunked_costs(
    x: torch.Tensor, x_sq: torch.Tensor | None, points: torch.Tensor, metric: str, chunk_size: int
) -> torch.Tensor:
    """``(M, N)`` cost of every point of ``x`` ``(N, D)`` to each of M ``points``."""
    n = x.shape[0]
    out = torch.empty(points.shape[0], n, dtype=x.dtype, device=x.device)
    for s in range(0, n, chunk_size):
        xs_sq = None if x_sq is None else x_sq[s : s + chunk_size]
        out[:, s : s + chunk_size] = _point_costs(x[s : s + chunk_size], xs_sq, points, metric)
    return out


# ----------------------------------------------------------------------------
# Lloyd iterations
# ----------------------------------------------------------------------------


def _exact_cost(x: torch.Tensor, points: torch.Tensor, metric: str) -> torch.Tensor:
    """``(N,)`` cost between rows of ``x`` and ``points`` ``(N, D)``, computed directly.

    Exactly zero for identical rows (no cancellation), unlike the matmul form.
    """
    if metric == "euclidean":
        return ((x - points) ** 2).sum(-1)
    return (1.0 - (x * points).sum(-1)).clamp_(min=0)


def _farthest_points(x: torch.Tensor, cost: torch.Tensor, m: int, metric: str) -> torch.Tensor:
    """Pick ``m`` points by farthest-point traversal starting from ``cost`` ``(N,)``.

    Each pick is the point of largest current cost; the costs are then lowered
    to the cost to that point, so later picks are distinct from earlier ones
    whenever the data allow.  Returns ``(m,)`` indices.
    """
    cost = cost.clone()
    picks = []
    for _ in range(m):
        p = int(cost.argmax())
        picks.append(p)
        cost = torch.minimum(cost, _exact_cost(x, x[p].expand_as(x), metric))
    return torch.tensor(picks, dtype=torch.long, device=x.device)


def _update_centres(
    x: torch.Tensor, labels: torch.Tensor, cost: torch.Tensor, k: int, metric: str
) -> torch.Tensor:
    """New ``(R, K, D)`` centres from ``labels`` ``(R, N)``.

    Empty clusters are re-seeded with the points farthest from their current
    centre (``cost`` ``(R, N)``), as in scikit-learn, never left NaN.
    """
    r = labels.shape[0]
    sums = torch.zeros(r, k, x.shape[1], dtype=x.dtype, device=x.device)
    for i in range(r):
        sums[i].index_add_(0, labels[i], x)
    counts = torch.zeros(r, k, dtype=x.dtype, device=x.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels, dtype=x.dtype))
    if metric == "euclidean":
        centres = sums / counts.clamp(min=1)[..., None]
    else:
        centres = F.normalize(sums, dim=-1)
    empty = counts == 0
    if bool(empty.any()):
        for i in torch.nonzero(empty.any(dim=1)).flatten().tolist():
            slots = torch.nonzero(empty[i]).flatten()
            centres[i, slots] = x[_farthest_points(x, cost[i], len(slots), metric)]
    return centres


def _fill_empty(
    x: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, metric: str, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move centres that own no point onto far-away points until none is empty.

    Args:
        labels: ``(N,)`` and centres ``(K, D)`` of one restart (already assigned).

    Returns:
        the (possibly) changed ``labels`` ``(N,)`` and ``centres`` ``(K, D)``.
        A relocated centre sits exactly on a point that is at positive distance
        from every other centre, so it keeps that point; each round therefore
        fixes at least one centre for good, and when at least K distinct points
        exist every cluster ends up non-empty.
    """
    k = centres.shape[0]
    centres = centres.clone()
    x_sq = (x * x).sum(-1) if metric == "euclidean" else None
    for _ in range(k + 1):
        counts = torch.bincount(labels, minlength=k)
        slots = torch.nonzero(counts == 0).flatten()
        if len(slots) == 0:
            break
        cost = _exact_cost(x, centres[labels], metric)
        if not bool((cost > 0).any()):
            break  # fewer distinct points than clusters: nothing to move to
        centres[slots] = x[_farthest_points(x, cost, len(slots), metric)]
        new_labels, _ = _best_centre(x, x_sq, centres[None], metric, chunk_size)
        labels = new_labels[0]
    return labels, centres


def _lloyd(
    x: torch.Tensor, x_sq: torch.Tensor | None, centres: torch.Tensor, metric: str, max_iter: int,
    tol: float, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run Lloyd iterations for R restarts side by side.

    Args:
        centres: ``(R, K, D)`` initial centres.
        tol: absolute threshold on the squared centre shift summed over centres.

    Returns:
        final ``centres`` ``(R, K, D)`` and ``n_iter`` ``(R,)`` (int64, CPU).
        A restart stops when its labels repeat (strict convergence) or its
        squared shift is ``<= tol``; finished restarts are no longer computed.
    """
    r, k, _ = centres.shape
    n = x.shape[0]
    centres = centres.clone()
    active = torch.arange(r, device=x.device)
    labels_old = torch.full((r, n), -1, dtype=torch.long, device=x.device)
    n_iter = torch.full((r,), max_iter, dtype=torch.long)
    for it in range(max_iter):
        everyone = len(active) == r
        current = centres if everyone else centres[active]
        labels, cost = _best_centre(x, x_sq, current, metric, chunk_size)
        new = _update_centres(x, labels, cost, k, metric)
        shift = ((new - current) ** 2).sum(dim=(1, 2))
        old = labels_old if everyone else labels_old[active]
        done = (labels == old).all(dim=1) | (shift <= tol)
        centres[active] = new
        labels_old[active] = labels
        if bool(done.any()):
            finished = active[done]
            n_iter[finished.cpu()] = it + 1
            active = active[~done]
            if len(active) == 0:
                break
    return centres, n_iter


# ----------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    metric: str = "euclidean",
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    chunk_size: int = 8192,
    init: str = "k-means++",
) -> KMeansResult:
    """Cluster the rows of ``x`` into ``k`` groups; keep the best of ``n_init`` restarts.

    Args:
        x: ``(N, D)`` features on any device (float64 stays float64, any other
            dtype is computed in float32).
        k: number of clusters, ``1 <= k <= N``.
        metric: ``"euclidean"`` (Lloyd) or ``"cosine"`` (spherical k-means).
        n_init: restarts run side by side; the one of lowest inertia is returned.
        max_iter: most Lloyd iterations per restart.
        tol: stop a restart when the squared centre shift (summed over centres)
            is ``<= tol * mean(var(x, dim=0))`` (scikit-learn's convention;
            for cosine the variance of the normalised points is used).
        seed: seed of the private generator; same seed, same device -> same result.
        chunk_size: rows of ``x`` scored against all centres at a time.
        init: ``"k-means++"`` (greedy, ``2 + int(log k)`` trials) or ``"random"``
            (k distinct points).

    Returns:
        :class:`KMeansResult` with ``labels`` ``(N,)``, ``centers`` ``(K, D)``.

    Raises:
        ValueError: for non-2-D or non-finite ``x``, ``k`` outside ``[1, N]``,
            or an unknown option.
    """
    x = _as_float_matrix(x, "x")
    n = x.shape[0]
    _check_metric(metric)
    _check_chunk_size(chunk_size)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if n == 0:
        raise ValueError("x has no rows: cannot cluster an empty set")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int with 1 <= k <= N = {n}, got {k!r}")
    if not isinstance(n_init, int) or n_init < 1:
        raise ValueError(f"n_init must be a positive int, got {n_init!r}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")

    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)

    if metric == "euclidean":
        # Centring leaves the partition unchanged and makes |x|^2 - 2x.c + |c|^2 more accurate.
        mean = x.mean(dim=0)
        x = x - mean
        x_sq = (x * x).sum(-1)
    else:
        x = F.normalize(x, dim=1)
        x_sq = None
    tol_abs = float(tol * x.double().var(dim=0, unbiased=False).mean())

    if init == "random":
        centres = _init_random(x, k, n_init, gen)
    else:
        centres = _init_kmeans_pp(x, x_sq, k, n_init, metric, chunk_size, gen)
    centres, n_iter = _lloyd(x, x_sq, centres, metric, max_iter, tol_abs, chunk_size)

    # Final assignment so labels match the returned centres.
    labels, cost = _best_centre(x, x_sq, centres, metric, chunk_size)
    inertia = cost.double().sum(dim=1)
    counts = torch.zeros(n_init, k, dtype=torch.long, device=x.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))
    for i in torch.nonzero((counts == 0).any(dim=1)).flatten().tolist():
        labels[i], centres[i] = _fill_empty(x, labels[i], centres[i], metric, chunk_size)
        inertia[i] = _exact_cost(x, centres[i][labels[i]], metric).double().sum()

    best = int(inertia.argmin())
    out_centres = centres[best] + mean if metric == "euclidean" else centres[best]
    return KMeansResult(
        labels=labels[best].clone(),
        centers=out_centres.clone(),
        inertia=float(inertia[best]),
        n_iter=int(n_iter[best]),
    )


def pairwise_scores(x: torch.Tensor, centers: torch.Tensor, metric: str) -> torch.Tensor:
    """Full ``(N, K)`` score matrix (materialised: use for modest N).

    Args:
        x: ``(N, D)`` points; centers: ``(K, D)``.

    Returns:
        euclidean: squared distances ``(N, K)``; cosine: cosine similarities
        ``(N, K)`` (both normalised first).
    """
    x = _as_float_matrix(x, "x")
    centers = _as_float_matrix(centers, "centers").to(device=x.device, dtype=x.dtype)
    _check_metric(metric)
    _check_dims(x, centers)
    if metric == "euclidean":
        x_sq = (x * x).sum(-1)
        return _point_costs(x, x_sq, centers, metric).T
    return F.normalize(x, dim=1) @ F.normalize(centers, dim=1).T


def assign(
    x: torch.Tensor, centers: torch.Tensor, metric: str = "euclidean", *, chunk_size: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign every point to its nearest centre (chunked; for prediction).

    Args:
        x: ``(N, D)`` points; centers: ``(K, D)`` centres (e.g. ``KMeansResult.centers``).
        metric: ``"euclidean"`` or ``"cosine"`` (both sides are L2-normalised).

    Returns:
        ``labels`` ``(N,)`` int64 and, per point, the score of its assigned
        centre ``(N,)``: euclidean -> squared distance (lower = more
        confident); cosine -> cosine similarity in ``[-1, 1]`` (higher = more
        confident).
    """
    x = _as_float_matrix(x, "x")
    centers = _as_float_matrix(centers, "centers").to(device=x.device, dtype=x.dtype)
    _check_metric(metric)
    _check_chunk_size(chunk_size)
    _check_dims(x, centers)
    if metric == "euclidean":
        labels, cost = _best_centre(x, (x * x).sum(-1), centers[None], metric, chunk_size)
        return labels[0], cost[0]
    labels, cost = _best_centre(F.normalize(x, dim=1), None, F.normalize(centers, dim=1)[None], metric, chunk_size)
    return labels[0], 1.0 - cost[0]


def _check_dims(x: torch.Tensor, centers: torch.Tensor) -> None:
    if centers.shape[0] < 1:
        raise ValueError("centers has no rows")
    if centers.shape[1] != x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but centers has {centers.shape[1]}")
