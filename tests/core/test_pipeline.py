"""Training pipelines (data.pipeline): batched on the device vs per-image in DataLoader workers.

tests/core/test_augment.py checks that the two augmentation implementations draw from the same
distribution; the tests here check the pipelines end to end, through their loaders: what
comes out of ``TrainPipeline.views``, which indices, which parameters for which view.
"""

from __future__ import annotations

import pickle
import typing
from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F

from clusterkit.data import DATASETS, AugmentParams, BatchedTwoView, ImageDataset, collate_batched, eval_transform
from clusterkit.data.pipeline import PIPELINES, TrainPipeline, TwoViewDataset, build_train_pipeline
from clusterkit.errors import RecipeError
from clusterkit.recipe import DataConfig, load_recipe

CIFAR = DATASETS["cifar10"]
SIZE = 16
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# identity crop, no flip, no colour: a view equals the resized, normalised image
IDENTITY = AugmentParams(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False, jitter_p=0.0,
                         grayscale_p=0.0)


@pytest.fixture(autouse=True)
def _one_thread(restore_threads):
    torch.set_num_threads(1)


def _dataset(n: int = 32, size: int = SIZE, seed: int = 0) -> ImageDataset:
    """A small CIFAR-like dataset: n smooth random colour images, uint8 (3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bilinear", align_corners=False)
    x = x + 0.05 * torch.randn(x.shape, generator=g)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageDataset("cifar10", "train", [str(c) for c in range(4)], torch.arange(n) % 4, CIFAR, images)


def _cfg(pipeline: str, **kw) -> DataConfig:
    kw.setdefault("image_size", SIZE)
    return DataConfig(pipeline=pipeline, **kw)


# --------------------------------------------------------------------------- shapes, indices, recipe


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pipeline", PIPELINES)
def test_views_shape_dtype_device_and_indices(pipeline, device):
    ds = _dataset(n=40)
    pipe = build_train_pipeline(ds, _cfg(pipeline, image_size=12, drop_last=True), batch_size=16,
                                device=device, generator=torch.Generator().manual_seed(0))
    assert isinstance(pipe, TrainPipeline) and pipe.kind == pipeline
    assert isinstance(pipe.loader, torch.utils.data.DataLoader)
    assert pipe.loader.pin_memory == (device == "cuda")
    assert (pipe.augment is not None) == (pipeline == "batched")
    assert len(pipe.loader) == 2  # 40 // 16 with drop_last
    seen = []
    for batch in pipe.loader:
        views, index = pipe.views(batch)
        assert isinstance(views, list) and len(views) == 2
        for v in views:
            assert v.shape == (16, 3, 12, 12) and v.dtype == torch.float32 and v.device.type == device
            assert torch.isfinite(v).all()
        assert not torch.equal(views[0], views[1])
        assert index.dtype == torch.long and index.shape == (16,) and index.device.type == device
        seen += index.tolist()
    assert len(set(seen)) == 32 and all(0 <= i < 40 for i in seen)


def test_batched_is_the_trainer_path_bit_for_bit():
    """The batched pipeline = the trainer's former inline code: a DataLoader with
    collate_batched and one BatchedTwoView over the uint8 batch, same draws."""
    ds = _dataset(n=24)
    cfg = _cfg("batched", augment=AugmentParams(blur_p=0.5), augment_second=AugmentParams(crop_scale=(0.5, 1.0)))
    gen = torch.Generator()
    pipe = build_train_pipeline(ds, cfg, batch_size=8, device="cpu", generator=gen)
    old_gen = torch.Generator()
    old_loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, drop_last=True, num_workers=0,
                                             collate_fn=collate_batched, generator=old_gen, pin_memory=False)
    old_augment = BatchedTwoView(cfg.augment, cfg.image_size, ds.info, second=cfg.augment_second)
    for seed in (0, 1):
        gen.manual_seed(seed)
        torch.manual_seed(10 + seed)
        new = [pipe.views(batch) for batch in pipe.loader]
        old_gen.manual_seed(seed)
        torch.manual_seed(10 + seed)
        old = [(list(old_augment(images)), index) for images, _, index in old_loader]
        assert len(new) == len(old) == 3
        for (nv, ni), (ov, oi) in zip(new, old, strict=True):
            assert torch.equal(ni, oi) and torch.equal(nv[0], ov[0]) and torch.equal(nv[1], ov[1])


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_second_view_takes_augment_second(pipeline):
    """With an identity augment_second, view 2 is exactly the resized, normalised image of
    the index it comes with (so indices match images), while view 1 is augmented; both
    views take augment when augment_second is null."""
    ds = _dataset(n=20)
    pipe = build_train_pipeline(ds, _cfg(pipeline, augment_second=IDENTITY, drop_last=False), batch_size=8,
                                device="cpu", generator=torch.Generator().manual_seed(0))
    n = 0
    for batch in pipe.loader:
        (v1, v2), index = pipe.views(batch)
        clean = eval_transform(ds.images[index], SIZE, CIFAR)
        assert torch.allclose(v2, clean, atol=1e-5)
        assert (v1 - clean).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every first view augmented
        n += len(index)
    assert n == 20
    pipe = build_train_pipeline(ds, _cfg(pipeline, augment=IDENTITY), batch_size=8, device="cpu")
    (v1, v2), index = pipe.views(next(iter(pipe.loader)))
    clean = eval_transform(ds.images[index], SIZE, CIFAR)
    assert torch.allclose(v1, clean, atol=1e-5) and torch.allclose(v2, clean, atol=1e-5)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_sampler_is_honoured(pipeline):
    ds = _dataset(n=40)
    allowed = [3, 5, 8, 13, 21, 34, 1, 2]
    sampler = torch.utils.data.SubsetRandomSampler(allowed, generator=torch.Generator().manual_seed(0))
    pipe = build_train_pipeline(ds, _cfg(pipeline, drop_last=False), batch_size=3, device="cpu", sampler=sampler)
    assert pipe.loader.sampler is sampler
    seen = [i for batch in pipe.loader for i in pipe.views(batch)[1].tolist()]
    assert sorted(seen) == sorted(allowed)


def test_per_image_workers_cover_the_epoch_and_repeat_with_the_generator():
    """Two worker processes: every image once per epoch, and reseeding the generator repeats
    the epoch's order and augmentation exactly (the workers' seeds come from it)."""
    ds = _dataset(n=24)
    gen = torch.Generator()
    pipe = build_train_pipeline(ds, _cfg("per_image", num_workers=2, drop_last=False), batch_size=5,
                                device="cpu", generator=gen)
    runs = []
    for _ in range(2):
        gen.manual_seed(7)
        runs.append([pipe.views(batch) for batch in pipe.loader])
    assert sorted(i for _, index in runs[0] for i in index.tolist()) == list(range(24))
    for (va, ia), (vb, ib) in zip(*runs, strict=True):
        assert torch.equal(ia, ib) and torch.equal(va[0], vb[0]) and torch.equal(va[1], vb[1])


def test_per_image_dataset_pickles_for_spawned_workers():
    ds = _dataset(n=6)
    pipe = build_train_pipeline(ds, _cfg("per_image", augment_second=IDENTITY), batch_size=2, device="cpu")
    wrapped = pipe.loader.dataset
    assert isinstance(wrapped, TwoViewDataset) and not hasattr(wrapped, "__getitems__")
    copy = pickle.loads(pickle.dumps(wrapped))
    assert len(copy) == 6 and copy.info is not None
    v1, v2, target, index = copy[4]
    assert v1.shape == v2.shape == (3, SIZE, SIZE) and (target, index) == (0, 4)
    assert torch.allclose(v2, eval_transform(ds.images[4:5], SIZE, CIFAR)[0], atol=1e-5)


def test_bad_pipeline_value_is_a_recipe_error_naming_the_choices():
    assert typing.get_args(typing.get_type_hints(DataConfig)["pipeline"]) == PIPELINES
    assert DataConfig().pipeline == "batched"
    assert load_recipe(data={"data": {"pipeline": "per_image"}}).data.pipeline == "per_image"
    with pytest.raises(RecipeError, match="data.pipeline.*'batched', 'per_image'.*'perimage'") as info:
        load_recipe(data={"data": {"pipeline": "perimage"}})
    assert "per_image" in str(info.value)
    cfg = DataConfig()
    cfg.pipeline = "fast"  # attrs does not validate on assignment: build_train_pipeline checks too
    with pytest.raises(RecipeError, match="'batched', 'per_image'"):
        build_train_pipeline(_dataset(n=4), cfg, batch_size=2, device="cpu")


# --------------------------------------------------------------------------- same distribution end to end


def _collect(pipe: TrainPipeline, generator: torch.Generator, epochs: int) -> list[torch.Tensor]:
    """Both views of ``epochs`` passes over the data: [view1 (M, C, S, S), view2 (M, C, S, S)]."""
    out: list[list[torch.Tensor]] = [[], []]
    for epoch in range(epochs):
        generator.manual_seed(epoch)
        for batch in pipe.loader:
            views, _ = pipe.views(batch)
            out[0].append(views[0].cpu())
            out[1].append(views[1].cpu())
    return [torch.cat(o) for o in out]


def _max_z(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |z| over pixels of the two-sample differences of the per-pixel mean and std.

    Standard errors from the samples: var / M for the mean; sqrt((m4 - var^2) / M) / (2 std)
    (the delta method on the sample variance) for the std.  They treat the M views as
    independent draws; every image appears once per epoch, which only lowers the true
    variance, so the z-scores are conservative.
    """
    m = len(a)

    def std_se(x: torch.Tensor) -> torch.Tensor:
        var = x.var(0)
        m4 = ((x - x.mean(0)) ** 4).mean(0)
        return ((m4 - var**2).clamp_min(0) / m).sqrt() / (2 * var.sqrt())

    z_mean = (a.mean(0) - b.mean(0)) / (a.var(0) / m + b.var(0) / m).sqrt()
    z_std = (a.std(0) - b.std(0)) / (std_se(a) ** 2 + std_se(b) ** 2).sqrt()
    return float(torch.cat([z_mean.flatten(), z_std.flatten()]).abs().max())


