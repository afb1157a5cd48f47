"""Dynamic grouping (DigPro Eq. 3-6, after SMoG): group-level contrast with momentum groups.

DigPro keeps l group features G (l, D) (l = K clusters by default) next to the
BYOL-style pair of ``byol_target``.  For a direction (online view a, target view b)
with q = q_a the RAW online projector output, k = k_b the target output and
p(.) the predictor:

    mu_i   = argmax_c cos(k_i, G_c)                                    (Eq. 3: targets from the target branch)
    a_i    = argmax_c cos(q_i, G_c)                                    (official: each q_i's OWN group)
    G'_c   = beta * G_c + (1 - beta) * mean_{i: a_i = c} q_i          (Eq. 4: momentum update;
             groups that receive no sample keep G'_c = G_c)
    s_ic   = norm(p(q_i)) . norm(G'_c) / tau_g                          (Eq. 5: group logits)
    L      = mean_i CE(s_i, mu_i) = mean_i [ logsumexp_c s_ic - s_i,mu_i ]   (Eq. 6)

The official code (DigPro's ``byol_wrapper.py`` through lightly 1.4.24's
``SMoGPrototypes.get_updated_group_features``) averages each q_i into the group nearest to
q_i itself (a_i); mu is only the cross-entropy target.  That is ``update_assignment:
online`` (the default); ``target`` averages by mu instead, a reading of the paper's Eq. 4.

The index i runs over the GLOBAL batch (N = world_size * B samples): under DDP q, k and
p(q) are gathered from every process (``cache.gather``, with gradients), so every process
assigns, updates and contrasts the same samples and keeps the same groups G; with one
process N = B.

G' is NOT detached inside the loss: the gradient reaches q both through the predictor
and through the groups (the 1 - beta share of q in G').  The second direction starts from
the first one's G' (G is updated twice per iteration).  ``compute_losses`` has no side
effect: the final G' waits in the step cache and replaces G in ``after_step``, which runs
only after a real optimiser step, so a step skipped for a non-finite loss leaves G as it
was.  beta = 0.99, tau_g = 0.1; no warm-up gate.  The paper's lambda is 1.0 (0.3
ImageNet-10, 0.5 ImageNet-Dogs and UC-Merced, 0.1 Tiny-ImageNet); the released code
hard-codes 0.3 for every dataset.

Regrouping: a memory bank keeps the latest norm(q) of both views of the global batch
(2560 entries = 5 iterations at a global batch of 256; the same bank on every process).
Iterations are numbered from 1.  With ``regroup_timing: start`` (official) iteration n
with n > 1 and n % every == 0 (every = K by default) first resets G to the normalised
k-means centres of the bank, which holds iterations <= n - 1, and then trains with the
new groups; ``end`` regroups after iteration n on a bank that includes it.  The official
code ran unseeded scikit-learn KMeans (Euclidean, 10 restarts) on the CPU; here it is
clusterkit's seeded torch k-means (``regroup_metric: euclidean`` as the official code, or
``cosine``) on the bank's device (seed + iteration), so a run is reproducible and every
process regroups identically.

The bank (``bank: official``) behaves as lightly 1.4.24's ``MemoryBankModule``: it starts
as L2-normalised Gaussian noise and every row counts from the first regroup on; a batch
that reaches the end of the bank fills the end and the rest of it is dropped, and writing
starts again at row 0.  ``bank: ring`` starts empty, regroups on the written rows only and
wraps a batch around the end.  The group features start as the official
``torch.rand(l, D)`` (``group_init: uniform``), as normalised Gaussian vectors (``random``)
or as the k-means centres of the first batch (``kmeans``).

The groups, the bank, its fill pointer and count and the iteration counter are the
plugin's own state (:class:`GroupMemory`, ``plugin.memory``), checkpointed through the
plugin's ``state_dict``, so a resumed run continues exactly.

Official quirk (``extra_ema``): on iterations that do not regroup the official code
applies an extra EMA of the target (momentum 0.99) BEFORE the forward, besides
``byol_target``'s 0.996.  The paper states 0.996 only.
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
from clusterkit_plugins.propos.byol_target import PREDICTOR, PROJECTOR, TARGET_BACKBONE, TARGET_PROJECTOR, ema_update

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
                       beta: float, temperature: float, update_assignment: str = "online",
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One direction (online view a, target view b) of dynamic grouping, Eq. 3-6.

    q_a: (N, D) raw online projector output of view a (with grad); k_b: (N, D) target
    output of view b; pred_a: (N, D) = p(q_a); groups: (l, D) the current G.
    N is the global batch (the gathered tensors under DDP).  ``update_assignment``:
    "online" averages each q_i into its own nearest group (official), "target" into mu_i.
    Returns (loss scalar, G' (l, D) still attached to q_a's graph, mu (N,)).
    """
    groups = groups.detach()
    mu = assign_groups(k_b.detach(), groups)
    members = assign_groups(q_a.detach(), groups) if update_assignment == "online" else mu
    new_groups = momentum_update(groups, q_a, members, beta)
    return group_loss(pred_a, new_groups, mu, temperature), new_groups, mu


