"""Tests of HaDis's hardness-aware self-distillation (plugins/hadis/hardness_aware_distillation.py).

The loss is checked against a naive implementation that loops over anchors in plain Python
(mining, weights, softplus), on small random tensors and on edge cases; its gradient against
the same naive loss with the weights as Python constants.  The plugin is driven hook by hook on
a hand-built TrainState, then end to end for one epoch of HaDis on the bundled digits; the two
HaDis paper recipes load, validate and are ProPos's recipes plus HSD.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clusterkit import DIRECTIONS, StepCache, TrainState
from clusterkit.errors import PluginError, RecipeError
from clusterkit.plugin_manager import load_plugins
from clusterkit.recipe import load_recipe
from clusterkit.schema import build
from clusterkit_plugins.hadis.hardness_aware_distillation import (
    LOSS_NAME,
    HardnessAwareDistillation,
    hardness_aware_distillation_loss,
    mine_hardest,
)
from clusterkit_plugins.propos.byol_target import BYOLTarget
from clusterkit_plugins.propos.diffused_sampling import DiffusedSampling

TAU = 0.5


# ---------------------------------------------------------------------------------------------
# the naive reference: one anchor at a time, Python floats for the mining
# ---------------------------------------------------------------------------------------------

def _unit(v):
    return v / torch.sqrt((v * v).sum())


def _dist(u, v):
    return torch.sqrt(((u - v) ** 2).sum())


def naive_hsd(student, teacher, tau, detach_weights=True, per_anchor=False):
    """HSD written out anchor by anchor (a 0-d tensor, or the B per-anchor terms).

    Distances of the chosen pairs are tensors (for gradients); the mining and, by default, the
    weights are Python floats.  With ``detach_weights=False`` the weights stay in the graph.
    """
    B = student.shape[0]
    s = [_unit(student[j]) for j in range(B)]
    t = [_unit(teacher[j].detach()) for j in range(B)]
    terms = []
    for i in range(B):
        d_t = [_dist(t[i], t[j]).item() for j in range(B)]           # D_t[i, j]
        d = [_dist(t[i], s[j]).detach().item() for j in range(B)]    # D[i, j]
        negatives = [j for j in range(B) if d_t[j] > d[i]]
        positives = [j for j in range(B) if j not in negatives]
        assert i in positives
        p = max(positives, key=lambda j: d[j])                       # first maximum on ties
        d_p = _dist(t[i], s[p])
        w_p = max(d[p] - d_t[p], 0.0) if detach_weights else torch.clamp(d_p - d_t[p], min=0.0)
        x = w_p * d_p
        if negatives:                                                # no negative: no negative term
            n = min(negatives, key=lambda j: d[j])
            d_n = _dist(t[i], s[n])
            w_n = max(d_t[n] - d[n], 0.0) if detach_weights else torch.clamp(d_t[n] - d_n, min=0.0)
            x = x - w_n * d_n
        x = x / tau
        terms.append(torch.log(1.0 + torch.exp(x)))                  # softplus
    if per_anchor:
        return terms
    return sum(terms) / B


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# the loss against the naive loops
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_loss_matches_naive_loops_on_random_tensors(seed):
    B, D = (5, 12, 16)[seed % 3], (3, 8)[seed % 2]
    student, teacher = _randn(B, D, seed=seed), _randn(B, D, seed=100 + seed)
    if seed >= 3:  # a student near its teacher: fewer negatives, harder mining
        student = teacher + 0.3 * student
    for tau in (TAU, 0.1):
        got = hardness_aware_distillation_loss(student, teacher, tau)
        assert got.item() == pytest.approx(float(naive_hsd(student, teacher, tau)), rel=1e-10, abs=1e-12)


def test_mining_matches_naive_definitions():
    student, teacher = _randn(10, 4, seed=7), _randn(10, 4, seed=8)
    s, t = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    mined = mine_hardest(s, t)
    for i in range(10):
        d_t = [float((t[i] - t[j]).norm()) for j in range(10)]
        d = [float((t[i] - s[j]).norm()) for j in range(10)]
        negatives = [j for j in range(10) if d_t[j] > d[i]]
        assert mined["negatives"][i].nonzero().flatten().tolist() == negatives
        positives = [j for j in range(10) if j not in negatives]
        p = max(positives, key=lambda j: d[j])
        assert int(mined["positive"][i]) == p
        assert float(mined["w_p"][i]) == pytest.approx(max(d[p] - d_t[p], 0.0), abs=1e-12)
        assert d[p] - d_t[p] >= 0  # D[i, p] >= D[i, i] >= D_t[i, p]: w_p's max never bites
        assert bool(mined["has_negative"][i]) == bool(negatives)
        if negatives:
            n = min(negatives, key=lambda j: d[j])
            assert int(mined["negative"][i]) == n
            assert float(mined["w_n"][i]) == pytest.approx(max(d_t[n] - d[n], 0.0), abs=1e-12)
        else:
            assert float(mined["w_n"][i]) == 0.0
    assert mined["has_negative"].any() and not mined["negatives"].diagonal().any()


def test_batch_of_two_by_hand():
    # t_0 = e1, t_1 = e2; s_0 = (0.8, 0.6), s_1 = (0.6, 0.8): each anchor's only other sample is its
    # negative (D_t = sqrt 2 > D[i, i] = sqrt .4), its hardest positive is itself.
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    student = torch.tensor([[0.8, 0.6], [0.6, 0.8]], dtype=torch.float64)
    # per anchor: w_p D_p = .4, w_n D_n = (sqrt 2 - sqrt .8) sqrt .8 = sqrt 1.6 - .8
    expected = math.log1p(math.exp((1.2 - math.sqrt(1.6)) / TAU))
    mined = mine_hardest(student, teacher)
    assert mined["positive"].tolist() == [0, 1] and mined["negative"].tolist() == [1, 0]
    got = hardness_aware_distillation_loss(student, teacher, TAU)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert got.item() == pytest.approx(float(naive_hsd(student, teacher, TAU)), rel=1e-12)
    # and random pairs
    for seed in range(4):
        s, t = _randn(2, 3, seed=seed), _randn(2, 3, seed=50 + seed)
        got = hardness_aware_distillation_loss(s, t, TAU).item()
        assert got == pytest.approx(float(naive_hsd(s, t, TAU)), rel=1e-10)


def test_all_samples_identical():
    v = _randn(1, 6, seed=3)
    # student = teacher, every row the same: no negatives, w_p = 0: log 2, and no gradient
    student = v.repeat(5, 1).requires_grad_(True)
    loss = hardness_aware_distillation_loss(student, v.repeat(5, 1), TAU)
    assert loss.item() == pytest.approx(math.log(2.0), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(grad).all() and torch.equal(grad, torch.zeros_like(grad))
    mined = mine_hardest(F.normalize(student.detach(), dim=1), F.normalize(v.repeat(5, 1), dim=1))
    assert not mined["has_negative"].any()

    # students identical, teachers identical, the two different: D_t = 0, D = c, all positives,
    # w_p = c, loss softplus(c^2 / tau); finite gradient
    u = _randn(1, 6, seed=4)
    student = u.repeat(4, 1).requires_grad_(True)
    c = float((F.normalize(u, dim=1) - F.normalize(v, dim=1)).norm())
    loss = hardness_aware_distillation_loss(student, v.repeat(4, 1), TAU)
    assert loss.item() == pytest.approx(math.log1p(math.exp(c * c / TAU)), rel=1e-10)
    assert loss.item() == pytest.approx(float(naive_hsd(student.detach(), v.repeat(4, 1), TAU)), rel=1e-10)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_anchor_without_negatives_keeps_only_its_positive_term():
    teacher = _randn(6, 5, seed=11)
    student = teacher + 0.2 * _randn(6, 5, seed=12)
    student[0] = -teacher[0]  # D[0, 0] = 2, the largest distance on the sphere: no D_t[0, j] exceeds it
    s, t = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    mined = mine_hardest(s, t)
    assert not bool(mined["has_negative"][0]) and float(mined["w_n"][0]) == 0.0
    assert mined["has_negative"][1:].any()  # the rest of the batch is mined normally
    p = int(mined["positive"][0])
    d_p = float((t[0] - s[p]).norm())
    w_p = max(d_p - float((t[0] - t[p]).norm()), 0.0)
    terms = naive_hsd(student, teacher, TAU, per_anchor=True)
    assert float(terms[0]) == pytest.approx(math.log1p(math.exp(w_p * d_p / TAU)), rel=1e-12)  # negative term 0
    assert w_p > 0  # the positive term is really there
    got = hardness_aware_distillation_loss(student, teacher, TAU)
    assert got.item() == pytest.approx(float(sum(terms)) / 6, rel=1e-10)  # the anchor counts in the mean


def test_weights_are_detached_gradient_matches_constant_weights():
    student = _randn(9, 4, seed=21).requires_grad_(True)
    teacher = _randn(9, 4, seed=22).requires_grad_(True)
    loss = hardness_aware_distillation_loss(student, teacher, TAU)
    g_got, g_teacher = torch.autograd.grad(loss, [student, teacher], allow_unused=True)
    assert g_teacher is None or torch.equal(g_teacher, torch.zeros_like(g_teacher))  # the teacher is a constant

    (g_const,) = torch.autograd.grad(naive_hsd(student, teacher, TAU, detach_weights=True), student)
    torch.testing.assert_close(g_got, g_const, rtol=1e-9, atol=1e-12)
    # the check can tell: with the weights in the graph the gradient is different
    (g_live,) = torch.autograd.grad(naive_hsd(student, teacher, TAU, detach_weights=False), student)
    assert not torch.allclose(g_live, g_const)
    assert g_got.abs().sum() > 0


def test_bf16_inputs_are_mined_in_float32():
    student, teacher = _randn(8, 6, seed=31).float(), _randn(8, 6, seed=32).float()
    got = hardness_aware_distillation_loss(student.bfloat16(), teacher.bfloat16(), TAU)
    assert got.dtype == torch.float32
    ref = float(naive_hsd(student.bfloat16().double(), teacher.bfloat16().double(), TAU))
    assert got.item() == pytest.approx(ref, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# the plugin, hook by hook
# ---------------------------------------------------------------------------------------------

IN_DIM, FEAT_DIM = 12, 16


def make_state(warmup_epochs=1, epoch=0, **params):
    recipe = load_recipe(data={"schedule": {"epochs": 3, "warmup_epochs": warmup_epochs},
                               "run": {"device": "cpu"}})
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(IN_DIM, FEAT_DIM))
    backbone.num_features = FEAT_DIM
    state = TrainState(recipe=recipe, device=torch.device("cpu"), model=nn.ModuleDict({"backbone": backbone}),
                       num_train=32, steps_per_epoch=4, epoch=epoch)
    byol = BYOLTarget(BYOLTarget.Params(hidden_dim=16, out_dim=8))
    byol.setup(state)
    plugin = HardnessAwareDistillation(build(HardnessAwareDistillation.Params, params, "plugins.x"))
    plugin.setup(state)
    gen = torch.Generator().manual_seed(1)
    views = [torch.randn(10, 3, 2, 2, generator=gen) for _ in range(2)]
    cache = StepCache(views, torch.arange(10), byol.register_outputs(state), state)
    return state, plugin, cache


def test_params_defaults_and_validation():
    p = HardnessAwareDistillation.Params()
    assert (p.temperature, p.sigma, p.weight, p.warmup_gate, p.mining, p.noise) == (
        0.5, 0.001, 1.0, True, "global", "shared")
    with pytest.raises(RecipeError, match="noise"):
        build(HardnessAwareDistillation.Params, {"noise": "independent"}, "plugins.hardness_aware_distillation")
    with pytest.raises(RecipeError, match="mining"):
        build(HardnessAwareDistillation.Params, {"mining": "batch"}, "plugins.hardness_aware_distillation")
    with pytest.raises(RecipeError, match="temperature"):
        build(HardnessAwareDistillation.Params, {"temperature": 0}, "plugins.hardness_aware_distillation")
    with pytest.raises(RecipeError, match="Did you mean 'sigma'"):
        build(HardnessAwareDistillation.Params, {"sigm": 0.1}, "plugins.hardness_aware_distillation")


def test_plugin_is_the_symmetric_mean_without_noise_during_warmup():
    state, plugin, cache = make_state(warmup_epochs=1, epoch=0, weight=0.7, sigma=0.5)
    assert plugin.sigma(state) == 0.0
    got = plugin.compute_losses(state, cache)[LOSS_NAME]
    pred = state.model["predictor"]
    expected = torch.stack([hardness_aware_distillation_loss(pred(cache["q", a]), cache["k", b], TAU)
                            for a, b in DIRECTIONS]).mean()
    assert got.item() == pytest.approx(0.7 * expected.item(), rel=1e-6)
    # one direction alone is not the answer: both views play student and teacher
    one = hardness_aware_distillation_loss(pred(cache["q", 0]), cache["k", 1], TAU).item()
    other = hardness_aware_distillation_loss(pred(cache["q", 1]), cache["k", 0], TAU).item()
    assert one != pytest.approx(other)


@pytest.mark.parametrize("noise", ["shared", "own"])
def test_plugin_diffuses_q_after_warmup_and_is_not_gated(noise):
    state, plugin, cache = make_state(warmup_epochs=1, epoch=1, sigma=0.5, noise=noise)
    assert plugin.sigma(state) == 0.5
    q = [cache["q", v] for v in (0, 1)]
    got = plugin.compute_losses(state, cache)[LOSS_NAME]
    pred = state.model["predictor"]
    # eps: the step cache's seeded draw for each online view; shared (official): diffused_sampling's own
    # draw, so that DSA and HSD see the same diffused sample; own: a draw under HSD's salt
    salt = "diffused_sampling" if noise == "shared" else LOSS_NAME
    eps = [cache.randn(q[0].shape[1], salt=f"{salt}/view{v}") for v in (0, 1)]
    dsa = DiffusedSampling(build(DiffusedSampling.Params, {"sigma": 0.5}, "plugins.diffused_sampling"))
    assert torch.equal(q[0] + 0.5 * eps[0], dsa.diffused(state, cache, 0)) == (noise == "shared")
    noisy = [pred(q[a] + 0.5 * eps[a]) for a, _ in DIRECTIONS]
    expected = torch.stack([hardness_aware_distillation_loss(noisy[i], cache["k", b], TAU)
                            for i, (_, b) in enumerate(DIRECTIONS)]).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    clean = torch.stack([hardness_aware_distillation_loss(pred(q[a]), cache["k", b], TAU)
                         for a, b in DIRECTIONS]).mean()
    assert got.item() != pytest.approx(clean.item(), rel=1e-6)  # the noise is used
    # warmup_gate off: noise during warm-up too; the weight itself is never gated
    state0, plugin0, cache0 = make_state(warmup_epochs=1, epoch=0, sigma=0.5, warmup_gate=False)
    assert plugin0.sigma(state0) == 0.5
    assert plugin0.compute_losses(state0, cache0)[LOSS_NAME].item() > 0


def test_mining_scope_makes_no_difference_in_one_process():
    """mining: local (each process's batch) and global (the gathered batch) are the same batch in
    one process: the same loss and gradients, to the bit (two processes: test_distributed_losses)."""
    results = {}
    for mining in ("local", "global"):
        state, plugin, cache = make_state(warmup_epochs=0, sigma=0.5, mining=mining)
        loss = plugin.compute_losses(state, cache)[LOSS_NAME]
        loss.backward()
        results[mining] = (loss.detach(), [p.grad.clone() for p in state.model["predictor"].parameters()])
    assert torch.equal(results["local"][0], results["global"][0]) and results["local"][0] > 0
    assert all(torch.equal(a, b) for a, b in zip(results["local"][1], results["global"][1], strict=True))


def test_plugin_gradient_reaches_projector_and_predictor_not_target():
    state, plugin, cache = make_state(warmup_epochs=0)
    plugin.compute_losses(state, cache)[LOSS_NAME].backward()
    for name in ("backbone", "projector", "predictor"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in state.model[name].parameters()), name
    for name in ("target_backbone", "target_projector"):
        assert all(p.grad is None for p in state.model[name].parameters()), name


def test_setup_without_byol_target_says_what_to_add():
    state = TrainState(recipe=load_recipe(data={}), device=torch.device("cpu"),
                       model=nn.ModuleDict({"backbone": nn.Linear(2, 2)}), num_train=4, steps_per_epoch=1)
    with pytest.raises(PluginError, match="byol_target"):
        HardnessAwareDistillation().setup(state)


# ---------------------------------------------------------------------------------------------
# end to end and the paper recipes
# ---------------------------------------------------------------------------------------------

def test_hadis_trains_one_epoch_on_digits(tmp_path, tiny_recipe_data, restore_threads):
    from clusterkit.rundir import make_run_dir
    from clusterkit.trainer import Trainer

    data = tiny_recipe_data
    data["name"] = "hadis_digits_test"
    data["schedule"] = {"epochs": 1, "warmup_epochs": 0}  # past warm-up: noise on, PCL on
    data["run"].update({"device": "cpu", "threads": 1})
    data["eval"] = {"pixel_baseline": "never"}
    data["plugins"]["hardness_aware_distillation"] = {"temperature": 0.5, "sigma": 0.001}
    recipe = load_recipe(data=data)
    run_dir = make_run_dir(recipe, str(tmp_path / "run"), force=False)
    summary = Trainer(recipe, run_dir).fit()
    assert summary["steps"] == 1797 // 256
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    # that the method learns (NMI above the untrained network's): tests/plugins/test_methods_learn.py
    assert summary["metrics"] == {name: record[name] for name in ("nmi", "acc", "ari")}  # the last evaluation
    for term in ("diffused_sampling", LOSS_NAME, "prototype_aggregation"):
        assert term in record and math.isfinite(record[term]), term
    assert 0.0 < record[LOSS_NAME] < 10.0


RECIPES = Path(__file__).resolve().parents[3] / "recipes"


@pytest.mark.parametrize("dataset,pcl_weight,published", [
    ("cifar10", 0.1, (".869", ".930", ".862")), ("imagenet10", 0.05, (".884", ".949", ".892"))])
def test_hadis_recipes_load_validate_and_are_propos_plus_hsd(dataset, pcl_weight, published):
    path = RECIPES / f"hadis_{dataset}.yaml"
    recipe = load_recipe(path)
    _, plugins = load_plugins(recipe.plugins)
    assert recipe.name == path.stem
    assert list(plugins) == ["byol_target", "kmeans_e_step", "diffused_sampling", "hardness_aware_distillation",
                             "prototype_aggregation"]
    hsd = plugins["hardness_aware_distillation"].params
    assert (hsd.temperature, hsd.sigma, hsd.weight, hsd.mining) == (0.5, 0.001, 1.0, "local")  # official scope
    assert plugins["prototype_aggregation"].params.weight == pcl_weight
    assert plugins["diffused_sampling"].params.sigma == 0.001
    text = path.read_text()
    assert all(number in text for number in published) and "Published" in text

    hadis, propos = recipe.to_dict(), load_recipe(RECIPES / f"propos_{dataset}.yaml").to_dict()
    hadis_plugins, propos_plugins = hadis.pop("plugins"), propos.pop("plugins")
    hadis.pop("name"), propos.pop("name")
    if dataset == "cifar10":  # the official configs: HaDis 1 x 256, ProPos 4 x 128 with shuffling BN
        assert (hadis["data"].pop("batch_size"), propos["data"].pop("batch_size")) == (256, 512)
        assert propos_plugins["byol_target"].pop("shuffle_bn") is True
    assert hadis == propos  # the same data, model, optimiser and schedule as ProPos
    hadis_plugins.pop("hardness_aware_distillation")
    propos_plugins["prototype_aggregation"]["weight"] = pcl_weight
    assert hadis_plugins == propos_plugins
