"""End-to-end parity benchmark: the official ProPos / DigPro / HaDis / CC code against clusterkit (issues 13, 25).

Trains the released ProPos (Hzzone/ProPos), DigPro (Regan-Zhang/DigPro) and HaDis (Regan-Zhang/HaDis)
code and clusterkit's recipes ``benchmarks/parity/{propos,digpro,hadis}_fmnist.yaml`` side by side on the CPU,
in the same setting, and records for every system, epoch 0 (the untrained network) and epochs
1..N of a 30-epoch schedule:

* NMI, ACC and ARI of the E-step k-means labels of the training images (the papers' protocol:
  the k-means the method itself runs on its target-branch features, train = evaluation data);
* the largest cluster's share of those labels;
* the feature std, ``mean_j std_i(norm(f)_ij)`` (the official ``global_std``:
  ``torch.std(normalised features, dim=0).mean()``, unbiased std);
* the mean loss terms of the epoch, as added to the total loss (``psa`` = L_base / PSA,
  ``psl`` = gamma x PSL, zero during warm-up, ``grp`` = lambda x grouping CE (DigPro; 0 for ProPos),
  ``hsd`` = HaDis's HSD, weight 1) and their sum;
* seconds per epoch: wall time from one E-step's end to the next (training, the feature
  pass and k-means of the E-step, and the system's own per-epoch bookkeeping).

The metrics are computed by this script (:func:`epoch_record`) from the features, E-step labels
and ground truth each system produced, with the same code for both systems.

Setting (issue 13): the first 5,000 Fashion-MNIST test images (``--limit`` for fewer), written
once as 28x28 PNGs in class folders and read as an image folder by both systems (RGB, ImageNet
normalisation: the official code's default for a dataset it does not know); standard-stem
ResNet-18 with torchvision's init, 32 px, batch 256, lr 0.05 (x batch/256), wd 5e-4, EMA 0.996,
30-epoch cosine schedule with 5 warm-up epochs, K = 10, PSL weight 0.1 at temperature 0.5,
latent std 0.001, symmetric loss; DigPro as released (group loss weight 0.3, extra EMA 0.99 on
non-regroup iterations); HaDis as released (HSD weight 1, tau 0.5, its student the diffused sample
of PSA/DSA, mined in the one process's batch: ``hardness_aware_distillation`` with ``noise: shared``,
``mining: local``).  2 torch threads per run; the official code uses 2 loader workers.

Each (method, system, seed) runs in its own subprocess, one at a time:

* ``official``: the official ``main.py`` run unmodified (``runpy``) in the official code's own
  virtual environment (``--official-python``), from a local checkout (``--official-root``; both made
  by ``bash benchmarks/setup_official.sh``: the checkouts at the pinned commits and the environment), with
  runtime shims only (:func:`_install_official_shims`): a ``torch._six`` module, ``.cuda()`` as a
  no-op, a one-process gloo group for ``nccl``, DDP without ``device_ids``.  Nothing of the
  official code is copied here and the checkouts are not modified.  Its E-step is observed by
  wrapping ``TrainTask.psedo_labeling`` and its loss terms by wrapping ``BYOLWrapper.forward``
  (DigPro and HaDis are ProPos forks: the same ``main.py``, config keys and classes; the third loss
  term each adds is read from that forward's outputs, :data:`EXTRA_TERMS`).
* ``clusterkit``: :class:`clusterkit.engine.Trainer` on the recipe, plus a probe plugin that
  only this script registers (``parity_probe``, :func:`_probe_class`): after every E-step it
  records the features and pseudo-labels the E-step used, and it stops the run after N epochs.

CC (``--methods cc``; issue 13: "the same for CC, Fashion-MNIST, 6 epochs, the official CC code"):
the official Yunfan-Li/Contrastive-Clustering ``train.py`` against ``benchmarks/parity/cc_fmnist.yaml``
on the same images, in CC's official setting except the backbone and the size (:data:`CC_SETTING`:
standard-stem ResNet-18 with torchvision's init, 32 px, Adam lr 3e-4 constant, no weight decay, batch
256, tau_I 0.5, tau_C 1.0, feature_dim 128, K = 10, CC's augmentation with s = 0.5).  CC has no E-step:
each epoch (and epoch 0) records NMI / ACC / ARI of the cluster head's argmax on the training images,
the largest cluster's share, the feature std of the backbone features, the mean loss terms
(``instance``; ``cluster`` = contrast + entropy as the official loss, ``cluster_contrast``,
``entropy``) and seconds per epoch.  ``official``: ``train.py`` run unmodified (``runpy``) with the
shims of :func:`_install_cc_shims` and evaluated as the official ``cluster.py`` after every epoch
(:func:`run_official_cc_child`); ``clusterkit``: the Trainer with its own per-epoch evaluation, read by
the probe of :func:`_cc_probe_class`.  The official code feeds raw [0, 1] pixels and clusterkit
normalises; ``--clusterkit-raw-pixels`` removes clusterkit's normalisation at runtime, as a diagnostic.

PICI (``--methods pici``; issue 25, item 2): the official Regan-Zhang/PICI code against
``benchmarks/parity/pici_fmnist.yaml`` on the same images, in PICI's official setting except the model
size and the schedule length (:data:`PICI_SETTING`: one small ViT both systems build, 32 px, patch 8,
width 192, 6 blocks, 3 heads, MAE decoder 128-d x 2 x 4 heads; Adam lr 1e-4 constant, no weight decay,
masking ratio 0.5, tau_I 0.5, tau_C 1.0, K = 10, CLI k-means n_init 100) and the three stages (pretrain:
PISD; train: PISD + instance + cluster; boost: instance + cluster + CLI) scaled to ``--pici-stages P T B``
epochs (default 2 3 2; ``--epochs`` / ``--schedule-epochs`` do not apply to PICI: it runs P + T + B
epochs).  ``official``: ``train_pici.py``'s ``__main__`` block hard-codes its stage boundaries (200,
1000) and its model (ViT-S/16, 224 px), so the harness drives its functions in-process instead
(:func:`run_official_pici_child`): it builds the data, loaders, model, optimiser and losses in the
order ``__main__`` does, with the official classes, and calls ``pretrain_one_epoch``,
``train_one_epoch``, ``make_pseudo_label`` and ``finetune_one_epoch`` as ``__main__`` does, at the
scaled boundaries; each epoch is evaluated as the official code evaluates (``cluster_pici.inference``:
argmax of the cluster head of the masked encoder, batches of 100) with the random states restored
after it.  ``clusterkit``: the Trainer with its own per-epoch evaluation (argmax of the cluster head
of the unmasked encoder), read by the probe of :func:`_pici_probe_class`.  Each epoch records NMI /
ACC / ARI, the largest cluster's share, the feature std of the [CLS] features of the evaluation pass,
the stage, the mean loss terms (``pisd``, ``instance``, ``cluster`` = contrast + entropy, ``cli``)
and seconds per epoch.

A finished run whose record has at least N epochs for the same settings is reused (the schedule
is always ``--schedule-epochs`` long, so the first N epochs of a longer run are the same run),
so an interrupted benchmark continues where it stopped; ``--rerun`` forces new runs.

Usage (from the repo root, in clusterkit's environment)::

    python benchmarks/parity.py --methods propos digpro --systems official clusterkit \\
        --seeds 0 1 --epochs 6 --schedule-epochs 30 --out benchmarks/results/parity.md

    python benchmarks/parity.py --methods hadis --systems official clusterkit \\
        --seeds 0 1 --epochs 6 --schedule-epochs 30 --out benchmarks/results/parity_hadis.md

    python benchmarks/parity.py --methods cc --systems official clusterkit --seeds 0 1 --epochs 6 \\
        --schedule-epochs 6 --out benchmarks/results/parity_cc.md

    python benchmarks/parity.py --methods pici --systems official clusterkit --seeds 0 1 \\
        --pici-stages 2 3 2 --out benchmarks/results/parity_pici.md

    # a quick check of the harness (a few minutes):
    python benchmarks/parity.py --limit 512 --epochs 1 --batch-size 128 --seeds 0 \\
        --out /tmp/parity_smoke.md

Writes ``--out`` (markdown: settings, one per-epoch table per method, system and seed, and a
summary against issue 13's criteria) and the raw per-epoch records as JSON next to it (``.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: The methods the harness trains (``--methods``).
METHODS = ("propos", "digpro", "hadis", "cc", "pici")
RECIPES = {m: HERE / "parity" / f"{m}_fmnist.yaml" for m in METHODS}
OFFICIAL_REPOS = {"propos": "ProPos", "digpro": "DigPro", "hadis": "HaDis", "cc": "Contrastive-Clustering",
                  "pici": "PICI"}
OFFICIAL_NAMES = {"ProPos": "Hzzone/ProPos", "DigPro": "Regan-Zhang/DigPro", "HaDis": "Regan-Zhang/HaDis",
                  "torch_clustering": "Hzzone/torch_clustering",
                  "Contrastive-Clustering": "Yunfan-Li/Contrastive-Clustering", "PICI": "Regan-Zhang/PICI"}
LABELS = {"propos": "ProPos", "digpro": "DigPro", "hadis": "HaDis", "cc": "CC", "pici": "PICI", "official": "official",
          "clusterkit": "clusterkit"}
#: Methods whose official code is the ProPos-style main.py with an E-step (k-means) every epoch
#: (DigPro and HaDis are ProPos forks).
ESTEP_METHODS = ("propos", "digpro", "hadis")
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_WORK = Path("/tmp/clusterkit-parity")
DEFAULT_OUT = HERE / "results" / "parity.md"

#: The shared setting (issue 13).  Both systems get exactly these values.
SETTING = {
    "image_size": 32, "k": 10, "lr": 0.05, "weight_decay": 5e-4, "ema": 0.996, "warmup_epochs": 5,
    "psl_weight": 0.1, "psl_temperature": 0.5, "latent_std": 0.001, "group_weight": 0.3,
    "loader_workers": 2,
}
#: HaDis's values on top of :data:`SETTING` (issue 25): the official HSD as released, weight 1 (no
#: warm-up gate on the weight) and tau 0.5 (both hard-coded in its ``byol.py`` / ``byol_wrapper.py``);
#: its student is L_psa's diffused sample (sigma = ``latent_std``, 0 during warm-up).  The official
#: HaDis config shares every other value with ProPos's.  Kept apart from SETTING, so that the keys of
#: the recorded ProPos / DigPro runs stay what they were.
HADIS_SETTING = {"hsd_weight": 1.0, "hsd_temperature": 0.5}


class ExtraTerm(NamedTuple):
    """The loss term an E-step method adds to L_psa and gamma x L_psl, as both systems report it."""

    key: str                     #: the record's key (the weighted term as added to the loss)
    heading: str                 #: the per-epoch table's column
    official_index: int | None   #: its index in the official ``BYOLWrapper.forward``'s outputs (None: no term)
    weight: float                #: its weight in the official total loss
    clusterkit_metric: str       #: clusterkit's per-epoch metric of the term (already weighted)


EXTRA_TERMS = {
    "propos": ExtraTerm("grp", "λ·L_grp", None, 0.0, "momentum_grouping"),  # a 0 column, as DigPro's twin
    "digpro": ExtraTerm("grp", "λ·L_grp", 3, SETTING["group_weight"], "momentum_grouping"),
    "hadis": ExtraTerm("hsd", "L_hsd", 2, HADIS_SETTING["hsd_weight"], "hardness_aware_distillation"),
}


def method_setting(method: str) -> dict:
    """The shared setting one method's runs are made in (part of their run key)."""
    if method == "cc":
        return CC_SETTING
    if method == "pici":
        return PICI_SETTING
    return {**SETTING, **HADIS_SETTING} if method == "hadis" else SETTING


