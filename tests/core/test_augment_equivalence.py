"""The batched augmentation against torchvision, operation by operation and sampler by sampler.

* Operations: for the same per-sample parameters, every batched op (and a whole view,
  :meth:`BatchedTwoView.apply`) equals torchvision's ``transforms.v2.functional`` op applied
  image by image, within 1e-4.  Batches mix parameters (shrinking and enlarging crops, both
  flip states, several angles, factors and jitter orders), so a parameter applied to the
  wrong sample fails.
* Samplers: the parameters :meth:`BatchedTwoView.sample` draws follow torchvision's own
  samplers (``RandomResizedCrop.make_params``, ``ColorJitter.make_params`` with its
  ``randperm(4)`` order, the apply draws of ``RandomApply`` / ``RandomGrayscale`` /
  ``RandomHorizontalFlip`` / ``RandomSolarize``, ``RandomRotation`` and ``GaussianBlur``):
  two-sample KS and chi-square tests over 20,000 seeded draws of each side.
* Power: planted defects (a fixed jitter order, jitter factors shifted by one sample, a crop
  sampler without torchvision's rejection loop, solarize on every sample, solarize at the wrong
  threshold) are monkeypatched into the module and the checks above must report them.
"""

from __future__ import annotations

import copy
import functools
import math

import attrs
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from clusterkit.data import DATASETS, AugmentParams, BatchedTwoView, PerImageTwoView, augment
from clusterkit.data.augment import (
    ViewParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    resized_crop,
    rgb_to_grayscale,
    rotate,
    solarize,
)

CIFAR = DATASETS["cifar10"]
DIGITS = DATASETS["digits"]
ATOL = 1e-4  # op equivalence: float rounding differs between the kernels, not more
# Sampler tests: every p-value of a correct sampler must stay above ALPHA.  Under the null the
# chance that one of the 16 falls below is 1.6e-5 (the seeded draws give at least 3e-3); the
# planted defects give 1e-24 or less.
ALPHA = 1e-6
N_DRAWS = 20_000
HEIGHT, WIDTH = 24, 20  # non-square: a swapped axis fails
BILINEAR = v2.InterpolationMode.BILINEAR
TF_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int, channels: int = 3, height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    """float (n, C, H, W) in [0, 1], quantised to uint8 levels: smooth colour layouts plus
    strong pixel noise (fine detail, so that resampling and antialiasing differences show)."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(n, channels, 4, 4, generator=g), size=(height, width), mode="bilinear")
    x = coarse + 0.25 * torch.randn(n, channels, height, width, generator=g)
    return (x.clamp(0, 1) * 255).round() / 255


# --------------------------------------------------------------------------- torchvision reference


def reference_view(image: torch.Tensor, p: ViewParams, i: int, size: int, kernel_size: int) -> torch.Tensor:
    """Sample ``i``'s view made by torchvision's functional ops, image by image, in the order
    of the per-image pipeline (PerImageTwoView), with the parameters the batched path drew."""
    top, left, h, w = (int(v) for v in p.boxes[i].tolist())
    x = TF.resized_crop(image, top, left, h, w, [size, size], interpolation=BILINEAR, antialias=True)
    if p.flip is not None and p.flip[i]:
        x = TF.horizontal_flip(x)
    if p.degrees is not None:
        x = TF.rotate(x, float(p.degrees[i]), interpolation=BILINEAR)  # fill None, as the pipeline
    if p.jitter is not None and p.jitter[i]:
        factors = (p.brightness, p.contrast, p.saturation, p.hue)
        for op_id in p.order[i].tolist():
            if factors[op_id] is not None:
                x = TF_JITTER[op_id](x, float(factors[op_id][i]))
    if p.grayscale is not None and p.grayscale[i]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur is not None and p.blur[i]:
        sigma = float(p.sigma[i])
        x = TF.gaussian_blur(x, [kernel_size, kernel_size], [sigma, sigma])
    if p.solarize is not None and p.solarize[i]:
        x = TF.solarize(x, 0.5)  # the per-image pipeline's RandomSolarize threshold
    return x


def view_error(aug: BatchedTwoView, images: torch.Tensor, params: ViewParams) -> float:
    """Largest absolute difference between the batched view and torchvision's, image by image."""
    out = aug.apply(images.clone(), params)
    ref = torch.stack(
        [reference_view(img, params, i, aug.image_size, aug.kernel_size) for i, img in enumerate(images)]
    )
    assert out.shape == ref.shape
    return float((out - ref).abs().max())


