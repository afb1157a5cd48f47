"""Two-view augmentation: the batched path, its ops, and the per-image twin."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from clusterkit.data import DATASETS, AugmentParams, BatchedTwoView, PerImageTwoView, eval_transform
from clusterkit.data.augment import (
    ViewParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    gaussian_blur,
    hsv_to_rgb,
    resized_crop,
    rgb_to_hsv,
    rotate,
    sample_crop_boxes,
    solarize,
)

CIFAR = DATASETS["cifar10"]
DIGITS = DATASETS["digits"]
IDENTITY = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False, jitter_p=0.0, grayscale_p=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def _smooth_images(n: int, size: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """uint8 (n, C, size, size): random 4x4 colour layouts upsampled, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 4, 4, generator=g)
    x = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    x = x + 0.05 * torch.randn(x.shape, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


# --------------------------------------------------------------------------- parameters


def test_params_validate_and_convert_lists():
    p = AugmentParams(crop_scale=[0.2, 1], jitter=[0.8, 0.8, 0.8, 0.2])
    assert p.crop_scale == (0.2, 1.0) and p.jitter == (0.8, 0.8, 0.8, 0.2)
    for bad in (
        dict(crop_scale=(0.0, 1.0)),
        dict(crop_scale=(0.9, 0.1)),
        dict(crop_scale=(0.5, 1.5)),
        dict(crop_ratio=(-1.0, 1.0)),
        dict(jitter=(0.4, 0.4, 0.4, 0.7)),
        dict(jitter=(-0.1, 0.4, 0.4, 0.1)),
        dict(jitter_p=1.5),
        dict(grayscale_p=-0.1),
        dict(blur_p=2),
        dict(blur_sigma=(0.0, 1.0)),
        dict(rotation=-5),
        dict(rotation=200),
        dict(solarize_p=1.5),
        dict(solarize_p=-0.2),
        dict(blur_kernel=4),
        dict(blur_kernel=1),
        dict(blur_kernel=True),
        dict(blur_kernel=5.0),
    ):
        with pytest.raises(ValueError):
            AugmentParams(**bad)
    with pytest.raises(ValueError, match=r"^must be an angle in degrees in \[0, 180\], got 200$"):
        AugmentParams(rotation=200)  # no field name: the recipe loader puts the path in front
    with pytest.raises(TypeError):
        AugmentParams(jitter=(0.4, 0.4))
    with pytest.raises(TypeError):
        AugmentParams(hflip="yes")
    assert blur_kernel_size(32) == 3 and blur_kernel_size(96) == 9 and blur_kernel_size(224) == 23
    with pytest.raises(ValueError, match=r"^must be an odd whole number >= 3 .* got 4$"):
        AugmentParams(blur_kernel=4)


def test_blur_kernel_is_used_by_both_pipelines_and_must_fit_the_image():
    for kernel, size, expected in ((None, 32, 3), (13, 32, 13), (None, 224, 23), (5, 224, 5), (15, 8, 15)):
        params = AugmentParams(blur_p=1.0, blur_kernel=kernel)
        assert BatchedTwoView(params, size, CIFAR).kernel_size == expected
        steps = PerImageTwoView(params, size, CIFAR).transform.transforms
        (blur,) = [t.transforms[0] for t in steps if isinstance(t, v2.RandomApply)
                   and isinstance(t.transforms[0], v2.GaussianBlur)]
        assert list(blur.kernel_size) == [expected, expected]
    # the second view resolves its own kernel
    two = BatchedTwoView(AugmentParams(), 32, CIFAR, second=AugmentParams(blur_kernel=13))
    assert two.kernel_size == 3 and two.second is not None and two.second.kernel_size == 13
    # reflect padding needs half the kernel below the image side: 15 fits 8 px, 17 does not
    for make in (BatchedTwoView, PerImageTwoView):
        with pytest.raises(ValueError, match=r"^must be at most 15 for 8 px views, got 17: the blur pads"):
            make(AugmentParams(blur_p=1.0, blur_kernel=17), 8, CIFAR)


# --------------------------------------------------------------------------- batched path


def test_shapes_dtype_and_normalisation():
    images = _smooth_images(16, 20)
    v1, v2_ = BatchedTwoView(AugmentParams(blur_p=0.5), 24, CIFAR)(images)
    assert v1.shape == v2_.shape == (16, 3, 24, 24) and v1.dtype == torch.float32
    assert not torch.equal(v1, v2_)
    # A constant image stays constant under every op but hue/grayscale; with those off
    # and no jitter the output is exactly (value - mean) / std.
    flat = torch.full((4, 3, 10, 10), 51, dtype=torch.uint8)
    out, _ = BatchedTwoView(AugmentParams(**IDENTITY), 10, CIFAR)(flat)
    expected = (0.2 - torch.tensor(CIFAR.mean)) / torch.tensor(CIFAR.std)
    assert torch.allclose(out[:, :, 3, 3], expected.expand(4, 3), atol=1e-5)


def test_reproducible_under_manual_seed():
    images = _smooth_images(8, 16)
    aug = BatchedTwoView(AugmentParams(blur_p=0.5), 16, CIFAR)
    torch.manual_seed(3)
    a = aug(images)
    torch.manual_seed(3)
    b = aug(images)
    torch.manual_seed(4)
    c = aug(images)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("size", [8, 16, 32])
def test_identity_params_equal_eval_transform(size):
    images = _smooth_images(6, 8, channels=1)
    v1, v2_ = BatchedTwoView(AugmentParams(**IDENTITY), size, DIGITS)(images)
    ref = eval_transform(images, size, DIGITS)
    assert ref.shape == (6, 1, size, size)
    assert torch.allclose(v1, ref, atol=1e-5) and torch.allclose(v2_, ref, atol=1e-5)
    if size != 8:  # eval resize is plain bilinear, like F.interpolate
        up = F.interpolate(images.float() / 255, size=(size, size), mode="bilinear", align_corners=False)
        assert torch.allclose(ref, (up - DIGITS.mean[0]) / DIGITS.std[0], atol=1e-5)


def test_hflip_flips_about_half():
    images = _smooth_images(400, 8)
    params = dict(IDENTITY, hflip=True)
    torch.manual_seed(0)
    out, _ = BatchedTwoView(AugmentParams(**params), 8, CIFAR)(images)
    ref = eval_transform(images, 8, CIFAR)
    same = (out - ref).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (out - ref.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert (same | mirrored).all()
    assert 0.4 < mirrored.float().mean() < 0.6  # binomial(400, 0.5): sd 0.025
    # hflip=None takes the dataset default: digits are not flip-invariant.
    aug = BatchedTwoView(AugmentParams(**dict(IDENTITY, hflip=None)), 8, DIGITS)
    assert aug.hflip is False and BatchedTwoView(AugmentParams(), 8, CIFAR).hflip is True


def test_grayscale_p1_gives_equal_channels():
    images = _smooth_images(8, 16)
    out, _ = BatchedTwoView(AugmentParams(grayscale_p=1.0), 16, CIFAR)(images)
    raw = out * torch.tensor(CIFAR.std).view(1, 3, 1, 1) + torch.tensor(CIFAR.mean).view(1, 3, 1, 1)
    assert torch.allclose(raw[:, 0], raw[:, 1], atol=1e-5) and torch.allclose(raw[:, 1], raw[:, 2], atol=1e-5)


def test_per_sample_crops_differ_within_a_batch():
    images = _smooth_images(1, 32).expand(16, -1, -1, -1)
    params = AugmentParams(crop_scale=(0.2, 1.0), hflip=False, jitter_p=0, grayscale_p=0)
    out, _ = BatchedTwoView(params, 32, CIFAR)(images)
    distinct = {tuple(o.flatten()[:50].tolist()) for o in out}
    assert len(distinct) == 16


def test_single_channel_pipeline_runs():
    images = _smooth_images(32, 8, channels=1)
    params = AugmentParams(jitter_p=1.0, grayscale_p=1.0, blur_p=1.0)
    v1, v2_ = BatchedTwoView(params, 16, DIGITS)(images)
    assert v1.shape == (32, 1, 16, 16) and torch.isfinite(v1).all()
    p1, p2 = PerImageTwoView(AugmentParams(), 16, DIGITS)(images[0])
    assert p1.shape == (1, 16, 16) and p1.dtype == torch.float32


# --------------------------------------------------------------------------- ops vs torchvision


def test_crop_boxes_follow_torchvision_distribution():
    torch.manual_seed(0)
    n, height, width = 4000, 32, 48
    boxes = sample_crop_boxes(n, height, width, (0.08, 1.0), (3 / 4, 4 / 3))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    assert (boxes == boxes.round()).all() and (h > 0).all() and (w > 0).all()
    ref = v2.RandomResizedCrop(8, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    dummy = torch.zeros(3, height, width)
    draws = [ref.make_params([dummy]) for _ in range(n)]
    areas = torch.tensor([d["height"] * d["width"] for d in draws], dtype=torch.float)
    assert abs((h * w).mean() - areas.mean()) / areas.mean() < 0.05
    assert abs((h * w).std() - areas.std()) / areas.std() < 0.08
    # Impossible constraints fall back to the central crop with a clamped ratio.
    fallback = sample_crop_boxes(5, 10, 40, (1.0, 1.0), (1.0, 1.0))
    assert fallback.tolist() == [[0.0, 15.0, 10.0, 10.0]] * 5


def test_resized_crop_matches_torchvision_when_upscaling():
    images = _smooth_images(3, 12).float() / 255
    boxes = torch.tensor([[0.0, 0.0, 12.0, 12.0], [2.0, 3.0, 6.0, 8.0], [5.0, 1.0, 7.0, 4.0]])
    flip = torch.tensor([False, True, False])
    out = resized_crop(images, boxes, 16, flip)
    for i, (top, left, h, w) in enumerate(boxes.int().tolist()):
        ref = TF.resized_crop(images[i], top, left, h, w, [16, 16], antialias=False)
        ref = ref.flip(-1) if flip[i] else ref
        assert torch.allclose(out[i], ref, atol=1e-5)


def test_resized_crop_antialiases_when_shrinking():
    checker = ((torch.arange(64).view(1, -1) + torch.arange(64).view(-1, 1)) % 2).float()
    images = checker.expand(2, 3, 64, 64)
    out = resized_crop(images, torch.tensor([[0.0, 0.0, 64.0, 64.0]] * 2), 8)
    # torchvision's antialiased filter: the checkerboard averages out (plain bilinear gives 0 / 1),
    # up to the filter's one-sided support at the corners
    assert torch.allclose(out, TF.resize(images, [8, 8], antialias=True), atol=1e-5)
    assert torch.allclose(out, torch.full_like(out, 0.5), atol=1e-3)
    assert torch.allclose(out[..., 2:6, 2:6], torch.full_like(out[..., 2:6, 2:6], 0.5), atol=1e-6)


def test_colour_ops_match_torchvision():
    images = _smooth_images(5, 8).float() / 255
    factors = torch.tensor([0.6, 1.0, 1.3, 0.2, 1.4])
    hues = torch.tensor([-0.5, -0.1, 0.0, 0.25, 0.45])
    ours = {
        "brightness": adjust_brightness(images.clone(), factors),
        "contrast": adjust_contrast(images.clone(), factors),
        "saturation": adjust_saturation(images.clone(), factors),
        "hue": adjust_hue(images.clone(), hues),
    }
    for i in range(5):
        img, f, h = images[i], float(factors[i]), float(hues[i])
        assert torch.allclose(ours["brightness"][i], TF.adjust_brightness(img, f), atol=1e-6)
        assert torch.allclose(ours["contrast"][i], TF.adjust_contrast(img, f), atol=1e-5)
        assert torch.allclose(ours["saturation"][i], TF.adjust_saturation(img, f), atol=1e-5)
        assert torch.allclose(ours["hue"][i], TF.adjust_hue(img, h), atol=1e-5)
    gray = images[:, :1].expand(-1, 3, -1, -1)
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(images)), images, atol=1e-6)
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(gray)), gray, atol=1e-6)


