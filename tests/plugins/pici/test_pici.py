"""PICI: the ViT's fixed sin-cos positions, masking, PISD's reconstruction loss and CLI's matching
and cross-entropy against naive implementations; the plugins' errors; the recipes; and a tiny
PICI trained through its three stages on the bundled digits."""

import copy
import itertools
import json
import math
from pathlib import Path

import attrs
import pytest
import timm
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score
from torch import nn

import clusterkit  # noqa: F401  (registers vit_pici_small_patch16_224 in timm)
from clusterkit import StepCache, TrainState
from clusterkit.errors import PluginError, RecipeError
from clusterkit.models import create_backbone
from clusterkit.models.vit import PiciViT, sincos_pos_embed_1d, sincos_pos_embed_2d
from clusterkit.plugin_manager import load_plugins
from clusterkit.recipe import ModelConfig, load_recipe
from clusterkit_plugins.pici.cross_level_interaction import (
    CrossLevelInteraction,
    cli_cross_entropy,
    cross_level_interaction_loss,
    kmeans_labels,
    label_matching,
    matched_targets,
    minmax_scale,
)
from clusterkit_plugins.pici.masked_vit import MaskedViT, encode, random_masking
from clusterkit_plugins.pici.self_discrimination import (
    MAEDecoder,
    PartialSelfDiscrimination,
    masked_reconstruction_loss,
    patchify,
    unpatchify,
)

