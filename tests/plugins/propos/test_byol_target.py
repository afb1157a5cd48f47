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
        for a, b in zip(state.model[online].parameters(), state.model[target].parameters()):
            assert torch.equal(a, b) and not b.requires_grad
    (group,) = groups  # the predictor trains at 10x the lr
    assert group.lr_scale == 10.0 and group.name == "predictor"
    weights = [m.weight for m in state.model["predictor"].modules() if isinstance(m, nn.Linear)]
    assert all(abs(w.std().item() - 0.01) < 0.003 for w in weights)  # N(0, 0.01), as the official code


def test_ema_update_is_parameters_only():
    torch.manual_seed(1)
    online, target = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    online[1].running_mean.fill_(5.0)
    before = [p.detach().clone() for p in target.parameters()]
    ema_update(target, online, 0.9)
    for b, o, t in zip(before, online.parameters(), target.parameters()):
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
    for t0, o, t in zip(target0, expected_online, _params(state, ("target_backbone", "target_projector"))):
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
