"""PSA (diffused_sampling) and PSL (prototype_aggregation) against naive loop computations."""

import math

import pytest
import torch

from clusterkit_plugins.propos.diffused_sampling import diffuse, diffused_sampling_loss
from clusterkit_plugins.propos.prototype_aggregation import ABSENT_LOGIT, prototype_aggregation_loss


def naive_psl(q, k, labels, K, tau, present_override=None):
    """PSL written out cluster by cluster with Python loops and math (``present_override``: the
    clusters that count as present, whatever the labels say)."""
    B, D = q.shape
    qn = [v / v.norm() for v in q]
    kn = [v / v.norm() for v in k]
    protos_a, protos_b, present = [], [], []
    for c in range(K):
        members = [i for i in range(B) if int(labels[i]) == c]
        present.append(bool(members))
        if members:
            ma = sum(qn[i] for i in members) / len(members)
            mb = sum(kn[i] for i in members) / len(members)
            protos_a.append(ma / ma.norm())
            protos_b.append(mb / mb.norm())
        else:
            protos_a.append(torch.zeros(D, dtype=q.dtype))
            protos_b.append(torch.zeros(D, dtype=q.dtype))
    if present_override is not None:
        present = list(present_override)
    losses = []
    for c in range(K):
        if not present[c]:
            continue
        row = []
        for j in range(K):
            if not present[j]:
                row.append(ABSENT_LOGIT)
            elif j == c:
                row.append(float(protos_a[c] @ protos_b[c]) / tau)
            else:
                row.append(float(protos_a[c] @ protos_a[j]) / tau)
        pos = float(protos_a[c] @ protos_b[c]) / tau
        lse = math.log(sum(math.exp(v) for v in row))
        losses.append(lse - pos)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_psl_matches_naive(seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(12, 6, generator=g, dtype=torch.float64), torch.randn(12, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (12,), generator=g)
    got = prototype_aggregation_loss(q, k, labels, 4, 0.5)
    assert got.item() == pytest.approx(naive_psl(q, k, labels, 4, 0.5), rel=1e-10)


def test_psl_empty_clusters_use_minus_ten_columns_and_no_rows():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 2, 2, 2, 5, 5, 0])  # clusters 1, 3, 4, 6 absent of K=7
    got = prototype_aggregation_loss(q, k, labels, 7, 0.5).item()
    assert got == pytest.approx(naive_psl(q, k, labels, 7, 0.5), rel=1e-10)
    # with -inf instead of -10 the value would differ: the absent columns do enter the logsumexp
    only_present = naive_psl(q, k, torch.tensor([0, 0, 1, 1, 1, 2, 2, 0]), 3, 0.5)
    assert got > only_present


def test_psl_local_absence_masks_clusters_missing_from_this_process():
    """absent_clusters: local (official under DDP): the prototypes average the gathered batch, but
    a cluster missing from this process's own labels is masked as absent."""
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(10, 5, generator=g, dtype=torch.float64), torch.randn(10, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 3, 3, 2, 0])  # the global batch holds all 4 clusters
    local = torch.tensor([True, False, True, True])        # this rank's share holds no cluster 1
    got = prototype_aggregation_loss(q, k, labels, 4, 0.5, present=local).item()
    assert got == pytest.approx(naive_psl(q, k, labels, 4, 0.5, present_override=local.tolist()), rel=1e-10)
    assert got != pytest.approx(prototype_aggregation_loss(q, k, labels, 4, 0.5).item(), rel=1e-6)


def test_psl_single_cluster_is_finite_and_zero_gap():
    q = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.zeros(6, dtype=torch.long)
    got = prototype_aggregation_loss(q, q.clone(), labels, 3, 0.5)
    # one present cluster: logits = [pos, -10, -10], loss = log(1 + 2 exp(-10 - pos))
    pos = 1.0 / 0.5
    assert got.item() == pytest.approx(math.log(1 + 2 * math.exp(-10 - pos)), rel=1e-9)


def test_psl_gradient_reaches_q_only(one_thread):
    """In a training step PSL trains the online branch (q = projector(backbone)) and nothing else:
    not the EMA target that gives k (byol_target computes k without gradient; the loss function
    itself does not detach k), and not the predictor (PSL reads q, not p(q))."""
    from clusterkit.state import StepCache
    from clusterkit.testing import make_trainer

    trainer = make_trainer("prototype_aggregation", {"weight": 1.0},
                           with_plugins={"byol_target": {"hidden_dim": 16, "out_dim": 8},
                                         "kmeans_e_step": {"n_init": 1, "max_iter": 5}})
    trainer.build()
    trainer.begin_epoch(0)
    state = trainer.state
    views, index = trainer.pipeline.views(next(iter(trainer.loader)))
    cache = StepCache(views, index, trainer.producers, state)
    assert cache["q", 0].requires_grad and not cache["k", 1].requires_grad
    loss = trainer.plugins["prototype_aggregation"].compute_losses(state, cache)["prototype_aggregation"]
    assert loss.item() > 0
    loss.backward()
    model = state.model
    for name in ("backbone", "projector"):  # q's side
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model[name].parameters()), name
    for name in ("target_backbone", "target_projector", "predictor"):  # k's side, and p(.)
        assert all(p.grad is None or not p.grad.any() for p in model[name].parameters()), name


