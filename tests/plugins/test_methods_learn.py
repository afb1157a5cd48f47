"""Every method learns, and CC, HaDis and PICI resume to the bit.

Each method (ProPos, DigPro = ProPos + momentum_grouping, CC, PICI, HaDis = ProPos + HSD) trains
once per module on :func:`clusterkit.testing.synthetic_dataset` (256 grey 8x8 images of 4 smooth
patterns, shifted and noisy: clusterable, not trivially) with a tiny network, a few epochs at
batch 32 (8 steps per epoch).  The same runs serve both kinds of test:

* learning: the NMI of the final evaluation exceeds the untrained network's (the same recipe and
  seed, built and evaluated before any step: the trainer records no epoch-0 evaluation) by a
  stated margin, set well under half of what was measured;
* resume: the run killed after epoch N (its later checkpoints and summary.json deleted) and
  resumed equals the uninterrupted run: final weights and every checkpointed part with
  torch.equal, summary metrics and every epoch record of metrics.jsonl exactly (same process,
  same machine).  PICI is killed just before each of its stage boundaries.

Settings chosen so that each method clearly learns within the budget: BYOL-style methods use a
target momentum of 0.9 (0.996 barely moves the evaluated target branch in 32 steps); CC and PICI
Adam at 3e-3.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from conftest import torch_settings_kept

from clusterkit.checkpoint import load_checkpoint
from clusterkit.recipe import load_recipe
from clusterkit.rundir import TIMING_KEYS
from clusterkit.show import epoch_records
from clusterkit.testing import TinyTrainer, tiny_recipe

TINY_VIT = {"img_size": 8, "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2}
BYOL = {"byol_target": {"hidden_dim": 32, "out_dim": 16, "momentum": 0.9},
        "kmeans_e_step": {"n_init": 1, "max_iter": 20},
        "diffused_sampling": {"sigma": 0.001},
        "prototype_aggregation": {"temperature": 0.5, "weight": 1.0}}
CC = {"contrastive_heads": {"instance_dim": 16}, "instance_contrast": {"temperature": 0.5},
      "cluster_contrast": {"temperature": 1.0, "entropy_weight": 1.0}}
ADAM = {"optim": {"name": "adam", "lr": 3e-3, "lr_scaling": "none", "weight_decay": 0.0},
        "schedule": {"lr_schedule": "constant"}}
PICI_STAGES = [  # epochs 0 | 1-3 | 4-5 (0-based)
    {"name": "pretrain", "until": 1, "plugins": ["partial_self_discrimination"]},
    {"name": "train", "until": 4, "plugins": ["partial_self_discrimination", "instance_contrast", "cluster_contrast"]},
    {"name": "boost", "until": None, "plugins": ["instance_contrast", "cluster_contrast", "cross_level_interaction"]},
]


class Setting(NamedTuple):
    plugins: dict
    epochs: int
    overrides: dict
    model: dict | None = None


SETTINGS = {
    "propos": Setting(BYOL, 4, {}),
    "digpro": Setting({**BYOL, "momentum_grouping": {"beta": 0.99, "temperature": 0.1, "weight": 1.0,
                                                     "bank_size": 128}}, 5, {}),
    "hadis": Setting({**BYOL, "hardness_aware_distillation": {"temperature": 0.5, "sigma": 0.001}}, 4, {}),
    "cc": Setting(CC, 6, ADAM),
    "pici": Setting({"masked_vit": {"mask_ratio": 0.5}, **CC,
                     "partial_self_discrimination": {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2},
                     "cross_level_interaction": {"n_init": 2, "double_softmax": True}},
                    6, {**ADAM, "stages": PICI_STAGES},
                    {"backbone": "vit_pici_small_patch16_224", "backbone_kwargs": TINY_VIT}),
}

# The NMI gain over the untrained network that each method must show.  Measured on a 2-core
# x86 machine, untrained -> trained NMI (gain) for run.seed 0 (the test's), 1 and 2 (the seed
# also draws the synthetic set):
#   ProPos  .174 -> .489 (+.315) | .232 -> .591 (+.359) | .255 -> .624 (+.369)
#   DigPro  .174 -> .390 (+.216) | .232 -> .725 (+.493) | .255 -> .670 (+.415)
#   HaDis   .174 -> .510 (+.336) | .232 -> .600 (+.368) | .255 -> .738 (+.483)
#   CC      .028 -> .620 (+.592) | .095 -> .722 (+.627) | .015 -> .642 (+.627)
#   PICI    .000 -> .596 (+.596) | .000 -> .432 (+.432) | .000 -> .555 (+.555)
# (CC's and PICI's untrained cluster heads put (almost) every image in one cluster.)  Each
# margin is well under half of the smallest gain measured, so that another CPU's rounding, which
# moves the trajectory, does not fail it, while a method that stops learning does.
MARGIN = {"propos": 0.12, "digpro": 0.08, "hadis": 0.12, "cc": 0.25, "pici": 0.2}


def make_trainer(method: str, run_dir: Path, resume: bool = False) -> TinyTrainer:
    s = SETTINGS[method]
    raw = tiny_recipe(copy.deepcopy(s.plugins), epochs=s.epochs,
                      overrides={"data": {"batch_size": 32}, "run": {"keep_last": s.epochs}, **s.overrides})
    raw["name"] = f"{method}_learns"
    if s.model is not None:
        raw["model"] = copy.deepcopy(s.model)
    run_dir.mkdir(parents=True, exist_ok=True)
    return TinyTrainer(load_recipe(data=raw), run_dir, resume=resume)


class Run(NamedTuple):
    dir: Path
    untrained_nmi: float
    summary: dict


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """method -> its Run, each trained once (on first use) for the whole module."""
    runs: dict[str, Run] = {}

    def get(method: str) -> Run:
        if method not in runs:
            root = tmp_path_factory.mktemp(method)
            with torch_settings_kept():
                untrained = make_trainer(method, root / "untrained")
                untrained.build()
                nmi0 = untrained.evaluate()["nmi"]
                summary = make_trainer(method, root / "full").fit()
            runs[method] = Run(root / "full", nmi0, summary)
        return runs[method]

    return get


@pytest.mark.parametrize("method", list(SETTINGS))
def test_method_learns(trained, method):
    run = trained(method)
    nmi = run.summary["metrics"]["nmi"]
    print(f"{method}: untrained NMI {run.untrained_nmi:.3f} -> {nmi:.3f}")
    assert run.summary["steps"] == SETTINGS[method].epochs * 256 // 32
    assert nmi > run.untrained_nmi + MARGIN[method], (method, run.untrained_nmi, nmi)


def _records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in epoch_records(run_dir)]


@pytest.mark.parametrize("method,kill_after", [
    ("cc", 3), ("hadis", 2),
    ("pici", 1),   # the pretrain stage done; the resumed run starts the train stage
    ("pici", 4),   # the train stage done; the resumed run starts boost (CLI's k-means of the whole set)
], ids=["cc", "hadis", "pici_before_train", "pici_before_boost"])
def test_killed_and_resumed_run_equals_the_uninterrupted_one(trained, method, kill_after, tmp_path, restore_threads):
    run = trained(method)
    epochs = SETTINGS[method].epochs
    cut = tmp_path / "cut"
    shutil.copytree(run.dir, cut)
    for epoch in range(kill_after, epochs):  # killed during epoch kill_after + 1 (1-based)
        (cut / "checkpoints" / f"epoch_{epoch:04d}.pt").unlink()
    (cut / "summary.json").unlink()
    resumed = make_trainer(method, cut, resume=True).fit()

    assert resumed["metrics"] == run.summary["metrics"]
    assert resumed["steps"] == run.summary["steps"]
    assert _records(cut) == _records(run.dir)
    last = f"epoch_{epochs - 1:04d}.pt"
    a, b = load_checkpoint(run.dir / "checkpoints" / last), load_checkpoint(cut / "checkpoints" / last)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert _same(a["optimizer"], b["optimizer"]) and _same(a["plugins"], b["plugins"])


def _same(x, y) -> bool:
    """Nested dicts/lists of tensors and numbers, tensors compared with torch.equal."""
    if torch.is_tensor(x) or torch.is_tensor(y):
        return torch.is_tensor(x) and torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_same(p, q) for p, q in zip(x, y, strict=True))
    return x == y
