"""Golden values from the official implementations (issue 13, item 4).

Runs the released code of ProPos, DigPro, HaDis, Contrastive Clustering and PICI from
local git checkouts on small seeded tensors and writes one ``.pt`` file per case to
``--out`` (``tests/golden``).  Each file holds the inputs, the official outputs, the
official gradients with respect to the inputs (and parameters where relevant), the
updated state, and a ``source`` dict naming ``owner/repo@commit`` and the
``file:function`` that produced every value.  ``tests/plugins/test_golden.py`` then runs
clusterkit's own functions on the same inputs and compares, without the official code.

The ``*_train_step`` cases run a whole official training step instead (ProPos, HaDis and DigPro
``BYOL.train``, CC's ``train.py:train``, PICI's ``train_one_epoch`` and ``finetune_one_epoch``) on
a fixed batch and fixed weights of a small encoder, and record the loss terms, the gradient of
every parameter and the state after the step under clusterkit's ``state.model`` names;
``tests/plugins/test_golden_steps.py`` runs a clusterkit trainer's own step through the hooks on
them (see the section "Whole training steps" below).

Usage (a separate virtual environment for the official code, no network needed)::

    /work/official-venv/bin/python benchmarks/parity/make_golden.py \\
        --official /work/official --out tests/golden [--only digpro_train_step ...]

``--official`` is a folder with the checkouts ``ProPos``, ``DigPro``, ``HaDis``,
``Contrastive-Clustering``, ``PICI`` and ``torch_clustering``.  The environment needs
torch, lightly==1.4.24, scikit-learn (1.3.2), scipy, munkres, matplotlib, timm, pyyaml.

The official code is only imported, never modified.  What it needs to run on one CPU
process is set up at run time here: a stand-in ``torch._six`` module, ``Tensor.cuda``
and ``.to('cuda')`` mapped to the CPU, a one-process gloo group (for its all-gathers),
and the backbone/projector of the BYOL wrappers replaced by column slices so that the
online output q and the target output k of every view are given tensors.  Random draws
inside the official code (the diffusion noise, PICI's masking noise) are injected by
temporarily replacing ``torch.randn_like`` / ``torch.rand`` with functions that return
the recorded tensors.  Two import-time shims: ``np.float`` (PICI's pos_embed.py, removed from
numpy) and an empty ``cv2`` module when OpenCV is absent (CC's transform.py imports it; no
golden uses it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import math
import os
import subprocess
import sys
import tempfile
import types
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

#: Package names that the three BYOL-family repositories (and PICI) all use for their own code.
REPO_PACKAGES = ("models", "utils", "network", "torch_clustering", "modules", "evaluation", "train", "train_pici",
                 "cluster_pici")

GITHUB = {"ProPos": "Hzzone/ProPos", "DigPro": "Regan-Zhang/DigPro", "HaDis": "Regan-Zhang/HaDis",
          "Contrastive-Clustering": "Yunfan-Li/Contrastive-Clustering", "PICI": "Regan-Zhang/PICI",
          "torch_clustering": "Hzzone/torch_clustering"}


# ---------------------------------------------------------------------------------------------
# Running the official code on one CPU process
# ---------------------------------------------------------------------------------------------

def install_shims() -> None:
    """Make the official code importable and runnable on a CPU-only, single-process machine."""
    six = types.ModuleType("torch._six")     # removed from torch; the official utils import it
    six.string_classes = (str,)
    six.inf = math.inf
    sys.modules["torch._six"] = six
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    original_to = torch.Tensor.to

    def to_cpu(self, *args, **kwargs):       # PICI's match() ends with .to('cuda')
        args = tuple("cpu" if (isinstance(a, str) and a.startswith("cuda")) else a for a in args)
        if isinstance(kwargs.get("device"), str) and kwargs["device"].startswith("cuda"):
            kwargs["device"] = "cpu"
        return original_to(self, *args, **kwargs)

    torch.Tensor.to = to_cpu
    if "float" not in np.__dict__:           # PICI's utils/pos_embed.py uses np.float (float, removed in numpy 1.24)
        np.float = float
    try:                                     # CC's modules/transform.py imports OpenCV, which no golden uses
        import cv2  # noqa: F401
    except ImportError:
        sys.modules["cv2"] = types.ModuleType("cv2")
    if not dist.is_initialized():            # GatherLayer / concat_all_gather need a process group
        store = os.path.join(tempfile.mkdtemp(prefix="golden-gloo-"), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)


def commit_of(path: Path) -> str:
    return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


class Official:
    """Imports modules of one official checkout (its package names clash with the others')."""

    def __init__(self, root: Path, name: str, extra_paths: tuple[Path, ...] = ()):
        self.name, self.path = name, root / name
        self.repo = f"{GITHUB[name]}@{commit_of(self.path)}"
        self.extra_paths = [str(p) for p in extra_paths]

    @contextlib.contextmanager
    def imported(self, *module_names: str):
        for mod in list(sys.modules):
            if mod.split(".")[0] in REPO_PACKAGES:
                del sys.modules[mod]
        saved = list(sys.path)
        sys.path[:0] = [str(self.path), *self.extra_paths]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield [importlib.import_module(m) for m in module_names]
        finally:
            sys.path[:] = saved

    def src(self, what: str) -> str:
        return f"{self.repo} {what}"


@contextlib.contextmanager
def replaced(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def queue_of(tensors):
    """A stand-in for a random draw: returns the given tensors in order (checks the shape)."""
    pending = list(tensors)

    def draw(like_or_shape, *args, **kwargs):
        value = pending.pop(0)
        shape = like_or_shape.shape if torch.is_tensor(like_or_shape) else torch.Size(
            like_or_shape if isinstance(like_or_shape, (tuple, list)) else (like_or_shape, *args))
        assert value.shape == shape, (value.shape, shape)
        return value.clone()
    draw.pending = pending
    return draw


class Columns(nn.Module):
    """Harness module standing in for an encoder: the columns [lo, hi) of its input."""

    def __init__(self, lo: int, hi: int):
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x):
        return x[:, self.lo:self.hi]


def predictor_state(dim: int, hidden: int, gen: torch.Generator) -> dict:
    """Fixed weights for the official predictor Linear(D,H)-BN(H)-ReLU-Linear(H,D) (not its N(0,0.01)
    init, so that the golden gradients are of a generic size)."""
    return {"0.weight": torch.randn(hidden, dim, generator=gen) / math.sqrt(dim),
            "0.bias": 0.1 * torch.randn(hidden, generator=gen),
            "1.weight": 1.0 + 0.1 * torch.randn(hidden, generator=gen),
            "1.bias": 0.1 * torch.randn(hidden, generator=gen),
            "1.running_mean": torch.zeros(hidden), "1.running_var": torch.ones(hidden),
            "1.num_batches_tracked": torch.zeros((), dtype=torch.long),
            "3.weight": torch.randn(dim, hidden, generator=gen) / math.sqrt(hidden),
            "3.bias": 0.1 * torch.randn(dim, generator=gen)}


def byol_wrapper(cls, num_cluster: int, dim: int, hidden: int, pred_state: dict, latent_std: float,
                 temperature: float = 0.5):
    """The official BYOLWrapper with q = input[:, :D] and k = norm(input[:, D:]) (slices for the networks).

    The wrapper's own predictor (its Linear-BN-ReLU-Linear) is kept, with ``pred_state`` loaded.
    """
    w = cls(nn.Identity(), num_cluster=num_cluster, in_dim=dim, temperature=temperature, hidden_size=hidden,
            fea_dim=dim, symmetric=True, shuffling_bn=False, latent_std=latent_std)
    w.encoder_q, w.projector_q = Columns(0, dim), nn.Identity()
    w.encoder_k, w.projector_k = Columns(dim, 2 * dim), nn.Identity()
    w.q_params, w.k_params = [], []
    w.predictor.load_state_dict(pred_state)
    w.train()
    return w


class Recorder(nn.Module):
    """Wraps the official predictor: records every output (with retain_grad) in call order."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.outputs = inner, []

    def forward(self, x):
        y = self.inner(x)
        y.retain_grad()
        self.outputs.append(y)
        return y


def grads(loss, tensors):
    return [g if g is not None else torch.zeros_like(t)
            for g, t in zip(torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True), tensors,
                            strict=True)]


# ---------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------

def case_propos(root: Path) -> dict[str, dict]:
    """(a) PSA with the diffusion noise and (b) PSL with absent clusters, from ProPos's symmetric forward."""
    off = Official(root, "ProPos", (root / "torch_clustering",))
    with off.imported("models.propos.byol_wrapper") as (bw,):
        gen = torch.Generator().manual_seed(1)
        B, D, H, K, sigma = 24, 16, 32, 6, 0.1
        q = [torch.randn(B, D, generator=gen) for _ in range(2)]           # raw online outputs q_v
        k_raw = [torch.randn(B, D, generator=gen) for _ in range(2)]       # raw target outputs
        labels = torch.tensor([0, 1, 2, 4])[torch.randint(0, 4, (B,), generator=gen)]   # 3 and 5 absent
        labels[:4] = torch.tensor([0, 1, 2, 4])
        eps = [torch.randn(B, D, generator=gen) for _ in range(2)]         # noise of direction 1 (view 0), 2
        pstate = predictor_state(D, H, gen)
        w = byol_wrapper(bw.BYOLWrapper, K, D, H, pstate, latent_std=sigma)
        w.psedo_labels = labels.clone()
        w.predictor = Recorder(w.predictor)
        x = [torch.cat([q[v], k_raw[v]], 1).requires_grad_(True) for v in range(2)]
        per_dir = []
        original = w.forward_loss

        def forward_loss(*args, **kwargs):
            out = original(*args, **kwargs)
            per_dir.append(out)
            return out
        w.forward_loss = forward_loss
        with replaced(torch, "randn_like", queue_of(eps)):
            psa, psl, q_all = w.forward(x[0], x[1], torch.arange(B), momentum_update=False)
        params = list(w.predictor.inner.parameters())
        g_psa = grads(psa, x + params)
        g_psl = grads(psl, x)
        pred_noisy = [w.predictor.outputs[0], w.predictor.outputs[1]]
        g_psa_pred = grads(psa, pred_noisy)
        names = [n for n, _ in w.predictor.inner.named_parameters()]
        k = [F.normalize(k_raw[v], dim=1) for v in range(2)]
        common = {"q": q, "k_raw": k_raw, "k": k, "predictor_state": pstate, "hidden": H}
        src = {"psa": off.src("models/propos/byol_wrapper.py:BYOLWrapper.forward (forward_loss: contrastive_loss)"),
               "psl": off.src("models/propos/byol_wrapper.py:BYOLWrapper.forward (forward_loss: compute_centers,"
                              " compute_cluster_loss)"),
               "k": off.src("models/propos/byol_wrapper.py:BYOLWrapper.forward_k (normalize)"),
               "grads": "torch.autograd.grad of the official losses above",
               "noise": "injected for torch.randn_like in forward_loss, in call order (direction 1, 2)",
               "harness": "encoder_q/projector_q = columns [0, D) (q raw), encoder_k/projector_k = columns [D, 2D) "
                          "(k = norm), shuffling_bn False, one gloo process"}
        psa_case = {**common, "sigma": sigma, "eps": eps,
                    "loss": psa.detach(), "loss_per_direction": [d[0].detach() for d in per_dir],
                    "pred_noisy": [p.detach() for p in pred_noisy],
                    "grad_q": [g[:, :D] for g in g_psa[:2]], "grad_k_raw": [g[:, D:] for g in g_psa[:2]],
                    "grad_pred_noisy": g_psa_pred,
                    "grad_predictor": dict(zip(names, g_psa[2:], strict=True)), "directions": [(0, 1), (1, 0)],
                    "source": {**src, "case": "PSA / diffused sampling, -2 cos(p(q + sigma eps), k), mean of the "
                                              "two directions (view 0 online first)"}}
        psl_case = {"q": q, "k_raw": k_raw, "k": k, "labels": labels, "num_clusters": K, "temperature": 0.5,
                    "loss": psl.detach(), "loss_per_direction": [d[1].detach() for d in per_dir],
                    "present": torch.bincount(labels, minlength=K) > 0,
                    "grad_q": [g[:, :D] for g in g_psl], "grad_k_raw": [g[:, D:] for g in g_psl],
                    "directions": [(0, 1), (1, 0)],
                    "source": {**src, "case": "PSL / prototype aggregation, clusters 3 and 5 absent; k has no "
                                              "gradient in the official graph (forward_k runs under no_grad)"}}
        return {"propos_psa": psa_case, "propos_psl": psl_case}


def _digpro_module(root: Path):
    return Official(root, "DigPro")


def case_digpro_step(root: Path) -> dict:
    """(c) One iteration of DigPro's forward: SMoG grouping in both directions (iteration 1, no regroup)."""
    off = _digpro_module(root)
    with off.imported("models.propos.byol_wrapper") as (bw,):
        gen = torch.Generator().manual_seed(2)
        B, D, H, K = 24, 16, 32, 5
        q = [torch.randn(B, D, generator=gen) for _ in range(2)]
        k_raw = [torch.randn(B, D, generator=gen) for _ in range(2)]
        labels = torch.randint(0, K, (B,), generator=gen)
        pstate = predictor_state(D, H, gen)
        torch.manual_seed(20)                          # the official init torch.rand(K, 256) uses the global RNG
        w = byol_wrapper(bw.BYOLWrapper, K, D, H, pstate, latent_std=0.0)
        w.psedo_labels = labels.clone()
        g0 = w.smog.group_features.detach().clone()
        # assignments, for the record: by the target (the CE target) and by the online q (the update)
        mu = [w.smog.assign_groups(F.normalize(k_raw[1], dim=1))]
        online = [w.smog.assign_groups(q[0])]
        w.predictor = Recorder(w.predictor)
        set_calls, per_dir = [], []
        original_set = w.smog.set_group_features

        def set_group_features(x):
            set_calls.append(x.detach().clone())
            original_set(x)
            if len(set_calls) == 1:                    # direction 2 assigns with G after direction 1
                mu.append(w.smog.assign_groups(F.normalize(k_raw[0], dim=1)))
                online.append(w.smog.assign_groups(q[1]))
        w.smog.set_group_features = set_group_features
        original_fl = w.forward_loss

        def forward_loss(*args, **kwargs):
            out = original_fl(*args, **kwargs)
            per_dir.append(out)
            return out
        w.forward_loss = forward_loss
        x = [torch.cat([q[v], k_raw[v]], 1).requires_grad_(True) for v in range(2)]
        psa, psl, q_all, smog = w.forward(x[0], x[1], torch.arange(B), n_iter=1, momentum_update=False)
        # predictor calls per direction: p(q) for SMoG, then p(q + noise) for PSA
        pred = [w.predictor.outputs[0], w.predictor.outputs[2]]
        params = list(w.predictor.inner.parameters())
        names = [n for n, _ in w.predictor.inner.named_parameters()]
        g = grads(smog, x + pred + params)
        return {"q": q, "k_raw": k_raw, "k": [F.normalize(v, dim=1) for v in k_raw], "predictor_state": pstate,
                "hidden": H, "num_groups": K, "beta": 0.99, "temperature": 0.1,
                "groups_init": g0, "groups_after": set_calls, "assign_target": mu, "assign_online": online,
                "pred": [p.detach() for p in pred],
                "loss": smog.detach(), "loss_per_direction": [d[4].detach() for d in per_dir],
                "grad_q": [gg[:, :D] for gg in g[:2]], "grad_pred": g[2:4],
                "grad_predictor": dict(zip(names, g[4:], strict=True)), "directions": [(0, 1), (1, 0)],
                "source": {"loss": off.src("models/propos/byol_wrapper.py:BYOLWrapper.forward -> forward_loss "
                                           "(SMoG block: smog.assign_groups(k), smog.get_updated_group_features(q), "
                                           "smog(predictor(q), G', temperature=0.1), set_group_features, "
                                           "CrossEntropyLoss)"),
                           "lightly": "lightly==1.4.24 lightly/models/modules/heads.py:SMoGPrototypes",
                           "groups_init": off.src("models/propos/byol_wrapper.py:BYOLWrapper.__init__ "
                                                  "(torch.rand(K, fea_dim) after torch.manual_seed(20))"),
                           "groups_after": "argument of each smog.set_group_features call (direction 1, 2)",
                           "grads": "torch.autograd.grad of the official smog_loss (mean of the directions)",
                           "harness": "q = columns [0, D), k = norm(columns [D, 2D)), n_iter = 1"}}


def case_digpro_clock(root: Path) -> dict:
    """(d) The regroup clock and lightly's memory bank over 12 iterations of DigPro's forward.

    K = 5 well separated directions; 3 samples a step (6 bank rows: view 0's then view 1's);
    the bank (lightly MemoryBankModule, hard-coded 2560 in the official code) is given 20
    entries here so that it wraps within the run, mid-batch at iteration 4 and 8.
    """
    off = _digpro_module(root)
    with off.imported("models.propos.byol_wrapper") as (bw,):
        from lightly.loss.memory_bank import MemoryBankModule
        gen = torch.Generator().manual_seed(3)
        B, D, H, K, n_iters, bank_size = 3, 8, 16, 5, 12, 20
        directions = torch.eye(D)[:K] * 3.0
        pstate = predictor_state(D, H, gen)
        torch.manual_seed(30)
        w = byol_wrapper(bw.BYOLWrapper, K, D, H, pstate, latent_std=0.0)
        w.memory_bank = MemoryBankModule(size=bank_size)
        w.psedo_labels = torch.zeros(B * n_iters, dtype=torch.long)
        g0 = w.smog.group_features.detach().clone()
        records = []
        regroup_calls = []
        original_reset = w.reset_group_features

        def reset_group_features(memory_bank):
            regroup_calls.append(memory_bank.bank.detach().clone())
            original_reset(memory_bank)
        w.reset_group_features = reset_group_features
        for n in range(1, n_iters + 1):
            cl = torch.tensor([(3 * n + j) % K for j in range(B)])
            qs = [directions[cl] + 0.05 * torch.randn(B, D, generator=gen) for _ in range(2)]
            ks = [directions[cl] + 0.3 * torch.randn(B, D, generator=gen) for _ in range(2)]
            bank_before = w.memory_bank.bank.detach().clone()
            ptr_before = int(w.memory_bank.bank_ptr) if w.memory_bank.bank_ptr.numel() else 0
            sets = []
            original_set = w.smog.set_group_features

            def set_group_features(xx, _sets=sets, _orig=original_set):
                _sets.append(xx.detach().clone())
                _orig(xx)
            w.smog.set_group_features = set_group_features
            n_calls = len(regroup_calls)
            x = [torch.cat([qs[v], ks[v]], 1) for v in range(2)]
            g_start = None

            original_fl = type(w).forward_loss.__get__(w)

            def capture_start(*args, _original_fl=original_fl, **kwargs):
                nonlocal g_start
                if g_start is None:
                    g_start = w.smog.group_features.detach().clone()
                return _original_fl(*args, **kwargs)
            w.forward_loss = capture_start
            psa, psl, q_all, smog = w.forward(x[0], x[1], torch.arange(B * (n - 1), B * n), n_iter=n,
                                              momentum_update=False)
            del w.forward_loss
            w.smog.set_group_features = original_set
            regrouped = len(regroup_calls) > n_calls
            records.append({"n_iter": n, "q": [t.clone() for t in qs], "k_raw": [t.clone() for t in ks],
                            "clusters": cl, "regrouped": regrouped,
                            "bank_before": bank_before.t().contiguous() if bank_before.numel() else bank_before,
                            "ptr_before": ptr_before,
                            "bank_regrouped_on": regroup_calls[-1].t().contiguous() if regrouped else None,
                            "groups_start": g_start, "groups_after": sets[-2:], "loss": smog.detach(),
                            "bank_after": w.memory_bank.bank.detach().t().contiguous(),
                            "ptr_after": int(w.memory_bank.bank_ptr)})
        return {"num_groups": K, "beta": 0.99, "temperature": 0.1, "bank_size": bank_size, "batch": B,
                "predictor_state": pstate, "hidden": H, "groups_init": g0, "iterations": records,
                "note": "banks are stored as (entries, D) rows (lightly keeps (D, entries)); bank_before of "
                        "iteration 1 is empty: lightly creates the bank at its first call, with normalised "
                        "randn columns; k-means centres are unseeded sklearn KMeans, compare up to a permutation",
                "source": {"clock": off.src("models/propos/byol_wrapper.py:BYOLWrapper.forward (n_iter > 1 and "
                                            "n_iter % num_cluster == 0 -> reset_group_features(memory_bank) "
                                            "before the losses; memory_bank(q, update=True) after them)"),
                           "regroup": off.src("models/propos/byol_wrapper.py:BYOLWrapper._cluster_features "
                                              "(sklearn KMeans(num_cluster) on bank.t(), normalised centres)"),
                           "bank": "lightly==1.4.24 lightly/loss/memory_bank.py:MemoryBankModule "
                                   "(size 20 here instead of the official 2560)",
                           "smog": "lightly==1.4.24 lightly/models/modules/heads.py:SMoGPrototypes",
                           "harness": "q = columns [0, D), k = norm(columns [D, 2D)), momentum_update False"}}


def case_hadis(root: Path) -> dict:
    """(e) HaDis's HSD loss on (teacher k, student p(q)), in float32 and float64.

    float32: generic rows.  float64: the same plus rows 0-2 with the student opposite to the
    teacher, so that these anchors have no negative and are their own hardest positive.  There the
    official distance formula sqrt(clamp(|t|^2 + |t|^2 - 2 t.t, 1e-12)) gives D_t[i, i] of the size
    of sqrt(rounding error) instead of 0 (up to ~6e-4 in float32, 1e-6 = the clamp in float64), and
    w_p = D[i, i] - D_t[i, i] inherits it: float64 keeps that artefact below the tolerance.
    """
    off = Official(root, "HaDis")
    with off.imported("models.propos.byol_wrapper") as (bw,):
        gen = torch.Generator().manual_seed(4)
        B, D = 24, 16
        teacher = torch.randn(B, D, generator=gen)
        student = torch.randn(B, D, generator=gen)
        opposite = -F.normalize(teacher[:3], dim=1) * 2.0 + 0.01 * torch.randn(3, D, generator=gen)
        out = {"temperature": 0.5}
        for tag, dtype, stud in (("float32", torch.float32, student),
                                 ("float64", torch.float64, torch.cat([opposite, student[3:]]))):
            s = stud.to(dtype).clone().requires_grad_(True)
            loss = bw.HSD(tau=0.5)(F.normalize(teacher.to(dtype), dim=1), s)
            (g,) = grads(loss, [s])
            out[tag] = {"teacher": teacher.to(dtype), "student": stud.to(dtype), "loss": loss.detach(),
                        "grad_student": g}
        out["source"] = {"loss": off.src("models/propos/byol_wrapper.py:HSD.forward (teacher = norm(k) as "
                                         "forward_loss passes it, student = raw predictor output)"),
                         "grads": "torch.autograd.grad of the official loss; the teacher has no gradient in "
                                  "the official graph"}
        return out


def case_cc(root: Path) -> dict:
    """(f) CC InstanceLoss (tau 0.5) and ClusterLoss (tau 1.0, with the entropy term)."""
    off = Official(root, "Contrastive-Clustering")
    with off.imported("modules.contrastive_loss") as (cl,):
        gen = torch.Generator().manual_seed(5)
        B, Dz, K = 16, 8, 4
        h = [torch.randn(B, Dz, generator=gen).requires_grad_(True) for _ in range(2)]
        logits = [(1.5 * torch.randn(B, K, generator=gen)).requires_grad_(True) for _ in range(2)]
        z = [F.normalize(t, dim=1) for t in h]                        # modules/network.py: normalize(..., dim=1)
        c = [torch.softmax(t, dim=1) for t in logits]                 # modules/network.py: nn.Softmax(dim=1)
        inst = cl.InstanceLoss(B, 0.5, "cpu")(z[0], z[1])
        clus = cl.ClusterLoss(K, 1.0, "cpu")(c[0], c[1])
        return {"h": [t.detach() for t in h], "logits": [t.detach() for t in logits],
                "z": [t.detach() for t in z], "c": [t.detach() for t in c],
                "instance_temperature": 0.5, "cluster_temperature": 1.0,
                "instance_loss": inst.detach(), "cluster_loss": clus.detach(),
                "grad_h": grads(inst, h), "grad_logits": grads(clus, logits),
                "source": {"instance_loss": off.src("modules/contrastive_loss.py:InstanceLoss.forward"),
                           "cluster_loss": off.src("modules/contrastive_loss.py:ClusterLoss.forward (contrast + "
                                                   "log K - H(P) per view)"),
                           "inputs": off.src("modules/network.py:Network.forward (z = normalize(h), "
                                             "c = Softmax(logits))"),
                           "grads": "w.r.t. the pre-normalisation h and the pre-softmax logits"}}


def case_pici(root: Path) -> dict:
    """(g) PICI: PISD (masked normalised-pixel MSE, MAE forward_loss), random masking with given noise, and
    CLI (Hungarian match of k-means labels onto the head's argmax, CE on the softmax outputs)."""
    off = Official(root, "PICI")
    with off.imported("modules.models_mae", "modules.cross_level_interaction") as (mae, cli):
        gen = torch.Generator().manual_seed(6)
        B, C, S, p = 4, 3, 8, 4
        L, P = (S // p) ** 2, p * p * C
        MAE = mae.MaskedAutoencoderViT
        stub = types.SimpleNamespace(norm_pix_loss=True, patch_embed=types.SimpleNamespace(patch_size=(p, p)))
        stub.patchify = types.MethodType(MAE.patchify, stub)
        imgs = [torch.randn(B, C, S, S, generator=gen) for _ in range(2)]
        noise = [torch.rand(B, L, generator=gen) for _ in range(2)]
        tokens = [torch.randn(B, L, 5, generator=gen) for _ in range(2)]
        masking = []
        with replaced(torch, "rand", queue_of(noise)):
            for v in range(2):
                kept, mask, ids_restore = MAE.random_masking(stub, tokens[v], 0.5)
                masking.append({"kept": kept, "mask": mask, "ids_restore": ids_restore})
        pred = [torch.randn(B, L, P, generator=gen).requires_grad_(True) for _ in range(2)]
        per_view = [MAE.forward_loss(stub, imgs[v], pred[v], masking[v]["mask"]) for v in range(2)]
        pisd = (per_view[0] + per_view[1]) / 2                       # train_pici.py: (loss_1 + loss_2) / 2
        # CLI: a head whose argmax is known, k-means labels = a renaming of it with some noise
        N, K = 32, 5
        head_labels = torch.arange(N) % K
        logits = [(2.0 * F.one_hot(head_labels, K) + 0.5 * torch.randn(N, K, generator=gen)).requires_grad_(True)
                  for _ in range(2)]
        probs = [torch.softmax(t, dim=1) for t in logits]             # modules/network.py cluster_projector Softmax
        rename = torch.tensor([2, 0, 4, 1, 3])
        pseudo = []
        for v in range(2):
            y = rename[probs[v].detach().argmax(1)].clone()
            flip = torch.rand(N, generator=gen) < 0.2
            y[flip] = torch.randint(0, K, (int(flip.sum()),), generator=gen)
            pseudo.append(y)
        matched = [cli.match(pseudo[v].numpy(), probs[v].detach().argmax(1).numpy()) for v in range(2)]
        ce = [nn.CrossEntropyLoss()(probs[v], matched[v]) for v in range(2)]
        cli_loss = (ce[0] + ce[1]) / 2                                 # train_pici.py finetune_one_epoch
        return {"images": imgs, "patch_size": p, "mask_ratio": 0.5, "noise": noise, "tokens": tokens,
                "kept": [m["kept"] for m in masking], "mask": [m["mask"] for m in masking],
                "ids_restore": [m["ids_restore"] for m in masking],
                "patches": [stub.patchify(t) for t in imgs],
                "pred": [t.detach() for t in pred], "pisd_per_view": [t.detach() for t in per_view],
                "pisd_loss": pisd.detach(), "grad_pred": grads(pisd, pred),
                "cli_logits": [t.detach() for t in logits], "cli_probs": [t.detach() for t in probs],
                "cli_pseudo": pseudo, "cli_matched": matched, "cli_per_view": [t.detach() for t in ce],
                "cli_loss": cli_loss.detach(), "cli_grad_logits": grads(cli_loss, logits),
                "source": {"pisd": off.src("modules/models_mae.py:MaskedAutoencoderViT.forward_loss "
                                           "(norm_pix_loss=True as train_pici.py builds it), patchify"),
                           "masking": off.src("modules/models_mae.py:MaskedAutoencoderViT.random_masking "
                                              "(torch.rand replaced by the recorded noise)"),
                           "pisd_mean": off.src("train_pici.py:train_one_epoch ((loss_1 + loss_2) / 2)"),
                           "cli_matched": off.src("modules/cross_level_interaction.py:match(pseudo, head argmax)"),
                           "cli_loss": off.src("train_pici.py:finetune_one_epoch (CrossEntropyLoss on the softmax "
                                               "outputs c, mean of the views)"),
                           "grads": "w.r.t. the decoder prediction and the pre-softmax head logits"}}


def case_lr(root: Path) -> dict:
    """(h) DigPro/ProPos's lr clock: cosine_annealing_LR(n_iter), n_iter = 1..; predictor lr x10; EMA momentum."""
    sched = {"iter_per_epoch": 3, "epochs": 10, "warmup_epochs": 2, "learning_rate": 0.1, "learning_eta_min": 0.0,
             "lambda_predictor_lr": 10.0, "momentum_base": 0.996, "momentum_max": 1.0}
    out = {"schedule": sched, "n_iter": list(range(1, sched["iter_per_epoch"] * sched["epochs"] + 1))}
    offs = {"DigPro": Official(root, "DigPro"), "ProPos": Official(root, "ProPos", (root / "torch_clustering",))}
    for name, off in offs.items():
        with off.imported("models.propos.byol") as (byol,):
            for increase in (False, True):
                opt = types.SimpleNamespace(fix_predictor_lr=False, momentum_increase=increase,
                                            **{k: v for k, v in sched.items() if k != "iter_per_epoch"})
                groups = [{"name": "predictor"}, {"name": "default"}]
                task = types.SimpleNamespace(opt=opt, iter_per_epoch=sched["iter_per_epoch"],
                                             optimizer=types.SimpleNamespace(param_groups=groups),
                                             byol=types.SimpleNamespace(module=types.SimpleNamespace(m=None)),
                                             logger=types.SimpleNamespace(msg=lambda *a, **k: None))
                task.cosine_annealing_LR = types.MethodType(byol.BYOL.cosine_annealing_LR, task)
                lrs, pred_lrs, moms = [], [], []
                for n in out["n_iter"]:
                    byol.BYOL.adjust_learning_rate(task, n)
                    lrs.append(float(groups[1]["lr"]))
                    pred_lrs.append(float(groups[0]["lr"]))
                    moms.append(float(task.byol.module.m))
                if name == "DigPro":
                    out["lr"], out["predictor_lr"] = lrs, pred_lrs
                    out["momentum_increase" if increase else "momentum"] = moms
                else:   # ProPos's clock is the same code: check it
                    assert lrs == out["lr"] and pred_lrs == out["predictor_lr"], name
                    assert moms == out["momentum_increase" if increase else "momentum"], name
    out["source"] = {"lr": offs["DigPro"].src("models/basic_template.py:TrainTask.cosine_annealing_LR via "
                                              "models/propos/byol.py:BYOL.adjust_learning_rate; n_iter counted "
                                              "from 1 (basic_template.py:TrainTask.fit)"),
                     "check": offs["ProPos"].src("models/propos/byol.py:BYOL.adjust_learning_rate gives the "
                                                 "same values"),
                     "momentum_increase": offs["DigPro"].src("models/propos/byol.py:BYOL.adjust_learning_rate "
                                                             "(momentum_increase True)")}
    return out


# ---------------------------------------------------------------------------------------------
# Whole training steps through the official code (issue 25, item 4: goldens through the plugins)
# ---------------------------------------------------------------------------------------------
#
# The cases below run the official training step itself -- ProPos/HaDis/DigPro ``BYOL.train``
# (the wrapper's forward with its EMA, DigPro's extra EMA, SMoG groups and memory bank, the loss
# weighting, backward and the official SGD), CC's ``train.train`` and PICI's
# ``train_pici.train_one_epoch`` / ``finetune_one_epoch`` -- on a fixed batch and fixed weights,
# and record the loss terms, the gradient of every trainable parameter (taken when the official
# optimiser steps), and the state after the step.  Every tensor is stored under the name it has in
# clusterkit's ``state.model`` (``STEP_NAMES`` maps the official module names), so that
# ``tests/plugins/test_golden_steps.py`` can load the weights into a clusterkit trainer, run its
# own step through the hooks and compare.  The encoder is a harness module (``GoldenConvNet``; PICI:
# the official MAE at a tiny size); everything method-specific is the official code's.

#: Sizes of the step goldens: batch, image side, channels, width of the harness encoder, hidden and
#: output width of the BYOL heads, training-set size (``clusterkit.testing.TinyTrainer``'s 256).
STEP = {"batch": 12, "size": 8, "channels": 3, "encoder_hidden": 6, "encoder_width": 8, "hidden": 16, "out": 8,
        "num_train": 256, "lr": 0.1, "sgd_momentum": 0.9, "weight_decay": 5e-4, "predictor_lr_scale": 10.0}

#: Official module prefixes of the BYOL wrappers -> clusterkit's state.model keys (byol_target).
BYOL_NAMES = {"encoder_q.": "backbone.", "projector_q.": "projector.", "predictor.": "predictor.",
              "encoder_k.": "target_backbone.", "projector_k.": "target_projector."}
#: Official CC Network -> clusterkit (contrastive_heads).
CC_NAMES = {"resnet.": "backbone.", "instance_projector.": "instance_head.", "cluster_projector.": "cluster_head."}
#: Official PICI Network_mae -> clusterkit (masked_vit's backbone, partial_self_discrimination's decoder,
#: contrastive_heads); the fixed position embeddings are compared, not loaded (clusterkit computes them).
PICI_NAMES = {"mae.decoder_embed.": "pisd_decoder.embed.", "mae.mask_token": "pisd_decoder.mask_token",
              "mae.decoder_blocks.": "pisd_decoder.blocks.", "mae.decoder_norm.": "pisd_decoder.norm.",
              "mae.decoder_pred.": "pisd_decoder.pred.", "mae.pos_embed": None, "mae.decoder_pos_embed": None,
              "mae.": "backbone.", "instance_projector.": "instance_head.", "cluster_projector.": "cluster_head."}


class GoldenConvNet(nn.Sequential):
    """Harness encoder of the step goldens: Conv3x3-BN-ReLU-Conv3x3(stride 2)-BN-ReLU-avgpool, (B, C, S, S) ->
    (B, width).  Not method code: the official wrappers take any encoder (BYOLWrapper's ``encoder``, CC's
    ``resnet`` with its ``rep_dim``); the clusterkit test registers the same layout in timm and loads the
    recorded weights into it."""

    def __init__(self, in_chans: int, hidden: int, width: int):
        super().__init__(nn.Conv2d(in_chans, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
                         nn.Conv2d(hidden, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = self.rep_dim = width


def renamed(named, names: dict) -> dict:
    """{clusterkit name: tensor} from official (name, tensor) pairs; names under no prefix (or a None
    prefix) are left out."""
    out = {}
    for name, value in named:
        for prefix, ours in names.items():
            if name.startswith(prefix):
                if ours is not None:
                    out[ours + name[len(prefix):]] = value.detach().clone()
                break
    return out


@torch.no_grad()
def perturb(module: nn.Module, gen: torch.Generator, scale: float = 0.2) -> None:
    """Move every parameter off its initial value (BN weights 1 / biases 0 give special gradients) and
    give the BN running statistics generic values, so that the recorded state is not a special case."""
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen))
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(1.0 + 0.2 * torch.rand(m.running_var.shape, generator=gen))


def step_batch(gen: torch.Generator, classes: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Two views (B, C, S, S) of B images of ``classes`` well separated patterns (so that DigPro's regrouping
    k-means has one clear optimum) and their dataset indices (B distinct of the training set)."""
    B, C, S = STEP["batch"], STEP["channels"], STEP["size"]
    patterns = 1.5 * torch.randn(classes, C, S, S, generator=gen)
    members = torch.arange(B) % classes
    views = [patterns[members] + 0.3 * torch.randn(B, C, S, S, generator=gen) for _ in range(2)]
    return views, torch.randperm(STEP["num_train"], generator=gen)[:B]


def recorded(store: dict, name: str, fn):
    """``fn`` (an official loss module), with each result kept as ``store[name]``."""
    def call(*args):
        store[name] = fn(*args)
        return store[name]
    return call


class Solo(nn.Module):
    """Stands in for the DistributedDataParallel wrapper of the official BYOL task (``task.byol.module``);
    records the outputs of every forward."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module, self.outputs = module, []

    def forward(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        self.outputs.append(out)
        return out


def recording_step(optimizer, model: nn.Module, record: list) -> None:
    """Make ``optimizer.step`` first record the gradient of every parameter of ``model`` (the official loops
    zero them right after stepping)."""
    real_step = optimizer.step

    def step(*args, **kwargs):
        record.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        return real_step(*args, **kwargs)
    optimizer.step = step


#: ProPos / HaDis / DigPro step goldens: which official checkout, K, the pseudo-labels present in the
#: batch, the number of steps, and the recipe whose plugin settings the test runs.
BYOL_CASES = {
    "propos": {"repo": "ProPos", "K": 5, "present": [0, 1, 2, 4], "steps": 1, "seed": 11,
               "recipe": "recipes/propos_cifar10.yaml"},
    "hadis": {"repo": "HaDis", "K": 4, "present": [0, 1, 3], "steps": 1, "seed": 12,
              "recipe": "recipes/hadis_cifar10.yaml"},
    # K = 3 and three steps: iterations 1 and 2 apply the extra EMA, iteration 3 regroups (n % K == 0)
    # and skips it; the bank holds exactly one step (2B rows), so iteration 3 regroups on iteration 2's q
    "digpro": {"repo": "DigPro", "K": 3, "present": [0, 1, 2], "steps": 3, "seed": 13,
               "recipe": "recipes/digpro_cifar10.yaml"},
}
#: The recipe values the official runs use (the test checks that the recipes still say so): EMA
#: momentum, sigma of the diffusion (DSA and HSD), PSL weight and temperature; DigPro's group loss
#: weight 0.3, temperature 0.1 and beta 0.99 and its extra EMA 0.99 are hard-coded in the official code.
BYOL_SETTINGS = {"momentum": 0.996, "sigma": 0.001, "psl_weight": 0.1, "psl_temperature": 0.5}


def case_byol_step(root: Path, method: str) -> dict:
    """A whole official training step (DigPro: three) of ProPos, HaDis or DigPro: ``BYOL.train``."""
    case = BYOL_CASES[method]
    off = Official(root, case["repo"], (root / "torch_clustering",) if method == "propos" else ())
    s, K = STEP, case["K"]
    B, D, H = s["batch"], s["out"], s["hidden"]
    with off.imported("models.propos.byol", "models.propos.byol_wrapper", "models.basic_template",
                      "utils.grad_scaler") as (byol, bw, bt, gs):
        gen = torch.Generator().manual_seed(case["seed"])
        torch.manual_seed(case["seed"])            # the wrapper's own init (and DigPro's torch.rand groups)
        np.random.seed(case["seed"])               # DigPro's unseeded sklearn KMeans
        encoder = GoldenConvNet(s["channels"], s["encoder_hidden"], s["encoder_width"])
        w = bw.BYOLWrapper(encoder, num_cluster=K, in_dim=s["encoder_width"],
                           temperature=BYOL_SETTINGS["psl_temperature"], hidden_size=H, fea_dim=D,
                           byol_momentum=BYOL_SETTINGS["momentum"], symmetric=True, shuffling_bn=False,
                           latent_std=BYOL_SETTINGS["sigma"])
        regroups = []
        if method == "digpro":
            from lightly.loss.memory_bank import MemoryBankModule
            w.memory_bank = MemoryBankModule(size=2 * B)   # official 2560 = 5 iterations at 256: here 1 step
            original_reset = w.reset_group_features

            def reset_group_features(memory_bank):
                regroups.append(memory_bank.bank.detach().t().clone())
                original_reset(memory_bank)
            w.reset_group_features = reset_group_features
        with torch.no_grad():
            perturb(w.encoder_q, gen)
            perturb(w.projector_q, gen)
            w.predictor.load_state_dict(predictor_state(D, H, gen))
            for q_param, k_param in zip(w.q_params, w.k_params, strict=True):   # a target away from the online net
                k_param.copy_(q_param + 0.05 * torch.randn(q_param.shape, generator=gen))
        init = renamed(w.state_dict().items(), BYOL_NAMES)
        labels = torch.randint(0, K, (s["num_train"],), generator=gen)
        present = torch.tensor(case["present"])
        batches = [step_batch(gen, len(case["present"])) for _ in range(case["steps"])]
        for _, index in batches:
            labels[index] = present[torch.arange(B) % len(present)][torch.randperm(B, generator=gen)]
        groups_init = w.smog.group_features.detach().clone() if method == "digpro" else None
        opt = types.SimpleNamespace(acc_grd_step=1, warmup_epochs=0, latent_std=BYOL_SETTINGS["sigma"], amp=False,
                                    v2=False, cluster_loss_weight=BYOL_SETTINGS["psl_weight"])
        optimizer = torch.optim.SGD(bt.TrainTask.collect_params(None, w, exclude_bias_and_bn=False), lr=s["lr"],
                                    momentum=s["sgd_momentum"], weight_decay=s["weight_decay"])
        for group in optimizer.param_groups:      # BYOL.adjust_learning_rate at a constant lr
            group["lr"] = s["lr"] * s["predictor_lr_scale"] if "predictor" in group["name"] else s["lr"]
        grads_at_step: list = []
        recording_step(optimizer, w, grads_at_step)
        task = types.SimpleNamespace(
            opt=opt, byol=Solo(w), psedo_labels=labels, cur_epoch=1, optimizer=optimizer,
            scaler=gs.NativeScalerWithGradNormCount(amp=False),
            logger=types.SimpleNamespace(msg=lambda *a, **k: None, log_save_dir=tempfile.mkdtemp(prefix="golden-")))
        steps = []
        for n_iter, (views, index) in enumerate(batches, start=1):
            eps = [torch.randn(B, D, generator=gen) for _ in range(2)]   # torch.randn_like(q): direction 1, 2
            before = len(regroups)
            with replaced(torch, "randn_like", queue_of(eps)), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                byol.BYOL.train(task, ((views[0], views[1]), None), index, n_iter)
            out = task.byol.outputs[-1]
            if method == "propos":
                terms = {"diffused_sampling": out[0], "prototype_aggregation": opt.cluster_loss_weight * out[1]}
            elif method == "hadis":
                terms = {"diffused_sampling": out[0], "hardness_aware_distillation": out[2],
                         "prototype_aggregation": opt.cluster_loss_weight * out[1]}
            else:
                terms = {"diffused_sampling": out[0], "prototype_aggregation": opt.cluster_loss_weight * out[1],
                         "momentum_grouping": 0.3 * out[3]}
            record = {"views": views, "index": index,
                      "noise": {f"diffused_sampling/view{v}": eps[v] for v in range(2)},
                      "terms": {k: v.detach() for k, v in terms.items()},
                      "loss": sum(terms.values()).detach(),
                      "grads": renamed(grads_at_step[-1].items(), BYOL_NAMES),
                      "state": renamed(w.state_dict().items(), BYOL_NAMES)}
            if method == "digpro":
                record.update(groups=w.smog.group_features.detach().clone(),
                              bank=w.memory_bank.bank.detach().t().clone(), regrouped=len(regroups) > before,
                              bank_regrouped_on=regroups[-1] if len(regroups) > before else None)
            steps.append(record)
        out = {"method": method, "num_clusters": K, "pseudo_labels": labels, "init": init, "steps": steps,
               "groups_init": groups_init, "recipe": case["recipe"],
               "settings": {**STEP, **BYOL_SETTINGS, "ema_momentum_extra": 0.99 if method == "digpro" else None,
                            "group_weight": 0.3, "group_temperature": 0.1, "group_beta": 0.99},
               "source": {
                   "step": off.src("models/propos/byol.py:BYOL.train (loss weighting, NativeScalerWithGradNormCount "
                                   "backward + SGD step) -> models/propos/byol_wrapper.py:BYOLWrapper.forward"),
                   "optimizer": off.src("models/basic_template.py:TrainTask.collect_params (no exclusion) + "
                                        "torch.optim.SGD as models/propos/byol.py:set_model; lr set as "
                                        "adjust_learning_rate does at a constant lr (predictor x10)"),
                   "ema": off.src("models/moco/moco_wrapper.py:_momentum_update_key_encoder inside the forward, "
                                  "after the losses (pre-step online weights)"),
                   "grads": "every parameter's .grad when the official optimizer steps",
                   "names": f"official module names mapped to clusterkit's state.model keys: {BYOL_NAMES}",
                   "harness": "encoder = GoldenConvNet (make_golden.py); Solo in place of DDP; one gloo process; "
                              "torch.randn_like replaced by the recorded noise (one draw per direction, shared by "
                              "PSA and, in HaDis, HSD); parameters perturbed, target = online + 0.05 N(0, 1); "
                              "predictor weights of generic size (predictor_state)"}}
        if method == "digpro":
            out["source"].update(
                extra_ema=off.src("models/propos/byol_wrapper.py:BYOLWrapper.forward (liutils.update_momentum 0.99 "
                                  "of encoder and projector before the losses when it does not regroup)"),
                regroup=off.src("BYOLWrapper.reset_group_features: sklearn KMeans(K) of the bank, unseeded "
                                "(np.random.seed(13) here); centres compare up to a permutation"),
                bank="lightly==1.4.24 MemoryBankModule, size 2B instead of 2560 (one step fills it)",
                groups="lightly==1.4.24 SMoGPrototypes.group_features after the step; groups_init its "
                       "torch.rand init")
        return out


def case_cc_step(root: Path) -> dict:
    """One official CC training step: ``train.py:train`` (Network forward, InstanceLoss + ClusterLoss,
    backward, optimiser step) on the harness encoder."""
    off = Official(root, "Contrastive-Clustering")
    s, K, Dz = STEP, 4, 8
    with off.imported("train", "modules.network", "modules.contrastive_loss") as (cc_train, network, cl):
        gen = torch.Generator().manual_seed(14)
        torch.manual_seed(14)
        model = network.Network(GoldenConvNet(s["channels"], s["encoder_hidden"], s["encoder_width"]), Dz, K)
        perturb(model, gen)
        init = renamed(model.state_dict().items(), CC_NAMES)
        views, index = step_batch(gen, K)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-4, weight_decay=0.0)   # CC's train.py
        grads_at_step: list = []
        recording_step(optimizer, model, grads_at_step)
        losses: dict = {}
        cc_train.data_loader = [((views[0], views[1]), None)]
        cc_train.model, cc_train.optimizer = model, optimizer
        cc_train.criterion_instance = recorded(losses, "instance", cl.InstanceLoss(s["batch"], 0.5, "cpu"))
        cc_train.criterion_cluster = recorded(losses, "cluster", cl.ClusterLoss(K, 1.0, "cpu"))
        with contextlib.redirect_stdout(sys.stderr):
            cc_train.train()
        return {"method": "cc", "num_clusters": K, "init": init,
                "steps": [{"views": views, "index": index, "noise": {},
                           "terms": {"instance_contrast": losses["instance"].detach(),
                                     "cluster": losses["cluster"].detach()},
                           "loss": (losses["instance"] + losses["cluster"]).detach(),
                           "grads": renamed(grads_at_step[-1].items(), CC_NAMES),
                           "state": renamed(model.state_dict().items(), CC_NAMES)}],
                "recipe": "recipes/cc_cifar10.yaml",
                "settings": {**STEP, "instance_dim": Dz, "instance_temperature": 0.5, "cluster_temperature": 1.0},
                "source": {"step": off.src("train.py:train (z_i, z_j, c_i, c_j = model(x_i, x_j); InstanceLoss + "
                                           "ClusterLoss; backward; optimizer.step) with its module globals set "
                                           "to this batch, model and optimizer"),
                           "network": off.src("modules/network.py:Network (heads on resnet.rep_dim)"),
                           "losses": off.src("modules/contrastive_loss.py:InstanceLoss(B, 0.5), "
                                             "ClusterLoss(K, 1.0) (its value includes the entropy term)"),
                           "grads": "every parameter's .grad when the official optimizer (Adam, as train.py) steps",
                           "names": f"official module names mapped to clusterkit's state.model keys: {CC_NAMES}",
                           "harness": "resnet = GoldenConvNet (make_golden.py), parameters perturbed"}}


def case_pici_step(root: Path) -> dict:
    """Official PICI steps on a tiny MAE ViT: ``train_pici.train_one_epoch`` (the train stage: PISD + instance +
    cluster losses) and ``finetune_one_epoch`` (the boost stage: instance + cluster + CLI), each from the
    same weights, on one batch."""
    off = Official(root, "PICI")
    s, K, Dz = STEP, 4, 8
    vit = {"img_size": s["size"], "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2, "mlp_ratio": 4.0}
    decoder = {"decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}
    with off.imported("train_pici", "modules.models_mae", "modules.network", "modules.contrastive_loss") as (
            tp, mae, network, cl):
        from functools import partial
        gen = torch.Generator().manual_seed(15)
        torch.manual_seed(15)
        net = network.Network_mae(mae.MaskedAutoencoderViT(
            in_chans=s["channels"], norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=True, **vit, **decoder),
            Dz, K)
        with torch.no_grad():                          # generic weights (not the zero biases / unit norms)
            for p in net.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
        init_state = copy.deepcopy(net.state_dict())
        init = renamed(net.state_dict().items(), PICI_NAMES)
        views, index = step_batch(gen, K)
        L = (s["size"] // vit["patch_size"]) ** 2
        noise = [torch.rand(s["batch"], L, generator=gen) for _ in range(2)]   # random_masking: view 0, view 1
        pseudo = torch.randint(0, K, (s["num_train"],), generator=gen)
        scenarios = {}
        for stage in ("train", "boost"):
            net.load_state_dict(init_state)
            optimizer = torch.optim.Adam(net.parameters(), lr=1e-4, weight_decay=0.0)   # train_pici.py
            grads_at_step: list = []
            recording_step(optimizer, net, grads_at_step)
            losses: dict = {}
            tp.model, tp.optimizer = net, optimizer
            tp.criterion_instance = recorded(losses, "instance", cl.InstanceLoss(s["batch"], 0.5, "cpu"))
            tp.criterion_cluster = recorded(losses, "cluster", cl.ClusterLoss(K, 1.0, "cpu"))
            tp.args = types.SimpleNamespace(batch_size=s["batch"])
            restruct: list = []          # the MAE's reconstruction loss of view 0, view 1
            ce: list = []                # the CrossEntropyLoss values of finetune_one_epoch (view 0, view 1)

            def mae_forward(imgs, mask_ratio=0.5, _orig=net.mae.forward, _out=restruct):
                out = _orig(imgs, mask_ratio)
                _out.append(out[0])
                return out
            net.mae.forward = mae_forward
            batch = [((views[0], views[1]), None)]
            with replaced(torch, "rand", queue_of(noise)):
                if stage == "train":
                    tp.train_one_epoch(batch)
                else:   # the k-means labels of the batch, the same set for both views (clusterkit's one set)
                    y = pseudo[index].view(-1, 1)

                    def ce_forward(self, input, target, _orig=torch.nn.CrossEntropyLoss.forward, _out=ce):
                        out = _orig(self, input, target)
                        _out.append(out)
                        return out
                    with replaced(torch.nn.CrossEntropyLoss, "forward", ce_forward):
                        tp.finetune_one_epoch(batch, [y, y])
            del net.mae.forward
            if stage == "train":
                terms = {"partial_self_discrimination": (restruct[0] + restruct[1]) / 2}
            else:
                terms = {"cross_level_interaction": (ce[-2] + ce[-1]) / 2}
            terms.update(instance_contrast=losses["instance"], cluster=losses["cluster"])
            scenarios[stage] = {"views": views, "index": index,
                                "noise": {f"masked_vit/view{v}": noise[v] for v in range(2)},
                                "terms": {k: v.detach() for k, v in terms.items()},
                                "loss": sum(terms.values()).detach(),
                                "grads": renamed(grads_at_step[-1].items(), PICI_NAMES)}
        sd = net.state_dict()
        return {"method": "pici", "num_clusters": K, "init": init, "pseudo_labels": pseudo,
                "pos_embed": sd["mae.pos_embed"], "decoder_pos_embed": sd["mae.decoder_pos_embed"],
                "scenarios": scenarios, "recipe": "recipes/pici_imagenet10.yaml",
                "settings": {**STEP, **vit, **decoder, "instance_dim": Dz, "mask_ratio": 0.5},
                "source": {"train": off.src("train_pici.py:train_one_epoch (Network_mae forward, InstanceLoss + "
                                            "ClusterLoss + (loss_1 + loss_2) / 2, backward, Adam step) with its "
                                            "module globals set to this model, optimizer and batch"),
                           "boost": off.src("train_pici.py:finetune_one_epoch (match() of the k-means labels onto "
                                            "the head's argmax, CrossEntropyLoss on the softmax outputs c, "
                                            "(ce1 + ce2) / 2 + instance + cluster); new_pseudo_label = the same "
                                            "labels for both views"),
                           "model": off.src("modules/models_mae.py:MaskedAutoencoderViT (img 8, patch 4, 16-d, "
                                            "1 block, 2 heads, decoder 16-d x 1, norm_pix_loss) + "
                                            "modules/network.py:Network_mae"),
                           "masking": "torch.rand in random_masking replaced by the recorded noise (view 0, 1)",
                           "grads": "every parameter's .grad when the official optimizer (Adam) steps",
                           "names": f"official names mapped to clusterkit's state.model keys: {PICI_NAMES}",
                           "harness": "one gloo process; trainable parameters + 0.1 N(0, 1) after the MAE init"}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", type=Path, required=True, help="folder with the official checkouts")
    ap.add_argument("--out", type=Path, required=True, help="output folder (tests/golden)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="write only these files (names without .pt)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    np.random.seed(0)        # the official regrouping is unseeded sklearn KMeans (numpy's global RNG)
    install_shims()
    import lightly
    assert lightly.__version__ == "1.4.24", lightly.__version__
    args.out.mkdir(parents=True, exist_ok=True)
    cases = {}
    cases.update(case_propos(args.official))
    cases["digpro_step"] = case_digpro_step(args.official)
    cases["digpro_clock"] = case_digpro_clock(args.official)
    cases["hadis_hsd"] = case_hadis(args.official)
    cases["cc_losses"] = case_cc(args.official)
    cases["pici_losses"] = case_pici(args.official)
    cases["lr_schedule"] = case_lr(args.official)
    # whole official training steps (each seeds its own generators: independent of the cases above)
    for method in BYOL_CASES:
        cases[f"{method}_train_step"] = case_byol_step(args.official, method)
    cases["cc_train_step"] = case_cc_step(args.official)
    cases["pici_train_step"] = case_pici_step(args.official)
    if args.only:
        unknown = set(args.only) - set(cases)
        if unknown:
            ap.error(f"unknown case(s) {sorted(unknown)}; known: {sorted(cases)}")
        cases = {name: cases[name] for name in args.only}
    import sklearn
    for name, data in cases.items():
        data["versions"] = {"torch": str(torch.__version__), "lightly": str(lightly.__version__),
                            "sklearn": str(sklearn.__version__), "numpy": str(np.__version__)}
        path = args.out / f"{name}.pt"
        torch.save(_plain(data), path)
        print(f"{path}: {path.stat().st_size / 1024:.1f} KB")


def _plain(x):
    """Detached, contiguous tensors and plain containers (loadable with torch.load(weights_only=True))."""
    if torch.is_tensor(x):
        return x.detach().clone().contiguous()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


if __name__ == "__main__":
    main()
