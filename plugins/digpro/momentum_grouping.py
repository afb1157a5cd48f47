"""Dynamic grouping (DigPro Eq. 3-6, after SMoG): group-level contrast with momentum groups.

DigPro keeps l group features G (l, D) (l = K clusters by default) next to the
BYOL-style pair of ``byol_target``.  For a direction (online view a, target view b)
with q = q_a the RAW online projector output, k = k_b the target output and
p(.) the predictor:

    mu_i   = argmax_c cos(k_i, G_c)                                    (Eq. 3: assign by the target)
    G'_c   = beta * G_c + (1 - beta) * mean_{i: mu_i = c} q_i          (Eq. 4: momentum update;
             groups that receive no sample keep G'_c = G_c)
    s_ic   = norm(p(q_i)) . norm(G'_c) / tau_g                          (Eq. 5: group logits)
    L      = mean_i CE(s_i, mu_i) = mean_i [ logsumexp_c s_ic - s_i,mu_i ]   (Eq. 6)

The index i runs over the GLOBAL batch (N = world_size * B samples): under DDP q, k and
p(q) are gathered from every process (``cache.gather``, with gradients), so every process
assigns, updates and contrasts the same samples and keeps the same groups G; with one
process N = B.

G' is NOT detached inside the loss: the gradient reaches q both through the predictor
and through the groups (the 1 - beta share of q in G').  After the loss, G'.detach()
replaces G, so the second direction starts from the first one's groups (G is updated
twice per iteration).  beta = 0.99, tau_g = 0.1; weight lambda = 1.0 (0.3 ImageNet-10,
0.5 ImageNet-Dogs and UC-Merced, 0.1 Tiny-ImageNet); no warm-up gate.

Regrouping: a memory bank keeps the latest norm(q) of both views of the global batch
(2560 entries = 5 iterations at a global batch of 256; the same bank on every process).
Every ``regroup_every`` iterations (official: every K iterations, the iteration counter
starting at 1) spherical k-means on the bank resets G to its normalised centres.  The
official code ran unseeded scikit-learn on the CPU; here it is clusterkit's seeded torch
k-means on the bank's device (seed + iteration), so a run is reproducible and every
process regroups identically.

The groups, the bank, its fill pointer and count and the iteration counter are
buffers of the module ``state.model["momentum_grouping"]``, so they are checkpointed
with the model and a resumed run continues exactly.

Official quirk (``extra_ema``, off by default): on iterations that do not regroup the
official code applies an extra EMA of the target (momentum 0.99) BEFORE the forward,
besides ``byol_target``'s 0.996 after the optimiser step.  The paper states 0.996 only.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from clusterkit import DIRECTIONS, Plugin, hookimpl
from clusterkit.cluster import kmeans
from clusterkit.errors import PluginError
from clusterkit.schema import in_range, non_negative, positive
from clusterkit_plugins.propos.byol_target import ema_update

MODULE_KEY = "momentum_grouping"


# ---------------------------------------------------------------------------------------------
# The method as pure functions of tensors
# ---------------------------------------------------------------------------------------------

def assign_groups(k: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Eq. 3: mu_i = argmax_c cos(k_i, G_c).  k: (N, D), groups: (l, D) -> (N,) int64."""
    return (F.normalize(k, dim=1) @ F.normalize(groups, dim=1).t()).argmax(dim=1)


def momentum_update(groups: torch.Tensor, q: torch.Tensor, assignments: torch.Tensor,
                    beta: float) -> torch.Tensor:
    """Eq. 4: G'_c = beta * G_c + (1 - beta) * mean of the q_i assigned to c.

    groups: (l, D), q: (N, D) raw projector outputs, assignments: (N,) in [0, l).
    Returns (l, D); rows of groups that received no sample are returned unchanged.
    Differentiable in ``q`` (and in ``groups`` if it requires grad): nothing is detached.
    """
    num_groups = groups.shape[0]
    q = q.to(groups.dtype)
    onehot = F.one_hot(assignments, num_groups).to(q.dtype)               # (N, l)
    counts = onehot.sum(dim=0)                                            # (l,)
    means = onehot.t() @ q / counts.clamp(min=1).unsqueeze(1)             # (l, D)
    updated = beta * groups + (1.0 - beta) * means
    return torch.where((counts > 0).unsqueeze(1), updated, groups)


