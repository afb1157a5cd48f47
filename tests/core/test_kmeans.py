"""Tests of clusterkit.cluster.kmeans against scikit-learn and hand-made cases."""

import sys

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from clusterkit.cluster import KMeansResult, assign, kmeans, pairwise_scores


def _blobs(n, d, k, std, seed):
    x, y = make_blobs(n_samples=n, n_features=d, centers=k, cluster_std=std, random_state=seed)
    return torch.from_numpy(x.astype(np.float32)), y


def _direct_sq_inertia(x, labels, centers):
    return float(((x.double() - centers.double()[labels]) ** 2).sum())


# ----------------------------------------------------------------------------
# agreement with scikit-learn
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,d,k,std,seed",
    [
        (500, 2, 3, 1.0, 0),
        (1000, 8, 10, 2.0, 1),
        (1500, 32, 6, 4.0, 4),
        (2000, 16, 25, 1.0, 2),
    ],
)
def test_euclidean_matches_sklearn(n, d, k, std, seed):
    x, _ = _blobs(n, d, k, std, seed)
    ours = kmeans(x, k, seed=0)
    ref = KMeans(n_clusters=k, n_init=10, max_iter=300, tol=1e-4, random_state=0).fit(x.numpy())
    assert isinstance(ours, KMeansResult)
    assert ours.labels.shape == (n,) and ours.labels.dtype == torch.long
    assert ours.centers.shape == (k, d)
    assert adjusted_rand_score(ref.labels_, ours.labels.numpy()) == pytest.approx(1.0)
    assert ours.inertia == pytest.approx(ref.inertia_, rel=1e-2)
    # the reported inertia is the one of the returned labels and centres
    assert ours.inertia == pytest.approx(_direct_sq_inertia(x, ours.labels, ours.centers), rel=1e-4)
    # Lloyd fixed point: each centre is the mean of its points
    for j in range(k):
        torch.testing.assert_close(ours.centers[j], x[ours.labels == j].mean(0), atol=1e-3, rtol=1e-4)
    assert 1 <= ours.n_iter <= 300


@pytest.mark.parametrize("seed", [5, 7, 10])
def test_euclidean_overlapping_blobs_close_to_sklearn(seed):
    """Heavily overlapping blobs have many near-equal local optima: the two
    implementations (different random streams) may stop in different ones, but
    their inertias agree within 1% and the partitions largely agree."""
    x, _ = _blobs(300, 5, 4, 6.0, seed)
    ours = kmeans(x, 4, seed=0)
    ref = KMeans(n_clusters=4, n_init=10, max_iter=300, tol=1e-4, random_state=0).fit(x.numpy())
    assert ours.inertia == pytest.approx(ref.inertia_, rel=1e-2)
    assert adjusted_rand_score(ref.labels_, ours.labels.numpy()) > 0.8
    assert ours.inertia == pytest.approx(_direct_sq_inertia(x, ours.labels, ours.centers), rel=1e-4)


def test_recovers_generating_partition():
    x, y = _blobs(800, 10, 5, 0.5, 7)
    res = kmeans(x, 5)
    assert adjusted_rand_score(y, res.labels.numpy()) == 1.0


# ----------------------------------------------------------------------------
# cosine (spherical) k-means
# ----------------------------------------------------------------------------


def _directional(n_per, d, k, noise, seed):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    y = torch.arange(k).repeat_interleave(n_per)
    scale = torch.rand(k * n_per, 1, generator=g) * 9 + 0.5  # norms vary: only direction matters
    x = (dirs[y] + noise * torch.randn(k * n_per, d, generator=g)) * scale
    return x, y


def test_cosine_recovers_directions():
    x, y = _directional(100, 16, 6, 0.15, 0)
    res = kmeans(x, 6, metric="cosine", seed=3)
    assert adjusted_rand_score(y.numpy(), res.labels.numpy()) == 1.0
    torch.testing.assert_close(res.centers.norm(dim=1), torch.ones(6))
    xn = torch.nn.functional.normalize(x.double(), dim=1)
    direct = float((1 - (xn * res.centers.double()[res.labels]).sum(1)).sum())
    assert res.inertia == pytest.approx(direct, rel=1e-4, abs=1e-3)
    # every point is assigned to its most similar centre
    assert torch.equal(res.labels, (xn.float() @ res.centers.T).argmax(1))


def test_cosine_differs_from_euclidean_on_scaled_data():
    """Points along two rays at very different norms: cosine groups by ray."""
    x, y = _directional(60, 4, 2, 0.05, 1)
    x[::2] *= 50.0
    cos = kmeans(x, 2, metric="cosine")
    assert adjusted_rand_score(y.numpy(), cos.labels.numpy()) == 1.0
    euc = kmeans(x, 2, metric="euclidean")
    assert adjusted_rand_score(y.numpy(), euc.labels.numpy()) < 0.5


