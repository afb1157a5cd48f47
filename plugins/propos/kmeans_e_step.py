"""The E-step of ProPos / DigPro / HaDis: spherical k-means on target features.

Every ``e_step.every`` epochs (and before the first), the features norm(k) of the
whole training set (from the ``embed`` hook, eval mode, test transform) are
clustered by cosine k-means++ (official: n_init 10, max_iter 300, tol 1e-4, seed 0);
the hard labels become ``state.pseudo_labels`` (N,) and the normalised centres
``state.centers`` (K, D).  Prediction is the same k-means on the evaluation features,
with confidence = cosine to the assigned centre (metric cosine) or minus the euclidean
distance to it.  The centres of that evaluation k-means are kept in ``state.extra``
(so in every checkpoint); new images of a finished run (``predict(fit=False)``) are
assigned to the final evaluation's centres, never re-clustered.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch
import torch.nn.functional as F

from clusterkit import Plugin, Prediction, hookimpl
from clusterkit.cluster import KMeansResult, assign, kmeans
from clusterkit.errors import PluginError
from clusterkit.schema import in_range, positive


class KMeansEStep(Plugin):
    """Pseudo-labels and predictions by (spherical) k-means on the learned features."""

    @attrs.define
    class Params:
        metric: Literal["cosine", "euclidean"] = attrs.field(default="cosine", metadata={
            "doc": "cosine = spherical k-means (ProPos/DigPro)"})
        n_init: int = attrs.field(default=10, validator=in_range(1, None), metadata={"doc": "k-means restarts"})
        max_iter: int = attrs.field(default=300, validator=in_range(1, None))
        tol: float = attrs.field(default=1e-4, validator=positive)
        seed: int | None = attrs.field(default=None, metadata={
            "doc": "k-means seed; null: the run's seed (the official code always used 0)"})

    def __init__(self, params=None):
        super().__init__(params)
        self._memo: tuple | None = None

    def cluster(self, state, features: torch.Tensor) -> KMeansResult:
        """k-means of ``features`` (N, D); reused while the features object is the same."""
        if self._memo is not None and self._memo[0] is features:
            return self._memo[1]
        p = self.params
        seed = state.recipe.run.seed if p.seed is None else p.seed
        # every rank holds all features: the Lloyd sums are sharded over the ranks (identical result)
        result = kmeans(features, state.num_clusters, metric=p.metric, n_init=p.n_init, max_iter=p.max_iter,
                        tol=p.tol, seed=seed, distributed=True)
        self._memo = (features, result)
        return result

    @hookimpl
    def e_step(self, state):
        result = self.cluster(state, state.features("train"))
        state.pseudo_labels = result.labels.to(state.device)
        state.centers = result.centers.to(state.device)

    @property
    def centers_key(self) -> str:
        """Where the evaluation k-means centres live in ``state.extra``."""
        return f"{self.name or 'kmeans_e_step'}.predict_centers"

    @hookimpl
    def predict(self, state, features, fit):
        if fit:  # evaluation: k-means on the evaluation features; keep the centres for new data
            result = self.cluster(state, features)
            labels, centers = result.labels, result.centers
            state.extra[self.centers_key] = centers.detach().cpu()
        else:  # new data: assign to the centres of the last evaluation
            if self.centers_key not in state.extra:
                raise PluginError(
                    f"Plugin '{self.name}' cannot assign new images: the checkpoint holds no k-means centres "
                    f"of an evaluation (state.extra['{self.centers_key}']). It was written before any "
                    "evaluation or by an older clusterkit; resume or rerun the run with this version.")
            centers = state.extra[self.centers_key].to(features.device, features.dtype)
            labels, _ = assign(features, centers, metric=self.params.metric)
        if self.params.metric == "cosine":
            conf = (F.normalize(features, dim=1) * centers[labels]).sum(1)
        else:
            conf = -(features - centers[labels]).norm(dim=1)
        return Prediction(labels, conf)
