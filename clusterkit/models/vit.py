"""The Vision Transformer of PICI (an MAE-style ViT-S/16 encoder), registered in timm.

PICI (Zhang et al., arXiv 2401.13503) encodes images with the encoder of a masked
autoencoder: patch 16, 224 px, width 384, 6 blocks of 12 heads (MLP ratio 4, qkv bias,
LayerNorm eps 1e-6), a [CLS] token whose final-norm output is the image feature, and
FIXED 2-D sine-cosine position embeddings (not learned).  It is built from timm's own
:class:`~timm.models.vision_transformer.VisionTransformer` (its PatchEmbed, Blocks and
norm), with two changes:

* ``pos_embed`` is a persistent *buffer* holding :func:`sincos_pos_embed_2d` (zeros for the
  [CLS] slot), so it is saved in checkpoints but is never a parameter the optimiser sees;
* the weights start as MAE's: xavier-uniform Linear layers (and patch projection, seen
  as a Linear), zero biases, unit LayerNorms, [CLS] ~ N(0, 0.02).

``vit_pici_small_patch16_224`` is registered on import of this module (``import
clusterkit`` does it), so ``timm.create_model`` and recipes (``model.backbone``) know it.
With ``num_classes=0`` (what :func:`clusterkit.models.create_backbone` passes) the model
maps (B, C, S, S) to the [CLS] feature (B, 384).  ``model.backbone_kwargs`` may override
``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads`` and ``mlp_ratio``
(e.g. a tiny ViT for tests); ``in_chans`` comes from the dataset::

    >>> m = timm.create_model("vit_pici_small_patch16_224", num_classes=0)
    >>> m(torch.zeros(2, 3, 224, 224)).shape
    torch.Size([2, 384])
    >>> tiny = timm.create_model("vit_pici_small_patch16_224", num_classes=0, img_size=16, patch_size=4,
    ...                          embed_dim=32, depth=2, num_heads=2, in_chans=1)

The masking itself (the "partial information") is done by the ``masked_vit`` plugin,
which works on any timm VisionTransformer with a [CLS] token.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..errors import RecipeError

__all__ = ["sincos_pos_embed_1d", "sincos_pos_embed_2d", "PiciViT", "vit_pici_small_patch16_224"]


def sincos_pos_embed_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sine-cosine embedding of 1-D positions: (M,) -> (M, dim), ``dim`` even.

    With omega_i = 1 / 10000^(i / (dim/2)) for i = 0 .. dim/2 - 1 (the Transformer's
    frequencies): row m = [sin(p_m * omega_0), ..., sin(p_m * omega_{dim/2-1}),
    cos(p_m * omega_0), ..., cos(p_m * omega_{dim/2-1})].  Computed in float64.
    """
    if dim % 2:
        raise ValueError(f"the 1-D sin-cos embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]         # (M, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int | tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings of a patch grid (MAE's layout).

    Patches are numbered in raster order (row r, column c) -> r * W + c.  The first
    dim/2 channels embed the column c, the last dim/2 the row r, each with
    :func:`sincos_pos_embed_1d`.  ``dim`` must be divisible by 4.  With ``cls_token``
    a row of zeros for the [CLS] slot comes first.  Returns float32 (H*W [+1], dim).
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows = torch.arange(h).repeat_interleave(w)        # r of patch r * W + c
    cols = torch.arange(w).repeat(h)                   # c of patch r * W + c
    emb = torch.cat([sincos_pos_embed_1d(dim // 2, cols), sincos_pos_embed_1d(dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


class PiciViT(VisionTransformer):
    """timm's VisionTransformer with fixed 2-D sin-cos position embeddings and MAE's init.

    [CLS] pooling (``global_pool="token"``), class token on, LayerNorm eps 1e-6, qkv bias.
    ``pos_embed`` (1, 1 + L, D) is a buffer (fixed), not a parameter.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
        kwargs.setdefault("global_pool", "token")
        kwargs.setdefault("class_token", True)
        kwargs.setdefault("qkv_bias", True)
        if not kwargs["class_token"] or kwargs["global_pool"] != "token":
            raise RecipeError("vit_pici_* uses its [CLS] token as the feature; do not set class_token or "
                              "global_pool in model.backbone_kwargs.")
        super().__init__(**kwargs)
        fixed = sincos_pos_embed_2d(self.embed_dim, self.patch_embed.grid_size, cls_token=True).unsqueeze(0)
        del self.pos_embed
        self.register_buffer("pos_embed", fixed)
        self.init_weights_mae()

    @torch.no_grad()
    def init_weights_mae(self) -> None:
        """MAE's initialisation: xavier-uniform Linear weights (the patch projection too, as a
        Linear over its flattened kernel), zero biases, LayerNorm 1 / 0, [CLS] ~ N(0, 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)


@register_model
def vit_pici_small_patch16_224(pretrained: bool = False, **kwargs) -> PiciViT:
    """PICI's encoder: ViT, patch 16, 224 px, width 384, depth 6, 12 heads, fixed 2-D sin-cos
    position embeddings, [CLS] feature (the official ``mae_vit_small_patch16`` encoder)."""
    if pretrained:
        raise RecipeError("vit_pici_small_patch16_224 has no published pretrained weights; set "
                          "model.pretrained: false (PICI trains it from scratch).")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    args = dict(img_size=224, patch_size=16, embed_dim=384, depth=6, num_heads=12, mlp_ratio=4.0)
    args.update(kwargs)
    return PiciViT(**args)