# Configurations of the whole-view check: output size (shrinking and enlarging crops of the
# 24 x 20 image in one batch at 16; every crop shrinks at 8, enlarges at 32), channels.
VIEW_CASES = {
    "rgb16": (AugmentParams(rotation=25.0, blur_p=0.5, jitter_p=0.9, grayscale_p=0.3, solarize_p=0.5), 16, CIFAR),
    "rgb8": (AugmentParams(blur_p=0.5, jitter=(0.8, 0.8, 0.8, 0.4), crop_scale=(0.2, 1.0)), 8, CIFAR),
    "rgb32": (AugmentParams(rotation=10.0, blur_p=0.5, crop_ratio=(0.5, 2.0), blur_kernel=13), 32, CIFAR),
    "gray16": (AugmentParams(rotation=15.0, blur_p=0.5, jitter_p=0.9, solarize_p=0.5), 16, DIGITS),
}


def _view_case(name: str, n: int = 48) -> tuple[BatchedTwoView, torch.Tensor, ViewParams]:
    params, size, info = VIEW_CASES[name]
    images = _images(n, channels=info.channels, seed=1)
    aug = BatchedTwoView(params, size, info)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        drawn = aug.sample(*images.shape)
    return aug, images, drawn


# --------------------------------------------------------------------------- a) operations


def test_resized_crop_matches_torchvision_antialiased():
    """Per-sample boxes that shrink (by up to 3x) and enlarge in the same batch, both flip
    states, on a non-square image: torchvision's resized_crop with antialias=True."""
    images = _images(8)
    boxes = torch.tensor(
        [[0, 0, 24, 20], [2, 3, 10, 12], [5, 1, 18, 16], [0, 4, 24, 16], [3, 3, 4, 5], [1, 0, 20, 20],
         [20, 15, 4, 5], [7, 2, 9, 17]],
        dtype=torch.float32,
    )
    flip = torch.tensor([False, True, True, False, False, True, False, True])
    for size in (8, 12, 16, 32):
        out = resized_crop(images, boxes, size, flip)
        for i, (top, left, h, w) in enumerate(boxes.int().tolist()):
            ref = TF.resized_crop(images[i], top, left, h, w, [size, size], interpolation=BILINEAR, antialias=True)
            ref = TF.horizontal_flip(ref) if flip[i] else ref
            err = float((out[i] - ref).abs().max())
            assert err < ATOL, (size, i, err)


def test_rotate_matches_torchvision():
    images = _images(6, channels=2)
    degrees = torch.tensor([0.0, 12.5, -35.0, 90.0, 170.0, -179.0])
    out = rotate(images, degrees)
    for i in range(6):
        ref = TF.rotate(images[i], float(degrees[i]), interpolation=BILINEAR)
        assert float((out[i] - ref).abs().max()) < ATOL, i


@pytest.mark.parametrize(
    "op, ref, factors",
    [
        (adjust_brightness, TF.adjust_brightness, [0.6, 1.0, 1.4, 0.0, 2.0, 0.75]),
        (adjust_contrast, TF.adjust_contrast, [0.6, 1.0, 1.4, 0.0, 2.0, 0.75]),
        (adjust_saturation, TF.adjust_saturation, [0.6, 1.0, 1.4, 0.0, 2.0, 0.75]),
        (adjust_hue, TF.adjust_hue, [-0.5, -0.1, 0.0, 0.05, 0.25, 0.45]),
    ],
    ids=["brightness", "contrast", "saturation", "hue"],
)
def test_colour_op_matches_torchvision(op, ref, factors):
    images = _images(6)
    f = torch.tensor(factors)
    out = op(images.clone(), f)
    for i in range(6):
        assert float((out[i] - ref(images[i], factors[i])).abs().max()) < ATOL, i
    if op not in (adjust_brightness, adjust_contrast):  # the ops that also run on one channel
        return
    gray = _images(6, channels=1)
    out = op(gray.clone(), f)
    for i in range(6):
        assert float((out[i] - ref(gray[i], factors[i])).abs().max()) < ATOL, i


def test_grayscale_matches_torchvision():
    images = _images(4)
    out = rgb_to_grayscale(images).expand_as(images)
    for i in range(4):
        assert float((out[i] - TF.rgb_to_grayscale(images[i], num_output_channels=3)).abs().max()) < ATOL


@pytest.mark.parametrize("kernel_size", [3, 5, 13])
def test_blur_matches_torchvision(kernel_size):
    images = _images(5)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    out = gaussian_blur(images, sigma, kernel_size)
    for i in range(5):
        ref = TF.gaussian_blur(images[i], [kernel_size, kernel_size], [float(sigma[i])] * 2)
        assert float((out[i] - ref).abs().max()) < ATOL, i


