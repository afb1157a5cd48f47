"""The masked Transformer encoder of PICI: the backbone sees only part of each view.

PICI (arXiv 2401.13503, "masked image modeling with two parallel augmented views")
feeds every augmented view x^v through a ViT encoder that keeps a random half of the
patches, MAE-style:

    tokens  = PatchEmbed(x^v) + pos            (B, L, D), fixed 2-D sin-cos positions
    noise   ~ U(0, 1)^(B x L)                  cache.rand(L, salt="masked_vit/view<v>")
    shuffle = argsort(noise, dim=1)            per sample; small noise = kept
    keep    = shuffle[:, :len_keep],  len_keep = int(L * (1 - mask_ratio))     (mask_ratio 0.5)
    ids_restore = argsort(shuffle, dim=1)      undoes the shuffle (the decoder needs it)
    mask[i, j] = 1 if patch j of sample i was removed, else 0      (B, L)
    latent  = norm( Blocks( [CLS + pos_cls ; tokens[keep]] ) )     (B, 1 + len_keep, D)
    h^v     = latent[:, 0]                     the [CLS] token, after the encoder's final norm

``h`` is the feature every PICI head reads: it replaces the core's default step output
``h`` (the backbone on the whole view), so CC's ``contrastive_heads`` computes z and c
of the *masked* views (the paper's PICD) without knowing about masks.  The full encoding
is the step output ``mae`` (:class:`MaskedEncoding`) for the decoder of
``partial_self_discrimination`` (PISD).

The masking noise of a training view is drawn by ``cache.rand`` for the whole global
batch from (run.seed, step, view), so under DDP a sample is masked the same way however
the batch is split across processes (and a resumed run masks as the uninterrupted one).

Evaluation (``embed``): the [CLS] feature of the UNMASKED encoder on the test images.
The official code also masks at test time (its ``forward_cluster`` calls the MAE forward,
ratio 0.5), so its predictions are random draws; ``test_time_masking: true`` reproduces
that quirk.

Any timm VisionTransformer with a [CLS] token can be masked (clusterkit registers PICI's
own, ``vit_pici_small_patch16_224``, with fixed sin-cos positions); other backbones are
refused at setup with a PluginError.
"""

from __future__ import annotations

from typing import NamedTuple

import attrs
import torch
from timm.models.vision_transformer import VisionTransformer

from clusterkit import Plugin, hookimpl
from clusterkit.errors import PluginError
from clusterkit.schema import in_range

# ---------------------------------------------------------------------------------------------
# The method as functions of tensors
# ---------------------------------------------------------------------------------------------

