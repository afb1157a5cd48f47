"""CC's cluster-level contrastive loss (Li et al., AAAI 2021, Eq. 4-7).

The cluster head gives each view a B x K matrix of soft assignments Y^a, Y^b (rows
sum to 1).  Column k of Y^a, a B-vector y^a_k, is read as the representation of
cluster k under augmentation a; the 2K columns of both views are contrasted the way
the instance-level loss contrasts the 2B samples:

    s(u, v)  = u . v / (|u| |v|)                                              (Eq. 4: cosine)
    l^a_k    = -log( exp(s(y^a_k, y^b_k) / tau_C) /
                     sum_{j=1..K} [ exp(s(y^a_k, y^a_j) / tau_C) [j != k] + exp(s(y^a_k, y^b_j) / tau_C) ] )  (Eq. 5)
    L_contr  = 1/(2K) sum_k (l^a_k + l^b_k),  tau_C = 1.0

Alone, this loss is minimised by putting most samples into few clusters; an entropy
term on the clusters' batch masses prevents it.  Per view v:

    P^v_k    = sum_t Y^v_tk / sum_{t,j} Y^v_tj                                 (batch mass of cluster k)
    L_ent    = sum_{v in a, b} ( log K - H(P^v) ),   H(P) = -sum_k P_k log P_k

and the loss is L_clu = L_contr + L_ent (Eq. 7 up to a constant).

Paper vs code: the paper writes Eq. 7 as L_contr - H(Y) with H(Y) = H(P^a) + H(P^b)
(Eq. 6); the official code adds log K per view, i.e. its term is the paper's plus
2 log K.  The gradient is the same; the value differs: the code's term is >= 0 and 0
exactly when the clusters hold equal masses.  We follow the code (``entropy_offset``,
default true); false gives the paper's -H(Y).  Where a cluster's mass underflows to 0
we use 0 log 0 = 0 (the official code would give NaN there).

The contrast and the entropy are returned as two loss terms, ``cluster_contrast`` and
``cluster_entropy``, so both are logged.

Under DDP the columns and the masses P are those of the global batch: every process
gathers Y^a, Y^b with gradients (``cache.gather``; B = world_size x the per-process
batch) and computes the same loss.
"""

from __future__ import annotations

import math

import attrs
import torch

from clusterkit import Plugin, hookimpl
from clusterkit.schema import non_negative, positive

from .instance_contrast import COSINE_EPS, instance_contrastive_loss


def cluster_contrastive_loss(c_a: torch.Tensor, c_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """L_contr of Eq. 5-7: NT-Xent over the 2K cluster vectors.  c_a, c_b: (B, K) -> scalar.

    Column k of ``c_a`` and column k of ``c_b`` are a positive pair; the other 2K - 2
    columns are the negatives of both.  Similarities are cosines / ``temperature``, the
    per-cluster cross-entropies are summed and divided by 2K.  This is the instance-level
    NT-Xent applied to the transposed matrices (columns instead of rows).

    The cosine is that of torch's CosineSimilarity (eps 1e-8), which the official code
    calls: each column is divided by max(|column|, 1e-8).  A column below that norm (a
    cluster that no sample of the batch uses) is therefore nearly orthogonal to every
    other column, and an all-zero column has cosine 0 with everything.
    """
    if c_a.shape != c_b.shape or c_a.dim() != 2:
        raise ValueError(f"c_a and c_b must both be (B, K), got {tuple(c_a.shape)} and {tuple(c_b.shape)}")
    return instance_contrastive_loss(c_a.t(), c_b.t(), temperature, eps=COSINE_EPS)


def cluster_entropy_loss(c: torch.Tensor, offset: bool = True) -> torch.Tensor:
    """log K - H(P) for one view (the official code's form; ``offset=False``: -H(P), the paper's).

    c: (B, K) soft assignments -> scalar.  P = column sums of c / their total, the batch
    mass of each cluster; H(P) = -sum_k P_k log P_k with 0 log 0 = 0.  With the offset
    the value lies in [0, log K] and is 0 for equal masses.
    """
    if c.dim() != 2:
        raise ValueError(f"c must be (B, K), got {tuple(c.shape)}")
    mass = c.sum(dim=0)
    p = mass / mass.sum()
    # p log p with 0 log 0 = 0; the clamp keeps the gradient finite at p = 0 too (xlogy's would be NaN)
    neg_entropy = (p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum()
    return neg_entropy + math.log(c.shape[1]) if offset else neg_entropy


class ClusterContrast(Plugin):
    """Cluster-level contrast of the cluster head's columns plus the cluster-mass entropy (CC Eq. 4-7)."""

    @attrs.define
    class Params:
        temperature: float = attrs.field(default=1.0, validator=positive, metadata={
            "doc": "tau_C, the cluster-level temperature (official 1.0)"})
        weight: float = attrs.field(default=1.0, validator=non_negative, metadata={
            "doc": "weight of the whole cluster-level loss (both terms)"})
        entropy_weight: float = attrs.field(default=1.0, validator=non_negative, metadata={
            "doc": "weight of the entropy term relative to the contrast (official 1.0; 0 switches it off)"})
        entropy_offset: bool = attrs.field(default=True, metadata={
            "doc": "add log K per view as the official code (term >= 0); false: the paper's -H(Y), same gradient"})

    @hookimpl
    def compute_losses(self, state, cache):
        p = self.params
        c_a = cache.gather("c", 0).float()    # (world_size * B, K): the global batch
        c_b = cache.gather("c", 1).float()
        with torch.autocast(state.device.type, enabled=False):   # similarities in float32, also under AMP
            contrast = cluster_contrastive_loss(c_a, c_b, p.temperature)
            entropy = cluster_entropy_loss(c_a, p.entropy_offset) + cluster_entropy_loss(c_b, p.entropy_offset)
        return {"cluster_contrast": p.weight * contrast,
                "cluster_entropy": p.weight * p.entropy_weight * entropy}
