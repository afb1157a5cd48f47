"""CC's instance-level contrastive loss (Li et al., AAAI 2021, Eq. 1-3; the NT-Xent of SimCLR).

The two views of a batch of B images give 2B samples with instance projections
z^a_1..z^a_B, z^b_1..z^b_B (L2-normalised, from ``contrastive_heads``).  For sample
i of view a, its other view z^b_i is the positive and the remaining 2B - 2 samples are
the negatives:

    s(u, v) = u . v / (|u| |v|)                                             (Eq. 1: cosine = dot of the unit z)
    l^a_i   = -log( exp(s(z^a_i, z^b_i) / tau_I) /
                    sum_{j=1..B} [ exp(s(z^a_i, z^a_j) / tau_I) [j != i] + exp(s(z^a_i, z^b_j) / tau_I) ] )   (Eq. 2)
    L_ins   = 1/(2B) sum_i (l^a_i + l^b_i)                                  (Eq. 3), tau_I = 0.5

As the official code: cross-entropy summed over the 2B anchors, divided by 2B.  Under
DDP B is the global batch (world_size x the per-process batch): the z of every process
are gathered first, with gradients (``cache.gather``), so the negatives are the global
batch and every process computes the same loss.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from clusterkit import Plugin, hookimpl
from clusterkit.schema import non_negative, positive

#: Vectors are divided by max(|v|, COSINE_EPS): the eps of torch's CosineSimilarity, which the
#: official cluster loss uses.
COSINE_EPS = 1e-8


def instance_contrastive_loss(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float,
                              eps: float = COSINE_EPS) -> torch.Tensor:
    """L_ins of Eq. 3.  z_a, z_b: (B, D), row i of each the two views of image i -> scalar.

    Each row is divided by max(|row|, eps) here (a no-op on ``contrastive_heads``' z, which
    are unit vectors already), so the similarities are cosines / ``temperature``.  Each of
    the 2B samples is an anchor whose positive is its other view and whose negatives are
    the other 2B - 2 samples (itself excluded); the per-anchor cross-entropies are summed
    and divided by 2B.
    """
    if z_a.shape != z_b.shape or z_a.dim() != 2:
        raise ValueError(f"z_a and z_b must both be (B, D), got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    batch = z_a.shape[0]
    z = F.normalize(torch.cat([z_a, z_b]), dim=1, eps=eps)                # (2B, D)
    logits = z @ z.t() / temperature                                      # (2B, 2B)
    self_pairs = torch.eye(2 * batch, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pairs, float("-inf"))                # an anchor is not its own negative
    positives = (torch.arange(2 * batch, device=z.device) + batch) % (2 * batch)   # i <-> i + B
    return F.cross_entropy(logits, positives, reduction="sum") / (2 * batch)


class InstanceContrast(Plugin):
    """Instance-level contrast of the two views' instance projections z (CC Eq. 3)."""

    @attrs.define
    class Params:
        temperature: float = attrs.field(default=0.5, validator=positive, metadata={
            "doc": "tau_I, the instance-level temperature (official 0.5)"})
        weight: float = attrs.field(default=1.0, validator=non_negative, metadata={"doc": "loss weight"})

    @hookimpl
    def compute_losses(self, state, cache):
        z_a = cache.gather("z", 0).float()    # (world_size * B, D): the global batch
        z_b = cache.gather("z", 1).float()
        with torch.autocast(state.device.type, enabled=False):   # similarities in float32, also under AMP
            loss = instance_contrastive_loss(z_a, z_b, self.params.temperature)
        return {"instance_contrast": self.params.weight * loss}
