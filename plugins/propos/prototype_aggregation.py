"""Prototype aggregation (DigPro Eq. 7-9 = ProPos PSL = HaDis PCL).

For a direction (online view a, target view b) and the batch's hard pseudo-labels
y (N,) in {0..K-1}, N = world_size * B the global batch:

    nu_a = norm( W norm(q_a) ),  nu_b = norm( W norm(k_b) )     W = onehot(y)^T, rows L1-normalised (K, N)
    logits[c, c] = nu_a[c] . nu_b[c] / tau                       (positive: same cluster, other view)
    logits[c, j] = nu_a[c] . nu_a[j] / tau   (j != c)            (negatives: other online prototypes)
    L_c = -logits[c, c] + logsumexp_j logits[c, j]

Clusters absent from the batch: their columns are set to -10 (official code, not
-inf) and their rows give no loss; the loss is the mean over present clusters,
averaged over both directions.  Weight gamma = 0.1, and 0 until warm-up ends.

The prototypes are means over the GLOBAL batch: under DDP q and k are gathered from
every process (``cache.gather``, with gradients) with the pseudo-labels of the gathered
indices, and every process computes the same loss (official: centres of the gathered
batch).  In a single process the global batch is the batch.

Which clusters count as absent (``absent_clusters``): ``global`` (the default) looks at
the pseudo-labels of the global batch, so the loss does not depend on how the batch is
split over processes; ``local`` is the official code's choice, which decides absence from
each process's OWN labels while the prototypes still average the gathered batch (a
cluster missing from one process's share is masked there).  The paper recipes set
``local``; with one process the two are the same.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch
import torch.nn.functional as F

from clusterkit import DIRECTIONS, Plugin, hookimpl
from clusterkit.errors import PluginError
from clusterkit.schema import non_negative, positive

#: Logit given to the columns of clusters absent from the batch (official code).
ABSENT_LOGIT = -10.0


def batch_prototypes(x: torch.Tensor, labels: torch.Tensor, num_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the rows of ``x`` (N, D) per cluster, L2-normalised: (K, D); and presence (K,) bool."""
    onehot = F.one_hot(labels, num_clusters).to(x.dtype)           # (N, K)
    counts = onehot.sum(0)                                        # (K,)
    weights = onehot.t() / counts.clamp(min=1).unsqueeze(1)       # (K, N), rows sum to 1 (or 0)
    return F.normalize(weights @ x, dim=1), counts > 0


def prototype_aggregation_loss(q_a: torch.Tensor, k_b: torch.Tensor, labels: torch.Tensor, num_clusters: int,
                               temperature: float, present: torch.Tensor | None = None) -> torch.Tensor:
    """PSL for one direction.  q_a, k_b: (N, D) raw (normalised here); labels (N,) -> scalar.

    N is the global batch (world_size * B): pass the gathered q_a, k_b and their labels.
    ``present`` (K,) bool overrides which clusters count as present (default: those in
    ``labels``).
    """
    nu_a, in_batch = batch_prototypes(F.normalize(q_a, dim=1), labels, num_clusters)
    present = in_batch if present is None else present
    nu_b, _ = batch_prototypes(F.normalize(k_b, dim=1), labels, num_clusters)
    logits = nu_a @ nu_a.t() / temperature                        # (K, K): online vs online
    positive = (nu_a * nu_b).sum(1) / temperature                 # (K,): online vs target, same cluster
    logits = logits.clone()
    diag = torch.arange(num_clusters, device=logits.device)
    logits[diag, diag] = positive
    logits = logits.masked_fill(~present.unsqueeze(0), ABSENT_LOGIT)  # masks, not boolean indexing:
    per_cluster = torch.logsumexp(logits, dim=1) - positive       # (K,)   no host sync on a GPU
    return (per_cluster * present).sum() / present.sum()


class PrototypeAggregation(Plugin):
    """Contrast batch prototypes of the two views over the pseudo-label clusters (PSL / PCL)."""

    @attrs.define
    class Params:
        temperature: float = attrs.field(default=0.5, validator=positive, metadata={"doc": "tau_p"})
        weight: float = attrs.field(default=0.1, validator=non_negative, metadata={"doc": "gamma (lambda in HaDis)"})
        warmup_gate: bool = attrs.field(default=True, metadata={
            "doc": "weight 0 while schedule.warmup_epochs last (official)"})
        absent_clusters: Literal["global", "local"] = attrs.field(
            default="global", validator=attrs.validators.in_(("global", "local")), metadata={
                "doc": "which pseudo-labels decide that a cluster is absent: the global batch's, or each "
                       "process's own (official; the same with one process)"})

    @hookimpl
    def compute_losses(self, state, cache):
        if state.pseudo_labels is None:
            raise PluginError("prototype_aggregation needs pseudo-labels, but no E-step plugin published any. "
                              "Add kmeans_e_step (or another E-step plugin) to the recipe's plugins.")
        if self.warmup_gated(state):
            return {"prototype_aggregation": torch.zeros((), device=state.device)}
        labels = state.pseudo_labels[cache.global_index]          # (N,) of the global batch
        present = None
        if self.params.absent_clusters == "local":
            present = torch.bincount(state.pseudo_labels[cache.index], minlength=state.num_clusters) > 0
        losses = [prototype_aggregation_loss(cache.gather("q", a), cache.gather("k", b), labels,
                                             state.num_clusters, self.params.temperature, present)
                  for a, b in DIRECTIONS]
        return {"prototype_aggregation": self.params.weight * torch.stack(losses).mean()}
