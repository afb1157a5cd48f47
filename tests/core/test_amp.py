"""bf16 autocast on the CPU (``run.amp_cpu``, clusterkit/amp.py): the model's modules compute in
bf16, the loss terms and normalisations in float32, and a step's losses stay close to float32's.

These run on any CPU: where bf16 is not native (an AVX2-only CPU) it is emulated, slower but
with the same numerics, and the trainer warns."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import tiny_recipe, torch_settings_kept
from torch.utils._python_dispatch import TorchDispatchMode

from clusterkit import amp
from clusterkit.recipe import load_recipe
from clusterkit.trainer import Trainer


class OpDtypes(TorchDispatchMode):
    """Records (aten op, dtype of its first tensor argument) of everything that runs."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = next((a for a in args if torch.is_tensor(a)), None)
        self.ops[(func.overloadpacket.__name__, None if first is None else first.dtype)] += 1
        return func(*args, **(kwargs or {}))


def _first_step(tmp_path, amp_cpu: bool, **changes):
    """The tiny ProPos recipe's first optimiser step (warm-up off, so both loss terms are on) from
    the same seed, weights and views: (loss terms, the ops that ran, the trainer)."""
    raw = tiny_recipe(run__amp_cpu=amp_cpu, data__batch_size=64, schedule__warmup_epochs=0, **changes)
    run_dir = tmp_path / f"amp_{amp_cpu}"
    run_dir.mkdir()
    with torch_settings_kept():
        trainer = Trainer(load_recipe(data=raw), run_dir)
        trainer.build()
        trainer.begin_run()
        trainer.begin_epoch(0)
        batch = next(iter(trainer.loader))
        torch.manual_seed(1)
        views, index = trainer.pipeline.views(batch)
        with OpDtypes() as seen:
            terms = trainer.step(views, index)
    return terms, seen.ops, trainer


def test_cpu_amp_step_runs_modules_in_bf16_and_losses_in_float32(tmp_path, capsys):
    ref, ref_ops, _ = _first_step(tmp_path, amp_cpu=False)
    terms, ops, trainer = _first_step(tmp_path, amp_cpu=True)
    assert trainer.cpu_amp and not trainer.use_amp
    if not amp.cpu_bf16_native():
        assert "run.amp_cpu is true, but this CPU has no native bf16" in capsys.readouterr().err

    # the backbone's convolutions and the heads' matmuls ran in bf16, forward and backward ...
    assert ops[("convolution", torch.bfloat16)] > 0 and ops[("convolution", torch.float32)] == 0
    assert ops[("convolution_backward", torch.bfloat16)] > 0
    assert ops[("addmm", torch.bfloat16)] + ops[("mm", torch.bfloat16)] > 0
    assert not any(dtype == torch.bfloat16 for (_, dtype) in ref_ops)  # (the float32 step has none)
    # ... and every L2 normalisation / cosine of the losses in float32 (CPU autocast would run
    # them in bf16 if the loss terms were inside the autocast region)
    assert ops[("linalg_vector_norm", torch.float32)] > 0
    assert ops[("linalg_vector_norm", torch.bfloat16)] == 0
    assert ops[("_log_softmax", torch.bfloat16)] + ops[("logsumexp", torch.bfloat16)] == 0

    # the loss terms are float32 and close to the float32 step's
    assert set(terms) == set(ref) == {"diffused_sampling", "prototype_aggregation", "loss"}
    for name in ref:
        assert terms[name].dtype == torch.float32
        assert float(ref[name]) != 0.0
        assert float(terms[name]) == pytest.approx(float(ref[name]), abs=0.02, rel=0.02), name
    # the parameters, their gradients and the optimiser state stay float32
    model = trainer.state.model
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


def test_cpu_amp_embeds_in_bf16_and_hands_float32_on(tmp_path):
    _, _, trainer = _first_step(tmp_path, amp_cpu=True)
    images = torch.rand(5, 1, 8, 8)  # digits: one channel
    with OpDtypes() as seen:
        feats = trainer.embed(images)
    assert feats.dtype == torch.float32
    assert seen.ops[("convolution", torch.bfloat16)] > 0
    # byol_target's embed normalises the target projector's output, in float32
    assert seen.ops[("linalg_vector_norm", torch.float32)] > 0
    assert seen.ops[("linalg_vector_norm", torch.bfloat16)] == 0


def test_autocast_region_ends_when_a_forward_raises():
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise ValueError("broken forward")

    module = Broken()
    amp.autocast_module_forward(module)
    with pytest.raises(ValueError, match="broken forward"):
        module(torch.ones(2))
    assert not torch.is_autocast_enabled("cpu")


def test_outputs_of_every_shape_come_back_float32():
    class Many(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, x):
            y = self.linear(x)
            return {"y": y, "pair": (y, [y * 2]), "index": torch.arange(3)}

    module = Many()
    amp.autocast_module_forward(module)
    out = module(torch.randn(2, 4))
    assert out["y"].dtype == out["pair"][0].dtype == out["pair"][1][0].dtype == torch.float32
    assert out["index"].dtype == torch.int64
    assert out["y"].requires_grad
    out["y"].sum().backward()
    assert module.linear.weight.grad.dtype == torch.float32


def test_amp_cpu_is_off_by_default_and_does_nothing_on_cuda_runs():
    recipe = load_recipe(data=tiny_recipe())
    assert recipe.run.amp_cpu is False
    model = torch.nn.ModuleDict({"backbone": torch.nn.Linear(2, 2)})
    assert amp.install_cpu_autocast(model, torch.device("cpu"), recipe.run) is False
    on = load_recipe(data=tiny_recipe(run__amp_cpu=True)).run
    assert amp.install_cpu_autocast(model, torch.device("cuda"), on) is False  # run.amp covers CUDA
    assert not model["backbone"]._forward_pre_hooks


def test_a_cpu_without_native_bf16_warns(monkeypatch, capsys):
    monkeypatch.setattr(amp, "cpu_bf16_native", lambda: False)
    run = load_recipe(data=tiny_recipe(run__amp_cpu=True)).run
    model = torch.nn.ModuleDict({"backbone": torch.nn.Linear(2, 2)})
    assert amp.install_cpu_autocast(model, torch.device("cpu"), run) is True
    err = " ".join(capsys.readouterr().err.split())
    assert "run.amp_cpu is true, but this CPU has no native bf16 arithmetic" in err
    assert "Set run.amp_cpu: false" in err
    assert model["backbone"](torch.randn(3, 2)).dtype == torch.float32

    monkeypatch.setattr(amp, "cpu_bf16_native", lambda: True)
    amp.install_cpu_autocast(torch.nn.ModuleDict({"b": torch.nn.Linear(2, 2)}), torch.device("cpu"), run)
    assert "warning" not in capsys.readouterr().err
