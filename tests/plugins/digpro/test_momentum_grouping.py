"""Tests of DigPro's dynamic grouping (plugins/digpro/momentum_grouping.py).

The pure functions are checked against naive per-sample Python loops; the plugin is
driven hook by hook on a hand-built TrainState with a tiny model; the last tests run
the real trainer for one epoch on the bundled digits data (and the DigPro ablation).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clusterkit import StepCache, TrainState
from clusterkit.cluster import kmeans
from clusterkit.errors import PluginError, RecipeError
from clusterkit.plugin_manager import load_plugins
from clusterkit.recipe import load_recipe
from clusterkit.schema import build
from clusterkit_plugins.digpro.momentum_grouping import (
    GroupMemory,
    MomentumGrouping,
    assign_groups,
    group_loss,
    grouping_direction,
    momentum_update,
    random_groups,
    regroup,
    uniform_groups,
)
from clusterkit_plugins.propos.byol_target import BYOLTarget

IN_DIM, FEAT_DIM, HIDDEN, OUT_DIM = 12, 16, 16, 8


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _cos(u, v):
    dot = sum(a * b for a, b in zip(u, v, strict=True))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def _naive_assign(k, groups):
    out = []
    for row in k.tolist():
        sims = [_cos(row, g) for g in groups.tolist()]
        out.append(max(range(len(sims)), key=sims.__getitem__))
    return out


def _naive_update(groups, q, mu, beta):
    new = []
    for c, g in enumerate(groups.tolist()):
        members = [row for row, m in zip(q.tolist(), mu, strict=True) if m == c]
        if not members:
            new.append(g)
            continue
        mean = [sum(col) / len(members) for col in zip(*members, strict=True)]
        new.append([beta * a + (1 - beta) * b for a, b in zip(g, mean, strict=True)])
    return torch.tensor(new, dtype=torch.float64)


def _naive_loss(pred, groups, mu, tau):
    total = 0.0
    for row, m in zip(pred.tolist(), mu, strict=True):
        logits = [_cos(row, g) / tau for g in groups.tolist()]
        exps = [math.exp(v) for v in logits]
        total += -math.log(exps[m] / sum(exps))
    return total / len(mu)


def make_state(k=4, run_seed=0, **params):
    """A TrainState with a tiny backbone, byol_target and momentum_grouping (``params``) set up."""
    recipe = load_recipe(data={"e_step": {"k": k}, "run": {"seed": run_seed, "device": "cpu"}})
    torch.manual_seed(run_seed)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(IN_DIM, FEAT_DIM))
    backbone.num_features = FEAT_DIM
    state = TrainState(recipe=recipe, device=torch.device("cpu"), model=nn.ModuleDict({"backbone": backbone}),
                       num_train=64, steps_per_epoch=8)
    byol = BYOLTarget(BYOLTarget.Params(hidden_dim=HIDDEN, out_dim=OUT_DIM))
    byol.setup(state)
    plugin = MomentumGrouping(build(MomentumGrouping.Params, params, "plugins.momentum_grouping"))
    plugin.setup(state)
    return state, byol, plugin


def make_cache(state, byol, batch=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    views = [torch.randn(batch, 3, 2, 2, generator=gen) for _ in range(2)]
    return StepCache(views, torch.arange(batch), byol.register_outputs(state), state)


def run_step(state, byol, plugin, seed):
    """One training step without an optimiser: hooks in the trainer's order; returns the loss."""
    cache = make_cache(state, byol, seed=seed)
    plugin.on_step_start(state, cache)
    loss = plugin.compute_losses(state, cache)["momentum_grouping"]
    state.step += 1
    plugin.after_step(state, cache)
    return loss, cache


# ---------------------------------------------------------------------------------------------
# Eq. 3-6 as pure functions, against naive loops
# ---------------------------------------------------------------------------------------------

