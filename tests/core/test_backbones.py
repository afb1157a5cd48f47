"""timm backbones and the CIFAR-stem ResNets registered in timm's registry."""

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import clusterkit  # noqa: F401  (registers the CIFAR-stem ResNets)
from clusterkit.errors import RecipeError
from clusterkit.models import create_backbone
from clusterkit.recipe import ModelConfig


@pytest.mark.parametrize("name, blocks", [("resnet18_cifar", [2, 2, 2, 2]), ("resnet34_cifar", [3, 4, 6, 3])])
def test_cifar_resnets_are_in_timms_registry_with_a_3x3_stride1_stem(name, blocks):
    assert name in timm.list_models("*_cifar")
    m = timm.create_model(name, num_classes=0)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and isinstance(m.maxpool, nn.Identity)
    assert [len(getattr(m, f"layer{i}")) for i in range(1, 5)] == blocks
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 512)
    # no early downsampling: the first stage sees the full 32x32 grid
    assert m.layer1(m.act1(m.bn1(m.conv1(x)))).shape[-1] == 32


def test_create_backbone_any_timm_model_and_channels():
    m = create_backbone(ModelConfig(backbone="resnet18"), in_chans=1)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, m.num_features) == (2, 512)
    narrow = create_backbone(ModelConfig(backbone="resnet18_cifar", backbone_kwargs={"channels": [8, 16, 16, 32]}))
    assert narrow.num_features == 32 and narrow.layer1[0].conv1.out_channels == 8
    assert narrow(torch.randn(2, 3, 16, 16)).shape == (2, 32)


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(RecipeError, match=r"does not know the backbone 'resnet81'.*Close names: .*resnet18"):
        create_backbone(ModelConfig(backbone="resnet81"))


def test_pretrained_cifar_stem_is_refused_clearly():
    with pytest.raises(RecipeError, match="no published pretrained weights"):
        create_backbone(ModelConfig(backbone="resnet18_cifar", pretrained=True))


def test_pretrained_from_a_local_file_is_passed_to_timm(tmp_path):
    src = timm.create_model("resnet18", num_classes=0)
    path = tmp_path / "weights.pth"
    torch.save(src.state_dict(), path)
    m = create_backbone(ModelConfig(backbone="resnet18", pretrained=True, pretrained_file=str(path)))
    assert torch.equal(m.conv1.weight, src.conv1.weight)


def test_pretrained_missing_local_file_says_nothing_is_downloaded(tmp_path):
    cfg = ModelConfig(backbone="resnet18", pretrained=True, pretrained_file=str(tmp_path / "missing.pth"))
    with pytest.raises(RecipeError, match="cannot download anything"):
        create_backbone(cfg)


# -- initialisation as the official code (torchvision's ResNet) ----------------------------------

def _official_cifar_resnet18() -> nn.Module:
    """The official ProPos/DigPro "BigResNet-18", built here from torchvision: ResNet-18 with the
    stem replaced by a fresh 3x3 stride-1 Conv2d (PyTorch's default init) and no max-pool."""
    import torchvision

    m = torchvision.models.resnet18()
    m.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    m.fc = nn.Identity()
    return m


def _init_stats(model: nn.Module) -> list[tuple[str, float, float]]:
    """(kind, std, mean) of every conv and BatchNorm weight, in module order."""
    out = []
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            out.append(("conv", mod.weight.std().item(), mod.weight.mean().item()))
        elif isinstance(mod, nn.BatchNorm2d):
            out.append(("bn", mod.weight.std().item(), mod.weight.mean().item()))
    return out


def test_cifar_resnet18_initialises_like_torchvisions_resnet18_with_a_fresh_stem():
    torch.manual_seed(0)
    ours = _init_stats(timm.create_model("resnet18_cifar", num_classes=0))
    theirs = _init_stats(_official_cifar_resnet18())
    assert [kind for kind, _, _ in ours] == [kind for kind, _, _ in theirs]
    for i, ((kind, s_ours, m_ours), (_, s_theirs, m_theirs)) in enumerate(zip(ours, theirs, strict=True)):
        if kind == "bn":  # weight 1 everywhere: no zero-initialised last BN per block
            assert (s_ours, m_ours) == (s_theirs, m_theirs) == (0.0, 1.0), i
        else:  # same init distribution: std within sampling error (the smallest conv has 1,728 weights)
            assert s_ours == pytest.approx(s_theirs, rel=0.08), i
    # the stem is PyTorch's default Conv2d init (kaiming-uniform a=sqrt(5): std = 1/sqrt(3 fan_in)),
    # not kaiming-normal fan_out (std = sqrt(2 / (64 * 9)) = 0.059)
    stem_std = ours[0][1]
    assert stem_std == pytest.approx(1 / (3 * 27) ** 0.5, rel=0.08) and stem_std > 0.08


def test_standard_resnet_with_zero_init_last_false_matches_torchvision():
    import torchvision

    torch.manual_seed(0)
    ours = _init_stats(create_backbone(ModelConfig(backbone="resnet18", backbone_kwargs={"zero_init_last": False})))
    theirs = _init_stats(torchvision.models.resnet18())
    for (kind, s_ours, m_ours), (_, s_theirs, m_theirs) in zip(ours, theirs, strict=True):
        if kind == "bn":
            assert (s_ours, m_ours) == (s_theirs, m_theirs)
        else:
            assert s_ours == pytest.approx(s_theirs, rel=0.08)


