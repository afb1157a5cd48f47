"""kmeans_e_step: the E-step's pseudo-labels and centres, its parameters, the reuse of the
k-means of one step's features, and prediction of new data against the saved centres.

Synthetic features on a hand-made TrainState: no training, each test well under a second.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clusterkit import TrainState
from clusterkit.cluster import kmeans
from clusterkit.errors import PluginError, RecipeError
from clusterkit.recipe import load_recipe
from clusterkit.schema import build
from clusterkit_plugins.propos.kmeans_e_step import KMeansEStep

K, D, PER = 4, 8, 25


def blobs(k: int = K, per: int = PER, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``k * per`` points (N, D) around ``k`` random directions, shuffled, and their group."""
    g = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(k, D, generator=g), dim=1)
    truth = torch.arange(k).repeat_interleave(per)
    x = 3.0 * directions[truth] + 0.3 * torch.randn(k * per, D, generator=g)
    perm = torch.randperm(k * per, generator=g)
    return x[perm], truth[perm]


def make(features: torch.Tensor | None = None, k: int = K, run_seed: int = 0, **params):
    """(plugin, state) with ``state.features("train")`` returning ``features`` (the same object
    on every call, as the core's per-step feature cache does)."""
    recipe = load_recipe(data={"e_step": {"k": k}, "run": {"device": "cpu", "seed": run_seed}})
    state = TrainState(recipe=recipe, device=torch.device("cpu"), model=nn.ModuleDict(), num_train=0,
                       steps_per_epoch=1, feature_fn=lambda split: features)
    plugin = KMeansEStep(build(KMeansEStep.Params, params, "plugins.kmeans_e_step"))
    plugin.name = "kmeans_e_step"
    return plugin, state


def naive_cosine_labels(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """argmax over the centres of cos(x_i, c_k), written out."""
    sims = torch.empty(x.shape[0], centers.shape[0], dtype=torch.float64)
    for i in range(x.shape[0]):
        for j in range(centers.shape[0]):
            a, b = x[i].double(), centers[j].double()
            sims[i, j] = (a @ b) / (a.norm() * b.norm())
    return sims.argmax(dim=1)


@pytest.fixture
def spy(monkeypatch):
    """Every call of the plugin's k-means (its KMeansPredictor runs clusterkit.cluster.kmeans.kmeans):
    (features object, keyword arguments)."""
    calls = []
    home = importlib.import_module("clusterkit.cluster.kmeans")
    real = home.kmeans

    def recording(x, k, **kwargs):
        calls.append((x, k, kwargs))
        return real(x, k, **kwargs)

    monkeypatch.setattr(home, "kmeans", recording)
    return calls


def test_e_step_writes_k_pseudo_labels_and_unit_centres():
    x, truth = blobs()
    plugin, state = make(x, n_init=2)
    plugin.e_step(state)
    labels, centers = state.pseudo_labels, state.centers
    assert labels.shape == (K * PER,) and labels.dtype == torch.int64
    assert centers.shape == (K, D) and centers.dtype == torch.float32
    assert set(labels.tolist()) == set(range(K))  # K non-empty clusters
    torch.testing.assert_close(centers.norm(dim=1), torch.ones(K))  # spherical k-means: unit centres
    # well separated directions: every group is one cluster
    assert all(len(set(labels[truth == t].tolist())) == 1 for t in range(K))


def test_pseudo_labels_are_the_nearest_returned_centre_by_cosine():
    x, _ = blobs(k=5, per=12, seed=3)
    x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(9))  # overlapping clusters
    plugin, state = make(x, k=5, max_iter=3)  # stopped early: the assignment must still match the centres
    plugin.e_step(state)
    assert torch.equal(state.pseudo_labels, naive_cosine_labels(x, state.centers))


def test_k_comes_from_the_recipe():
    x, _ = blobs(k=6, per=10)
    for k in (2, 6, 9):
        plugin, state = make(x, k=k)
        plugin.e_step(state)
        assert state.centers.shape == (k, D) and int(state.pseudo_labels.max()) == k - 1