REPO = Path(__file__).resolve().parents[3]
VIT = "vit_pici_small_patch16_224"
TINY_VIT = {"img_size": 8, "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2}
PICI_PLUGINS = ("masked_vit", "contrastive_heads", "partial_self_discrimination", "instance_contrast",
                "cluster_contrast", "cross_level_interaction")
STAGES = [
    {"name": "pretrain", "until": 200, "plugins": ["partial_self_discrimination"]},
    {"name": "train", "until": 1000, "plugins": ["partial_self_discrimination", "instance_contrast",
                                                 "cluster_contrast"]},
    {"name": "boost", "until": None, "plugins": ["instance_contrast", "cluster_contrast", "cross_level_interaction"]},
]


def tiny_vit(in_chans=1, **kw):
    return timm.create_model(VIT, num_classes=0, in_chans=in_chans, **{**TINY_VIT, **kw})


# -- the ViT: fixed 2-D sin-cos positions ------------------------------------------------------------

def naive_sincos_2d(dim, rows, cols):
    """Row r * cols + c: [sin(c w_i)]_i, [cos(c w_i)]_i, [sin(r w_i)]_i, [cos(r w_i)]_i, w_i = 10000^(-i/(dim/4))."""
    quarter = dim // 4
    out = []
    for r in range(rows):
        for c in range(cols):
            omegas = [1.0 / 10000 ** (i / quarter) for i in range(quarter)]
            out.append([math.sin(c * w) for w in omegas] + [math.cos(c * w) for w in omegas]
                       + [math.sin(r * w) for w in omegas] + [math.cos(r * w) for w in omegas])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("dim, grid", [(8, 3), (16, (2, 5)), (384, 14)])
def test_sincos_2d_matches_the_naive_formula(dim, grid):
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    got = sincos_pos_embed_2d(dim, grid)
    assert got.dtype == torch.float32 and got.shape == (rows * cols, dim)
    torch.testing.assert_close(got.double(), naive_sincos_2d(dim, rows, cols), atol=1e-6, rtol=0)
    with_cls = sincos_pos_embed_2d(dim, grid, cls_token=True)
    assert with_cls.shape == (rows * cols + 1, dim) and torch.equal(with_cls[0], torch.zeros(dim))
    assert torch.equal(with_cls[1:], got)


def test_sincos_1d_by_hand_and_bad_dims():
    got = sincos_pos_embed_1d(4, torch.tensor([0.0, 2.0]))
    want = [[0, 0, 1, 1], [math.sin(2), math.sin(2 / 100), math.cos(2), math.cos(2 / 100)]]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    with pytest.raises(ValueError, match="even"):
        sincos_pos_embed_1d(3, torch.zeros(2))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(6, 2)


def test_vit_is_registered_with_pici_defaults_and_fixed_positions():
    assert VIT in timm.list_models("vit_pici*")
    m = timm.create_model(VIT, num_classes=0)
    assert isinstance(m, PiciViT)
    assert (m.patch_embed.patch_size, m.patch_embed.img_size) == ((16, 16), (224, 224))
    assert (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads, m.num_features) == (384, 6, 12, 384)
    assert m.blocks[0].mlp.fc1.out_features == 4 * 384 and m.blocks[0].attn.qkv.bias is not None
    # fixed: a buffer equal to the sin-cos table ([CLS] row 0), never a parameter
    assert "pos_embed" in dict(m.named_buffers()) and "pos_embed" not in dict(m.named_parameters())
    assert torch.equal(m.pos_embed[0], sincos_pos_embed_2d(384, 14, cls_token=True))
    assert "pos_embed" in m.state_dict()


def test_tiny_vit_through_create_backbone_returns_the_cls_feature():
    cfg = ModelConfig(backbone=VIT, backbone_kwargs=dict(TINY_VIT))
    m = create_backbone(cfg, in_chans=1)
    assert m.num_features == 32 and m.pos_embed.shape == (1, 17, 32)
    x = torch.randn(3, 1, 8, 8)
    out = m(x)
    assert out.shape == (3, 32)
    torch.testing.assert_close(out, m.forward_features(x)[:, 0])  # [CLS] after the final norm


def test_vit_refuses_pretrained_and_other_pooling():
    with pytest.raises(RecipeError, match="no published pretrained weights"):
        create_backbone(ModelConfig(backbone=VIT, pretrained=True))
    with pytest.raises(RecipeError, match="CLS"):
        create_backbone(ModelConfig(backbone=VIT, backbone_kwargs={**TINY_VIT, "global_pool": "avg"}))


# -- masking --------------------------------------------------------------------------------------

@pytest.mark.parametrize("length, ratio", [(10, 0.5), (16, 0.75), (7, 0.5), (9, 0.0)])
def test_random_masking_keeps_exactly_len_keep_and_restores(length, ratio):
    batch, dim = 5, 3
    x = torch.arange(length, dtype=torch.float32).view(1, length, 1).expand(batch, length, dim).contiguous()
    x = x + 100 * torch.arange(batch).view(batch, 1, 1)          # token value identifies (sample, patch)
    noise = torch.rand(batch, length, generator=torch.Generator().manual_seed(length))
    kept, mask, ids_restore = random_masking(x, ratio, noise)
    len_keep = int(length * (1 - ratio))
    assert kept.shape == (batch, len_keep, dim) and mask.shape == ids_restore.shape == (batch, length)
    for i in range(batch):
        order = sorted(range(length), key=lambda j: float(noise[i, j]))   # smallest noise kept
        kept_patches = order[:len_keep]
        assert [int(v) - 100 * i for v in kept[i, :, 0]] == kept_patches
        for j in range(length):
            assert order[int(ids_restore[i, j])] == j                        # ids_restore inverts the shuffle
            assert float(mask[i, j]) == (0.0 if j in kept_patches else 1.0)  # 1 = removed
        assert int(mask[i].sum()) == length - len_keep


def test_random_masking_uses_the_global_rng_reproducibly():
    x = torch.randn(4, 12, 2)
    torch.manual_seed(7)
    a = random_masking(x, 0.5)
    torch.manual_seed(7)
    b = random_masking(x, 0.5)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[1], random_masking(x, 0.5)[1])


def test_masked_encoder_ignores_the_removed_patches_and_unmasked_equals_the_vit():
    torch.manual_seed(0)
    vit = tiny_vit().eval()
    x = torch.randn(4, 1, 8, 8)
    full = encode(vit, x, 0.0)
    assert full.tokens.shape == (4, 17, 32) and not full.mask.any()
    torch.testing.assert_close(full.cls, vit(x))
    torch.manual_seed(1)
    enc = encode(vit, x, 0.5)
    assert enc.tokens.shape == (4, 1 + 8, 32) and enc.num_prefix == 1
    assert enc.mask.sum(1).tolist() == [8.0] * 4
    # changing the pixels of the removed patches changes nothing: the encoder saw only the rest
    removed = unpatchify(enc.mask[:, :, None].expand(-1, -1, 4), 2, (4, 4), 1).bool()
    x2 = torch.where(removed, torch.randn_like(x) * 5, x)
    torch.manual_seed(1)
    enc2 = encode(vit, x2, 0.5)
    torch.testing.assert_close(enc2.tokens, enc.tokens)
    assert not torch.allclose(encode(vit, x2, 0.0).cls, full.cls)


