"""The EM training loop.  Plugins do the method-specific work through the hooks
documented in :mod:`clusterkit.hookspecs`; this module owns data, optimisation,
evaluation, logging and checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from timm.utils import distribute_bn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import __version__, amp, distributed
from .baselines import umap_baseline, umap_view
from .checkpoint import restore_training_state, rng_state, set_rng_state
from .cluster import KMeansPredictor, cluster_metrics, kmeans, quality_metrics
from .cluster.quality import QUALITY_KEYS
from .data import eval_transform, load_dataset
from .data.guides import guide_text, train_data_missing
from .data.pipeline import TrainPipeline, build_train_pipeline
from .errors import ClusterkitError, DataError, PluginError, RecipeError, RunDirError
from .errors import warn as _warn
from .guards import collapse_report
from .models import create_backbone
from .models.backbones import require_local_weights
from .models.recalibrate import recalibrated_batchnorm
from .plugin_manager import STAGED_HOOKS, HookDispatcher, load_plugins
from .recipe import Recipe, check_stages, load_recipe
from .rundir import CHECKPOINTS, RECIPE, RUN_OUTPUTS, RunDir, check_resumable, make_run_dir, trim_metrics_log
from .state import ParamGroup, Prediction, StepCache, TrainState

# make_run_dir, check_resumable, trim_metrics_log and RUN_OUTPUTS moved to clusterkit.rundir; importable
# from here as before.
__all__ = ["Trainer", "make_run_dir", "check_resumable", "trim_metrics_log", "RUN_OUTPUTS", "lr_at", "lr_for_step",
           "DivergenceError", "STAGED_HOOKS"]



class DivergenceError(RecipeError):
    """A loss term became NaN or infinite (or, with ``run.nonfinite: skip``, did so too often)."""


def _some(names: list[str], most: int = 5) -> str:
    """The first ``most`` names, quoted, and how many more."""
    shown = ", ".join(f"'{n}'" for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


class _StepLosses(nn.Module):
    """The step's loss computation as one module, so that DDP can wrap it: its forward runs
    the compute_losses hooks; its parameters are the whole model's."""

    def __init__(self, trainer: "Trainer"):
        super().__init__()
        self.model = trainer.state.model
        self._compute = trainer.compute_terms

    def forward(self, cache: StepCache) -> dict[str, torch.Tensor]:
        return self._compute(cache)


class _NonfiniteWatch:
    """Notes, on the device and without a host sync, the first step whose loss terms were not
    all finite (its global step, term and value); read at the sync points."""

    def __init__(self, device: torch.device):
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.term = torch.zeros((), dtype=torch.long, device=device)
        self.value = torch.zeros((), device=device)

    def update(self, terms: list[torch.Tensor], step: int) -> None:
        # a term's sum is non-finite when an element is (nan if one is nan, else +-inf)
        values = torch.stack([t.detach().float().sum() for t in terms])
        bad = ~torch.isfinite(values)
        first = bad.int().argmax()
        new = bad.any() & (self.step < 0)
        self.step = torch.where(new, torch.full_like(self.step, step), self.step)
        self.term = torch.where(new, first, self.term)
        self.value = torch.where(new, values[first], self.value)

    def read(self) -> tuple[int, int, float] | None:
        """(step, term index, value) of the earliest bad step on any rank, or None (a host sync)."""
        packed = torch.stack([self.step.double(), self.term.double(), self.value.double()])[None]
        bad = [row for row in distributed.gather(packed).tolist() if row[0] >= 0]
        if not bad:
            return None
        step, term, value = min(bad, key=lambda row: row[0])
        return int(step), int(term), value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(t: float, sched, base_lr: float) -> float:
    """Learning rate at fractional epoch ``t``: linear warm-up, then cosine (or constant).

    With ``cosine_denominator="total"`` (the official ProPos/DigPro code) the cosine runs
    over ``(t - warmup) / epochs``, so the last lr is small but not 0; with
    ``"after_warmup"`` it runs over ``(t - warmup) / (epochs - warmup)`` and ends at 0.
    """
    warm = sched.warmup_epochs
    if t < warm:
        return base_lr * t / warm
    if sched.lr_schedule == "constant":
        return base_lr
    span = sched.epochs if sched.cosine_denominator == "total" else max(sched.epochs - warm, 1)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (t - warm) / span))


def lr_for_step(step: int, steps_per_epoch: int, sched, base_lr: float) -> float:
    """Learning rate of the training iteration after ``step`` iterations (0-based).

    ``schedule.lr_clock: official`` reads the schedule at fractional epoch
    ``(step + 1) / steps_per_epoch``, as the official code's ``n_iter`` counted from 1 (its
    first step trains with a small positive lr); ``zero_based`` at ``step / steps_per_epoch``.
    """
    tick = step + 1 if sched.lr_clock == "official" else step
    return lr_at(tick / steps_per_epoch, sched, base_lr)