def test_pipelines_give_the_same_per_pixel_distribution():
    """Per view, the per-pixel mean and std over 40 epochs of 32 images (1,280 draws) agree
    between the pipelines within a Bonferroni bound for the number of statistics (family-wise
    false alarm 1e-3); swapping the views' parameters on the per-image side is caught."""
    ds = _dataset(n=32)
    weak = AugmentParams(crop_scale=(0.6, 1.0), jitter_p=0.0, grayscale_p=0.0)
    strong = AugmentParams(blur_p=0.5)
    epochs = 40
    n_stats = 2 * 2 * 3 * SIZE * SIZE  # (mean, std) x 2 views x pixels
    bound = NormalDist().inv_cdf(1 - 1e-3 / (2 * n_stats))  # about 5.0

    def views(pipeline: str, first: AugmentParams, second: AugmentParams) -> list[torch.Tensor]:
        gen = torch.Generator()
        cfg = _cfg(pipeline, augment=first, augment_second=second, drop_last=False)
        return _collect(build_train_pipeline(ds, cfg, batch_size=16, device="cpu", generator=gen), gen, epochs)

    torch.manual_seed(0)
    batched = views("batched", strong, weak)
    per_image = views("per_image", strong, weak)
    swapped = views("per_image", weak, strong)
    assert len(batched[0]) == len(per_image[0]) == epochs * 32
    for v in (0, 1):
        assert _max_z(batched[v], per_image[v]) < bound, v
        assert _max_z(batched[v], swapped[v]) > bound, v  # the statistic can see a wrong view
