"""Diffused sampling alignment (ProPos PSA, DigPro L_base Eq. 2, HaDis DSA).

For a direction (online view a, target view b) with q = q_a raw and k = k_b:

    L = -2 * cos( p(q + sigma * eps), k ),   eps ~ N(0, I)            (DigPro Eq. 2)

Gaussian noise is added to the RAW projector output before the predictor; sigma = 0
during the warm-up epochs.  The loss is the batch mean, averaged over both
directions.  (2 - 2 cos has the same gradient; we keep the paper's -2 cos.)

The loss is per sample, so under DDP each process averages its own batch (DDP's
gradient mean is then the global mean).  The noise eps of view a comes from
``cache.randn(D, salt="diffused_sampling/view<a>")``: drawn for the global batch from
(run.seed, step), so a sample's noise does not depend on the number of processes.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from clusterkit import DIRECTIONS, Plugin, hookimpl
from clusterkit.schema import non_negative
from clusterkit_plugins.propos.byol_target import PREDICTOR

#: The salt of this plugin's noise draw (``cache.randn(..., salt=f"{NOISE_SALT}/view<a>")``); HaDis's
#: hardness_aware_distillation draws under it too (``noise: shared``), to add the same eps.
NOISE_SALT = "diffused_sampling"


def diffused_sampling_loss(pred: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """-2 cos(pred_i, k_i) averaged over the batch.  pred, k: (B, D) -> scalar."""
    return -2.0 * F.cosine_similarity(pred, k.detach(), dim=1).mean()


def diffuse(q: torch.Tensor, sigma: float, eps: torch.Tensor) -> torch.Tensor:
    """q + sigma * eps.  q, eps: (B, D) with eps ~ N(0, I) -> (B, D) in q's dtype; q itself when sigma = 0."""
    return q + sigma * eps.to(q.dtype) if sigma > 0 else q


def diffusion_noise(cache, view: int, dim: int, salt: str) -> torch.Tensor:
    """eps (B, dim) ~ N(0, I) for this process's samples of ``view``, from ``cache.randn`` with the salt
    ``"<salt>/view<view>"`` (the same for a sample however the global batch is split)."""
    return cache.randn(dim, salt=f"{salt}/view{view}")


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
        return 0.0 if self.warmup_gated(state) else self.params.sigma

    def diffused(self, state, cache, view: int) -> torch.Tensor:
        """q + sigma * eps of ``view`` (B, D); no draw while sigma is 0."""
        q, sigma = cache["q", view], self.sigma(state)
        if sigma == 0:
            return q
        return diffuse(q, sigma, diffusion_noise(cache, view, q.shape[1], NOISE_SALT))

    @hookimpl
    def compute_losses(self, state, cache):
        predictor = state.model[PREDICTOR]
        losses = [diffused_sampling_loss(predictor(self.diffused(state, cache, a)), cache["k", b])
                  for a, b in DIRECTIONS]
        return {"diffused_sampling": self.params.weight * torch.stack(losses).mean()}