# ----------------------------------------------------------------------------
# determinism and RNG isolation
# ----------------------------------------------------------------------------


def test_same_seed_same_result_and_global_rng_untouched():
    x, _ = _blobs(600, 8, 12, 3.0, 2)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = kmeans(x, 12, seed=5, n_init=3)
    b = kmeans(x, 12, seed=5, n_init=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.centers, b.centers)
    assert a.inertia == b.inertia and a.n_iter == b.n_iter
    # different seeds give (at least sometimes) different single-restart solutions
    results = {tuple(kmeans(x, 12, seed=s, n_init=1, init="random").labels.tolist()) for s in range(6)}
    assert len(results) > 1


# ----------------------------------------------------------------------------
# empty clusters
# ----------------------------------------------------------------------------


def test_empty_clusters_are_reseeded():
    # 6 distinct points, each duplicated many times: random init picks duplicate
    # centres, so some clusters start empty and must be re-seeded.
    base = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0], [5.0, 20.0], [20.0, 5.0]])
    x = base.repeat_interleave(torch.tensor([40, 30, 20, 10, 3, 1]), dim=0)
    for seed in range(5):
        res = kmeans(x, 6, init="random", n_init=1, seed=seed)
        assert not torch.isnan(res.centers).any()
        assert torch.bincount(res.labels, minlength=6).min() > 0
        assert res.inertia == pytest.approx(0.0, abs=1e-3)


def test_empty_cluster_with_max_iter_one():
    """Even a single iteration must return K non-empty clusters."""
    x = torch.cat([torch.zeros(50, 3), torch.eye(3) * 5, -torch.eye(3) * 5])
    for seed in range(5):
        res = kmeans(x, 7, init="random", n_init=2, max_iter=1, seed=seed)
        assert not torch.isnan(res.centers).any()
        assert torch.bincount(res.labels, minlength=7).min() > 0


def test_cosine_empty_clusters_reseeded():
    dirs = torch.nn.functional.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    x = dirs.repeat_interleave(torch.tensor([50, 20, 5, 2, 1]), dim=0) * 3.0
    for seed in range(5):
        res = kmeans(x, 5, metric="cosine", init="random", n_init=1, seed=seed)
        assert not torch.isnan(res.centers).any()
        assert torch.bincount(res.labels, minlength=5).min() > 0


@pytest.mark.parametrize(
    "data_seed,k,max_iter,metric",
    [(437, 10, 1, "euclidean"), (540, 20, 2, "euclidean"), (1521, 20, 1, "euclidean"),
     (48, 20, 1, "cosine"), (86, 10, 2, "cosine"), (264, 10, 1, "cosine")],
)
def test_clusters_emptied_by_final_assignment_are_refilled(data_seed, k, max_iter, metric):
    """Cases (found by search) where a centre ends up owning no point after
    the last Lloyd step; the result must still have K non-empty clusters."""
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(data_seed))
    res = kmeans(x, k, init="random", n_init=1, max_iter=max_iter, seed=0, metric=metric)
    assert torch.bincount(res.labels, minlength=k).min() > 0
    labels, _ = assign(x, res.centers, metric)
    assert torch.equal(labels, res.labels)


def test_fill_empty_moves_centre_onto_far_point():
    from clusterkit.cluster.kmeans import _augment_points, _fill_empty

    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]])
    centres = torch.tensor([[1.0], [50.0], [10.5]])
    labels = torch.tensor([0, 0, 0, 2, 2])
    new_labels, new_centres = _fill_empty(_augment_points(x, "euclidean"), labels, centres, "euclidean", 8192)
    assert torch.bincount(new_labels, minlength=3).min() > 0
    assert new_centres[1].item() in (0.0, 2.0)
    assert torch.equal(new_centres[[0, 2]], centres[[0, 2]])


def test_fewer_distinct_points_than_k_gives_no_nan():
    x = torch.tensor([[1.0, 2.0]] * 5 + [[3.0, 4.0]] * 5)
    res = kmeans(x, 4, n_init=2)
    assert not torch.isnan(res.centers).any()
    assert res.inertia == pytest.approx(0.0, abs=1e-4)


# ----------------------------------------------------------------------------
# chunking, edge cases, errors
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("keep_candidate_costs", [True, False])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_chunked_equals_unchunked(metric, keep_candidate_costs, monkeypatch):
    if not keep_candidate_costs:  # force k-means++ to recompute the winner's costs chunk by chunk
        monkeypatch.setattr(sys.modules["clusterkit.cluster.kmeans"], "_KEEP_CANDIDATE_COSTS", 0)
    x, _ = _blobs(400, 6, 5, 1.5, 3)
    small = kmeans(x, 5, metric=metric, chunk_size=7, n_init=3)
    big = kmeans(x, 5, metric=metric, chunk_size=100_000, n_init=3)
    assert torch.equal(small.labels, big.labels)
    torch.testing.assert_close(small.centers, big.centers)
    assert small.inertia == pytest.approx(big.inertia, rel=1e-5)


