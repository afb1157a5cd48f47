"""clusterkit against golden values taken from the official implementations (issue 13, item 4).

``tests/golden/*.pt`` were written by ``benchmarks/parity/make_golden.py``, which runs the
released ProPos, DigPro, HaDis, Contrastive Clustering and PICI code (see
``tests/golden/README.md``).  Each test loads one file, runs clusterkit's own functions or
plugins on the recorded inputs and compares values, gradients and state at
atol = rtol = 1e-5.  No official code and no network are needed here.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clusterkit import DIRECTIONS, StepCache, TrainState
from clusterkit.recipe import ScheduleConfig, load_recipe
from clusterkit.schema import build
from clusterkit_plugins.cc.cluster_contrast import cluster_contrastive_loss, cluster_entropy_loss
from clusterkit_plugins.cc.instance_contrast import instance_contrastive_loss
from clusterkit_plugins.hadis.hardness_aware_distillation import hardness_aware_distillation_loss
from clusterkit_plugins.pici.cross_level_interaction import cross_level_interaction_loss, matched_targets
from clusterkit_plugins.pici.masked_vit import random_masking
from clusterkit_plugins.pici.self_discrimination import masked_reconstruction_loss, patchify
from clusterkit_plugins.propos.byol_target import BYOLTarget, cosine_momentum
from clusterkit_plugins.propos.diffused_sampling import diffuse, diffused_sampling_loss
from clusterkit_plugins.propos.prototype_aggregation import prototype_aggregation_loss

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
TOL = {"atol": 1e-5, "rtol": 1e-5}
CASES = ("propos_psa", "propos_psl", "digpro_step", "digpro_clock", "hadis_hsd", "cc_losses", "pici_losses",
         "lr_schedule")


def load(name: str) -> dict:
    return torch.load(GOLDEN / f"{name}.pt", weights_only=True)


def close(actual, expected, what: str) -> None:
    """actual == expected at atol = rtol = 1e-5 (dtypes may differ: compared in float64)."""
    actual = torch.as_tensor(actual).detach()
    expected = torch.as_tensor(expected)
    if actual.is_floating_point() or expected.is_floating_point():
        actual, expected = actual.double(), expected.double()
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


def official_predictor(g: dict) -> nn.Module:
    """The BYOL predictor Linear(D, H)-BN(H)-ReLU-Linear(H, D) with the golden weights, in train mode."""
    state = g["predictor_state"]
    hidden, dim = state["0.weight"].shape
    net = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, dim))
    net.load_state_dict(state)
    return net.train()


def leaves(tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


# ---------------------------------------------------------------------------------------------
# The files themselves
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_golden_file_names_its_official_source(name):
    path = GOLDEN / f"{name}.pt"
    assert path.stat().st_size < 200_000
    source = load(name)["source"]
    assert source and all(isinstance(v, str) for v in source.values())
    assert any(re.search(r"[\w-]+/[\w-]+@[0-9a-f]{40} ", v) for v in source.values()), source


# ---------------------------------------------------------------------------------------------
# (a) PSA / diffused sampling, (b) PSL / prototype aggregation: ProPos BYOLWrapper.forward
# ---------------------------------------------------------------------------------------------

def test_diffused_sampling_matches_propos_psa():
    g = load("propos_psa")
    net = official_predictor(g)
    q = leaves(g["q"])
    preds, losses = [], []
    for a, b in DIRECTIONS:
        pred = net(diffuse(q[a], g["sigma"], g["eps"][a]))
        pred.retain_grad()
        preds.append(pred)
        losses.append(diffused_sampling_loss(pred, g["k_raw"][b]))
    loss = torch.stack(losses).mean()
    for d in range(2):
        close(preds[d], g["pred_noisy"][d], f"p(q + sigma eps), direction {d}")
        close(losses[d], g["loss_per_direction"][d], f"loss, direction {d}")
    close(loss, g["loss"], "loss")
    loss.backward()
    for v in range(2):
        close(q[v].grad, g["grad_q"][v], f"dL/dq of view {v}")
        close(preds[v].grad, g["grad_pred_noisy"][v], f"dL/dp, direction {v}")
    for name, param in net.named_parameters():
        close(param.grad, g["grad_predictor"][name], f"dL/d predictor.{name}")


def test_prototype_aggregation_matches_propos_psl_with_absent_clusters():
    g = load("propos_psl")
    assert not bool(g["present"].all())            # the case has clusters absent from the batch
    q = leaves(g["q"])
    losses = [prototype_aggregation_loss(q[a], g["k_raw"][b], g["labels"], g["num_clusters"], g["temperature"])
              for a, b in DIRECTIONS]
    for d in range(2):
        close(losses[d], g["loss_per_direction"][d], f"loss, direction {d}")
    loss = torch.stack(losses).mean()
    close(loss, g["loss"], "loss")
    loss.backward()
    for v in range(2):
        close(q[v].grad, g["grad_q"][v], f"dL/dq of view {v}")
        assert not g["grad_k_raw"][v].any()         # the official k side has no gradient


# ---------------------------------------------------------------------------------------------
# (c) DigPro's momentum grouping, one iteration (lightly 1.4.24 SMoGPrototypes)
# ---------------------------------------------------------------------------------------------

def test_grouping_direction_matches_digpro_smog_step():
    from clusterkit_plugins.digpro.momentum_grouping import grouping_direction

    g = load("digpro_step")
    net = official_predictor(g)
    q = leaves(g["q"])
    groups = g["groups_init"]
    preds, losses = [], []
    for d, (a, b) in enumerate(DIRECTIONS):
        pred = net(q[a])
        pred.retain_grad()
        preds.append(pred)
        loss, new_groups, mu = grouping_direction(q[a], g["k"][b], pred, groups, g["beta"], g["temperature"],
                                                  update_assignment="online")
        close(pred, g["pred"][d], f"p(q), direction {d}")
        close(mu, g["assign_target"][d], f"CE targets mu (argmax cos(k, G)), direction {d}")
        close(new_groups, g["groups_after"][d], f"G after direction {d}")
        close(loss, g["loss_per_direction"][d], f"loss, direction {d}")
        losses.append(loss)
        groups = new_groups.detach()
    loss = torch.stack(losses).mean()
    close(loss, g["loss"], "loss")
    loss.backward()
    for v in range(2):
        close(q[v].grad, g["grad_q"][v], f"dL/dq of view {v} (through p and through G')")
        close(preds[v].grad, g["grad_pred"][v], f"dL/dp(q), direction {v}")
    for name, param in net.named_parameters():
        close(param.grad, g["grad_predictor"][name], f"dL/d predictor.{name}")


# ---------------------------------------------------------------------------------------------
# (d) DigPro's regroup clock and memory bank over 12 iterations, through the plugin's hooks
# ---------------------------------------------------------------------------------------------

def _row_permutation(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """perm with ours[perm[i]] ~ theirs[i] (the k-means centres are unordered)."""
    cos = F.normalize(theirs, dim=1) @ F.normalize(ours, dim=1).t()
    perm = cos.argmax(dim=1)
    assert sorted(perm.tolist()) == list(range(ours.shape[0])), f"no one-to-one match of the centres: {cos}"
    return perm


def test_momentum_grouping_plugin_follows_digpro_clock_and_lightly_bank(monkeypatch):
    import clusterkit_plugins.digpro.momentum_grouping as mg

    g = load("digpro_clock")
    k_groups, batch, dim = g["num_groups"], g["batch"], g["groups_init"].shape[1]
    recipe = load_recipe(data={"e_step": {"k": k_groups}, "run": {"seed": 0, "device": "cpu"}})
    model = nn.ModuleDict({"backbone": nn.Identity(), "projector": nn.Linear(dim, dim),
                           "predictor": official_predictor(g), "target_backbone": nn.Identity(),
                           "target_projector": nn.Linear(dim, dim)})
    n_iters = len(g["iterations"])
    state = TrainState(recipe=recipe, device=torch.device("cpu"), model=model, num_train=batch * n_iters,
                       steps_per_epoch=n_iters)
    params = {"bank_size": g["bank_size"], "beta": g["beta"], "temperature": g["temperature"], "weight": 1.0,
              "update_assignment": "online", "regroup_timing": "start", "bank": "official",
              "regroup_metric": "euclidean", "group_init": "uniform", "extra_ema": False}
    plugin = mg.MomentumGrouping(build(mg.MomentumGrouping.Params, params, "plugins.momentum_grouping"))
    plugin.setup(state)
    memory = plugin.memory
    with torch.no_grad():
        memory.groups.copy_(g["groups_init"])   # the official run's torch.rand init
    regroups = []
    original = mg.regroup
    monkeypatch.setattr(mg, "regroup", lambda bank, num_groups, **kw: (regroups.append((state.step, bank.clone())),
                                                                        original(bank, num_groups, **kw))[1])
    perm = torch.arange(k_groups)
    written = 0
    for rec in g["iterations"]:
        n = rec["n_iter"]
        producers = {"q": lambda cache, v, rec=rec: rec["q"][v],
                     "k": lambda cache, v, rec=rec: F.normalize(rec["k_raw"][v], dim=1)}
        cache = StepCache([torch.zeros(batch, 1), torch.zeros(batch, 1)], torch.arange(batch), producers, state)
        before = len(regroups)
        plugin.on_step_start(state, cache)
        loss = plugin.compute_losses(state, cache)["momentum_grouping"]
        assert (len(regroups) > before) == rec["regrouped"], f"iteration {n}: regrouped {len(regroups) > before}"
        if rec["regrouped"]:
            step, bank = regroups[-1]
            assert step == n - 1, f"regroup of iteration {n} ran after {step} steps (official: at its start)"
            close(bank, rec["bank_regrouped_on"], f"bank regrouped on at iteration {n}")
        close(loss, rec["loss"], f"loss of iteration {n}")
        state.step += 1
        plugin.after_step(state, cache)
        if rec["regrouped"]:
            perm = _row_permutation(memory.groups, rec["groups_after"][1])
        close(memory.groups[perm], rec["groups_after"][1], f"G after iteration {n} (centres up to a permutation)")
        written = min(written + 2 * batch, g["bank_size"])
        close(memory.bank[:written], rec["bank_after"][:written], f"bank after iteration {n}")


# ---------------------------------------------------------------------------------------------
# (e) HaDis HSD
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_hardness_aware_distillation_matches_hadis_hsd(dtype):
    """float64 includes anchors without negatives (their own hardest positive); see the golden's docstring
    in make_golden.py for why those are compared in float64."""
    g = load("hadis_hsd")[dtype]
    (student,) = leaves([g["student"]])
    loss = hardness_aware_distillation_loss(student, g["teacher"], load("hadis_hsd")["temperature"])
    close(loss, g["loss"], "loss")
    loss.backward()
    close(student.grad, g["grad_student"], "dL/d student")


# ---------------------------------------------------------------------------------------------
# (f) CC instance and cluster losses
# ---------------------------------------------------------------------------------------------

def test_instance_contrast_matches_cc_instance_loss():
    g = load("cc_losses")
    h = leaves(g["h"])
    z = [F.normalize(t, dim=1) for t in h]      # contrastive_heads: z = norm(g_I(h))
    loss = instance_contrastive_loss(z[0], z[1], g["instance_temperature"])
    close(loss, g["instance_loss"], "instance loss")
    loss.backward()
    for v in range(2):
        close(h[v].grad, g["grad_h"][v], f"dL/dh of view {v}")


def test_cluster_contrast_and_entropy_match_cc_cluster_loss():
    g = load("cc_losses")
    logits = leaves(g["logits"])
    c = [torch.softmax(t, dim=1) for t in logits]
    loss = (cluster_contrastive_loss(c[0], c[1], g["cluster_temperature"])
            + cluster_entropy_loss(c[0]) + cluster_entropy_loss(c[1]))
    close(loss, g["cluster_loss"], "cluster loss (contrast + entropy terms)")
    loss.backward()
    for v in range(2):
        close(logits[v].grad, g["grad_logits"][v], f"dL/dlogits of view {v}")


# ---------------------------------------------------------------------------------------------
# (g) PICI: masking, PISD, CLI
# ---------------------------------------------------------------------------------------------

def test_random_masking_matches_pici_mae_with_the_same_noise():
    g = load("pici_losses")
    for v in range(2):
        kept, mask, ids_restore = random_masking(g["tokens"][v], g["mask_ratio"], g["noise"][v])
        close(kept, g["kept"][v], f"kept tokens of view {v}")
        close(mask, g["mask"][v], f"mask of view {v}")
        close(ids_restore, g["ids_restore"][v], f"ids_restore of view {v}")


def test_self_discrimination_matches_pici_pisd():
    g = load("pici_losses")
    pred = leaves(g["pred"])
    per_view = []
    for v in range(2):
        target = patchify(g["images"][v], g["patch_size"])
        close(target, g["patches"][v], f"patchify of view {v}")
        per_view.append(masked_reconstruction_loss(pred[v], target, g["mask"][v], norm_pix=True))
        close(per_view[v], g["pisd_per_view"][v], f"PISD of view {v}")
    loss = torch.stack(per_view).mean()
    close(loss, g["pisd_loss"], "PISD loss")
    loss.backward()
    for v in range(2):
        close(pred[v].grad, g["grad_pred"][v], f"dL/dpred of view {v}")


def test_cross_level_interaction_matches_pici_cli_with_double_softmax():
    g = load("pici_losses")
    logits = leaves(g["cli_logits"])
    probs = [torch.softmax(t, dim=1) for t in logits]
    per_view = []
    for v in range(2):
        close(matched_targets(g["cli_pseudo"][v], probs[v]), g["cli_matched"][v], f"matched labels of view {v}")
        per_view.append(cross_level_interaction_loss(probs[v], g["cli_pseudo"][v], double_softmax=True))
        close(per_view[v], g["cli_per_view"][v], f"CLI of view {v}")
    loss = torch.stack(per_view).mean()
    close(loss, g["cli_loss"], "CLI loss")
    loss.backward()
    for v in range(2):
        close(logits[v].grad, g["cli_grad_logits"][v], f"dL/dlogits of view {v}")


# ---------------------------------------------------------------------------------------------
# (h) The lr clock (and the EMA momentum schedule)
# ---------------------------------------------------------------------------------------------

def test_lr_for_step_with_the_official_clock_matches_cosine_annealing_lr():
    from clusterkit.trainer import lr_for_step

    g = load("lr_schedule")
    s = g["schedule"]
    sched = build(ScheduleConfig, {"epochs": s["epochs"], "warmup_epochs": s["warmup_epochs"],
                                   "lr_schedule": "cosine", "cosine_denominator": "total",
                                   "lr_clock": "official"}, "schedule")
    scale = BYOLTarget.Params().predictor_lr_scale
    assert scale == s["lambda_predictor_lr"]
    for n_iter, lr, pred_lr in zip(g["n_iter"], g["lr"], g["predictor_lr"], strict=True):
        ours = lr_for_step(n_iter - 1, s["iter_per_epoch"], sched, s["learning_rate"])
        assert math.isclose(ours, lr, rel_tol=1e-9, abs_tol=1e-12), (n_iter, ours, lr)
        assert math.isclose(ours * scale, pred_lr, rel_tol=1e-9, abs_tol=1e-12), (n_iter, ours * scale, pred_lr)
    assert g["lr"][0] > 0                           # the official first step already has lr > 0


def test_ema_momentum_schedule_matches_official():
    g = load("lr_schedule")
    s = g["schedule"]
    total = s["iter_per_epoch"] * s["epochs"]
    assert all(m == BYOLTarget.Params().momentum for m in g["momentum"])
    # clusterkit: state.step after the step = n_iter
    for n_iter, m in zip(g["n_iter"], g["momentum_increase"], strict=True):
        assert math.isclose(cosine_momentum(s["momentum_base"], n_iter, total), m, rel_tol=1e-12), n_iter
