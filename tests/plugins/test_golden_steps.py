"""The plugins, as the trainer calls them, against whole official training steps (issue 25, item 4).

``tests/golden/*_train_step.pt`` were written by ``benchmarks/parity/make_golden.py``, which runs the
official training step itself (ProPos/HaDis/DigPro ``BYOL.train``, CC's ``train.train``, PICI's
``train_one_epoch`` and ``finetune_one_epoch``) on a fixed batch and fixed weights.  Each test here
builds a clusterkit trainer with the plugin settings of the method's paper recipe (only the sizes
are made tiny), loads the same weights, and runs the trainer's own step -- ``on_step_start``,
``compute_losses``, backward, ``before_optimizer_step``, the optimiser step, ``after_step`` --
through the hooks.  It compares, at atol = rtol = 1e-5:

* every loss term (the official weighting: clusterkit's terms sum to the official loss);
* the gradient of every trainable parameter, the backbone's included (taken in the official run
  when its optimiser steps), which shows which tensors each plugin passes with or without
  gradient and how it normalises them;
* the state after the step: every tensor of ``state.model`` (EMA target, online weights after
  SGD, BatchNorm statistics), DigPro's groups and memory bank.

The random draws are the official run's: ``StepCache.randn`` / ``rand`` return the recorded noise
for the salt the official code draws (a plugin that draws under another salt fails with a KeyError
naming it).  The function-level goldens of ``test_golden.py`` stay: they say which function is off.

``test_planted_defect_fails_the_golden`` shows that the comparison catches a plugin that passes a
detached tensor where the official code passes gradients, or normalises a tensor wrongly.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

from clusterkit import StepCache
from clusterkit.data import DatasetInfo, ImageDataset
from clusterkit.hookspecs import PROJECT
from clusterkit.plugin_manager import discover
from clusterkit.recipe import load_raw, load_recipe
from clusterkit.testing import TinyTrainer, synthetic_dataset, tiny_recipe

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"
TOL = {"atol": 1e-5, "rtol": 1e-5}
METHODS = ("propos", "hadis", "digpro", "cc", "pici")
BACKBONE = "clusterkit_golden_convnet"

#: Which state entries are not compared, and why.
NOT_COMPARED = {
    # the predictor only ever runs in train mode, so its running statistics are never read; clusterkit
    # calls it on the same inputs in another order (one call per loss and view, the losses in recipe
    # order), the official code per direction (DigPro: p(q), p(q + noise); HaDis: p(q + noise) twice)
    "digpro": ("predictor.1.running_mean", "predictor.1.running_var"),
    "hadis": ("predictor.1.running_mean", "predictor.1.running_var"),
}


def load(name: str) -> dict:
    return torch.load(GOLDEN / f"{name}.pt", weights_only=True)


# ---------------------------------------------------------------------------------------------
# The harness: the official runs' encoder, 3-channel data, the recorded noise
# ---------------------------------------------------------------------------------------------

class GoldenConvNet(nn.Sequential):
    """Conv3x3-BN-ReLU-Conv3x3(stride 2)-BN-ReLU-avgpool: the harness encoder of make_golden.py (same layout,
    so that the recorded weights load), registered in timm so that the trainer builds it from the recipe."""

    def __init__(self, in_chans: int, hidden: int, width: int):
        super().__init__(nn.Conv2d(in_chans, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
                         nn.Conv2d(hidden, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = width


def _golden_convnet(pretrained: bool = False, num_classes: int = 0, in_chans: int = 3, hidden: int = 6,
                    width: int = 8, **timm_kwargs) -> GoldenConvNet:
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        timm_kwargs.pop(key, None)
    if pretrained or num_classes or timm_kwargs:
        raise TypeError(f"{BACKBONE}: no pretrained weights, no classifier, no arguments {sorted(timm_kwargs)}")
    return GoldenConvNet(in_chans, hidden, width)


if not timm.is_model(BACKBONE):
    _golden_convnet.__name__ = BACKBONE
    register_model(_golden_convnet)


class GoldenTrainer(TinyTrainer):
    """The tiny trainer on 3-channel images (PICI's official patchify takes RGB only)."""

    def load_data(self):
        d = self.recipe.data
        base = synthetic_dataset(self.synthetic_size, self.recipe.e_step.k, d.image_size, self.recipe.run.seed)
        info = DatasetInfo(mean=(0.5,) * 3, std=(0.25,) * 3, hflip=False, channels=3,
                           prepare="built in memory by tests/plugins/test_golden_steps.py")
        ds = ImageDataset("synthetic", "all", base.classes, base.targets, info, base.images.repeat(1, 3, 1, 1))
        return ds, ds


@contextlib.contextmanager
def recorded_noise(noise: dict[str, torch.Tensor]):
    """``StepCache.randn`` / ``rand`` return the official run's draw for each salt."""
    def draw(self, *shape, salt, dtype=None):
        if salt not in noise:
            raise KeyError(f"a plugin draws noise under the salt {salt!r}, but the official step draws only "
                           f"{sorted(noise)}")
        value = noise[salt]
        assert value.shape == (self.batch_size, *shape), (salt, value.shape, shape)
        return value.to(self.state.device, dtype or torch.get_default_dtype())

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StepCache, "randn", draw)
        mp.setattr(StepCache, "rand", draw)
        yield


