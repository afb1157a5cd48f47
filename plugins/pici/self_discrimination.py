"""PISD: partial information self-discrimination (PICI, arXiv 2401.13503), masked image reconstruction.

A light Transformer decoder rebuilds the patches that ``masked_vit`` removed from each
view, from the encoder's visible tokens (MAE).  For view v with encoding
(latent, mask, ids_restore) = ``cache["mae", v]``:

    y      = Linear_{D -> d}(latent)                         (B, 1 + len_keep, d)   d = 512
    seq    = unshuffle([y_visible ; mask_token x (L - len_keep)], ids_restore) + pos_dec
    out    = Linear_{d -> p*p*C}( norm( Blocks_8( [y_cls ; seq] ) ) )[:, 1:]      (B, L, p*p*C)
    target = patchify(x^v)                                   (B, L, p*p*C), the augmented view
    target = (target - mean) / sqrt(var + 1e-6)              per patch (norm_pix_loss, on by default)
    L^v    = sum_j mask_j * mean_k (out_jk - target_jk)^2 / sum_j mask_j      (masked patches only)
    L_PISD = (L^1 + L^2) / 2

pos_dec: fixed 2-D sin-cos embeddings (the [CLS] slot gets none, as MAE's zero row).
Decoder: 512-d, 8 blocks of 16 heads (timm Blocks, MLP ratio 4, qkv bias, LayerNorm eps
1e-6) -- the official ``mae_vit_small_patch16`` (named "dec256d4b" but built 512/8).
The target is the view as the encoder saw it (normalised by the augmentation's mean/std).
Weight 1 (official: ``(loss_1 + loss_2) / 2`` added unweighted).

Stages (official): PISD alone for epochs 0-199 (pretrain), with CC's losses for
200-999 (train), and off in the boost stage.
"""

from __future__ import annotations

from functools import partial

import attrs
import torch
from timm.models.vision_transformer import Block
from torch import nn

from clusterkit import Plugin, hookimpl
from clusterkit.errors import PluginError
from clusterkit.models.vit import sincos_pos_embed_2d
from clusterkit.schema import in_range, non_negative, positive
from clusterkit_plugins.pici.masked_vit import check_maskable

MODULE_KEY = "pisd_decoder"


# ---------------------------------------------------------------------------------------------
# The method as functions of tensors
# ---------------------------------------------------------------------------------------------

