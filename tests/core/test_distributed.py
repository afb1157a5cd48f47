"""torchrun DDP in the trainer (rank-0 files, resume, errors), shuffling BN, and the GPU
fast paths' CPU equivalence (channels_last, fused optimiser, torch.compile).

The per-plugin loss equivalence (1 vs 2 processes) is tests/core/test_distributed_losses.py.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, flat

from clusterkit.errors import RecipeError
from clusterkit.recipe import load_recipe
from clusterkit.testing import check_distributed_equivalence, train_tiny
from clusterkit.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


def _torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=N -m clusterkit ARGS`` on the CPU (gloo), one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "clusterkit", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _tiny_yaml(tmp_path: Path, **changes) -> Path:
    raw = copy.deepcopy(TINY)
    raw["run"].update({"threads": 1, "keep_last": 5, "device": "cpu"})
    raw["eval"] = {"pixel_baseline": "never"}
    for key, value in changes.items():
        section, field = key.split("__")
        raw[section][field] = value
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_torchrun_trains_writes_on_rank_0_only_and_resumes_exactly(tmp_path):
    recipe = _tiny_yaml(tmp_path, schedule__epochs=3)
    full = _torchrun(["run", str(recipe), "--out", "full"], tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    assert "(2 processes)" in full.stderr and full.stdout.count("NMI") == 1  # one report, from rank 0
    run = tmp_path / "full"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 3
    # 1,797 digits over 2 ranks of batch 128: ceil(1797 / 2) = 899 images -> 7 full steps per epoch
    assert summary["steps"] == 3 * 7
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "seconds" in r] == [1, 2, 3]  # written once, not once per rank
    ckpt = torch.load(run / "checkpoints" / "epoch_0002.pt", weights_only=False)
    assert ckpt["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2
    assert not torch.equal(ckpt["rng_ranks"][0]["torch"], ckpt["rng_ranks"][1]["torch"])  # ranks draw apart

    # a crash during the last epoch, then --resume with 2 processes: the same end as without the crash
    (run / "checkpoints" / "epoch_0002.pt").unlink()
    (run / "summary.json").unlink()
    resumed = _torchrun(["run", str(recipe), "--resume", "full"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = json.loads((run / "summary.json").read_text())
    assert again["metrics"] == summary["metrics"]
    ckpt2 = torch.load(run / "checkpoints" / "epoch_0002.pt", weights_only=False)
    for name, value in ckpt["model"].items():
        assert torch.equal(value, ckpt2["model"][name]), name


def test_torchrun_batch_not_divisible_by_processes_is_a_clear_error(tmp_path):
    recipe = _tiny_yaml(tmp_path, data__batch_size=255)
    proc = _torchrun(["run", str(recipe), "--out", "bad"], tmp_path)
    assert proc.returncode != 0
    assert "data.batch_size = 255 is the global batch" in flat(proc.stderr)
    assert "Traceback" not in proc.stderr.split("data.batch_size = 255")[0][-2000:]


def test_shuffling_bn_gives_the_target_outputs_back_in_order():
    # BatchNorm runs per sample in the check, so shuffled and plain targets must agree exactly:
    # this proves the permutation and its inverse across the two processes
    check_distributed_equivalence({"byol_target": {"hidden_dim": 32, "out_dim": 16, "shuffle_bn": True},
                                   "diffused_sampling": {}}, steps=1)


def test_sync_bn_on_a_cpu_torchrun_job_is_a_clear_error(monkeypatch, tmp_path, restore_threads):
    raw = copy.deepcopy(TINY)
    raw["run"].update({"sync_bn": True, "device": "cpu", "threads": 1})
    trainer = Trainer(load_recipe(data=raw), tmp_path)
    # a one-process stand-in for a torchrun job: distributed, but world size 1 and rank 0
    monkeypatch.setattr("clusterkit.distributed.is_distributed", lambda: True)
    monkeypatch.setattr("clusterkit.distributed.world_size", lambda: 1)
    monkeypatch.setattr("clusterkit.distributed.rank", lambda: 0)
    with pytest.raises(RecipeError, match="SyncBatchNorm runs on GPUs only"):
        trainer.build()


# ---------------------------------------------------------------------------------------------
# fast paths: the same training on the CPU
# ---------------------------------------------------------------------------------------------

_FAST_PATHS = pytest.mark.parametrize("overrides", [
    {"run": {"channels_last": True}},
    {"optim": {"fused": True}},
    {"run": {"compile": True, "compile_backend": "eager"}},
], ids=["channels_last", "fused_sgd", "compile_eager"])
_FAST_PLUGINS = {"byol_target": {"hidden_dim": 32, "out_dim": 16}, "diffused_sampling": {},
                 "prototype_aggregation": {"warmup_gate": False}}


def _with_base(overrides: dict) -> dict:
    base = {"run": {"deterministic": False}}
    return {**base, **{k: {**base.get(k, {}), **v} for k, v in overrides.items()}}


def _first_steps(overrides: dict, steps: int, labels_from=None):
    """Build the tiny ProPos-like run, run its first E-step and ``steps`` training steps.

    Returns (trainer, E-step features, [loss terms per step], the first step's gradient (one
    flat vector), the parameters' total change over the steps (one flat vector)).  With
    ``labels_from`` (another such trainer) the k-means result of that trainer's E-step is used
    instead of this one's: features equal to rounding can still flip an assignment at a near
    tie, and the k-means is not what the fast paths change (the features are compared)."""
    from clusterkit.testing import make_trainer

    trainer = make_trainer("kmeans_e_step", {"n_init": 1}, with_plugins=_FAST_PLUGINS, overrides=_with_base(overrides))
    trainer.build()
    params = [p for p in trainer.state.model.parameters() if p.requires_grad]
    start = torch.cat([p.detach().flatten() for p in params])
    trainer.begin_epoch(0)
    features = trainer.state.features("train").clone()
    if labels_from is not None:
        trainer.state.pseudo_labels = labels_from.state.pseudo_labels.clone()
        trainer.state.centers = labels_from.state.centers.clone()
    terms, grad = [], None
    batches = iter(trainer.loader)
    for _ in range(steps):
        terms.append({k: v.item() for k, v in trainer.train_step(next(batches)).items()})
        if grad is None:
            grad = torch.cat([torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten() for p in params])
    change = torch.cat([p.detach().flatten() for p in params]) - start
    return trainer, features, terms, grad, change


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


@_FAST_PATHS
def test_fast_paths_take_the_default_paths_first_steps(overrides, restore_threads):
    """The fast paths compute what the default path computes, to float rounding: the E-step's
    features, every loss term of the first three steps, the first step's gradient and the
    parameters' change over the three steps (momentum and weight decay included).

    Only rounding differs: channels_last convolutions sum in another order (measured on an x86
    CPU: features 9e-7 apart, loss terms at most 1.5e-5 relative, gradient 7e-6 and parameter
    change 2e-5 relative as whole vectors); fused SGD and eager compile were bit-identical there.
    The tolerances below leave a margin of 50 or more over those for other CPUs' kernels, and
    no k-means runs between the compared values.  A wrong layout conversion, a dropped optimiser
    term or a compiled copy that the optimiser does not train moves them by far more."""
    ref, ref_features, ref_terms, ref_grad, ref_change = _first_steps({}, steps=3)
    _, features, terms, grad, change = _first_steps(overrides, steps=3, labels_from=ref)
    assert torch.allclose(features, ref_features, rtol=0, atol=1e-4)
    for step, (a, b) in enumerate(zip(ref_terms, terms, strict=True)):
        for term in ("diffused_sampling", "prototype_aggregation", "loss"):
            assert b[term] == pytest.approx(a[term], rel=1e-3, abs=1e-6), (step, term)
    # whole vectors: a bias in front of a BatchNorm has a true gradient of 0, so per-tensor
    # relative differences of its rounding noise mean nothing
    assert _rel(ref_grad, grad) < 5e-4
    assert _rel(ref_change, change) < 1e-3


def _final(summary: dict) -> dict:
    return {k: v for k, v in summary["history"][-1].items() if k not in ("seconds",)}


@_FAST_PATHS
def test_fast_paths_train_like_the_default_path(overrides, restore_threads):
    """Two epochs through Trainer.fit, with the k-means E-step between them: both learn, and the
    epoch-2 loss means agree loosely.

    After an E-step the values are no longer equal to rounding: a near-tie k-means assignment
    can flip with the CPU's rounding, and training amplifies small differences.  Measured:
    channels_last's epoch-2 prototype_aggregation was 0.13419 on an AMD EPYC against 0.13393
    for NCHW (1.9e-3 relative; 1.2e-4 on the machine that wrote this test), while seeds 1 and
    2 instead of 0 move the terms by 1.8-16%.  The tolerance, 1e-2, is five times the
    cross-CPU measurement; the exact comparison is the test above."""
    ref = train_tiny("kmeans_e_step", {"n_init": 1}, with_plugins=_FAST_PLUGINS, epochs=2, overrides=_with_base({}))
    fast = train_tiny("kmeans_e_step", {"n_init": 1}, with_plugins=_FAST_PLUGINS, epochs=2,
                      overrides=_with_base(overrides))
    for run in (ref, fast):  # the epoch-1 loss is -0.79, the epoch-2 one -1.12
        assert run["history"][1]["loss"] < run["history"][0]["loss"] - 0.1
    a, b = _final(ref), _final(fast)
    for term in ("diffused_sampling", "prototype_aggregation", "loss"):
        assert b[term] == pytest.approx(a[term], rel=1e-2, abs=1e-4), term


# ---------------------------------------------------------------------------------------------
# no host-device sync inside a training step
# ---------------------------------------------------------------------------------------------

def test_a_digpro_step_reads_no_tensor_value_on_the_host(monkeypatch, restore_threads):
    """On a GPU, reading a tensor's value on the host (.item(), bool(), int(), float(),
    .tolist()) waits for the device; the step must do none (run.nonfinite: stop checks every
    run.sync_every steps instead).  A regrouping step runs k-means on the host by design, so
    regrouping is pushed past the steps checked here.  (This catches reads from Python; a sync
    inside a torch op, such as boolean-mask indexing, shows only on a GPU.)"""
    from clusterkit.testing import make_trainer

    plugins = {"byol_target": {"hidden_dim": 32, "out_dim": 16}, "diffused_sampling": {},
               "prototype_aggregation": {"warmup_gate": False}, "kmeans_e_step": {"n_init": 1}}
    trainer = make_trainer("momentum_grouping", {"regroup_every": 1000, "bank_size": 64}, with_plugins=plugins)
    trainer.build()
    trainer.begin_epoch(0)
    batches = iter(trainer.loader)
    views, index = trainer.pipeline.views(next(batches))
    trainer.step(views, index)  # the first step reads the counters' buffers once
    views, index = trainer.pipeline.views(next(batches))

    def forbidden(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} called inside the training step (a host-device sync)")
        return read

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    terms = trainer.step(views, index)
    monkeypatch.undo()
    assert set(terms) >= {"momentum_grouping", "prototype_aggregation", "diffused_sampling", "loss"}
    assert trainer.state.step == 2