def test_rotate_matches_torchvision():
    """Per-sample angles, both signs, on a non-square image (the grid's aspect correction)."""
    images = _smooth_images(4, 20, channels=2)[..., 4:16, :]  # (4, 2, 12, 20)
    images = images.float() / 255
    degrees = torch.tensor([12.0, -35.0, 90.0, 170.0])
    out = rotate(images, degrees)
    for i in range(4):
        ref = TF.rotate(images[i], float(degrees[i]), interpolation=v2.InterpolationMode.BILINEAR)
        assert torch.allclose(out[i], ref, atol=1e-5)
    assert not torch.allclose(out[0], rotate(images[:1], -degrees[:1])[0], atol=1e-2)


def test_blur_matches_torchvision():
    images = _smooth_images(3, 16).float() / 255
    sigma = torch.tensor([0.3, 1.0, 2.0])
    out = gaussian_blur(images, sigma, 5)
    for i in range(3):
        ref = TF.gaussian_blur(images[i], [5, 5], [float(sigma[i])] * 2)
        assert torch.allclose(out[i], ref, atol=1e-5)


# --------------------------------------------------------------------------- batched == per-image in distribution


def test_batched_and_per_image_have_matching_moments():
    """Same data, same params: per-channel mean / std, the spread of per-image means
    and stds (sensitive to crop and jitter) and the mean chroma (sensitive to
    grayscale and saturation) agree between the two implementations."""
    params = AugmentParams(blur_p=0.5, crop_scale=(0.08, 1.0))
    images = _smooth_images(400, 16, seed=1)
    mean, std = torch.tensor(CIFAR.mean).view(1, 3, 1, 1), torch.tensor(CIFAR.std).view(1, 3, 1, 1)
    torch.manual_seed(0)
    batched = torch.cat(BatchedTwoView(params, 16, CIFAR)(images))
    per_image = PerImageTwoView(params, 16, CIFAR)
    single = torch.stack([v for img in images for v in per_image(img)])
    clean = eval_transform(images, 16, CIFAR)

    def moments(x: torch.Tensor) -> torch.Tensor:
        per_img_mean, per_img_std = x.mean(dim=(2, 3)), x.std(dim=(2, 3))
        return torch.cat([x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)), per_img_mean.std(0), per_img_std.mean(0)])

    def chroma(x: torch.Tensor) -> float:
        return float((x * std + mean).std(dim=1).mean())

    m_batched, m_single, m_clean = moments(batched), moments(single), moments(clean)
    assert (m_batched - m_single).abs().max() < 0.1, (m_batched, m_single)
    assert abs(chroma(batched) / chroma(single) - 1) < 0.12
    # ...and the statistics can tell augmented from un-augmented data.
    assert (m_clean - m_single).abs().max() > 0.2
    assert abs(chroma(clean) / chroma(single) - 1) > 0.2