# -- PISD -----------------------------------------------------------------------------------------

def test_patchify_matches_a_naive_crop_and_round_trips():
    imgs = torch.randn(2, 3, 8, 12)
    p = 4
    patches = patchify(imgs, p)
    assert patches.shape == (2, 6, p * p * 3)
    for b in range(2):
        for r in range(2):
            for c in range(3):
                crop = imgs[b, :, r * p:(r + 1) * p, c * p:(c + 1) * p]          # (C, p, p)
                want = [float(crop[ch, y, x]) for y in range(p) for x in range(p) for ch in range(3)]
                assert patches[b, r * 3 + c].tolist() == pytest.approx(want)
    assert torch.equal(unpatchify(patches, p, (2, 3), 3), imgs)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patchify(torch.zeros(1, 1, 6, 6), 4)


def naive_masked_loss(pred, target, mask, norm_pix, eps=1e-6):
    total, count = 0.0, 0
    for i in range(pred.shape[0]):
        for j in range(pred.shape[1]):
            if float(mask[i, j]) != 1.0:
                continue
            t = [float(v) for v in target[i, j]]
            if norm_pix:
                m = sum(t) / len(t)
                var = sum((v - m) ** 2 for v in t) / (len(t) - 1)
                t = [(v - m) / math.sqrt(var + eps) for v in t]
            total += sum((float(q) - v) ** 2 for q, v in zip(pred[i, j], t, strict=True)) / len(t)
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_masked_reconstruction_loss_matches_a_naive_loop(norm_pix, seed):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)
    target = 3 * torch.randn(3, 5, 6, generator=g, dtype=torch.float64) + 2
    mask = (torch.rand(3, 5, generator=g) < 0.5).double()
    mask[0, 0] = 1.0
    got = masked_reconstruction_loss(pred, target, mask, norm_pix)
    assert got.item() == pytest.approx(naive_masked_loss(pred, target, mask, norm_pix), rel=1e-5)
    # only masked patches count: changing a visible patch's prediction changes nothing
    visible = (mask == 0).nonzero()[0]
    pred2 = pred.clone()
    pred2[visible[0], visible[1]] += 10
    assert masked_reconstruction_loss(pred2, target, mask, norm_pix).item() == pytest.approx(got.item())


def test_masked_reconstruction_loss_edge_cases():
    target = torch.randn(2, 4, 5)
    assert masked_reconstruction_loss(torch.randn(2, 4, 5), target, torch.zeros(2, 4)).item() == 0.0
    flat = torch.full((1, 2, 4), 3.0)  # a constant patch: normalised target 0, no NaN
    assert masked_reconstruction_loss(torch.ones(1, 2, 4), flat, torch.ones(1, 2)).item() == pytest.approx(1.0)


def test_decoder_unshuffles_mask_tokens_and_predicts_every_patch():
    torch.manual_seed(0)
    dec = MAEDecoder((2, 3), patch_dim=12, encoder_dim=8, dim=16, depth=1, num_heads=2)
    assert "pos_embed" in dict(dec.named_buffers())
    torch.testing.assert_close(dec.pos_embed[0], sincos_pos_embed_2d(16, (2, 3)))
    tokens = torch.randn(2, 1 + 3, 8, requires_grad=True)
    ids_restore = torch.stack([torch.randperm(6) for _ in range(2)])
    out = dec(tokens, ids_restore)
    assert out.shape == (2, 6, 12)
    out.sum().backward()
    assert tokens.grad.abs().sum() > 0 and dec.mask_token.grad.abs().sum() > 0
    # the decoder is the identity on the token order: with no blocks doing anything, the same
    # visible token lands on the patch ids_restore says it came from
    dec.blocks = nn.Sequential()
    dec.pos_embed.zero_()
    out = dec(tokens, ids_restore)
    for i in range(2):
        for j in range(6):
            k = int(ids_restore[i, j])
            want = dec.pred(dec.norm(dec.embed(tokens[i, 1 + k]) if k < 3 else dec.mask_token[0, 0]))
            torch.testing.assert_close(out[i, j], want)