def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), L = (H/p)(W/p) patches in raster order; each patch
    flattened as (row in patch, column in patch, channel), channel fastest (MAE's layout)."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)                       # (B, H/p, W/p, p, p, C)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: tuple[int, int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, L, p*p*C) -> (B, C, H, W) with (H/p, W/p) = grid_size."""
    b = patches.shape[0]
    gh, gw = grid_size
    p = patch_size
    x = patches.reshape(b, gh, gw, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, gh * p, gw * p)


def masked_reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                               norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """MSE over the masked patches only (PISD, one view).

    pred, target: (B, L, P) predicted and true patch pixels; mask: (B, L), 1 = masked.
    With ``norm_pix`` the target of each patch is standardised by its own mean and unbiased
    variance: (t - mean) / sqrt(var + eps).  Per-patch mean squared error, averaged over the
    masked patches of the batch -> scalar (0 when nothing is masked).  Computed in float32.
    """
    pred, target, mask = pred.float(), target.float(), mask.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = ((pred - target) ** 2).mean(dim=-1)              # (B, L)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)


class MAEDecoder(nn.Module):
    """The PISD decoder: encoder tokens (B, P + len_keep, D) + ids_restore (B, L) -> patch pixels (B, L, p*p*C).

    Buffers: ``pos_embed`` (1, L, dim) fixed 2-D sin-cos (patches only).  Parameters:
    ``embed`` (D -> dim), ``mask_token``, ``blocks``, ``norm``, ``pred`` (dim -> p*p*C).
    """

    def __init__(self, grid_size: tuple[int, int], patch_dim: int, encoder_dim: int, dim: int = 512,
                 depth: int = 8, num_heads: int = 16, mlp_ratio: float = 4.0):
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid_size).unsqueeze(0))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
                                      for _ in range(depth)])
        self.norm = norm(dim)
        self.pred = nn.Linear(dim, patch_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """MAE's init: xavier-uniform Linear weights, zero biases, LayerNorm 1 / 0, mask token N(0, 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor, num_prefix: int = 1) -> torch.Tensor:
        x = self.embed(tokens)
        prefix, visible = x[:, :num_prefix], x[:, num_prefix:]
        batch, length = ids_restore.shape
        fill = self.mask_token.to(x.dtype).expand(batch, length - visible.shape[1], -1)
        seq = torch.cat([visible, fill], dim=1)                  # shuffled order: kept first
        seq = torch.gather(seq, 1, ids_restore.unsqueeze(-1).expand(-1, -1, seq.shape[-1]))  # patch order
        x = torch.cat([prefix, seq + self.pos_embed.to(seq.dtype)], dim=1)
        x = self.norm(self.blocks(x))
        return self.pred(x)[:, num_prefix:]


# ---------------------------------------------------------------------------------------------
# The plugin
# ---------------------------------------------------------------------------------------------

class PartialSelfDiscrimination(Plugin):
    """PISD: reconstruct the masked patches of both views with an MAE decoder (normalised-pixel MSE)."""

    @attrs.define
    class Params:
        weight: float = attrs.field(default=1.0, validator=non_negative, metadata={
            "doc": "weight of the loss (official: 1, the mean of the two views)"})
        norm_pix_loss: bool = attrs.field(default=True, metadata={
            "doc": "standardise each target patch by its mean and std (official: true)"})
        decoder_dim: int = attrs.field(default=512, validator=positive, metadata={
            "doc": "decoder width (official: 512; divisible by 4 and by decoder_heads)"})
        decoder_depth: int = attrs.field(default=8, validator=in_range(1, None), metadata={
            "doc": "decoder Transformer blocks (official: 8)"})
        decoder_heads: int = attrs.field(default=16, validator=in_range(1, None), metadata={
            "doc": "decoder attention heads (official: 16)"})
        mlp_ratio: float = attrs.field(default=4.0, validator=positive, metadata={
            "doc": "decoder MLP hidden width / decoder_dim"})

    @hookimpl
    def setup(self, state):
        p = self.params
        backbone = state.model["backbone"]
        check_maskable(backbone)
        if p.decoder_dim % 4 or p.decoder_dim % p.decoder_heads:
            raise PluginError(f"plugins.partial_self_discrimination.decoder_dim = {p.decoder_dim} must be "
                              f"divisible by 4 (sin-cos positions) and by decoder_heads = {p.decoder_heads}.")
        patch = backbone.patch_embed.patch_size
        if patch[0] != patch[1]:
            raise PluginError(f"partial_self_discrimination needs square patches, the backbone has {patch}.")
        channels = backbone.patch_embed.proj.in_channels
        state.model[MODULE_KEY] = MAEDecoder(
            tuple(backbone.patch_embed.grid_size), patch[0] * patch[1] * channels, backbone.embed_dim,
            p.decoder_dim, p.decoder_depth, p.decoder_heads, p.mlp_ratio)

    @hookimpl
    def compute_losses(self, state, cache):
        decoder = state.model[MODULE_KEY]
        patch = state.model["backbone"].patch_embed.patch_size[0]
        losses = []
        for v in (0, 1):
            try:
                enc = cache["mae", v]
            except KeyError:
                raise PluginError("partial_self_discrimination reconstructs the patches that masked_vit removes, "
                                  "but no plugin produces the step output 'mae'. Add masked_vit to the recipe's "
                                  "plugins.") from None
            pred = decoder(enc.tokens, enc.ids_restore, enc.num_prefix)
            target = patchify(cache.views[v], patch)
            losses.append(masked_reconstruction_loss(pred, target, enc.mask, self.params.norm_pix_loss))
        return {"partial_self_discrimination": self.params.weight * torch.stack(losses).mean()}
