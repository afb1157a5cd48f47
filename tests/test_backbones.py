"""timm backbones and the CIFAR-stem ResNets registered in timm's registry."""

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