# -- CLI ------------------------------------------------------------------------------------------

def brute_force_matching(pseudo, head, k):
    """All k! renamings of the pseudo-labels; returns (best agreement, list of best renamings)."""
    best, arg = -1, []
    for perm in itertools.permutations(range(k)):
        agree = sum(perm[int(a)] == int(b) for a, b in zip(pseudo, head, strict=True))
        if agree > best:
            best, arg = agree, [perm]
        elif agree == best:
            arg.append(perm)
    return best, arg


@pytest.mark.parametrize("seed", range(6))
def test_label_matching_finds_the_best_renaming_like_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    k, b = 3, 14
    pseudo = torch.randint(0, k, (b,), generator=g)
    head = torch.where(torch.rand(b, generator=g) < 0.7, (pseudo + seed) % k, torch.randint(0, k, (b,), generator=g))
    pi = label_matching(pseudo, head, k)
    assert sorted(pi.tolist()) == list(range(k))                     # a permutation
    best, perms = brute_force_matching(pseudo, head, k)
    assert int((pi[pseudo] == head).sum()) == best
    assert tuple(pi.tolist()) in perms
    if len(perms) == 1:
        assert tuple(pi.tolist()) == perms[0]


def naive_ce(probs, targets, double_softmax, eps=1e-8):
    total = 0.0
    for row, t in zip(probs.tolist(), targets.tolist(), strict=True):
        if double_softmax:
            total += -(row[t] - math.log(sum(math.exp(v) for v in row)))
        else:
            total += -math.log(max(row[t], eps))
    return total / len(targets)


@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cli_loss_is_the_cross_entropy_against_matched_labels(double_softmax, seed):
    g = torch.Generator().manual_seed(seed)
    k, b = 3, 10
    probs = torch.softmax(3 * torch.randn(b, k, generator=g, dtype=torch.float64), dim=1)
    pseudo = torch.randint(0, k, (b,), generator=g)
    _, perms = brute_force_matching(pseudo, probs.argmax(1), k)
    targets = matched_targets(pseudo, probs)
    assert tuple(label_matching(pseudo, probs.argmax(1), k).tolist()) in perms
    got = cross_level_interaction_loss(probs, pseudo, double_softmax)
    assert got.item() == pytest.approx(naive_ce(probs, targets, double_softmax), rel=1e-6)
    if len(perms) == 1:
        want_targets = torch.tensor([perms[0][int(a)] for a in pseudo])
        assert torch.equal(targets, want_targets)
        assert got.item() == pytest.approx(naive_ce(probs, want_targets, double_softmax), rel=1e-6)


def test_cli_cross_entropy_clamps_zero_probabilities_and_detaches_targets():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]], requires_grad=True)
    loss = cli_cross_entropy(probs, torch.tensor([1, 0]), eps=1e-8)
    assert loss.item() == pytest.approx((-math.log(1e-8) - math.log(0.5)) / 2)
    loss.backward()
    assert torch.isfinite(probs.grad).all()


def test_minmax_scale_like_sklearn():
    x = torch.tensor([[1.0, 5.0, 2.0], [3.0, 5.0, 0.0], [2.0, 5.0, 4.0]])
    want = torch.tensor([[0.0, 0.0, 0.5], [1.0, 0.0, 0.0], [0.5, 0.0, 1.0]])
    torch.testing.assert_close(minmax_scale(x), want)