def test_assignment_and_momentum_update_match_naive_loops():
    gen = torch.Generator().manual_seed(1)
    dim, beta = 5, 0.9
    groups = torch.randn(4, dim, generator=gen, dtype=torch.float64)
    groups[3] = -10 * groups[:3].sum(0)  # make sure it can win nothing: see the assertion below
    true = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0, 1, 1])
    k = groups[true] + 0.05 * torch.randn(len(true), dim, generator=gen, dtype=torch.float64)
    q = torch.randn(len(true), dim, generator=gen, dtype=torch.float64)

    mu = assign_groups(k, groups)
    naive_mu = _naive_assign(k, groups)
    assert mu.tolist() == naive_mu
    assert 3 not in naive_mu and set(naive_mu) == {0, 1, 2}

    new = momentum_update(groups, q, mu, beta)
    torch.testing.assert_close(new, _naive_update(groups, q, naive_mu, beta))
    assert torch.equal(new[3], groups[3])  # the group without samples is unchanged
    assert not torch.allclose(new[:3], groups[:3])


def test_assignment_on_random_tensors_matches_naive():
    gen = torch.Generator().manual_seed(2)
    k = torch.randn(32, 6, generator=gen, dtype=torch.float64) * torch.rand(32, 1, generator=gen, dtype=torch.float64)
    groups = torch.randn(7, 6, generator=gen, dtype=torch.float64) * 3
    assert assign_groups(k, groups).tolist() == _naive_assign(k, groups)  # cosine, not dot product


def test_loss_matches_naive_softmax():
    gen = torch.Generator().manual_seed(3)
    pred = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    groups = torch.randn(4, 5, generator=gen, dtype=torch.float64) * 2
    mu = torch.randint(0, 4, (9,), generator=gen)
    for tau in (0.1, 0.5):
        got = group_loss(pred, groups, mu, tau)
        assert got.item() == pytest.approx(_naive_loss(pred, groups, mu.tolist(), tau), rel=1e-10)