def recipe_plugins(g: dict) -> dict:
    """The plugin settings of the method's paper recipe, with tiny sizes (and cheap E-steps, whose labels
    the test replaces by the recorded ones)."""
    plugins = copy.deepcopy(load_raw(REPO / g["recipe"])["plugins"])
    s = g["settings"]
    sizes = {"byol_target": {"hidden_dim": s["hidden"], "out_dim": s["out"]},
             "kmeans_e_step": {"n_init": 1, "max_iter": 5},
             "momentum_grouping": {"bank_size": 2 * s["batch"]},
             "contrastive_heads": {"instance_dim": s.get("instance_dim")},
             "partial_self_discrimination": {"decoder_dim": s.get("decoder_embed_dim"),
                                             "decoder_depth": s.get("decoder_depth"),
                                             "decoder_heads": s.get("decoder_num_heads")},
             "cross_level_interaction": {"n_init": 1}}
    for name, params in plugins.items():
        params.update(sizes.get(name, {}))
    return plugins


def golden_trainer(g: dict, tmp_path: Path) -> GoldenTrainer:
    s = g["settings"]
    raw = tiny_recipe(recipe_plugins(g), overrides={
        "data": {"image_size": s["size"], "batch_size": s["batch"]},
        "e_step": {"k": g["num_clusters"]},
        "optim": {"name": "sgd", "lr": s["lr"], "momentum": s["sgd_momentum"], "weight_decay": s["weight_decay"],
                  "lr_scaling": "none"},
        "schedule": {"epochs": 2, "warmup_epochs": 0, "lr_schedule": "constant"}})
    if g["method"] == "pici":
        raw["model"] = {"backbone": "vit_pici_small_patch16_224",
                        "backbone_kwargs": {k: s[k] for k in ("img_size", "patch_size", "embed_dim", "depth",
                                                              "num_heads", "mlp_ratio")}}
        raw["stages"] = [{"name": "train", "until": 1,
                          "plugins": ["partial_self_discrimination", "instance_contrast", "cluster_contrast"]},
                         {"name": "boost", "until": None,
                          "plugins": ["instance_contrast", "cluster_contrast", "cross_level_interaction"]}]
    else:
        raw["model"] = {"backbone": BACKBONE, "backbone_kwargs": {"hidden": s["encoder_hidden"],
                                                                  "width": s["encoder_width"]}}
    trainer = GoldenTrainer(load_recipe(data=raw), tmp_path, available_plugins=discover())
    trainer.build()
    assert trainer.state.num_train == len(g.get("pseudo_labels", range(s["num_train"])))
    missing, unexpected = trainer.state.model.load_state_dict(g["init"], strict=False)
    assert not unexpected, unexpected
    if g["method"] == "pici":      # the fixed sin-cos positions: computed by clusterkit, compared here
        assert sorted(missing) == ["backbone.pos_embed", "pisd_decoder.pos_embed"], missing
    else:
        assert not missing, missing
    return trainer


