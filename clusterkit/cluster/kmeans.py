"""K-means in torch, on whatever device the features live on.

Two metrics are supported:

* ``"euclidean"`` -- Lloyd's algorithm; the inertia is the sum of squared
  euclidean distances of the points to their assigned centre.
* ``"cosine"`` -- spherical k-means: the points are L2-normalised, every point
  goes to the centre of largest cosine similarity, and the centres are
  re-normalised after each update; the inertia is ``sum(1 - cos)``.

Costs are one matmul.  Every point is stored augmented as ``[x, s, 1]``
(``s = |x|^2`` for euclidean, ``1`` for cosine) and every centre as
``[-2c, 1, |c|^2]`` (euclidean) or ``[-c, 1, 0]`` (cosine), so the dot product
is ``|x|^2 - 2 x.c + |c|^2`` or ``1 - x.c``.  The trailing ones column also
gives the cluster sizes when the points are summed per cluster.  At most
``chunk_size`` rows of any point-by-centre matrix exist at a time.

All ``n_init`` restarts run side by side: one matmul per chunk scores every
point against the centres of all still-running restarts (and in k-means++ all
restarts' candidates), so a restart costs a share of a wide GEMM.

Conventions follow scikit-learn's ``KMeans`` (``algorithm="lloyd"``) so the
two agree closely: greedy k-means++ with ``2 + int(log k)`` local trials,
``tol`` relative to the mean per-feature variance of the data and compared
with the squared centre shift summed over all centres, stop early when the
labels no longer change, and a final assignment so that the labels match the
returned centres.  Randomness comes only from a private ``torch.Generator`` on
the device of ``x`` seeded with ``seed``; the global RNG is never touched.
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F

from .. import distributed as dist

__all__ = ["KMeansPredictor", "KMeansResult", "assign", "kmeans", "pairwise_scores"]

METRICS = ("euclidean", "cosine")
INITS = ("k-means++", "random")

# Keep the k-means++ candidates' cost rows between the scoring and the update
# of a step when they hold at most this many elements; else recompute the winner's.
_KEEP_CANDIDATE_COSTS = 1 << 24


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
# validation
# ----------------------------------------------------------------------------


def _as_float_matrix(x, name: str) -> torch.Tensor:
    """Return ``x`` as a 2-D floating tensor (float64 kept, anything else float32)."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) tensor, got shape {tuple(x.shape)}")
    if x.is_complex():
        raise ValueError(f"{name} must be real, got dtype {x.dtype}")
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _check_dims(x: torch.Tensor, centers: torch.Tensor) -> None:
    if centers.shape[0] < 1:
        raise ValueError("centers has no rows")
    if centers.shape[1] != x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but centers has {centers.shape[1]}")


# ----------------------------------------------------------------------------
# costs as one matmul
# ----------------------------------------------------------------------------


def _augment_points(x: torch.Tensor, metric: str) -> torch.Tensor:
    """``(N, D)`` -> ``(N, D + 2)`` rows ``[x, s, 1]``; ``s = |x|^2`` (euclidean) or 1 (cosine)."""
    ones = x.new_ones(x.shape[0], 1)
    s = (x * x).sum(-1, keepdim=True) if metric == "euclidean" else ones
    return torch.cat([x, s, ones], dim=1)


def _augment_centres(c: torch.Tensor, metric: str) -> torch.Tensor:
    """``(..., D)`` -> ``(..., D + 2)``: ``[-2c, 1, |c|^2]`` (euclidean) or ``[-c, 1, 0]`` (cosine).

    The dot product with an augmented point is its cost to ``c``.
    """
    ones = c.new_ones(*c.shape[:-1], 1)
    if metric == "euclidean":
        return torch.cat([-2.0 * c, ones, (c * c).sum(-1, keepdim=True)], dim=-1)
    return torch.cat([-c, ones, torch.zeros_like(ones)], dim=-1)