def test_batched_and_per_image_rotate_alike():
    """On white images every view's mean is the share the rotation keeps in the frame, a
    function of |angle|: its mean and spread over many views must agree between the two
    implementations, and tell 30 degrees from 20 and from no rotation."""
    images = torch.full((400, 1, 8, 8), 255, dtype=torch.uint8)

    def kept(params: AugmentParams, batched: bool) -> torch.Tensor:
        torch.manual_seed(0)
        if batched:
            views = torch.cat(BatchedTwoView(params, 16, DIGITS)(images))
        else:
            per_image = PerImageTwoView(params, 16, DIGITS)
            views = torch.stack([v for img in images for v in per_image(img)])
        return (views * DIGITS.std[0] + DIGITS.mean[0]).mean(dim=(1, 2, 3))

    rot30 = AugmentParams(**dict(IDENTITY, rotation=30.0))
    batched, single = kept(rot30, True), kept(rot30, False)
    assert abs(float(batched.mean() - single.mean())) < 0.01
    assert abs(float(batched.std() / single.std()) - 1) < 0.15
    rot20 = kept(AugmentParams(**dict(IDENTITY, rotation=20.0)), True)
    assert float(rot20.mean() - single.mean()) > 0.02
    assert torch.allclose(kept(AugmentParams(**IDENTITY), True), torch.ones(800), atol=1e-5)


