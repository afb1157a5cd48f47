"""CLI: cross-level interaction (PICI, arXiv 2401.13503), instance-level k-means teaches the cluster head.

CC's two heads live in two subspaces: the instance projections z (B, 128) and the
cluster probabilities c (B, K) of ``contrastive_heads``.  CLI makes them agree.  For each
view v of the global batch of N samples (N = world_size * B under DDP, where every process
gathers z and c, the latter with gradients, and computes the same loss; N = B otherwise):

    y^v    = k-means labels of the instance features (K clusters, n_init 100; official:
             sklearn KMeans on MinMax-scaled z)                                (N,) in [0, K)
    a^v    = argmax_k c^v                                                       (N,)
    W[a, b] = #{i : y^v_i = a, a^v_i = b}                                       (K, K) counts
    pi     = argmax over permutations of sum_a W[a, pi(a)]   (Hungarian, linear_sum_assignment)
    t^v_i  = pi(y^v_i)                                        k-means labels renamed to head labels
    L^v    = mean_i -log c^v_{i, t^v_i}                       cross-entropy, targets detached
    L_CLI  = (L^1 + L^2) / 2

The renaming by pi only removes the arbitrary numbering of the k-means clusters: the
cluster head is pulled towards the instance-level partition, not towards itself.

Where the labels y come from (``pseudo_labels``):

* ``stage`` (official timing, default): once, at the first epoch CLI runs (the boost stage,
  epoch 1000 of 1050), k-means of the instance features z = norm(g_I(h)) of the whole
  training set; each sample keeps its label for the rest of training (the plugin's
  ``labels``, checkpointed through its ``state_dict``, so a resume keeps them).  The official code
  clustered z of one augmented, masked draw of each view (two label sets, MinMax-scaled per
  batch of 96); here z comes from the evaluation features (``embed``: resized images, the
  unmasked encoder unless ``test_time_masking``), one label set for both views, scaled
  over the whole set.
* ``batch``: k-means of each view's z of every global batch (min(K, N, distinct rows)
  clusters), recomputed every step; seeded by (seed + step), so the same on every process.

Official quirk (``double_softmax``, off by default): the official code passes the cluster
head's *softmax outputs* to ``torch.nn.CrossEntropyLoss``, which applies a second
log-softmax; ``double_softmax: true`` reproduces that.  By default the loss is the
cross-entropy of the probabilities themselves, -log(clamp(c, eps)).

Stages (official): CLI runs only in the boost stage (epochs 1000-1049), together with CC's
instance and cluster losses and without PISD.
"""

from __future__ import annotations

from typing import Literal

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from clusterkit import Plugin, hookimpl
from clusterkit.cluster import kmeans
from clusterkit.errors import PluginError
from clusterkit.schema import in_range, non_negative, positive
from clusterkit_plugins.cc.heads import INSTANCE_HEAD, instance_projection

# ---------------------------------------------------------------------------------------------
# The method as functions of tensors
# ---------------------------------------------------------------------------------------------

def minmax_scale(x: torch.Tensor) -> torch.Tensor:
    """Scale every column of x (N, D) to [0, 1] (scikit-learn's MinMaxScaler; constant columns -> 0)."""
    lo = x.min(dim=0, keepdim=True).values
    span = x.max(dim=0, keepdim=True).values - lo
    return (x - lo) / torch.where(span > 0, span, torch.ones_like(span))


def kmeans_labels(z: torch.Tensor, num_clusters: int, *, scaling: str = "minmax", n_init: int = 100,
                  max_iter: int = 300, seed: int = 0) -> torch.Tensor:
    """Euclidean k-means labels (N,) in [0, num_clusters) of the rows of z (N, D), no gradient.

    Uses min(num_clusters, number of distinct rows) clusters, so a batch smaller than K or
    of identical samples still gets labels (all 0 when every row is the same).
    """
    x = z.detach().float()
    if scaling == "minmax":
        x = minmax_scale(x)
    k = min(num_clusters, torch.unique(x, dim=0).shape[0])
    if k == 1:
        return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    # every rank passes the same x: the Lloyd sums are sharded over the ranks (identical result)
    return kmeans(x, k, metric="euclidean", n_init=n_init, max_iter=max_iter, seed=seed, distributed=True).labels