def _best_centre(
    xa: torch.Tensor, centres: torch.Tensor, metric: str, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre of every point, for R sets of centres at once.

    Args:
        xa: ``(N, D + 2)`` augmented points (see :func:`_augment_points`).
        centres: ``(R, K, D)`` centres of R restarts (unit norm for cosine).

    Returns:
        ``labels`` ``(R, N)`` int64 and ``cost`` ``(R, N)``: squared distance
        or ``1 - cos`` to that centre, clamped at 0.
    """
    r, k, _ = centres.shape
    n = xa.shape[0]
    ca_t = _augment_centres(centres, metric).reshape(r * k, -1).T
    labels = torch.empty(r, n, dtype=torch.long, device=xa.device)
    cost = torch.empty(r, n, dtype=xa.dtype, device=xa.device)
    for s in range(0, n, chunk_size):
        val, idx = (xa[s : s + chunk_size] @ ca_t).view(-1, r, k).min(dim=2)
        labels[:, s : s + chunk_size] = idx.T
        cost[:, s : s + chunk_size] = val.T
    return labels, cost.clamp_(min=0)


def _chunked_costs(xa: torch.Tensor, points: torch.Tensor, metric: str, chunk_size: int) -> torch.Tensor:
    """``(M, N)`` cost (clamped at 0) of every augmented point ``xa`` to each of M ``points`` ``(M, D)``."""
    pa = _augment_centres(points, metric)
    out = torch.empty(points.shape[0], xa.shape[0], dtype=xa.dtype, device=xa.device)
    for s in range(0, xa.shape[0], chunk_size):
        out[:, s : s + chunk_size] = pa @ xa[s : s + chunk_size].T
    return out.clamp_(min=0)


def _exact_cost(x: torch.Tensor, points: torch.Tensor, metric: str) -> torch.Tensor:
    """``(N,)`` cost between rows of ``x`` and of ``points`` (both ``(N, D)``), computed directly.

    Exactly zero for identical rows (no cancellation), unlike the matmul form.
    """
    if metric == "euclidean":
        return ((x - points) ** 2).sum(-1)
    return (1.0 - (x * points).sum(-1)).clamp_(min=0)


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
    xa: torch.Tensor, k: int, n_init: int, metric: str, chunk_size: int, gen: torch.Generator
) -> torch.Tensor:
    """Greedy k-means++ for R restarts at once; returns ``(R, K, D)`` centres.

    Each new centre is the best (lowest potential) of ``L = 2 + int(log k)``
    candidates sampled with probability proportional to the current cost of a
    point (squared distance, or ``1 - cos`` which is half the squared distance
    on the unit sphere).  The R*L candidates of a step share one matmul per
    chunk; a chunk has ``chunk_size * k / L`` rows, the memory of a chunk of the
    assignment step.
    """
    x = xa[:, :-2]
    n, dev = x.shape[0], x.device
    r, n_trials = n_init, 2 + int(math.log(k))
    rows = torch.arange(r, device=dev)
    step = max(1, chunk_size * k // n_trials)
    keep = r * n_trials * n <= max(_KEEP_CANDIDATE_COSTS, r * n_trials * step)
    chosen = torch.empty(r, k, dtype=torch.long, device=dev)
    chosen[:, 0] = torch.randint(n, (r,), generator=gen, device=dev)

    closest = _chunked_costs(xa, x[chosen[:, 0]], metric, chunk_size)  # (R, N)
    for c in range(1, k):
        cum = torch.cumsum(closest, dim=1, dtype=torch.float64)  # (R, N)
        rand = torch.rand(r, n_trials, generator=gen, device=dev, dtype=torch.float64) * cum[:, -1:]
        cand = torch.searchsorted(cum, rand).clamp_(max=n - 1).reshape(-1)  # (R*L,)
        pa = _augment_centres(x[cand], metric)
        # Potential of each candidate: sum_i min(closest_i, cost(candidate, x_i)).
        pot = torch.zeros(r, n_trials, dtype=x.dtype, device=dev)
        kept = []
        for s in range(0, n, step):
            d = (pa @ xa[s : s + step].T).view(r, n_trials, -1)
            torch.minimum(d, closest[:, None, s : s + step], out=d)
            pot += d.sum(-1)
            if keep:
                kept.append(d)
        best = pot.argmin(dim=1)
        chosen[:, c] = cand.view(r, n_trials)[rows, best]
        if keep:
            closest = kept[0][rows, best] if len(kept) == 1 else torch.cat([d[rows, best] for d in kept], dim=1)
            closest.clamp_(min=0)
        else:
            closest = torch.minimum(closest, _chunked_costs(xa, x[chosen[:, c]], metric, chunk_size))
    return x[chosen]


# ----------------------------------------------------------------------------
# Lloyd iterations and empty clusters
# ----------------------------------------------------------------------------


def _farthest_points(x: torch.Tensor, cost: torch.Tensor, m: int, metric: str) -> torch.Tensor:
    """Pick ``m`` points of ``x`` ``(N, D)`` by farthest-point traversal from ``cost`` ``(N,)``.

    Each pick is the point of largest current cost; costs are then lowered to
    the cost to that point, so later picks differ from earlier ones whenever
    the data allow.  Returns ``(m,)`` indices.
    """
    cost = cost.clone()
    picks = []
    for _ in range(m):
        p = int(cost.argmax())
        picks.append(p)
        cost = torch.minimum(cost, _exact_cost(x, x[p].expand_as(x), metric))
    return torch.tensor(picks, dtype=torch.long, device=x.device)


def _update_centres(
    xa: torch.Tensor, labels: torch.Tensor, cost: torch.Tensor, k: int, metric: str,
    shard: tuple[int, int] | None = None,
) -> torch.Tensor:
    """New ``(R, K, D)`` centres from ``labels`` ``(R, N)``.

    Empty clusters are re-seeded with the points farthest from their current
    centre (``cost`` ``(R, N)``), as in scikit-learn, never left NaN.  With
    ``shard = (start, stop)`` (torch.distributed), ``labels`` and ``cost`` are of
    this rank's rows ``xa[start:stop]`` only: the per-cluster sums are all-reduced,
    so every rank gets the same centres.
    """
    r, dim = labels.shape[0], xa.shape[1] - 2
    local = xa if shard is None else xa[shard[0]:shard[1]]
    sums = torch.zeros(r, k, dim + 2, dtype=xa.dtype, device=xa.device)
    for i in range(r):
        sums[i].index_add_(0, labels[i], local)
    if shard is not None:
        dist.all_reduce(sums)
    counts = sums[..., -1]  # the ones column
    if metric == "euclidean":
        centres = sums[..., :dim] / counts.clamp(min=1)[..., None]
    else:
        centres = F.normalize(sums[..., :dim], dim=-1)
    empty = counts == 0
    if bool(empty.any()):
        if shard is not None:
            cost = dist.gather_rows(cost, xa.shape[0], dim=1)
        x = xa[:, :dim]
        for i in torch.nonzero(empty.any(dim=1)).flatten().tolist():
            slots = torch.nonzero(empty[i]).flatten()
            centres[i, slots] = x[_farthest_points(x, cost[i], len(slots), metric)]
    return centres


def _fill_empty(
    xa: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, metric: str, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move centres that own no point onto far-away points until none is empty.

    Args:
        xa: ``(N, D + 2)`` augmented points; labels ``(N,)`` and centres
            ``(K, D)`` of one restart, already assigned.

    Returns:
        the (possibly) changed ``labels`` ``(N,)`` and ``centres`` ``(K, D)``.
        A relocated centre sits exactly on a point at positive distance from
        every other centre, so it keeps that point; each round fixes at least
        one centre for good, and when there are at least K distinct points
        every cluster ends up non-empty.
    """
    k = centres.shape[0]
    x = xa[:, :-2]
    centres = centres.clone()
    for _ in range(k + 1):
        slots = torch.nonzero(torch.bincount(labels, minlength=k) == 0).flatten()
        if len(slots) == 0:
            break
        cost = _exact_cost(x, centres[labels], metric)
        if not bool((cost > 0).any()):
            break  # fewer distinct points than clusters: nowhere to move to
        centres[slots] = x[_farthest_points(x, cost, len(slots), metric)]
        labels = _best_centre(xa, centres[None], metric, chunk_size)[0][0]
    return labels, centres


def _lloyd(
    xa: torch.Tensor, centres: torch.Tensor, metric: str, max_iter: int, tol: float, chunk_size: int,
    shard: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run Lloyd iterations for R restarts side by side.

    Args:
        xa: ``(N, D + 2)`` augmented points.
        centres: ``(R, K, D)`` initial centres.
        tol: absolute threshold on the squared centre shift summed over centres.

    Returns:
        final ``centres`` ``(R, K, D)`` and ``n_iter`` ``(R,)`` (int64, CPU).
        A restart stops when its labels repeat (strict convergence) or its
        squared shift is ``<= tol``; finished restarts are no longer computed.
        With ``shard = (start, stop)`` each rank assigns its rows only and the sums
        and the convergence test are all-reduced: every rank follows the same path.
    """
    r, k, _ = centres.shape
    centres = centres.clone()
    local = xa if shard is None else xa[shard[0]:shard[1]]
    active = torch.arange(r, device=xa.device)
    labels_old = torch.full((r, local.shape[0]), -1, dtype=torch.long, device=xa.device)
    n_iter = torch.full((r,), max_iter, dtype=torch.long)
    for it in range(max_iter):
        everyone = len(active) == r
        current = centres if everyone else centres[active]
        labels, cost = _best_centre(local, current, metric, chunk_size)
        new = _update_centres(xa, labels, cost, k, metric, shard)
        shift = ((new - current) ** 2).sum(dim=(1, 2))
        old = labels_old if everyone else labels_old[active]
        same = (labels == old).all(dim=1)
        if shard is not None:  # converged only when the labels repeat on every rank
            same = dist.all_reduce(same.to(torch.int32), "min").bool()
        done = same | (shift <= tol)
        centres[active] = new
        labels_old[active] = labels
        if bool(done.any()):
            n_iter[active[done].cpu()] = it + 1
            active = active[~done]
            if len(active) == 0:
                break
    return centres, n_iter


# ----------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------


@torch.no_grad()
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
    distributed: bool = False,
) -> KMeansResult:
    """Cluster the rows of ``x`` into ``k`` groups; keep the best of ``n_init`` restarts.

    Args:
        x: ``(N, D)`` features on any device (float64 stays float64, any other
            dtype is computed in float32); no gradient is tracked.
        k: number of clusters, ``1 <= k <= N``.
        metric: ``"euclidean"`` (Lloyd) or ``"cosine"`` (spherical k-means).
        n_init: restarts, run side by side; the one of lowest inertia is returned.
        max_iter: most Lloyd iterations per restart.
        tol: stop a restart when the squared centre shift (summed over centres)
            is ``<= tol * mean(var(x, dim=0))`` (scikit-learn's convention;
            for cosine the variance of the normalised points is used).
        seed: seed of the private generator; same seed, same device -> same result.
        chunk_size: rows of ``x`` scored against all centres at a time.
        init: ``"k-means++"`` (greedy, ``2 + int(log k)`` trials) or ``"random"``
            (k distinct points).
        distributed: under torch.distributed, every rank passes the same ``x`` and the
            Lloyd iterations are sharded: each rank assigns its contiguous share of the
            rows and the per-cluster sums are all-reduced (the initialisation runs on
            every rank alike).  The result is identical on every rank.  Every rank must
            make the call.  Without a process group it is the plain call.

    Returns:
        :class:`KMeansResult` with ``labels`` ``(N,)`` and ``centers`` ``(K, D)``.
        Every cluster is non-empty whenever ``x`` has at least ``k`` distinct rows.
        Clusters are numbered in the order of their first point (row 0 is in cluster 0).

    Raises:
        ValueError: for non-2-D or non-finite ``x``, ``k`` outside ``[1, N]``,
            or an invalid option.
    """
    x = _as_float_matrix(x, "x")
    n = x.shape[0]
    _check_kmeans_args(n, k, metric=metric, n_init=n_init, max_iter=max_iter, tol=tol, chunk_size=chunk_size,
                       init=init)
    xa, mean, tol_abs = _prepare(x, metric, tol)
    centres = _initial_centres(xa, k, n_init, metric, init, chunk_size, seed)
    shard = dist.shard_range(n) if distributed and dist.is_distributed() else None
    centres, n_iter = _lloyd(xa, centres, metric, max_iter, tol_abs, chunk_size, shard)
    labels, inertia = _final_assignment(xa, centres, metric, chunk_size, shard)
    best = int(inertia.argmin())
    renumber, order = _first_point_order(labels[best], k)
    best_centres = centres[best][order]
    out_centres = best_centres + mean if mean is not None else best_centres
    return KMeansResult(labels=renumber[labels[best]], centers=out_centres.clone(), inertia=float(inertia[best]),
                        n_iter=int(n_iter[best]))


def _initial_centres(xa: torch.Tensor, k: int, n_init: int, metric: str, init: str, chunk_size: int,
                     seed: int) -> torch.Tensor:
    """``(n_init, K, D)`` starting centres, drawn with a private generator seeded with ``seed``."""
    gen = torch.Generator(device=xa.device)
    gen.manual_seed(seed)
    if init == "random":
        return _init_random(xa[:, :-2], k, n_init, gen)
    return _init_kmeans_pp(xa, k, n_init, metric, chunk_size, gen)


def _check_kmeans_args(n: int, k: int, *, metric: str, n_init: int, max_iter: int, tol: float, chunk_size: int,
                       init: str) -> None:
    """ValueError for an option :func:`kmeans` cannot run with, on ``n`` points."""
    _check_metric(metric)
    _check_chunk_size(chunk_size)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if n == 0:
        raise ValueError("x has no rows: cannot cluster an empty set")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int with 1 <= k <= N = {n}, got {k!r}")
    if isinstance(n_init, bool) or not isinstance(n_init, int) or n_init < 1:
        raise ValueError(f"n_init must be a positive int, got {n_init!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")


def _prepare(x: torch.Tensor, metric: str, tol: float) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """``(augmented points, the mean subtracted (euclidean; None for cosine), absolute tol)``.

    Euclidean: the points are centred, which leaves the partition unchanged and makes
    |x|^2 - 2x.c + |c|^2 more accurate; cosine: they are L2-normalised."""
    mean = None
    if metric == "euclidean":
        mean = x.mean(dim=0)
        work = x - mean
    else:
        work = F.normalize(x, dim=1)
    tol_abs = tol * float(work.var(dim=0, unbiased=False).mean())
    return _augment_points(work, metric), mean, tol_abs


def _final_assignment(
    xa: torch.Tensor, centres: torch.Tensor, metric: str, chunk_size: int, shard: tuple[int, int] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every restart's labels ``(R, N)`` for its final centres and its inertia ``(R,)`` (float64);
    a restart left with an empty cluster gets it filled first (``centres`` is updated in place)."""
    n = xa.shape[0]
    r, k, _ = centres.shape
    if shard is None:
        labels, cost = _best_centre(xa, centres, metric, chunk_size)
    else:
        labels, cost = _best_centre(xa[shard[0]:shard[1]], centres, metric, chunk_size)
        labels, cost = dist.gather_rows(labels, n, dim=1), dist.gather_rows(cost, n, dim=1)
    inertia = cost.sum(dim=1, dtype=torch.float64)
    counts = torch.zeros(r, k, dtype=torch.long, device=xa.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))
    for i in torch.nonzero((counts == 0).any(dim=1)).flatten().tolist():
        labels[i], centres[i] = _fill_empty(xa, labels[i], centres[i], metric, chunk_size)
        inertia[i] = _exact_cost(xa[:, :-2], centres[i][labels[i]], metric).sum(dtype=torch.float64)
    return labels, inertia


def _first_point_order(labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(renumber, order)``: cluster ids renumbered by their first point, so that restarts (or
    ranks) that reach the same partition give the same labels (near-tied restarts whose inertias
    differ by rounding only, as with sums all-reduced in another order, cannot renumber the
    result).  ``order``: the old ids in the order of their first point; ``renumber[old] = new``."""
    n = labels.shape[0]
    first = torch.full((k,), n, dtype=torch.long, device=labels.device)
    first.scatter_reduce_(0, labels, torch.arange(n, device=labels.device), reduce="amin")
    order = torch.argsort(first, stable=True)
    renumber = torch.empty_like(order)
    renumber[order] = torch.arange(k, device=labels.device)
    return renumber, order


@torch.no_grad()
def assign(
    x: torch.Tensor, centers: torch.Tensor, metric: str = "euclidean", *, chunk_size: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign every point to its nearest centre (chunked; for prediction).

    Args:
        x: ``(N, D)`` points; centers: ``(K, D)`` centres (e.g. ``KMeansResult.centers``).
        metric: ``"euclidean"`` or ``"cosine"`` (both sides L2-normalised first).

    Returns:
        ``labels`` ``(N,)`` int64 and the score of each point's centre ``(N,)``:
        euclidean -> squared distance (lower = more confident); cosine ->
        cosine similarity in ``[-1, 1]`` (higher = more confident).
    """
    x = _as_float_matrix(x, "x")
    centers = _as_float_matrix(centers, "centers").to(device=x.device, dtype=x.dtype)
    _check_metric(metric)
    _check_chunk_size(chunk_size)
    _check_dims(x, centers)
    if metric == "cosine":
        x, centers = F.normalize(x, dim=1), F.normalize(centers, dim=1)
    labels, cost = _best_centre(_augment_points(x, metric), centers[None], metric, chunk_size)
    return (labels[0], cost[0]) if metric == "euclidean" else (labels[0], 1.0 - cost[0])


def pairwise_scores(x: torch.Tensor, centers: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """Full ``(N, K)`` score matrix (materialised: for modest N, e.g. soft assignments).

    Args:
        x: ``(N, D)`` points; centers: ``(K, D)``.

    Returns:
        euclidean: squared distances ``(N, K)``; cosine: cosine similarities
        ``(N, K)`` of the L2-normalised rows.  Differentiable (unlike
        :func:`kmeans` and :func:`assign`, which run under ``torch.no_grad``).
    """
    x = _as_float_matrix(x, "x")
    centers = _as_float_matrix(centers, "centers").to(device=x.device, dtype=x.dtype)
    _check_metric(metric)
    _check_dims(x, centers)
    if metric == "cosine":
        return F.normalize(x, dim=1) @ F.normalize(centers, dim=1).T
    return _chunked_costs(_augment_points(x, metric), centers, metric, max(x.shape[0], 1)).T


class KMeansPredictor:
    """The k-means prediction rule of a run, with the state that predicting new images needs.

    :meth:`fit` (an evaluation): k-means on the evaluation features (N, D), keeping the centres
    (K, D); :meth:`assign` (new images of a finished run): nearest kept centre, never a refit.
    The confidence is the cosine to the assigned centre (metric cosine) or minus the euclidean
    distance to it.  Used by the core when no plugin predicts and by ``kmeans_e_step``, so both
    predict by the same code; :meth:`state_dict` / :meth:`load_state_dict` carry the centres
    through checkpoints.

    ``owner`` names the rule in the error raised when :meth:`assign` has no centres
    (``missing_error``, a :class:`~clusterkit.errors.ClusterkitError` subclass).
    """

    def __init__(self, k: int, *, metric: str = "cosine", n_init: int = 10, max_iter: int = 300, tol: float = 1e-4,
                 seed: int = 0, distributed: bool = False, owner: str = "the core's k-means",
                 missing_error: type[Exception] | None = None):
        self.k, self.metric, self.seed, self.distributed = k, metric, seed, distributed
        self.n_init, self.max_iter, self.tol = n_init, max_iter, tol
        self.owner = owner
        self.missing_error = missing_error
        self.centers: torch.Tensor | None = None

    def cluster(self, features: torch.Tensor) -> KMeansResult:
        """k-means of ``features`` (N, D) with this rule's settings."""
        return kmeans(features, self.k, metric=self.metric, n_init=self.n_init, max_iter=self.max_iter, tol=self.tol,
                      seed=self.seed, distributed=self.distributed)

    def fit(self, features: torch.Tensor, result: KMeansResult | None = None):
        """Predictions for ``features`` (N, D) by a k-means fitted to them (``result``: an
        already computed k-means of exactly these features); the centres are kept."""
        result = self.cluster(features) if result is None else result
        self.centers = result.centers.detach().cpu()
        return self._prediction(features, result.labels, result.centers)

    def assign(self, features: torch.Tensor):
        """Predictions for new ``features`` (N, D): the nearest kept centre."""
        if self.centers is None:
            from clusterkit.errors import RunDirError

            error = self.missing_error or RunDirError
            raise error(f"{self.owner} cannot assign new images: the checkpoint holds no k-means centres of an "
                        "evaluation (it was written before any evaluation, or by an older clusterkit). Resume or "
                        "rerun the run with this version to write them.")
        centers = self.centers.to(features.device, features.dtype)
        labels, _ = assign(features, centers, metric=self.metric)
        return self._prediction(features, labels, centers)

    def _prediction(self, features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor):
        from clusterkit.state import Prediction

        if self.metric == "cosine":
            conf = (torch.nn.functional.normalize(features, dim=1) * centers[labels]).sum(1)
        else:
            conf = -(features - centers[labels]).norm(dim=1)
        return Prediction(labels, conf)

    def state_dict(self) -> dict:
        return {"centers": self.centers}

    def load_state_dict(self, state: dict) -> None:
        self.centers = state.get("centers")
