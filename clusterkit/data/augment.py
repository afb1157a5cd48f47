"""Two-view augmentation for contrastive clustering.

The augmentation of every method in clusterkit (the SimCLR-style augmentation of the ProPos,
DigPro, HaDis, CC and PICI code; docs/fidelity.md says where the official per-image PIL path
differs) is, in this order::

    RandomResizedCrop(S, scale=crop_scale, ratio=crop_ratio)
    RandomHorizontalFlip()                          # if hflip (dataset default)
    RandomRotation(rotation)                        # if rotation > 0; bilinear, corners filled black
    RandomApply([ColorJitter(*jitter)], p=jitter_p)
    RandomGrayscale(p=grayscale_p)
    RandomApply([GaussianBlur(k, blur_sigma)], p=blur_p)   # k = blur_kernel, else ~ 10% of S, odd
    RandomSolarize(0.5, p=solarize_p)                # values >= 0.5 -> 1 - value (PIL's >= 128 on uint8)
    Normalize(mean, std)

Two implementations draw from the same distribution:

* :class:`BatchedTwoView` transforms a whole ``uint8 (B, C, H, W)`` batch at once on
  the batch's device, with independent random parameters per sample and no
  Python loop over the batch (crop + flip + resize is one ``grid_sample`` call, or for
  crops that shrink, torchvision's antialiasing as two per-sample resampling matrices).
  This is the fast path for in-memory datasets.  For the same per-sample parameters its
  ops equal torchvision's image by image (float rounding apart), and its parameters are
  drawn as torchvision draws them (tests/core/test_augment_equivalence.py).
* :class:`PerImageTwoView` is the torchvision ``transforms.v2`` pipeline applied
  to one ``uint8 (C, H, W)`` image, for DataLoader workers over big folders.

:func:`eval_transform` is the test transform: resize to ``S x S`` and normalise.

Randomness: both use torch's global CPU generator (the batched path draws its
per-sample parameters on the CPU and moves them to the batch's device), so
``torch.manual_seed`` makes them reproducible, identically on CPU and GPU.

Single-channel images (digits, Fashion-MNIST) skip saturation, hue and grayscale,
which are no-ops on them.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import attrs
import torch
import torch.nn.functional as F

from clusterkit.data.registry import DatasetInfo

__all__ = [
    "AugmentParams",
    "BatchedTwoView",
    "PerImageTwoView",
    "ViewParams",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "blur_kernel_size",
    "color_jitter",
    "eval_transform",
    "gaussian_blur",
    "hsv_to_rgb",
    "resized_crop",
    "rgb_to_grayscale",
    "rgb_to_hsv",
    "resolve_blur_kernel",
    "rotate",
    "sample_crop_boxes",
    "solarize",
]


# --------------------------------------------------------------------------- parameters


def _float_tuple(value: Any) -> Any:
    """Recipe lists -> tuple of floats; anything else is left for the validator to reject."""
    if isinstance(value, (list, tuple)):
        try:
            return tuple(float(v) for v in value)
        except (TypeError, ValueError):
            return value
    return value


# Validator messages follow clusterkit.schema's style: they read well after the
# field's recipe path ("'data.augment.crop_scale' must be ...").


def _check_tuple(length: int) -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(_instance: Any, _attribute: attrs.Attribute, value: Any) -> None:
        if not (isinstance(value, tuple) and len(value) == length and all(isinstance(v, float) for v in value)):
            raise TypeError(f"must be a list of {length} numbers, got {value!r}")

    return check


def _check_pair(low: float, high: float, *, open_low: bool) -> Callable[[Any, attrs.Attribute, Any], None]:
    """A (lo, hi) pair with lo <= hi inside [low, high] (low excluded if open_low)."""

    def check(_instance: Any, _attribute: attrs.Attribute, value: tuple[float, float]) -> None:
        lo, hi = value
        lo_ok = lo > low if open_low else lo >= low
        if not (lo_ok and lo <= hi <= high):
            bracket = "(" if open_low else "["
            raise ValueError(f"must be [lo, hi] with lo <= hi, both in {bracket}{low}, {high}], got {list(value)}")

    return check


def _check_prob(_instance: Any, _attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"must be a probability in [0, 1], got {value!r}")


def _check_jitter(_instance: Any, _attribute: attrs.Attribute, value: tuple[float, ...]) -> None:
    brightness, contrast, saturation, hue = value
    if min(brightness, contrast, saturation) < 0 or not 0.0 <= hue <= 0.5:
        raise ValueError(
            "must be [brightness, contrast, saturation, hue] with the first three "
            f">= 0 and hue in [0, 0.5], got {list(value)}"
        )


def _check_kernel(_instance: Any, _attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 3 or value % 2 == 0:
        raise ValueError(
            "must be an odd whole number >= 3 (the blur kernel's side in pixels) or null (about 10% of "
            f"the image side), got {value!r}"
        )


def _check_rotation(_instance: Any, _attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value <= 180.0:
        raise ValueError(f"must be an angle in degrees in [0, 180], got {value:g}")


@attrs.define
class AugmentParams:
    """Parameters of the two-view augmentation (the recipe's ``augment`` section).

    Attributes:
        crop_scale: RandomResizedCrop area fraction range, in (0, 1].
        crop_ratio: RandomResizedCrop aspect-ratio range (w / h), > 0.
        hflip: random horizontal flip; None uses the dataset's default
            (:attr:`DatasetInfo.hflip`).
        jitter: ColorJitter (brightness, contrast, saturation, hue) strengths.
        jitter_p: probability of applying the colour jitter.
        grayscale_p: probability of converting to grayscale.
        blur_p: probability of a Gaussian blur.
        blur_sigma: range the blur's sigma is drawn from, in pixels.
        blur_kernel: the blur kernel's side in pixels, odd, >= 3 (reflect padding, so at most
            ``2 * image_size - 1``); None: about 10% of the image side (:func:`blur_kernel_size`).
            PIL's ``GaussianBlur(radius=sigma)`` (the official PICI code) has no kernel cut-off:
            at 32 px a 13-tap kernel (``2 * ceil(3 * 2) + 1``) matches it for sigma up to 2,
            where the 10% rule's 3 taps give a much weaker blur.
        solarize_p: probability of solarizing, after the blur: every value at or above the
            midpoint 0.5 (of the [0, 1] float image) becomes ``1 - value``; on uint8 levels that
            is PIL's ``ImageOps.solarize`` default (``v >= 128 -> 255 - v``), and a float value
            is inverted exactly when it rounds to a uint8 level ``>= 128``.  BYOL's asymmetric
            views (PICI's second view: 0.2).
        rotation: largest rotation in degrees; every view turns by an angle drawn uniformly
            from ``[-rotation, rotation]`` (0: no rotation, the default).  For data without
            a canonical orientation or with small slants (handwriting); the corners the
            rotation uncovers are black.
    """

    crop_scale: tuple[float, float] = attrs.field(
        default=(0.08, 1.0),
        converter=_float_tuple,
        validator=[_check_tuple(2), _check_pair(0.0, 1.0, open_low=True)],
    )
    crop_ratio: tuple[float, float] = attrs.field(
        default=(3 / 4, 4 / 3),
        converter=_float_tuple,
        validator=[_check_tuple(2), _check_pair(0.0, math.inf, open_low=True)],
    )
    hflip: bool | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(bool))
    )
    jitter: tuple[float, float, float, float] = attrs.field(
        default=(0.4, 0.4, 0.4, 0.1), converter=_float_tuple, validator=[_check_tuple(4), _check_jitter]
    )
    jitter_p: float = attrs.field(default=0.8, validator=_check_prob)
    grayscale_p: float = attrs.field(default=0.2, validator=_check_prob)
    blur_p: float = attrs.field(default=0.0, validator=_check_prob)
    blur_sigma: tuple[float, float] = attrs.field(
        default=(0.1, 2.0),
        converter=_float_tuple,
        validator=[_check_tuple(2), _check_pair(0.0, math.inf, open_low=True)],
    )
    rotation: float = attrs.field(default=0.0, converter=float, validator=_check_rotation)
    blur_kernel: int | None = attrs.field(default=None, validator=_check_kernel)
    solarize_p: float = attrs.field(default=0.0, validator=_check_prob)

    def resolved_hflip(self, info: DatasetInfo) -> bool:
        """Whether to flip: the explicit setting, else the dataset's default."""
        return info.hflip if self.hflip is None else self.hflip


def blur_kernel_size(image_size: int) -> int:
    """Gaussian blur kernel side: about 10% of ``image_size``, odd, at least 3."""
    k = int(0.1 * image_size)
    return max(3, k if k % 2 else k + 1)


def resolve_blur_kernel(params: AugmentParams, image_size: int) -> int:
    """The blur kernel side for views of ``image_size``: ``params.blur_kernel``, else
    :func:`blur_kernel_size`.  Raises ValueError when the kernel is too large for reflect
    padding (half the kernel must be smaller than the image side)."""
    if params.blur_kernel is None:
        return blur_kernel_size(image_size)
    if params.blur_kernel // 2 >= image_size:
        raise ValueError(
            f"must be at most {2 * image_size - 1} for {image_size} px views, got {params.blur_kernel}: the "
            "blur pads each side by half the kernel, reflecting the image, which needs half the kernel to "
            "be smaller than the image side. Use a smaller odd kernel, or null for about 10% of the side"
        )
    return params.blur_kernel


# --------------------------------------------------------------------------- geometry


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    tries: int = 10,
) -> torch.Tensor:
    """Per-sample RandomResizedCrop boxes, drawn as torchvision does, vectorised.

    Each sample tries ``tries`` (area, log-aspect) draws and keeps the first that
    fits; samples with no fitting draw fall back to the central crop with the
    aspect ratio clamped into ``ratio``.

    Returns:
        float32 ``(n, 4)``: integer-valued ``(top, left, h, w)`` in pixels, on the CPU.
    """
    area = height * width
    target = area * torch.empty(n, tries).uniform_(scale[0], scale[1])
    aspect = torch.exp(torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first fitting try
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    top = torch.floor(torch.rand(n) * (height - h + 1))
    left = torch.floor(torch.rand(n) * (width - w + 1))

    # Central-crop fallback (same for every sample that needs it).
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    fallback = ~fits.any(dim=1)
    fallback_box = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=torch.float32)
    boxes = torch.stack([top, left, h, w], dim=1)
    return torch.where(fallback[:, None], fallback_box, boxes)


