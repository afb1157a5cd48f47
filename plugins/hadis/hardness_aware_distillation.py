"""Hardness-aware self-distillation (HaDis HSD, arXiv 2401.14038).

HSD distils the target (teacher) embedding space into the online (student) one and
spends its effort on the hardest pairs of the batch.  For a direction (online view a,
target view b), with q = q_a the RAW online projector output, k = k_b the target output
and p(.) the predictor, over the N samples of the global batch (N = world_size * B; or of
this process's batch, N = B, with ``mining: local``, see below):

    t_i = norm(k_i)                                     teacher (no gradient)
    s_j = norm(p(q_j + sigma * eps_j)),  eps ~ N(0, I)  student: the diffused sample of DSA

Distances, both anchored at the teacher of sample i:

    D_t[i, j] = ||t_i - t_j||                           teacher-teacher
    D[i, j]   = ||t_i - s_j||                           teacher-student

Hardness-aware mining.  The student s_i of the same image is the reference: j is a
*negative* of anchor i when the teacher puts it farther than that reference,
D_t[i, j] > D[i, i]; every other j is a *positive* (i itself always is, since
D_t[i, i] = 0).  The hardest negative is the negative the student brings closest, the
hardest positive the positive the student pushes farthest:

    n_i = argmin_{j negative} D[i, j]          p_i = argmax_{j positive} D[i, j]

Hardness weights (constants: no gradient) measure how much the student contradicts the
teacher on those pairs:

    w_n = max(D_t[i, n_i] - D[i, n_i], 0)      (negative pulled closer than the teacher has it)
    w_p = max(D[i, p_i] - D_t[i, p_i], 0)      (positive pushed farther than the teacher has it)

(The max in w_p never bites: D[i, p_i] >= D[i, i] >= D_t[i, p_i] for a positive; it is kept
as the paper writes it.  The one in w_n does: the hardest negative may already be farther
from the anchor in the student than in the teacher, and then it is not pushed.)

    L_HSD = mean_i softplus( (w_p * D[i, p_i] - w_n * D[i, n_i]) / tau ),   tau = 0.5   (i = 1..N)

An anchor without negatives (every D_t[i, j] <= D[i, i], e.g. a batch of identical
images or a student that sits exactly on its teacher) has no negative term: its loss
is softplus(w_p * D[i, p_i] / tau), it still pulls its hardest positive in and is
counted in the mean like every other anchor.

HSD is symmetric like the other BYOL-style losses: both views play student and teacher
(``clusterkit.state.DIRECTIONS``) and the two directions are averaged.  Its weight is 1
with no warm-up gate; only the diffusion noise follows DSA (sigma = 0.001, and 0 during
the warm-up epochs when ``warmup_gate`` is on).  Which eps (``noise``):

* ``shared`` (the default, the official code's): the eps of diffused_sampling's draw
  (``cache.randn`` with the salt "diffused_sampling/view<a>", the same tensor), so that the
  student is DSA's diffused sample.  The official HaDis forward computes one
  noise_q = q + sigma * eps per direction and feeds p(noise_q) to both PSA and HSD; found by
  the whole-step golden (tests/plugins/test_golden_steps.py), which draws only that noise.
  With ``sigma`` equal to diffused_sampling's (the recipes: both 0.001) the two students are
  the same tensor.
* ``own``: a draw of its own (salt "hardness_aware_distillation/view<a>"), independent of
  DSA's; the two students then differ by ~sigma.

Which batch the mining scope covers under DDP (``mining``):

* ``global`` (the default): mining contrasts every sample with every other one of the global
  batch.  Each process computes its students p(q + sigma*eps) (B, D), gathers them with
  gradients and the teachers (``cache.gather("k", b)``) into (N, D), and computes the same
  loss of the N anchors, so the loss does not depend on how the batch is split over processes.
* ``local``: the official code's scope (HaDis, a ProPos fork, calls its HSD inside each
  process's forward on that process's own k and p(q + sigma*eps), without a gather): the
  hardest positives and negatives are mined within each process's LOCAL batch of B, the loss
  is the mean over its B anchors, and DDP averages the processes' gradients.  The paper
  recipes set ``local``.

With one process the two are the same (N = B).
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch
import torch.nn.functional as F

from clusterkit import DIRECTIONS, Plugin, hookimpl
from clusterkit.distributed import gather_with_grad
from clusterkit.errors import PluginError
from clusterkit.schema import non_negative, positive
from clusterkit_plugins.propos.byol_target import PREDICTOR
from clusterkit_plugins.propos.diffused_sampling import NOISE_SALT, diffuse, diffusion_noise

LOSS_NAME = "hardness_aware_distillation"


# ---------------------------------------------------------------------------------------------
# The method as pure functions of tensors
# ---------------------------------------------------------------------------------------------

def pairwise_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ||x_i - y_j||: x (N, D), y (M, D) -> (N, M).

    Computed from the differences (not from |x|^2 + |y|^2 - 2 x.y), so that equal rows give
    exactly 0 and near-ties between distances are decided exactly.
    """
    return torch.cdist(x.unsqueeze(0), y.unsqueeze(0), compute_mode="donot_use_mm_for_euclid_dist").squeeze(0)