def _eta(history: list[dict], epochs_left: int) -> str:
    """``", ETA 3m 20s"``: the time the remaining epochs take at the mean pace of the last
    (up to five) epochs; empty at the end."""
    recent = [h["seconds"] for h in history[-5:] if "seconds" in h]
    if epochs_left <= 0 or not recent:
        return ""
    left = round(epochs_left * sum(recent) / len(recent))
    hours, rest = divmod(left, 3600)
    text = f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"
    return f", ETA {text} for the run"


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "clusterkit": __version__}
    for pkg in ("torch", "torchvision", "timm", "numpy", "scikit-learn", "pluggy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _diff(a: dict, b: dict) -> list[str]:
    """``"key: old -> new"`` lines for the dotted keys where two nested dicts differ."""
    from .recipe import differing_keys

    return [f"{key}: {va!r} -> {vb!r}" for key, (va, vb) in differing_keys([a, b])]


class Trainer:
    """Runs one recipe: ``Trainer(recipe, run_dir).fit()`` returns the summary dict.

    :meth:`fit` is the composition of the public steps, which notebooks, benchmarks and
    ``clusterkit.testing`` may also call one by one::

        trainer.build()                      # plugins, data, model, optimiser
        first = trainer.begin_run()          # resume or start; recipe.yaml, pixel baseline
        for epoch in range(first, epochs):
            trainer.begin_epoch(epoch)       # stage, data order, on_epoch_start, e_step
            for batch in trainer.loader:
                trainer.train_step(batch)    # lr, augment, one optimiser step, logging
            trainer.end_epoch()              # evaluate, on_epoch_end, metrics, checkpoint
        trainer.summary()                    # summary.json

    Lower level: :meth:`set_lr`, :meth:`step` (one optimiser step on given views),
    :meth:`evaluate`, :meth:`embed_dataset`, :meth:`predict`; ``hooks`` (a
    :class:`~clusterkit.plugin_manager.HookDispatcher`) calls the plugins.
    """

    #: the hook dispatcher class (``clusterkit.testing`` uses one that records ``setup``)
    dispatcher_class: type[HookDispatcher] = HookDispatcher

    def __init__(self, recipe: Recipe, run_dir: Path, resume: bool = False, available_plugins=None):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.available_plugins = available_plugins
        self.history: list[dict] = []          # the per-epoch records of this run (resumed ones included)
        self.eval_metrics: dict = {}           # the last evaluation's metrics
        self.last_prediction: Prediction | None = None
        self.skipped_steps = 0
        self.collapse_warnings: list[dict] = []
        self._feature_memo: dict = {}
        self._epoch: _EpochProgress | None = None
        self._fingerprint: dict | None = None   # the training data's, once computed

    # -- construction ------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        want = self.recipe.run.device
        if want == "cuda" and not torch.cuda.is_available():
            raise RecipeError("run.device is 'cuda' but no CUDA device is available; set run.device: auto "
                              "(CUDA when present, CPU otherwise) or cpu.")
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda" and distributed.is_distributed():  # torchrun: this process's GPU (LOCAL_RANK)
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device(want)

    def load_data(self):
        """(training dataset, evaluation dataset) of the recipe's ``data`` section, checked
        against ``e_step.k``, ``data.batch_size`` and the process count."""
        d = self.recipe.data
        eval_split = d.eval_split or d.split
        try:
            size = d.decode_size or d.image_size
            bar = self.recipe.run.progress and distributed.is_main()  # run.progress: false shows no bar at all
            train = load_dataset(d.dataset, d.root, d.split, size, cache=d.cache, skip_corrupt=d.skip_corrupt,
                                 labels=d.labels, progress=bar)
            evald = train if eval_split == d.split else load_dataset(
                d.dataset, d.root, eval_split, size, cache=d.cache, skip_corrupt=d.skip_corrupt, labels=d.labels,
                progress=bar)
        except DataError as exc:
            if d.guide is None or not train_data_missing(exc):
                raise
            raise DataError(f"{exc}\n\n{guide_text(d.guide)}") from None
        k = self.recipe.e_step.k
        if k > len(train):
            raise DataError(f"e_step.k = {k} clusters is more than the {len(train)} training images of "
                            f"'{d.dataset}' ({d.split} split). Lower e_step.k or use more data.")
        if d.batch_size > len(train):
            raise DataError(f"data.batch_size = {d.batch_size} is larger than the {len(train)} training images "
                            f"of '{d.dataset}' ({d.split} split), so no full batch exists. Lower data.batch_size "
                            f"to at most {len(train)}.")
        world = distributed.world_size()
        if d.batch_size % world:
            raise RecipeError(f"data.batch_size = {d.batch_size} is the global batch, split evenly over the "
                              f"{world} processes torchrun started, but {d.batch_size} is not a multiple of {world}. "
                              f"Use a batch size divisible by {world} (e.g. {d.batch_size - d.batch_size % world}) "
                              "or another --nproc_per_node.")
        return train, evald

    def _warn_about_setup(self) -> None:
        """Warn of settings that train but cannot give a meaningful result (NMI 0 with nothing said
        otherwise): a warm-up as long as the run, one class in labelled data, a data.root one level
        above the class folders."""
        r, ds = self.recipe, self.train_ds
        sched = r.schedule
        if 0 < sched.epochs <= sched.warmup_epochs:
            gated = [name for name, plugin in self.plugins.items()
                     if getattr(getattr(plugin, "params", None), "warmup_gate", False)]
            also = f", and the warm-up-gated losses of {', '.join(gated)} never turn on" if gated else ""
            _warn(f"schedule.warmup_epochs = {sched.warmup_epochs} is not below schedule.epochs = {sched.epochs}: "
                  f"the learning rate never leaves its linear warm-up{also}. Lower schedule.warmup_epochs or raise "
                  "schedule.epochs.")
        if not ds.has_labels:  # unlabeled data (data.labels): no classes to count
            return
        classes = sorted(set(np.asarray(ds.targets).tolist()))
        if len(classes) != 1:
            return
        name = ds.classes[classes[0]] if classes[0] < len(getattr(ds, "classes", [])) else str(classes[0])
        inner = Path(getattr(ds, "root", None) or ".") / name
        if r.data.dataset == "imagefolder" and inner.is_dir() and any(
                p.is_dir() and not p.name.startswith(".") for p in inner.iterdir()):
            _warn(f"data.root '{ds.root}' holds a single class folder, '{name}', whose sub-folders look like the "
                  f"classes: data.root is probably one level too high. Set data.root to '{inner}'.")
        else:
            _warn(f"the training data has a single class ('{name}'), so NMI, ACC and ARI against its labels are "
                  "0 or meaningless. Check data.root and data.split (one folder per class is expected).")

    def _make_pipeline(self) -> TrainPipeline:
        """The training loader and augmentation (``data.pipeline``).  Each process loads
        batch_size / world_size images per step: a DistributedSampler under torchrun
        (reseeded each epoch by ``set_epoch``), shuffling with a seeded generator in a single
        process."""
        d = self.recipe.data
        world = distributed.world_size()
        sampler = None
        if world > 1:
            sampler = torch.utils.data.DistributedSampler(
                self.train_ds, num_replicas=world, rank=distributed.rank(), shuffle=True, seed=self.recipe.run.seed)
        return build_train_pipeline(self.train_ds, d, batch_size=d.batch_size // world, device=self.device,
                                    sampler=sampler, generator=torch.Generator())

    def build(self) -> None:
        """Load the plugins and the data, build the model, the plugins' modules, the optimiser
        and (under torchrun) DDP: everything a run needs before its first epoch."""
        r = self.recipe
        check_stages(r)
        if r.run.threads:
            torch.set_num_threads(r.run.threads)
        seed_everything(r.run.seed)
        if r.run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
        self.device = self._device()
        self.pm, self.plugins = load_plugins(r.plugins, self.available_plugins, allow=r.allow_plugins)
        self.hooks = self.dispatcher_class(self.pm)
        if not self.hooks.impls("compute_losses"):  # checked before the data is loaded
            raise RecipeError("No plugin in the recipe returns a loss (compute_losses), so there is nothing to "
                              f"train{' (the recipe has no plugins)' if not r.plugins else ''}; add at least one "
                              "loss plugin under plugins:, e.g. diffused_sampling, or start from "
                              "recipes/quickstart.yaml.")
        self.train_ds, self.eval_ds = self.load_data()
        self._warn_about_setup()
        info = self.train_ds.info
        require_local_weights(r.model)
        model = nn.ModuleDict({"backbone": create_backbone(r.model, in_chans=info.channels)})
        self.pipeline = self._make_pipeline()
        self.loader, self.augment = self.pipeline.loader, self.pipeline.augment
        steps = len(self.loader)
        self.state = TrainState(recipe=r, device=self.device, model=model, num_train=len(self.train_ds),
                                steps_per_epoch=steps, feature_fn=self._features)
        self.hooks.state = self.state
        self.core_predictor = self.make_core_predictor()
        groups = [g for _, result in self.hooks.call("setup") if result for g in result]
        model.to(self.device)
        producers: dict = {"h": self._backbone_output}
        overridable = {"h"}  # the core's default, which one plugin may replace (a masked encoder)
        for impl, result in self.hooks.call("register_outputs"):
            for name, fn in (result or {}).items():
                if name in overridable:
                    overridable.discard(name)
                elif name in producers:
                    raise PluginError(f"Plugin '{impl}' registers step output '{name}', which another plugin "
                                      "already provides. Remove one of them from the recipe.")
                producers[name] = fn
        self.producers = producers
        self._fast_paths(model)
        self.optimizer = self._optimizer(groups)
        self.step_losses = self._wrap_ddp()
        self.use_amp = r.run.amp and self.device.type == "cuda"
        self.cpu_amp = amp.install_cpu_autocast(model, self.device, r.run)
        if distributed.is_distributed():
            # the model starts identical on every rank (same seed, and DDP broadcasts rank 0's);
            # augmentations and the plugins' own random draws then differ per rank
            seed_everything(r.run.seed + 7919 * distributed.rank())
        self.nonfinite = _NonfiniteWatch(self.device)
        self._feature_memo = {}

    def make_core_predictor(self) -> KMeansPredictor:
        """The core's prediction rule when no plugin predicts: spherical k-means."""
        return KMeansPredictor(self.recipe.e_step.k, metric="cosine", seed=self.recipe.run.seed)

    def _fast_paths(self, model: nn.ModuleDict) -> None:
        """SyncBatchNorm (torchrun), channels_last and torch.compile, as the recipe asks."""
        run = self.recipe.run
        if run.sync_bn and distributed.is_distributed():
            if self.device.type != "cuda":
                raise RecipeError("run.sync_bn is true but this torchrun job trains on the CPU, and torch's "
                                  "SyncBatchNorm runs on GPUs only. Set run.sync_bn: false for CPU runs (each "
                                  "process then normalises over its own share of the batch).")
            nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if run.channels_last:
            model.to(memory_format=torch.channels_last)
        if run.compile:
            model["backbone"].compile(backend=run.compile_backend)

    def _wrap_ddp(self) -> nn.Module:
        """The loss computation, wrapped in DistributedDataParallel under torchrun."""
        module = _StepLosses(self)
        if not distributed.is_distributed():
            return module
        r = self.recipe
        find_unused = bool(r.stages) if r.run.find_unused_parameters is None else r.run.find_unused_parameters
        # no buffer broadcast at each forward: banks and groups are kept identical by the plugins
        # themselves; BatchNorm running statistics are averaged over the ranks at each epoch's end
        import inspect

        no_buffer_sync = ({"forward_sync_buffers": False}  # torch >= 2.14; broadcast_buffers before
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        return DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=find_unused, **no_buffer_sync)

    def _backbone_output(self, cache: StepCache, view: int) -> torch.Tensor:
        """The default step output ``h``: pooled backbone features (B, D) of view ``view``."""
        return self.state.model["backbone"](cache.views[view])

    def _optimizer(self, groups: list[ParamGroup]) -> torch.optim.Optimizer:
        o = self.recipe.optim
        seen: set[int] = set()
        param_groups = []
        for g in groups:
            params = [p for p in g.params if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in params)
            if params:
                param_groups.append({"params": params, "lr_scale": g.lr_scale, "name": g.name or "group",
                                     "weight_decay": o.weight_decay if g.weight_decay is None else g.weight_decay})
        rest = [p for p in self.state.model.parameters() if p.requires_grad and id(p) not in seen]
        param_groups.insert(0, {"params": rest, "lr_scale": 1.0, "name": "default", "weight_decay": o.weight_decay})
        self.base_lr = o.lr * (self.recipe.data.batch_size / 256 if o.lr_scaling == "linear" else 1.0)
        cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        fused = self.device.type == "cuda" if o.fused is None else o.fused
        kwargs = {"fused": True} if fused else {}
        if o.name == "sgd":
            return torch.optim.SGD(param_groups, lr=self.base_lr, momentum=o.momentum, **kwargs)
        return cls(param_groups, lr=self.base_lr, betas=o.betas, **kwargs)

    # -- features and evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Features (B, D) of evaluation images (B, C, S, S), already transformed, on the device:
        the first ``embed`` hook that returns a value, else the backbone's pooled output."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            f = self.hooks.first("embed", images=images)
            return self.state.model["backbone"](images) if f is None else f

    @torch.no_grad()
    def embed_dataset(self, ds, batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
        """Features (N, D) of every image of ``ds`` in order, in eval mode, with the evaluation
        transform, in batches of ``data.eval_batch_size`` (``eval.bn: recalibrate``: BatchNorm
        statistics re-estimated on these images first).  Under torchrun each process embeds its
        contiguous shard and the shards are all-gathered, so every rank holds all N rows.
        ``progress``: a progress bar on stderr (rank 0)."""
        model = self.state.model
        was_training = model.training
        model.eval()
        bs = batch_size or self.recipe.data.eval_batch_size
        size = self.recipe.data.image_size
        first, last = distributed.shard_range(len(ds))
        # an empty shard (more processes than images) embeds one image to learn the width
        starts = range(first, last, bs) if last > first else [0]

        def batches():
            for start in starts:
                stop = min(start + bs, last) if last > first else 1
                images, _, _ = ds.__getitems__(list(range(start, stop)))
                yield eval_transform(images.to(self.device, non_blocking=True), size, ds.info), stop - start

        recalibrate = self.recipe.eval.bn == "recalibrate"
        with (recalibrated_batchnorm(model, self.embed, (x for x, _ in batches())) if recalibrate
              else contextlib.nullcontext()):
            feats = [self.embed(x).float()[: n if last > first else 0]
                     for x, n in tqdm(batches(), total=len(starts), desc=f"embedding {len(ds)} images", unit="batch",
                                      leave=False, disable=not (progress and distributed.is_main()), file=sys.stderr)]
        model.train(was_training)
        return distributed.gather_rows(torch.cat(feats), len(ds))

    def _features(self, split: str) -> torch.Tensor:
        ds = self.train_ds if split == "train" else self.eval_ds
        key = (id(ds), self.state.step)
        if key not in self._feature_memo:
            self._feature_memo = {k: v for k, v in self._feature_memo.items() if k[1] == self.state.step}
            self._feature_memo[key] = self.embed_dataset(ds)
        return self._feature_memo[key]

    def predict(self, features: torch.Tensor, fit: bool = True) -> Prediction:
        """Predictions for ``features`` (N, D) by the predict hook.  ``fit=True`` (evaluation):
        a rule fitted to data is fitted to these features and keeps what it needs;
        ``fit=False`` (new images of a finished run): the kept rule is applied.  Without a
        predict plugin, the core's spherical k-means (:class:`~clusterkit.cluster.KMeansPredictor`)."""
        pred = self.hooks.first("predict", features=features, fit=fit)
        if pred is None:
            pred = self.core_predictor.fit(features) if fit else self.core_predictor.assign(features)
        return pred

    def evaluate(self) -> dict:
        """Metrics of the eval data: NMI/ACC/ARI when it has labels (none when unlabeled), the
        label-free quality measures (:mod:`clusterkit.cluster.quality`), ``collapse_share`` and
        ``feature_std``."""
        feats = self._features("train" if self.eval_ds is self.train_ds else "eval")
        pred = self.predict(feats)
        self.last_prediction = pred
        metrics = cluster_metrics(self.eval_ds.targets, pred.labels.cpu()) if self.eval_ds.has_labels else {}
        metrics.update(quality_metrics(feats, pred.labels, self.recipe.e_step.k, pred.confidence,
                                       seed=self.recipe.run.seed))
        e = self.recipe.eval
        report = collapse_report(feats, pred.labels, self.recipe.e_step.k, e.collapse_share, e.collapse_std_ratio)
        self._record_collapse(report["warnings"], "evaluation")
        return {**metrics, "collapse_share": report["collapse_share"], "feature_std": report["feature_std"]}

    def labels_protocol(self) -> str:
        """summary.json's ``protocol.labels``: "unlabeled", or what the labels were used for."""
        if not self.eval_ds.has_labels:
            return "unlabeled"
        return "labelled (labels used for NMI/ACC/ARI only, never for training)"

    def _check_pseudo_labels(self) -> None:
        """After an E-step: warn when one pseudo-label cluster holds too much of the data."""
        labels = self.state.pseudo_labels
        if not torch.is_tensor(labels) or labels.dim() != 1 or labels.is_floating_point():
            return
        report = collapse_report(None, labels, self.recipe.e_step.k, self.recipe.eval.collapse_share)
        self._record_collapse(report["warnings"], "E-step pseudo-labels")

    def _record_collapse(self, warnings: list[tuple[str, float]], where: str) -> None:
        """Warn on stderr and keep ``{epoch, kind, value}`` for summary.json (and checkpoints)."""
        e = self.recipe.eval
        for kind, value in warnings:
            if kind == "cluster_share" and where != "evaluation":
                kind = "pseudo_label_share"
            self.collapse_warnings.append({"epoch": self.state.epoch + 1, "kind": kind, "value": value})
            if kind != "feature_std":
                _warn(f"epoch {self.state.epoch + 1}: {where}: one cluster holds {value:.1%} of the data "
                      f"(more than eval.collapse_share = {e.collapse_share}); the clustering may have collapsed.")
            else:
                _warn(f"epoch {self.state.epoch + 1}: {where}: the std of the L2-normalised features is "
                      f"{value:.2e}, below eval.collapse_std_ratio = {e.collapse_std_ratio} x 1/sqrt(D); the "
                      "features may have collapsed to a point.")

    def pixel_baseline(self) -> dict | None:
        """k-means on the raw pixels of the eval data (summary.json's ``pixel_kmeans``; rank 0 only;
        None for unlabeled data, which has nothing to score it against)."""
        if not distributed.is_main() or not self.eval_ds.has_labels:
            return None
        mode = self.recipe.eval.pixel_baseline
        n = len(self.eval_ds)
        x = None
        if mode == "always" or (mode == "auto" and n * int(np.prod(self.eval_ds[0][0].shape)) <= 2e7):
            x = self.eval_ds.pixels()
        if x is None:
            return None
        res = kmeans(x.to(self.device), self.recipe.e_step.k, metric="euclidean", n_init=10, seed=self.recipe.run.seed)
        return cluster_metrics(self.eval_ds.targets, res.labels.cpu())

    # -- the loop ----------------------------------------------------------------------------------
    def set_lr(self, iteration: int) -> float:
        """Set every parameter group's lr for training iteration ``iteration`` (0-based)."""
        lr = lr_for_step(iteration, self.state.steps_per_epoch, self.recipe.schedule, self.base_lr)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        return lr

    def _model_format(self, x: torch.Tensor) -> torch.Tensor:
        """Images in the model's memory format (channels_last when the recipe asks for it)."""
        return x.contiguous(memory_format=torch.channels_last) if self.recipe.run.channels_last else x

    def compute_terms(self, cache: StepCache) -> dict[str, torch.Tensor]:
        """The loss terms of the compute_losses hooks (float32 scalars); the forward of the
        (DDP-wrapped) :class:`_StepLosses`."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            terms: dict[str, torch.Tensor] = {}
            for impl, result in self.hooks.call("compute_losses", cache=cache):
                for name, value in (result or {}).items():
                    if name in terms:
                        raise PluginError(f"Plugin '{impl}' returns loss term '{name}', which another plugin "
                                          "also returns. Term names must be unique across plugins.")
                    terms[name] = value
        if not terms:
            raise RecipeError("No plugin in the recipe returns a loss (compute_losses); add at least one loss "
                              "plugin under plugins:, e.g. diffused_sampling.")
        return {k: v.float() if torch.is_tensor(v) else torch.tensor(float(v), device=self.device)
                for k, v in terms.items()}

    def step(self, views, index: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """One optimiser step on two augmented views (B, C, S, S) and their dataset indices (B,).

        Returns the detached loss terms plus ``loss`` (their sum), or None when a non-finite
        loss skipped the step (``run.nonfinite: skip``).  No host-device sync happens here
        except with ``nonfinite: skip``; non-finite terms are noted on the device and checked
        every ``run.sync_every`` steps (:meth:`_check_finite`).
        """
        state = self.state
        cache = StepCache([self._model_format(v) for v in views], index, self.producers, state)
        self._call_state_hook("on_step_start", cache)
        terms = self.step_losses(cache)
        total = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        if total.requires_grad:
            total.backward()  # under DDP every rank must run it, even for a step skipped below
        if self.recipe.run.nonfinite == "skip":
            finite = torch.stack([torch.isfinite(v).all() for v in terms.values()]).float()
            if not bool(distributed.all_reduce(finite, "min").all()):  # a sync every step, on every rank alike
                name = next(n for n, f in zip(terms, finite.tolist(), strict=True) if not f)  # bad on some rank
                self.optimizer.zero_grad(set_to_none=True)
                self._nonfinite(name, terms[name].detach())
                return None
        else:
            self.nonfinite.update(list(terms.values()), state.step)
            self.term_names = list(terms)
        self.hooks.call("before_optimizer_step", cache=cache)
        self.optimizer.step()
        state.step += 1
        self._call_state_hook("after_step", cache)
        terms["loss"] = total.detach()
        return {k: v.detach() for k, v in terms.items()}

    def _check_finite(self) -> None:
        """``run.nonfinite: stop``: raise DivergenceError if a step since the start noted a
        non-finite term (a host sync; called every ``run.sync_every`` steps and before
        evaluations and checkpoints, so no checkpoint holds a diverged model)."""
        if self.recipe.run.nonfinite != "stop":
            return
        bad = self.nonfinite.read()
        if bad is None:
            return
        step, term, value = bad
        spe = self.state.steps_per_epoch
        self.state.epoch, self.state.step_in_epoch, self.state.step = step // spe, step % spe, step
        self._nonfinite(self.term_names[term], torch.tensor(value))

    def _call_state_hook(self, hook: str, cache: StepCache) -> None:
        """Call ``on_step_start`` or ``after_step``, the hooks that update plugin state (EMA,
        banks, regrouping k-means) and so fail first on a diverged model: such a failure is
        reported as the divergence it is (:meth:`_check_diverged`)."""
        try:
            self.hooks.call(hook, cache=cache)
        except ClusterkitError:
            raise
        except Exception:  # a plugin failing on NaN/inf (a diverged step) is a divergence, said as such
            self._check_diverged(hook)
            raise

    def _check_diverged(self, hook: str) -> None:
        """A ``hook`` implementation raised: a DivergenceError instead when the run diverged (a
        noted non-finite loss term, or parameters that an optimiser step made NaN/inf)."""
        self._check_finite()
        bad = [name for name, p in self.state.model.named_parameters() if not torch.isfinite(p).all()]
        if not bad:
            return
        s = self.state
        where = f"at epoch {s.epoch + 1}, step {s.step_in_epoch + 1} (after {s.step} optimiser steps)"
        raise DivergenceError(f"The model's parameters became NaN or infinite {where} ({len(bad)} tensors, e.g. "
                              f"'{bad[0]}'), so the {hook} hooks could not go on; the run stopped and "
                              f"{self._kept_checkpoint()}.")

    def _kept_checkpoint(self) -> str:
        """What a stopped run leaves to resume from, and what to change (for divergence messages)."""
        ckpts = RunDir(self.run_dir).checkpoints
        if RunDir(self.run_dir).latest_checkpoint() is None:
            return ("no checkpoint was written yet (it diverged in its first epoch). Lower optim.lr (or raise "
                    "schedule.warmup_epochs), check the plugins' parameters, and start it again")
        return (f"the last good checkpoint in '{ckpts}' is kept. Lower optim.lr, check the plugin's parameters, "
                "or resume from that checkpoint with --resume")

    def _nonfinite(self, name: str, value: torch.Tensor) -> None:
        """A NaN/inf loss term: stop (``run.nonfinite: stop``), or count a skipped step and warn."""
        s, run = self.state, self.recipe.run
        shown = value.item() if value.numel() == 1 else "non-finite"
        where = f"at epoch {s.epoch + 1}, step {s.step_in_epoch + 1} (after {s.step} optimiser steps)"
        keep = self._kept_checkpoint()
        if run.nonfinite == "stop":
            raise DivergenceError(f"Loss term '{name}' became {shown} {where}; the run stopped and {keep} "
                                  "(run.nonfinite: skip skips such steps instead).")
        self.skipped_steps += 1
        if self.skipped_steps > run.max_skipped_steps:
            raise DivergenceError(f"Loss term '{name}' became {shown} {where}: {self.skipped_steps} steps skipped, "
                                  f"more than run.max_skipped_steps = {run.max_skipped_steps}; the run "
                                  f"stopped and {keep}.")
        _warn(f"loss term '{name}' became {shown} {where}; skipped this optimiser step "
              f"({self.skipped_steps} of at most run.max_skipped_steps = {run.max_skipped_steps}).")

    def _write_jsonl(self, record: dict) -> None:
        if not distributed.is_main():
            return
        RunDir(self.run_dir).append_record(record)

    def _checkpoint(self, epoch: int, wall: float) -> None:
        """Rank 0 writes the checkpoint; under torchrun it holds every rank's RNG state."""
        s = self.state
        rng = rng_state()
        rng_ranks = None
        if distributed.is_distributed():
            rng_ranks = [None] * distributed.world_size()
            torch.distributed.all_gather_object(rng_ranks, rng)
        if not distributed.is_main():
            return
        RunDir(self.run_dir).save_checkpoint({
            "epoch": epoch, "step": s.step, "model": s.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": rng, "rng_ranks": rng_ranks, "world_size": distributed.world_size(),
            "pseudo_labels": s.pseudo_labels, "centers": s.centers, "extra": s.extra,
            "plugins": {name: plugin.state_dict() for name, plugin in self.plugins.items()},
            "core": {"predict": self.core_predictor.state_dict()},
            "history": self.history, "wall_time": wall, "recipe": self.recipe.to_dict(),
            "recipe_hash": self.recipe.hash(), "data_fingerprint": self._data_fingerprint(),
            "skipped_steps": self.skipped_steps,
            "collapse_warnings": self.collapse_warnings,
        }, epoch, self.recipe.run.keep_last)

    def _restore(self) -> tuple[int, list, float]:
        """Load the newest readable checkpoint (after checking the recipe is the same); returns
        (first epoch to train, the per-epoch history so far, the wall time spent so far)."""
        found = RunDir(self.run_dir).load_latest_checkpoint()  # the newest readable one
        if found is None:
            raise RunDirError(f"Cannot resume '{self.run_dir}': it holds no checkpoint ({CHECKPOINTS}/epoch_*.pt). "
                              "A run writes its first checkpoint at the end of its first epoch; start it anew "
                              "with --force, or point --resume at another run directory.")
        _, ckpt = found
        saved = self._saved_recipe(ckpt)
        if saved != self.recipe.to_dict() and not self._extends(saved, ckpt):
            diff = "; ".join(_diff(saved, self.recipe.to_dict())) or "(formatting only)"
            raise RunDirError(f"Cannot resume '{self.run_dir}' with a changed recipe: {diff}. Resume with the "
                              f"recipe and --set overrides the run started with (its {RECIPE}), or start a new run.")
        self._check_same_data(ckpt)
        s = self.state
        restore_training_state(s, self.plugins, self.core_predictor, ckpt)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        s.epoch = ckpt["epoch"] + 1
        self.skipped_steps = ckpt.get("skipped_steps", 0)
        self.collapse_warnings = list(ckpt.get("collapse_warnings", []))
        world, saved_world = distributed.world_size(), ckpt.get("world_size", 1)
        if world == saved_world:
            set_rng_state(ckpt["rng_ranks"][distributed.rank()] if world > 1 else ckpt["rng"])
        else:
            seed_everything(self.recipe.run.seed + 7919 * distributed.rank() + 104_729 * s.epoch)
            _warn(f"resuming a run of {saved_world} process(es) with {world}: the data order and random draws "
                  "differ from an uninterrupted run from here on (the training itself is the same recipe).")
        if distributed.is_main():
            RunDir(self.run_dir).trim_metrics_log(ckpt["epoch"] + 1, s.step)
        return ckpt["epoch"] + 1, ckpt["history"], ckpt["wall_time"]

    def _data_fingerprint(self) -> dict:
        """The training data's fingerprint (computed once a run: it stats every file)."""
        if self._fingerprint is None:
            self._fingerprint = self.train_ds.fingerprint()
        return self._fingerprint

    def _check_same_data(self, ckpt: dict) -> None:
        """Refuse to resume on training data that changed since the checkpoint (files added,
        removed or rewritten): the resumed run would not equal an uninterrupted one."""
        saved = ckpt.get("data_fingerprint")
        if saved is None:
            _warn(f"the checkpoint of '{self.run_dir}' predates data fingerprints, so clusterkit cannot check "
                  "that the training data are the ones it started with.")
            return
        now = self._data_fingerprint()
        if saved["sha256"] == now["sha256"] and saved["count"] == now["count"]:
            return
        what = f"{saved['count']} training images then, {now['count']} now"
        if saved.get("files") is not None and now.get("files") is not None:
            before, after = set(saved["files"]), set(now["files"])
            for label, names in (("gone or changed", before - after), ("new or changed", after - before)):
                if names:
                    what += f"; {label}: {_some(sorted(names))}"
        elif saved["count"] == now["count"]:
            what += ", with different content"
        raise RunDirError(f"Cannot resume '{self.run_dir}': its training data changed since the checkpoint "
                          f"({what}). A resumed run equals an uninterrupted one only on the same data. Put the data "
                          "back as it was (data.root), or start a new run on the data as they are now.")

    def _extends(self, saved: dict, ckpt: dict) -> bool:
        """Whether this resume extends the run to more epochs: the recipes differ only in
        ``schedule.epochs``, which grew, and the learning rate does not depend on it (a constant
        schedule past the warm-up).  A cosine schedule, planned for the old length, is refused
        with the reason; so is fewer epochs than were trained."""
        now = self.recipe.to_dict()
        changed = _diff(saved, now)
        if len(changed) != 1 or not changed[0].startswith("schedule.epochs:"):
            return False
        old, new = saved["schedule"]["epochs"], self.recipe.schedule.epochs
        if new <= ckpt["epoch"]:
            raise RunDirError(f"Cannot resume '{self.run_dir}' with schedule.epochs = {new}: it has trained "
                              f"{ckpt['epoch'] + 1} epochs already. Resume with schedule.epochs = {old} (as it "
                              "started), or a larger value to extend it.")
        if self.recipe.schedule.lr_schedule != "constant":
            raise RunDirError(f"Cannot extend '{self.run_dir}' from {old} to {new} epochs: its "
                              f"{self.recipe.schedule.lr_schedule} learning-rate schedule was planned for {old} epochs "
                              "(the lr of every epoch depends on the total), so the longer run would not be the run "
                              f"a {new}-epoch recipe trains. Start a new run with --set schedule.epochs={new}; only "
                              "runs with schedule.lr_schedule: constant can be extended.")
        _warn(f"extending '{self.run_dir}' from {old} to {new} epochs (schedule.lr_schedule: constant).")
        if distributed.is_main():
            RunDir(self.run_dir).write_recipe(self.recipe)
        return True

    @staticmethod
    def _saved_recipe(ckpt: dict) -> dict:
        """The recipe a checkpoint was written with, re-read through today's schema, so that keys
        added to clusterkit since then (at their defaults) do not count as a change; as saved
        when it no longer validates."""
        try:
            return load_recipe(data=ckpt["recipe"]).to_dict()
        except RecipeError:
            return ckpt["recipe"]

    def _epoch_means(self, sums: dict[str, torch.Tensor], done: int) -> dict[str, float]:
        """Mean loss terms of the epoch, averaged over the processes (one host sync)."""
        if not sums:
            return {}
        names = list(sums)
        packed = torch.stack([torch.as_tensor(sums[k], device=self.device, dtype=torch.float32) / max(done, 1)
                              for k in names])
        return dict(zip(names, distributed.all_reduce(packed, "mean").tolist(), strict=True))

    # -- the run ----------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train the recipe (or resume it, ``resume=True``) to its last epoch; returns the
        summary that is also written to ``summary.json``."""
        self.build()
        first_epoch = self.begin_run()
        for epoch in range(first_epoch, self.recipe.schedule.epochs):
            self.begin_epoch(epoch)
            for batch in self.loader:
                self.train_step(batch)
            self.end_epoch()
        return self.summary()

    def begin_run(self) -> int:
        """Resume from the run directory's checkpoint (``resume=True``; the checkpoint and the
        recipe are checked before anything is written) or write ``recipe.yaml``; compute the
        pixel baseline.  Returns the first epoch to train (0-based)."""
        if self.resume:
            first_epoch, self.history, self._wall_before = self._restore()
        else:
            first_epoch, self.history, self._wall_before = 0, [], 0.0
            if distributed.is_main():
                RunDir(self.run_dir).write_recipe(self.recipe)
        self.baseline = self.pixel_baseline()
        self.umap_baseline = umap_baseline(self)  # "UMAP + k-means on pixels" (clusterkit.baselines)
        self._t_start = time.perf_counter()
        self.eval_metrics = next((h for h in reversed(self.history) if "collapse_share" in h), {})  # last evaluation
        return first_epoch

    def begin_epoch(self, epoch: int) -> None:
        """Enter epoch ``epoch`` (0-based): its stage and the plugins it switches off, its data
        order (a function of run.seed and the epoch only), ``on_epoch_start``, and the E-step
        when one is due (before the first epoch, then every ``e_step.every`` epochs)."""
        state, r = self.state, self.recipe
        previous = state.stage
        state.epoch = epoch
        stage = r.stage_at(epoch)
        state.stage = stage.name if stage is not None else None
        self.hooks.inactive = frozenset(r.inactive_plugins(epoch))
        if stage is not None and stage.name != previous and r.run.progress:
            active = [name for name in r.plugins if name not in self.hooks.inactive]
            tqdm.write(f"stage '{stage.name}' from epoch {epoch + 1}: {', '.join(active)}", file=sys.stderr)
        state.scalars.clear()  # what plugins log (state.log) belongs to the epoch that logged it
        self._epoch = _EpochProgress(time.perf_counter(), tqdm(
            total=state.steps_per_epoch, desc=f"epoch {epoch + 1}/{r.schedule.epochs}", unit="step",
            disable=not (r.run.progress and distributed.is_main()), leave=False, dynamic_ncols=True, file=sys.stderr))
        sampler = self.loader.sampler
        if isinstance(sampler, torch.utils.data.DistributedSampler):
            sampler.set_epoch(epoch)
        else:
            self.loader.generator.manual_seed(r.run.seed * 100_003 + epoch)
        self.hooks.call("on_epoch_start")
        if epoch == 0 or epoch % r.e_step.every == 0:
            self.hooks.call("e_step")
            self._check_pseudo_labels()

    def train_step(self, batch) -> dict[str, torch.Tensor] | None:
        """One training iteration on a batch of :attr:`loader`: set the lr, make the two views
        (``data.pipeline``), run :meth:`step`, and account for it (epoch means, metrics.jsonl
        every ``run.log_every`` steps, the progress bar).  Returns the detached loss terms, or
        None for a step skipped as non-finite (``run.nonfinite: skip``)."""
        state, run, ep = self.state, self.recipe.run, self._epoch
        state.step_in_epoch = ep.batches
        ep.lr = self.set_lr(state.epoch * state.steps_per_epoch + ep.batches)
        ep.batches += 1
        views, index = self.pipeline.views(batch)
        terms = self.step(views, index)
        ep.bar.update(1)
        if terms is None:
            return None
        ep.done += 1
        for k, v in terms.items():
            ep.sums[k] = ep.sums[k] + v if k in ep.sums else v.clone()
        ep.seen += index.shape[0] * distributed.world_size()
        # host syncs of the loop: here every run.log_every and run.sync_every steps (and in
        # step() every step under run.nonfinite: skip)
        if state.step % run.log_every == 0:
            self._check_finite()
            logged = self._epoch_means(terms, 1)
            self._write_jsonl({"epoch": state.epoch + 1, "step": state.step, "lr": ep.lr, **logged, **state.scalars})
        if ep.done % run.sync_every == 0:
            self._check_finite()
            if not ep.bar.disable:
                shown = {k: float(v) / ep.done for k, v in ep.sums.items()} | state.scalars
                ep.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()}
                                   | {"img/s": f"{ep.seen / (time.perf_counter() - ep.start):.0f}"}, refresh=False)
        return terms

    def end_epoch(self) -> dict:
        """Close the epoch: evaluate when due (every ``eval.every`` epochs and at the last),
        ``on_epoch_end``, the epoch's record in metrics.jsonl and the checkpoint.  Returns the
        record (loss means, lr, NMI/ACC/ARI and quality measures when evaluated, seconds)."""
        state, r, ep = self.state, self.recipe, self._epoch
        epoch = state.epoch
        ep.bar.close()
        self._check_finite()  # before anything is evaluated or checkpointed
        if distributed.is_distributed():
            distribute_bn(state.model, distributed.world_size(), reduce=True)  # one BN state on every rank
        metrics = {"epoch": epoch + 1, "step": state.step, "lr": ep.lr, **self._epoch_means(ep.sums, ep.done),
                   **state.scalars}
        if state.stage is not None:
            metrics["stage"] = state.stage
        if (epoch + 1) % r.eval.every == 0 or epoch + 1 == r.schedule.epochs:
            self.eval_metrics = self.evaluate()
            metrics.update(self.eval_metrics)
        self.hooks.call("on_epoch_end", metrics=metrics)
        metrics["seconds"] = time.perf_counter() - ep.start
        self.history.append(metrics)
        self._write_jsonl(metrics)
        self._checkpoint(epoch, self._wall_before + time.perf_counter() - self._t_start)
        if distributed.is_main():  # the per-epoch result line stays with run.progress: false (only the bars go)
            shown = " ".join(f"{k} {metrics[k]:.3f}" for k in ("loss", "nmi", "acc", "ari", "silhouette",
                                                               "size_entropy") if metrics.get(k) is not None)
            tqdm.write(f"epoch {epoch + 1}/{r.schedule.epochs}  {shown}  ({metrics['seconds']:.1f}s"
                       f"{_eta(self.history, r.schedule.epochs - epoch - 1)})", file=sys.stderr)
        return metrics

    def summary(self) -> dict:
        """The run's summary (rank 0 also writes it to ``summary.json``): final metrics and
        label-free quality, the pixel baseline, the evaluation protocol, time, memory, versions."""
        r, state = self.recipe, self.state
        wall = self._wall_before + time.perf_counter() - self._t_start
        epoch_secs = [h["seconds"] for h in self.history]
        summary = {
            "name": r.name, "run_dir": str(self.run_dir), "recipe_hash": r.hash(), "seed": r.run.seed,
            "metrics": {k: self.eval_metrics.get(k) for k in ("nmi", "acc", "ari")},
            "quality": {k: self.eval_metrics.get(k) for k in QUALITY_KEYS},
            "pixel_kmeans": self.baseline,
            "umap_kmeans": self.umap_baseline,
            "umap_view": umap_view(self, lambda: self._features("train" if self.eval_ds is self.train_ds else "eval")),
            "protocol": {
                "dataset": r.data.dataset, "labels": self.labels_protocol(), "train_split": r.data.split,
                "eval_split": r.data.eval_split or r.data.split,
                "test_data_used_for_training": r.data.split in ("test", "all"),
                "prediction": "predict hook: " + (", ".join(self.hooks.names("predict")) or "core k-means"),
                "model_selection": "none (final epoch)",
            },
            "epochs": r.schedule.epochs, "steps": state.step, "num_train": len(self.train_ds),
            "wall_time_s": wall, "seconds_per_epoch": float(np.mean(epoch_secs)) if epoch_secs else None,
            "peak_memory_mb": distributed.all_reduce(
                torch.tensor(_peak_memory_mb(self.device), dtype=torch.float64, device=self.device), "max").item(),
            "device": str(self.device), "world_size": distributed.world_size(),
            "num_params": sum(p.numel() for p in state.model.parameters()),
            "skipped_images": list(getattr(self.train_ds, "skipped", []) or []),
            "skipped_steps": self.skipped_steps, "collapse_warnings": self.collapse_warnings,
            "versions": _versions(),
        }
        if distributed.is_main():
            RunDir(self.run_dir).write_summary(summary)
        return summary


@attrs.define
class _EpochProgress:
    """What the trainer counts during one epoch: its start time, progress bar, batches begun,
    optimiser steps done, images seen, summed loss terms (on the device) and the last lr."""

    start: float
    bar: Any
    batches: int = 0
    done: int = 0
    seen: int = 0
    sums: dict = attrs.field(factory=dict)
    lr: float = 0.0
