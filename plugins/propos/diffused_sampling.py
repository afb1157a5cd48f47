"""Diffused sampling alignment (ProPos PSA, DigPro L_base Eq. 2, HaDis DSA).

For a direction (online view a, target view b) with q = q_a raw and k = k_b:

    L = -2 * cos( p(q + sigma * eps), k ),   eps ~ N(0, I)            (DigPro Eq. 2)

Gaussian noise is added to the RAW projector output before the predictor; sigma = 0
during the warm-up epochs.  The loss is the batch mean, averaged over both
directions.  (2 - 2 cos has the same gradient; we keep the paper's -2 cos.)
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from clusterkit import DIRECTIONS, Plugin, hookimpl
from clusterkit.schema import non_negative


def diffused_sampling_loss(pred: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """-2 cos(pred_i, k_i) averaged over the batch.  pred, k: (B, D) -> scalar."""
    return -2.0 * F.cosine_similarity(pred, k.detach(), dim=1).mean()


def diffuse(q: torch.Tensor, sigma: float) -> torch.Tensor:
    """q + sigma * eps with eps ~ N(0, I) from torch's global RNG.  (B, D) -> (B, D)."""
    return q + sigma * torch.randn_like(q) if sigma > 0 else q


class DiffusedSampling(Plugin):
    """Align the predictor output of a diffused online sample with the target (PSA / L_base / DSA)."""

    @attrs.define
    class Params:
        sigma: float = attrs.field(default=0.001, validator=non_negative, metadata={
            "doc": "std of the Gaussian noise added to q (0 during warm-up)"})
        weight: float = attrs.field(default=1.0, validator=non_negative, metadata={"doc": "loss weight"})
        warmup_gate: bool = attrs.field(default=True, metadata={
            "doc": "sigma = 0 while schedule.warmup_epochs last (official)"})

    def sigma(self, state) -> float:
        return 0.0 if (self.params.warmup_gate and state.in_warmup) else self.params.sigma

    @hookimpl
    def compute_losses(self, state, cache):
        predictor = state.model["predictor"]
        sigma = self.sigma(state)
        losses = [diffused_sampling_loss(predictor(diffuse(cache["q", a], sigma)), cache["k", b])
                  for a, b in DIRECTIONS]
        return {"diffused_sampling": self.params.weight * torch.stack(losses).mean()}
