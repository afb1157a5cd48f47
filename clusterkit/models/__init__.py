"""Backbones (any timm model, plus CIFAR-stem ResNets registered in timm) and MLP heads."""

from .backbones import create_backbone
from .heads import MLPHead

__all__ = ["create_backbone", "MLPHead"]
