"""Golden values from the official implementations (issue 13, item 4).

Runs the released code of ProPos, DigPro, HaDis, Contrastive Clustering and PICI from
local git checkouts on small seeded tensors and writes one ``.pt`` file per case to
``--out`` (``tests/golden``).  Each file holds the inputs, the official outputs, the
official gradients with respect to the inputs (and parameters where relevant), the
updated state, and a ``source`` dict naming ``owner/repo@commit`` and the
``file:function`` that produced every value.  ``tests/plugins/test_golden.py`` then runs
clusterkit's own functions on the same inputs and compares, without the official code.

Usage (a separate virtual environment for the official code, no network needed)::

    /work/official-venv/bin/python benchmarks/parity/make_golden.py \\
        --official /work/official --out tests/golden

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
the recorded tensors.
"""

from __future__ import annotations

import argparse
import contextlib
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
REPO_PACKAGES = ("models", "utils", "network", "torch_clustering", "modules", "evaluation")

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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", type=Path, required=True, help="folder with the official checkouts")
    ap.add_argument("--out", type=Path, required=True, help="output folder (tests/golden)")
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