def test_cli_edge_cases_small_batch_empty_cluster_identical_samples():
    g = torch.Generator().manual_seed(0)
    # K larger than the batch: k-means on 3 samples with K = 5 uses 3 clusters
    z = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    labels = kmeans_labels(z, 5, n_init=3)
    assert sorted(labels.tolist()) == [0, 1, 2]
    probs = torch.softmax(torch.randn(3, 5, generator=g), dim=1)
    targets = matched_targets(labels, probs)
    assert targets.min() >= 0 and targets.max() < 5
    assert torch.equal(targets, probs.argmax(1))   # 3 distinct pseudo-labels: all can agree with the head
    assert math.isfinite(cross_level_interaction_loss(probs, labels).item())
    # a cluster empty in the batch (label 1 of K = 3 absent): still a permutation, valid targets
    pseudo = torch.tensor([0, 0, 2, 2, 2])
    head = torch.tensor([1, 1, 1, 0, 0])
    pi = label_matching(pseudo, head, 3)
    assert sorted(pi.tolist()) == [0, 1, 2] and pi[0] == 1 and pi[2] == 0
    # all samples identical: one k-means cluster, every target the same head label
    same = torch.ones(6, 4)
    assert kmeans_labels(same, 3).tolist() == [0] * 6
    probs = torch.softmax(torch.randn(6, 3, generator=g), dim=1)
    targets = matched_targets(torch.zeros(6, dtype=torch.long), probs)
    assert len(set(targets.tolist())) == 1
    assert int(targets[0]) == int(torch.bincount(probs.argmax(1), minlength=3).argmax())


def test_kmeans_labels_are_seeded_and_use_minmax_scaling_by_default():
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    z = torch.cat([c + 0.1 * torch.randn(6, 2, generator=g) for c in centres])
    a = kmeans_labels(z, 3, n_init=2, seed=3)
    assert torch.equal(a, kmeans_labels(z, 3, n_init=2, seed=3))
    truth = torch.arange(3).repeat_interleave(6)
    assert len({(int(p), int(t)) for p, t in zip(a, truth, strict=True)}) == 3   # recovers the three blobs
    assert torch.equal(kmeans_labels(z, 3, n_init=2, seed=3, scaling="none").unique(), torch.arange(3))


# -- the plugins on a hand-made state ----------------------------------------------------------------

def make_state(backbone, k=3, image_size=8, num_train=20, **recipe):
    raw = {"data": {"image_size": image_size}, "e_step": {"k": k}, "run": {"seed": 0}, **recipe}
    return TrainState(recipe=load_recipe(data=raw), device=torch.device("cpu"),
                      model=nn.ModuleDict({"backbone": backbone}), num_train=num_train, steps_per_epoch=1)


def test_masked_vit_refuses_a_backbone_it_cannot_mask_and_a_wrong_image_size():
    resnet = create_backbone(ModelConfig(backbone="resnet18_cifar", backbone_kwargs={"channels": [8, 8, 8, 8]}))
    with pytest.raises(PluginError, match="not a timm VisionTransformer.*vit_pici_small_patch16_224"):
        MaskedViT().setup(make_state(resnet))
    with pytest.raises(PluginError, match="not a timm VisionTransformer"):
        PartialSelfDiscrimination().setup(make_state(resnet))
    no_cls = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=8, patch_size=2, class_token=False,
                               global_pool="avg")
    with pytest.raises(PluginError, match="no class token"):
        MaskedViT().setup(make_state(no_cls))
    with pytest.raises(PluginError, match=r"data.image_size = 16.*img_size: 16"):
        MaskedViT().setup(make_state(tiny_vit(), image_size=16))


def test_masked_vit_outputs_and_embed_with_and_without_test_time_masking():
    torch.manual_seed(0)
    state = make_state(tiny_vit())
    plugin = MaskedViT()
    plugin.setup(state)
    outputs = plugin.register_outputs(state)
    assert set(outputs) == {"h", "mae"}
    views = [torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)]
    cache = StepCache(views, torch.arange(4), outputs, state)
    assert cache["h", 1].shape == (4, 32) and torch.equal(cache["h", 1], cache["mae", 1].tokens[:, 0])
    assert cache["mae", 0].mask.sum().item() == 4 * 8
    # the masking noise is the step cache's seeded draw of each view (independent of the global RNG)
    for v in (0, 1):
        want = encode(state.model["backbone"], views[v], 0.5, cache.rand(16, salt=f"masked_vit/view{v}"))
        assert torch.equal(cache["mae", v].mask, want.mask) and torch.equal(cache["mae", v].tokens, want.tokens)
    assert not torch.equal(cache["mae", 0].mask, cache["mae", 1].mask)
    state.model.eval()
    images = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        plain = plugin.embed(state, images)
        torch.testing.assert_close(plain, state.model["backbone"](images))     # unmasked by default
        torch.testing.assert_close(plugin.embed(state, images), plain)
        quirky = MaskedViT(MaskedViT.Params(test_time_masking=True))
        a, b = quirky.embed(state, images), quirky.embed(state, images)
    assert a.shape == (5, 32) and not torch.allclose(a, b)                     # random draws