def random_groups(num_groups: int, dim: int, seed: int) -> torch.Tensor:
    """(l, D) unit vectors from a private generator seeded with ``seed`` (the global RNG is untouched)."""
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(num_groups, dim, generator=gen), dim=1)


def uniform_groups(num_groups: int, dim: int, seed: int) -> torch.Tensor:
    """(l, D) uniform [0, 1) entries, not normalised: the official ``torch.rand(l, D)``, seeded."""
    return torch.rand(num_groups, dim, generator=torch.Generator().manual_seed(seed))


def regroup(bank: torch.Tensor, num_groups: int, *, seed: int, n_init: int, max_iter: int,
            tol: float, metric: str = "cosine") -> torch.Tensor:
    """k-means of the bank (M, D) into l groups (``metric`` "euclidean" as the official
    scikit-learn KMeans, or "cosine"): the L2-normalised centres (l, D).

    The bank is the same on every process and so are the seed and the result.
    """
    # every rank holds the same bank: the Lloyd sums are sharded over the ranks (identical result)
    result = kmeans(bank, num_groups, metric=metric, n_init=n_init, max_iter=max_iter, tol=tol, seed=seed,
                    distributed=True)
    return F.normalize(result.centers, dim=1)


# ---------------------------------------------------------------------------------------------
# State that must survive a resume: the plugin's own, checkpointed through its state_dict
# ---------------------------------------------------------------------------------------------