#: CC's setting (issue 13: CC's official settings but the backbone and the image size).  Both systems
#: get exactly these values; the lr is constant (no schedule), so ``--schedule-epochs`` only sets the
#: official ``epochs`` and clusterkit's ``schedule.epochs``.
CC_SETTING = {
    "image_size": 32, "k": 10, "resnet": "ResNet18", "lr": 3e-4, "weight_decay": 0.0,
    "instance_temperature": 0.5, "cluster_temperature": 1.0, "feature_dim": 128, "jitter_strength": 0.5,
    "loader_workers": 2, "eval_batch_size": 500,
}
#: PICI's setting (issue 25, item 2): PICI's official setting (config/config.yaml, train_pici.py) with one
#: small ViT both systems build instead of ViT-S/16 at 224 px (the model of benchmarks/recipes/fmnist_pici.yaml).
#: Both systems get exactly these values (tests/core/test_parity_harness.py checks the recipe against them);
#: the stage lengths come from ``--pici-stages``.
PICI_SETTING = {
    "image_size": 32, "k": 10, "patch_size": 8, "embed_dim": 192, "depth": 6, "num_heads": 3, "mlp_ratio": 4.0,
    "decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4, "mask_ratio": 0.5, "norm_pix_loss": True,
    "feature_dim": 128, "lr": 1e-4, "weight_decay": 0.0, "instance_temperature": 0.5, "cluster_temperature": 1.0,
    "cli_n_init": 100, "loader_workers": 2, "eval_batch_size": 100,
}
#: The default ``--pici-stages``: pretrain, train and boost epochs (official 200 / 800 / 50).
PICI_STAGES = (2, 3, 2)
#: Issue 13's acceptance thresholds.
NMI_TOL = 0.05
SHARE_TOL = 0.10


def log(msg: str) -> None:
    """Print a progress line at once."""
    print(msg, flush=True)


# --------------------------------------------------------------------------- metrics (both systems)


def _contingency(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Counts table (classes x clusters) of two integer labelings."""
    _, t = np.unique(gt, return_inverse=True)
    _, p = np.unique(pred, return_inverse=True)
    table = np.zeros((t.max() + 1, p.max() + 1), dtype=np.int64)
    np.add.at(table, (t, p), 1)
    return table


def clustering_scores(gt, pred) -> dict[str, float]:
    """NMI (arithmetic normalisation), ACC (Hungarian matching) and ARI of ``pred`` against ``gt``.

    Implemented on the contingency table with numpy/scipy only, so that the official code's
    environment and clusterkit's compute them identically.  ACC counts every image: with more
    clusters than classes the unmatched clusters count as wrong.
    """
    from scipy.optimize import linear_sum_assignment

    gt = np.asarray(gt).reshape(-1)
    pred = np.asarray(pred).reshape(-1)
    n = gt.size
    table = _contingency(gt, pred)
    pij = table / n
    pi, pj = pij.sum(1), pij.sum(0)
    nz = pij > 0
    mi = float((pij[nz] * np.log(pij[nz] / np.outer(pi, pj)[nz])).sum())
    h_t = float(-(pi[pi > 0] * np.log(pi[pi > 0])).sum())
    h_p = float(-(pj[pj > 0] * np.log(pj[pj > 0])).sum())
    nmi = 1.0 if h_t == 0 and h_p == 0 else (0.0 if h_t + h_p == 0 else 2 * mi / (h_t + h_p))
    rows, cols = linear_sum_assignment(-table)
    acc = float(table[rows, cols].sum() / n)

    def pairs(x):
        return (x * (x - 1) / 2).sum()

    sum_ij, sum_i, sum_j, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), n * (n - 1) / 2
    expected = sum_i * sum_j / total if total else 0.0
    denom = 0.5 * (sum_i + sum_j) - expected
    ari = 1.0 if denom == 0 else float((sum_ij - expected) / denom)
    return {"nmi": float(max(nmi, 0.0)), "acc": acc, "ari": ari}


def has_labels(gt) -> bool:
    """Whether ``gt`` are real labels to score against: no -1 (unlabeled) and at least two classes."""
    gt = np.asarray(gt).reshape(-1)
    return bool(gt.size) and bool((gt >= 0).all()) and np.unique(gt).size >= 2


def nmi_text(record: dict) -> str:
    """``NMI 0.123`` for a progress line, or ``unlabeled``."""
    return "unlabeled" if record.get("nmi") is None else f"NMI {record['nmi']:.3f}"


def epoch_record(features, pred, gt, k: int) -> dict[str, float | None]:
    """The per-epoch quality record of one E-step, the same for both systems.

    Args:
        features: (N, D) target-branch features the E-step clustered (normalised or not).
        pred: (N,) the E-step's k-means labels.
        gt: (N,) ground-truth classes (evaluation only); unlabeled data (``--data-root`` without class
            folders) has none: -1 everywhere (clusterkit) or one class for all (the official ImageFolder).
        k: number of clusters.
    Returns:
        ``nmi``, ``acc``, ``ari`` (None for unlabeled data), ``largest_share`` (share of the largest cluster),
        ``clusters`` (non-empty clusters) and ``feature_std``
        (``std(normalise(features), dim=0, unbiased).mean()``, the official ``global_std``).
    """
    f = np.asarray(features, dtype=np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    counts = np.bincount(pred, minlength=k)
    scores = clustering_scores(gt, pred) if has_labels(gt) else {"nmi": None, "acc": None, "ari": None}
    return {
        **scores,
        "largest_share": float(counts.max() / pred.size),
        "clusters": int((counts > 0).sum()),
        "feature_std": float(f.std(axis=0, ddof=1).mean()),
    }


def _write_probe_record(state, epoch: int, labels, targets, path: str, since: float, who: str,
                        metrics: dict | None = None, terms: dict | None = None,
                        e_step_seconds: float | None = None) -> None:
    """One clusterkit probe record (both probes): the harness's metrics of the E-step / evaluation
    ``labels`` on ``state.features("train")``; for a trained epoch (``metrics``: its record) also
    the loss ``terms`` (name -> value, as the probe maps them), the loss, the seconds since
    ``since``, the last lr and the run's own evaluation; the seconds of the E-step that made
    ``labels`` when given.  Appended to ``path`` and logged."""
    feats = state.features("train")
    record = {"epoch": epoch, "step": int(state.step),
              **({} if e_step_seconds is None else {"e_step_seconds": e_step_seconds}),
              **epoch_record(feats.float().cpu().numpy(), labels.cpu().numpy(), targets, state.num_clusters)}
    if metrics is not None:
        record.update(terms or {})
        record["loss"] = float(metrics.get("loss", float("nan")))
        record["seconds"] = time.perf_counter() - since
        record["lr_last"] = float(metrics.get("lr", float("nan")))
        record["own_eval"] = {k: metrics[k] for k in ("nmi", "acc", "ari", "collapse_share", "feature_std")
                              if k in metrics}
    _append_jsonl(Path(path), record)
    log(f"clusterkit {who}seed {state.recipe.run.seed} epoch {epoch}: {nmi_text(record)} "
        f"largest {record['largest_share']:.2f} std {record['feature_std']:.4f}")


def _append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line (the per-run record file)."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


@contextlib.contextmanager
def official_evaluation(model, module, pick: Callable, device: str = "cpu"):
    """Around one official evaluation call (CC's and PICI's ``inference``): yields a list that
    collects ``pick(output)`` of every forward of ``module`` (detached, float32, on the CPU), and
    afterwards puts back what the evaluation may have changed, so that training continues as if
    it had not happened: the model's train/eval mode and the random states of torch (and CUDA's,
    on a CUDA ``device``), numpy and Python's ``random``."""
    import random

    import torch

    cuda = str(device).startswith("cuda")
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate(),
              torch.cuda.get_rng_state_all() if cuda else None)
    was_training = model.training
    feats: list = []
    hook = module.register_forward_hook(lambda m, i, o: feats.append(pick(o).detach().float().cpu()))
    try:
        yield feats
    finally:
        hook.remove()
        model.train(was_training)
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


class StopParity(Exception):
    """Raised inside a run after its N-th epoch was recorded: the run stops there."""


# --------------------------------------------------------------------------- data


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip) as a numpy array."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def prepare_images(work: Path, limit: int) -> tuple[Path, str]:
    """Write the first ``limit`` Fashion-MNIST test images once as 28x28 grayscale PNGs.

    Layout ``WORK/data/<name>/<class>/<index:05d>.png`` with classes ``0``..``9``: the image-folder
    layout both torchvision's ``ImageFolder`` (official) and clusterkit's ``imagefolder`` read, in
    the same (sorted) order.  Returns ``(WORK/data, name)``.
    """
    from PIL import Image

    name = f"fmnist_test_first{limit}"
    root = work / "data"
    folder = root / name
    done = folder / ".complete"
    if done.exists():
        return root, name
    images = _read_idx(FMNIST_DIR / "t10k-images-idx3-ubyte.gz")[:limit]
    labels = _read_idx(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz")[:limit]
    for c in range(10):
        (folder / str(c)).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image, mode="L").save(folder / str(int(label)) / f"{i:05d}.png")
    done.write_text(f"{limit} images, first of t10k-images-idx3-ubyte.gz\n")
    log(f"wrote {limit} PNGs to {folder}")
    return root, name


#: The description of a folder made by :func:`prepare_folder`, in that folder (both systems skip it).
FOLDER_META = ".parity.json"


def prepare_folder(work: Path, source: Path, limit: int | None = None) -> tuple[Path, str, dict]:
    """Stage the image folder ``source`` (``--data-root``) for both systems, once: symbolic links
    to its image files in the layout the official code's ``torchvision.datasets.ImageFolder`` and
    clusterkit's ``imagefolder`` both read in the same order.

    ``source`` is read as clusterkit reads ``data.root`` with ``data.split: all`` and
    ``data.labels: auto`` (:func:`clusterkit.data.load_dataset`, which also checks every file):
    class folders when every image sits in one, else unlabeled (a flat folder or any tree; a
    ``train/`` + ``test/`` (or ``val/``) pair is joined).  The staged tree is
    ``WORK/data/<name>/c<class:03d>/<index:06d><ext>`` (labelled) or
    ``WORK/data/<name>/unlabeled/<index:06d><ext>``: class folders numbered, so that no class name
    can mean something to the official code (it treats a ``train`` folder as a split), and files
    numbered in clusterkit's order.  ``limit``: a seeded (0) random subset of that many images, in
    their order.  Returns ``(WORK/data, name, meta)``; ``meta`` (also written to
    ``<name>/.parity.json``) holds ``labelled``, ``classes``, ``images`` and ``decode_size``: the
    images' common side when all are squares of one size (clusterkit then cuts its crops from that
    resolution, as the official RandomResizedCrop does from the file), else None (clusterkit decodes
    to ``image_size`` squares; ``--extra-set data.decode_size=N`` changes it).
    """
    from PIL import Image

    from clusterkit.data import load_dataset
    from clusterkit.errors import ClusterkitError

    source = Path(source).expanduser().resolve()
    if not source.is_dir():
        raise SystemExit(f"--data-root '{source}' is not a folder. Pass a folder of images: class sub-folders "
                         "(<class>/<image>) for labelled data, or images at any depth for unlabeled data.")
    try:
        ds = load_dataset("imagefolder", source, split="all", image_size=32, cache=False, progress=False)
    except ClusterkitError as exc:
        raise SystemExit(f"--data-root '{source}': {exc}") from None
    paths = list(ds.paths or [])
    targets = ds.targets.numpy()
    keep = np.arange(len(paths))
    if limit is not None and limit < len(paths):
        keep = np.sort(np.random.default_rng(0).choice(len(paths), size=limit, replace=False))
    h = hashlib.sha1(f"{limit}".encode())
    for i in keep:
        st = os.stat(paths[i])
        h.update(f"{os.path.relpath(paths[i], source)}\0{st.st_size}\0{st.st_mtime_ns}\0{targets[i]}\n".encode())
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in source.name)[:40] or "images"
    name = f"{safe}_{h.hexdigest()[:10]}"
    root = work / "data"
    folder = root / name
    meta_path = folder / FOLDER_META
    if meta_path.exists():
        return root, name, json.loads(meta_path.read_text())
    shutil.rmtree(folder, ignore_errors=True)  # an earlier attempt that did not finish
    sizes = set()
    for n, i in enumerate(keep):
        sub = f"c{int(targets[i]):03d}" if ds.has_labels else "unlabeled"
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / f"{n:06d}{Path(paths[i]).suffix.lower()}").symlink_to(paths[i])
        if len(sizes) < 2:
            with Image.open(paths[i]) as im:
                sizes.add(im.size)
    side = next(iter(sizes)) if len(sizes) == 1 else None
    meta = {"source_name": source.name, "labelled": ds.has_labels, "classes": list(ds.classes),
            "images": int(len(keep)), "limit": limit,
            "decode_size": side[0] if side is not None and side[0] == side[1] else None}
    meta_path.write_text(json.dumps(meta, indent=1))
    log(f"staged {len(keep)} images of {source} as {folder} "
        f"({f'{len(ds.classes)} classes' if ds.has_labels else 'unlabeled'})")
    return root, name, meta