def test_solarize_matches_torchvision():
    images = _images(4)
    out = solarize(images)
    for i in range(4):
        assert float((out[i] - TF.solarize(images[i], 0.5)).abs().max()) < ATOL
    gray = _images(4, channels=1)
    assert float((solarize(gray) - torch.stack([TF.solarize(g, 0.5) for g in gray])).abs().max()) < ATOL


def test_colour_jitter_order_matches_torchvision():
    """Every one of the 24 orders, each sample with its own factors."""
    import itertools

    orders = torch.tensor(list(itertools.permutations(range(4))))
    n = len(orders)
    images = _images(n, seed=2)
    g = torch.Generator().manual_seed(0)
    factors = [0.4 + 1.2 * torch.rand(n, generator=g) for _ in range(3)] + [torch.rand(n, generator=g) - 0.5]
    apply = torch.ones(n, dtype=torch.bool)
    apply[::5] = False
    out = images.clone()
    augment.color_jitter(out, apply, orders, factors)
    for i in range(n):
        ref = images[i]
        if apply[i]:
            for op_id in orders[i].tolist():
                ref = TF_JITTER[op_id](ref, float(factors[op_id][i]))
        assert float((out[i] - ref).abs().max()) < ATOL, (i, orders[i].tolist())


@pytest.mark.parametrize("case", list(VIEW_CASES))
def test_view_matches_torchvision_image_by_image(case):
    """A whole view with the parameters the batched sampler drew equals torchvision's
    functional ops applied image by image with the same parameters."""
    aug, images, drawn = _view_case(case)
    if drawn.jitter is not None:  # the draw exercises what it should
        assert 0 < int(drawn.jitter.sum()) < len(images) and len({tuple(o) for o in drawn.order.tolist()}) > 10
    if drawn.solarize is not None:
        assert 0 < int(drawn.solarize.sum()) < len(images)
    assert view_error(aug, images, drawn) < ATOL


def test_view_is_sample_then_apply():
    """view() draws with sample() and transforms with apply() (so the checks above cover it)."""
    aug, images, _ = _view_case("rgb16", n=8)
    torch.manual_seed(11)
    out = aug.view(images)
    torch.manual_seed(11)
    drawn = aug.sample(*images.shape)
    ref = torch.stack([reference_view(img, drawn, i, 16, aug.kernel_size) for i, img in enumerate(images)])
    mean, std = torch.tensor(CIFAR.mean).view(1, 3, 1, 1), torch.tensor(CIFAR.std).view(1, 3, 1, 1)
    assert float((out - (ref - mean) / std).abs().max()) < ATOL / min(CIFAR.std)


# --------------------------------------------------------------------------- b) samplers


SAMPLER_PARAMS = AugmentParams(rotation=30.0, blur_p=0.5, solarize_p=0.2)  # the defaults, plus rotation, blur, solarize


@functools.lru_cache(maxsize=None)
def torchvision_draws(seed: int = 0, n: int = N_DRAWS) -> dict:
    """``n`` draws of every random parameter of the per-image pipeline (PerImageTwoView's
    transforms.v2 objects), each from torchvision's own sampler, on a 3 x 24 x 20 image."""
    pipeline = PerImageTwoView(SAMPLER_PARAMS, 16, CIFAR).transform.transforms
    step = {type(t).__name__: t for t in pipeline}
    rrc, flip, rotation, gray, solar = (step[k] for k in ("RandomResizedCrop", "RandomHorizontalFlip",
                                                          "RandomRotation", "RandomGrayscale", "RandomSolarize"))
    jitter_apply, blur_apply = (t for t in pipeline if isinstance(t, v2.RandomApply))
    (jitter,), (blur,) = jitter_apply.transforms, blur_apply.transforms
    image = torch.zeros(3, HEIGHT, WIDTH)
    tiny = torch.zeros(1, 1, 1)

    def applied(t) -> list[bool]:
        """Whether a random-apply transform fires, through its own forward (its inner
        transform swapped for a recorder)."""
        t, fired = copy.deepcopy(t), []
        if isinstance(t, v2.RandomApply):
            t.transforms = [lambda x: fired.append(True) or x]
        else:
            t.transform = lambda x, params: fired.append(True) or x
        out = []
        for _ in range(n):
            before = len(fired)
            t(tiny)
            out.append(len(fired) > before)
        return out

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        crops = [rrc.make_params([image]) for _ in range(n)]
        colour = [jitter.make_params([image]) for _ in range(n)]
        draws = {
            "boxes": torch.tensor([[c["top"], c["left"], c["height"], c["width"]] for c in crops], dtype=torch.float),
            "flip": torch.tensor(applied(flip)),
            "degrees": torch.tensor([rotation.make_params([image])["angle"] for _ in range(n)]),
            "jitter": torch.tensor(applied(jitter_apply)),
            "order": torch.stack([c["fn_idx"] for c in colour]),
            "grayscale": torch.tensor(applied(gray)),
            "blur": torch.tensor(applied(blur_apply)),
            "sigma": torch.tensor([blur.make_params([image])["sigma"][0] for _ in range(n)]),
            "solarize": torch.tensor(applied(solar)),
        }
        for name in ("brightness", "contrast", "saturation", "hue"):
            draws[name] = torch.tensor([c[f"{name}_factor"] for c in colour])
    return draws