@torch.no_grad()
def mine_hardest(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
    """Hardness-aware mining for every anchor i.  student, teacher: (N, D), L2-normalised.

    Returns (all without gradient)::

        positive  (N,) int64  p_i = argmax over positives of D[i, .]
        negative  (N,) int64  n_i = argmin over negatives of D[i, .] (0 when there is none)
        has_negative (N,) bool
        w_p, w_n  (N,) float  hardness weights; w_n = 0 where there is no negative
        negatives (N, N) bool negatives[i, j] = D_t[i, j] > D[i, i]

    Ties are broken towards the lowest index (torch's argmin / argmax).
    """
    d_t = pairwise_distances(teacher, teacher)                       # D_t[i, j] = ||t_i - t_j||
    d = pairwise_distances(teacher, student)                         # D[i, j]   = ||t_i - s_j||
    negatives = d_t > d.diagonal().unsqueeze(1)                      # (N, N); never j = i
    has_negative = negatives.any(dim=1)
    positive = d.masked_fill(negatives, float("-inf")).argmax(dim=1)   # hardest positive
    negative = d.masked_fill(~negatives, float("inf")).argmin(dim=1)   # hardest negative
    rows = torch.arange(d.shape[0], device=d.device)
    w_p = (d[rows, positive] - d_t[rows, positive]).clamp(min=0)
    w_n = torch.where(has_negative, (d_t[rows, negative] - d[rows, negative]).clamp(min=0), 0.0)
    return {"positive": positive, "negative": negative, "has_negative": has_negative,
            "w_p": w_p, "w_n": w_n, "negatives": negatives}


def hardness_aware_distillation_loss(student: torch.Tensor, teacher: torch.Tensor,
                                     temperature: float) -> torch.Tensor:
    """HSD for one direction (HaDis, hardness-aware self-distillation).

    student: (N, D) the predictor output of the diffused online sample, p(q + sigma*eps), raw;
    teacher: (N, D) the target projector output k, raw (detached here); N the global batch
    (under DDP both gathered, the student with gradients).  Both are
    L2-normalised here to s and t, in float32 at least (bf16 under autocast is too coarse to
    tell distances apart).  Returns a scalar::

        L = mean_i softplus( (w_p * ||t_i - s_{p_i}|| - w_n * ||t_i - s_{n_i}||) / temperature )

    with p_i, n_i, w_p, w_n from :func:`mine_hardest` (weights are constants).  An anchor
    without negatives contributes softplus(w_p * ||t_i - s_{p_i}|| / temperature).
    The gradient reaches the student rows s_{p_i} and s_{n_i} only.
    """
    dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    s = F.normalize(student.to(dtype), dim=1)
    t = F.normalize(teacher.detach().to(dtype), dim=1)
    mined = mine_hardest(s.detach(), t)
    d_pos = torch.linalg.vector_norm(t - s[mined["positive"]], dim=1)       # D[i, p_i]
    d_neg = torch.linalg.vector_norm(t - s[mined["negative"]], dim=1)       # D[i, n_i]
    pull = mined["w_p"] * d_pos
    push = torch.where(mined["has_negative"], mined["w_n"] * d_neg, torch.zeros_like(d_neg))
    return F.softplus((pull - push) / temperature).mean()


# ---------------------------------------------------------------------------------------------
# The plugin
# ---------------------------------------------------------------------------------------------

class HardnessAwareDistillation(Plugin):
    """Distil the target's distances into the diffused online predictions, weighted by hardness (HSD)."""

    @attrs.define
    class Params:
        temperature: float = attrs.field(default=0.5, validator=positive, metadata={
            "doc": "tau of the softplus (HaDis: 0.5)"})
        sigma: float = attrs.field(default=0.001, validator=non_negative, metadata={
            "doc": "std of the Gaussian noise added to q before the predictor, as DSA (0 during warm-up)"})
        weight: float = attrs.field(default=1.0, validator=non_negative, metadata={
            "doc": "loss weight (HaDis: 1, no warm-up gate on the weight)"})
        warmup_gate: bool = attrs.field(default=True, metadata={
            "doc": "sigma = 0 while schedule.warmup_epochs last, as diffused_sampling"})
        noise: Literal["shared", "own"] = attrs.field(
            default="shared", validator=attrs.validators.in_(("shared", "own")), metadata={
                "doc": "shared: the student adds diffused_sampling's eps (one draw feeds DSA and HSD, official); "
                       "own: an independent draw"})
        mining: Literal["global", "local"] = attrs.field(
            default="global", validator=attrs.validators.in_(("global", "local")), metadata={
                "doc": "where the hardest positives and negatives are mined under DDP: the gathered global "
                       "batch, or each process's own batch (official; the same with one process)"})

    def sigma(self, state) -> float:
        return 0.0 if self.warmup_gated(state) else self.params.sigma

    @hookimpl(trylast=True)  # after byol_target's setup, which builds the predictor
    def setup(self, state):
        if PREDICTOR not in state.model:
            raise PluginError("hardness_aware_distillation needs the predictor state.model['predictor'] and the "
                              "step outputs 'q' and 'k', which byol_target provides. Add byol_target to the "
                              "recipe's plugins.")

    def student(self, state, cache, view: int) -> torch.Tensor:
        """p(q + sigma * eps) of ``view`` for this process's samples (B, D), with gradient."""
        q, sigma = cache["q", view], self.sigma(state)
        if sigma > 0:
            # official: the same noise_q as PSA (diffused_sampling's salt gives the very same draw)
            salt = NOISE_SALT if self.params.noise == "shared" else LOSS_NAME
            q = diffuse(q, sigma, diffusion_noise(cache, view, q.shape[1], salt))
        return state.model[PREDICTOR](q)

    @hookimpl
    def compute_losses(self, state, cache):
        # online view a -> student, target view b -> teacher; over the global batch (N, D), or
        # over this process's batch (B, D) with mining: local (official)
        if self.params.mining == "local":
            pairs = [(self.student(state, cache, a), cache["k", b]) for a, b in DIRECTIONS]
        else:
            pairs = [(gather_with_grad(self.student(state, cache, a)), cache.gather("k", b)) for a, b in DIRECTIONS]
        losses = [hardness_aware_distillation_loss(student, teacher, self.params.temperature)
                  for student, teacher in pairs]
        return {LOSS_NAME: self.params.weight * torch.stack(losses).mean()}