def folder_meta(image_root, dataset: str) -> dict | None:
    """The :data:`FOLDER_META` of a folder staged by :func:`prepare_folder`, or None (Fashion-MNIST)."""
    path = Path(image_root) / dataset / FOLDER_META
    return json.loads(path.read_text()) if path.exists() else None


# --------------------------------------------------------------------------- the official code (child)


def _install_official_shims(threads: int, device: str = "cpu") -> None:
    """Runtime shims that let the official GPU/DDP code run unmodified in one CPU process
    (``device`` "cuda": only those a one-GPU run needs, marked (all) below).

    * (all) ``torch._six`` (removed from torch): ``string_classes``, ``int_classes``, ``inf``;
    * (all) a one-process group's environment (``MASTER_ADDR``, a free ``MASTER_PORT``, rank 0 of 1);
    * ``Tensor.cuda`` / ``Module.cuda`` return the object itself (everything stays on the CPU);
      ``torch.cuda.set_device`` / ``empty_cache`` do nothing, ``current_device`` returns 0;
    * ``dist.init_process_group`` uses gloo instead of nccl (world size 1, rank 0, env://), so
      ``barrier`` / ``broadcast`` / ``all_gather`` / ``all_reduce`` and DDP work;
    * ``DistributedDataParallel`` drops ``device_ids`` / ``output_device`` (CPU modules);
    * ``torch.cuda.amp.GradScaler`` is constructed disabled (amp is off in every config);
    * (all) ``torchvision.transforms.functional_pil`` (removed from torchvision; DigPro's test transform
      calls its ``resize``, bilinear by default): a module with that one function.
    """
    import math
    import types

    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    six = types.ModuleType("torch._six")
    six.string_classes = (str, bytes)
    six.int_classes = int
    six.inf = math.inf
    sys.modules["torch._six"] = six
    torch._six = six
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"})
    _install_functional_pil()
    if device != "cpu":
        return

    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    torch.cuda.current_device = lambda: 0

    original_init = dist.init_process_group

    def init_process_group(*args, **kwargs):
        kwargs.pop("backend", None)
        args = args[1:]
        return original_init("gloo", *args, **kwargs)

    dist.init_process_group = init_process_group
    base = torch.nn.parallel.DistributedDataParallel

    class CpuDDP(base):
        """DDP of a CPU module: ``device_ids`` / ``output_device`` must be None."""

        def __init__(self, module, *args, device_ids=None, output_device=None, **kwargs):
            super().__init__(module, *args, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuDDP
    try:
        scaler = torch.cuda.amp.GradScaler

        class CpuScaler(scaler):
            """GradScaler, disabled (the official configs never enable amp)."""

            def __init__(self, *args, **kwargs):
                kwargs["enabled"] = False
                super().__init__(*args, **kwargs)

        torch.cuda.amp.GradScaler = CpuScaler
    except AttributeError:
        pass


def _install_functional_pil() -> None:
    """``torchvision.transforms.functional_pil`` with its ``resize`` (see :func:`_install_official_shims`)."""
    import types

    from PIL import Image

    fpil = types.ModuleType("torchvision.transforms.functional_pil")

    def pil_resize(img, size, interpolation=Image.BILINEAR):
        """PIL resize to (h, w) = ``size``: the old public torchvision helper DigPro's test transform calls."""
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return img.resize((w, h), interpolation)

    fpil.resize = pil_resize
    sys.modules["torchvision.transforms.functional_pil"] = fpil


def _official_config(args, data_root: Path, dataset: str) -> dict:
    """The official config (ProPos's / DigPro's / HaDis's CIFAR-style yml) for the parity setting.

    One config for the three: DigPro and HaDis are ProPos forks with ProPos's config keys, and
    their own losses' values are hard-coded in their code (DigPro's group weight 0.3, HaDis's HSD
    weight 1 and tau 0.5), so no key of the config differs between them."""
    return {
        "model_name": "propos", "encoder_name": "resnet18", "dataset": dataset, "data_folder": str(data_root),
        "whole_dataset": True, "img_size": SETTING["image_size"], "num_cluster": SETTING["k"],
        "batch_size": args.batch_size, "num_devices": -1, "dist": True, "num_workers": SETTING["loader_workers"],
        "epochs": args.schedule_epochs, "warmup_epochs": SETTING["warmup_epochs"],
        "learning_rate": SETTING["lr"], "learning_eta_min": 0.0, "weight_decay": SETTING["weight_decay"],
        "momentum_base": SETTING["ema"], "momentum_increase": False, "lambda_predictor_lr": 10,
        "feat_dim": 256, "hidden_size": 4096, "symmetric": True, "shuffling_bn": True,
        "temperature": SETTING["psl_temperature"], "cluster_loss_weight": SETTING["psl_weight"],
        "latent_std": SETTING["latent_std"], "use_gaussian_blur": False, "reassign": 1,
        "eval_metric": ["nmi", "acc", "ari"], "save_checkpoints": False, "save_freq": 100000,
        "test_freq": 100000, "wandb": False, "seed": args.seed,
    }


def run_official_child(args) -> None:
    """Child process: run the official ``main.py`` (ProPos, DigPro or HaDis) and record every E-step.

    The loss terms are read from ``BYOLWrapper.forward``'s outputs: L_psa and L_psl first, then
    the method's own term (:data:`EXTRA_TERMS`: DigPro's group loss, HaDis's HSD)."""
    import runpy

    import yaml

    _install_official_shims(args.threads, args.device)
    repo = Path(args.official_root) / OFFICIAL_REPOS[args.method]
    sys.path.insert(0, str(repo))
    if args.method == "propos":  # DigPro and HaDis vendor their own torch_clustering
        sys.path.insert(1, str(Path(args.official_root) / "torch_clustering"))
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "parity.yml"
    config_path.write_text(yaml.safe_dump(_official_config(args, Path(args.image_root), args.dataset)))
    record_path = Path(args.record)

    import models.basic_template as basic_template  # noqa: E402  (after the shims and sys.path)
    import models.propos.byol_wrapper as byol_wrapper  # noqa: E402

    losses: list[list[float]] = []
    clock = {"t": time.perf_counter()}
    term = EXTRA_TERMS[args.method]

    original_forward = byol_wrapper.BYOLWrapper.forward

    def forward(self, *a, **k):
        out = original_forward(self, *a, **k)
        row = [float(out[0]), float(out[1])]
        if term.official_index is not None:
            row.append(float(out[term.official_index]))
        losses.append(row)
        return out

    original_labeling = basic_template.TrainTask.psedo_labeling

    def psedo_labeling(self, n_iter):
        started = time.perf_counter()
        original_labeling(self, n_iter)
        epoch = self.cur_epoch - 1 if n_iter == 1 else self.cur_epoch
        now = time.perf_counter()
        record = {"epoch": epoch, "n_iter": int(n_iter), "e_step_seconds": now - started,
                  **epoch_record(self.mem_data["features"].numpy(), self.psedo_labels.numpy(),
                                 self.mem_data["labels"].numpy(), self.num_cluster)}
        if epoch > 0:
            mean = np.mean(np.asarray(losses), axis=0) if losses else [float("nan")] * 3
            gate = float(epoch > self.opt.warmup_epochs)
            record["psa"] = float(mean[0])
            record["psl_raw"] = float(mean[1])
            record["psl"] = float(mean[1]) * self.opt.cluster_loss_weight * gate
            record[term.key] = float(mean[2]) * term.weight if term.official_index is not None else 0.0
            if term.official_index is not None:
                record[f"{term.key}_raw"] = float(mean[2])
            record["loss"] = record["psa"] + record["psl"] + record[term.key]
            record["steps"] = len(losses)
            record["seconds"] = now - clock["t"]
            record["lr_last"] = float(next(g["lr"] for g in self.optimizer.param_groups
                                           if "predictor" not in g.get("name", "")))
        losses.clear()
        _append_jsonl(record_path, record)
        log(f"official {args.method} seed {args.seed} epoch {epoch}: {nmi_text(record)} "
            f"largest {record['largest_share']:.2f} std {record['feature_std']:.4f}")
        clock["t"] = time.perf_counter()
        if epoch >= args.epochs:
            raise StopParity

    byol_wrapper.BYOLWrapper.forward = forward
    basic_template.TrainTask.psedo_labeling = psedo_labeling
    os.chdir(run_dir)  # the official logger writes ./ckpt/<run name>/
    sys.argv = [str(repo / "main.py"), str(config_path)]
    try:
        runpy.run_path(str(repo / "main.py"), run_name="__main__")
    except StopParity:
        pass
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _map_cuda_to_cpu() -> None:
    """``Tensor.to`` / ``Module.to`` map a CUDA device (``'cuda'``, ``torch.device('cuda')``) to the CPU
    (the official CC and PICI code move models, batches and labels with ``.to('cuda')``)."""
    import torch

    def cpu(device):
        if isinstance(device, str) and device.startswith("cuda"):
            return "cpu"
        if isinstance(device, torch.device) and device.type == "cuda":
            return torch.device("cpu")
        return device

    def patch_to(cls):
        original = cls.to

        def to(self, *args, **kwargs):
            args = tuple(cpu(a) for a in args)
            if "device" in kwargs:
                kwargs["device"] = cpu(kwargs["device"])
            return original(self, *args, **kwargs)

        cls.to = to

    patch_to(torch.Tensor)
    patch_to(torch.nn.Module)


def _empty_cv2() -> None:
    """A ``cv2`` module without functions where OpenCV is not installed (the official CC and PICI
    ``modules/transform.py`` import it and never call it on the harness's path)."""
    import types

    if "cv2" not in sys.modules:
        try:
            import cv2  # noqa: F401
        except ImportError:
            sys.modules["cv2"] = types.ModuleType("cv2")


def _install_cc_shims(image_dir: Path, device: str = "cpu") -> None:
    """The runtime shims the official CC ``train.py`` needs on top of :func:`_install_official_shims`.

    * on the CPU (``device`` "cpu"), ``Tensor.to`` / ``Module.to`` map a CUDA device (``'cuda'``,
      ``torch.device('cuda')``) to the CPU: ``train.py`` moves the model, the batches and the losses
      with ``.to('cuda')``;
    * a ``cv2`` module without functions (``modules/transform.py`` imports OpenCV for its Gaussian
      blur, which the CIFAR branch never builds; the official environment has no OpenCV);
    * ``torchvision.datasets.CIFAR10`` returns the harness's image folder (torchvision's
      ``ImageFolder`` with the transform ``train.py`` passes) for ``train=True`` and an empty dataset
      for ``train=False``: ``train.py``'s CIFAR-10 branch (the transform with s = 0.5, K = 10, the
      train+test concatenation) then trains on exactly the harness's images;
    * ``utils.save_model`` does nothing (``train.py`` saves a checkpoint every 10 epochs and at the
      end; the ProPos/DigPro runs have checkpoints off too).
    """
    import torch
    import torchvision

    if device == "cpu":
        _map_cuda_to_cpu()
    _empty_cv2()

    folder_class = torchvision.datasets.ImageFolder

    def cifar10(root=None, train=True, transform=None, target_transform=None, download=False):
        folder = folder_class(str(image_dir), transform=transform, target_transform=target_transform)
        return folder if train else torch.utils.data.Subset(folder, [])

    torchvision.datasets.CIFAR10 = cifar10
    import utils  # the official package (its folder is first on sys.path)

    utils.save_model = lambda *a, **k: None


def run_official_cc_child(args) -> None:
    """Child process: run the official CC ``train.py`` and evaluate the cluster head after every epoch.

    ``train.py`` runs unmodified (``runpy``) on its CIFAR-10 branch, redirected to the harness's
    image folder (:func:`_install_cc_shims`), with its own ``config/config.yaml`` and the parity
    setting as command-line arguments.  Observation only: the model is captured when
    ``network.Network`` is built, the loss terms by wrapping ``InstanceLoss.forward`` /
    ``ClusterLoss.forward``, and the epochs by the training loader's iterator.  Before the first
    batch (epoch 0) and after each epoch the model is evaluated as the official ``cluster.py``
    does (``cluster.inference``: its test transform, batches of 500, eval mode, argmax of the
    cluster head), with the backbone features taken by a forward hook for the feature std; the
    model's train/eval mode and torch's, numpy's and Python's random states are restored after it,
    so the training run is the one ``train.py`` makes unobserved.
    """
    import math
    import runpy

    import torch

    _install_official_shims(args.threads, args.device)
    repo = Path(args.official_root) / OFFICIAL_REPOS["cc"]
    sys.path.insert(0, str(repo))
    image_dir = Path(args.image_root) / args.dataset
    _install_cc_shims(image_dir, args.device)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config").symlink_to(repo / "config", target_is_directory=True)  # train.py reads ./config/
    record_path = Path(args.record)

    import cluster as official_cluster  # noqa: E402
    import torchvision  # noqa: E402  (after the shims and sys.path)
    from modules import contrastive_loss, network, transform  # noqa: E402
    from torch.utils.data import DataLoader  # the original class, for the evaluation loader

    holder: dict = {}
    losses: list[list[float]] = []
    clock = {"t": time.perf_counter(), "train": 0.0, "epoch": 0}

    original_network_init = network.Network.__init__

    def network_init(self, *a, **k):
        original_network_init(self, *a, **k)
        holder["model"] = self

    original_instance = contrastive_loss.InstanceLoss.forward
    original_cluster = contrastive_loss.ClusterLoss.forward

    def instance_forward(self, z_i, z_j):
        loss = original_instance(self, z_i, z_j)
        holder["instance"] = float(loss)
        return loss

    def cluster_forward(self, c_i, c_j):
        with torch.no_grad():  # the entropy part of the official value, computed as the official code
            entropy = 0.0
            for c in (c_i, c_j):
                p = c.sum(0).view(-1)
                p = p / p.sum()
                entropy += float(math.log(p.size(0)) + (p * torch.log(p)).sum())
        loss = original_cluster(self, c_i, c_j)
        losses.append([holder.pop("instance", float("nan")), float(loss), entropy])
        return loss

    network.Network.__init__ = network_init
    contrastive_loss.InstanceLoss.forward = instance_forward
    contrastive_loss.ClusterLoss.forward = cluster_forward

    eval_set = torchvision.datasets.ImageFolder(
        str(image_dir), transform=transform.Transforms(size=CC_SETTING["image_size"]).test_transform)
    eval_loader = DataLoader(eval_set, batch_size=CC_SETTING["eval_batch_size"], shuffle=False, drop_last=False,
                             num_workers=0)

    def evaluate_and_record(epoch: int) -> None:
        model = holder["model"]
        with official_evaluation(model, model.resnet, lambda o: o, args.device) as feats:
            pred, gt = official_cluster.inference(eval_loader, model, torch.device(args.device))
        record = {"epoch": epoch, **epoch_record(torch.cat(feats).numpy(), pred, gt, CC_SETTING["k"])}
        now = time.perf_counter()
        if epoch > 0:
            mean = np.mean(np.asarray(losses), axis=0)
            record["instance"] = float(mean[0])
            record["cluster"] = float(mean[1])            # contrast + entropy, as the official loss
            record["entropy"] = float(mean[2])
            record["cluster_contrast"] = float(mean[1] - mean[2])
            record["loss"] = float(mean[0] + mean[1])
            record["steps"] = len(losses)
            record["seconds"] = now - clock["t"]
            record["train_seconds"] = clock["train"]
        losses.clear()
        _append_jsonl(record_path, record)
        log(f"official cc seed {args.seed} epoch {epoch}: {nmi_text(record)} "
            f"largest {record['largest_share']:.2f} std {record['feature_std']:.4f}")
        clock["t"] = time.perf_counter()

    class ObservedLoader(DataLoader):
        """train.py's training loader: evaluates before the first epoch and after each epoch."""

        def __iter__(self):
            if clock["epoch"] == 0 and "started" not in clock:
                clock["started"] = True
                evaluate_and_record(0)
            t0 = time.perf_counter()
            yield from super().__iter__()
            clock["train"] = time.perf_counter() - t0
            clock["epoch"] += 1
            evaluate_and_record(clock["epoch"])
            if clock["epoch"] >= args.epochs:
                raise StopParity

    torch.utils.data.DataLoader = ObservedLoader
    s = CC_SETTING
    os.chdir(run_dir)  # train.py reads ./config/config.yaml and creates --model_path
    sys.argv = [str(repo / "train.py"), "--dataset", "CIFAR-10", "--dataset_dir", str(args.image_root),
                "--resnet", s["resnet"], "--image_size", str(s["image_size"]), "--batch_size", str(args.batch_size),
                "--epochs", str(args.schedule_epochs), "--workers", str(s["loader_workers"]), "--seed", str(args.seed),
                "--model_path", str(run_dir / "save"), "--feature_dim", str(s["feature_dim"]),
                "--learning_rate", str(s["lr"]), "--weight_decay", str(s["weight_decay"]),
                "--instance_temperature", str(s["instance_temperature"]),
                "--cluster_temperature", str(s["cluster_temperature"])]
    try:
        runpy.run_path(str(repo / "train.py"), run_name="__main__")
    except StopParity:
        pass


def _install_pici_shims(device: str = "cpu") -> None:
    """The runtime shims the official PICI code needs on top of :func:`_install_official_shims`.

    * ``np.float`` (removed in numpy 1.24; ``utils/pos_embed.py`` builds the sin-cos positions with it)
      as the builtin ``float`` it aliased;
    * an empty ``cv2`` module (``modules/transform.py`` imports OpenCV and never calls it);
    * on the CPU (``device`` "cpu"), ``.to('cuda')`` maps to the CPU (:func:`_map_cuda_to_cpu`): the
      training functions move the batches, and ``match`` the CLI targets, with ``.to('cuda')``.
    """
    if "float" not in np.__dict__:
        np.float = float  # type: ignore[attr-defined]
    _empty_cv2()
    if device == "cpu":
        _map_cuda_to_cpu()


def pici_stage_of(epoch: int, stages) -> str:
    """The stage of training epoch ``epoch`` (0-based) for ``stages`` = (pretrain, train, boost) epochs:
    ``pretrain`` / ``train`` / ``boost``, as train_pici.py's ``epoch < 200`` / ``< 1000`` / else, scaled."""
    pretrain, train, _ = stages
    return "pretrain" if epoch < pretrain else ("train" if epoch < pretrain + train else "boost")


def run_official_pici_child(args) -> None:
    """Child process: the official PICI training, driven function by function, evaluated after every epoch.

    ``train_pici.py``'s ``__main__`` block hard-codes the stage boundaries (epochs 200 and 1000 of 1050),
    the model (``mae_vit_small_patch16``, 224 px) and dataset paths, so it cannot run on this setting
    unmodified.  This driver does what that block does, in its order, with the official classes and
    functions imported from the checkout (nothing copied): seeds (``torch.manual_seed``,
    ``np.random.seed``); the training set (torchvision ``ImageFolder`` of the harness's images with the
    official ``Transforms_BYOL``) and its shuffled loader (drop_last); the evaluation set
    (``test_transform``) and loader (batch 100); the boost stage's loader in one fixed random order
    (``MySampler`` of ``torch.randperm``); ``Network_mae`` around a ``MaskedAutoencoderViT`` of
    :data:`PICI_SETTING`'s size (norm_pix_loss); Adam; ``InstanceLoss`` / ``ClusterLoss``.  Then per epoch
    ``pretrain_one_epoch(data_loader)``, ``train_one_epoch(data_loader)`` or, in the boost stage,
    ``finetune_one_epoch(loader, labels)`` with ``labels = make_pseudo_label(loader, model, K)`` computed
    when the boost stage starts, at the boundaries of ``--pici-stages``.  The mean loss terms come from
    what those functions return.  Not done: the official checkpoint saving and its best-ACC selection
    (every epoch is reported) and its own prints.

    Before the first epoch (epoch 0) and after each epoch the model is evaluated as the official code
    evaluates (``cluster_pici.inference``: ``forward_cluster``, i.e. the argmax of the cluster head of the
    MASKED encoder, a random draw; batches of 100 of the test transform), with the [CLS] features taken by
    a forward hook for the feature std; the model's mode and torch's, numpy's and Python's random states
    are restored after it, so the training is the one the functions make unobserved.
    """
    from functools import partial
    from types import SimpleNamespace

    import torch
    import torchvision
    from torch.utils.data import DataLoader

    _install_official_shims(args.threads, args.device)
    _install_pici_shims(args.device)
    repo = Path(args.official_root) / OFFICIAL_REPOS["pici"]
    sys.path.insert(0, str(repo))
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chdir(run_dir)
    record_path = Path(args.record)

    import train_pici as tp  # noqa: E402  (after the shims and sys.path; its __main__ block does not run)
    from modules import contrastive_loss, models_mae, network, transform  # noqa: E402

    s = PICI_SETTING
    stages = tuple(args.pici_stages)
    device = torch.device(args.device)
    image_dir = str(Path(args.image_root) / args.dataset)
    workers = s["loader_workers"]
    # train_pici.py's __main__, in its order
    torch.manual_seed(args.seed)
    torch.cuda.manual_seed_all(args.seed)
    np.random.seed(args.seed)
    dataset = torchvision.datasets.ImageFolder(image_dir, transform=transform.Transforms_BYOL(size=s["image_size"]))
    class_num = s["k"]
    data_loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=workers)
    val_dataset = torchvision.datasets.ImageFolder(
        image_dir, transform=transform.Transforms_BYOL(size=s["image_size"]).test_transform)
    val_loader = DataLoader(val_dataset, batch_size=s["eval_batch_size"], shuffle=False, num_workers=workers)
    indices = torch.randperm(len(dataset))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, drop_last=True,
                        sampler=tp.MySampler(dataset, indices), num_workers=workers)
    mae = models_mae.MaskedAutoencoderViT(
        img_size=s["image_size"], patch_size=s["patch_size"], in_chans=3, embed_dim=s["embed_dim"], depth=s["depth"],
        num_heads=s["num_heads"], decoder_embed_dim=s["decoder_dim"], decoder_depth=s["decoder_depth"],
        decoder_num_heads=s["decoder_heads"], mlp_ratio=s["mlp_ratio"],
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), norm_pix_loss=s["norm_pix_loss"])
    model = network.Network_mae(mae, s["feature_dim"], class_num).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
    criterion_instance = contrastive_loss.InstanceLoss(args.batch_size, s["instance_temperature"], device).to(device)
    criterion_cluster = contrastive_loss.ClusterLoss(class_num, s["cluster_temperature"], device).to(device)
    # the training functions read these module globals (set by __main__ in the official run)
    tp.model, tp.optimizer = model, optimizer
    tp.criterion_instance, tp.criterion_cluster = criterion_instance, criterion_cluster
    tp.args = SimpleNamespace(batch_size=args.batch_size)
    steps = len(data_loader)
    clock = {"t": time.perf_counter()}

    def evaluate_and_record(epoch: int, stage: str | None = None, terms: dict | None = None) -> None:
        with official_evaluation(model, model.mae, lambda o: o[3], device.type) as feats:
            pred, gt = tp.inference(val_loader, model, device)
        record = {"epoch": epoch, **epoch_record(torch.cat(feats).numpy(), pred, gt, class_num)}
        now = time.perf_counter()
        if terms is not None:
            record.update(stage=stage, **terms, steps=steps, seconds=now - clock["t"])
        _append_jsonl(record_path, record)
        log(f"official pici seed {args.seed} epoch {epoch}{f' ({stage})' if stage else ''}: {nmi_text(record)} "
            f"largest {record['largest_share']:.2f} std {record['feature_std']:.4f}")
        clock["t"] = time.perf_counter()

    evaluate_and_record(0)
    pseudo_labels = None
    for epoch in range(min(args.epochs, sum(stages))):
        stage = pici_stage_of(epoch, stages)
        if stage == "pretrain":
            total = tp.pretrain_one_epoch(data_loader)
            terms = {"pisd": total / steps, "instance": None, "cluster": None, "cli": None}
        elif stage == "train":
            total, loss_i, loss_c, loss_re = tp.train_one_epoch(data_loader)
            terms = {"pisd": loss_re / steps, "instance": loss_i / steps, "cluster": loss_c / steps, "cli": None}
        else:
            if pseudo_labels is None:  # official: at epoch 1000, the boost stage's first epoch
                pseudo_labels = tp.make_pseudo_label(loader, model, class_num)
            total, loss_i, loss_c, loss_ce = tp.finetune_one_epoch(loader, pseudo_labels)
            terms = {"pisd": None, "instance": loss_i / steps, "cluster": loss_c / steps, "cli": loss_ce / steps}
        terms["loss"] = total / steps
        evaluate_and_record(epoch + 1, stage, terms)


