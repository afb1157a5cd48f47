"""Training data pipelines: from a dataset to two augmented views on the training device.

The recipe's ``data.pipeline`` picks one of two ways to make the two views of every
training batch.  Both draw from the same augmentation distribution
(:mod:`clusterkit.data.augment`) and accept the same recipes, ``data.augment_second``
included; they differ in where the work happens:

``"batched"`` (the default)
    The DataLoader yields uint8 batches ``(images (B, C, H, W), targets, index)``
    straight from the dataset's ``__getitems__`` (:func:`collate_batched`), and
    :class:`BatchedTwoView` augments the whole batch at once on the training device.
    Fast for datasets held in memory (every built-in dataset, and ``imagefolder`` with
    ``data.cache: true``): no Python loop over images and no per-image worker traffic.
``"per_image"``
    The classic path for data too big to cache: each DataLoader worker
    (``data.num_workers``; 0 = the main process) reads one image, applies the
    torchvision ``transforms.v2`` pipeline of :class:`PerImageTwoView` twice, and the
    loader collates ``(view1 (B, C, S, S), view2, targets, index)`` float batches.

:func:`build_train_pipeline` builds either; the trainer only uses
:attr:`TrainPipeline.loader` and :meth:`TrainPipeline.views`::

    >>> from clusterkit.data import load_dataset
    >>> from clusterkit.recipe import DataConfig
    >>> ds = load_dataset("digits", root=None)
    >>> pipe = build_train_pipeline(ds, DataConfig(image_size=8), batch_size=64, device="cpu")
    >>> views, index = pipe.views(next(iter(pipe.loader)))
    >>> [tuple(v.shape) for v in views], tuple(index.shape)
    ([(64, 1, 8, 8), (64, 1, 8, 8)], (64,))

Randomness: the batched path draws its augmentation from torch's global CPU RNG when
:meth:`TrainPipeline.views` is called; the per-image path draws it inside the loader,
from the global RNG with ``num_workers=0`` and otherwise from each worker's RNG, which
the DataLoader seeds from ``generator`` at the start of every epoch.  Either way a
seeded run repeats exactly with the same settings, but the two paths (and different
``num_workers`` on the per-image path) give different draws.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import attrs
import torch
from tqdm.auto import tqdm

from clusterkit.data.augment import BatchedTwoView, PerImageTwoView
from clusterkit.data.dataset import collate_batched
from clusterkit.errors import RecipeError

__all__ = ["PIPELINES", "TrainPipeline", "TwoViewDataset", "available_cores", "build_train_pipeline"]

#: The values of the recipe's ``data.pipeline``.
PIPELINES = ("batched", "per_image")


class TwoViewDataset(torch.utils.data.Dataset):
    """A dataset of two augmented views per image, for the per-image pipeline.

    Wraps a dataset whose ``ds[i]`` is ``(uint8 (C, H, W), target, index)`` (an
    :class:`~clusterkit.data.ImageDataset`).  ``self[i]`` is
    ``(view1 float32 (C, S, S), view2, target, index)``, so the DataLoader's default
    collate gives ``(view1 (B, C, S, S), view2, targets (B,), index (B,))``.  It has no
    ``__getitems__``, so the DataLoader transforms one image at a time, in its workers.
    Pickles (for worker processes started with ``spawn``) when the wrapped dataset does.

    Attributes:
        dataset: the wrapped dataset; ``info``: its :class:`DatasetInfo`.
        transform: the :class:`PerImageTwoView` applied to every image.
    """

    def __init__(self, dataset: Any, transform: PerImageTwoView):
        self.dataset = dataset
        self.transform = transform
        self.info = dataset.info

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        image, target, index = self.dataset[i]
        view1, view2 = self.transform(image)
        return view1, view2, target, index

    def __repr__(self) -> str:
        return f"TwoViewDataset({self.dataset!r}, {self.transform!r})"


@attrs.define(eq=False)
class TrainPipeline:
    """A training loader and the step that turns its batches into two views on the device.

    Attributes:
        kind: ``"batched"`` or ``"per_image"`` (the recipe's ``data.pipeline``).
        loader: the ``torch.utils.data.DataLoader`` to iterate once per epoch.
        device: the device :meth:`views` puts its tensors on.
        augment: the :class:`BatchedTwoView` module (on ``device``) of the batched
            path; None for ``per_image``.
        per_image: the :class:`PerImageTwoView` the loader's workers apply, for
            ``per_image``; None for ``batched``.
    """

    kind: str
    loader: torch.utils.data.DataLoader
    device: torch.device
    augment: BatchedTwoView | None = None
    per_image: PerImageTwoView | None = None

    def views(self, batch: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One batch of :attr:`loader` -> ``([view1, view2], index)`` on :attr:`device`.

        The views are float32 ``(B, C, S, S)``, normalised with the dataset's
        statistics; ``index`` is the LongTensor ``(B,)`` of the images' dataset indices.
        """
        if self.augment is not None:
            images, _, index = batch
            views = self.augment(images.to(self.device, non_blocking=True))
        else:
            view1, view2, _, index = batch
            views = (view1.to(self.device, non_blocking=True), view2.to(self.device, non_blocking=True))
        return list(views), index.to(self.device, non_blocking=True)


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one, as torch's
    DataLoader counts them), else ``os.cpu_count()``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _capped_workers(requested: int) -> int:
    """``data.num_workers``, at most the cores available, with one note when it is capped (more
    workers than cores only contend, and torch warns that the loader may slow down or freeze)."""
    cores = available_cores()
    if requested <= cores:
        return requested
    from clusterkit import distributed

    if distributed.is_main():
        tqdm.write(f"clusterkit: note: data.num_workers {requested} capped at the {cores} core"
                   f"{'' if cores == 1 else 's'} available", file=sys.stderr)
    return cores