def test_k_equals_n_and_k_one():
    x, _ = _blobs(30, 3, 3, 1.0, 0)
    res = kmeans(x, 30)
    assert sorted(res.labels.tolist()) == list(range(30))
    assert res.inertia == pytest.approx(0.0, abs=1e-3)
    one = kmeans(x, 1)
    assert torch.equal(one.labels, torch.zeros(30, dtype=torch.long))
    torch.testing.assert_close(one.centers[0], x.mean(0))
    assert one.inertia == pytest.approx(_direct_sq_inertia(x, one.labels, one.centers), rel=1e-5)


def test_input_requiring_grad_is_not_tracked():
    x, _ = _blobs(100, 4, 3, 1.0, 0)
    x.requires_grad_(True)
    res = kmeans(x, 3)
    assert not res.centers.requires_grad
    assert not assign(x, res.centers)[1].requires_grad
    pairwise_scores(x, res.centers, "cosine").sum().backward()
    assert x.grad is not None


def test_float64_and_dtype_handling():
    x, _ = _blobs(200, 4, 3, 1.0, 0)
    r64 = kmeans(x.double(), 3)
    assert r64.centers.dtype == torch.float64
    r_int = kmeans((x * 10).round().to(torch.int32), 3)
    assert r_int.centers.dtype == torch.float32


@pytest.mark.parametrize(
    "x,k,kwargs,match",
    [
        (torch.zeros(5, 2), 0, {}, "k must be"),
        (torch.zeros(5, 2), 6, {}, "k must be"),
        (torch.zeros(5), 2, {}, "2-D"),
        (torch.zeros(2, 5, 2), 2, {}, "2-D"),
        (torch.tensor([[0.0, 1.0], [float("nan"), 1.0], [2.0, 2.0]]), 2, {}, "NaN"),
        (torch.tensor([[0.0, 1.0], [float("inf"), 1.0], [2.0, 2.0]]), 2, {}, "NaN or infinite"),
        (torch.zeros(0, 3), 1, {}, "no rows"),
        (torch.rand(5, 2), 2, {"metric": "manhattan"}, "metric"),
        (torch.rand(5, 2), 2, {"init": "kmeans"}, "init"),
        (torch.rand(5, 2), 2, {"n_init": 0}, "n_init"),
        (torch.rand(5, 2), 2, {"chunk_size": 0}, "chunk_size"),
        (torch.rand(5, 2), 2, {"tol": -1.0}, "tol"),
    ],
)
def test_errors(x, k, kwargs, match):
    with pytest.raises(ValueError, match=match):
        kmeans(x, k, **kwargs)


# ----------------------------------------------------------------------------
# assign / pairwise_scores
# ----------------------------------------------------------------------------


def test_assign_matches_kmeans_labels():
    x, _ = _blobs(300, 5, 4, 1.0, 9)
    res = kmeans(x, 4)
    labels, dist = assign(x, res.centers, "euclidean", chunk_size=13)
    assert torch.equal(labels, res.labels)
    assert float(dist.double().sum()) == pytest.approx(res.inertia, rel=1e-4)
    full = pairwise_scores(x, res.centers, "euclidean")
    assert full.shape == (300, 4)
    torch.testing.assert_close(full.gather(1, labels[:, None])[:, 0], dist, atol=1e-2, rtol=1e-4)
    torch.testing.assert_close(full, torch.cdist(x, res.centers) ** 2, atol=1e-2, rtol=1e-4)


def test_assign_cosine_returns_similarity():
    x, _ = _directional(20, 6, 3, 0.1, 2)
    res = kmeans(x, 3, metric="cosine")
    labels, sim = assign(x * 7.0, res.centers, "cosine")
    assert torch.equal(labels, res.labels)
    expected = torch.nn.functional.cosine_similarity(x, res.centers[labels], dim=1)
    torch.testing.assert_close(sim, expected, atol=1e-5, rtol=1e-5)
    assert float((1 - sim).double().sum()) == pytest.approx(res.inertia, rel=1e-4, abs=1e-4)


def test_assign_errors():
    with pytest.raises(ValueError, match="features"):
        assign(torch.zeros(4, 3), torch.zeros(2, 5), "euclidean")
    with pytest.raises(ValueError, match="metric"):
        assign(torch.zeros(4, 3), torch.zeros(2, 3), "dot")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, _ = _blobs(2000, 16, 8, 1.0, 0)
    cpu = kmeans(x, 8)
    gpu = kmeans(x.cuda(), 8)
    assert gpu.labels.device.type == "cuda" and gpu.centers.device.type == "cuda"
    assert adjusted_rand_score(cpu.labels.numpy(), gpu.labels.cpu().numpy()) == 1.0
    assert gpu.inertia == pytest.approx(cpu.inertia, rel=1e-3)