def batched_draws(params: AugmentParams = SAMPLER_PARAMS, n: int = N_DRAWS, seed: int = 1) -> dict:
    aug = BatchedTwoView(params, 16, CIFAR)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        drawn = aug.sample(n, 3, HEIGHT, WIDTH)
    return attrs.asdict(drawn, recurse=False)


def _crop_stats(boxes: torch.Tensor) -> dict[str, np.ndarray]:
    top, left, h, w = boxes.double().T
    return {
        "crop area": (h * w / (HEIGHT * WIDTH)).numpy(),
        "crop aspect": (w / h).numpy(),
        "crop top": ((top + 0.5) / (HEIGHT - h + 1)).numpy(),  # uniform on (0, 1) given h
        "crop left": ((left + 0.5) / (WIDTH - w + 1)).numpy(),
    }


def _order_counts(order: torch.Tensor) -> np.ndarray:
    code = (order * torch.tensor([64, 16, 4, 1])).sum(dim=1)  # base-4 code of each permutation
    return np.array([int((code == c).sum()) for c in sorted(set(code.tolist()))])


def sampler_pvalues(ours: dict, ref: dict) -> dict[str, float]:
    """Two-sample p-values, one per parameter: KS for continuous parameters and the crop's
    area, aspect ratio and normalised position; chi-square for the 24 jitter orders and the
    apply rates."""
    p = {}
    for name, (a, b) in {**{k: (v, _crop_stats(ref["boxes"])[k]) for k, v in _crop_stats(ours["boxes"]).items()},
                         **{k: (ours[k].numpy(), ref[k].numpy())
                            for k in ("degrees", "brightness", "contrast", "saturation", "hue", "sigma")}}.items():
        p[name] = stats.ks_2samp(a, b).pvalue
    ours_orders, ref_orders = _order_counts(ours["order"]), _order_counts(ref["order"])
    if len(ours_orders) != 24 or len(ref_orders) != 24:
        p["jitter order"] = 0.0  # some order never drawn
    else:
        p["jitter order"] = stats.chi2_contingency(np.stack([ours_orders, ref_orders])).pvalue
    for name in ("flip", "jitter", "grayscale", "blur", "solarize"):
        table = [[int(x.sum()), int((~x).sum())] for x in (ours[name], ref[name])]
        p[f"{name} rate"] = stats.chi2_contingency(table).pvalue
    return p


def test_sampler_matches_torchvision():
    p = sampler_pvalues(batched_draws(), torchvision_draws())
    assert len(p) == 16
    failed = {k: v for k, v in p.items() if v < ALPHA}
    assert not failed, failed


