"""What a run shows and writes as it goes: the progress bar and the per-epoch lines on stderr
(with the ETA), the metrics log (``metrics.jsonl``: a record every ``run.log_every`` steps and
one per epoch) and the summary (``summary.json``).  Rank 0 writes; every rank takes part in
the reductions."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__, distributed
from ..cluster.quality import QUALITY_KEYS
from ..plugin_manager import HookDispatcher
from ..recipe import Recipe
from ..rundir import RunDir
from ..state import TrainState
from .evaluation import RunEvaluation

__all__ = ["EpochProgress", "Reporter", "eta", "peak_memory_mb", "versions", "prediction_protocol"]


def prediction_protocol(hooks: HookDispatcher) -> str:
    """How the run's clusters are predicted, for summary.json: the ``predict`` plugins in call
    order, each with its ``prediction_rule`` when it states one (e.g. ``kmeans_e_step``:
    spherical k-means, or k-means on a UMAP of the features), else "core k-means"."""
    parts = []
    for impl in hooks.impls("predict"):
        rule = getattr(impl.plugin, "prediction_rule", None)
        parts.append(f"{impl.plugin_name} ({rule})" if rule else impl.plugin_name)
    return "predict hook: " + (", ".join(parts) or "core k-means")


@attrs.define
class EpochProgress:
    """What the trainer counts during one epoch: its start time, progress bar, batches begun,
    optimiser steps done, images seen, summed loss terms (on the device), the last lr and the
    seconds its E-step took (None when the epoch had none)."""

    start: float
    bar: Any
    batches: int = 0
    done: int = 0
    seen: int = 0
    sums: dict = attrs.field(factory=dict)
    lr: float = 0.0
    e_step_seconds: float | None = None

    def add(self, terms: dict[str, torch.Tensor], images: int) -> None:
        """Count one optimiser step: its loss terms (scalars, summed on the device) and ``images``."""
        self.done += 1
        for k, v in terms.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.seen += images


def eta(history: list[dict], epochs_left: int) -> str:
    """``", ETA 3m 20s for the run"``: the time the remaining epochs take at the mean pace of the
    last (up to five) epochs; empty at the end."""
    recent = [h["seconds"] for h in history[-5:] if "seconds" in h]
    if epochs_left <= 0 or not recent:
        return ""
    left = round(epochs_left * sum(recent) / len(recent))
    hours, rest = divmod(left, 3600)
    text = f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"
    return f", ETA {text} for the run"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: CUDA memory allocated on a GPU, else the resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def versions() -> dict:
    """The versions of Python, clusterkit and the libraries that decide a run's numbers."""
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "clusterkit": __version__}
    for pkg in ("torch", "torchvision", "timm", "numpy", "scikit-learn", "pluggy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


class Reporter:
    """A run's progress on stderr and its records in ``run_dir`` (metrics.jsonl, summary.json)."""

    def __init__(self, recipe: Recipe, run_dir: Path, device: torch.device):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.device = device

    def stage(self, name: str, epoch: int, active: list[str]) -> None:
        """Say that stage ``name`` starts at epoch ``epoch`` (0-based) with the ``active`` plugins."""
        if self.recipe.run.progress:
            tqdm.write(f"stage '{name}' from epoch {epoch + 1}: {', '.join(active)}", file=sys.stderr)

    def open_epoch(self, epoch: int, steps: int) -> EpochProgress:
        """The counters and progress bar (rank 0, ``run.progress``) of epoch ``epoch`` (0-based)."""
        r = self.recipe
        return EpochProgress(time.perf_counter(), tqdm(
            total=steps, desc=f"epoch {epoch + 1}/{r.schedule.epochs}", unit="step",
            disable=not (r.run.progress and distributed.is_main()), leave=False, dynamic_ncols=True, file=sys.stderr))

    def epoch_means(self, sums: dict[str, torch.Tensor], done: int) -> dict[str, float]:
        """Mean loss terms of ``done`` steps (``sums``: their sums), averaged over the processes
        (one host sync)."""
        if not sums:
            return {}
        names = list(sums)
        packed = torch.stack([torch.as_tensor(sums[k], device=self.device, dtype=torch.float32) / max(done, 1)
                              for k in names])
        return dict(zip(names, distributed.all_reduce(packed, "mean").tolist(), strict=True))

    def log_step(self, state: TrainState, lr: float, terms: dict[str, torch.Tensor]) -> None:
        """metrics.jsonl's record of this step: its loss terms (mean over the processes), the lr
        and what the plugins logged."""
        logged = self.epoch_means(terms, 1)
        self.write_jsonl({"epoch": state.epoch + 1, "step": state.step, "lr": lr, **logged, **state.scalars})

    def show_progress(self, ep: EpochProgress, scalars: dict[str, float]) -> None:
        """The epoch's mean loss terms, the plugins' scalars and the images per second on the bar."""
        if ep.bar.disable:
            return
        shown = {k: float(v) / ep.done for k, v in ep.sums.items()} | scalars
        ep.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()}
                           | {"img/s": f"{ep.seen / (time.perf_counter() - ep.start):.0f}"}, refresh=False)

    def write_jsonl(self, record: dict) -> None:
        """Append ``record`` to the run's metrics log (rank 0)."""
        if not distributed.is_main():
            return
        RunDir(self.run_dir).append_record(record)

    def epoch_line(self, metrics: dict, history: list[dict]) -> None:
        """The epoch's result line on stderr (rank 0; it stays with ``run.progress: false``, only
        the bars go): loss, NMI/ACC/ARI and quality when evaluated, seconds and the ETA."""
        if not distributed.is_main():
            return
        epochs = self.recipe.schedule.epochs
        shown = " ".join(f"{k} {metrics[k]:.3f}" for k in ("loss", "nmi", "acc", "ari", "silhouette",
                                                           "size_entropy") if metrics.get(k) is not None)
        tqdm.write(f"epoch {metrics['epoch']}/{epochs}  {shown}  ({metrics['seconds']:.1f}s"
                   f"{eta(history, epochs - metrics['epoch'])})", file=sys.stderr)

    def summary(self, *, evaluation: RunEvaluation, hooks: HookDispatcher, state: TrainState, history: list[dict],
                eval_metrics: dict, wall: float, skipped_steps: int) -> dict:
        """The run's summary (rank 0 also writes it to ``summary.json``): final metrics and
        label-free quality, the baselines, the evaluation protocol, time, memory, versions."""
        r = self.recipe
        epoch_secs = [h["seconds"] for h in history]
        summary = {
            "name": r.name, "run_dir": str(self.run_dir), "recipe_hash": r.hash(), "seed": r.run.seed,
            "metrics": {k: eval_metrics.get(k) for k in ("nmi", "acc", "ari")},
            "quality": {k: eval_metrics.get(k) for k in QUALITY_KEYS},
            **evaluation.baselines,
            "umap_view": evaluation.umap_view(),
            "protocol": {
                "dataset": r.data.dataset, "labels": evaluation.labels_protocol(), "train_split": r.data.split,
                "eval_split": r.data.eval_split or r.data.split,
                "test_data_used_for_training": r.data.split in ("test", "all"),
                "prediction": prediction_protocol(hooks),
                "model_selection": "none (final epoch)",
            },
            "epochs": r.schedule.epochs, "steps": state.step, "num_train": len(evaluation.train_ds),
            "wall_time_s": wall, "seconds_per_epoch": float(np.mean(epoch_secs)) if epoch_secs else None,
            "peak_memory_mb": distributed.all_reduce(
                torch.tensor(peak_memory_mb(self.device), dtype=torch.float64, device=self.device), "max").item(),
            "device": str(self.device), "world_size": distributed.world_size(),
            "num_params": sum(p.numel() for p in state.model.parameters()),
            "skipped_images": list(getattr(evaluation.train_ds, "skipped", []) or []),
            "skipped_steps": skipped_steps, "collapse_warnings": evaluation.collapse_warnings,
            "versions": versions(),
        }
        if distributed.is_main():
            RunDir(self.run_dir).write_summary(summary)
        return summary
