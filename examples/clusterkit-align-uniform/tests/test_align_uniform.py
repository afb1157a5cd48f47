"""Tests of the align_uniform plugin: the losses against a naive loop over samples and pairs,
and the plugin in clusterkit's tiny training loop (by its installed entry-point name, so these
tests also prove the package is installed and registered)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from clusterkit_align_uniform import AlignUniform, align_loss, uniform_loss

from clusterkit.plugin_manager import discover, load_plugins
from clusterkit.recipe import load_recipe
from clusterkit.testing import check_checkpoint_roundtrip, check_distributed_equivalence, check_losses, train_tiny

HERE = Path(__file__).resolve().parent.parent


# -- the losses, against a second implementation written as plain loops (float64 math) ------------------

def naive_align(x, y, alpha):
    total = 0.0
    for xi, yi in zip(x.tolist(), y.tolist(), strict=True):
        total += math.sqrt(sum((a - b) ** 2 for a, b in zip(xi, yi, strict=True))) ** alpha
    return total / len(x)


def naive_uniform(x, t):
    rows = x.tolist()
    exponents = []
    for i in range(len(rows)):
        for j in range(len(rows)):
            if i != j:
                exponents.append(-t * sum((a - b) ** 2 for a, b in zip(rows[i], rows[j], strict=True)))
    top = max(exponents)  # log-mean-exp with a shift, so a large t does not underflow to log(0)
    return top + math.log(math.fsum(math.exp(e - top) for e in exponents) / len(exponents))


def sphere(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


@pytest.mark.parametrize("alpha", [2.0, 1.0, 3.0])
def test_align_loss_matches_the_naive_loop(alpha):
    x, y = sphere(7, 5, 0), sphere(7, 5, 1)
    assert align_loss(x, y, alpha).item() == pytest.approx(naive_align(x, y, alpha), rel=1e-12)


@pytest.mark.parametrize("t", [2.0, 0.5, 10.0])
def test_uniform_loss_matches_the_naive_loop(t):
    x = sphere(9, 4, 2)
    assert uniform_loss(x, t).item() == pytest.approx(naive_uniform(x, t), rel=1e-10)


def test_edge_cases():
    x = sphere(6, 3, 3)
    assert align_loss(x, x.clone()).item() == 0.0                     # identical views: perfectly aligned
    same = x[:1].repeat(5, 1)
    assert uniform_loss(same).item() == pytest.approx(0.0, abs=1e-12)  # one point: log E exp(0) = 0
    poles = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    assert uniform_loss(poles, 2.0).item() == pytest.approx(-8.0)      # ||x - y||^2 = 4: log exp(-2 * 4)
    assert align_loss(poles[:1], poles[1:], 2.0).item() == pytest.approx(4.0)
    far = sphere(8, 3, 4)
    big = uniform_loss(far, 500.0)                                      # exp(-500 d^2) underflows naively
    assert torch.isfinite(big) and big.item() == pytest.approx(naive_uniform(far, 500.0), rel=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        uniform_loss(x[:1])


def test_alignment_gradient_is_defined_for_identical_views():
    x = sphere(4, 3, 5).requires_grad_(True)
    align_loss(x, x.detach().clone()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() == 0


# -- the plugin in clusterkit -------------------------------------------------------------------------------

def test_the_entry_point_is_registered():
    info = discover()["align_uniform"]
    assert info.package == "clusterkit-align-uniform" and info.load() is AlignUniform


def test_it_trains_one_epoch_through_its_entry_point():
    summary = train_tiny("align_uniform", {"hidden_dim": 32, "out_dim": 16})
    (epoch,) = summary["history"]
    assert summary["steps"] == 4 and {"au_align", "au_uniform"} <= set(epoch)
    assert 0 <= epoch["au_align"] <= 4 and -8 <= epoch["au_uniform"] <= 0   # the ranges on the unit sphere
    assert summary["metrics"]["nmi"] is not None


def test_losses_are_finite_and_train_the_backbone_and_the_projector():
    report = check_losses("align_uniform", {"hidden_dim": 32, "out_dim": 16})
    assert set(report.terms) == {"au_align", "au_uniform"}
    assert all(report.backbone_grad[term] > 0 for term in report.terms)
    assert set(report.module_grad) == {"align_uniform_projector"}


def test_a_resumed_run_equals_the_uninterrupted_one():
    check_checkpoint_roundtrip("align_uniform", {"hidden_dim": 32, "out_dim": 16})


def test_its_recipe_loads_and_allows_only_its_package():
    recipe = load_recipe(HERE / "recipes" / "align_uniform_digits.yaml")
    assert recipe.allow_plugins == ["clusterkit-align-uniform"]
    _, plugins = load_plugins(recipe.plugins, allow=recipe.allow_plugins)
    assert plugins["align_uniform"].params.t == 2.0 and "kmeans_e_step" in plugins


def test_two_processes_match_one_process_on_the_whole_batch():
    # uniformity contrasts every pair of the batch, so under torchrun it must see the global batch
    check_distributed_equivalence("align_uniform", with_plugins={"kmeans_e_step": {"n_init": 1}})