def _untrained_kmeans_largest_share(backbone: str, backbone_kwargs: dict) -> float:
    """Largest cluster share of the E-step's k-means (K=10, cosine) on the eval-mode evaluation
    features norm(projector(backbone(x))) of an untrained network on the 1,797 digits
    (upsampled to 32x32, one channel)."""
    from sklearn.datasets import load_digits

    from clusterkit.cluster import kmeans
    from clusterkit.models import MLPHead

    torch.manual_seed(0)
    x = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0
    x = (nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False) - 0.3) / 0.4
    m = create_backbone(ModelConfig(backbone=backbone, backbone_kwargs=backbone_kwargs), in_chans=1)
    net = nn.Sequential(m, MLPHead(m.num_features, 4096, 256)).eval()
    with torch.no_grad():
        feats = torch.cat([net(chunk) for chunk in x.split(512)])
    labels = kmeans(feats, 10, metric="cosine", n_init=3, seed=0).labels
    return torch.bincount(labels, minlength=10).max().item() / len(labels)


def test_untrained_network_features_are_not_collapsed():
    """With torchvision's init (the official code's) no k-means cluster of the untrained network's
    evaluation features holds half the digits.  The negative control, timm's default
    zero-initialised last BN of every block, piles several times more of them into one cluster."""
    share = _untrained_kmeans_largest_share("resnet18", {"zero_init_last": False})
    assert share < 0.5
    assert _untrained_kmeans_largest_share("resnet18", {"zero_init_last": True}) > 2 * share


def test_untrained_cifar_resnet_features_are_not_collapsed():
    """The quickstart's narrow CIFAR-stem ResNet-18 with its (official) default init."""
    assert _untrained_kmeans_largest_share("resnet18_cifar", {"channels": [16, 32, 64, 128]}) < 0.5


# -- the recipe's init contract holds for any backbone chosen with --set ---------------------------

@pytest.mark.parametrize("recipe", ["propos_cifar10", "digpro_imagenet10"])
def test_a_timm_resnet_swapped_in_with_set_keeps_the_byol_recipes_init(recipe):
    """``--set model.backbone=resnet26`` on a ProPos/DigPro recipe: the swapped-in timm ResNet
    initialises as the recipe says, with no zero-initialised last BatchNorm per block (timm's
    default, under which the untrained features collapse: test_untrained_network_features_are_
    not_collapsed).  Narrowed by --set to stay small."""
    from clusterkit.recipe import load_recipe

    path = Path(__file__).resolve().parents[2] / "recipes" / f"{recipe}.yaml"
    r = load_recipe(path, overrides=["model.backbone=resnet26", "model.backbone_kwargs.channels=[8,8,16,16]",
                                     "model.backbone_kwargs.stem_width=8"])
    torch.manual_seed(0)
    m = create_backbone(r.model, in_chans=3)
    blocks = [b for name in ("layer1", "layer2", "layer3", "layer4") for b in getattr(m, name)]
    assert blocks and all(type(b).__name__ == "Bottleneck" for b in blocks)
    last_gammas = torch.cat([b.bn3.weight.detach() for b in blocks])
    assert torch.equal(last_gammas, torch.ones_like(last_gammas))  # torchvision's BN init: weight 1
    with torch.no_grad():
        feats = nn.functional.normalize(m.eval()(torch.randn(64, 3, 32, 32)), dim=1)
    # and the untrained network's eval-mode features of different inputs are not one point
    # (0.15 measured: the norm of the per-dimension std of the normalised features)
    spread = feats.std(dim=0).norm().item()
    assert spread > 0.05, spread


def test_zero_init_last_is_ignored_by_a_backbone_without_it():
    """A ViT has no residual BatchNorm: ``model.zero_init_last`` (as the BYOL recipes set it)
    does not stop it from being built."""
    cfg = ModelConfig(backbone="vit_pici_small_patch16_224", zero_init_last=False,
                      backbone_kwargs={"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2})
    assert create_backbone(cfg)(torch.randn(2, 3, 16, 16)).shape == (2, 16)


def test_quickstart_keeps_timms_zero_initialised_last_bn_and_a_contradiction_is_refused():
    """The quickstart deliberately keeps zero_init_last: true (its header says why)."""
    from clusterkit.recipe import load_recipe

    r = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml")
    m = create_backbone(r.model, in_chans=1)
    assert all(not b.bn2.weight.any() for name in ("layer1", "layer4") for b in getattr(m, name))
    with pytest.raises(RecipeError, match="say it once"):
        create_backbone(ModelConfig(backbone="resnet18", zero_init_last=False,
                                    backbone_kwargs={"zero_init_last": True}))


def test_zero_init_last_said_in_both_places_alike_is_passed_once():
    """backbone_kwargs that repeat model.zero_init_last (a recipe extending the BYOL base that also
    keeps the older spelling) build: timm gets the keyword once, and the last BatchNorms are at 1."""
    m = create_backbone(ModelConfig(backbone="resnet18", zero_init_last=False,
                                    backbone_kwargs={"zero_init_last": False}))
    blocks = [b for name in ("layer1", "layer4") for b in getattr(m, name)]
    assert blocks and all(b.bn2.weight.eq(1).all() for b in blocks)