# ---------------------------------------------------------------------------------------------
# Running clusterkit's step and comparing
# ---------------------------------------------------------------------------------------------

class Mismatches:
    """Collects every value that differs from the official one; ``check`` raises one AssertionError
    listing them (the first line names the first, with its largest difference)."""

    def __init__(self, method: str):
        self.method, self.problems, self.compared = method, [], 0
        self.worst = {"abs": 0.0, "rel": 0.0}

    def close(self, ours, theirs, what: str) -> None:
        ours, theirs = torch.as_tensor(ours).detach().double(), torch.as_tensor(theirs).double()
        self.compared += 1
        if ours.shape != theirs.shape:
            self.problems.append(f"{what}: shape {tuple(ours.shape)}, official {tuple(theirs.shape)}")
            return
        diff = (ours - theirs).abs()
        if diff.numel():
            self.worst["abs"] = max(self.worst["abs"], float(diff.max()))
            # relative to the tensor's scale (an entry near 0 has no meaningful relative error)
            self.worst["rel"] = max(self.worst["rel"], float(diff.max() / theirs.abs().max().clamp_min(1e-12)))
        if not torch.allclose(ours, theirs, **TOL):
            where = int((diff - TOL["rtol"] * theirs.abs()).argmax())
            self.problems.append(f"{what}: differs by up to {float(diff.max()):.3g} (entry {where}: "
                                 f"{float(ours.flatten()[where]):.6g}, official {float(theirs.flatten()[where]):.6g})")

    def same_keys(self, ours: set, theirs: set, what: str) -> None:
        if ours != theirs:
            self.problems.append(f"{what}: only in clusterkit {sorted(ours - theirs)}, only official "
                                 f"{sorted(theirs - ours)}")

    def check(self) -> None:
        if self.problems:
            more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
            raise AssertionError(f"{self.method}: {self.problems[0]}{more}\n" + "\n".join(self.problems[1:]))