def test_psa_is_minus_two_cosine():
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    k = torch.tensor([[0.0, 3.0], [2.0, 2.0]])
    # cosines: 0 and 1 -> mean -2 * 0.5 = -1
    assert diffused_sampling_loss(p, k).item() == pytest.approx(-1.0)


def test_psa_does_not_backprop_into_target():
    p = torch.randn(4, 3, requires_grad=True)
    k = torch.randn(4, 3, requires_grad=True)
    diffused_sampling_loss(p, k).backward()
    assert k.grad is None and p.grad is not None


def test_diffuse_adds_sigma_times_the_noise():
    q = torch.randn(6, 4)
    eps = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(diffuse(q, 0.5, eps), q + 0.5 * eps)
    assert diffuse(q, 0.0, eps) is q
    assert diffuse(q.bfloat16(), 0.5, eps).dtype == torch.bfloat16       # q's dtype, also under AMP


def test_diffusion_noise_is_standard_normal_per_view_from_the_step_cache():
    from clusterkit_plugins.propos.diffused_sampling import diffusion_noise

    cache = _cache(_state(epoch=2), batch=20000)[0]
    eps0 = diffusion_noise(cache, 0, 8, "diffused_sampling")
    assert eps0.shape == (20000, 8)
    assert eps0.mean().item() == pytest.approx(0.0, abs=0.01) and eps0.std().item() == pytest.approx(1.0, rel=0.02)
    assert torch.equal(eps0, cache.randn(8, salt="diffused_sampling/view0"))   # reproducible draw
    assert not torch.equal(eps0, diffusion_noise(cache, 1, 8, "diffused_sampling"))  # views differ


# -- the plugins' warm-up gates -----------------------------------------------------------------

class _Sched:
    warmup_epochs = 2


class _Recipe:
    schedule = _Sched()

    class run:  # noqa: N801
        seed = 0

    class e_step:  # noqa: N801
        k = 3


def _state(epoch):
    from clusterkit.state import TrainState

    model = torch.nn.ModuleDict({"predictor": torch.nn.Identity()})
    s = TrainState(recipe=_Recipe(), device=torch.device("cpu"), model=model, num_train=8, steps_per_epoch=1)
    s.epoch = epoch
    s.pseudo_labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    return s


def _cache(state, batch=4):
    from clusterkit.state import StepCache

    g = torch.Generator().manual_seed(0)
    q = [torch.randn(batch, 5, generator=g) for _ in range(2)]
    k = [torch.randn(batch, 5, generator=g) for _ in range(2)]
    producers = {"q": lambda c, v: q[v], "k": lambda c, v: k[v]}
    index = torch.tensor([0, 2, 4, 5]) if batch == 4 else torch.arange(batch) % 8
    return StepCache([torch.zeros(batch, 1), torch.zeros(batch, 1)], index, producers, state), q, k


def test_prototype_aggregation_is_zero_during_warmup_then_weighted():
    from clusterkit_plugins.propos.prototype_aggregation import PrototypeAggregation

    plugin = PrototypeAggregation(PrototypeAggregation.Params(weight=0.1))
    warm = _state(epoch=1)
    assert plugin.compute_losses(warm, _cache(warm)[0])["prototype_aggregation"].item() == 0.0
    after = _state(epoch=2)
    cache, q, k = _cache(after)
    labels = after.pseudo_labels[cache.index]
    want = 0.1 * (prototype_aggregation_loss(q[0], k[1], labels, 3, 0.5)
                  + prototype_aggregation_loss(q[1], k[0], labels, 3, 0.5)) / 2
    assert plugin.compute_losses(after, cache)["prototype_aggregation"].item() == pytest.approx(want.item())


def test_diffused_sampling_has_no_noise_during_warmup():
    from clusterkit_plugins.propos.diffused_sampling import DiffusedSampling

    plugin = DiffusedSampling(DiffusedSampling.Params(sigma=0.5))
    assert plugin.sigma(_state(epoch=1)) == 0.0 and plugin.sigma(_state(epoch=2)) == 0.5
    warm = _state(epoch=1)
    cache, q, k = _cache(warm)
    # identity predictor, no noise: exactly the mean of -2 cos over both directions
    want = (diffused_sampling_loss(q[0], k[1]) + diffused_sampling_loss(q[1], k[0])) / 2
    assert plugin.compute_losses(warm, cache)["diffused_sampling"].item() == pytest.approx(want.item())
    after = _state(epoch=2)
    cache2, _, _ = _cache(after)
    got = plugin.compute_losses(after, cache2)["diffused_sampling"].item()
    assert got != pytest.approx(want.item())
    # after warm-up: q + sigma * eps with eps the step cache's seeded draw of each view
    eps = [cache2.randn(5, salt=f"diffused_sampling/view{v}") for v in (0, 1)]
    noisy = (diffused_sampling_loss(q[0] + 0.5 * eps[0], k[1]) + diffused_sampling_loss(q[1] + 0.5 * eps[1], k[0])) / 2
    assert got == pytest.approx(noisy.item())