def label_matching(pseudo: torch.Tensor, head: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """The renaming pi (K,) of pseudo-labels onto head labels with the most agreement.

    pseudo, head: (N,) labels in [0, K) of the global batch.  W[a, b] counts the samples with pseudo-label a
    and head label b; pi maximises sum_a W[a, pi(a)] over all permutations (Hungarian
    matching on the full K x K table, so every label, present in the batch or not, gets a
    distinct target).  Returns int64 on the device of ``pseudo``.
    """
    counts = torch.zeros(num_clusters, num_clusters, dtype=torch.long)
    counts.index_put_((pseudo.cpu(), head.cpu()), torch.ones(pseudo.shape[0], dtype=torch.long), accumulate=True)
    rows, cols = linear_sum_assignment(counts.numpy(), maximize=True)
    pi = np.empty(num_clusters, dtype=np.int64)
    pi[rows] = cols
    return torch.from_numpy(pi).to(pseudo.device)


def matched_targets(pseudo: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """t_i = pi(y_i): the pseudo-labels (N,) renamed onto the argmax of the cluster head probs (N, K)."""
    head = probs.detach().argmax(dim=1)
    return label_matching(pseudo, head, probs.shape[1])[pseudo]


def cli_cross_entropy(probs: torch.Tensor, targets: torch.Tensor, double_softmax: bool = False,
                      eps: float = 1e-8) -> torch.Tensor:
    """Cross-entropy of the cluster probabilities probs (N, K) against targets (N,) -> scalar.

    Default: mean_i -log(max(probs[i, t_i], eps)).  ``double_softmax`` (official quirk):
    ``F.cross_entropy(probs, t)``, i.e. probs treated as logits and softmaxed again.
    """
    probs = probs.float()
    targets = targets.detach()
    if double_softmax:
        return F.cross_entropy(probs, targets)
    return F.nll_loss(torch.log(probs.clamp(min=eps)), targets)


def cross_level_interaction_loss(probs: torch.Tensor, pseudo: torch.Tensor, double_softmax: bool = False,
                                 eps: float = 1e-8) -> torch.Tensor:
    """L^v for one view: match the pseudo-labels (N,) onto argmax probs (N, K), then the cross-entropy.

    N is the global batch: under DDP pass the gathered probabilities and their labels.
    """
    return cli_cross_entropy(probs, matched_targets(pseudo, probs), double_softmax, eps)


# ---------------------------------------------------------------------------------------------
# The plugin
# ---------------------------------------------------------------------------------------------

class CrossLevelInteraction(Plugin):
    """CLI: cross-entropy of the cluster head against k-means labels of the instance features, Hungarian-matched."""

    @attrs.define
    class Params:
        weight: float = attrs.field(default=1.0, validator=non_negative, metadata={
            "doc": "weight of the loss (official: 1, the mean of the two views)"})
        pseudo_labels: Literal["stage", "batch"] = attrs.field(
            default="stage", validator=attrs.validators.in_(("stage", "batch")), metadata={
                "doc": "stage: k-means of the whole training set once, when CLI starts (official timing); "
                       "batch: k-means of each view's z in every batch"})
        feature_scaling: Literal["minmax", "none"] = attrs.field(
            default="minmax", validator=attrs.validators.in_(("minmax", "none")), metadata={
                "doc": "scale each feature of z to [0, 1] before k-means (official MinMaxScaler) or not"})
        n_init: int = attrs.field(default=100, validator=in_range(1, None), metadata={
            "doc": "k-means restarts (official: 100)"})
        max_iter: int = attrs.field(default=300, validator=in_range(1, None), metadata={
            "doc": "most Lloyd iterations per restart"})
        double_softmax: bool = attrs.field(default=False, metadata={
            "doc": "official quirk: cross-entropy on the softmax outputs (a second softmax)"})
        eps: float = attrs.field(default=1e-8, validator=positive, metadata={
            "doc": "probabilities are clamped to at least eps before the log"})
        seed: int | None = attrs.field(default=None, metadata={
            "doc": "k-means seed (batch mode: + step); null: run.seed"})

    def __init__(self, params=None):
        super().__init__(params)
        #: ``pseudo_labels: stage``: the k-means label (num_train,) int64 of every training sample,
        #: on the training device; None until CLI's first epoch computes them.
        self.labels: torch.Tensor | None = None
        self.device: torch.device | None = None

    # -- checkpointed state --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {} if self.labels is None else {"labels": self.labels.cpu().clone()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the stage labels.  Checkpoints written while they were buffers of a module in
        ``state.model`` also carry ``ready`` (False: not computed yet, ``labels`` are zeros)."""
        labels = state_dict.get("labels")
        if labels is None or not bool(state_dict.get("ready", True)):
            self.labels = None
            return
        self.labels = labels.to(self.device or "cpu", torch.long)

    @hookimpl
    def setup(self, state):
        self.device = state.device

    @torch.no_grad()
    def dataset_labels(self, state) -> torch.Tensor:
        """k-means labels (N,) of z = norm(g_I(h)) of the training set's evaluation features."""
        model = state.model
        if INSTANCE_HEAD not in model:
            raise PluginError("cross_level_interaction clusters the instance features z of CC's instance head, "
                              "but state.model has no 'instance_head'. Add contrastive_heads to the recipe.")
        feats = state.features("train")
        head = model[INSTANCE_HEAD]
        was_training = head.training
        head.eval()
        z = instance_projection(head, feats.to(next(head.parameters()).dtype))
        head.train(was_training)
        p = self.params
        return kmeans_labels(z, state.num_clusters, scaling=p.feature_scaling, n_init=p.n_init,
                             max_iter=p.max_iter, seed=self.seed(state))

    @hookimpl
    def on_epoch_start(self, state):
        if self.params.pseudo_labels == "stage" and self.labels is None:
            self.labels = self.dataset_labels(state).to(state.device, torch.long)

    def pseudo_labels_of(self, state, cache, v: int) -> torch.Tensor:
        """The k-means labels y^v (N,) of view v's global batch (the same on every process)."""
        p = self.params
        if p.pseudo_labels == "stage":
            if self.labels is None:  # e.g. called outside the trainer's epoch loop
                self.on_epoch_start(state)
            return self.labels[cache.global_index]
        return kmeans_labels(cache.gather("z", v), state.num_clusters, scaling=p.feature_scaling, n_init=p.n_init,
                             max_iter=p.max_iter, seed=self.seed(state) + state.step)

    @hookimpl
    def compute_losses(self, state, cache):
        p = self.params
        losses = []
        for v in (0, 1):
            try:
                probs = cache.gather("c", v)          # (N, K) of the global batch, with gradients
            except KeyError:
                raise PluginError("cross_level_interaction trains CC's cluster head, but no plugin produces the "
                                  "step outputs 'z' and 'c'. Add contrastive_heads to the recipe's plugins.") from None
            pseudo = self.pseudo_labels_of(state, cache, v)
            losses.append(cross_level_interaction_loss(probs, pseudo, p.double_softmax, p.eps))
        return {"cross_level_interaction": p.weight * torch.stack(losses).mean()}