# --------------------------------------------------------------------------- clusterkit (child)


def _probe_class(method: str = "propos"):
    """The ``parity_probe`` plugin class of an E-step ``method``'s runs (built lazily: clusterkit is
    imported only here); it records the loss terms as the official child does (:data:`EXTRA_TERMS`)."""
    import attrs

    from clusterkit import Plugin, hookimpl
    from clusterkit.cluster import kmeans

    term = EXTRA_TERMS[method]

    class ParityProbe(Plugin):
        """Benchmark-only plugin: records every E-step (features and pseudo-labels) and stops the
        run after ``stop_after`` epochs.  Registered by benchmarks/parity.py only."""

        @attrs.define
        class Params:
            record: str = ""
            stop_after: int = 1

        def __init__(self, params=None):
            super().__init__(params)
            self.t = time.perf_counter()
            self.e_step_start: float | None = None
            self.epoch_metrics: dict[int, dict] = {}

        def _record(self, state, epoch: int, labels) -> None:
            m = self.epoch_metrics.get(epoch, {}) if epoch > 0 else None
            terms = None if m is None else {
                "psa": float(m.get("diffused_sampling", float("nan"))),
                "psl": float(m.get("prototype_aggregation", 0.0)),
                term.key: float(m.get(term.clusterkit_metric, 0.0))}
            # the E-step's cost: the evaluation that closed the epoch (its feature pass and
            # k-means, which the E-step reuses) plus the E-step hooks themselves
            e_step = None if self.e_step_start is None or m is None \
                else time.perf_counter() - self.e_step_start + float(m.get("eval_seconds", 0.0))
            _write_probe_record(state, epoch, labels, self.targets, self.params.record, self.t, "", m, terms,
                                e_step_seconds=e_step)
            self.t, self.e_step_start = time.perf_counter(), None

        @hookimpl
        def on_epoch_start(self, state):
            self.e_step_start = time.perf_counter()  # the trainer calls the E-step right after

        @hookimpl(trylast=True)
        def e_step(self, state):
            # after kmeans_e_step: state.pseudo_labels are the k-means labels of the network
            # trained for state.epoch epochs, from the features state.features("train") holds
            self._record(state, state.epoch, state.pseudo_labels)
            if state.epoch >= self.params.stop_after:
                raise StopParity

        @hookimpl
        def on_epoch_end(self, state, metrics):
            self.epoch_metrics[state.epoch + 1] = dict(metrics)
            if state.epoch + 1 == state.epochs and state.epochs <= self.params.stop_after:
                # the schedule's last epoch has no E-step after it: run the E-step's k-means here
                p = state.recipe.plugins.get("kmeans_e_step") or {}
                result = kmeans(state.features("train"), state.num_clusters, metric=p.get("metric", "cosine"),
                                n_init=p.get("n_init", 10), max_iter=p.get("max_iter", 300),
                                tol=p.get("tol", 1e-4), seed=p.get("seed", state.recipe.run.seed))
                self._record(state, state.epoch + 1, result.labels)

    return ParityProbe