def test_one_direction_composes_eq3_to_eq6():
    gen = torch.Generator().manual_seed(4)
    q, k, pred = (torch.randn(10, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    groups = F.normalize(torch.randn(3, 5, generator=gen, dtype=torch.float64), dim=1)
    naive_mu = _naive_assign(k, groups)
    # official (lightly SMoG): each q_i is averaged into its OWN nearest group; mu is the CE target
    loss, new, mu = grouping_direction(q, k, pred, groups, 0.99, 0.1)
    naive_own = _naive_assign(q, groups)
    assert naive_own != naive_mu  # the two readings differ on these tensors
    naive_new = _naive_update(groups, q, naive_own, 0.99)
    assert mu.tolist() == naive_mu
    torch.testing.assert_close(new, naive_new)
    assert loss.item() == pytest.approx(_naive_loss(pred, naive_new, naive_mu, 0.1), rel=1e-10)
    # update_assignment "target": the update averages by mu
    loss_t, new_t, _ = grouping_direction(q, k, pred, groups, 0.99, 0.1, update_assignment="target")
    naive_new_t = _naive_update(groups, q, naive_mu, 0.99)
    torch.testing.assert_close(new_t, naive_new_t)
    assert loss_t.item() == pytest.approx(_naive_loss(pred, naive_new_t, naive_mu, 0.1), rel=1e-10)


# ---------------------------------------------------------------------------------------------
# gradients flow through the groups
# ---------------------------------------------------------------------------------------------

def test_gradient_reaches_q_through_the_groups():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(8, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    groups = F.normalize(torch.randn(3, 4, generator=gen, dtype=torch.float64), dim=1)
    w = torch.randn(4, 4, generator=gen, dtype=torch.float64)

    # through the predictor and the groups vs the predictor only: the gradients differ
    loss, new, mu = grouping_direction(q, k, q @ w, groups, 0.9, 0.1)
    (g_full,) = torch.autograd.grad(loss, q)
    (g_pred_only,) = torch.autograd.grad(group_loss(q @ w, new.detach(), mu, 0.1), q)
    assert not torch.allclose(g_full, g_pred_only)

    # predictor path frozen (pred does not depend on q): the gradient is non-zero and correct
    pred = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    mu = assign_groups(k, groups)

    def through_groups(q_):
        return group_loss(pred, momentum_update(groups, q_, mu, 0.9), mu, 0.1)

    (g_groups,) = torch.autograd.grad(through_groups(q), q)
    assert g_groups.abs().sum() > 1e-6
    assert torch.autograd.gradcheck(through_groups, (q,))


def test_plugin_loss_backpropagates_through_groups_with_zeroed_predictor():
    state, byol, plugin = make_state(k=3)
    last = state.model["predictor"][-1]
    with torch.no_grad():  # p(q) = bias, a constant: only the group path depends on q
        last.weight.zero_()
        last.bias.normal_()
    cache = make_cache(state, byol)
    loss = plugin.compute_losses(state, cache)["momentum_grouping"]
    g0, g1 = torch.autograd.grad(loss, [cache["q", 0], cache["q", 1]])
    assert g0.abs().sum() > 1e-8 and g1.abs().sum() > 1e-8
    state2, byol2, plugin2 = make_state(k=3)
    plugin2.compute_losses(state2, make_cache(state2, byol2))["momentum_grouping"].backward()
    assert state2.model["projector"][0].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# the plugin's step
# ---------------------------------------------------------------------------------------------

def test_plugin_step_is_both_directions_with_sequential_group_updates():
    state, byol, plugin = make_state(k=4, weight=0.3)
    g0 = plugin.memory.groups.clone()
    cache = make_cache(state, byol)
    calls = []
    state.model["predictor"].register_forward_hook(lambda *a: calls.append(1))
    got = plugin.compute_losses(state, cache)["momentum_grouping"]
    assert len(calls) == 2  # p(q) once per view
    assert ("p", 0) in cache and ("p", 1) in cache
    q, k, p = ([cache[n, v].detach() for v in (0, 1)] for n in ("q", "k", "p"))
    l1, g1, _ = grouping_direction(q[0], k[1], p[0], g0, 0.99, 0.1)
    l2, g2, _ = grouping_direction(q[1], k[0], p[1], g1, 0.99, 0.1)
    assert got.item() == pytest.approx(0.3 * (l1.item() + l2.item()) / 2, rel=1e-5)
    # compute_losses has no side effect: G changes only in after_step (after a real optimiser step)
    assert torch.equal(plugin.memory.groups, g0)
    plugin.after_step(state, cache)
    torch.testing.assert_close(plugin.memory.groups, g2)
    assert not plugin.memory.groups.requires_grad


def test_a_skipped_nonfinite_step_leaves_the_groups_untouched():
    """run.nonfinite: skip calls no after_step for a step with a NaN loss: G must not take that
    step's G' (it used to be written in compute_losses, and every later step was NaN)."""
    state, byol, plugin = make_state(k=3)
    memory = plugin.memory
    g0 = memory.groups.clone()
    bad = make_cache(state, byol, seed=1)
    bad.put("q", 0, torch.full_like(bad["q", 0], float("nan")))
    assert torch.isnan(plugin.compute_losses(state, bad)["momentum_grouping"])
    assert torch.equal(memory.groups, g0)  # the trainer skips the step: no after_step
    loss, _ = run_step(state, byol, plugin, seed=2)
    assert torch.isfinite(loss) and torch.isfinite(memory.groups).all()


def test_step_runs_under_bf16_autocast_and_keeps_float32_state():
    state, byol, plugin = make_state(k=3, regroup_every=1)
    cache = make_cache(state, byol, batch=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the trainer does on CUDA
        loss = plugin.compute_losses(state, cache)["momentum_grouping"]
    assert cache["q", 0].dtype == torch.bfloat16 and torch.isfinite(loss)
    loss.float().backward()
    plugin.after_step(state, cache)
    plugin.on_step_start(state, make_cache(state, byol, batch=8, seed=1))  # iteration 2 regroups first
    memory = plugin.memory
    assert memory.groups.dtype == memory.bank.dtype == torch.float32
    torch.testing.assert_close(memory.groups.norm(dim=1), torch.ones(3))  # regrouped: unit centres


def test_uniform_init_is_the_official_torch_rand_seeded():
    _, _, plugin = make_state(k=5, run_seed=7)
    groups = plugin.memory.groups
    assert groups.shape == (5, OUT_DIM)  # l = e_step.k, dim = byol_target's out_dim
    torch.testing.assert_close(groups, uniform_groups(5, OUT_DIM, 7))
    torch.testing.assert_close(groups, torch.rand(5, OUT_DIM, generator=torch.Generator().manual_seed(7)))
    assert groups.min() >= 0 and groups.max() < 1  # uniform [0, 1), not normalised


def test_random_init_is_seeded_normalised_and_leaves_global_rng_alone():
    rng = torch.get_rng_state()
    state, _, plugin = make_state(k=5, run_seed=7, group_init="random")
    groups = plugin.memory.groups
    assert groups.shape == (5, OUT_DIM)  # l = e_step.k, dim = byol_target's out_dim
    torch.testing.assert_close(groups, random_groups(5, OUT_DIM, 7))
    torch.testing.assert_close(groups.norm(dim=1), torch.ones(5))
    _, _, plugin_b = make_state(k=5, run_seed=0, seed=7, group_init="random")
    torch.testing.assert_close(plugin_b.memory.groups, groups)  # params.seed overrides run.seed
    torch.manual_seed(0)  # make_state reseeds for its model; the plugin itself must not draw from it
    before = torch.get_rng_state()
    MomentumGrouping().setup(state)
    assert torch.equal(before, torch.get_rng_state())
    torch.set_rng_state(rng)


def test_kmeans_init_uses_the_first_batch():
    state, byol, plugin = make_state(k=3, group_init="kmeans", kmeans_n_init=2)
    memory = plugin.memory
    assert not memory.initialized
    cache = make_cache(state, byol, batch=8)
    plugin.init_groups_by_kmeans(state, cache)
    feats = torch.cat([F.normalize(cache["q", v].detach(), dim=1) for v in (0, 1)])
    expected = F.normalize(kmeans(feats, 3, metric="cosine", n_init=2, max_iter=300, tol=1e-4, seed=0).centers, dim=1)
    torch.testing.assert_close(memory.groups, expected)
    assert memory.initialized

    state2, byol2, plugin2 = make_state(k=3, group_init="kmeans")
    loss = plugin2.compute_losses(state2, make_cache(state2, byol2, batch=8))["momentum_grouping"]  # initialises
    assert plugin2.memory.initialized
    # the init reads q first, but q (memoised for the step's losses) keeps its graph to the projector
    loss.backward()
    assert state2.model["projector"][0].weight.grad.abs().sum() > 0


def test_regroup_at_the_start_of_iteration_n_uses_the_bank_of_earlier_iterations():
    """Official timing and bank: iteration 2 (n > 1, n % 2 == 0) first regroups on lightly's bank
    (noise, then iteration 1's rows written from row 0), with Euclidean k-means, and trains with
    the new groups."""
    state, byol, plugin = make_state(k=3, regroup_every=2, bank_size=40, kmeans_n_init=3, seed=11)
    memory = plugin.memory
    noise = memory.bank.clone()
    torch.testing.assert_close(noise.norm(dim=1), torch.ones(40))  # lightly: normalised Gaussian rows
    assert memory.bank_count == 40  # every row counts from the start
    _, cache1 = run_step(state, byol, plugin, seed=1)
    rows1 = torch.cat([F.normalize(cache1["q", v].detach(), dim=1) for v in (0, 1)])  # 12 rows
    expected_bank = torch.cat([rows1, noise[12:]])
    torch.testing.assert_close(memory.bank, expected_bank)
    cache2 = make_cache(state, byol, seed=2)
    plugin.on_step_start(state, cache2)  # iteration 2 regroups before its forward
    expected = F.normalize(kmeans(expected_bank, 3, metric="euclidean", n_init=3, max_iter=300, tol=1e-4,
                                  seed=11 + 2).centers, dim=1)
    torch.testing.assert_close(memory.groups, expected)
    loss = plugin.compute_losses(state, cache2)["momentum_grouping"]
    q, k, p = ([cache2[n, v].detach() for v in (0, 1)] for n in ("q", "k", "p"))
    l1, g1, _ = grouping_direction(q[0], k[1], p[0], expected, 0.99, 0.1)
    l2, _, _ = grouping_direction(q[1], k[0], p[1], g1, 0.99, 0.1)
    assert loss.item() == pytest.approx((l1.item() + l2.item()) / 2, rel=1e-5)  # trained with the new groups


def test_regroup_timing_end_sets_groups_to_kmeans_centres_of_the_bank():
    state, byol, plugin = make_state(k=3, regroup_every=2, bank_size=40, kmeans_n_init=3, seed=11,
                                     regroup_timing="end", bank="ring", regroup_metric="cosine")
    memory = plugin.memory
    _, cache1 = run_step(state, byol, plugin, seed=1)
    g_after_1 = memory.groups.clone()
    _, cache2 = run_step(state, byol, plugin, seed=2)  # iteration 1 did not regroup, iteration 2 does
    assert memory.iteration == 2 and memory.bank_count == 24
    bank = torch.cat([F.normalize(c["q", v].detach(), dim=1) for c in (cache1, cache2) for v in (0, 1)])
    torch.testing.assert_close(memory.filled(), bank)
    expected = F.normalize(kmeans(bank, 3, metric="cosine", n_init=3, max_iter=300, tol=1e-4, seed=11 + 2).centers,
                           dim=1)
    torch.testing.assert_close(memory.groups, expected)
    assert not torch.allclose(memory.groups, g_after_1)
    torch.testing.assert_close(regroup(bank, 3, seed=13, n_init=3, max_iter=300, tol=1e-4), expected)


def test_regroup_every_defaults_to_k_iterations_counting_from_one():
    state, byol, plugin = make_state(k=3)
    calls = []
    import clusterkit_plugins.digpro.momentum_grouping as mg

    original = mg.regroup
    mg.regroup = lambda bank, num_groups, **kw: (calls.append(kw["seed"]), original(bank, num_groups, **kw))[1]
    try:
        for i in range(7):
            run_step(state, byol, plugin, seed=i)
    finally:
        mg.regroup = original
    assert calls == [0 + 3, 0 + 6]  # iterations 3 and 6 (seed = run seed + iteration)


def test_memory_bank_is_a_ring_buffer():
    mem = GroupMemory(num_groups=2, dim=1, bank_size=7)
    written = []
    for start in range(0, 12, 3):  # 4 pushes of 3 rows: not a multiple of 7
        rows = torch.arange(start, start + 3, dtype=torch.float32).unsqueeze(1)
        mem.push(rows)
        written += rows.flatten().tolist()
        n = len(written)
        assert mem.bank_count == min(n, 7)
        assert mem.bank_ptr == n % 7
        expected = [None] * 7
        for i, v in enumerate(written):  # naive: row i goes to slot i % 7, later rows overwrite
            expected[i % 7] = v
        got = mem.bank.flatten().tolist()
        written_slots = [e for e in expected if e is not None]
        assert [g for g, e in zip(got, expected, strict=True) if e is not None] == written_slots
        assert mem.filled().shape[0] == min(n, 7)
    assert sorted(mem.filled().flatten().tolist()) == list(range(5, 12))  # the 7 latest
    mem.push(torch.arange(100, 110, dtype=torch.float32).unsqueeze(1))  # more rows than the bank
    written += list(range(100, 110))
    expected = [None] * 7
    for i, v in enumerate(written):
        expected[i % 7] = v
    assert mem.bank.flatten().tolist() == expected
    assert mem.bank_ptr == len(written) % 7 and mem.bank_count == 7


def test_official_bank_cuts_a_batch_at_the_end_as_lightly():
    """lightly 1.4.24's MemoryBankModule: a batch that reaches the end fills it, the rest of the
    batch is dropped, and writing starts again at row 0."""
    mem = GroupMemory(num_groups=2, dim=1, bank_size=7)
    mem.fill_with_noise(seed=0)
    noise = mem.bank.flatten().tolist()
    slots = list(noise)
    ptr = 0
    for start in range(0, 15, 3):  # 5 pushes of 3 rows
        rows = list(range(start, start + 3))
        mem.push_truncating(torch.tensor(rows, dtype=torch.float32).unsqueeze(1))
        n = min(3, 7 - ptr)  # naive lightly: write what fits, then back to 0 if the end was reached
        slots[ptr:ptr + n] = rows[:n]
        ptr = 0 if ptr + 3 >= 7 else ptr + 3
        assert mem.bank.flatten().tolist() == slots and mem.bank_ptr == ptr
        assert mem.filled().shape[0] == 7
    assert slots == [9, 10, 11, 12, 13, 14, 6]  # rows 7 and 8 were cut: the batch reached the end


def test_plugin_bank_holds_normalised_q_of_both_views_and_wraps():
    state, byol, plugin = make_state(k=3, bank_size=10, regroup_every=1000, bank="ring")  # 12 rows per step
    memory = plugin.memory
    _, c1 = run_step(state, byol, plugin, seed=1)
    _, c2 = run_step(state, byol, plugin, seed=2)
    rows = torch.cat([F.normalize(c["q", v].detach(), dim=1) for c in (c1, c2) for v in (0, 1)])  # 24 rows
    expected = torch.empty(10, OUT_DIM)
    for i, row in enumerate(rows):
        expected[i % 10] = row
    torch.testing.assert_close(memory.bank, expected)
    assert memory.bank_ptr == 4 and memory.bank_count == 10


def test_checkpoint_round_trip_keeps_groups_bank_pointer_counter():
    state, byol, plugin = make_state(k=3, bank_size=16, regroup_every=2)
    for i in range(3):
        run_step(state, byol, plugin, seed=i)
    memory = plugin.memory
    fresh = GroupMemory(3, OUT_DIM, 16)
    saved = plugin.state_dict()
    assert all(saved[name].device.type == "cpu" for name in GroupMemory.TENSORS)
    fresh.load_state_dict(saved)
    for name in GroupMemory.TENSORS:
        assert torch.equal(getattr(fresh, name), getattr(memory, name)), name
    for name in GroupMemory.COUNTERS:
        assert getattr(fresh, name) == getattr(memory, name), name
    # lightly's bank of 16 rows, 12 rows a step: pointer 12, then 0 (4 rows fit, 8 are cut), then 12
    assert fresh.iteration == 3 and fresh.bank_ptr == 12
    with pytest.raises(ValueError, match="shape"):
        GroupMemory(3, OUT_DIM, 8).load_state_dict(saved)

    # the whole model through a checkpoint: a resumed run continues identically
    state_b, byol_b, plugin_b = make_state(k=3, bank_size=16, regroup_every=2)
    run_step(state_b, byol_b, plugin_b, seed=42)  # a different history...
    assert not torch.equal(plugin_b.memory.bank, memory.bank)
    state_b.model.load_state_dict(state.model.state_dict())  # ...replaced by the checkpoint
    plugin_b.load_state_dict(plugin.state_dict())
    la, _ = run_step(state, byol, plugin, seed=9)
    lb, _ = run_step(state_b, byol_b, plugin_b, seed=9)
    assert la.item() == pytest.approx(lb.item(), rel=1e-6)
    torch.testing.assert_close(plugin_b.memory.groups, plugin.memory.groups)
    assert plugin_b.memory.iteration == plugin.memory.iteration == 4


def test_a_checkpoint_with_the_memory_as_model_buffers_still_resumes():
    """Checkpoints written before the memory became the plugin's state kept it as buffers
    ``momentum_grouping.*`` of state.model (counters as 0-d tensors): resume reads them into
    the plugin's memory, and the model weights load without them."""
    from clusterkit.checkpoint import restore_training_state
    from clusterkit.cluster import KMeansPredictor

    state, byol, plugin = make_state(k=3, bank_size=16, regroup_every=2)
    for i in range(3):
        run_step(state, byol, plugin, seed=i)
    memory = plugin.memory
    old_layout = dict(state.model.state_dict())
    for name in GroupMemory.TENSORS:
        old_layout[f"momentum_grouping.{name}"] = getattr(memory, name).clone()
    for name in GroupMemory.COUNTERS:
        dtype = torch.bool if name == "initialized" else torch.long
        old_layout[f"momentum_grouping.{name}"] = torch.tensor(getattr(memory, name), dtype=dtype)
    ckpt = {"model": old_layout, "step": 3, "epoch": 0, "pseudo_labels": None, "centers": None, "extra": {},
            "plugins": {"byol_target": {}, "momentum_grouping": {}}}   # the layout of the previous version

    state_b, _, plugin_b = make_state(k=3, bank_size=16, regroup_every=2, run_seed=5)
    restore_training_state(state_b, {"byol_target": byol, "momentum_grouping": plugin_b}, KMeansPredictor(3), ckpt)
    for name in GroupMemory.TENSORS:
        assert torch.equal(getattr(plugin_b.memory, name), getattr(memory, name)), name
    for name in GroupMemory.COUNTERS:
        assert getattr(plugin_b.memory, name) == getattr(memory, name), name
    assert torch.equal(state_b.model["projector"][0].weight, state.model["projector"][0].weight)


def _target_params(state):
    return [p.detach().clone() for n in ("target_backbone", "target_projector") for p in state.model[n].parameters()]


def _online_params(state):
    return [p.detach().clone() for n in ("backbone", "projector") for p in state.model[n].parameters()]


@pytest.mark.parametrize("extra_ema", [False, True])
def test_extra_ema_moves_the_target_before_the_forward_on_non_regroup_iterations(extra_ema):
    state, byol, plugin = make_state(k=3, regroup_every=2, extra_ema=extra_ema, extra_ema_momentum=0.9)
    with torch.no_grad():  # make the online branch differ from its copy
        for name in ("backbone", "projector"):
            for prm in state.model[name].parameters():
                prm.add_(0.5)
    # iteration 1 (not a regroup iteration)
    cache = make_cache(state, byol)
    before, online = _target_params(state), _online_params(state)
    plugin.on_step_start(state, cache)
    after = _target_params(state)
    if extra_ema:
        for b, o, a in zip(before, online, after, strict=True):
            torch.testing.assert_close(a, 0.9 * b + 0.1 * o)
        m = state.model
        with torch.no_grad():  # the forward sees the moved target
            torch.testing.assert_close(cache["k", 0], m["target_projector"](m["target_backbone"](cache.views[0])))
    else:
        assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))
    plugin.compute_losses(state, cache)
    plugin.after_step(state, cache)
    # iteration 2 regroups: no extra EMA
    before = _target_params(state)
    plugin.on_step_start(state, make_cache(state, byol, seed=3))
    assert all(torch.equal(b, a) for b, a in zip(before, _target_params(state), strict=True))


def test_default_params_and_validation():
    p = MomentumGrouping.Params()
    assert (p.beta, p.temperature, p.weight, p.bank_size, p.num_groups, p.regroup_every) == (0.99, 0.1, 1.0, 2560,
                                                                                           None, None)
    assert p.group_init == "uniform" and p.extra_ema is False and p.extra_ema_momentum == 0.99
    assert (p.update_assignment, p.regroup_timing, p.regroup_metric, p.bank) == ("online", "start", "euclidean",
                                                                                  "official")
    with pytest.raises(RecipeError, match="beta"):
        build(MomentumGrouping.Params, {"beta": 1.5}, "plugins.momentum_grouping")
    with pytest.raises(RecipeError, match="Did you mean 'beta'"):
        build(MomentumGrouping.Params, {"bta": 0.9}, "plugins.momentum_grouping")
    with pytest.raises(RecipeError, match="group_init"):
        build(MomentumGrouping.Params, {"group_init": "kmean"}, "plugins.momentum_grouping")
    _, _, plugin = make_state(k=6, num_groups=4)
    assert plugin.memory.groups.shape == (4, OUT_DIM)


def test_setup_runs_after_byol_target_whatever_the_recipe_order():
    for order in (["byol_target", "momentum_grouping"], ["momentum_grouping", "byol_target"]):
        pm, plugins = load_plugins({name: {"hidden_dim": 8, "out_dim": 6} if name == "byol_target" else {}
                              for name in order})
        backbone = nn.Sequential(nn.Flatten(), nn.Linear(IN_DIM, FEAT_DIM))
        backbone.num_features = FEAT_DIM
        state = TrainState(recipe=load_recipe(data={"e_step": {"k": 3}}), device=torch.device("cpu"),
                           model=nn.ModuleDict({"backbone": backbone}), num_train=10, steps_per_epoch=1)
        pm.hook.setup(state=state)
        assert plugins["momentum_grouping"].memory.groups.shape == (3, 6)
        assert "momentum_grouping" not in state.model  # the memory is the plugin's state, not a module


def test_setup_without_byol_target_says_what_to_add():
    backbone = nn.Linear(2, 2)
    state = TrainState(recipe=load_recipe(data={}), device=torch.device("cpu"),
                       model=nn.ModuleDict({"backbone": backbone}), num_train=10, steps_per_epoch=1)
    with pytest.raises(PluginError, match="byol_target"):
        MomentumGrouping().setup(state)


# ---------------------------------------------------------------------------------------------
# end to end: the trainer, one epoch of DigPro on digits, and the ablation
# ---------------------------------------------------------------------------------------------

DIGPRO_PLUGINS = ("diffused_sampling", "prototype_aggregation", "momentum_grouping")


def _digpro_recipe(without: str | None):
    plugins = {"byol_target": {"hidden_dim": 64, "out_dim": 32}, "kmeans_e_step": {"n_init": 1},
               "diffused_sampling": {}, "prototype_aggregation": {}, "momentum_grouping": {"bank_size": 256}}
    plugins.pop(without, None)
    return load_recipe(data={
        "name": "digpro_digits_test",
        "data": {"dataset": "digits", "image_size": 16, "batch_size": 64},
        # a narrow resnet10t: the test is about wiring, not accuracy
        "model": {"backbone": "resnet10t", "backbone_kwargs": {"channels": [16, 32, 64, 128], "stem_width": 8}},
        "schedule": {"epochs": 1}, "e_step": {"k": 10}, "eval": {"pixel_baseline": "never"},
        # one thread: on small CPU machines two threads contend and are 100x slower
        "run": {"device": "cpu", "progress": False, "threads": 1},
        "plugins": plugins,
    })


@pytest.mark.parametrize("without", [None, *DIGPRO_PLUGINS], ids=lambda w: f"without_{w}" if w else "digpro")
def test_digpro_trains_one_epoch_on_digits_and_each_plugin_can_be_ablated(tmp_path, restore_threads, without):
    import json

    from clusterkit.checkpoint import latest_checkpoint, load_checkpoint
    from clusterkit.rundir import make_run_dir
    from clusterkit.trainer import Trainer

    recipe = _digpro_recipe(without)
    run_dir = make_run_dir(recipe, str(tmp_path / "run"), force=False)
    summary = Trainer(recipe, run_dir).fit()
    steps = 1797 // 64
    assert summary["steps"] == steps
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    # that the method learns (NMI above the untrained network's): tests/plugins/test_methods_learn.py
    assert summary["metrics"] == {name: record[name] for name in ("nmi", "acc", "ari")}  # the last evaluation
    for name in DIGPRO_PLUGINS:
        assert (name in record) == (name != without), name
        if name != without:
            assert math.isfinite(record[name])

    ckpt = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
    assert not any(key.startswith("momentum_grouping.") for key in ckpt["model"])
    if without == "momentum_grouping":
        assert "momentum_grouping" not in ckpt["plugins"]
        return
    # the grouping state is checkpointed as the plugin's state
    memory = ckpt["plugins"]["momentum_grouping"]
    assert memory["iteration"] == steps
    assert memory["bank_count"] == 256
    assert memory["bank_ptr"] == (steps * 2 * 64) % 256
    groups = memory["groups"]
    assert groups.shape == (10, 32) and torch.isfinite(groups).all()
