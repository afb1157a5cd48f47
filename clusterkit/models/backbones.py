"""Backbones come from timm; clusterkit adds the CIFAR-stem ResNets to timm's registry.

``resnet18_cifar`` / ``resnet34_cifar`` are the "BigResNet" of ProPos and DigPro:
timm's ResNet with the stem replaced by a 3x3 stride-1 convolution and no max-pool,
so a 32x32 input keeps 32x32 feature maps in the first stage.  They initialise as the
official code's torchvision ResNet does: kaiming-normal (fan_out) convolutions, BatchNorm
weight 1 / bias 0, and NO zero-initialised last BatchNorm per block (torchvision's
``zero_init_residual`` is False; timm's ``zero_init_last`` defaults to True, which makes the
untrained network's eval-mode features collapse to one point); the replaced 3x3 stem is a
fresh ``nn.Conv2d`` with PyTorch's default init, as the official code builds it.  Recipes
say the init once, ``model.zero_init_last: false`` (the BYOL-family and CC bases), and
:func:`create_backbone` passes it to whatever backbone ``model.backbone`` (or ``--set``) names,
when that model's constructor takes ``zero_init_last`` (timm's ResNets, ResNeXts, RegNets); a
model without the argument (a ViT, ConvNeXt) has no such BatchNorm and is built without it,
silently.  ``model.backbone_kwargs`` is passed as written, so a ``zero_init_last`` there is an
error for a model without it.  timm's ResNet
arguments pass through ``model.backbone_kwargs`` (e.g. ``channels: [32, 64, 128, 256]``
for a narrower network; timm keeps the single-conv stem 64 wide).  They are registered
on import of this module, so ``timm.create_model("resnet18_cifar")`` works after
``import clusterkit``::

    >>> m = create_backbone(ModelConfig(backbone="resnet18_cifar"), in_chans=3)
    >>> m(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 512])
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import timm
import torch
from timm.models import register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from ..errors import RecipeError

__all__ = ["create_backbone", "require_local_weights", "resnet18_cifar", "resnet34_cifar"]


def _cifar_resnet(layers, pretrained: bool = False, in_chans: int = 3, **kwargs) -> ResNet:
    if pretrained:
        raise RecipeError("The CIFAR-stem ResNets have no published pretrained weights; set "
                          "model.pretrained: false (the papers train them from scratch).")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)
    kwargs.setdefault("zero_init_last", False)  # torchvision's zero_init_residual=False (official)
    model = ResNet(block=BasicBlock, layers=layers, in_chans=in_chans, **kwargs)
    # the official stem: a fresh Conv2d, PyTorch's default (kaiming-uniform, a=sqrt(5)) init
    model.conv1 = nn.Conv2d(in_chans, model.bn1.num_features, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool (ProPos/DigPro "BigResNet-18")."""
    return _cifar_resnet([2, 2, 2, 2], pretrained, **kwargs)