def _cc_probe_class():
    """The ``parity_probe`` plugin class of the CC runs (built lazily, as :func:`_probe_class`).

    CC has no E-step: the probe records the trainer's own evaluation (``eval.every: 1``, the
    ``predict`` hook of ``contrastive_heads``: argmax of the cluster head on the un-augmented
    images) with the harness's metrics.  Epoch 0 (the untrained network) is evaluated the same way
    at the start of the first epoch (``Trainer.predict`` on the features of the training images,
    which draws no random numbers).  ``cls.trainer`` is set by :func:`run_clusterkit_child`."""
    import attrs

    from clusterkit import Plugin, hookimpl

    class CCParityProbe(Plugin):
        """Benchmark-only plugin: records the cluster head's predictions of every epoch and stops the
        run after ``stop_after`` epochs.  Registered by benchmarks/parity.py only."""

        trainer = None

        @attrs.define
        class Params:
            record: str = ""
            stop_after: int = 1

        def __init__(self, params=None):
            super().__init__(params)
            self.t = time.perf_counter()

        def _record(self, state, epoch: int, labels, metrics=None) -> None:
            terms = None
            if metrics is not None:
                contrast = float(metrics.get("cluster_contrast", float("nan")))
                entropy = float(metrics.get("cluster_entropy", float("nan")))
                terms = {"instance": float(metrics.get("instance_contrast", float("nan"))),
                         "cluster_contrast": contrast, "entropy": entropy, "cluster": contrast + entropy}
            _write_probe_record(state, epoch, labels, self.targets, self.params.record, self.t, "cc ", metrics, terms)
            self.t = time.perf_counter()

        @hookimpl
        def on_epoch_start(self, state):
            if state.epoch == 0:
                pred = self.trainer.predict(state.features("train"))
                self._record(state, 0, pred.labels)

        @hookimpl
        def on_epoch_end(self, state, metrics):
            epoch = state.epoch + 1
            if "nmi" not in metrics:
                raise RuntimeError("the CC parity probe needs an evaluation every epoch (eval.every: 1)")
            self._record(state, epoch, self.trainer.last_prediction.labels, metrics)
            if epoch >= self.params.stop_after:
                raise StopParity

    return CCParityProbe


def _pici_probe_class():
    """The ``parity_probe`` plugin class of the PICI runs: :func:`_cc_probe_class`'s probe (the trainer's
    own evaluation of every epoch, epoch 0 included) with PICI's loss terms and the epoch's stage.
    ``cls.trainer`` is set by :func:`run_clusterkit_child`."""
    base = _cc_probe_class()

    def term(metrics: dict, *keys: str) -> float | None:
        """The sum of the metrics ``keys`` (a loss term), or None when the epoch's stage had none of them."""
        values = [float(metrics[k]) for k in keys if k in metrics]
        return sum(values) if values else None

    class PiciParityProbe(base):  # type: ignore[misc,valid-type]
        """Benchmark-only plugin: records the cluster head's predictions of every epoch with PICI's loss
        terms and stops the run after ``stop_after`` epochs.  Registered by benchmarks/parity.py only."""

        def _record(self, state, epoch: int, labels, metrics=None) -> None:
            terms = None
            if metrics is not None:
                terms = {"stage": metrics.get("stage", state.stage),
                         "pisd": term(metrics, "partial_self_discrimination"),
                         "instance": term(metrics, "instance_contrast"),
                         "cluster": term(metrics, "cluster_contrast", "cluster_entropy"),
                         "cli": term(metrics, "cross_level_interaction")}
            _write_probe_record(state, epoch, labels, self.targets, self.params.record, self.t, "pici ", metrics,
                                terms)
            self.t = time.perf_counter()

    return PiciParityProbe


def pici_stage_overrides(args) -> list[str]:
    """The ``--set`` overrides that give the PICI parity recipe ``args.pici_stages`` = (pretrain, train,
    boost) epochs: the recipe's three stages with their ``until`` moved (the plugins of each stage kept)."""
    from clusterkit.recipe import load_raw

    stages = load_raw(RECIPES["pici"]).get("stages") or []
    if [st.get("name") for st in stages] != ["pretrain", "train", "boost"]:
        raise SystemExit(f"{RECIPES['pici']} must have the stages pretrain, train and boost, in that order; "
                         f"it has {[st.get('name') for st in stages]}.")
    pretrain, train, _ = args.pici_stages
    ends = [pretrain, pretrain + train, None]
    return ["stages=" + json.dumps([{**st, "until": end} for st, end in zip(stages, ends, strict=True)])]


def clusterkit_overrides(args) -> list[str]:
    """The ``--set`` overrides of a clusterkit child's recipe: the harness's data, seed, schedule, batch,
    threads and device; for a ``--data-root`` folder its resolution (``data.decode_size``) and, without
    class folders, ``data.labels=none``; for PICI the stage lengths (:func:`pici_stage_overrides`); then
    ``--extra-set``."""
    overrides = [f"data.root={Path(args.image_root) / args.dataset}", f"run.seed={args.seed}",
                 f"schedule.epochs={args.schedule_epochs}", f"data.batch_size={args.batch_size}",
                 f"run.threads={args.threads}", "run.progress=false", f"run.device={args.device}"]
    meta = folder_meta(args.image_root, args.dataset)
    if meta is not None:
        overrides.append(f"data.decode_size={meta['decode_size'] or 'null'}")
        if not meta["labelled"]:
            overrides.append("data.labels=none")
    if getattr(args, "method", None) == "pici":
        overrides += pici_stage_overrides(args)
    return overrides + list(args.extra_set)


def run_clusterkit_child(args) -> None:
    """Child process: clusterkit's Trainer on the parity recipe plus the probe plugin."""
    import torch

    sys.path.insert(0, str(REPO))
    from clusterkit.data import load_dataset
    from clusterkit.plugin_manager import PluginInfo, autoload_disabled, discover
    from clusterkit.recipe import apply_overrides, load_raw, load_recipe
    from clusterkit.trainer import Trainer

    torch.set_num_threads(args.threads)
    raw = apply_overrides(load_raw(RECIPES[args.method]), clusterkit_overrides(args))
    raw["plugins"]["parity_probe"] = {"record": str(args.record), "stop_after": args.epochs}
    if raw.get("allow_plugins") is not None or autoload_disabled():
        raw["allow_plugins"] = [*(raw.get("allow_plugins") or []), "parity_probe"]
    recipe = load_recipe(data=raw)
    cls = {"cc": _cc_probe_class, "pici": _pici_probe_class}[args.method]() if args.method in ("cc", "pici") \
        else _probe_class(args.method)
    if args.method == "cc" and args.clusterkit_raw_pixels:
        # diagnostic only (no recipe key does this): the official CC code feeds raw [0, 1] pixels
        import attrs

        from clusterkit.data import datasets as ck_datasets

        info = ck_datasets.DATASETS["imagefolder"]
        ck_datasets.DATASETS["imagefolder"] = attrs.evolve(info, mean=(0.0,) * 3, std=(1.0,) * 3)
    available = {**discover(), "parity_probe": PluginInfo("parity_probe", "benchmarks/parity.py:ParityProbe",
                                                          "(benchmark)", "0", _cls=cls)}
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # the probe scores against the ground truth of the training images: the same folder, listed
    # lazily (no decoding) in the order the trainer loads it
    d = recipe.data
    cls.targets = load_dataset(d.dataset, d.root, d.split, d.image_size, cache=False).targets.numpy()
    trainer = Trainer(recipe, run_dir, available_plugins=available)
    cls.trainer = trainer
    try:
        trainer.fit()
    except StopParity:
        pass


# --------------------------------------------------------------------------- orchestration


