"""Datasets (uint8 images at their stored resolution) and two-view augmentation.

:mod:`~clusterkit.data.datasets` loads a dataset by name (:func:`load_dataset`) from the
registry (:mod:`~clusterkit.data.registry`), the array readers
(:mod:`~clusterkit.data.readers`) and image folders (:mod:`~clusterkit.data.imagefolder`,
decoding with :mod:`~clusterkit.data.decode`) into an :class:`ImageDataset`
(:mod:`~clusterkit.data.dataset`); :mod:`~clusterkit.data.augment` makes the two views and
:mod:`~clusterkit.data.pipeline` feeds them to training.

>>> from clusterkit.data import load_dataset, AugmentParams, BatchedTwoView
>>> ds = load_dataset("digits", root=None)
>>> images, targets, indices = ds.__getitems__(range(16))
>>> v1, v2 = BatchedTwoView(AugmentParams(), 32, ds.info)(images)
>>> tuple(v1.shape)
(16, 1, 32, 32)
"""

from clusterkit.data.augment import (
    AugmentParams,
    BatchedTwoView,
    PerImageTwoView,
    eval_transform,
)
from clusterkit.data.dataset import ImageDataset, collate_batched
from clusterkit.data.datasets import load_dataset
from clusterkit.data.registry import (
    DATASETS,
    IMAGE_EXTENSIONS,
    LABEL_MODES,
    SPLITS,
    DatasetInfo,
    read_synsets,
)

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "LABEL_MODES",
    "SPLITS",
    "AugmentParams",
    "BatchedTwoView",
    "DatasetInfo",
    "ImageDataset",
    "PerImageTwoView",
    "collate_batched",
    "eval_transform",
    "load_dataset",
    "read_synsets",
]