@register_model
def resnet34_cifar(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-34 with a 3x3 stride-1 stem and no max-pool."""
    return _cifar_resnet([3, 4, 6, 3], pretrained, **kwargs)


def create_backbone(cfg, in_chans: int = 3) -> nn.Module:
    """``timm.create_model(cfg.backbone, num_classes=0)``: a module mapping (B, C, H, W) to
    pooled features (B, ``model.num_features``).  Bad names and missing weights give
    RecipeErrors that say what to do."""
    name = cfg.backbone
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise RecipeError(f"timm does not know the backbone '{name}' (model.backbone).{hint} "
                          "Run python -c \"import timm; print(timm.list_models('*resnet*'))\" to list names.")
    kwargs = dict(cfg.backbone_kwargs)
    if cfg.pretrained and cfg.pretrained_file:
        kwargs["pretrained_cfg_overlay"] = dict(file=cfg.pretrained_file)
    optional = {}  # passed to models that take them, left out for the others
    zero_init_last = getattr(cfg, "zero_init_last", None)
    if zero_init_last is not None:
        if "zero_init_last" in kwargs and kwargs.pop("zero_init_last") != zero_init_last:  # said twice: passed once
            raise RecipeError(f"model.zero_init_last is {zero_init_last} but model.backbone_kwargs.zero_init_last is "
                              f"{cfg.backbone_kwargs['zero_init_last']}; say it once (model.zero_init_last).")
        optional["zero_init_last"] = zero_init_last
    try:
        model = _create(name, optional, pretrained=cfg.pretrained, num_classes=0, in_chans=in_chans, **kwargs)
    except RecipeError:
        raise
    except Exception as exc:
        if cfg.pretrained:
            raise RecipeError(
                f"Could not load pretrained weights for '{name}': {type(exc).__name__}: {exc}. clusterkit cannot "
                "download anything at run time; put the weights file on this machine and set "
                "model.pretrained_file: /path/to/weights.safetensors (or .pth), or set model.pretrained: false."
            ) from None
        raise RecipeError(f"timm could not build '{name}' with {kwargs}: {exc}. Check model.backbone_kwargs.") from None
    if not hasattr(model, "num_features"):
        with torch.no_grad():
            model.num_features = model(torch.zeros(2, in_chans, 32, 32)).shape[1]
    return model


def _create(name: str, optional: dict, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs, **optional)``, or without ``optional``'s arguments when
    the model's constructor does not take them (timm's entry points take ``**kwargs``, so only
    building says which arguments a model accepts)."""
    try:
        return timm.create_model(name, **kwargs, **optional)
    except TypeError as exc:
        unknown = [k for k in optional if f"unexpected keyword argument '{k}'" in str(exc)]
        if not unknown:
            raise
    return _create(name, {k: v for k, v in optional.items() if k not in unknown}, **kwargs)


def _cached_weights(pcfg) -> bool:
    """Whether timm's pretrained config ``pcfg`` points at weights already on this machine."""
    if getattr(pcfg, "file", None):
        return Path(pcfg.file).is_file()
    hub_id = getattr(pcfg, "hf_hub_id", None)
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = hub_id.partition("@")
        names = [getattr(pcfg, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin",
                 "open_clip_pytorch_model.bin", "open_clip_model.safetensors"]
        if any(isinstance(try_to_load_from_cache(repo, n, revision=revision or None), str) for n in names if n):
            return True
    url = getattr(pcfg, "url", None)
    if url:
        from urllib.parse import urlparse

        return (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name).is_file()
    return False


def require_local_weights(cfg) -> None:
    """Fail fast, before timm tries the network, when ``model.pretrained`` has no local weights.

    clusterkit never downloads at run time: with ``pretrained_file`` that file must exist;
    without it the weights must already be in the Hugging Face or torch hub cache, and the
    hub is then put in offline mode so that timm reads the cache instead of retrying the network.
    """
    if not cfg.pretrained:
        return
    how = ("clusterkit cannot download anything at run time; put the weights file on this machine and set "
           "model.pretrained_file: /path/to/weights.safetensors (or .pth), or set model.pretrained: false.")
    if cfg.pretrained_file:
        if not Path(cfg.pretrained_file).is_file():
            raise RecipeError(f"model.pretrained_file '{cfg.pretrained_file}' does not exist (or is not a file). "
                              + how)
        return
    import timm

    if not timm.is_model(cfg.backbone):
        return  # create_backbone names the problem, with close names
    pcfg = timm.models.get_pretrained_cfg(cfg.backbone)
    if pcfg is None:
        return  # no published weights: the model itself says so (e.g. the CIFAR-stem ResNets)
    if not _cached_weights(pcfg):
        raise RecipeError(f"model.pretrained is true but no pretrained weights for '{cfg.backbone}' are on this "
                          "machine (neither in the Hugging Face cache nor in torch hub's "
                          f"'{torch.hub.get_dir()}/checkpoints'). " + how)
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True  # read at import time; set it for this process too
    except ImportError:
        pass