def _git_commit(path: Path) -> str:
    """HEAD of a checkout, or '?'."""
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _source_digest() -> str:
    """A hash of clusterkit's source (clusterkit/ and plugins/, committed or not), so that a
    recorded run is reused only with the code that made it."""
    h = hashlib.sha1()
    for folder in ("clusterkit", "plugins"):
        for path in sorted((REPO / folder).rglob("*.py")):
            h.update(str(path.relative_to(REPO)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _run_key(args, method: str, system: str, seed: int) -> dict:
    """What makes two runs the same run (everything but how many epochs are run)."""
    key = {"method": method, "system": system, "seed": seed, "limit": args.limit, "batch_size": args.batch_size,
           "schedule_epochs": args.schedule_epochs, "threads": args.threads,
           "setting": method_setting(method)}
    if method == "pici":
        key["stages"] = list(args.pici_stages)
    if getattr(args, "data_meta", None):  # a --data-root folder (the Fashion-MNIST keys stay as they were)
        key["data"] = args.data_meta["name"]
    if getattr(args, "device", "cpu") != "cpu":
        key["device"] = args.device
    if system == "clusterkit":
        # the recipe as resolved through its `extends` chain: a change to a paper recipe it
        # inherits from (e.g. data.pipeline) is a different run
        from clusterkit.recipe import load_raw

        key["recipe"] = json.dumps(load_raw(RECIPES[method]), sort_keys=True, default=str)
        key["extra_set"] = list(args.extra_set)
        key["source"] = _source_digest()
        if method == "cc" and args.clusterkit_raw_pixels:
            key["raw_pixels"] = True
    else:
        key["official_commit"] = _git_commit(Path(args.official_root) / OFFICIAL_REPOS[method])
    return key


def _read_records(path: Path) -> list[dict]:
    """The epoch records of a run file (header line skipped), in epoch order."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted((r for r in rows if "epoch" in r), key=lambda r: r["epoch"])


def _header(path: Path) -> dict | None:
    """The run file's first line (its run key), or None."""
    if not path.exists():
        return None
    first = path.read_text().split("\n", 1)[0]
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return None
    return row.get("key") if isinstance(row, dict) else None


def prepare_data(args) -> tuple[Path, str]:
    """The images of the runs: Fashion-MNIST's PNGs (:func:`prepare_images`), or the ``--data-root``
    folder staged (:func:`prepare_folder`; then ``args.data_meta`` holds its description).  Stops
    with a message when the folder has fewer images than one batch."""
    if args.data_root is None:
        args.data_meta = None
        return prepare_images(args.work, args.limit)
    root, name, meta = prepare_folder(args.work, args.data_root, args.limit)
    if meta["images"] < args.batch_size:
        raise SystemExit(f"--data-root '{args.data_root}' holds {meta['images']} images, fewer than one batch "
                         f"(--batch-size {args.batch_size}); both systems drop the last incomplete batch, so "
                         "nothing would train. Pass a smaller --batch-size or a folder with more images.")
    args.data_meta = {**meta, "name": name}
    return root, name


def data_words(args) -> str:
    """The run's images in words, for the reports."""
    meta = getattr(args, "data_meta", None)
    if not meta:
        return f"the first {args.limit} Fashion-MNIST test images written as 28x28 PNGs"
    how = (f"labelled by {len(meta['classes'])} class folders" if meta["labelled"]
           else "unlabeled (no class folders: no NMI / ACC / ARI)")
    some = f"a seeded random {meta['images']} of the images" if meta.get("limit") else f"the {meta['images']} images"
    size = (f"{meta['decode_size']} px squares, clusterkit's crops cut from that size" if meta["decode_size"]
            else "of several sizes, decoded by clusterkit to image_size squares")
    return f"{some} of the folder `{meta['source_name']}` (`--data-root`), {how}, {size}"


def method_args(args, method: str):
    """``args`` as the runs of ``method`` see them: for PICI a copy whose ``epochs`` and ``schedule_epochs``
    are the sum of ``--pici-stages`` (its schedule is its stages); the others use ``args`` itself."""
    if method != "pici":
        return args
    total = sum(args.pici_stages)
    return argparse.Namespace(**{**vars(args), "epochs": total, "schedule_epochs": total})


def run_one(args, method: str, system: str, seed: int, data_root: Path, dataset: str) -> list[dict]:
    """Run (or reuse) one (method, system, seed) in its own subprocess; returns its records."""
    key = _run_key(args, method, system, seed)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    name = f"{method}_{system}_s{seed}_{digest}"
    record = args.work / "records" / f"{name}.jsonl"
    records = _read_records(record)
    if not args.rerun and _header(record) == key and len(records) >= args.epochs + 1 and \
            [r["epoch"] for r in records[: args.epochs + 1]] == list(range(args.epochs + 1)):
        log(f"[{name}] reusing {len(records) - 1} recorded epochs")
        return records[: args.epochs + 1]
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"key": key}) + "\n")
    run_dir = args.work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run folder: no files of an earlier attempt
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    python = args.official_python if system == "official" else sys.executable
    cmd = [str(python), str(Path(__file__).resolve()), "--child", system, "--method", method, "--seed", str(seed),
           "--epochs", str(args.epochs), "--schedule-epochs", str(args.schedule_epochs),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--record", str(record),
           "--run-dir", str(run_dir), "--image-root", str(data_root), "--dataset", dataset,
           "--official-root", str(args.official_root), "--device", args.device]
    for item in args.extra_set:
        cmd += ["--extra-set", item]
    if args.clusterkit_raw_pixels:
        cmd += ["--clusterkit-raw-pixels"]
    if method == "pici":
        cmd += ["--pici-stages", *map(str, args.pici_stages)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": "", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    log(f"[{name}] {system} {method} seed {seed}: {args.epochs} of {args.schedule_epochs} epochs "
        f"(log: {logs / (name + '.log')})")
    t0 = time.perf_counter()
    with open(logs / f"{name}.log", "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    records = _read_records(record)
    if proc.returncode != 0 or len(records) < args.epochs + 1:
        tail = (logs / f"{name}.log").read_text().splitlines()[-30:]
        raise SystemExit(f"[{name}] failed (exit {proc.returncode}, {len(records)} epochs recorded):\n"
                         + "\n".join(tail))
    log(f"[{name}] done in {time.perf_counter() - t0:.0f} s")
    return records[: args.epochs + 1]


# --------------------------------------------------------------------------- report


def _fmt(x, digits=3) -> str:
    """A number for the tables ('' for missing)."""
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return ""
    return f"{x:.{digits}f}"


def _table(records: list[dict], columns: list[tuple[str, Callable[[dict], str]]]) -> list[str]:
    """Markdown rows of per-epoch records: one column per (heading, cell of a record)."""
    return ["| " + " | ".join(heading for heading, _ in columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in records)]


def _term(heading: str, key: str, digits: int = 3) -> tuple[str, Callable[[dict], str]]:
    """A column of one record value (blank where the record has none)."""
    return heading, lambda r: _fmt(r.get(key), digits)


#: The columns every per-epoch table starts with (after the epoch, and PICI's stage) and ends with.
_SCORES = [("NMI", lambda r: _fmt(r["nmi"])), ("ACC", lambda r: _fmt(r["acc"])), ("ARI", lambda r: _fmt(r["ari"])),
           ("largest cluster", lambda r: f"{r['largest_share']:.1%}"),
           ("feature std", lambda r: _fmt(r["feature_std"], 4))]
_EPOCH = ("epoch", lambda r: str(r["epoch"]))
_TOTAL = [_term("loss", "loss"), _term("s/epoch", "seconds", 1)]


def per_epoch_table(records: list[dict], method: str = "propos") -> list[str]:
    """Markdown rows of one E-step run's per-epoch records (the third loss column is the method's own
    term, :data:`EXTRA_TERMS`)."""
    term = EXTRA_TERMS[method]
    return _table(records, [_EPOCH, *_SCORES, _term("L_psa", "psa"), _term("γ·L_psl", "psl", 4),
                            _term(term.heading, term.key, 4), *_TOTAL])


def per_epoch_table_cc(records: list[dict], method: str = "cc") -> list[str]:
    """Markdown rows of one CC run's per-epoch records."""
    return _table(records, [_EPOCH, *_SCORES, _term("L_ins", "instance"), _term("L_clu contrast", "cluster_contrast"),
                            _term("L_clu entropy", "entropy", 4), _term("L_clu", "cluster"), *_TOTAL])


def per_epoch_table_pici(records: list[dict], method: str = "pici") -> list[str]:
    """Markdown rows of one PICI run's per-epoch records (the stage of the epoch just trained)."""
    return _table(records, [_EPOCH, ("stage", lambda r: r.get("stage") or ""), *_SCORES, _term("L_pisd", "pisd"),
                            _term("L_ins", "instance"), _term("L_clu", "cluster"), _term("L_cli", "cli"), *_TOTAL])


def compare(results: dict, method: str, epochs: int) -> tuple[list[str], dict]:
    """The criteria of issue 13 for one method: per epoch, clusterkit's NMI of each seed within the
    official spread over seeds or within ±0.05 of the official mean, and its largest-cluster share
    within ±0.10 of the official mean.  Returns markdown rows and the verdict."""
    off = results.get((method, "official"), {})
    ck = results.get((method, "clusterkit"), {})
    lines = ["| epoch | official NMI (seeds) | official mean | clusterkit NMI (seeds) | NMI ok | "
             "official largest (mean) | clusterkit largest (seeds) | share ok | official / clusterkit s/epoch |",
             "|---|---|---|---|---|---|---|---|---|"]
    verdict = {"nmi_ok": 0, "share_ok": 0, "checked": 0}
    for e in range(epochs + 1):
        o = [recs[e] for recs in off.values() if len(recs) > e]
        c = [recs[e] for recs in ck.values() if len(recs) > e]
        if not o or not c:
            continue
        onmi = [r["nmi"] for r in o]
        labelled = None not in onmi and all(r["nmi"] is not None for r in c)
        mean = float(np.mean(onmi)) if labelled else None
        oshare = float(np.mean([r["largest_share"] for r in o]))
        nmi_ok = ([min(onmi) <= r["nmi"] <= max(onmi) or abs(r["nmi"] - mean) <= NMI_TOL for r in c]
                  if labelled else [])
        share_ok = [abs(r["largest_share"] - oshare) <= SHARE_TOL for r in c]
        verdict["checked"] += len(c)
        verdict["nmi_ok"] += sum(nmi_ok)
        verdict["share_ok"] += sum(share_ok)
        osec = [r["seconds"] for r in o if r.get("seconds")]
        csec = [r["seconds"] for r in c if r.get("seconds")]
        speed = f"{np.mean(osec):.1f} / {np.mean(csec):.1f}" if osec and csec else ""
        lines.append("| " + " | ".join([
            str(e), " ".join(_fmt(x) for x in onmi), _fmt(mean), " ".join(_fmt(r["nmi"]) for r in c),
            ("yes" if all(nmi_ok) else "**no**") if labelled else "n/a (unlabeled)", f"{oshare:.1%}",
            " ".join(f"{r['largest_share']:.1%}" for r in c), "yes" if all(share_ok) else "**no**", speed]) + " |")
    return lines, verdict


def command_line(args) -> str:
    """The benchmark's command, with repo-relative paths only (machine paths are left out)."""
    parts = ["python", "benchmarks/parity.py", "--methods", *args.methods, "--systems", *args.systems,
             "--seeds", *map(str, args.seeds), "--epochs", str(args.epochs), "--schedule-epochs",
             str(args.schedule_epochs)]
    data_root = getattr(args, "data_root", None)
    if data_root is not None:
        path = Path(data_root).resolve()
        parts += ["--data-root", str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name]
    if (args.limit != 5000) if data_root is None else (args.limit is not None):
        parts += ["--limit", str(args.limit)]
    if getattr(args, "device", "cpu") != "cpu":
        parts += ["--device", args.device]
    if args.batch_size != 256:
        parts += ["--batch-size", str(args.batch_size)]
    if args.threads != 2:
        parts += ["--threads", str(args.threads)]
    for item in args.extra_set:
        parts += ["--extra-set", item]
    if args.clusterkit_raw_pixels:
        parts += ["--clusterkit-raw-pixels"]
    if "pici" in args.methods:
        parts += ["--pici-stages", *map(str, args.pici_stages)]
        if set(args.methods) == {"pici"}:  # PICI's epochs are its stages: --epochs / --schedule-epochs do nothing
            i = parts.index("--epochs")
            del parts[i:i + 4]
    out = Path(args.out).resolve()
    parts += ["--out", str(out.relative_to(REPO)) if out.is_relative_to(REPO) else out.name]
    return shlex.join(parts)


def write_report(args, results: dict) -> None:
    """Write the markdown report and the raw JSON next to it."""
    import torch

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    estep = [m for m in args.methods if m in ESTEP_METHODS]
    cc = "cc" in args.methods
    propos_like = any(m in ("propos", "digpro") for m in estep)
    hadis = "hadis" in estep
    folders = ((("ProPos", "DigPro", "torch_clustering") if propos_like else ()) + (("HaDis",) if hadis else ())
               + (("Contrastive-Clustering",) if cc else ()))
    pici = "pici" in args.methods
    folders += ("PICI",) if pici else ()
    commits = {OFFICIAL_NAMES[d]: _git_commit(Path(args.official_root) / d)[:12] for d in folders}
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = " / ".join((["ProPos / DigPro"] if propos_like else []) + (["HaDis"] if hadis else [])
                       + (["CC"] if cc else []) + (["PICI"] if pici else []))
    lines = [
        f"# End-to-end parity: official {title} code vs clusterkit",
        "",
        f"Generated {now} by `{command_line(args)}` "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, {args.threads} torch "
        f"threads per run, one run at a time; clusterkit's torch {torch.__version__}).",
        "",
    ]
    if estep:
        lines += _estep_header(args, commits, estep)
    if cc:
        lines += _cc_header(args, commits)
    if pici:
        lines += _pici_header(args, commits)
    overall = {}
    for method in args.methods:
        lines += [f"## {LABELS[method]}", ""]
        if "official" in args.systems and "clusterkit" in args.systems:
            rows, verdict = compare(results, method, method_args(args, method).epochs)
            overall[method] = verdict
            lines += [f"### Summary against issue 13's criteria ({LABELS[method]})", "",
                      "Per epoch, each clusterkit seed's NMI must lie within the official code's spread over "
                      f"the seeds or within ±{NMI_TOL} of the official mean, and its largest-cluster share "
                      f"within ±{SHARE_TOL:.2f} of the official mean.", "", *rows, "",
                      (f"NMI criterion met in {verdict['nmi_ok']} of {verdict['checked']} (epoch, seed) cells; "
                       if not getattr(args, "data_meta", None) or args.data_meta["labelled"] else
                       "Unlabeled data: the NMI criterion is not checked; ")
                      + f"largest-cluster criterion in {verdict['share_ok']} of {verdict['checked']}.", ""]
        table = per_epoch_table if method in ESTEP_METHODS else per_epoch_table_cc
        table = per_epoch_table_pici if method == "pici" else table
        for system in args.systems:
            for seed, records in sorted(results.get((method, system), {}).items()):
                lines += [f"### {LABELS[method]}, {system}, seed {seed}", "", *table(records, method), ""]
    out.write_text("\n".join(lines))
    setting = {**SETTING, **(HADIS_SETTING if hadis else {})} if estep else CC_SETTING
    raw = {
        "command": command_line(args), "generated": now, "setting": {**setting, "limit": args.limit,
                                                                     "batch_size": args.batch_size,
                                                                     "epochs": args.epochs,
                                                                     "schedule_epochs": args.schedule_epochs},
        "official_commits": commits, "criteria": {"nmi_tol": NMI_TOL, "share_tol": SHARE_TOL}, "verdict": overall,
        "runs": [{"method": m, "system": s, "seed": seed, "epochs": recs}
                 for (m, s), by_seed in results.items() for seed, recs in sorted(by_seed.items())],
    }
    if estep and cc:
        raw["cc_setting"] = CC_SETTING
    if cc and args.clusterkit_raw_pixels:
        raw["clusterkit_raw_pixels"] = True
    if pici:
        raw["pici_setting"] = {**PICI_SETTING, "stages": list(args.pici_stages), "batch_size": args.batch_size,
                               "limit": args.limit}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    log(f"wrote {out} and {out.with_suffix('.json')}")


def _clusterkit_augmentation(args, methods) -> str:
    """How clusterkit's runs of ``methods`` made their views, in words: the ``data.pipeline`` of
    their recipes after ``--extra-set`` (e.g. "per image with torchvision transforms v2")."""
    from clusterkit.recipe import apply_overrides, load_raw

    words = {"batched": "on the whole batch as float tensors",
             "per_image": "per image with torchvision transforms v2 (float, no uint8 rounding)"}
    kinds = []
    for method in methods:
        data = apply_overrides(load_raw(RECIPES[method]), list(args.extra_set)).get("data", {})
        kind = data.get("pipeline", "batched")
        if kind not in kinds:
            kinds.append(kind)
    return " / ".join(f"{words.get(k, k)} (`data.pipeline: {k}`)" for k in kinds)


def _crop_source(args) -> str:
    """Where both systems cut their random crops from, in words (Fashion-MNIST or a ``--data-root`` folder)."""
    meta = getattr(args, "data_meta", None)
    if not meta:
        return ("both cut the random crops from the stored 28 px images (clusterkit's recipes set "
                "`data.decode_size: 28`) and resize them to 32 px")
    if meta["decode_size"]:
        return (f"both cut the random crops from the stored {meta['decode_size']} px images (clusterkit "
                f"decodes at that size, `data.decode_size: {meta['decode_size']}`) and resize them to 32 px")
    return ("the official code cuts its random crops from the files at their own sizes, clusterkit from the "
            "images decoded to 32 px squares (the files differ in size), both resizing them to 32 px")


def _estep_header(args, commits: dict, methods=("propos", "digpro")) -> list[str]:
    """The report's paragraphs on the E-step methods' runs (ProPos / DigPro / HaDis: setting, protocol,
    inherent differences); ``methods``: those of the report."""
    commits = {k: v for k, v in commits.items() if "Contrastive-Clustering" not in k}
    hadis = "hadis" in methods
    propos_like = [m for m in methods if m != "hadis"]
    names = ",".join((["propos", "digpro"] if propos_like else []) + (["hadis"] if hadis else []))
    recipes = f"{{{names}}}_fmnist.yaml" if "," in names else f"{names}_fmnist.yaml"
    released = "; ".join((["DigPro as released (group loss weight 0.3, extra EMA 0.99)"] if propos_like else [])
                         + ([_HADIS_WORDS] if hadis else []))
    terms = "; ".join((["λ·L_grp"] if propos_like else []) + (["L_hsd, HaDis"] if hadis else []))
    resize = "official ProPos `PIL.Image.resize` (bicubic, Pillow's default), official DigPro bilinear" \
        if propos_like else ""
    if hadis:
        resize = (resize + ", " if resize else "") + "official HaDis as ProPos (bicubic)"
    return [
        "Official code: " + ", ".join(f"{k}@{v}" for k, v in commits.items()) + ", run unmodified with runtime "
        "shims only (`torch._six`, `.cuda()` as a no-op, a one-process gloo group for nccl, DDP without "
        "device_ids), in its own environment (lightly 1.4.24, scikit-learn).",
        f"clusterkit: `benchmarks/parity/{recipes}` (git {_git_commit(REPO)[:12]}, "
        f"source digest {_source_digest()} of clusterkit/ and plugins/ including uncommitted changes)."
        + (f" Extra overrides of the clusterkit runs: `{' '.join(args.extra_set)}`." if args.extra_set else ""),
        "",
        f"Setting (issue 13): {data_words(args)} and read "
        "as an image folder by both (RGB, ImageNet normalisation), standard-stem ResNet-18 with torchvision's "
        f"init, 32 px, batch {args.batch_size}, {args.epochs} epochs of a {args.schedule_epochs}-epoch cosine "
        "schedule with 5 warm-up epochs, K = 10, lr 0.05, wd 5e-4, EMA 0.996, PSL weight 0.1 at temperature "
        f"0.5, latent std 0.001, symmetric; {released}.",
        "",
        "Every number is computed by the harness from what each system produced at its E-step: NMI / ACC / "
        "ARI of the E-step's k-means labels of all training images (train = evaluation data), the largest "
        "cluster's share, the feature std `std(norm(f), dim=0).mean()` of the target-branch features, the "
        f"epoch's mean loss terms as added to the loss (L_psa; γ·L_psl, 0 during warm-up; {terms}) and the "
        "wall time from one E-step's end to the next. Epoch 0 is the untrained network.",
        "",
        "What the harness cannot make identical (inherent to the two code bases, not to be confused with "
        "training differences):",
        "- Augmentation: " + _crop_source(args) + ", but the official code does it per image with PIL in "
        f"two loader workers (ColorJitter rounding to uint8 after each operation), clusterkit "
        f"{_clusterkit_augmentation(args, tuple(methods))} with its own random stream. The E-step images: "
        f"{resize}, clusterkit bilinear.",
        "- The official data order comes from a DistributedSampler with its default seed 0, so both official "
        "seeds see the same order (the seed changes the init, the augmentation draws and the noise); "
        "clusterkit's order depends on the run's seed.",
        "- s/epoch: clusterkit's includes writing its per-epoch checkpoint; the official runs have checkpoints "
        "off (they would keep one file per epoch) but include the official logger's per-iteration work. Runs "
        "are one at a time, but the machine may be shared with other work. In the run recorded in "
        "benchmarks/results/parity.md other jobs shared the 2 cores and the official seed-0 runs were paused "
        "for a while (their epoch-3 times include the pause): the s/epoch columns there are not timings.",
        *([_HADIS_DIFFERENCE] if hadis else []),
        "",
    ]


#: The report's words on the official HaDis setting (:func:`_estep_header`).
_HADIS_WORDS = ("HaDis as released (HSD weight 1 with no warm-up gate on the weight, tau 0.5, its student "
                "p(q + sigma·eps) the same diffused sample as L_psa's, the hardest pairs mined in the process's "
                "own batch; clusterkit `hardness_aware_distillation` with `noise: shared`, `mining: local`)")
#: What differs between the two HaDis runs besides the above (:func:`_estep_header`).
_HADIS_DIFFERENCE = (
    "- HaDis's HSD distances: the official code computes them as sqrt(max(|t|² + |s|² - 2 t·s, 1e-12)) in "
    "the training dtype, clusterkit from the differences (`torch.cdist`, exact for equal rows); the two can "
    "pick a different hardest pair only where two distances tie within float rounding. The official code "
    "also appends every step's losses to a text file (`loss_logger.txt`; in its s/epoch).")


def _cc_header(args, commits: dict) -> list[str]:
    """The report's paragraphs on the CC runs (setting, protocol, shims, known differences)."""
    s = CC_SETTING
    commit = commits.get(OFFICIAL_NAMES["Contrastive-Clustering"], "?")
    raw_pixels = args.clusterkit_raw_pixels
    return [
        f"CC official code: Yunfan-Li/Contrastive-Clustering@{commit}, `train.py` run unmodified (runpy) on its "
        "CIFAR-10 branch with its own `config/config.yaml` and the setting below as command-line arguments, "
        "in its own environment, with runtime shims only: `.to('cuda')` maps to the CPU, "
        "`torchvision.datasets.CIFAR10` returns the harness's image folder (torchvision `ImageFolder`, "
        "train.py's own transform) for the train split and an empty set for the test split, an empty `cv2` "
        "module (the blur is never built), `utils.save_model` off. Evaluation as the official `cluster.py` "
        "(`cluster.inference`: its test transform Resize(32) + ToTensor, batches of 500, eval mode, argmax of "
        "the cluster head), after every epoch, with the model's mode and the random states restored after it.",
        f"clusterkit: `benchmarks/parity/cc_fmnist.yaml` (git {_git_commit(REPO)[:12]}, source digest "
        f"{_source_digest()} of clusterkit/ and plugins/ including uncommitted changes), evaluated by its own "
        "evaluation (eval.every 1: `contrastive_heads`' predict, argmax of the cluster head)."
        + (f" Extra overrides of the clusterkit runs: `{' '.join(args.extra_set)}`." if args.extra_set else "")
        + (" **Diagnostic run: clusterkit fed raw [0, 1] pixels (`--clusterkit-raw-pixels`).**" if raw_pixels
           else ""),
        "",
        f"CC setting (issue 13): {data_words(args)} and read "
        f"as an image folder by both (RGB), standard-stem ResNet-18 with torchvision's init, {s['image_size']} px, "
        f"batch {args.batch_size} (drop_last), {args.epochs} epochs, Adam lr {s['lr']:g} (constant), weight decay "
        f"{s['weight_decay']:g}, instance temperature {s['instance_temperature']}, cluster temperature "
        f"{s['cluster_temperature']}, feature_dim {s['feature_dim']}, K = {s['k']}, CC's augmentation with "
        f"s = {s['jitter_strength']} (no blur); official loader with {s['loader_workers']} workers.",
        "",
        "Every number is computed by the harness from the predictions each system's own evaluation made: NMI / "
        "ACC / ARI of the cluster head's argmax on all training images (train = evaluation data), the largest "
        "cluster's share, the feature std `std(norm(h), dim=0).mean()` of the backbone features of the "
        "evaluation pass, the epoch's mean loss terms (L_ins; L_clu = cluster contrast + entropy term "
        "log K - H(P) summed over both views, as the official loss; the entropy term alone) and the wall time "
        "from one evaluation's end to the next (training plus the evaluation pass). Epoch 0 is the untrained "
        "network.",
        "",
        "What differs between the two CC runs besides the code itself:",
        "- Normalisation: the official CC code feeds raw [0, 1] pixels (train.py passes no mean/std); clusterkit "
        "normalises the views and the evaluation images with the image folder's ImageNet mean/std, and no recipe "
        "key switches that off (`--clusterkit-raw-pixels` does it at runtime, as a diagnostic)."
        + (" In this report it is on." if raw_pixels else " In this report it is off."),
        "- Augmentation: official per-image PIL RandomResizedCrop of the 28 px image to 32 px (antialiased), "
        "ColorJitter in torchvision's PIL implementation, grayscale p 0.2; clusterkit's batched path cuts the "
        "same distribution of crops from the 28 px images (`data.decode_size: 28`) with one bilinear grid_sample "
        "(supersampled when shrinking) and its own tensor jitter.",
        "- Evaluation images: official Resize((32, 32)) of the PIL image (bilinear, antialiased) in eval mode; "
        "clusterkit resizes the decoded 28 px images to 32 px with its bilinear resize in eval mode.",
        "- Data order: the official DataLoader shuffles from torch's global generator after `torch.manual_seed"
        "(seed)`; clusterkit's order is a function of (seed, epoch). Both change with the seed.",
        "- s/epoch: clusterkit's includes writing its per-epoch checkpoint; the official run has checkpoints off "
        "and uses 2 loader workers, clusterkit decodes once and augments in the main process.",
        "",
    ]


def _pici_header(args, commits: dict) -> list[str]:
    """The report's paragraphs on the PICI runs (setting, protocol, how the official code is driven, known
    differences)."""
    s = PICI_SETTING
    commit = commits.get(OFFICIAL_NAMES["PICI"], "?")
    pretrain, train, boost = args.pici_stages
    return [
        f"PICI official code: Regan-Zhang/PICI@{commit}. `train_pici.py`'s `__main__` block hard-codes its stage "
        "boundaries (epochs 200 and 1000 of 1050), its model (ViT-S/16 at 224 px) and its dataset paths, so the "
        "harness drives its functions in-process, in the order `__main__` calls them: the same seeding, the "
        "training `ImageFolder` with the official `Transforms_BYOL` views and a shuffled loader (drop_last, "
        f"{s['loader_workers']} workers), the boost stage's loader in one fixed `torch.randperm` order "
        "(`MySampler`), `Network_mae` around a `MaskedAutoencoderViT` of the size below, Adam, `InstanceLoss` / "
        "`ClusterLoss`, then `pretrain_one_epoch`, `train_one_epoch`, `make_pseudo_label` (once, when the boost "
        "stage starts) and `finetune_one_epoch`. Runtime shims only (`np.float`, an empty `cv2` module, "
        "`.to('cuda')` mapped to the CPU); its checkpoint saving and best-ACC checkpoint selection are not run. "
        "Evaluation as the official code evaluates (`cluster_pici.inference`: `forward_cluster`, the argmax of "
        f"the cluster head of the MASKED encoder, a random draw; test transform Resize(32), batches of "
        f"{s['eval_batch_size']}), after every epoch, with the model's mode and the random states restored after it.",
        f"clusterkit: `benchmarks/parity/pici_fmnist.yaml` (git {_git_commit(REPO)[:12]}, source digest "
        f"{_source_digest()} of clusterkit/ and plugins/ including uncommitted changes) with its stages set to "
        "the lengths below, evaluated by its own evaluation (eval.every 1: the argmax of the cluster head of the "
        "UNMASKED encoder, `masked_vit.test_time_masking: false` as the paper recipes)."
        + (f" Extra overrides of the clusterkit runs: `{' '.join(args.extra_set)}`." if args.extra_set else ""),
        "",
        f"PICI setting (issue 25): {data_words(args)} and read as an image folder by both (RGB, ImageNet "
        f"normalisation), {s['image_size']} px; one small ViT both build: patch {s['patch_size']} "
        f"({(s['image_size'] // s['patch_size']) ** 2} patches), width {s['embed_dim']}, {s['depth']} blocks, "
        f"{s['num_heads']} heads, MLP ratio {s['mlp_ratio']:g}, fixed 2-D sin-cos positions, MAE's init; MAE "
        f"decoder {s['decoder_dim']}-d x {s['decoder_depth']} blocks x {s['decoder_heads']} heads; masking ratio "
        f"{s['mask_ratio']}, normalised-pixel loss; CC's heads (instance {s['feature_dim']}-d, cluster K = "
        f"{s['k']}); batch {args.batch_size} (drop_last), Adam lr {s['lr']:g} constant, weight decay "
        f"{s['weight_decay']:g}, tau_I {s['instance_temperature']}, tau_C {s['cluster_temperature']}; stages "
        f"pretrain {pretrain} (PISD), train {train} (PISD + instance + cluster), boost {boost} (instance + "
        f"cluster + CLI with k-means n_init {s['cli_n_init']} on MinMax-scaled instance features, cross-entropy "
        "on the softmax outputs) epochs, scaled from the official 200 / 800 / 50.",
        "",
        "Every number is computed by the harness from the predictions each system's own evaluation made: NMI / "
        "ACC / ARI of the cluster head's argmax on all training images (train = evaluation data), the largest "
        "cluster's share, the feature std `std(norm(h), dim=0).mean()` of the [CLS] features of the evaluation "
        "pass, the stage of the epoch, the epoch's mean loss terms as added to the loss (L_pisd, the mean of the "
        "two views' reconstruction losses; L_ins; L_clu = cluster contrast + entropy term; L_cli) and the wall "
        "time from one evaluation's end to the next (training plus the evaluation pass; the boost stage's first "
        "epoch also its k-means). Epoch 0 is the untrained network.",
        "",
        "What differs between the two PICI runs besides the code itself:",
        "- Evaluation: the official code masks half of the patches at test time too, so its predictions and "
        "features are random draws; clusterkit evaluates the unmasked encoder (`--extra-set "
        "plugins.masked_vit.test_time_masking=true` evaluates as the official code, as a diagnostic). Official "
        "Resize((32, 32)) of the PIL image; clusterkit resizes the decoded 28 px images with its bilinear resize.",
        "- Views: official per-image PIL `Transforms_BYOL` (the second view adds Solarize p 0.2); clusterkit's "
        "torchvision v2 pipeline draws from the same distribution, its second view with `solarize_p: 0.2` "
        "(`RandomSolarize` at 0.5 on the float image: PIL's threshold 128 after rounding). The official blur is "
        "PIL's GaussianBlur with radius sigma in 0.1-2 px (no kernel cut-off), clusterkit's a Gaussian of that "
        "sigma on a 13-tap kernel (`blur_kernel: 13`; within 0.7 grey levels of PIL's on average on 32 px "
        "digits, reflect padding at the border where PIL replicates the edge). Clusterkit blurs and solarizes "
        "the float image, the official code the uint8 one (rounding to grey levels in between), and flips before "
        "the colour ops, the official code after the blur (the two commute).",
        "- CLI's k-means: official sklearn KMeans on the instance features of one augmented, masked draw of each "
        "view (two label sets, MinMax-scaled per batch); clusterkit's own k-means on the instance features of "
        "its evaluation pass (unmasked, not augmented), MinMax-scaled over the whole set, one label set for both "
        "views.",
        "- Data order and random streams: the official loaders shuffle from torch's global generator after "
        "`torch.manual_seed(seed)`, and every boost epoch visits the images in one fixed order; clusterkit's "
        "order is a function of (seed, epoch), its masking noise a function of (seed, step, view).",
        "- s/epoch: clusterkit's includes writing its per-epoch checkpoint; the official run saves none and uses "
        f"{s['loader_workers']} loader workers, clusterkit makes the views in the main process.",
        "",
    ]


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    """Command-line options (the orchestrator's and the children's)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["propos", "digpro"])
    p.add_argument("--systems", nargs="+", choices=("official", "clusterkit"), default=["official", "clusterkit"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=int, default=6, help="epochs to run (of the schedule)")
    p.add_argument("--schedule-epochs", type=int, default=30, help="length of the lr schedule")
    p.add_argument("--limit", type=int, default=None,
                   help="Fashion-MNIST: the first N test images (default 5000, at most 10000); --data-root: a "
                        "seeded random subset of N images (default: all)")
    p.add_argument("--data-root", type=Path, default=None, metavar="DIR",
                   help="train on this image folder instead of Fashion-MNIST: class sub-folders (<class>/<image>, "
                        "scored by NMI/ACC/ARI) or images at any depth (unlabeled: no NMI/ACC/ARI), as clusterkit's "
                        "imagefolder reads it; staged once under --work as links both systems read the same way")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where both systems train (cuda: the official code runs as written, on one GPU)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--work", type=Path, default=DEFAULT_WORK,
                   help="PNG cache, per-run records, logs and run folders (outside the repo)")
    p.add_argument("--official-root", type=Path, default=Path("/work/official"),
                   help="folder holding the ProPos, DigPro, HaDis, torch_clustering and Contrastive-Clustering "
                        "checkouts at the pinned commits (bash benchmarks/setup_official.sh makes it; "
                        "default %(default)s)")
    p.add_argument("--official-python", type=Path, default=Path("/work/official-venv/bin/python"),
                   help="python of the official code's environment (torch, torchvision, lightly 1.4.24, "
                        "scikit-learn 1.3.2, numpy<2, munkres, scipy, pyyaml, tqdm, matplotlib, timm; "
                        "bash benchmarks/setup_official.sh builds it; default %(default)s)")
    p.add_argument("--extra-set", action="append", default=[],
                   help="a --set override for the clusterkit runs (e.g. data.pipeline=per_image); repeatable")
    p.add_argument("--clusterkit-raw-pixels", action="store_true",
                   help="diagnostic, CC only: clusterkit's CC runs feed raw [0, 1] pixels as the official CC code "
                        "(the image folder's mean/std replaced by 0/1 at runtime; no recipe key does this)")
    p.add_argument("--pici-stages", nargs=3, type=int, default=list(PICI_STAGES), metavar=("P", "T", "B"),
                   help="PICI only: epochs of its pretrain (PISD), train (PISD + instance + cluster) and boost "
                        "(instance + cluster + CLI) stages, each at least 1 (official 200 800 50; default "
                        "%(default)s). PICI runs P + T + B epochs; --epochs and --schedule-epochs do not apply to it")
    p.add_argument("--rerun", action="store_true", help="do not reuse recorded runs")
    # children
    p.add_argument("--child", choices=("official", "clusterkit"), help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--record", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--image-root", help=argparse.SUPPRESS)
    p.add_argument("--dataset", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.epochs < 1 or args.epochs > args.schedule_epochs:
        p.error("--epochs must be between 1 and --schedule-epochs")
    if min(args.pici_stages) < 1:
        p.error(f"--pici-stages {' '.join(map(str, args.pici_stages))}: each of PICI's three stages (pretrain, "
                "train, boost) needs at least 1 epoch")
    check_data_args(p, args)
    return args


def check_data_args(p: argparse.ArgumentParser, args) -> None:
    """``--limit`` and ``--data-root`` (shared with benchmarks/speed_vs_official.py): Fashion-MNIST's
    default limit is 5000 of its 10000 test images; a folder's default is all of its images."""
    if args.child:
        return
    if args.data_root is None:
        if args.limit is None:
            args.limit = 5000
        if args.limit < args.batch_size or args.limit > 10000:
            p.error("--limit must be at least --batch-size and at most 10000 (Fashion-MNIST has 10000 test images)")
    else:
        if not args.data_root.is_dir():
            p.error(f"--data-root '{args.data_root}' is not a folder: pass a folder of images (class sub-folders for "
                    "labelled data, or images at any depth)")
        if args.limit is not None and args.limit < args.batch_size:
            p.error("--limit must be at least --batch-size")


def main(argv=None) -> None:
    """Run the benchmark (or, with the hidden --child option, one run of it)."""
    args = parse_args(argv)
    if args.child == "official":
        {"cc": run_official_cc_child, "pici": run_official_pici_child}.get(args.method, run_official_child)(args)
        return
    if args.child == "clusterkit":
        run_clusterkit_child(args)
        return
    args.work = args.work.resolve()
    if "official" in args.systems and not Path(args.official_python).exists():
        raise SystemExit(f"The official code's python '{args.official_python}' does not exist; create that "
                         "environment (see --help) or pass --official-python.")
    data_root, dataset = prepare_data(args)
    results: dict = {}
    for method in args.methods:
        for system in args.systems:
            for seed in args.seeds:
                records = run_one(method_args(args, method), method, system, seed, data_root, dataset)
                results.setdefault((method, system), {})[seed] = records
                write_report(args, results)  # a partial report after every run


if __name__ == "__main__":
    main()
