"""Image datasets for clustering, read from their original on-disk formats.

Every dataset is an :class:`ImageDataset` whose images are ``uint8`` tensors of
shape ``(C, H, W)`` at their *stored* resolution: resizing to the training size is
the augmentation's job (:mod:`clusterkit.data.augment`), so the k-means-on-pixels
baseline (:meth:`ImageDataset.pixels`) sees native pixels.  The one exception is
``imagefolder``, whose files have arbitrary sizes and are resized to
``image_size x image_size`` when decoded.

Supported names (see :data:`DATASETS` for their normalisation statistics and the
``prepare`` text that says how to get the files):

============== ============================================== =========== =======
name           source                                         image       classes
============== ============================================== =========== =======
digits         ``sklearn.datasets.load_digits`` (bundled)     1 x 8 x 8   10
fashion_mnist  IDX ``.gz`` files                              1 x 28 x 28 10
cifar10        python pickles ``cifar-10-batches-py/``        3 x 32 x 32 10
cifar100       python pickles ``cifar-100-python/``           3 x 32 x 32 20 (coarse)
stl10          binary ``stl10_binary/`` (labelled part only)  3 x 96 x 96 10
imagefolder    ``ROOT/<class>/<image>`` files decoded with PIL 3 x S x S   folders
============== ============================================== =========== =======

Labels (``labels=``): ``"auto"`` (the default) keeps a dataset's own labels; for
``imagefolder`` it reads class folders when every image sits in one, and treats the
images as unlabeled otherwise (a flat folder, or images next to sub-folders).
``"folders"`` insists on class folders (``imagefolder`` only); ``"none"`` drops the
labels of any dataset.  An unlabeled dataset has ``has_labels == False``, no
``classes`` and ``targets`` of ``-1``: nothing may score it against labels.

Splits: ``"train"``, ``"test"`` and ``"all"`` (train followed by test, the
whole-dataset protocol of the deep-clustering papers).  ``digits`` has no
official split, so all three return the same 1797 images.

Example::

    >>> ds = load_dataset("digits", root=None, split="all")
    >>> images, targets, indices = ds.__getitems__([0, 1, 2])
    >>> images.shape, images.dtype
    (torch.Size([3, 1, 8, 8]), torch.uint8)

Image files (``imagefolder``, and ``predict``, which uses the same decoder
:func:`decode_image_file`) are read only when they are regular files (FIFOs,
sockets and devices named like images are skipped unopened, with a warning), with
their EXIF orientation applied and 16-bit images scaled to 8 bits.

The CIFAR loaders unpickle their files with an allow-list (numpy arrays and plain
data): a file that holds any other Python object is refused before it can run code.

This module is the entry point, :func:`load_dataset`; the parts live beside it:
:mod:`~clusterkit.data.registry` (the names, their statistics and preparation text),
:mod:`~clusterkit.data.dataset` (:class:`ImageDataset`), :mod:`~clusterkit.data.readers`
(the array formats), :mod:`~clusterkit.data.imagefolder` (folders of image files) and
:mod:`~clusterkit.data.decode` (one image file).  Their public names are importable from here
too.
"""

from __future__ import annotations

import difflib
import os

from clusterkit.data.dataset import FINGERPRINT_MAX_FILES, ImageDataset, collate_batched
from clusterkit.data.decode import (
    NotRegularFileError,
    decode_image_file,
    file_kind,
    fit_square,
    special_file_kind,
    to_8bit,
)
from clusterkit.data.imagefolder import read_imagefolder
from clusterkit.data.readers import READERS, read_digits
from clusterkit.data.registry import (
    DATASETS,
    IMAGE_EXTENSIONS,
    LABEL_MODES,
    SPLITS,
    DatasetInfo,
    read_synsets,
    resolve_root,
)
from clusterkit.errors import DataError

__all__ = [
    "DATASETS",
    "FINGERPRINT_MAX_FILES",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "DatasetInfo",
    "ImageDataset",
    "LABEL_MODES",
    "NotRegularFileError",
    "collate_batched",
    "decode_image_file",
    "file_kind",
    "fit_square",
    "load_dataset",
    "read_synsets",
    "special_file_kind",
    "to_8bit",
]


def load_dataset(
    name: str,
    root: str | os.PathLike | None,
    split: str = "train",
    image_size: int = 32,
    *,
    cache: bool = True,
    skip_corrupt: bool = False,
    labels: str = "auto",
    progress: bool = True,
) -> ImageDataset:
    """Load dataset ``name`` from ``root``.

    Args:
        name: a key of :data:`DATASETS`.
        root: the data folder; None uses ``DATASETS[name].default_root`` (bundled
            ``digits`` needs none). For CIFAR / STL-10 it may be the extracted
            folder itself or its parent.
        split: ``"train"``, ``"test"`` or ``"all"`` (train then test).
        image_size: side length images are resized to at decode time; used by
            ``imagefolder`` only (the others keep their stored resolution).
        cache: ``imagefolder`` only: decode every file once into memory (True) or
            decode lazily in ``__getitem__`` (False).
        skip_corrupt: ``imagefolder`` only: drop unreadable files (listed in
            ``dataset.skipped``) instead of raising :class:`DataError`.
        labels: ``"auto"``, ``"folders"`` or ``"none"`` (see the module doc).
        progress: ``imagefolder`` only: a progress bar on stderr while the files are decoded.

    Returns:
        an :class:`ImageDataset` of ``uint8`` images.

    Raises:
        DataError: unknown name or split, missing / empty / inconsistent files.
    """
    _check_request(name, split, image_size, labels)
    info = DATASETS[name]
    if name == "digits":
        ds = read_digits(info, split)
    elif name == "imagefolder":
        return read_imagefolder(info, resolve_root(name, info, root), split, image_size, cache=cache,
                                skip_corrupt=skip_corrupt, labels=labels, progress=progress)
    else:
        ds = READERS[name](info, resolve_root(name, info, root), split)
    return _unlabeled(ds) if labels == "none" else ds


def _check_request(name: str, split: str, image_size: int, labels: str) -> None:
    """DataError for an unknown dataset, split or labels mode, a bad image size, or class
    folders asked of a dataset that has none."""
    if name not in DATASETS:
        close = difflib.get_close_matches(str(name), DATASETS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise DataError(
            f"Unknown dataset '{name}'.{hint} Known datasets: {', '.join(sorted(DATASETS))}; set "
            "data.dataset in the recipe to one of them (use 'imagefolder' for a folder of images)."
        )
    if split not in SPLITS:
        raise DataError(
            f"Dataset '{name}': unknown split '{split}'. Use one of {', '.join(SPLITS)} ('all' is "
            "train followed by test)."
        )
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise DataError(f"Dataset '{name}': image_size must be a positive integer, got {image_size!r}.")
    if labels not in LABEL_MODES:
        raise DataError(f"Dataset '{name}': unknown labels mode '{labels}'. Use one of "
                        f"{', '.join(LABEL_MODES)} (data.labels).")
    if labels == "folders" and name != "imagefolder":
        raise DataError(
            f"Dataset '{name}': data.labels = folders reads class folders, which only 'imagefolder' has. "
            f"'{name}' has its own labels: use data.labels: auto to keep them or none to drop them."
        )


def _unlabeled(ds: ImageDataset) -> ImageDataset:
    """``ds`` with its labels dropped (the same images, shared)."""
    images = ds.images if ds.images is not None else ds._lazy
    return ImageDataset(ds.name, ds.split, [], None, ds.info, images, root=ds.root, skipped=ds.skipped,
                        paths=ds.paths)