def _row_permutation(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor | None:
    """perm with ours[perm[i]] ~ theirs[i] (k-means centres are unordered), or None without a one-to-one match."""
    perm = (F.normalize(theirs, dim=1) @ F.normalize(ours, dim=1).t()).argmax(dim=1)
    return perm if sorted(perm.tolist()) == list(range(ours.shape[0])) else None


def official_terms(terms: dict) -> dict:
    """clusterkit's terms as the official code reports them: CC's ClusterLoss includes the entropy."""
    terms = dict(terms)
    if "cluster_contrast" in terms:
        terms["cluster"] = terms.pop("cluster_contrast") + terms.pop("cluster_entropy")
    return terms


def compare_step(m: Mismatches, where: str, terms: dict, model: nn.Module, rec: dict, state: bool = True,
                 skip: tuple = ()) -> None:
    ours = official_terms({k: v for k, v in terms.items() if k != "loss"})
    m.same_keys(set(ours), set(rec["terms"]), f"{where}: loss terms")
    for name in sorted(set(ours) & set(rec["terms"])):
        m.close(ours[name], rec["terms"][name], f"{where}: loss term {name}")
    m.close(terms["loss"], rec["loss"], f"{where}: total loss")
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    m.same_keys(set(grads), set(rec["grads"]), f"{where}: parameters with a gradient")
    for name in sorted(set(grads) & set(rec["grads"])):
        m.close(grads[name], rec["grads"][name], f"{where}: gradient of {name}")
    if state:
        after = {k: v for k, v in model.state_dict().items() if k not in skip}
        m.same_keys(set(after), set(rec["state"]) - set(skip), f"{where}: state entries")
        for name in sorted(set(after) & set(rec["state"])):
            m.close(after[name], rec["state"][name], f"{where}: {name} after the step")


def run_byol(method: str, tmp_path: Path) -> Mismatches:
    """ProPos, HaDis or DigPro: the recorded steps through the trainer."""
    g = load(f"{method}_train_step")
    trainer = golden_trainer(g, tmp_path)
    state, m = trainer.state, Mismatches(method)
    grouping = trainer.plugins.get("momentum_grouping")
    if grouping is not None:     # the official torch.rand(K, D) init
        grouping.memory.groups.copy_(g["groups_init"])
    trainer.begin_epoch(0)
    state.pseudo_labels = g["pseudo_labels"].to(state.device)
    perm = torch.arange(g["num_clusters"])
    for i, rec in enumerate(g["steps"]):
        trainer.set_lr(i)
        with recorded_noise(rec["noise"]):
            terms = trainer.step(list(rec["views"]), rec["index"])
        where = f"step {i + 1}"
        compare_step(m, where, terms, state.model, rec, skip=NOT_COMPARED.get(method, ()))
        if grouping is not None:
            memory = grouping.memory
            if rec["regrouped"]:
                matched = _row_permutation(memory.groups, rec["groups"])
                if matched is None:
                    m.problems.append(f"{where}: the regrouped centres match the official ones in no order")
                else:
                    perm = matched
            m.close(memory.groups[perm], rec["groups"], f"{where}: group features (up to the regroup's "
                                                          "permutation)")
            m.close(memory.bank, rec["bank"], f"{where}: memory bank")
    return m


def run_cc(tmp_path: Path) -> Mismatches:
    g = load("cc_train_step")
    trainer = golden_trainer(g, tmp_path)
    m = Mismatches("cc")
    trainer.begin_epoch(0)
    trainer.set_lr(0)
    rec = g["steps"][0]
    with recorded_noise(rec["noise"]):
        terms = trainer.step(list(rec["views"]), rec["index"])
    # the official optimiser is Adam, clusterkit's here SGD: compare the gradients and the BatchNorm
    # statistics, not the weights after the step
    compare_step(m, "step", terms, trainer.state.model, rec, state=False)
    buffers = {k: v for k, v in trainer.state.model.named_buffers()}
    m.same_keys(set(buffers), {k for k in rec["state"] if "running" in k or "num_batches" in k}, "buffers")
    for name in sorted(buffers):
        m.close(buffers[name], rec["state"][name], f"step: {name} after the step")
    return m


def run_pici(tmp_path: Path) -> Mismatches:
    g = load("pici_train_step")
    m = Mismatches("pici")
    for stage, epoch in (("train", 0), ("boost", 1)):
        trainer = golden_trainer(g, tmp_path / stage)
        model = trainer.state.model
        m.close(model["backbone"].pos_embed, g["pos_embed"], "encoder position embeddings")
        m.close(model["pisd_decoder"].pos_embed, g["decoder_pos_embed"][:, 1:], "decoder position embeddings")
        trainer.plugins["cross_level_interaction"].labels = g["pseudo_labels"].to(trainer.state.device)
        trainer.begin_epoch(epoch)
        assert trainer.state.stage == stage
        trainer.set_lr(epoch * trainer.state.steps_per_epoch)
        rec = g["scenarios"][stage]
        with recorded_noise(rec["noise"]):
            terms = trainer.step(list(rec["views"]), rec["index"])
        # the official optimiser is Adam: the gradients are compared, not the weights after the step
        compare_step(m, f"{stage} stage", terms, model, rec, state=False)
    return m


def run(method: str, tmp_path: Path) -> Mismatches:
    if method == "cc":
        return run_cc(tmp_path)
    if method == "pici":
        return run_pici(tmp_path)
    return run_byol(method, tmp_path)


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_golden_step_file_names_its_official_source(method):
    path = GOLDEN / f"{method}_train_step.pt"
    assert path.stat().st_size < 300_000
    g = load(f"{method}_train_step")
    assert g["method"] == method and (REPO / g["recipe"]).is_file()
    assert any("@" in v and "/" in v for v in g["source"].values()), g["source"]


def test_recipes_still_set_what_the_golden_steps_ran():
    """The official runs used the paper recipes' values: the recipes still say so."""
    byol = load("propos_train_step")["settings"]
    for method in ("propos", "hadis", "digpro"):
        plugins = load_raw(REPO / load(f"{method}_train_step")["recipe"])["plugins"]
        assert plugins["byol_target"]["momentum"] == byol["momentum"]
        assert plugins["diffused_sampling"]["sigma"] == byol["sigma"]
        assert plugins["prototype_aggregation"]["weight"] == byol["psl_weight"]
        assert plugins["prototype_aggregation"]["temperature"] == byol["psl_temperature"]
    hsd = load_raw(REPO / "recipes/hadis_cifar10.yaml")["plugins"]["hardness_aware_distillation"]
    assert hsd["sigma"] == byol["sigma"]
    mg = load_raw(REPO / "recipes/digpro_cifar10.yaml")["plugins"]["momentum_grouping"]
    assert mg["extra_ema"] is True     # the golden runs the official extra EMA, as every DigPro recipe
    assert (mg["weight"], mg["temperature"], mg["beta"]) == (0.3, 0.1, 0.99)


@pytest.mark.parametrize("method", METHODS)
def test_trainer_step_matches_official_training_step(method, tmp_path):
    m = run(method, tmp_path)
    m.check()
    assert m.compared > 20


def test_digpro_golden_covers_extra_ema_and_a_regroup():
    g = load("digpro_train_step")
    assert [s["regrouped"] for s in g["steps"]] == [False, False, True]
    # the extra EMA moved the target before steps 1 and 2: without it the target after step 1 differs
    init, after = g["init"], g["steps"][0]["state"]
    name = "target_projector.0.weight"
    alpha = g["settings"]["momentum"]
    byol_only = alpha * init[name] + (1 - alpha) * init["projector.0.weight"]
    assert not torch.allclose(after[name], byol_only, **TOL)


# ---------------------------------------------------------------------------------------------
# Planted defects: the comparison above fails when a plugin detaches or normalises wrongly
# ---------------------------------------------------------------------------------------------

class _NoNormalize:
    """torch.nn.functional with F.normalize skipped (a plugin module's ``F``)."""

    def __getattr__(self, name):
        return getattr(F, name)

    @staticmethod
    def normalize(x, *args, **kwargs):
        return x


def _wrap(mp, owner, name: str, make):
    """Replace ``owner.name`` by ``make(original)``; a hook implementation keeps its pluggy marker (a plain
    function would not be registered as the hook at all)."""
    original = getattr(owner, name)
    replacement = make(original)
    marker = f"{PROJECT}_impl"
    if hasattr(original, marker):
        setattr(replacement, marker, getattr(original, marker))
    mp.setattr(owner, name, replacement)


def _plugin_modules() -> dict:
    import clusterkit_plugins.cc.heads as heads
    import clusterkit_plugins.digpro.momentum_grouping as mg
    import clusterkit_plugins.hadis.hardness_aware_distillation as hsd
    import clusterkit_plugins.pici.self_discrimination as pisd
    import clusterkit_plugins.propos.byol_target as bt
    import clusterkit_plugins.propos.diffused_sampling as ds
    import clusterkit_plugins.propos.prototype_aggregation as pa

    return {"heads": heads, "mg": mg, "hsd": hsd, "pisd": pisd, "bt": bt, "ds": ds, "pa": pa}


def _plant_propos(defect: str, mp: pytest.MonkeyPatch, m: dict) -> None:
    pa, ds, bt = m["pa"], m["ds"], m["bt"]
    if defect == "psl_detached_q":          # PSL on q.detach() (official: gradient into q)
        _wrap(mp, pa, "prototype_aggregation_loss", lambda f: lambda q, k, *a, **kw: f(q.detach(), k, *a, **kw))
    elif defect == "psl_unnormalised":      # prototypes of the raw q, k (official: of norm(q), norm(k))
        mp.setattr(pa, "F", _NoNormalize())
    elif defect == "psa_normalised_q":      # noise added to norm(q) (official: to the raw q)
        _wrap(mp, ds, "diffuse", lambda f: lambda q, *a: f(F.normalize(q, dim=1), *a))
    elif defect == "ema_after_step":        # the target moves towards the post-step weights
        _wrap(mp, bt.BYOLTarget, "before_optimizer_step", lambda f: lambda self, state: None)
        _wrap(mp, bt.BYOLTarget, "after_step", lambda f: lambda self, state: self.update_target(state, state.step))
    else:
        raise ValueError(defect)


def _extra_ema_also_on_regroup(mg):
    """The extra EMA also before a regroup iteration (official: skipped there)."""
    def also_on_regroup(f):
        def on_step_start(self, state, cache):
            if self.is_regroup_iteration(state, self.memory.iteration + 1):
                m, momentum = state.model, self.params.extra_ema_momentum
                mg.ema_update(m["target_backbone"], m["backbone"], momentum)
                mg.ema_update(m["target_projector"], m["projector"], momentum)
            f(self, state, cache)
        return on_step_start
    return also_on_regroup


def _plant_digpro(defect: str, mp: pytest.MonkeyPatch, m: dict) -> None:
    mg = m["mg"]
    if defect == "groups_detached":         # G' detached in the loss (official: gradient through G' into q)
        _wrap(mp, mg, "momentum_update", lambda f: lambda *a, **kw: f(*a, **kw).detach())
    elif defect == "groups_unnormalised":   # group logits and assignments without F.normalize
        mp.setattr(mg, "F", _NoNormalize())
    elif defect == "no_extra_ema":          # the old golden's extra_ema: false
        _wrap(mp, mg.MomentumGrouping, "on_step_start", lambda f: lambda self, state, cache: (
            setattr(self.params, "extra_ema", False), f(self, state, cache))[1])
    elif defect == "extra_ema_on_regroup":
        _wrap(mp, mg.MomentumGrouping, "on_step_start", _extra_ema_also_on_regroup(mg))
    else:
        raise ValueError(defect)


def _plant_others(defect: str, mp: pytest.MonkeyPatch, m: dict) -> None:
    hsd, heads, pisd = m["hsd"], m["heads"], m["pisd"]
    if defect == "hsd_detached_student":    # HSD on p(q + noise).detach()
        _wrap(mp, hsd.HardnessAwareDistillation, "student", lambda f: lambda *a: f(*a).detach())
    elif defect == "hsd_unnormalised":      # distances of the raw student and teacher
        mp.setattr(hsd, "F", _NoNormalize())
    elif defect == "cc_instance_detached_h":  # the instance head on h.detach()
        _wrap(mp, heads, "instance_projection", lambda f: lambda head, h: f(head, h.detach()))
    elif defect == "cc_softmax_over_batch":   # c normalised over the batch instead of the clusters
        mp.setattr(heads, "cluster_probabilities", lambda head, h: torch.softmax(head(h).float(), dim=0))
    elif defect == "pisd_detached_tokens":  # the decoder on detached encoder tokens
        _wrap(mp, pisd.MAEDecoder, "forward", lambda f: lambda self, tokens, *a: f(self, tokens.detach(), *a))
    elif defect == "pisd_unnormalised_target":  # the target patches without norm_pix
        _wrap(mp, pisd, "masked_reconstruction_loss", lambda f: lambda p, t, mask, norm_pix=True: f(p, t, mask, False))
    else:
        raise ValueError(defect)


def plant(method: str, defect: str, mp: pytest.MonkeyPatch) -> None:
    """Plant ``defect`` (one of PLANTED) in ``method``'s plugins for the duration of ``mp``."""
    planter = {"propos": _plant_propos, "digpro": _plant_digpro}.get(method, _plant_others)
    planter(defect, mp, _plugin_modules())


PLANTED = [("propos", "psl_detached_q"), ("propos", "psl_unnormalised"), ("propos", "psa_normalised_q"),
           ("propos", "ema_after_step"),
           ("digpro", "groups_detached"), ("digpro", "groups_unnormalised"), ("digpro", "no_extra_ema"),
           ("digpro", "extra_ema_on_regroup"),
           ("hadis", "hsd_detached_student"), ("hadis", "hsd_unnormalised"),
           ("cc", "cc_instance_detached_h"), ("cc", "cc_softmax_over_batch"),
           ("pici", "pisd_detached_tokens"), ("pici", "pisd_unnormalised_target")]


@pytest.mark.parametrize("method,defect", PLANTED)
def test_planted_defect_fails_the_golden(method, defect, tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        plant(method, defect, mp)
        m = run(method, tmp_path)
    with pytest.raises(AssertionError):
        m.check()