def test_params_reach_the_k_means(spy):
    x, _ = blobs()
    plugin, state = make(x, run_seed=5, n_init=3, max_iter=7, tol=1e-3)
    plugin.e_step(state)
    ((features, k, kwargs),) = spy
    assert features is x and k == K
    assert kwargs == {"metric": "cosine", "n_init": 3, "max_iter": 7, "tol": 1e-3, "seed": 5, "distributed": True}
    plugin, state = make(x, run_seed=5, seed=11)
    plugin.e_step(state)
    assert spy[-1][2]["seed"] == 11  # its own seed wins over the run's


def test_defaults_are_the_official_settings():
    p = KMeansEStep.Params()
    assert (p.metric, p.n_init, p.max_iter, p.tol, p.seed) == ("cosine", 10, 300, 1e-4, None)


def test_seed_none_follows_the_runs_seed():
    x, _ = blobs(k=5, per=8)
    x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    results = {}
    for seed in (0, 1):
        plugin, state = make(x, k=5, run_seed=seed, n_init=1)
        plugin.e_step(state)
        expected = kmeans(x, 5, metric="cosine", n_init=1, max_iter=300, tol=1e-4, seed=seed)
        assert torch.equal(state.pseudo_labels, expected.labels) and torch.equal(state.centers, expected.centers)
        results[seed] = state.centers
    assert not torch.equal(results[0], results[1])  # the seed matters on these overlapping clusters
    plugin, state = make(x, k=5, run_seed=1, n_init=1, seed=0)
    plugin.e_step(state)
    assert torch.equal(state.centers, results[0])  # plugins.kmeans_e_step.seed: 0 whatever run.seed is


def test_euclidean_metric_assigns_by_distance():
    x, _ = blobs(k=3, per=15, seed=2)
    x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(4)) + 2.0  # off the origin
    plugin, state = make(x, k=3, metric="euclidean")
    plugin.e_step(state)
    naive = torch.stack([((x - c) ** 2).sum(dim=1) for c in state.centers], dim=1).argmin(dim=1)
    assert torch.equal(state.pseudo_labels, naive)
    for j in range(3):  # Lloyd's fixed point: each centre is the mean of its points
        torch.testing.assert_close(state.centers[j], x[state.pseudo_labels == j].mean(dim=0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bad", [{"n_init": 0}, {"max_iter": 0}, {"tol": 0.0}, {"metric": "manhattan"}])
def test_bad_params_are_recipe_errors(bad):
    with pytest.raises(RecipeError, match=f"plugins.kmeans_e_step.{next(iter(bad))}"):
        build(KMeansEStep.Params, bad, "plugins.kmeans_e_step")


def test_one_steps_features_are_clustered_once(spy):
    """The E-step and an evaluation in the same step see the same features object: one k-means.
    New features (the next step's, even with equal values) are clustered again."""
    x, _ = blobs()
    plugin, state = make(x)
    plugin.e_step(state)
    pred = plugin.predict(state, state.features("train"), True)
    assert len(spy) == 1
    assert torch.equal(pred.labels, state.pseudo_labels)
    plugin.e_step(state)
    assert len(spy) == 1
    again = x.clone()
    state.feature_fn = lambda split: again
    plugin.e_step(state)
    assert len(spy) == 2 and spy[-1][0] is again
    assert torch.equal(state.pseudo_labels, pred.labels)  # same values, same (seeded) clustering


def test_predict_keeps_the_centres_and_assigns_new_data_to_them():
    x, _ = blobs()
    plugin, state = make(x)
    fitted = plugin.predict(state, x, True)
    saved = plugin.state_dict()["predict_centers"]  # checkpointed through the plugin's state_dict
    assert saved.shape == (K, D) and saved.device.type == "cpu"
    # confidence: cosine of each point to its own centre
    torch.testing.assert_close(fitted.confidence, F.cosine_similarity(x, saved[fitted.labels], dim=1))
    new = x[:10] * 2.0 + 0.05 * torch.randn(10, D, generator=torch.Generator().manual_seed(7))
    pred = plugin.predict(state, new, False)  # new data: assigned, never re-clustered
    assert torch.equal(pred.labels, naive_cosine_labels(new, saved))
    torch.testing.assert_close(pred.confidence, F.cosine_similarity(new, saved[pred.labels], dim=1))
    plugin.load_state_dict({"predict_centers": None})  # a checkpoint written before any evaluation
    with pytest.raises(PluginError, match="cannot assign new images"):
        plugin.predict(state, new, False)