def test_sampler_test_tells_distributions_apart():
    """Sanity of the statistics: two halves of torchvision's draws pass; against torchvision with
    another setting (crop scale 0.2-1, jitter 0.5, hue 0.12, p 0.75 / 0.25 / 0.45 / 0.25, sigma to
    2.2) every parameter whose setting changed fails."""
    other = AugmentParams(crop_scale=(0.2, 1.0), jitter=(0.5, 0.5, 0.5, 0.12), jitter_p=0.75,
                          grayscale_p=0.25, blur_p=0.45, blur_sigma=(0.1, 2.2), rotation=30.0, solarize_p=0.25)
    p_other = sampler_pvalues(batched_draws(other), torchvision_draws())
    changed = ["crop area", "brightness", "contrast", "saturation", "hue", "sigma", "jitter rate",
               "grayscale rate", "blur rate", "solarize rate"]
    assert all(p_other[k] < ALPHA for k in changed), {k: p_other[k] for k in changed}
    ref = torchvision_draws()
    halves = [{k: v[s] for k, v in ref.items()} for s in (slice(0, N_DRAWS // 2), slice(N_DRAWS // 2, None))]
    p_same = sampler_pvalues(*halves)
    assert min(p_same.values()) > ALPHA, p_same


# --------------------------------------------------------------------------- c) planted defects


def _crop_without_rejection(n, height, width, scale, ratio, tries=10):
    """Defect: one (area, ratio) draw, clamped into the image, no rejection loop."""
    target = height * width * torch.empty(n).uniform_(*scale)
    aspect = torch.exp(torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    w = torch.round(torch.sqrt(target * aspect)).clamp(1, width)
    h = torch.round(torch.sqrt(target / aspect)).clamp(1, height)
    top = torch.floor(torch.rand(n) * (height - h + 1))
    left = torch.floor(torch.rand(n) * (width - w + 1))
    return torch.stack([top, left, h, w], dim=1)


def test_planted_crop_without_rejection_is_caught(monkeypatch):
    monkeypatch.setattr(augment, "sample_crop_boxes", _crop_without_rejection)
    p = sampler_pvalues(batched_draws(), torchvision_draws())
    assert p["crop aspect"] < 1e-10 and p["crop area"] < ALPHA, p


def test_planted_fixed_jitter_order_is_caught(monkeypatch):
    original = BatchedTwoView.sample

    def fixed_order(self, n, channels, height, width):
        drawn = original(self, n, channels, height, width)
        return attrs.evolve(drawn, order=torch.arange(4).repeat(n, 1))

    monkeypatch.setattr(BatchedTwoView, "sample", fixed_order)
    p = sampler_pvalues(batched_draws(), torchvision_draws())
    assert p["jitter order"] < 1e-10, p
    assert view_error(*_view_case("rgb16")) < ATOL  # the ops follow the (fixed) order they are given


def test_planted_jitter_ignoring_its_order_is_caught(monkeypatch):
    original = augment.color_jitter
    monkeypatch.setattr(augment, "color_jitter",
                        lambda x, apply, order, factors: original(x, apply, torch.arange(4).expand_as(order), factors))
    assert view_error(*_view_case("rgb16")) > 100 * ATOL
    p = sampler_pvalues(batched_draws(), torchvision_draws())
    assert min(p.values()) > ALPHA  # the draws are right: only the op check can see this one


def test_planted_factors_shifted_by_one_sample_are_caught(monkeypatch):
    original = augment.color_jitter

    def rolled(x, apply, order, factors):
        return original(x, apply, order, [None if f is None else f.roll(1) for f in factors])

    monkeypatch.setattr(augment, "color_jitter", rolled)
    for case in ("rgb16", "gray16"):
        assert view_error(*_view_case(case)) > 100 * ATOL, case


def test_planted_solarize_on_every_sample_is_caught(monkeypatch):
    """The sampler marks every sample for solarizing: the rate test fails; the ops still follow
    the decisions they are given."""
    original = BatchedTwoView.sample

    def always(self, n, channels, height, width):
        drawn = original(self, n, channels, height, width)
        return drawn if drawn.solarize is None else attrs.evolve(drawn, solarize=torch.ones(n, dtype=torch.bool))

    monkeypatch.setattr(BatchedTwoView, "sample", always)
    p = sampler_pvalues(batched_draws(), torchvision_draws())
    assert p["solarize rate"] < 1e-10, p
    assert view_error(*_view_case("rgb16")) < ATOL


def test_planted_solarize_ignoring_its_decision_is_caught(monkeypatch):
    """apply() solarizes every sample whatever was drawn: only the op check can see it."""
    original = BatchedTwoView.apply

    def everywhere(self, images, params):
        if params.solarize is not None:
            params = attrs.evolve(params, solarize=torch.ones_like(params.solarize))
        return original(self, images, params)

    monkeypatch.setattr(BatchedTwoView, "apply", everywhere)
    for case in ("rgb16", "gray16"):
        assert view_error(*_view_case(case)) > 100 * ATOL, case
    p = sampler_pvalues(batched_draws(), torchvision_draws())
    assert min(p.values()) > ALPHA


@pytest.mark.parametrize("threshold", [128 / 255, 0.6, 0.0])
def test_planted_solarize_threshold_off_is_caught(monkeypatch, threshold):
    """The op at another threshold fails the whole-view check: 128 / 255 (PIL's uint8 threshold
    without the rounding, off by half a level: errors of about 0.004), 0.6, 0.0 (inverts everything)."""
    monkeypatch.setattr(augment, "solarize", lambda images: solarize(images, threshold))
    for case in ("rgb16", "gray16"):
        assert view_error(*_view_case(case)) > 10 * ATOL, (case, threshold)
