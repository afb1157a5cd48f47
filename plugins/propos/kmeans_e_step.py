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

``reduce: umap`` clusters on the learned manifold instead (N2D): the features are embedded by
UMAP (cosine metric; ``umap_components``, ``umap_neighbors``, ``umap_min_dist``) and
scikit-learn's k-means (``n_init``) runs on the embedding, for the E-step and for prediction
(:class:`clusterkit.cluster.manifold.ManifoldKMeans`).  The E-step's ``state.centers`` are then
the normalised mean features of the clusters.  New images are placed on the kept manifold by a
kNN rule over the training features, which are checkpointed as tensors (the umap-learn object is
never pickled: checkpoints load with ``weights_only=True``); the module doc of
:mod:`clusterkit.cluster.manifold` describes the rule and its cost.

One k-means serves an evaluation and the next E-step: ``state.features(split)`` returns the
same tensor object until the next optimiser step (its documented contract), and
:meth:`KMeansEStep.cluster` reuses its last result for that same object.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch

from clusterkit import Plugin, hookimpl
from clusterkit.cluster import KMeansPredictor, KMeansResult, manifold
from clusterkit.cluster.manifold import UMAP_INSTALL, ManifoldKMeans, UmapParams, feature_centers
from clusterkit.errors import PluginError
from clusterkit.schema import in_range, positive
from clusterkit.state import Prediction


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
        reduce: Literal["none", "umap"] = attrs.field(default="none", metadata={
            "doc": "umap: k-means on a cosine UMAP embedding of the features (needs umap-learn)"})
        umap_components: int = attrs.field(default=10, validator=in_range(1, None), metadata={
            "doc": "reduce: umap: the embedding's dimension"})
        umap_neighbors: int = attrs.field(default=20, validator=in_range(2, None), metadata={
            "doc": "reduce: umap: UMAP's n_neighbors (also the kNN of new images)"})
        umap_min_dist: float = attrs.field(default=0.0, validator=in_range(0, None), metadata={
            "doc": "reduce: umap: UMAP's min_dist"})

    def __init__(self, params=None):
        super().__init__(params)
        if self.params.reduce == "umap" and not manifold.umap_available():
            raise PluginError(f"kmeans_e_step: reduce: umap needs umap-learn, which is not installed. Install it "
                              f"with: {UMAP_INSTALL}, or set plugins.kmeans_e_step.reduce: none.")
        self._memo: tuple | None = None
        #: (K, D) CPU centres of the last evaluation's k-means (checkpointed by state_dict)
        self.predict_centers: torch.Tensor | None = None
        #: reduce: umap: the manifold rule of the last evaluation (checkpointed as tensors)
        self.manifold: ManifoldKMeans | None = None

    @property
    def prediction_rule(self) -> str:
        """The rule :meth:`predict` applies, in words (the run summary's ``protocol.prediction``)."""
        if self.params.reduce == "umap":
            p = self.params
            return (f"k-means (n_init {p.n_init}) on a UMAP (cosine, {p.umap_components} components, "
                    f"{p.umap_neighbors} neighbours) of the features")
        return f"spherical k-means (n_init {self.params.n_init}) of the features"

    def manifold_rule(self, state) -> ManifoldKMeans:
        """reduce: umap: a fresh manifold k-means rule with this plugin's parameters."""
        p = self.params
        return ManifoldKMeans(state.num_clusters, UmapParams(p.umap_components, p.umap_neighbors, p.umap_min_dist,
                                                             "cosine"),
                              n_init=p.n_init, seed=self.seed(state), owner=f"Plugin '{self.name}'",
                              missing_error=PluginError)

    def cluster_manifold(self, state, features: torch.Tensor) -> tuple[ManifoldKMeans, Prediction]:
        """reduce: umap: UMAP + k-means of ``features``, memoised per tensor object like :meth:`cluster`."""
        if self._memo is not None and self._memo[0] is features:
            return self._memo[1]
        rule = self.manifold_rule(state)
        result = (rule, rule.fit(features))
        self._memo = (features, result)
        return result

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
        feats = state.features("train")
        if self.params.reduce == "umap":
            _, pred = self.cluster_manifold(state, feats)
            state.pseudo_labels = pred.labels.to(state.device)
            state.centers = feature_centers(feats, pred.labels, state.num_clusters).to(state.device)
            return
        result = self.cluster(state, feats)
        state.pseudo_labels = result.labels.to(state.device)
        state.centers = result.centers.to(state.device)

    @hookimpl
    def predict(self, state, features, fit):
        if self.params.reduce == "umap":
            if not fit:
                rule = self.manifold or self.manifold_rule(state)
                return rule.assign(features)
            self.manifold, pred = self.cluster_manifold(state, features)
            return pred
        rule = self.rule(state)
        if not fit:  # new data: the centres of the last evaluation
            return rule.assign(features)
        pred = rule.fit(features, self.cluster(state, features))  # evaluation: k-means, centres kept
        self.predict_centers = rule.centers
        return pred

    def state_dict(self) -> dict:
        """``{"predict_centers": (K, D) CPU tensor, or None before the first evaluation}``, and with
        ``reduce: umap`` ``"manifold"``: the manifold rule's tensors (:meth:`ManifoldKMeans.state_dict`)."""
        out: dict = {"predict_centers": self.predict_centers}
        if self.manifold is not None:
            out["manifold"] = self.manifold.state_dict()
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        self.predict_centers = state_dict.get("predict_centers")
        if state_dict.get("manifold") is not None:
            saved = state_dict["manifold"]
            self.manifold = ManifoldKMeans(saved["k"], UmapParams(**saved["umap"]), seed=saved["seed"],
                                           owner=f"Plugin '{self.name}'", missing_error=PluginError)
            self.manifold.load_state_dict(saved)
