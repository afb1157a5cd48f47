"""Datasets (uint8 images at their stored resolution) and two-view augmentation.

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
from clusterkit.data.datasets import (
    DATASETS,
    IMAGE_EXTENSIONS,
    LABEL_MODES,
    SPLITS,
    DatasetInfo,
    ImageDataset,
    collate_batched,
    load_dataset,
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