def resized_crop(
    images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Crop each image to its box, optionally mirror it, and resize to ``size``: torchvision's
    ``resized_crop(..., interpolation=BILINEAR, antialias=True)`` (then ``horizontal_flip``),
    per sample, for the whole batch at once.

    Samples whose box is no larger than the output on either side take plain bilinear
    interpolation (one ``affine_grid`` / ``grid_sample`` call, as cropping and then
    ``F.interpolate(mode="bilinear", align_corners=False)``; antialiasing changes nothing
    there).  Samples whose box shrinks on a side take torch's antialiased bilinear filter
    (PIL's triangle filter widened by the shrink factor, each axis on its own), as two
    per-sample resampling matrices.

    Args:
        images: float ``(B, C, H, W)``.
        boxes: ``(B, 4)`` integer-valued ``(top, left, h, w)`` in pixels, inside the image
            (best on the CPU: which samples shrink is decided there, without a device sync).
        size: output side ``S``.
        flip: optional bool ``(B,)``: mirror horizontally.
    Returns:
        float ``(B, C, S, S)``.
    """
    shrinks = (boxes[:, 2:] > size).any(dim=1).cpu()
    if not shrinks.any():
        return _bilinear_crop(images, boxes, size, flip)
    if shrinks.all():
        return _antialiased_crop(images, boxes, size, flip)
    out = images.new_empty(images.shape[0], images.shape[1], size, size)
    for select, fn in ((~shrinks, _bilinear_crop), (shrinks, _antialiased_crop)):
        index = select.nonzero().squeeze(1)
        dev_index = index.to(images.device)
        part_flip = None if flip is None else flip[index.to(flip.device)]
        part = fn(images.index_select(0, dev_index), boxes[index.to(boxes.device)], size, part_flip)
        out.index_copy_(0, dev_index, part)
    return out


def _bilinear_crop(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None) -> torch.Tensor:
    """:func:`resized_crop` without antialiasing: one bilinear ``grid_sample`` call."""
    b, c, height, width = images.shape
    boxes = boxes.to(device=images.device, dtype=images.dtype)
    top, left, h, w = boxes.unbind(dim=1)
    sx = w / width
    if flip is not None:
        sx = torch.where(flip.to(images.device), -sx, sx)
    theta = torch.zeros(b, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    # Clamp sample points to the box's outer pixel centres, so that the box edge is
    # replicated as when cropping first and resizing after (torchvision).
    lo = torch.stack([(2 * left + 1) / width - 1, (2 * top + 1) / height - 1], dim=1).view(b, 1, 1, 2)
    hi = torch.stack([(2 * (left + w) - 1) / width - 1, (2 * (top + h) - 1) / height - 1], dim=1).view(b, 1, 1, 2)
    grid = torch.maximum(torch.minimum(grid, hi), lo)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _resample_matrix(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """``(B, out_size, in_size)`` weights of torch's antialiased bilinear resize (the
    ``_upsample_bilinear2d_aa`` kernel) of each sample's pixels ``[start, start + length)``
    to ``out_size`` pixels: triangle filter of half-width ``max(1, length / out_size)`` in
    input pixels around each output pixel's centre, restricted to the span, normalised."""
    scale = length / out_size  # (B,)
    support = scale.clamp(min=1.0)
    centre = scale[:, None] * (torch.arange(out_size, device=start.device, dtype=start.dtype) + 0.5)  # in the span
    pixel = torch.arange(in_size, device=start.device, dtype=start.dtype) + 0.5 - start[:, None]  # (B, in)
    weights = (1.0 - ((pixel[:, None, :] - centre[:, :, None]) / support[:, None, None]).abs()).clamp(min=0.0)
    weights = weights * ((pixel >= 0) & (pixel < length[:, None]))[:, None, :]
    return weights / weights.sum(dim=2, keepdim=True)


def _antialiased_crop(
    images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None
) -> torch.Tensor:
    """:func:`resized_crop` with torch's antialiased bilinear filter: ``Wy @ image @ Wx^T``."""
    height, width = images.shape[-2:]
    boxes = boxes.to(device=images.device, dtype=images.dtype)
    top, left, h, w = boxes.unbind(dim=1)
    wy = _resample_matrix(top, h, height, size)  # (B, S, H)
    wx = _resample_matrix(left, w, width, size)  # (B, S, W)
    if flip is not None:
        wx = torch.where(flip.to(images.device)[:, None, None], wx.flip(1), wx)
    return wy[:, None] @ (images @ wx.transpose(1, 2)[:, None])  # (B, C, S, S)


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Turn each image about its centre, counter-clockwise by its own angle, as
    torchvision's ``rotate`` (bilinear, same size, uncovered corners 0).

    Args:
        images: float ``(B, C, H, W)``; degrees: ``(B,)``.
    Returns:
        float ``(B, C, H, W)``.
    """
    b, _, height, width = images.shape
    a = torch.deg2rad(degrees.to(device=images.device, dtype=images.dtype))
    cos, sin = torch.cos(a), torch.sin(a)
    # affine_grid works in [-1, 1] per axis: rescale so the rotation is a true one in pixels
    aspect = width / height
    theta = torch.zeros(b, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin / aspect
    theta[:, 1, 0], theta[:, 1, 1] = sin * aspect, cos
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# --------------------------------------------------------------------------- colour


def rgb_to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma: float ``(..., 3, H, W)`` -> ``(..., 1, H, W)``."""
    r, g, b = images.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """RGB in ``[0, 1]`` -> HSV with every channel in ``[0, 1]``; shapes ``(..., 3, H, W)``."""
    r, g, b = images.unbind(dim=-3)
    maxc = images.amax(dim=-3)
    minc = images.amin(dim=-3)
    delta = maxc - minc
    chroma = delta > 0
    safe_delta = torch.where(chroma, delta, torch.ones_like(delta))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    hue = torch.where(
        maxc == r,
        (g - b) / safe_delta,
        torch.where(maxc == g, 2.0 + (b - r) / safe_delta, 4.0 + (r - g) / safe_delta),
    )
    hue = torch.where(chroma, torch.remainder(hue / 6.0, 1.0), torch.zeros_like(hue))
    return torch.stack([hue, sat, maxc], dim=-3)


# For each hue sextant i, which of (v, q, p, t) are (r, g, b).
_SEXTANT = torch.tensor([[0, 3, 2], [1, 0, 2], [2, 0, 3], [2, 1, 0], [3, 2, 0], [0, 2, 1]])


def hsv_to_rgb(images: torch.Tensor) -> torch.Tensor:
    """HSV with channels in ``[0, 1]`` -> RGB; shapes ``(..., 3, H, W)``."""
    h, s, v = images.unbind(dim=-3)
    h6 = torch.remainder(h, 1.0) * 6.0
    sextant = torch.floor(h6)
    f = h6 - sextant
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    candidates = torch.stack([v, q, p, t], dim=-3)
    index = _SEXTANT.to(images.device)[sextant.long() % 6]  # (..., H, W, 3)
    return candidates.gather(-3, index.movedim(-1, -3))


def _per_sample(factor: torch.Tensor) -> torch.Tensor:
    return factor.reshape(-1, 1, 1, 1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``clamp(x * f)`` per sample; images float ``(B, C, H, W)`` in [0, 1], factor ``(B,)``."""
    return (images * _per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image with its mean gray level: ``clamp(f * x + (1 - f) * mean)``."""
    gray = rgb_to_grayscale(images) if images.shape[1] == 3 else images
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    f = _per_sample(factor)
    return (f * images + (1.0 - f) * mean).clamp_(0.0, 1.0)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each RGB image with its grayscale version: ``clamp(f * x + (1 - f) * gray)``."""
    f = _per_sample(factor)
    return (f * images + (1.0 - f) * rgb_to_grayscale(images)).clamp_(0.0, 1.0)


def adjust_hue(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each RGB image by ``factor`` turns, ``factor`` in [-0.5, 0.5]."""
    hsv = rgb_to_hsv(images)
    hue = torch.remainder(hsv[:, 0] + factor.reshape(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.cat([hue.unsqueeze(1), hsv[:, 1:]], dim=1))


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma and reflect padding.

    Args:
        images: float ``(B, C, H, W)``; sigma: ``(B,)`` in pixels; kernel_size: odd.
    Returns:
        float ``(B, C, H, W)``.
    """
    b, c, height, width = images.shape
    half = (kernel_size - 1) / 2
    x = torch.linspace(-half, half, kernel_size, device=images.device, dtype=images.dtype)
    kernel = torch.softmax(-0.5 * (x / sigma.to(images).reshape(-1, 1)) ** 2, dim=1)  # (B, k)
    kernel = kernel.repeat_interleave(c, dim=0)  # (B*C, k)
    pad = kernel_size // 2
    flat = F.pad(images.reshape(1, b * c, height, width), (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, kernel.reshape(b * c, 1, 1, kernel_size), groups=b * c)
    flat = F.conv2d(flat, kernel.reshape(b * c, 1, kernel_size, 1), groups=b * c)
    return flat.reshape(b, c, height, width)


def solarize(images: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Invert every value at or above ``threshold``: ``x >= t -> 1 - x``, as torchvision's
    ``solarize`` on float images.  With the default 0.5, a value is inverted exactly when it
    rounds to a uint8 level ``>= 128``, PIL's ``ImageOps.solarize`` default.

    Args:
        images: float ``(B, C, H, W)`` in [0, 1].
    Returns:
        float ``(B, C, H, W)``.
    """
    return torch.where(images >= threshold, 1.0 - images, images)


def _apply_to(
    images: torch.Tensor, select: torch.Tensor, fn: Callable[..., torch.Tensor], *args: torch.Tensor
) -> None:
    """In place: ``images[select] = fn(images[select], *args[select])``; ``select`` a CPU bool mask."""
    index = select.nonzero().squeeze(1)
    if index.numel() == 0:
        return
    dev_index = index.to(images.device)
    out = fn(images.index_select(0, dev_index), *(a[index].to(images.device) for a in args))
    images.index_copy_(0, dev_index, out)


def _normalise(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    if images.shape[1] != len(info.mean):
        raise ValueError(
            f"images have {images.shape[1]} channels but the dataset statistics have {len(info.mean)}"
        )
    mean = torch.tensor(info.mean, device=images.device, dtype=images.dtype).reshape(1, -1, 1, 1)
    std = torch.tensor(info.std, device=images.device, dtype=images.dtype).reshape(1, -1, 1, 1)
    return (images - mean) / std


def _to_float(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4:
        raise ValueError(f"expected a batch (B, C, H, W), got shape {tuple(images.shape)}")
    return images.to(torch.float32).div_(255.0) if images.dtype == torch.uint8 else images.to(torch.float32)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # indexed by op id


def color_jitter(
    images: torch.Tensor,
    apply: torch.Tensor,
    order: torch.Tensor,
    factors: list[torch.Tensor | None],
) -> None:
    """Colour jitter in place with per-sample factors and per-sample op order, as
    torchvision's ``ColorJitter`` applied image by image.

    Args:
        images: float ``(B, C, H, W)`` in [0, 1], changed in place.
        apply: bool ``(B,)`` on the CPU: which samples are jittered.
        order: ``(B, 4)`` on the CPU: each sample's permutation of the op ids 0-3
            (brightness, contrast, saturation, hue), applied left to right.
        factors: per op id, ``(B,)`` factors (hue: shifts in turns), or None to skip the op.
    """
    # The four stages are processed in turn, each op on the samples that drew it at that stage.
    for stage in range(4):
        for op_id, (fn, factor) in enumerate(zip(_JITTER_OPS, factors, strict=True)):
            if factor is not None:
                _apply_to(images, apply & (order[:, stage] == op_id), fn, factor)


@attrs.frozen
class ViewParams:
    """One batched view's per-sample parameters (CPU tensors, first dim ``B``), as drawn by
    :meth:`BatchedTwoView.sample`; None: the step is off.

    Attributes:
        boxes: ``(B, 4)`` crop boxes ``(top, left, h, w)`` in pixels.
        flip: bool ``(B,)``: mirror horizontally.
        degrees: ``(B,)`` rotation angles (counter-clockwise).
        jitter: bool ``(B,)``: apply the colour jitter.
        order: ``(B, 4)`` colour-jitter op order (0 brightness, 1 contrast, 2 saturation, 3 hue).
        brightness, contrast, saturation: ``(B,)`` jitter factors.
        hue: ``(B,)`` hue shifts in turns.
        grayscale: bool ``(B,)``: convert to grayscale.
        blur: bool ``(B,)``: blur; sigma: ``(B,)`` the blur's sigma in pixels.
        solarize: bool ``(B,)``: solarize (after the blur).
    """

    boxes: torch.Tensor
    flip: torch.Tensor | None = None
    degrees: torch.Tensor | None = None
    jitter: torch.Tensor | None = None
    order: torch.Tensor | None = None
    brightness: torch.Tensor | None = None
    contrast: torch.Tensor | None = None
    saturation: torch.Tensor | None = None
    hue: torch.Tensor | None = None
    grayscale: torch.Tensor | None = None
    blur: torch.Tensor | None = None
    sigma: torch.Tensor | None = None
    solarize: torch.Tensor | None = None


# --------------------------------------------------------------------------- pipelines


def eval_transform(images: torch.Tensor, image_size: int, info: DatasetInfo) -> torch.Tensor:
    """Test transform: resize to ``image_size`` (whole image, bilinear) and normalise.

    Args:
        images: uint8 ``(B, C, H, W)`` (or float in [0, 1]).
    Returns:
        float32 ``(B, C, S, S)``, normalised with ``info.mean`` / ``info.std``.
    """
    x = _to_float(images)
    b, _, height, width = x.shape
    if (height, width) != (image_size, image_size):
        boxes = torch.tensor([[0.0, 0.0, height, width]]).expand(b, 4)
        x = resized_crop(x, boxes, image_size)
    return _normalise(x, info)


class BatchedTwoView(torch.nn.Module):
    """Two independently augmented views of a batch, vectorised over samples.

    Every sample draws its own crop box, flip, rotation angle, jitter factors, jitter op order,
    grayscale, blur and solarize decisions (from torch's global CPU RNG).  Ops are applied to
    the subset of samples that drew them, so untouched samples stay bit-exact.
    Colour-jitter order is random per sample as in torchvision: the four stages are
    processed in turn, each op on the samples that drew it at that stage.
    :meth:`sample` draws a view's parameters (:class:`ViewParams`) and :meth:`apply` applies
    given parameters, so either can be checked on its own.

    Example::

        >>> from clusterkit.data import DATASETS
        >>> aug = BatchedTwoView(AugmentParams(), 32, DATASETS["cifar10"])
        >>> v1, v2 = aug(torch.zeros(8, 3, 32, 32, dtype=torch.uint8))
        >>> v1.shape
        torch.Size([8, 3, 32, 32])
    """

    def __init__(self, params: AugmentParams, image_size: int, info: DatasetInfo,
                 second: AugmentParams | None = None):
        super().__init__()
        self.params = params
        self.image_size = int(image_size)
        self.info = info
        self.hflip = params.resolved_hflip(info)
        self.kernel_size = resolve_blur_kernel(params, self.image_size)
        # weak/strong views: the second view draws from its own parameters
        self.second = None if second is None else BatchedTwoView(second, image_size, info)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, hflip={self.hflip}, params={self.params}"

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``(B, C, H, W)`` -> two float32 normalised views ``(B, C, S, S)``; the second
        view uses ``second``'s parameters when given."""
        x = _to_float(images)
        return self.view(x), (self if self.second is None else self.second).view(x)

    def view(self, images: torch.Tensor) -> torch.Tensor:
        """One augmented view: uint8 or [0, 1] float ``(B, C, H, W)`` -> float32 ``(B, C, S, S)``."""
        x = _to_float(images)
        return _normalise(self.apply(x, self.sample(*x.shape)), self.info)

    def sample(self, n: int, channels: int, height: int, width: int) -> ViewParams:
        """Draw one view's per-sample parameters for ``n`` images of ``channels x height x width``
        from torch's global CPU generator (what :meth:`view` draws, in the same order)."""
        p = self.params
        boxes = sample_crop_boxes(n, height, width, p.crop_scale, p.crop_ratio)
        flip = torch.rand(n) < 0.5 if self.hflip else None
        degrees = torch.empty(n).uniform_(-p.rotation, p.rotation) if p.rotation > 0 else None
        jitter: dict[str, Any] = {}
        if p.jitter_p > 0:
            brightness, contrast, saturation, hue = p.jitter
            colour = channels == 3
            jitter["jitter"] = torch.rand(n) < p.jitter_p
            jitter["order"] = torch.argsort(torch.rand(n, 4), dim=1)  # a random permutation of the 4 ops

            def factor(strength: float) -> torch.Tensor:  # torchvision's range [max(0, 1 - s), 1 + s]
                return torch.empty(n).uniform_(max(0.0, 1 - strength), 1 + strength)

            if brightness > 0:
                jitter["brightness"] = factor(brightness)
            if contrast > 0:
                jitter["contrast"] = factor(contrast)
            if saturation > 0 and colour:
                jitter["saturation"] = factor(saturation)
            if hue > 0 and colour:
                jitter["hue"] = torch.empty(n).uniform_(-hue, hue)
        grayscale = torch.rand(n) < p.grayscale_p if channels == 3 and p.grayscale_p > 0 else None
        blur = sigma = None
        if p.blur_p > 0:
            blur = torch.rand(n) < p.blur_p
            sigma = torch.empty(n).uniform_(*p.blur_sigma)
        solarize = torch.rand(n) < p.solarize_p if p.solarize_p > 0 else None
        return ViewParams(boxes, flip, degrees, **jitter, grayscale=grayscale, blur=blur, sigma=sigma,
                          solarize=solarize)

    def apply(self, images: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """Augment float ``(B, C, H, W)`` images in [0, 1] with given per-sample parameters
        (no random draws) -> float ``(B, C, S, S)`` in [0, 1], not normalised."""
        x = resized_crop(images, params.boxes, self.image_size, params.flip)
        if params.degrees is not None:
            x = rotate(x, params.degrees)
        if params.jitter is not None:
            factors = [params.brightness, params.contrast, params.saturation, params.hue]
            color_jitter(x, params.jitter, params.order, factors)
        if params.grayscale is not None:
            _apply_to(x, params.grayscale, lambda im: rgb_to_grayscale(im).expand_as(im))
        if params.blur is not None:
            _apply_to(x, params.blur, lambda im, s: gaussian_blur(im, s, self.kernel_size), params.sigma)
        if params.solarize is not None:
            _apply_to(x, params.solarize, solarize)
        return x


class PerImageTwoView:
    """The same augmentation as :class:`BatchedTwoView`, one image at a time.

    Built from ``torchvision.transforms.v2``; call it on a uint8 ``(C, H, W)``
    tensor (e.g. in a DataLoader worker) to get two float32 normalised
    ``(C, S, S)`` views.  ``self.transform`` is the first view's pipeline and
    ``self.second_transform`` the second's: built from ``second`` when given
    (weak/strong views, as :class:`BatchedTwoView`'s ``second``), else the same
    object as ``self.transform``.  Instances pickle (for worker processes).
    """

    def __init__(self, params: AugmentParams, image_size: int, info: DatasetInfo,
                 second: AugmentParams | None = None):
        self.params = params
        self.image_size = int(image_size)
        self.info = info
        self.second = second
        self.transform = _per_image_pipeline(params, self.image_size, info)
        self.second_transform = (
            self.transform if second is None else _per_image_pipeline(second, self.image_size, info)
        )

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``(C, H, W)`` -> two float32 views ``(C, S, S)``."""
        return self.transform(image), self.second_transform(image)

    def __repr__(self) -> str:
        if self.second is None:
            return f"PerImageTwoView({self.transform})"
        return f"PerImageTwoView({self.transform}, second={self.second_transform})"


def _per_image_pipeline(params: AugmentParams, image_size: int, info: DatasetInfo) -> Any:
    """One view's ``transforms.v2`` pipeline: uint8 ``(C, H, W)`` -> float32 ``(C, S, S)``."""
    from torchvision.transforms import v2

    colour = info.channels == 3
    brightness, contrast, saturation, hue = params.jitter
    steps: list[Any] = [
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomResizedCrop(image_size, scale=params.crop_scale, ratio=params.crop_ratio, antialias=True),
    ]
    if params.resolved_hflip(info):
        steps.append(v2.RandomHorizontalFlip())
    if params.rotation > 0:
        # fill=None: plain zero padding, as :func:`rotate`.  torchvision's default fill=0
        # multiplies the edge pixels by the sampled coverage a second time (darker edges).
        steps.append(v2.RandomRotation(params.rotation, interpolation=v2.InterpolationMode.BILINEAR, fill=None))
    jitter = v2.ColorJitter(brightness, contrast, saturation if colour else 0.0, hue if colour else 0.0)
    steps.append(v2.RandomApply([jitter], p=params.jitter_p))
    if colour:
        steps.append(v2.RandomGrayscale(p=params.grayscale_p))
    if params.blur_p > 0:
        blur = v2.GaussianBlur(resolve_blur_kernel(params, image_size), sigma=params.blur_sigma)
        steps.append(v2.RandomApply([blur], p=params.blur_p))
    if params.solarize_p > 0:
        # the float image's midpoint: PIL's uint8 threshold 128 after rounding (see :func:`solarize`)
        steps.append(v2.RandomSolarize(0.5, p=params.solarize_p))
    steps.append(v2.Normalize(list(info.mean), list(info.std)))
    return v2.Compose(steps)