class MaskedEncoding(NamedTuple):
    """What the masked encoder returns for one view.

    ``tokens``: (B, P + len_keep, D) final-norm outputs, the P prefix tokens ([CLS] first)
    followed by the visible patches in shuffled (kept) order; ``mask``: (B, L) float,
    1 = removed patch, 0 = visible; ``ids_restore``: (B, L) int64, position of patch j in
    the shuffled order; ``num_prefix``: P (1 for PICI's ViT).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    ids_restore: torch.Tensor
    num_prefix: int

    @property
    def cls(self) -> torch.Tensor:
        """The [CLS] feature (B, D)."""
        return self.tokens[:, 0]


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Per-sample random masking by shuffling (MAE).

    x: (B, L, D) patch tokens.  ``noise`` (B, L), default U(0, 1) from torch's global RNG:
    each sample keeps its len_keep = int(L * (1 - mask_ratio)) patches of smallest noise.

    Returns ``(kept (B, len_keep, D), mask (B, L) float with 1 = removed,
    ids_restore (B, L) int64)``; ``kept[i, k] = x[i, argsort(noise[i])[k]]`` and
    ``argsort(noise)[i, ids_restore[i, j]] = j``.
    """
    batch, length, dim = x.shape
    len_keep = int(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(batch, length, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(batch, length, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)   # back to patch order
    return kept, mask, ids_restore


def check_maskable(backbone) -> None:
    """Raise PluginError unless ``backbone`` is a timm VisionTransformer whose tokens can be masked."""
    name = type(backbone).__name__
    fix = ("Use a ViT with a [CLS] token, e.g. model.backbone: vit_pici_small_patch16_224 (PICI's encoder, "
           "registered by clusterkit) or a timm vit_* model, or remove masked_vit and the PICI plugins.")
    if not isinstance(backbone, VisionTransformer):
        raise PluginError(f"masked_vit masks the patches of a Vision Transformer, but the backbone is a {name} "
                          f"(not a timm VisionTransformer). {fix}")
    if getattr(backbone, "cls_token", None) is None:
        raise PluginError(f"masked_vit uses the [CLS] token as the feature, but this {name} has no class token "
                          f"(class_token=False). {fix}")
    if getattr(backbone, "dynamic_img_size", False):
        raise PluginError("masked_vit needs a fixed patch grid, but the backbone was built with "
                          "dynamic_img_size=True. Remove dynamic_img_size from model.backbone_kwargs.")
    if getattr(backbone, "attn_pool", None) is not None:
        raise PluginError(f"masked_vit reads the [CLS] token, but this {name} pools with attention "
                          f"(global_pool map/prr). {fix}")


def encode(vit: VisionTransformer, images: torch.Tensor, mask_ratio: float,
           noise: torch.Tensor | None = None) -> MaskedEncoding:
    """Run the ViT on the visible patches of ``images`` (B, C, S, S).

    ``noise`` (B, L) decides which patches are kept (see :func:`random_masking`; default
    U(0, 1) from torch's global RNG).
    Position embeddings are added before masking (the kept tokens keep their positions);
    the prefix tokens ([CLS], registers) are never masked.  ``mask_ratio`` 0 encodes the
    whole image in patch order (mask all 0, ids_restore = identity).
    """
    x = vit.patch_embed(images)                                   # (B, L, D)
    x = vit._pos_embed(x)                                         # (B, P + L, D): prefix + pos
    prefix_len = vit.num_prefix_tokens
    prefix, patches = x[:, :prefix_len], x[:, prefix_len:]
    batch, length = patches.shape[:2]
    if mask_ratio > 0:
        patches, mask, ids_restore = random_masking(patches, mask_ratio, noise)
    else:
        mask = torch.zeros(batch, length, device=x.device)
        ids_restore = torch.arange(length, device=x.device).expand(batch, -1)
    x = torch.cat([prefix, patches], dim=1)
    x = vit.norm_pre(x)
    x = vit.blocks(x)
    x = vit.norm(x)
    return MaskedEncoding(x, mask, ids_restore, prefix_len)


# ---------------------------------------------------------------------------------------------
# The plugin
# ---------------------------------------------------------------------------------------------

class MaskedViT(Plugin):
    """Masks a random share of each view's patches; the masked encoder's [CLS] becomes the step output h."""

    @attrs.define
    class Params:
        mask_ratio: float = attrs.field(default=0.5, validator=in_range(0, 1, hi_open=True), metadata={
            "doc": "share of patches removed from each training view (official: 0.5)"})
        test_time_masking: bool = attrs.field(default=False, metadata={
            "doc": "official quirk: mask the evaluation images too (random predictions); "
                   "false: evaluate the unmasked encoder"})

    @hookimpl
    def setup(self, state):
        backbone = state.model["backbone"]
        check_maskable(backbone)
        grid_img = tuple(backbone.patch_embed.img_size)
        size = state.recipe.data.image_size
        if grid_img != (size, size):
            raise PluginError(f"The ViT backbone is built for {grid_img[0]}x{grid_img[1]} images, but "
                              f"data.image_size = {size}. Set model.backbone_kwargs.img_size: {size} (or "
                              f"data.image_size: {grid_img[0]}).")
        length = backbone.patch_embed.num_patches
        if int(length * (1 - self.params.mask_ratio)) < 1:
            raise PluginError(f"masked_vit: mask_ratio {self.params.mask_ratio} keeps no patch of the "
                              f"{length} patches of an image; lower plugins.masked_vit.mask_ratio.")

    @hookimpl
    def register_outputs(self, state):
        model = state.model

        def mae(cache, v):
            backbone, ratio = model["backbone"], self.params.mask_ratio
            noise = cache.rand(backbone.patch_embed.num_patches, salt=f"masked_vit/view{v}") if ratio > 0 else None
            return encode(backbone, cache.views[v], ratio, noise)

        def h(cache, v):
            return cache["mae", v].cls

        return {"mae": mae, "h": h}

    @hookimpl(tryfirst=True)  # wins over contrastive_heads' embed (a firstresult hook)
    def embed(self, state, images):
        ratio = self.params.mask_ratio if self.params.test_time_masking else 0.0
        return encode(state.model["backbone"], images, ratio).cls
