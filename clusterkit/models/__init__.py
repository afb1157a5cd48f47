"""Backbones (any timm model, plus CIFAR-stem ResNets registered in timm) and MLP heads."""

from . import vit as _vit  # noqa: E402,F401  (registers vit_pici_small_patch16_224 in timm, like backbones)
from .backbones import create_backbone
from .heads import MLPHead

__all__ = ["create_backbone", "MLPHead"]
