"""Embedding, prediction and evaluation: what a built model does with images, and what a
training run measures on its data.

:class:`Evaluator` embeds images and datasets and predicts clusters from features; the trainer
and ``clusterkit.load`` (:class:`~clusterkit.inference.ClusterModel`) both use it.
:class:`RunEvaluation` is a training run's evaluation of its data: the per-step feature memo
behind ``state.features``, NMI/ACC/ARI and the label-free quality, the pixel and UMAP
baselines, and the collapse records.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import baselines, distributed
from ..cluster import KMeansPredictor, cluster_metrics, kmeans, quality_metrics
from ..data import eval_transform
from ..errors import warn as _warn
from ..guards import collapse_report
from ..models.recalibrate import recalibrated_batchnorm
from ..plugin_manager import HookDispatcher
from ..recipe import Recipe
from ..state import Prediction, TrainState

__all__ = ["Evaluator", "RunEvaluation"]


class Evaluator:
    """Features and predictions of a built model (``state.model`` with its plugins).

    ``core_predictor``: the core's rule when no plugin predicts (spherical k-means);
    ``use_amp``: embed under bfloat16 autocast (``run.amp`` on CUDA)."""

    def __init__(self, recipe: Recipe, state: TrainState, hooks: HookDispatcher, core_predictor: KMeansPredictor,
                 use_amp: bool):
        self.recipe = recipe
        self.state = state
        self.hooks = hooks
        self.core_predictor = core_predictor
        self.use_amp = use_amp
        self.device = state.device

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

    def predict(self, features: torch.Tensor, fit: bool = True) -> Prediction:
        """Predictions for ``features`` (N, D) by the predict hook.  ``fit=True`` (evaluation):
        a rule fitted to data is fitted to these features and keeps what it needs;
        ``fit=False`` (new images of a finished run): the kept rule is applied.  Without a
        predict plugin, the core's spherical k-means (:class:`~clusterkit.cluster.KMeansPredictor`)."""
        pred = self.hooks.first("predict", features=features, fit=fit)
        if pred is None:
            pred = self.core_predictor.fit(features) if fit else self.core_predictor.assign(features)
        return pred


class RunEvaluation:
    """A training run's evaluation of its data (``train_ds``, ``eval_ds``: ImageDatasets, the
    same object when the run evaluates on its training split).

    ``last_prediction``: the last evaluation's :class:`~clusterkit.state.Prediction`;
    ``collapse_warnings``: ``[{epoch, kind, value}]`` for summary.json (and checkpoints);
    ``baselines``: summary.json's ``pixel_kmeans`` and ``umap_kmeans`` (:meth:`compute_baselines`)."""

    def __init__(self, recipe: Recipe, evaluator: Evaluator, train_ds: Any, eval_ds: Any):
        self.recipe = recipe
        self.evaluator = evaluator
        self.state = evaluator.state
        self.train_ds = train_ds
        self.eval_ds = eval_ds
        self.last_prediction: Prediction | None = None
        self.collapse_warnings: list[dict] = []
        self.baselines: dict[str, dict | None] = {"pixel_kmeans": None, "umap_kmeans": None}
        self._feature_memo: dict[tuple[int, int], torch.Tensor] = {}

    def features(self, split: str) -> torch.Tensor:
        """Features (N, D) of a split ("train", or "eval"), embedded once per optimiser step
        (``state.features``): until the next step every call returns the same tensor object."""
        ds = self.train_ds if split == "train" else self.eval_ds
        key = (id(ds), self.state.step)
        if key not in self._feature_memo:
            self._feature_memo = {k: v for k, v in self._feature_memo.items() if k[1] == self.state.step}
            self._feature_memo[key] = self.evaluator.embed_dataset(ds)
        return self._feature_memo[key]

    def eval_features(self) -> torch.Tensor:
        """Features (N, D) of the evaluation data (the training split's when they are one)."""
        return self.features("train" if self.eval_ds is self.train_ds else "eval")

    def evaluate(self) -> dict:
        """Metrics of the eval data: NMI/ACC/ARI when it has labels (none when unlabeled), the
        label-free quality measures (:mod:`clusterkit.cluster.quality`), ``collapse_share`` and
        ``feature_std``."""
        feats = self.eval_features()
        pred = self.evaluator.predict(feats)
        self.last_prediction = pred
        metrics: dict[str, float | None] = {}
        if self.eval_ds.has_labels:
            metrics.update(cluster_metrics(self.eval_ds.targets, pred.labels.cpu()))
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

    def check_pseudo_labels(self) -> None:
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
        res = kmeans(x.to(self.state.device), self.recipe.e_step.k, metric="euclidean", n_init=10,
                     seed=self.recipe.run.seed)
        return cluster_metrics(self.eval_ds.targets, res.labels.cpu())

    def compute_baselines(self) -> None:
        """The baselines of the eval data, once per run: k-means on the pixels
        (:meth:`pixel_baseline`) and "UMAP + k-means on pixels" (:func:`clusterkit.baselines.umap_baseline`)."""
        self.baselines = {"pixel_kmeans": self.pixel_baseline(), "umap_kmeans": baselines.umap_baseline(self)}

    def umap_view(self) -> dict | None:
        """"k-means on UMAP of the final features" (summary.json's ``umap_view``;
        :func:`clusterkit.baselines.umap_view`); every rank calls it."""
        return baselines.umap_view(self, self.eval_features)