def build_train_pipeline(
    dataset: Any,
    data_cfg: Any,
    *,
    batch_size: int,
    device: torch.device | str,
    sampler: torch.utils.data.Sampler | None = None,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
) -> TrainPipeline:
    """The training pipeline the recipe's ``data`` section asks for.

    Args:
        dataset: an :class:`~clusterkit.data.ImageDataset` (uint8 ``(C, H, W)`` images,
            ``info``, ``__getitems__``).
        data_cfg: the recipe's :class:`~clusterkit.recipe.DataConfig`; reads
            ``pipeline``, ``augment``, ``augment_second``, ``image_size``,
            ``num_workers`` (capped at the cores available, with a note) and ``drop_last``.
        batch_size: images per batch (per process).
        device: where :meth:`TrainPipeline.views` puts the views; memory is pinned when
            it is a CUDA device.
        sampler: which indices to draw (e.g. a ``DistributedSampler``); when given,
            ``shuffle`` is ignored and the sampler decides the order.
        generator: the RNG of the shuffle (without ``sampler``) and of the workers'
            seeds; reseed it every epoch for a data order that depends only on
            (seed, epoch).  None: torch's global RNG.
        shuffle: reshuffle every epoch (without ``sampler``).
    Returns:
        a :class:`TrainPipeline`.
    Raises:
        RecipeError: ``data_cfg.pipeline`` is not one of :data:`PIPELINES`.
    """
    kind = data_cfg.pipeline
    if kind not in PIPELINES:
        raise RecipeError(
            f"'data.pipeline' must be one of {', '.join(repr(p) for p in PIPELINES)}, got {kind!r}. Use "
            "'batched' (augment whole uint8 batches on the training device, the default) or 'per_image' "
            "(torchvision transforms per image in the DataLoader workers, for data too big to cache)."
        )
    device = torch.device(device)
    source, collate, augment, per_image = _two_views(dataset, data_cfg, kind, device)
    loader = torch.utils.data.DataLoader(
        source,
        batch_size=batch_size,
        shuffle=None if sampler is not None else shuffle,
        sampler=sampler,
        drop_last=data_cfg.drop_last,
        num_workers=_capped_workers(data_cfg.num_workers),
        collate_fn=collate,
        generator=generator,
        pin_memory=device.type == "cuda",
    )
    return TrainPipeline(kind=kind, loader=loader, device=device, augment=augment, per_image=per_image)


def _two_views(dataset: Any, data_cfg: Any, kind: str, device: torch.device) -> tuple[
        Any, Any, BatchedTwoView | None, PerImageTwoView | None]:
    """``(what the loader reads, its collate_fn, the batched augmentation, the per-image one)``:
    ``batched`` reads the uint8 images and augments whole batches on ``device``; ``per_image``
    reads a :class:`TwoViewDataset` whose workers make the views (default collate)."""
    info = dataset.info
    if kind == "batched":
        augment = BatchedTwoView(data_cfg.augment, data_cfg.image_size, info, second=data_cfg.augment_second)
        return dataset, collate_batched, augment.to(device), None
    per_image = PerImageTwoView(data_cfg.augment, data_cfg.image_size, info, second=data_cfg.augment_second)
    return TwoViewDataset(dataset, per_image), None, None, per_image  # None: the default collate