def test_embed_of_masked_vit_wins_over_contrastive_heads():
    pm, _ = load_plugins({"contrastive_heads": {}, "masked_vit": {}})
    state = make_state(tiny_vit())
    state.model["backbone"].eval()
    impls = [impl.plugin_name for impl in reversed(pm.hook.embed.get_hookimpls())]
    assert impls[0] == "masked_vit"
    # a tryfirst implementation that returns a value ends the firstresult call
    quirky = load_plugins({"contrastive_heads": {}, "masked_vit": {"test_time_masking": True}})[0]
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(quirky.hook.embed(state=state, images=x), state.model["backbone"](x))


def test_pisd_plugin_loss_is_the_mean_of_the_two_views():
    torch.manual_seed(0)
    state = make_state(tiny_vit())
    mvit, pisd = MaskedViT(), PartialSelfDiscrimination(PartialSelfDiscrimination.Params(
        decoder_dim=16, decoder_depth=1, decoder_heads=2, weight=2.0))
    mvit.setup(state)
    pisd.setup(state)
    dec = state.model["pisd_decoder"]
    assert dec.pred.out_features == 2 * 2 * 1 and dec.embed.in_features == 32
    views = [torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)]
    cache = StepCache(views, torch.arange(4), mvit.register_outputs(state), state)
    got = pisd.compute_losses(state, cache)["partial_self_discrimination"]
    want = [masked_reconstruction_loss(dec(cache["mae", v].tokens, cache["mae", v].ids_restore),
                                       patchify(views[v], 2), cache["mae", v].mask) for v in (0, 1)]
    assert got.item() == pytest.approx(2.0 * (want[0] + want[1]).item() / 2)
    got.backward()
    assert state.model["backbone"].blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # without masked_vit nobody produces 'mae'
    bare = StepCache(views, torch.arange(4), {}, state)
    with pytest.raises(PluginError, match="Add masked_vit"):
        pisd.compute_losses(state, bare)


def test_cli_plugin_stage_labels_once_batch_labels_every_step():
    from clusterkit_plugins.cc.heads import ContrastiveHeads

    torch.manual_seed(0)
    state = make_state(tiny_vit(), k=3, num_train=12)
    feats = torch.randn(12, 32)
    state.feature_fn = lambda split: feats
    heads = ContrastiveHeads(ContrastiveHeads.Params(instance_dim=8))
    heads.setup(state)
    cli = CrossLevelInteraction(CrossLevelInteraction.Params(n_init=2))
    cli.setup(state)
    assert cli.labels is None and cli.state_dict() == {}
    assert "cross_level_interaction" not in state.model  # the labels are the plugin's state, not a module
    cli.on_epoch_start(state)
    z = F.normalize(state.model["instance_head"](feats), dim=1)
    assert torch.equal(cli.labels, kmeans_labels(z, 3, n_init=2, seed=0))
    restored = CrossLevelInteraction(CrossLevelInteraction.Params(n_init=2))
    restored.setup(state)
    restored.load_state_dict(cli.state_dict())  # a resume keeps the stage labels
    assert torch.equal(restored.labels, cli.labels)
    state.feature_fn = lambda split: pytest.fail("stage labels are computed once")
    cli.on_epoch_start(state)

    index = torch.tensor([3, 0, 7, 11, 5])
    outputs = {"h": lambda cache, v: torch.randn(5, 32), **heads.register_outputs(state)}
    cache = StepCache([torch.zeros(5, 1, 8, 8)] * 2, index, outputs, state)
    got = cli.compute_losses(state, cache)["cross_level_interaction"]
    want = [cross_level_interaction_loss(cache["c", v], cli.labels[index]) for v in (0, 1)]
    assert got.item() == pytest.approx((want[0] + want[1]).item() / 2)

    per_batch = CrossLevelInteraction(CrossLevelInteraction.Params(n_init=2, pseudo_labels="batch",
                                                                   double_softmax=True))
    got = per_batch.compute_losses(state, cache)["cross_level_interaction"]
    want = [cross_level_interaction_loss(cache["c", v], kmeans_labels(cache["z", v], 3, n_init=2, seed=0), True)
            for v in (0, 1)]
    assert got.item() == pytest.approx((want[0] + want[1]).item() / 2)
    with pytest.raises(PluginError, match="Add contrastive_heads"):
        per_batch.compute_losses(state, StepCache(cache.views, index, {}, state))


