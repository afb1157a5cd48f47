"""eval.bn: recalibrate, BatchNorm statistics re-estimated on the evaluation images (AdaBN)."""

from __future__ import annotations

import attrs
import torch
from torch import nn

from clusterkit import Plugin, hookimpl
from clusterkit.models.recalibrate import recalibrated_batchnorm
from clusterkit.testing import make_trainer


def test_statistics_are_the_evaluation_data_s_inside_and_restored_after():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)
    model = nn.Sequential(conv, bn, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(100.0)
    model.eval()
    batches = [torch.randn(8, 1, 6, 6) * (i + 1) + i for i in range(4)]
    with torch.no_grad():
        acts = [conv(x) for x in batches]
    # naive: equal weight per batch, each batch's mean and unbiased variance per channel
    mean = torch.stack([a.mean(dim=(0, 2, 3)) for a in acts]).mean(0)
    var = torch.stack([a.transpose(0, 1).reshape(3, -1).var(dim=1, unbiased=True) for a in acts]).mean(0)
    with recalibrated_batchnorm(model, model, batches) as n:
        assert n == 1 and not bn.training
        torch.testing.assert_close(bn.running_mean, mean)
        torch.testing.assert_close(bn.running_var, var)
        x = batches[0]
        expected = ((conv(x) - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
                    * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]).relu().mean(dim=(2, 3))
        torch.testing.assert_close(model(x), expected)
    assert torch.equal(bn.running_mean, torch.full((3,), 5.0)) and torch.equal(bn.running_var, torch.full((3,), 100.0))
    assert bn.momentum == 0.1 and not bn.training


class _BNHeadLoss(Plugin):
    """A BatchNorm head trained by a loss that uses no pseudo-labels, so that the E-step and
    evaluation cannot change the training: only what is embedded differs between eval.bn modes."""

    @attrs.define
    class Params:
        pass

    @hookimpl
    def setup(self, state):
        state.model["bn_head"] = nn.Sequential(nn.Linear(state.model["backbone"].num_features, 8), nn.BatchNorm1d(8))

    @hookimpl
    def compute_losses(self, state, cache):
        z0, z1 = (state.model["bn_head"](cache["h", v]) for v in (0, 1))
        return {"bn_head": (z0 - z1).pow(2).mean()}

    @hookimpl
    def embed(self, state, images):
        return state.model["bn_head"](state.model["backbone"](images))


def test_recalibration_changes_what_is_embedded_not_what_is_trained(tmp_path):
    results = {}
    for mode in ("running", "recalibrate"):
        trainer = make_trainer(_BNHeadLoss, epochs=2, run_dir=tmp_path / mode, overrides={"eval": {"bn": mode}})
        trainer.fit()
        results[mode] = (trainer.state.model.state_dict(), trainer.state.features("train"))
    (w_run, f_run), (w_rec, f_rec) = results["running"], results["recalibrate"]
    for name in w_run:  # the weights and the training BN statistics are identical
        assert torch.equal(w_run[name], w_rec[name]), name
    assert not torch.allclose(f_run, f_rec, atol=1e-4)  # the evaluation features differ
