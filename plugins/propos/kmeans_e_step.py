"""The E-step of ProPos / DigPro / HaDis: spherical k-means on target features.

Every ``e_step.every`` epochs (and before the first), the features norm(k) of the
whole training set (from the ``embed`` hook, eval mode, test transform) are
clustered by cosine k-means++ (official: n_init 10, max_iter 300, tol 1e-4, seed 0);
the hard labels become ``state.pseudo_labels`` (N,) and the normalised centres
``state.centers`` (K, D).  Prediction is the same k-means on the evaluation features,
with confidence = cosine to the assigned centre (metric cosine) or minus the euclidean
distance to it (:class:`clusterkit.cluster.KMeansPredictor`, the rule the core also uses
when no plugin predicts).  The centres of that evaluation k-means are the plugin's
checkpointed state (:meth:`KMeansEStep.state_dict`); new images of a finished run
(``predict(fit=False)``) are assigned to the final evaluation's centres, never re-clustered.

One k-means serves an evaluation and the next E-step: ``state.features(split)`` returns the
same tensor object until the next optimiser step (its documented contract), and
:meth:`KMeansEStep.cluster` reuses its last result for that same object.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch

from clusterkit import Plugin, hookimpl
from clusterkit.cluster import KMeansPredictor, KMeansResult
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
        #: (K, D) CPU centres of the last evaluation's k-means (checkpointed by state_dict)
        self.predict_centers: torch.Tensor | None = None

    def rule(self, state) -> KMeansPredictor:
        """The k-means prediction rule of this run, holding the kept centres."""
        p = self.params
        rule = KMeansPredictor(
            state.num_clusters, metric=p.metric, n_init=p.n_init, max_iter=p.max_iter, tol=p.tol,
            seed=self.seed(state),
            # every rank holds all features: the Lloyd sums are sharded over the ranks (identical result)
            distributed=True, owner=f"Plugin '{self.name}'", missing_error=PluginError)
        rule.centers = self.predict_centers
        return rule

    def cluster(self, state, features: torch.Tensor) -> KMeansResult:
        """k-means of ``features`` (N, D); the last result is reused for the same tensor object
        (``state.features`` returns one object per split and optimiser step)."""
        if self._memo is not None and self._memo[0] is features:
            return self._memo[1]
        result = self.rule(state).cluster(features)
        self._memo = (features, result)
        return result

    @hookimpl
    def e_step(self, state):
        result = self.cluster(state, state.features("train"))
        state.pseudo_labels = result.labels.to(state.device)
        state.centers = result.centers.to(state.device)

    @hookimpl
    def predict(self, state, features, fit):
        rule = self.rule(state)
        if not fit:  # new data: the centres of the last evaluation
            return rule.assign(features)
        pred = rule.fit(features, self.cluster(state, features))  # evaluation: k-means, centres kept
        self.predict_centers = rule.centers
        return pred

    def state_dict(self) -> dict:
        """``{"predict_centers": (K, D) CPU tensor, or None before the first evaluation}``."""
        return {"predict_centers": self.predict_centers}

    def load_state_dict(self, state_dict: dict) -> None:
        self.predict_centers = state_dict.get("predict_centers")
