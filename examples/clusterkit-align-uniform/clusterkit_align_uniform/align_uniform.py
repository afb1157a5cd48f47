"""Alignment and uniformity on the hypersphere (Wang & Isola, "Understanding Contrastive
Representation Learning through Alignment and Uniformity on the Hypersphere", ICML 2020).

The paper splits the contrastive objective into two properties of L2-normalised features f:

    L_align(f; alpha) = E_(x,y)~p_pos  ||f(x) - f(y)||_2^alpha          positive pairs close
    L_uniform(f; t)   = log E_x,y~p_data  exp(-t ||f(x) - f(y)||_2^2)    all pairs spread out

(Sec. 4.1, the definitions of both losses), and trains on a weighted sum of the two with
alpha = 2 and t = 2.  Here, for the step's two augmented views of a batch of B images:

    z_v       = norm(g(h_v))                     h_v = cache["h", v], g: this plugin's projector
    L_align   = mean_i ||z_0i - z_1i||^alpha     the two views of image i are the positive pair
    L_uniform = log mean_{i != j} exp(-t ||z_vi - z_vj||^2), averaged over the two views, over the
                global batch (cache.gather: every process's samples under torchrun)
    loss      = align_weight * L_align + uniform_weight * L_uniform

Both terms are logged separately (``au_align``, ``au_uniform``).  The clusters come from the
features the core embeds (the backbone's pooled output) by k-means, e.g. ``kmeans_e_step``.
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F

from clusterkit import Plugin, hookimpl
from clusterkit.models import MLPHead
from clusterkit.schema import non_negative, positive

#: The key of this plugin's projector in ``state.model`` (checkpointed with the model).
PROJECTOR = "align_uniform_projector"
#: The step output this plugin registers: the normalised projection z of a view.
OUTPUT = "au_z"


def align_loss(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """L_align: mean over i of ||x_i - y_i||_2^alpha.  x, y: (B, D), rows L2-normalised -> scalar.

    For alpha = 2 no square root is taken, so the gradient is defined for x_i = y_i too."""
    squared = (x - y).pow(2).sum(dim=1)
    return squared.pow(alpha / 2).mean()


def uniform_loss(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """L_uniform: log of the mean over pairs i != j of exp(-t ||x_i - x_j||_2^2).  x: (B, D), B >= 2,
    rows L2-normalised -> scalar in [-4t, 0].

    Computed as logsumexp over the B(B-1)/2 pairs i < j minus log of their number, so a large t
    does not underflow; squared distances come from the Gram matrix (no square root)."""
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"uniform_loss needs at least 2 samples, got {n}")
    sq_norms = x.pow(2).sum(dim=1)
    sq_dist = (sq_norms[:, None] + sq_norms[None, :] - 2 * x @ x.t()).clamp(min=0)
    i, j = torch.triu_indices(n, n, offset=1, device=x.device)
    return torch.logsumexp(-t * sq_dist[i, j], dim=0) - math.log(i.numel())


class AlignUniform(Plugin):
    """Alignment + uniformity loss on a projector of its own (Wang & Isola, ICML 2020)."""

    @attrs.define
    class Params:
        alpha: float = attrs.field(default=2.0, validator=positive, metadata={
            "doc": "exponent of the alignment distance (paper: 2)"})
        t: float = attrs.field(default=2.0, validator=positive, metadata={
            "doc": "temperature of the uniformity Gaussian kernel (paper: 2)"})
        align_weight: float = attrs.field(default=1.0, validator=non_negative, metadata={
            "doc": "weight of L_align"})
        uniform_weight: float = attrs.field(default=1.0, validator=non_negative, metadata={
            "doc": "weight of L_uniform (lambda in the paper)"})
        hidden_dim: int = attrs.field(default=512, validator=positive, metadata={"doc": "projector hidden width"})
        out_dim: int = attrs.field(default=128, validator=positive, metadata={
            "doc": "dimension of the hypersphere the losses act on"})

    @hookimpl
    def setup(self, state):
        width = state.model["backbone"].num_features
        state.model[PROJECTOR] = MLPHead(width, self.params.hidden_dim, self.params.out_dim)

    @hookimpl
    def register_outputs(self, state):
        projector = state.model[PROJECTOR]

        def z(cache, view):
            return F.normalize(projector(cache["h", view]), dim=1)

        return {OUTPUT: z}

    @hookimpl
    def compute_losses(self, state, cache):
        p = self.params
        z0, z1 = cache[OUTPUT, 0], cache[OUTPUT, 1]  # per-sample alignment: the local batch suffices
        uniform = (uniform_loss(cache.gather(OUTPUT, 0), p.t) + uniform_loss(cache.gather(OUTPUT, 1), p.t)) / 2
        return {"au_align": p.align_weight * align_loss(z0, z1, p.alpha),
                "au_uniform": p.uniform_weight * uniform}