class GroupMemory:
    """The group features, the memory bank and the counters of dynamic grouping.

    Tensors (on the training device): ``groups`` (l, D) and ``bank`` (bank_size, D), a buffer
    of norm(q) rows.  Python counters: ``bank_ptr`` (next row to write), ``bank_count``
    (filled rows, saturates at bank_size), ``iteration`` (training iterations done) and
    ``initialized`` (False only while ``group_init="kmeans"`` waits for its first batch).
    The training loop decides on the host where to write and whether to regroup, so the
    counters are plain ints: no host-device sync per step.

    :meth:`state_dict` / :meth:`load_state_dict` carry all six (tensors on the CPU); the
    plugin checkpoints them through :meth:`clusterkit.Plugin.state_dict`.
    """

    TENSORS = ("groups", "bank")
    COUNTERS = ("bank_ptr", "bank_count", "iteration", "initialized")

    def __init__(self, num_groups: int, dim: int, bank_size: int, device: torch.device | str | None = None):
        self.groups = torch.zeros(num_groups, dim, device=device)
        self.bank = torch.zeros(bank_size, dim, device=device)
        self.bank_ptr = 0
        self.bank_count = 0
        self.iteration = 0
        self.initialized = False

    def state_dict(self) -> dict:
        return {**{name: getattr(self, name).detach().cpu().clone() for name in self.TENSORS},
                **{name: getattr(self, name) for name in self.COUNTERS}}

    def load_state_dict(self, saved: dict) -> None:
        """Restore :meth:`state_dict`'s values (counters may be 0-d tensors, as the buffers of
        checkpoints written before the memory moved out of ``state.model``)."""
        missing = [name for name in (*self.TENSORS, *self.COUNTERS) if name not in saved]
        if missing:
            raise KeyError(f"momentum_grouping: checkpointed group memory lacks {missing}")
        for name in self.TENSORS:
            mine, theirs = getattr(self, name), saved[name]
            if tuple(theirs.shape) != tuple(mine.shape):
                raise ValueError(f"momentum_grouping: checkpointed {name} has shape {tuple(theirs.shape)}, this "
                                 f"run's has {tuple(mine.shape)} (num_groups, bank_size or byol_target.out_dim "
                                 "changed)")
            mine.copy_(theirs)
        self.bank_ptr, self.bank_count, self.iteration = (int(saved[n]) for n in self.COUNTERS[:3])
        self.initialized = bool(saved["initialized"])

    @property
    def bank_size(self) -> int:
        return self.bank.shape[0]

    @torch.no_grad()
    def fill_with_noise(self, seed: int) -> None:
        """lightly's initial bank: L2-normalised Gaussian rows (seeded), all counted as filled."""
        noise = torch.randn(self.bank.shape, generator=torch.Generator().manual_seed(seed))
        self.bank.copy_(F.normalize(noise, dim=1))
        self.bank_count = self.bank_size

    @torch.no_grad()
    def push_truncating(self, x: torch.Tensor) -> None:
        """lightly 1.4.24's write: the rows of x (N, D) from the pointer on; a batch that
        reaches the end of the bank fills the end, the rest of it is dropped, and the pointer
        returns to 0 (it never wraps a batch around)."""
        ptr, size = self.bank_ptr, self.bank_size
        n = min(x.shape[0], size - ptr)
        self.bank[ptr:ptr + n] = x[:n].to(self.bank.dtype)
        self.bank_ptr = 0 if ptr + x.shape[0] >= size else ptr + n
        self.bank_count = min(self.bank_count + n, size)

    @torch.no_grad()
    def push(self, x: torch.Tensor) -> None:
        """Write the rows of x (N, D) into the ring buffer in order, wrapping around.

        With N > bank_size only the last bank_size rows are kept (as if written one by one).
        """
        size = self.bank_size
        n_total = x.shape[0]
        x = x[-size:].to(self.bank.dtype)
        skipped = n_total - x.shape[0]
        start = (self.bank_ptr + skipped) % size
        idx = (start + torch.arange(x.shape[0], device=self.bank.device)) % size
        self.bank[idx] = x
        self.bank_ptr = (start + x.shape[0]) % size
        self.bank_count = min(self.bank_count + n_total, size)

    def filled(self) -> torch.Tensor:
        """The filled rows of the bank (bank_count, D).  Rows are written from 0 on, so
        until the bank is full they are its first bank_count rows."""
        return self.bank[: self.bank_count]

    def __repr__(self) -> str:
        return (f"GroupMemory(groups={tuple(self.groups.shape)}, bank_size={self.bank_size}, "
                f"iteration={self.iteration})")


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
            "doc": "lambda; paper: 0.3 ImageNet-10, 0.5 ImageNet-Dogs / UC-Merced, 0.1 Tiny-ImageNet, 1.0 "
                   "otherwise; the released code uses 0.3 everywhere"})
        update_assignment: Literal["online", "target"] = attrs.field(
            default="online", validator=attrs.validators.in_(("online", "target")), metadata={
                "doc": "which group a q_i is averaged into (Eq. 4): online = its own nearest group "
                       "(official, lightly SMoG); target = mu_i, the group of k_i"})
        num_groups: int | None = attrs.field(default=None, validator=in_range(1, None), metadata={
            "doc": "l, the number of groups; null: e_step.k"})
        bank_size: int = attrs.field(default=2560, validator=in_range(1, None), metadata={
            "doc": "memory bank of norm(q) of both views (2560 = 5 iterations at batch 256)"})
        bank: Literal["official", "ring"] = attrs.field(
            default="official", validator=attrs.validators.in_(("official", "ring")), metadata={
                "doc": "official: lightly 1.4.24's bank (starts as noise, a batch reaching the end is cut); "
                       "ring: starts empty, batches wrap around"})
        regroup_every: int | None = attrs.field(default=None, validator=in_range(1, None), metadata={
            "doc": "k-means on the bank every N iterations; null: every e_step.k iterations (official)"})
        regroup_timing: Literal["start", "end"] = attrs.field(
            default="start", validator=attrs.validators.in_(("start", "end")), metadata={
                "doc": "start: before iteration n (n > 1, n % every == 0) on the bank of iterations < n "
                       "(official); end: after iteration n, on a bank that includes it"})
        regroup_metric: Literal["euclidean", "cosine"] = attrs.field(
            default="euclidean", validator=attrs.validators.in_(("euclidean", "cosine")), metadata={
                "doc": "k-means metric of the regroup (official: scikit-learn's Euclidean KMeans)"})
        group_init: Literal["uniform", "random", "kmeans"] = attrs.field(
            default="uniform", validator=attrs.validators.in_(("uniform", "random", "kmeans")), metadata={
                "doc": "uniform: torch.rand(l, D), seeded (official); random: normalised Gaussian; "
                       "kmeans: k-means of the first batch's norm(q)"})
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

    #: Step-cache key of G' after both directions, written by compute_losses for after_step.
    NEW_GROUPS = "momentum_grouping/new_groups"

    def __init__(self, params=None):
        super().__init__(params)
        self.memory: GroupMemory | None = None   # built in setup, once the projector's width is known

    # -- checkpointed state --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The group memory (groups, bank, counters; tensors on the CPU)."""
        return {} if self.memory is None else self.memory.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if self.memory is None:
            raise RuntimeError("momentum_grouping: load_state_dict before setup (the memory is built there)")
        self.memory.load_state_dict(state_dict)

    # -- helpers ---------------------------------------------------------------------------------
    def num_groups(self, state) -> int:
        return self.params.num_groups or state.num_clusters

    def regroup_every(self, state) -> int:
        return self.params.regroup_every or state.num_clusters

    @staticmethod
    def prediction(state, cache, view: int) -> torch.Tensor:
        """p(q) (B, D) of a view (no noise) for this process's samples, computed once per step
        and kept in the cache as ("p", view)."""
        if ("p", view) not in cache:
            cache.put("p", view, state.model[PREDICTOR](cache["q", view]))
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
        """Whether iteration ``iteration`` (numbered from 1, the official counter) regroups:
        at its start when n > 1 and n % every == 0 (``regroup_timing: start``, official), or
        after it when n % every == 0 (``end``)."""
        every = self.regroup_every(state)
        if self.params.regroup_timing == "start":
            return iteration > 1 and iteration % every == 0
        return iteration % every == 0

    def regroup_now(self, state, iteration: int) -> None:
        """Reset G to the normalised k-means centres of the bank (kept when the bank holds fewer
        rows than groups)."""
        memory = self.memory
        bank = memory.filled()
        if bank.shape[0] < memory.groups.shape[0]:
            return
        p = self.params
        memory.groups.copy_(regroup(bank, memory.groups.shape[0], seed=self.seed(state) + iteration,
                                    n_init=p.kmeans_n_init, max_iter=p.kmeans_max_iter, tol=p.kmeans_tol,
                                    metric=p.regroup_metric))

    # -- hooks -----------------------------------------------------------------------------------
    @hookimpl(trylast=True)  # after byol_target's setup, which builds the projector it reads
    def setup(self, state):
        model = state.model
        for needed in (PROJECTOR, PREDICTOR, TARGET_PROJECTOR, TARGET_BACKBONE):
            if needed not in model:
                raise PluginError(f"momentum_grouping needs state.model['{needed}'], which byol_target builds. "
                                  "Add byol_target to the recipe's plugins.")
        dim = projection_dim(model[PROJECTOR])
        p = self.params
        memory = GroupMemory(self.num_groups(state), dim, p.bank_size, device=state.device)
        if p.group_init != "kmeans":
            init = uniform_groups if p.group_init == "uniform" else random_groups
            memory.groups.copy_(init(memory.groups.shape[0], dim, self.seed(state)))
            memory.initialized = True
        if p.bank == "official":
            memory.fill_with_noise(self.seed(state) + 1)
        self.memory = memory

    @hookimpl
    def on_step_start(self, state, cache):
        """Before the forward of iteration n (numbered from 1): regroup (``regroup_timing:
        start``) or, on the other iterations, the official extra target EMA (``extra_ema``)."""
        p = self.params
        iteration = self.memory.iteration + 1  # the iteration about to run
        regroups = self.is_regroup_iteration(state, iteration)
        if regroups and p.regroup_timing == "start":
            with torch.no_grad():
                self.regroup_now(state, iteration)
        if p.extra_ema and not regroups:
            m = state.model
            ema_update(m[TARGET_BACKBONE], m["backbone"], p.extra_ema_momentum)
            ema_update(m[TARGET_PROJECTOR], m[PROJECTOR], p.extra_ema_momentum)

    def init_groups_by_kmeans(self, state, cache) -> None:
        """group_init="kmeans": spherical k-means of the first global batch's norm(q) of both views.

        Not under torch.no_grad: q and its gather are memoised in the cache for the losses of
        this step, so they must be computed with their graph (``normalized_q`` detaches a copy).
        """
        memory = self.memory
        feats = self.normalized_q(cache)
        if feats.shape[0] < memory.groups.shape[0]:
            raise PluginError(f"momentum_grouping: group_init 'kmeans' needs at least {memory.groups.shape[0]} "
                              f"samples in the first batch (2 views), got {feats.shape[0]}; use group_init "
                              "'random' or a larger batch.")
        p = self.params
        with torch.no_grad():
            memory.groups.copy_(regroup(feats, memory.groups.shape[0], seed=self.seed(state),
                                        n_init=p.kmeans_n_init, max_iter=p.kmeans_max_iter, tol=p.kmeans_tol))
            memory.initialized = True

    @hookimpl
    def compute_losses(self, state, cache):
        """Eq. 3-6 in both directions over the global batch; the second direction starts from the
        first one's G'.  The final G' goes to the step cache; G itself changes in after_step."""
        p = self.params
        memory = self.memory
        if not memory.initialized:
            self.init_groups_by_kmeans(state, cache)
        groups, losses = memory.groups, []
        for a, b in DIRECTIONS:   # over the global batch: the same G' on every process
            loss, new_groups, _ = grouping_direction(cache.gather("q", a), cache.gather("k", b),
                                                     self.gathered_prediction(state, cache, a),
                                                     groups, p.beta, p.temperature, p.update_assignment)
            groups = new_groups.detach()  # the next direction starts from G'
            losses.append(loss)
        cache.put(self.NEW_GROUPS, -1, groups)
        return {"momentum_grouping": p.weight * torch.stack(losses).mean()}

    @hookimpl
    def after_step(self, state, cache):
        """After a real optimiser step: G <- G', the bank takes this step's norm(q), the iteration
        counter advances, and ``regroup_timing: end`` regroups."""
        memory = self.memory
        with torch.no_grad():
            if (self.NEW_GROUPS, -1) in cache:
                memory.groups.copy_(cache[self.NEW_GROUPS, -1])
            feats = self.normalized_q(cache)   # the gathered q of compute_losses, no new collective
            if self.params.bank == "official":
                memory.push_truncating(feats)
            else:
                memory.push(feats)
            memory.iteration += 1
        iteration = memory.iteration
        if self.params.regroup_timing == "end" and self.is_regroup_iteration(state, iteration):
            with torch.no_grad():
                self.regroup_now(state, iteration)
