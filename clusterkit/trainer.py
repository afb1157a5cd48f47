"""The EM training loop.  Plugins do the method-specific work through the hooks
documented in :mod:`clusterkit.hookspecs`; this module owns data, optimisation,
evaluation, logging and checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import (atomic_write_text, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint,
                         set_rng_state)
from .cluster import cluster_metrics, kmeans
from .cluster.kmeans import assign as kmeans_assign
from .data import BatchedTwoView, collate_batched, eval_transform, load_dataset
from .data.guides import guide_text, train_data_missing
from .errors import DataError, PluginError, RecipeError, RunDirError
from .guards import collapse_report
from .models import create_backbone
from .models.backbones import require_local_weights
from .plugin_manager import load_plugins
from .recipe import Recipe, check_stages, dump_recipe, load_recipe
from .state import ParamGroup, Prediction, StepCache, TrainState

__all__ = ["Trainer", "make_run_dir", "lr_at", "DivergenceError", "STAGED_HOOKS"]

#: Hooks that a plugin switched off by the recipe's ``stages`` does not receive.  setup,
#: register_outputs, embed and predict always run, so modules and outputs exist throughout.
STAGED_HOOKS = frozenset({"on_epoch_start", "e_step", "on_step_start", "compute_losses", "after_step",
                          "on_epoch_end"})


class DivergenceError(RecipeError):
    """A loss term became NaN or infinite (or, with ``run.nonfinite: skip``, did so too often)."""


def _warn(text: str) -> None:
    """A warning line on stderr that does not break a running progress bar."""
    tqdm.write(f"clusterkit: warning: {text}", file=sys.stderr)


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


def make_run_dir(recipe: Recipe, out: str | None, force: bool) -> Path:
    """A fresh run directory (``out``, or ``run.out_dir/<name>/<time>``)."""
    if out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(recipe.run.out_dir) / recipe.name / stamp
        n = 1
        while path.exists():
            path = Path(recipe.run.out_dir) / recipe.name / f"{stamp}-{n}"
            n += 1
    else:
        path = Path(out)
        if path.exists() and any(path.iterdir()) and not force:
            raise RunDirError(f"Run directory '{path}' already exists and is not empty. Use --resume {path} "
                              "to continue that run, --force to overwrite it, or choose another --out.")
        if path.exists() and force:
            for child in ("metrics.jsonl", "summary.json", "recipe.yaml"):
                (path / child).unlink(missing_ok=True)
            for old in (path / "checkpoints").glob("*.pt") if (path / "checkpoints").is_dir() else []:
                old.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


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


def _diff(a, b, prefix="") -> list[str]:
    """Human-readable differences between two nested dicts."""
    lines = []
    for key in sorted(set(a) | set(b), key=str):
        path = f"{prefix}{key}"
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            lines += _diff(va, vb, path + ".")
        elif va != vb:
            lines.append(f"{path}: {va!r} -> {vb!r}")
    return lines


class Trainer:
    """Runs one recipe: ``Trainer(recipe, run_dir).fit()`` returns the summary dict."""

    def __init__(self, recipe: Recipe, run_dir: Path, resume: bool = False, available_plugins=None):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.available_plugins = available_plugins

    # -- construction ------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        want = self.recipe.run.device
        if want == "cuda" and not torch.cuda.is_available():
            raise RecipeError("run.device is 'cuda' but no CUDA device is available; set run.device: auto "
                              "(CUDA when present, CPU otherwise) or cpu.")
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(want)

    def _load_data(self):
        d = self.recipe.data
        eval_split = d.eval_split or d.split
        try:
            train = load_dataset(d.dataset, d.root, d.split, d.image_size, cache=d.cache,
                                 skip_corrupt=d.skip_corrupt)
            evald = train if eval_split == d.split else load_dataset(
                d.dataset, d.root, eval_split, d.image_size, cache=d.cache, skip_corrupt=d.skip_corrupt)
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
        return train, evald

    def _build(self):
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
        self.train_ds, self.eval_ds = self._load_data()
        info = self.train_ds.info
        require_local_weights(r.model)
        model = nn.ModuleDict({"backbone": create_backbone(r.model, in_chans=info.channels)})
        self.loader = torch.utils.data.DataLoader(
            self.train_ds, batch_size=r.data.batch_size, shuffle=True, drop_last=r.data.drop_last,
            num_workers=r.data.num_workers, collate_fn=collate_batched,
            generator=torch.Generator(), pin_memory=self.device.type == "cuda")
        steps = len(self.loader)
        self.state = TrainState(recipe=r, device=self.device, model=model, num_train=len(self.train_ds),
                                steps_per_epoch=steps, feature_fn=self._features)
        self.inactive: set[str] = set()
        groups = [g for _, result in self._call("setup") if result for g in result]
        model.to(self.device)
        producers: dict = {"h": self._backbone_output}
        overridable = {"h"}  # the core's default, which one plugin may replace (a masked encoder)
        for impl, result in self._call("register_outputs"):
            for name, fn in (result or {}).items():
                if name in overridable:
                    overridable.discard(name)
                elif name in producers:
                    raise PluginError(f"Plugin '{impl}' registers step output '{name}', which another plugin "
                                      "already provides. Remove one of them from the recipe.")
                producers[name] = fn
        self.producers = producers
        self.optimizer = self._optimizer(groups)
        self.augment = BatchedTwoView(r.data.augment, r.data.image_size, info,
                                      second=r.data.augment_second).to(self.device)
        self.use_amp = r.run.amp and self.device.type == "cuda"
        self._feature_memo: dict = {}
        self.skipped_steps = 0
        self.collapse_warnings: list[dict] = []

    def _backbone_output(self, cache: StepCache, view: int) -> torch.Tensor:
        """The default step output ``h``: pooled backbone features (B, D) of view ``view``."""
        return self.state.model["backbone"](cache.views[view])

    def _hookimpls(self, hook: str) -> list:
        """The implementations of ``hook`` in pluggy's call order (last registered first),
        without those of plugins the current stage switches off."""
        impls = reversed(getattr(self.pm.hook, hook).get_hookimpls())
        if hook in STAGED_HOOKS and self.inactive:
            return [impl for impl in impls if impl.plugin_name not in self.inactive]
        return list(impls)

    def _enter_epoch(self, epoch: int) -> None:
        """Set the epoch, its stage and the plugins that stage switches off."""
        state, r = self.state, self.recipe
        previous = state.stage
        state.epoch = epoch
        stage = r.stage_at(epoch)
        state.stage = stage.name if stage is not None else None
        self.inactive = r.inactive_plugins(epoch)
        if stage is not None and stage.name != previous and r.run.progress:
            active = [name for name in r.plugins if name not in self.inactive]
            tqdm.write(f"stage '{stage.name}' from epoch {epoch + 1}: {', '.join(active)}", file=sys.stderr)

    def _impls(self, hook: str) -> list[str]:
        """Names of the plugins implementing ``hook``, in call order."""
        return [impl.plugin_name for impl in self._hookimpls(hook)]

    def _call(self, hook: str, **kwargs) -> list[tuple[str, object]]:
        """Call every implementation of ``hook`` in pluggy's order; returns [(plugin name, result)].

        Each implementation gets the arguments it asks for (pluggy's rule).  An exception
        raised inside a plugin is annotated with the plugin's name and the hook.
        """
        kwargs["state"] = self.state
        out = []
        for impl in self._hookimpls(hook):
            try:
                result = impl.function(*[kwargs[a] for a in impl.argnames])
            except (RecipeError, DataError, PluginError, KeyboardInterrupt):
                raise
            except Exception as exc:
                exc.add_note(f"clusterkit: raised by plugin '{impl.plugin_name}' in hook '{hook}'")
                raise
            out.append((impl.plugin_name, result))
        return out

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
        if o.name == "sgd":
            return torch.optim.SGD(param_groups, lr=self.base_lr, momentum=o.momentum)
        cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        return cls(param_groups, lr=self.base_lr, betas=o.betas)

    # -- features and evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def _embed_dataset(self, ds) -> torch.Tensor:
        model = self.state.model
        was_training = model.training
        model.eval()
        feats = []
        bs = self.recipe.data.eval_batch_size
        size = self.recipe.data.image_size
        for start in range(0, len(ds), bs):
            images, _, _ = ds.__getitems__(list(range(start, min(start + bs, len(ds)))))
            x = eval_transform(images.to(self.device, non_blocking=True), size, ds.info)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
                f = self.pm.hook.embed(state=self.state, images=x)
                if f is None:
                    f = model["backbone"](x)
            feats.append(f.float())
        model.train(was_training)
        return torch.cat(feats)

    def _features(self, split: str) -> torch.Tensor:
        ds = self.train_ds if split == "train" else self.eval_ds
        key = (id(ds), self.state.step)
        if key not in self._feature_memo:
            self._feature_memo = {k: v for k, v in self._feature_memo.items() if k[1] == self.state.step}
            self._feature_memo[key] = self._embed_dataset(ds)
        return self._feature_memo[key]

    def predict(self, features: torch.Tensor, fit: bool = True) -> Prediction:
        """Predictions for ``features`` (N, D) by the predict hook.  ``fit=True`` (evaluation):
        a rule fitted to data is fitted to these features and kept in ``state.extra``;
        ``fit=False`` (new images of a finished run): the kept rule is applied."""
        pred = self.pm.hook.predict(state=self.state, features=features, fit=fit)
        if pred is None:  # no plugin predicts: spherical k-means on the features
            if fit:
                res = kmeans(features, self.recipe.e_step.k, metric="cosine", seed=self.recipe.run.seed)
                self.state.extra["core.predict_centers"] = res.centers.detach().cpu()
                conf = (torch.nn.functional.normalize(features, dim=1) * res.centers[res.labels]).sum(1)
                pred = Prediction(res.labels, conf)
            else:
                centers = self.state.extra.get("core.predict_centers")
                if centers is None:
                    raise RunDirError("This run's checkpoint holds no k-means centres of its final evaluation "
                                      "(it was written by an older clusterkit), so new images cannot be assigned "
                                      "to them. Resume or rerun the run with this version to write them.")
                labels, conf = kmeans_assign(features, centers.to(features.device), metric="cosine")
                pred = Prediction(labels, conf)
        return pred

    def build_for_inference(self, ckpt: dict, info, num_train: int, device: str | None = None) -> None:
        """Rebuild a checkpoint's model and plugins without data, optimiser or training (for
        ``clusterkit.load``, ``predict`` and ``plot``): the plugins' ``setup`` and
        ``register_outputs`` run as in training, then the checkpoint's weights and training
        state (``extra``, centres, pseudo-labels) are loaded; the model is left in eval mode.
        ``info``: the dataset's :class:`~clusterkit.data.DatasetInfo` (channels)."""
        import attrs

        r = self.recipe
        if device is None:  # CUDA when present (unless the recipe says cpu): a GPU run predicts on a laptop too
            device = "cuda" if torch.cuda.is_available() and r.run.device != "cpu" else "cpu"
        self.device = torch.device(device)
        self.pm, self.plugins = load_plugins(r.plugins, self.available_plugins, allow=r.allow_plugins)
        cfg = attrs.evolve(r.model, pretrained=False)  # the weights come from the checkpoint
        model = nn.ModuleDict({"backbone": create_backbone(cfg, in_chans=info.channels)})
        steps = max(1, ckpt["step"] // (ckpt["epoch"] + 1))
        self.state = TrainState(recipe=r, device=self.device, model=model, num_train=num_train,
                                steps_per_epoch=steps)
        self.inactive = set()
        self._call("setup")
        self._call("register_outputs")
        model.load_state_dict(ckpt["model"])
        model.to(self.device).eval()
        s = self.state
        s.step, s.epoch = ckpt["step"], ckpt["epoch"]
        s.pseudo_labels = None if ckpt["pseudo_labels"] is None else ckpt["pseudo_labels"].to(self.device)
        s.centers = None if ckpt["centers"] is None else ckpt["centers"].to(self.device)
        s.extra = ckpt["extra"]
        self.use_amp = r.run.amp and self.device.type == "cuda"
        self._feature_memo = {}

    def evaluate(self) -> dict:
        """Cluster metrics of the eval data, plus ``collapse_share`` and ``feature_std``."""
        feats = self._features("train" if self.eval_ds is self.train_ds else "eval")
        pred = self.predict(feats)
        self.last_prediction = pred
        metrics = cluster_metrics(self.eval_ds.targets, pred.labels.cpu())
        e = self.recipe.eval
        report = collapse_report(feats, pred.labels, self.recipe.e_step.k, e.collapse_share, e.collapse_std_ratio)
        self._record_collapse(report["warnings"], "evaluation")
        return {**metrics, "collapse_share": report["collapse_share"], "feature_std": report["feature_std"]}

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
    def _set_lr(self, t: float) -> float:
        lr = lr_at(t, self.recipe.schedule, self.base_lr)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        return lr

    def _train_step(self, images: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state
        views = self.augment(images.to(self.device, non_blocking=True))
        cache = StepCache(views, index.to(self.device), self.producers, state)
        self._call("on_step_start", cache=cache)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            terms: dict[str, torch.Tensor] = {}
            for impl, result in self._call("compute_losses", cache=cache):
                for name, value in (result or {}).items():
                    if name in terms:
                        raise PluginError(f"Plugin '{impl}' returns loss term '{name}', which another plugin "
                                          "also returns. Term names must be unique across plugins.")
                    terms[name] = value
        if not terms:
            raise RecipeError("No plugin in the recipe returns a loss (compute_losses); add at least one loss "
                              "plugin under plugins:, e.g. diffused_sampling.")
        terms = {k: v.float() if torch.is_tensor(v) else torch.tensor(float(v), device=self.device)
                 for k, v in terms.items()}
        total = sum(terms.values())
        bad = next((name for name, value in terms.items() if not torch.isfinite(value).all()), None)
        if bad is not None:
            self._nonfinite(bad, terms[bad])
            return None
        self.optimizer.zero_grad(set_to_none=True)
        if total.requires_grad:
            total.backward()
        self.optimizer.step()
        state.step += 1
        self._call("after_step", cache=cache)
        terms["loss"] = total.detach()
        return {k: v.detach() for k, v in terms.items()}

    def _nonfinite(self, name: str, value: torch.Tensor) -> None:
        """A NaN/inf loss term: stop (``run.nonfinite: stop``), or count a skipped step and warn."""
        s, run = self.state, self.recipe.run
        shown = value.item() if value.numel() == 1 else "non-finite"
        where = f"at epoch {s.epoch + 1}, step {s.step_in_epoch + 1} (after {s.step} optimiser steps)"
        keep = (f"the last good checkpoint in '{self.run_dir / 'checkpoints'}' is kept. Lower optim.lr, check "
                "the plugin's parameters, or resume from that checkpoint with --resume")
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
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def _checkpoint(self, epoch: int, history: list, wall: float) -> None:
        s = self.state
        save_checkpoint({
            "epoch": epoch, "step": s.step, "model": s.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(), "pseudo_labels": s.pseudo_labels, "centers": s.centers, "extra": s.extra,
            "history": history, "wall_time": wall, "recipe": self.recipe.to_dict(),
            "recipe_hash": self.recipe.hash(), "skipped_steps": self.skipped_steps,
            "collapse_warnings": self.collapse_warnings,
        }, self.run_dir / "checkpoints", epoch, self.recipe.run.keep_last)

    def _restore(self) -> tuple[int, list, float]:
        path = latest_checkpoint(self.run_dir / "checkpoints")
        if path is None:
            raise RunDirError(f"Cannot resume '{self.run_dir}': it holds no checkpoint (checkpoints/epoch_*.pt). "
                              "A run writes its first checkpoint at the end of its first epoch; start it anew "
                              "with --force, or point --resume at another run directory.")
        ckpt = load_checkpoint(path)
        saved = self._saved_recipe(ckpt)
        if saved != self.recipe.to_dict():
            diff = "; ".join(_diff(saved, self.recipe.to_dict())) or "(formatting only)"
            raise RunDirError(f"Cannot resume '{self.run_dir}' with a changed recipe: {diff}. Resume with the "
                              "recipe and --set overrides the run started with (its recipe.yaml), or start a new run.")
        s = self.state
        s.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        s.step, s.epoch = ckpt["step"], ckpt["epoch"] + 1
        s.pseudo_labels = None if ckpt["pseudo_labels"] is None else ckpt["pseudo_labels"].to(self.device)
        s.centers = None if ckpt["centers"] is None else ckpt["centers"].to(self.device)
        s.extra = ckpt["extra"]
        self.skipped_steps = ckpt.get("skipped_steps", 0)
        self.collapse_warnings = list(ckpt.get("collapse_warnings", []))
        set_rng_state(ckpt["rng"])
        self._trim_metrics_log(ckpt["epoch"] + 1, s.step)
        return ckpt["epoch"] + 1, ckpt["history"], ckpt["wall_time"]

    @staticmethod
    def _saved_recipe(ckpt: dict) -> dict:
        """The recipe a checkpoint was written with, re-read through today's schema, so that keys
        added to clusterkit since then (at their defaults) do not count as a change; as saved
        when it no longer validates."""
        try:
            return load_recipe(data=ckpt["recipe"]).to_dict()
        except RecipeError:
            return ckpt["recipe"]

    def _trim_metrics_log(self, epochs_done: int, step: int) -> None:
        """metrics.jsonl after a crash: keep the records up to the checkpoint, drop those of the
        killed epoch and a line torn by the kill."""
        log = self.run_dir / "metrics.jsonl"
        if not log.exists():
            return
        keep = []
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step and record.get("epoch", 0) <= epochs_done:
                keep.append(line)
        atomic_write_text(log, "".join(line + "\n" for line in keep))

    def fit(self) -> dict:
        r = self.recipe
        self._build()
        atomic_write_text(self.run_dir / "recipe.yaml", dump_recipe(r))
        state = self.state
        start_epoch, history, wall_before = (self._restore() if self.resume else (0, [], 0.0))
        baseline = self.pixel_baseline()
        t_start = time.perf_counter()
        eval_metrics = next((h for h in reversed(history) if "nmi" in h), {})
        for epoch in range(start_epoch, r.schedule.epochs):
            self._enter_epoch(epoch)
            t_epoch = time.perf_counter()
            self.loader.generator.manual_seed(r.run.seed * 100_003 + epoch)  # data order: f(seed, epoch)
            self._call("on_epoch_start")
            if epoch == 0 or epoch % r.e_step.every == 0:
                self._call("e_step")
                self._check_pseudo_labels()
            sums: dict[str, torch.Tensor] = {}
            seen = done = 0
            bar = tqdm(total=state.steps_per_epoch, desc=f"epoch {epoch + 1}/{r.schedule.epochs}", unit="step",
                       disable=not r.run.progress, leave=False, dynamic_ncols=True, file=sys.stderr)
            for i, (images, _, index) in enumerate(self.loader):
                state.step_in_epoch = i
                lr = self._set_lr(epoch + i / state.steps_per_epoch)
                terms = self._train_step(images, index)
                if terms is None:  # a non-finite loss skipped (run.nonfinite: skip)
                    bar.update(1)
                    continue
                done += 1
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                seen += images.shape[0]
                if state.step % r.run.log_every == 0:
                    self._write_jsonl({"epoch": epoch + 1, "step": state.step, "lr": lr,
                                       **{k: float(v) for k, v in terms.items()}, **state.scalars})
                bar.set_postfix({k: f"{float(v):.3f}" for k, v in terms.items()}
                                | {"img/s": f"{seen / (time.perf_counter() - t_epoch):.0f}"}, refresh=False)
                bar.update(1)
            bar.close()
            n = max(done, 1)
            metrics = {"epoch": epoch + 1, "step": state.step, "lr": lr,
                       **{k: float(v) / n for k, v in sums.items()}, **state.scalars}
            if state.stage is not None:
                metrics["stage"] = state.stage
            if (epoch + 1) % r.eval.every == 0 or epoch + 1 == r.schedule.epochs:
                eval_metrics = self.evaluate()
                metrics.update(eval_metrics)
            self._call("on_epoch_end", metrics=metrics)
            metrics["seconds"] = time.perf_counter() - t_epoch
            history.append(metrics)
            self._write_jsonl(metrics)
            self._checkpoint(epoch, history, wall_before + time.perf_counter() - t_start)
            if r.run.progress:
                shown = " ".join(f"{k} {metrics[k]:.3f}" for k in ("loss", "nmi", "acc", "ari") if k in metrics)
                tqdm.write(f"epoch {epoch + 1}/{r.schedule.epochs}  {shown}  ({metrics['seconds']:.1f}s)",
                           file=sys.stderr)
        wall = wall_before + time.perf_counter() - t_start
        epoch_secs = [h["seconds"] for h in history]
        summary = {
            "name": r.name, "run_dir": str(self.run_dir), "recipe_hash": r.hash(), "seed": r.run.seed,
            "metrics": {k: eval_metrics.get(k) for k in ("nmi", "acc", "ari")},
            "pixel_kmeans": baseline,
            "protocol": {
                "dataset": r.data.dataset, "train_split": r.data.split, "eval_split": r.data.eval_split or r.data.split,
                "test_data_used_for_training": r.data.split in ("test", "all"),
                "prediction": "predict hook: " + (", ".join(self._impls("predict")) or "core k-means"),
                "model_selection": "none (final epoch)",
            },
            "epochs": r.schedule.epochs, "steps": state.step, "num_train": len(self.train_ds),
            "wall_time_s": wall, "seconds_per_epoch": float(np.mean(epoch_secs)) if epoch_secs else None,
            "peak_memory_mb": _peak_memory_mb(self.device), "device": str(self.device),
            "num_params": sum(p.numel() for p in state.model.parameters()),
            "skipped_images": list(getattr(self.train_ds, "skipped", []) or []),
            "skipped_steps": self.skipped_steps, "collapse_warnings": self.collapse_warnings,
            "versions": _versions(),
        }
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        return summary
