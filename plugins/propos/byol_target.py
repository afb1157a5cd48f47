"""The BYOL-style online/target pair shared by ProPos, DigPro and HaDis.

Online branch: backbone -> projector MLP (d -> 4096 -> 256) -> predictor MLP
(256 -> 4096 -> 256, weights N(0, 0.01)).  Target branch: an EMA copy of backbone +
projector, parameters only (the target's BatchNorm buffers are its own, not EMA'd),
momentum alpha = 0.996, optionally increased to 1 along a cosine.  The predictor
trains with 10x the base learning rate.

Step outputs it provides, for view v of the step:
    ``q``  (B, 256) raw online projector output  q = g(f(x_v))
    ``k``  (B, 256) raw target projector output  k = g'(f'(x_v)), no gradient
Evaluation features (``embed``): norm(k) of the target branch, as the official code.

EMA timing: the official code updates the target inside its forward, after the losses and
before the optimiser step, so the target moves towards the online weights the losses saw:
xi_{n+1} = alpha * xi_n + (1 - alpha) * theta_n (``ema_timing: before_step``, the default,
in the ``before_optimizer_step`` hook).  ``after_step`` uses the weights after the step,
theta_{n+1}, as most BYOL implementations do.

Under torchrun, ``shuffle_bn: true`` is MoCo's shuffling BN for the target branch: the
target sees a random share of the global batch (the same permutation on every rank), so its
BatchNorm statistics do not come from the sample's own process, and the outputs are put
back in order.  In a single process it changes nothing (BN is permutation-invariant).
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from clusterkit import ParamGroup, Plugin, distributed, hookimpl
from clusterkit.models import MLPHead
from clusterkit.schema import in_range, positive

#: The ``state.model`` keys byol_target adds, which other plugins (diffused_sampling,
#: momentum_grouping, hardness_aware_distillation) read.
PROJECTOR = "projector"
PREDICTOR = "predictor"
TARGET_BACKBONE = "target_backbone"
TARGET_PROJECTOR = "target_projector"

@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, parameters only."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.mul_(momentum).add_(o.detach(), alpha=1.0 - momentum)


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """BYOL's schedule: 1 - (1 - base) * (cos(pi * step / total) + 1) / 2, from base to 1."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max(total_steps, 1)) + 1.0) / 2.0


class BYOLTarget(Plugin):
    """Online projector + predictor and an EMA target branch (ProPos / DigPro / HaDis)."""

    @attrs.define
    class Params:
        momentum: float = attrs.field(default=0.996, validator=in_range(0, 1), metadata={
            "doc": "EMA momentum alpha of the target branch"})
        cosine_increase: bool = attrs.field(default=False, metadata={
            "doc": "increase the momentum to 1 along a cosine over training (BYOL)"})
        hidden_dim: int = attrs.field(default=4096, validator=positive, metadata={"doc": "MLP hidden width"})
        out_dim: int = attrs.field(default=256, validator=positive, metadata={"doc": "projection dimension"})
        predictor_lr_scale: float = attrs.field(default=10.0, validator=positive, metadata={
            "doc": "predictor lr multiplier (official: 10)"})
        predictor_init_std: float = attrs.field(default=0.01, validator=positive, metadata={
            "doc": "std of the predictor's initial weights"})
        shuffle_bn: bool = attrs.field(default=False, metadata={
            "doc": "under torchrun: MoCo's shuffling BN for the target branch (no effect in one process)"})
        ema_timing: Literal["before_step", "after_step"] = attrs.field(
            default="before_step", validator=attrs.validators.in_(("before_step", "after_step")), metadata={
                "doc": "before_step: EMA from the pre-step online weights (official, inside the forward); "
                       "after_step: from the weights after the optimiser step"})

    def online(self, model: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
        return model[PROJECTOR](model["backbone"](x))

    def target(self, model: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
        return model[TARGET_PROJECTOR](model[TARGET_BACKBONE](x))

    @torch.no_grad()
    def shuffled_target(self, model: nn.ModuleDict, cache, v: int) -> torch.Tensor:
        """k of view v with shuffling BN: gather the global batch, run a permuted share of it
        through the target on this rank, gather the outputs and undo the permutation."""
        x = cache.views[v]
        if not distributed.is_distributed():
            return self.target(model, x)
        full = distributed.gather(x)                                        # (W*B, C, S, S)
        perm = torch.randperm(full.shape[0], generator=cache.generator(f"shuffle_bn/view{v}"), device=x.device)
        out = distributed.gather(self.target(model, distributed.local_rows(full[perm])))  # permuted order
        restored = torch.empty_like(out)
        restored[perm] = out
        return distributed.local_rows(restored)

    @hookimpl
    def setup(self, state):
        p, m = self.params, state.model
        dim = m["backbone"].num_features
        m[PROJECTOR] = MLPHead(dim, p.hidden_dim, p.out_dim)
        m[PREDICTOR] = MLPHead(p.out_dim, p.hidden_dim, p.out_dim, init_std=p.predictor_init_std)
        m[TARGET_BACKBONE] = copy.deepcopy(m["backbone"])
        m[TARGET_PROJECTOR] = copy.deepcopy(m[PROJECTOR])
        for name in (TARGET_BACKBONE, TARGET_PROJECTOR):
            m[name].requires_grad_(False)
        return [ParamGroup(list(m[PREDICTOR].parameters()), lr_scale=p.predictor_lr_scale, name=PREDICTOR)]

    @hookimpl
    def register_outputs(self, state):
        model = state.model

        def q(cache, v):
            return self.online(model, cache.views[v])

        def k(cache, v):
            if self.params.shuffle_bn:
                return self.shuffled_target(model, cache, v)
            with torch.no_grad():
                return self.target(model, cache.views[v])

        return {"q": q, "k": k}

    @hookimpl
    def embed(self, state, images):
        return F.normalize(self.target(state.model, images), dim=1)

    def current_momentum(self, iteration: int, state) -> float:
        """alpha for iteration ``iteration`` (numbered from 1, as the official n_iter)."""
        p = self.params
        return cosine_momentum(p.momentum, iteration, state.total_steps) if p.cosine_increase else p.momentum

    def update_target(self, state, iteration: int) -> None:
        m = state.model
        alpha = self.current_momentum(iteration, state)
        ema_update(m[TARGET_BACKBONE], m["backbone"], alpha)
        ema_update(m[TARGET_PROJECTOR], m[PROJECTOR], alpha)
        if self.params.cosine_increase:
            state.log("ema", alpha)

    @hookimpl
    def before_optimizer_step(self, state):
        if self.params.ema_timing == "before_step":
            self.update_target(state, state.step + 1)  # the step about to be taken

    @hookimpl
    def after_step(self, state):
        if self.params.ema_timing == "after_step":
            self.update_target(state, state.step)  # the step just taken