def test_one_pici_step_under_bf16_autocast_gives_float32_losses_and_gradients():
    from clusterkit_plugins.cc.cluster_contrast import ClusterContrast
    from clusterkit_plugins.cc.heads import ContrastiveHeads
    from clusterkit_plugins.cc.instance_contrast import InstanceContrast

    torch.manual_seed(0)
    state = make_state(tiny_vit(in_chans=3), k=3, num_train=8)
    state.feature_fn = lambda split: torch.randn(8, 32)
    mvit, heads = MaskedViT(), ContrastiveHeads()
    losses = [PartialSelfDiscrimination(PartialSelfDiscrimination.Params(decoder_dim=16, decoder_depth=1,
                                                                         decoder_heads=2)),
              InstanceContrast(), ClusterContrast(), CrossLevelInteraction(CrossLevelInteraction.Params(n_init=2))]
    for plugin in (mvit, heads, losses[0], losses[3]):
        plugin.setup(state)
    cache = StepCache([torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)], torch.arange(8),
                      {**mvit.register_outputs(state), **heads.register_outputs(state)}, state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = {k: v for plugin in losses for k, v in plugin.compute_losses(state, cache).items()}
    assert set(terms) >= {"partial_self_discrimination", "instance_contrast", "cluster_contrast",
                          "cross_level_interaction"}
    for name, value in terms.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name
    sum(terms.values()).backward()
    assert torch.isfinite(state.model["backbone"].patch_embed.proj.weight.grad).all()


# -- recipes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, k", [("rsod", 4), ("uc_merced", 21), ("siri_whu", 12), ("imagenet10", 10)])
def test_pici_recipes_follow_the_paper(key, k):
    path = REPO / "recipes" / f"pici_{key}.yaml"
    r = load_recipe(path)
    load_plugins(r.plugins)
    assert r.name == path.stem and r.e_step.k == k
    assert list(r.plugins) == list(PICI_PLUGINS)
    assert (r.data.image_size, r.data.batch_size, r.data.drop_last) == (224, 96, True)
    assert (r.model.backbone, r.model.backbone_kwargs) == (VIT, {"img_size": 224})
    assert (r.optim.name, r.optim.lr, r.optim.lr_scaling, r.optim.weight_decay) == ("adam", 1e-4, "none", 0.0)
    assert (r.schedule.epochs, r.schedule.warmup_epochs, r.schedule.lr_schedule) == (1050, 0, "constant")
    assert [{"name": s.name, "until": s.until, "plugins": list(s.plugins)} for s in r.stages] == STAGES
    assert r.plugins["masked_vit"] == {"mask_ratio": 0.5, "test_time_masking": False}
    assert r.plugins["cross_level_interaction"]["n_init"] == 100
    assert r.plugins["cross_level_interaction"]["double_softmax"] is True       # the code's behaviour
    # Transforms_BYOL: the second view is the first plus Solarize p 0.2; blur sigma 0.1-2 always
    a, b = r.data.augment, r.data.augment_second
    assert (a.blur_p, a.blur_sigma, a.solarize_p) == (1.0, (0.1, 2.0), 0.0)
    assert (a.jitter, a.crop_scale) == ((0.4, 0.4, 0.2, 0.1), (0.08, 1.0))
    assert b == attrs.evolve(a, solarize_p=0.2)
    text = path.read_text()
    assert "Published" in text or "NOT a published setting" in text