def group_logits(pred: torch.Tensor, groups: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 5: s = norm(p(q)) @ norm(G')^T / tau_g.  pred: (N, D), groups: (l, D) -> (N, l)."""
    return F.normalize(pred, dim=1) @ F.normalize(groups, dim=1).t() / temperature


def group_loss(pred: torch.Tensor, groups: torch.Tensor, assignments: torch.Tensor,
               temperature: float) -> torch.Tensor:
    """Eq. 6: cross-entropy of the group logits against the assignments mu -> scalar."""
    return F.cross_entropy(group_logits(pred, groups, temperature), assignments)


def grouping_direction(q_a: torch.Tensor, k_b: torch.Tensor, pred_a: torch.Tensor, groups: torch.Tensor,
                       beta: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One direction (online view a, target view b) of dynamic grouping, Eq. 3-6.

    q_a: (N, D) raw online projector output of view a (with grad); k_b: (N, D) target
    output of view b; pred_a: (N, D) = p(q_a); groups: (l, D) the current G (a buffer).
    N is the global batch (the gathered tensors under DDP).
    Returns (loss scalar, G' (l, D) still attached to q_a's graph, assignments (N,)).
    """
    groups = groups.detach()
    mu = assign_groups(k_b.detach(), groups)
    new_groups = momentum_update(groups, q_a, mu, beta)
    return group_loss(pred_a, new_groups, mu, temperature), new_groups, mu


def random_groups(num_groups: int, dim: int, seed: int) -> torch.Tensor:
    """(l, D) unit vectors from a private generator seeded with ``seed`` (the global RNG is untouched)."""
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(num_groups, dim, generator=gen), dim=1)


def regroup(bank: torch.Tensor, num_groups: int, *, seed: int, n_init: int, max_iter: int,
            tol: float) -> torch.Tensor:
    """Spherical k-means of the bank (M, D) into l groups: the normalised centres (l, D).

    The bank is the same on every process and so are the seed and the result.
    """
    # every rank holds the same bank: the Lloyd sums are sharded over the ranks (identical result)
    result = kmeans(bank, num_groups, metric="cosine", n_init=n_init, max_iter=max_iter, tol=tol, seed=seed,
                    distributed=True)
    return F.normalize(result.centers, dim=1)


# ---------------------------------------------------------------------------------------------
# State that must survive a resume: buffers of a module in state.model
# ---------------------------------------------------------------------------------------------

class GroupMemory(nn.Module):
    """The group features, the memory bank and the iteration counter, all buffers.

    Buffers: ``groups`` (l, D); ``bank`` (bank_size, D) ring buffer of norm(q);
    ``bank_ptr`` (next row to write), ``bank_count`` (filled rows, saturates at
    bank_size), ``iteration`` (training iterations done), ``initialized`` (False only
    while ``group_init="kmeans"`` waits for its first batch).  All 0-d scalars are int64
    (``initialized`` bool).

    The training loop decides on the host (where to write, whether to regroup), so the four
    counters are mirrored in Python (:meth:`counter` / :meth:`set_counter`): read from the
    buffers once (after construction or a ``load_state_dict``), then kept in step with them
    by ``fill_``, which does not wait for the GPU.  No per-step host-device sync.
    """

    COUNTERS = ("bank_ptr", "bank_count", "iteration", "initialized")

    def __init__(self, num_groups: int, dim: int, bank_size: int):
        super().__init__()
        self.register_buffer("groups", torch.zeros(num_groups, dim))
        self.register_buffer("bank", torch.zeros(bank_size, dim))
        self.register_buffer("bank_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("bank_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._host: dict | None = None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host = None  # the buffers changed under the mirror: read them again

    def counter(self, name: str) -> int:
        """The counter ``name`` (one of COUNTERS) as a Python int, without a device sync."""
        if self._host is None:
            self._host = {c: int(getattr(self, c)) for c in self.COUNTERS}
        return self._host[name]

    def set_counter(self, name: str, value: int) -> None:
        self.counter(name)
        self._host[name] = int(value)
        getattr(self, name).fill_(value)

    @property
    def bank_size(self) -> int:
        return self.bank.shape[0]

    @torch.no_grad()
    def push(self, x: torch.Tensor) -> None:
        """Write the rows of x (N, D) into the ring buffer in order, wrapping around.

        With N > bank_size only the last bank_size rows are kept (as if written one by one).
        """
        size = self.bank_size
        n_total = x.shape[0]
        x = x[-size:].to(self.bank.dtype)
        skipped = n_total - x.shape[0]
        start = (self.counter("bank_ptr") + skipped) % size
        idx = (start + torch.arange(x.shape[0], device=self.bank.device)) % size
        self.bank[idx] = x
        self.set_counter("bank_ptr", (start + x.shape[0]) % size)
        self.set_counter("bank_count", min(self.counter("bank_count") + n_total, size))

    def filled(self) -> torch.Tensor:
        """The filled rows of the bank (bank_count, D).  Rows are written from 0 on, so
        until the bank is full they are its first bank_count rows."""
        return self.bank[: self.counter("bank_count")]

    def extra_repr(self) -> str:
        return f"groups={tuple(self.groups.shape)}, bank_size={self.bank_size}"


def projection_dim(projector: nn.Module) -> int:
    """out_features of the last Linear of the projector (byol_target's out_dim)."""
    linears = [m for m in projector.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise PluginError("momentum_grouping: state.model['projector'] has no nn.Linear, so its output "
                          "dimension is unknown.")
    return linears[-1].out_features


# ---------------------------------------------------------------------------------------------
# The plugin
# ---------------------------------------------------------------------------------------------

class MomentumGrouping(Plugin):
    """DigPro's dynamic grouping: contrast p(q) with momentum-updated group features (Eq. 3-6)."""

    @attrs.define
    class Params:
        beta: float = attrs.field(default=0.99, validator=in_range(0, 1), metadata={
            "doc": "group momentum beta (Eq. 4)"})
        temperature: float = attrs.field(default=0.1, validator=positive, metadata={
            "doc": "tau_g of the group logits (Eq. 5)"})
        weight: float = attrs.field(default=1.0, validator=non_negative, metadata={
            "doc": "lambda: 0.3 ImageNet-10, 0.5 ImageNet-Dogs / UC-Merced, 0.1 Tiny-ImageNet, 1.0 otherwise"})
        num_groups: int | None = attrs.field(default=None, validator=in_range(1, None), metadata={
            "doc": "l, the number of groups; null: e_step.k"})
        bank_size: int = attrs.field(default=2560, validator=in_range(1, None), metadata={
            "doc": "memory bank of norm(q) of both views (2560 = 5 iterations at batch 256)"})
        regroup_every: int | None = attrs.field(default=None, validator=in_range(1, None), metadata={
            "doc": "k-means on the bank every N iterations; null: every e_step.k iterations (official)"})
        group_init: Literal["random", "kmeans"] = attrs.field(
            default="random", validator=attrs.validators.in_(("random", "kmeans")), metadata={
                "doc": "random: seeded normal, normalised; kmeans: k-means of the first batch's norm(q)"})
        extra_ema: bool = attrs.field(default=False, metadata={
            "doc": "official quirk: an extra target EMA before the forward on non-regroup iterations"})
        extra_ema_momentum: float = attrs.field(default=0.99, validator=in_range(0, 1), metadata={
            "doc": "momentum of that extra EMA (official: 0.99)"})
        kmeans_n_init: int = attrs.field(default=10, validator=in_range(1, None), metadata={
            "doc": "k-means restarts when regrouping (scikit-learn's old default, as the official code)"})
        kmeans_max_iter: int = attrs.field(default=300, validator=in_range(1, None), metadata={
            "doc": "most Lloyd iterations when regrouping"})
        kmeans_tol: float = attrs.field(default=1e-4, validator=non_negative, metadata={
            "doc": "k-means tolerance when regrouping"})
        seed: int | None = attrs.field(default=None, metadata={
            "doc": "seed of the group init and of the regrouping k-means (+ iteration); null: run.seed"})

    # -- helpers ---------------------------------------------------------------------------------
    def num_groups(self, state) -> int:
        return self.params.num_groups or state.num_clusters

    def regroup_every(self, state) -> int:
        return self.params.regroup_every or state.num_clusters

    def seed(self, state) -> int:
        return state.recipe.run.seed if self.params.seed is None else self.params.seed

    @staticmethod
    def memory(state) -> GroupMemory:
        return state.model[MODULE_KEY]

    @staticmethod
    def prediction(state, cache, view: int) -> torch.Tensor:
        """p(q) (B, D) of a view (no noise) for this process's samples, computed once per step
        and kept in the cache as ("p", view)."""
        if ("p", view) not in cache:
            cache.put("p", view, state.model["predictor"](cache["q", view]))
        return cache["p", view]

    @classmethod
    def gathered_prediction(cls, state, cache, view: int) -> torch.Tensor:
        """p(q) (N, D) of a view for the global batch: computed locally, then gathered with
        gradients (``cache.gather``, memoised per step)."""
        cls.prediction(state, cache, view)
        return cache.gather("p", view)

    @staticmethod
    def normalized_q(cache) -> torch.Tensor:
        """norm(q) of both views of the global batch, (2N, D) float32 without gradient: view 0's
        N rows, then view 1's (the order of one process on the whole batch)."""
        return torch.cat([F.normalize(cache.gather("q", v).detach().float(), dim=1) for v in (0, 1)])

    def is_regroup_iteration(self, state, iteration: int) -> bool:
        """Iterations are numbered from 1 (official counter); regroup when iteration % every == 0."""
        return iteration % self.regroup_every(state) == 0

    # -- hooks -----------------------------------------------------------------------------------
    @hookimpl(trylast=True)  # after byol_target's setup, which builds the projector it reads
    def setup(self, state):
        model = state.model
        for needed in ("projector", "predictor", "target_projector", "target_backbone"):
            if needed not in model:
                raise PluginError(f"momentum_grouping needs state.model['{needed}'], which byol_target builds. "
                                  "Add byol_target to the recipe's plugins.")
        dim = projection_dim(model["projector"])
        memory = GroupMemory(self.num_groups(state), dim, self.params.bank_size)
        if self.params.group_init == "random":
            memory.groups.copy_(random_groups(memory.groups.shape[0], dim, self.seed(state)))
            memory.set_counter("initialized", True)
        model[MODULE_KEY] = memory.to(next(model["projector"].parameters()).device)

    @hookimpl
    def on_step_start(self, state, cache):
        p = self.params
        if not p.extra_ema:
            return
        iteration = self.memory(state).counter("iteration") + 1  # the iteration about to run
        if not self.is_regroup_iteration(state, iteration):
            m = state.model
            ema_update(m["target_backbone"], m["backbone"], p.extra_ema_momentum)
            ema_update(m["target_projector"], m["projector"], p.extra_ema_momentum)

    def init_groups_by_kmeans(self, state, cache) -> None:
        """group_init="kmeans": spherical k-means of the first global batch's norm(q) of both views.

        Not under torch.no_grad: q and its gather are memoised in the cache for the losses of
        this step, so they must be computed with their graph (``normalized_q`` detaches a copy).
        """
        memory = self.memory(state)
        feats = self.normalized_q(cache)
        if feats.shape[0] < memory.groups.shape[0]:
            raise PluginError(f"momentum_grouping: group_init 'kmeans' needs at least {memory.groups.shape[0]} "
                              f"samples in the first batch (2 views), got {feats.shape[0]}; use group_init "
                              "'random' or a larger batch.")
        p = self.params
        with torch.no_grad():
            memory.groups.copy_(regroup(feats, memory.groups.shape[0], seed=self.seed(state),
                                        n_init=p.kmeans_n_init, max_iter=p.kmeans_max_iter, tol=p.kmeans_tol))
            memory.set_counter("initialized", True)

    @hookimpl
    def compute_losses(self, state, cache):
        p = self.params
        memory = self.memory(state)
        if not memory.counter("initialized"):
            self.init_groups_by_kmeans(state, cache)
        losses = []
        for a, b in DIRECTIONS:   # over the global batch: the same G' on every process
            loss, new_groups, _ = grouping_direction(cache.gather("q", a), cache.gather("k", b),
                                                     self.gathered_prediction(state, cache, a),
                                                     memory.groups, p.beta, p.temperature)
            memory.groups.copy_(new_groups.detach())  # the next direction / step starts from G'
            losses.append(loss)
        return {"momentum_grouping": p.weight * torch.stack(losses).mean()}

    @hookimpl
    def after_step(self, state, cache):
        memory = self.memory(state)
        with torch.no_grad():
            memory.push(self.normalized_q(cache))   # the gathered q of compute_losses, no new collective
            memory.set_counter("iteration", memory.counter("iteration") + 1)
        iteration = memory.counter("iteration")
        if self.is_regroup_iteration(state, iteration):
            bank = memory.filled()
            if bank.shape[0] >= memory.groups.shape[0]:  # too few entries for l groups: keep G
                p = self.params
                memory.groups.copy_(regroup(bank, memory.groups.shape[0], seed=self.seed(state) + iteration,
                                            n_init=p.kmeans_n_init, max_iter=p.kmeans_max_iter, tol=p.kmeans_tol))