# --------------------------------------------------------------------------- PICI's views: solarize, PIL's blur


def _pil_apply(images: torch.Tensor, op) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` -> ``op`` on each image as a PIL image, back as float grey levels."""
    from PIL import Image

    out = []
    for image in images:
        array = image.permute(1, 2, 0).numpy()
        result = np.asarray(op(Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)), dtype=np.float32)
        out.append(torch.from_numpy(result.reshape(array.shape)).permute(2, 0, 1))
    return torch.stack(out)


def _pil_solarize(images: torch.Tensor) -> torch.Tensor:
    from PIL import ImageOps

    return _pil_apply(images, ImageOps.solarize)  # default threshold 128: v >= 128 -> 255 - v


def _undo_normalise(x: torch.Tensor, info) -> torch.Tensor:
    c = len(info.mean)
    return x * torch.tensor(info.std).view(-1, c, 1, 1) + torch.tensor(info.mean).view(-1, c, 1, 1)


ALL_LEVELS = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)  # every uint8 grey level once


def test_solarize_matches_torchvision_per_image():
    """A batch whose samples differ in the apply decision: solarized samples equal torchvision's
    functional solarize (threshold 0.5 on the float image), the others are untouched."""
    images = _smooth_images(24, 12).float() / 255
    aug = BatchedTwoView(AugmentParams(**IDENTITY, solarize_p=0.5), 12, CIFAR)
    torch.manual_seed(0)
    drawn = aug.sample(*images.shape)
    assert drawn.solarize is not None and 0 < int(drawn.solarize.sum()) < len(images)
    out = aug.apply(images.clone(), drawn)
    for i in range(len(images)):
        ref = TF.solarize(images[i], 0.5) if drawn.solarize[i] else images[i]
        assert float((out[i] - ref).abs().max()) < 1e-4, i
    assert float((out - images).abs().amax(dim=(1, 2, 3))[drawn.solarize].min()) > 0.1  # it did something
    # the per-image pipeline's step: torchvision's RandomSolarize, the same threshold and rate
    (step,) = [t for t in PerImageTwoView(aug.params, 12, CIFAR).transform.transforms
               if isinstance(t, v2.RandomSolarize)]
    assert step.threshold == 0.5 and step.p == 0.5
    default_steps = PerImageTwoView(AugmentParams(), 12, CIFAR).transform.transforms
    assert not any(isinstance(t, v2.RandomSolarize) for t in default_steps)  # solarize_p 0: no step
    assert BatchedTwoView(AugmentParams(), 12, CIFAR).sample(4, 3, 12, 12).solarize is None


def test_solarize_equals_pil_image_ops():
    """PIL's ImageOps.solarize (the official PICI code's Solarize): on every uint8 level, both
    pipelines (uint8 -> float / 255 -> solarize -> x 255) equal it up to float rounding (1e-3 grey
    levels).  Between levels (the float blur's output; the official code blurs in uint8 and rounds),
    the float op on x is within half a grey level of PIL's on round(255 x): threshold 0.5 inverts
    exactly the values that round to 128 or more."""
    ref = _pil_solarize(ALL_LEVELS)
    assert ref.flatten()[127] == 127 and ref.flatten()[128] == 127 and ref.flatten()[255] == 0
    assert float((solarize(ALL_LEVELS.float() / 255) * 255 - ref).abs().max()) < 1e-3
    params = AugmentParams(**IDENTITY, solarize_p=1.0)
    batched, _ = BatchedTwoView(params, 16, DIGITS)(ALL_LEVELS)
    per_image, _ = PerImageTwoView(params, 16, DIGITS)(ALL_LEVELS[0])
    for out in (batched, per_image[None]):
        assert float((_undo_normalise(out, DIGITS) * 255 - ref).abs().max()) < 1e-3
    # RGB, through both pipelines: per channel
    rgb = _smooth_images(4, 16)
    ref_rgb = _pil_solarize(rgb)
    batched, _ = BatchedTwoView(params, 16, CIFAR)(rgb)
    per_image = torch.stack([PerImageTwoView(params, 16, CIFAR)(img)[0] for img in rgb])
    for out in (batched, per_image):
        assert float((_undo_normalise(out, CIFAR) * 255 - ref_rgb).abs().max()) < 1e-3
    # between the levels
    x = torch.linspace(0.0, 1.0, 64 * 64).view(1, 1, 64, 64)
    ref_between = _pil_solarize((x * 255).round().to(torch.uint8))
    assert float((solarize(x) * 255 - ref_between).abs().max()) <= 0.5 + 1e-3


def _upscaled_digits(n: int = 64, size: int = 32) -> torch.Tensor:
    """uint8 ``(n, 1, size, size)``: scikit-learn's 8 x 8 digits, bilinearly upscaled."""
    from sklearn.datasets import load_digits

    digits = torch.tensor(load_digits().images[:n] / 16.0, dtype=torch.float32)[:, None]
    up = F.interpolate(digits, size=(size, size), mode="bilinear", align_corners=False)
    return (up.clamp(0, 1) * 255).round().to(torch.uint8)


PIL_BLUR_TOL = 1.0  # mean |batched - PIL| in grey levels


def test_blur_kernel_13_matches_pil_gaussian_blur_at_32px():
    """PIL's ``GaussianBlur(radius=sigma)`` (the official PICI blur; no kernel cut-off) on 32 px
    digits: the batched blur with ``blur_kernel: 13`` is within PIL_BLUR_TOL grey levels on average for
    every sigma of PICI's range (reflect padding against PIL's edge replication is most of what
    is left, near the border); today's 3-tap kernel (the 10% rule at 32 px) is not for sigma >= 1."""
    from PIL import ImageFilter

    images = _upscaled_digits()
    n = len(images)
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0]]).expand(n, 4)
    errors: dict[tuple[int, float], float] = {}
    for kernel in (13, 3):
        aug = BatchedTwoView(AugmentParams(**IDENTITY, blur_p=1.0, blur_kernel=kernel), 32, DIGITS)
        assert aug.kernel_size == kernel
        for sigma in (0.1, 0.5, 1.0, 1.5, 2.0):
            drawn = ViewParams(boxes, blur=torch.ones(n, dtype=torch.bool), sigma=torch.full((n,), sigma))
            ours = aug.apply(images.float() / 255, drawn) * 255
            ref = _pil_apply(images, lambda im, s=sigma: im.filter(ImageFilter.GaussianBlur(radius=s)))
            errors[kernel, sigma] = float((ours - ref).abs().mean())
    assert all(errors[13, s] < PIL_BLUR_TOL for s in (0.1, 0.5, 1.0, 1.5, 2.0)), errors
    assert all(errors[3, s] > PIL_BLUR_TOL for s in (1.0, 1.5, 2.0)), errors
    assert errors[3, 2.0] > 5 * PIL_BLUR_TOL, errors  # much weaker at the top of the range
