"""byol_target: the online/target pair, the EMA and its timing (official: before the optimiser step)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from clusterkit import TrainState
from clusterkit.recipe import load_recipe
from clusterkit.schema import build
from clusterkit_plugins.propos.byol_target import BYOLTarget, cosine_momentum, ema_update


def make_state(**params):
    recipe = load_recipe(data={"e_step": {"k": 3}, "run": {"device": "cpu"}, "schedule": {"epochs": 2}})
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 16))
    backbone.num_features = 16
    state = TrainState(recipe=recipe, device=torch.device("cpu"), model=nn.ModuleDict({"backbone": backbone}),
                       num_train=40, steps_per_epoch=5)
    plugin = BYOLTarget(build(BYOLTarget.Params, {"hidden_dim": 8, "out_dim": 4, **params}, "plugins.byol_target"))
    groups = plugin.setup(state)
    return state, plugin, groups


def _params(state, names):
    return [p.detach().clone() for n in names for p in state.model[n].parameters()]


def test_setup_copies_the_online_branch_and_freezes_the_target():
    state, _, groups = make_state()
    for online, target in (("backbone", "target_backbone"), ("projector", "target_projector")):
        for a, b in zip(state.model[online].parameters(), state.model[target].parameters(), strict=True):
            assert torch.equal(a, b) and not b.requires_grad
    (group,) = groups  # the predictor trains at 10x the lr
    assert group.lr_scale == 10.0 and group.name == "predictor"
    weights = [m.weight for m in state.model["predictor"].modules() if isinstance(m, nn.Linear)]
    assert all(abs(w.std().item() - 0.01) < 0.003 for w in weights)  # N(0, 0.01), as the official code


def test_ema_update_is_parameters_only():
    torch.manual_seed(1)
    online = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    target = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    online[1].running_mean.fill_(5.0)
    before = [p.detach().clone() for p in target.parameters()]
    ema_update(target, online, 0.9)
    for b, o, t in zip(before, online.parameters(), target.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
    assert torch.equal(target[1].running_mean, torch.zeros(3))  # BN buffers are the target's own


def _move_online(state):
    with torch.no_grad():
        for name in ("backbone", "projector"):
            for p in state.model[name].parameters():
                p.add_(0.5)


@pytest.mark.parametrize("timing", ["before_step", "after_step"])
def test_ema_timing(timing):
    """before_step (official): the target moves towards the weights the losses saw, before the
    optimiser step changes them; after_step: towards the weights after the step."""
    state, plugin, _ = make_state(ema_timing=timing, momentum=0.9)
    _move_online(state)                                   # the online branch differs from the target
    names = ("backbone", "projector")
    target0, seen = _params(state, ("target_backbone", "target_projector")), _params(state, names)
    plugin.before_optimizer_step(state)                   # the trainer: backward done, step not yet taken
    _move_online(state)                                   # the optimiser step
    stepped = _params(state, names)
    state.step += 1
    plugin.after_step(state)
    expected_online = seen if timing == "before_step" else stepped
    for t0, o, t in zip(target0, expected_online, _params(state, ("target_backbone", "target_projector")), strict=True):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * o)


def test_cosine_momentum_counts_iterations_from_one_with_either_timing():
    total = 2 * 5
    for timing in ("before_step", "after_step"):
        state, plugin, _ = make_state(ema_timing=timing, cosine_increase=True)
        state.step = 3  # three steps done: the fourth is running
        hook = plugin.before_optimizer_step if timing == "before_step" else plugin.after_step
        if timing == "after_step":
            state.step = 4
        hook(state)
        expected = 1 - (1 - 0.996) * (math.cos(math.pi * 4 / total) + 1) / 2
        assert state.scalars["ema"] == pytest.approx(expected)
        assert cosine_momentum(0.996, 4, total) == pytest.approx(expected)


def test_several_steps_with_the_cosine_schedule_match_a_naive_ema():
    """Three optimiser steps, the online weights moved by each: the target follows
    xi <- alpha_n * xi + (1 - alpha_n) * theta_n with alpha_n = 1 - (1 - base)(cos(pi n / N) + 1) / 2,
    n = 1, 2, 3 the iteration (official n_iter), computed here element by element."""
    base = 0.9
    state, plugin, _ = make_state(momentum=base, cosine_increase=True)
    online_names, target_names = ("backbone", "projector"), ("target_backbone", "target_projector")
    expected = [t.tolist() for t in _params(state, target_names)]
    total = state.total_steps
    for n in range(1, 4):
        _move_online(state)
        theta = [t.tolist() for t in _params(state, online_names)]
        alpha = 1 - (1 - base) * (math.cos(math.pi * n / total) + 1) / 2

        def mix(xi, th, alpha=alpha):
            if isinstance(xi, list):
                return [mix(a, b, alpha) for a, b in zip(xi, th, strict=True)]
            return alpha * xi + (1 - alpha) * th

        expected = [mix(xi, th) for xi, th in zip(expected, theta, strict=True)]
        plugin.before_optimizer_step(state)  # the trainer's order: EMA, then the optimiser step
        state.step += 1
        plugin.after_step(state)
        assert state.scalars["ema"] == pytest.approx(alpha)
    for want, got in zip(expected, _params(state, target_names), strict=True):
        torch.testing.assert_close(got, torch.tensor(want, dtype=got.dtype))


def test_momentum_one_keeps_the_target_and_embed_is_the_normalised_target_output():
    state, plugin, _ = make_state(momentum=1.0)
    target0 = _params(state, ("target_backbone", "target_projector"))
    _move_online(state)
    plugin.before_optimizer_step(state)
    for a, b in zip(target0, _params(state, ("target_backbone", "target_projector")), strict=True):
        assert torch.equal(a, b)
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(0))
    m = state.model.eval()
    with torch.no_grad():
        k = m["target_projector"](m["target_backbone"](x))
        got = plugin.embed(state, x)
    torch.testing.assert_close(got, k / k.norm(dim=1, keepdim=True))  # norm(k): the target branch, not q
    assert not torch.allclose(got, torch.nn.functional.normalize(plugin.online(m, x), dim=1))