def test_fmnist_pici_benchmark_recipe_matches_the_digpro_budget():
    bench = REPO / "benchmarks" / "recipes"
    r = load_recipe(bench / "fmnist_pici.yaml")
    load_plugins(r.plugins)
    d = load_recipe(bench / "fmnist_digpro.yaml")
    assert (r.data.dataset, r.data.split, r.data.image_size, r.data.batch_size) == \
        (d.data.dataset, d.data.split, d.data.image_size, d.data.batch_size)
    assert r.schedule.epochs == d.schedule.epochs == 8
    assert [s.until for s in r.stages] == [2, 7, None]
    assert r.model.backbone_kwargs["img_size"] == r.data.image_size


# -- end to end -------------------------------------------------------------------------------------

def test_tiny_pici_trains_through_pretrain_train_and_boost(tmp_path, tiny_recipe_data, restore_threads):
    from clusterkit.checkpoint import latest_checkpoint, load_checkpoint
    from clusterkit.rundir import make_run_dir
    from clusterkit.trainer import Trainer

    raw = copy.deepcopy(tiny_recipe_data)
    raw["name"] = "pici_digits_test"
    raw["model"] = {"backbone": VIT, "backbone_kwargs": dict(TINY_VIT)}
    raw["optim"] = {"name": "adam", "lr": 1e-3, "lr_scaling": "none", "weight_decay": 0.0}
    raw["schedule"] = {"epochs": 3, "warmup_epochs": 0, "lr_schedule": "constant"}
    raw["eval"] = {"pixel_baseline": "never"}
    raw["run"].update({"device": "cpu", "threads": 1})
    raw["plugins"] = {
        "masked_vit": {}, "contrastive_heads": {"instance_dim": 16},
        "partial_self_discrimination": {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2},
        "instance_contrast": {}, "cluster_contrast": {}, "cross_level_interaction": {"n_init": 2},
    }
    raw["stages"] = [dict(s, until={200: 1, 1000: 2}.get(s["until"])) for s in copy.deepcopy(STAGES)]
    recipe = load_recipe(data=raw)
    run_dir = make_run_dir(recipe, str(tmp_path / "run"), force=False)
    trainer = Trainer(recipe, run_dir)
    summary = trainer.fit()

    assert summary["steps"] == 3 * (1797 // 256)
    assert summary["protocol"]["prediction"] == "predict hook: contrastive_heads"
    labels = trainer.last_prediction.labels
    assert labels.shape == (1797,) and int(labels.min()) >= 0 and int(labels.max()) < 10
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = {r["epoch"]: r for r in records if "seconds" in r}
    # that PICI learns (NMI above the untrained network's): tests/plugins/test_methods_learn.py
    assert summary["metrics"] == {name: epochs[3][name] for name in ("nmi", "acc", "ari")}  # the last evaluation
    # of the cluster head's predictions, recomputed here (scikit-learn's arithmetic NMI)
    assert summary["metrics"]["nmi"] == pytest.approx(
        normalized_mutual_info_score(trainer.eval_ds.targets.numpy(), labels.cpu().numpy()), abs=1e-9)
    expected = {1: ("pretrain", {"partial_self_discrimination"}),
                2: ("train", {"partial_self_discrimination", "instance_contrast", "cluster_contrast"}),
                3: ("boost", {"instance_contrast", "cluster_contrast", "cross_level_interaction"})}
    all_terms = {"partial_self_discrimination", "instance_contrast", "cluster_contrast", "cross_level_interaction"}
    for epoch, (stage, terms) in expected.items():
        assert epochs[epoch]["stage"] == stage
        assert {t for t in all_terms if t in epochs[epoch]} == terms, epoch
        assert all(math.isfinite(epochs[epoch][t]) for t in terms)
    ckpt = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
    model = ckpt["model"]
    labels = ckpt["plugins"]["cross_level_interaction"]["labels"]       # labels made at the boost's start
    assert labels.shape == (1797,) and 0 <= int(labels.min()) and int(labels.max()) < 10
    assert model["pisd_decoder.pred.weight"].shape == (2 * 2 * 1, 16)
    assert torch.equal(model["backbone.pos_embed"][0], sincos_pos_embed_2d(32, 4, cls_token=True))
