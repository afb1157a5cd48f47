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
"""

from __future__ import annotations

import difflib
import functools
import gzip
import hashlib
import math
import os
import pickle
import stat
import struct
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import attrs
import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from clusterkit.errors import DataError
from clusterkit.errors import warn as _warn

__all__ = [
    "DATASETS",
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

SPLITS = ("train", "test", "all")
#: How labels are read (``data.labels``): see the module doc.
LABEL_MODES = ("auto", "folders", "none")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_ROOT_HINT = "Then set data.root in the recipe or pass --set data.root=PATH."


@attrs.define(eq=False)
class DatasetInfo:
    """Per-dataset defaults.

    Attributes:
        mean, std: per-channel normalisation statistics in ``[0, 1]`` units
            (length ``channels``).
        hflip: whether horizontal flipping preserves the class (False for digits
            and clothes, True for natural images); the augmentation default.
        channels: number of image channels (1 or 3).
        prepare: how to obtain and lay out the files; quoted in error messages.
        default_root: folder used when ``root`` is None (None: a root is required,
            except for bundled data).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool
    channels: int
    prepare: str
    default_root: str | None = None


_IMAGENET_HINT = (
    "For ImageNet-10 or ImageNet-Dogs, copy the class folders named by "
    "clusterkit.data.read_synsets('imagenet10') or read_synsets('imagenet_dogs') out of an "
    "ImageNet-1k train folder into ROOT"
)

DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(
        mean=(0.3053,),
        std=(0.3759,),
        hflip=False,
        channels=1,
        prepare="Nothing to prepare: the 1797 8x8 digit images ship with scikit-learn "
        "(sklearn.datasets.load_digits) and no root is needed",
    ),
    "fashion_mnist": DatasetInfo(
        mean=(0.2860,),
        std=(0.3530,),
        hflip=False,
        channels=1,
        prepare="Install Debian's package with `apt-get install dataset-fashion-mnist` (it puts "
        "the files in /usr/share/datasets/fashion-mnist, the default root), or on a machine with "
        "internet download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from the Fashion-MNIST project "
        "page (github.com/zalandoresearch/fashion-mnist) and put the four files directly in ROOT",
        default_root="/usr/share/datasets/fashion-mnist",
    ),
    "cifar10": DatasetInfo(
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        hflip=True,
        channels=3,
        prepare="On a machine with internet, download cifar-10-python.tar.gz (the 'CIFAR-10 python "
        "version') from the CIFAR page (www.cs.toronto.edu/~kriz/cifar.html) and extract it with "
        "`tar xzf cifar-10-python.tar.gz -C ROOT` so that ROOT/cifar-10-batches-py/data_batch_1 "
        "exists",
    ),
    "cifar100": DatasetInfo(
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        hflip=True,
        channels=3,
        prepare="On a machine with internet, download cifar-100-python.tar.gz (the 'CIFAR-100 "
        "python version') from the CIFAR page (www.cs.toronto.edu/~kriz/cifar.html) and extract "
        "it with `tar xzf cifar-100-python.tar.gz -C ROOT` so that ROOT/cifar-100-python/train "
        "exists (the 20 coarse superclasses are the targets)",
    ),
    "stl10": DatasetInfo(
        mean=(0.4467, 0.4398, 0.4066),
        std=(0.2603, 0.2566, 0.2713),
        hflip=True,
        channels=3,
        prepare="On a machine with internet, download stl10_binary.tar.gz (the binary version) "
        "from the STL-10 page (cs.stanford.edu/~acoates/stl10) and extract it with "
        "`tar xzf stl10_binary.tar.gz -C ROOT` so that ROOT/stl10_binary/train_X.bin exists "
        "(only train_X/y.bin, test_X/y.bin and class_names.txt are read; unlabeled_X.bin may be "
        "deleted)",
    ),
    "imagefolder": DatasetInfo(
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        hflip=True,
        channels=3,
        prepare="Put the images in ROOT (extensions "
        + " ".join(IMAGE_EXTENSIONS)
        + "): a flat folder or any tree of them is unlabeled data (data.labels: none, or auto "
        "when some image sits outside a sub-folder); for labelled data arrange them as "
        "ROOT/<class>/<image> with one folder per class, or split as ROOT/train/<class>/<image> and "
        "ROOT/test/<class>/<image> (val/ is accepted for test/). "
        + _IMAGENET_HINT,
    ),
}

_FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_STL10_CLASSES = [
    "airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck",
]  # fmt: skip


# --------------------------------------------------------------------------- dataset


class _LazyImages:
    """Image files decoded on access: ``[i] -> uint8 (3, S, S)``."""

    def __init__(self, paths: Sequence[str], image_size: int):
        self.paths = list(paths)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        array, error = _decode_image(self.paths[i], self.image_size)
        if error is not None:
            raise DataError(
                f"Dataset 'imagefolder': cannot decode image '{self.paths[i]}' ({error}). It passed "
                "the header check at load time but failed to decode in full. Remove or replace "
                "the file, or load with cache=True and skip_corrupt=True so that unreadable files "
                "are found and dropped up front."
            )
        return torch.from_numpy(array).permute(2, 0, 1)


class ImageDataset(torch.utils.data.Dataset):
    """An image dataset held in memory (or decoded lazily from files), labelled or not.

    Attributes:
        name: dataset name (a key of :data:`DATASETS`).
        split: ``"train"``, ``"test"`` or ``"all"``.
        classes: class names; ``targets`` index into this list (empty when unlabeled).
        targets: ``LongTensor (N,)`` ground-truth labels (for evaluation only); all ``-1``
            when the dataset is unlabeled (``targets=None`` at construction).
        has_labels: whether ``targets`` are real labels.
        paths: the image files, one per image, for datasets read from files
            (``imagefolder``); None for datasets stored in array files.
        info: the dataset's :class:`DatasetInfo`.
        images: ``uint8 Tensor (N, C, H, W)`` when held in memory, None when the
            files are decoded lazily (``imagefolder`` with ``cache=False``).
        root: the folder the data was read from (None for bundled data).
        skipped: paths of unreadable files dropped with ``skip_corrupt=True``.

    ``ds[i]`` returns ``(image uint8 (C, H, W), target int, index int)``;
    ``ds.__getitems__(indices)`` returns the batched triple
    ``(uint8 (B, C, H, W), LongTensor (B,), LongTensor (B,))`` and is what a
    ``torch.utils.data.DataLoader`` calls; pass ``collate_fn=collate_batched``.
    """

    def __init__(
        self,
        name: str,
        split: str,
        classes: Sequence[str],
        targets: torch.Tensor | np.ndarray | Sequence[int] | None,
        info: DatasetInfo,
        images: torch.Tensor | _LazyImages,
        *,
        root: str | None = None,
        skipped: Sequence[str] = (),
        paths: Sequence[str] | None = None,
    ):
        self.name = name
        self.split = split
        self.has_labels = targets is not None
        self.classes = list(classes) if self.has_labels else []
        if targets is None:
            targets = np.full(len(images), -1, dtype=np.int64)
        self.targets = torch.as_tensor(np.asarray(targets), dtype=torch.long).reshape(-1)
        self.info = info
        self.root = root
        self.skipped = list(skipped)
        self.paths = list(paths) if paths is not None else None
        if self.paths is not None and len(self.paths) != len(images):
            raise ValueError(f"{len(self.paths)} paths for {len(images)} images")
        if isinstance(images, _LazyImages):
            self.images: torch.Tensor | None = None
            self._lazy: _LazyImages | None = images
        else:
            if images.dtype != torch.uint8 or images.ndim != 4:
                raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
            self.images = images.contiguous()
            self._lazy = None
        if len(images) != len(self.targets):
            raise DataError(
                f"Dataset '{name}' ({split}): {len(images)} images but {len(self.targets)} labels "
                f"under '{root}'. The files are inconsistent (a partial download or a mix of "
                f"versions). {info.prepare}."
            )

    def __len__(self) -> int:
        return len(self.targets)

    def __repr__(self) -> str:
        shape = tuple(self.images.shape[1:]) if self.images is not None else "lazy"
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"classes={len(self.classes) if self.has_labels else 'unlabeled'}, image={shape})"
        )

    def _index(self, i: int) -> int:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for dataset of size {n}")
        return i

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        """One sample: ``(uint8 (C, H, W), target, index)``."""
        i = self._index(i)
        image = self.images[i] if self.images is not None else self._lazy[i]
        return image, int(self.targets[i]), i

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch: ``(uint8 (B, C, H, W), targets LongTensor (B,), indices LongTensor (B,))``."""
        n = len(self)
        idx = torch.as_tensor(indices if isinstance(indices, torch.Tensor) else list(indices), dtype=torch.long)
        idx = torch.where(idx < 0, idx + n, idx).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise IndexError(f"indices out of range for dataset of size {n}")
        if self.images is not None:
            images = self.images.index_select(0, idx)
        else:
            images = torch.stack([self._lazy[int(i)] for i in idx])
        return images, self.targets.index_select(0, idx), idx

    def all_images(self) -> torch.Tensor:
        """Every image as one ``uint8 (N, C, H, W)`` tensor (decodes lazy files)."""
        if self.images is not None:
            return self.images
        return self.__getitems__(range(len(self)))[0]

    def fingerprint(self) -> dict:
        """What identifies the training data, for ``--resume`` to refuse data that changed:
        ``{"count": N, "sha256": hex, "files": [relative path, ...] | None}``.

        For data read from files the hash covers the sorted paths (relative to ``root``) and the
        file sizes, and ``files`` lists the paths (up to :data:`FINGERPRINT_MAX_FILES`, so that a
        change can be named); for array data it covers the pixels and the labels."""
        digest = hashlib.sha256()
        files = None
        if self.paths is not None:
            root = self.root or ""
            entries = sorted((os.path.relpath(p, root) if root else p, _file_size(p)) for p in self.paths)
            for rel, size in entries:
                digest.update(os.fsencode(rel) + b"\0" + str(size).encode() + b"\n")
            if len(entries) <= FINGERPRINT_MAX_FILES:
                files = [f"{rel} ({size} bytes)" for rel, size in entries]
        else:
            digest.update(self.all_images().numpy().tobytes())
            digest.update(self.targets.numpy().tobytes())
        return {"count": len(self), "sha256": digest.hexdigest(), "files": files}

    def pixels(self) -> torch.Tensor:
        """Raw pixels for the k-means-on-pixels baseline: ``float32 (N, C*H*W)`` in ``[0, 1]``."""
        images = self.all_images()
        return images.reshape(len(images), -1).to(torch.float32).div_(255.0)


#: the largest dataset whose file list a checkpoint keeps, to name what changed on --resume
FINGERPRINT_MAX_FILES = 200_000


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def collate_batched(batch: Any) -> Any:
    """``collate_fn`` for a DataLoader over an :class:`ImageDataset`.

    With ``__getitems__`` the DataLoader hands over the already batched triple
    ``(uint8 (B, C, H, W), LongTensor (B,), LongTensor (B,))``, returned unchanged.
    A list of per-sample ``(image, target, index)`` tuples (e.g. from a wrapper
    dataset without ``__getitems__``) is stacked into the same triple.
    """
    if isinstance(batch, tuple) and len(batch) == 3 and isinstance(batch[0], torch.Tensor) and batch[0].ndim == 4:
        return batch
    images, targets, indices = zip(*batch, strict=True)
    return (
        torch.stack(list(images)),
        torch.as_tensor(targets, dtype=torch.long),
        torch.as_tensor(indices, dtype=torch.long),
    )


# --------------------------------------------------------------------------- entry point


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
    info = DATASETS[name]
    if name == "digits":
        ds = _load_digits(info, split)
    else:
        root_path = _resolve_root(name, info, root)
        loader = _LOADERS[name]
        if name == "imagefolder":
            return loader(info, root_path, split, image_size, cache=cache, skip_corrupt=skip_corrupt,
                          labels=labels, progress=progress)
        ds = loader(info, root_path, split)
    return _unlabeled(ds) if labels == "none" else ds


def _unlabeled(ds: ImageDataset) -> ImageDataset:
    """``ds`` with its labels dropped (the same images, shared)."""
    images = ds.images if ds.images is not None else ds._lazy
    return ImageDataset(ds.name, ds.split, [], None, ds.info, images, root=ds.root, skipped=ds.skipped,
                        paths=ds.paths)


def read_synsets(name: str) -> list[str]:
    """WordNet ids of a standard ImageNet subset: ``"imagenet10"`` (10) or ``"imagenet_dogs"`` (15)."""
    names = ("imagenet10", "imagenet_dogs")
    if name not in names:
        raise DataError(f"Unknown synset list '{name}'; choose one of {', '.join(names)}.")
    text = resources.files("clusterkit.data").joinpath("synsets", f"{name}_synsets.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


# --------------------------------------------------------------------------- helpers


def _resolve_root(name: str, info: DatasetInfo, root: str | os.PathLike | None) -> Path:
    if root is None:
        if info.default_root is None:
            raise DataError(
                f"Dataset '{name}' needs a data folder but no root was given. {info.prepare}. "
                f"{_ROOT_HINT}"
            )
        root = info.default_root
    path = Path(os.path.expanduser(os.fspath(root)))
    if not path.is_dir():
        raise DataError(
            f"Dataset '{name}': the data root '{path}' does not exist or is not a folder. "
            f"{info.prepare}. {_ROOT_HINT}"
        )
    return path


def _find_folder(name: str, info: DatasetInfo, root: Path, subdirs: Sequence[str], marker: str, what: str) -> Path:
    """The first of ``root``, ``root/<subdir>`` that contains ``marker``."""
    candidates = [root] + [root / s for s in subdirs]
    for folder in candidates:
        if (folder / marker).is_file():
            return folder
    looked = " and ".join(f"'{c / marker}'" for c in candidates)
    raise DataError(
        f"Dataset '{name}': no {what} files under '{root}' (looked for {looked}). {info.prepare}. "
        f"{_ROOT_HINT}"
    )


def _require_file(name: str, info: DatasetInfo, path: Path) -> Path:
    if not path.is_file():
        raise DataError(
            f"Dataset '{name}': the file '{path}' is missing (the download looks incomplete). "
            f"{info.prepare}. {_ROOT_HINT}"
        )
    return path


def _bad_file(name: str, info: DatasetInfo, path: Path, problem: str) -> DataError:
    return DataError(
        f"Dataset '{name}': cannot read '{path}' ({problem}). The file is corrupt or not the "
        f"expected format; download and extract it again. {info.prepare}."
    )


def _splits(split: str) -> list[str]:
    return ["train", "test"] if split == "all" else [split]


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, np.ndarray]:
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    targets = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return torch.from_numpy(np.require(images, requirements=["C", "W"])), targets


# --------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    return images, bunch.target.astype(np.int64), [str(c) for c in bunch.target_names]


def _load_digits(info: DatasetInfo, split: str) -> ImageDataset:
    """sklearn's 1797 8x8 digits, values 0..16 scaled to 0..255.

    There is no official train/test split: every split is the full set.
    """
    images, targets, classes = _digits_arrays()
    return ImageDataset("digits", split, classes, targets.copy(), info, torch.from_numpy(images.copy()))


# --------------------------------------------------------------------------- fashion-mnist


def _read_idx(name: str, info: DatasetInfo, path: Path) -> np.ndarray:
    """An unsigned-byte IDX file (optionally gzipped) as an array of its stored shape."""
    try:
        opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise _bad_file(name, info, path, str(exc)) from exc
    if len(data) < 4:
        raise _bad_file(name, info, path, "file too short for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim == 0:
        raise _bad_file(name, info, path, "not an unsigned-byte IDX file")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _bad_file(name, info, path, "truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != math.prod(dims):
        found = len(data) - header
        raise _bad_file(name, info, path, f"expected {math.prod(dims)} values for shape {dims}, found {found}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _load_fashion_mnist(info: DatasetInfo, root: Path, split: str) -> ImageDataset:
    name = "fashion_mnist"
    prefixes = {"train": "train", "test": "t10k"}
    marker = "train-images-idx3-ubyte.gz"
    folder = None
    for candidate in (root, root / "fashion-mnist", root / "FashionMNIST" / "raw"):
        if (candidate / marker).is_file() or (candidate / marker[:-3]).is_file():
            folder = candidate
            break
    if folder is None:
        raise DataError(
            f"Dataset '{name}': no Fashion-MNIST files under '{root}' (looked for '{root / marker}' "
            f"and for the same file in {root / 'fashion-mnist'} and {root / 'FashionMNIST' / 'raw'}). "
            f"{info.prepare}. {_ROOT_HINT}"
        )

    def find(stem: str) -> Path:
        gz = folder / f"{stem}.gz"
        return gz if gz.is_file() else _require_file(name, info, folder / f"{stem}")

    parts = []
    for s in _splits(split):
        images = _read_idx(name, info, find(f"{prefixes[s]}-images-idx3-ubyte"))
        labels = _read_idx(name, info, find(f"{prefixes[s]}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1:
            raise _bad_file(name, info, folder, f"unexpected IDX shapes {images.shape} and {labels.shape}")
        parts.append((images[:, None], labels.astype(np.int64)))
    images, targets = _concat(parts)
    return ImageDataset(name, split, _FASHION_CLASSES, targets, info, images, root=str(folder))


# --------------------------------------------------------------------------- CIFAR


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, numbers, strings and numpy arrays, nothing else: a data file from
    elsewhere never runs code (``find_class`` refuses every other global, before it is called)."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes in a protocol-2 pickle written by Python 3
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it holds the Python object {module}.{name}, which a data file never "
                                         "needs (refused, nothing ran)")
        return super().find_class(module, name)


def _unpickle(name: str, info: DatasetInfo, path: Path) -> dict:
    _require_file(name, info, path)
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise _bad_file(name, info, path, f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise _bad_file(name, info, path, "not a pickled dict")
    # The official files are Python 2 pickles with bytes keys; accept str keys too.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _get(name: str, info: DatasetInfo, path: Path, d: dict, key: str) -> Any:
    if key not in d:
        raise _bad_file(name, info, path, f"no '{key}' entry")
    return d[key]


def _names(values: Sequence) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _cifar_images(name: str, info: DatasetInfo, path: Path, data: Any) -> np.ndarray:
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise _bad_file(name, info, path, f"expected data of shape (N, 3072), got {data.shape}")
    return data.reshape(-1, 3, 32, 32)


def _load_cifar10(info: DatasetInfo, root: Path, split: str) -> ImageDataset:
    name = "cifar10"
    folder = _find_folder(name, info, root, ["cifar-10-batches-py"], "data_batch_1", "CIFAR-10")
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    parts = []
    for s in _splits(split):
        for fname in files[s]:
            path = folder / fname
            d = _unpickle(name, info, path)
            images = _cifar_images(name, info, path, _get(name, info, path, d, "data"))
            parts.append((images, np.asarray(_get(name, info, path, d, "labels"), dtype=np.int64)))
    meta_path = folder / "batches.meta"
    classes = _names(_get(name, info, meta_path, _unpickle(name, info, meta_path), "label_names"))
    images, targets = _concat(parts)
    return ImageDataset(name, split, classes, targets, info, images, root=str(folder))


def _load_cifar100(info: DatasetInfo, root: Path, split: str) -> ImageDataset:
    name = "cifar100"
    folder = _find_folder(name, info, root, ["cifar-100-python"], "train", "CIFAR-100")
    parts = []
    for s in _splits(split):
        path = folder / s
        d = _unpickle(name, info, path)
        images = _cifar_images(name, info, path, _get(name, info, path, d, "data"))
        parts.append((images, np.asarray(_get(name, info, path, d, "coarse_labels"), dtype=np.int64)))
    meta_path = folder / "meta"
    classes = _names(_get(name, info, meta_path, _unpickle(name, info, meta_path), "coarse_label_names"))
    images, targets = _concat(parts)
    return ImageDataset(name, split, classes, targets, info, images, root=str(folder))


# --------------------------------------------------------------------------- STL-10


def _load_stl10(info: DatasetInfo, root: Path, split: str) -> ImageDataset:
    """Labelled STL-10 (5000 train, 8000 test). Images are stored column-major per channel."""
    name = "stl10"
    folder = _find_folder(name, info, root, ["stl10_binary"], "train_X.bin", "STL-10")
    size = 3 * 96 * 96
    parts = []
    for s in _splits(split):
        x_path = _require_file(name, info, folder / f"{s}_X.bin")
        y_path = _require_file(name, info, folder / f"{s}_y.bin")
        raw = np.fromfile(x_path, dtype=np.uint8)
        if raw.size % size:
            raise _bad_file(name, info, x_path, f"size {raw.size} is not a multiple of 3*96*96")
        # Each channel is stored column by column: (N, C, W, H) -> (N, C, H, W).
        images = raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
        labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise _bad_file(name, info, y_path, "labels outside 1..10")
        parts.append((images, labels))
    names_path = folder / "class_names.txt"
    classes = _STL10_CLASSES
    if names_path.is_file():
        classes = [line.strip() for line in names_path.read_text().splitlines() if line.strip()]
    images, targets = _concat(parts)
    return ImageDataset(name, split, classes, targets, info, images, root=str(folder))


# --------------------------------------------------------------------------- image folder


_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
)


def special_file_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it is not a regular file (``"a FIFO (named pipe)"``, ``"a socket"``,
    ...), else None.  Symbolic links are followed; a path that cannot be examined (missing, a
    dangling link) gives None too, so that opening it reports why.  Only regular files are ever
    opened: opening a FIFO waits for a writer, forever."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return file_kind(mode)


def file_kind(mode: int) -> str | None:
    """What a file of ``st_mode`` ``mode`` is when it is not a regular file (``"a FIFO (named
    pipe)"``, ``"a folder"``, ...); None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _SPECIAL_KINDS if test(mode)), "a special file")


class NotRegularFileError(OSError):
    """An image path names a FIFO, socket, device or folder: it is never opened."""


# PIL modes of 16-bit (and 32-bit integer) images, whose values run to 65535: PIL's own
# convert("L") would clip them at 255 instead of scaling.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_8bit(im: Image.Image, mode: str) -> Image.Image:
    """A PIL image as 8-bit ``mode`` ("RGB" or "L"): 16-bit images are scaled to 0..255 (value /
    257, rounded), not clipped; palette images with transparency go through RGBA (alpha is
    dropped)."""
    if im.mode in _WIDE_MODES:
        wide = np.asarray(im).astype(np.int64)
        im = Image.fromarray(np.clip((wide + 128) // 257, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im if im.mode == mode else im.convert(mode)


def fit_square(im: Image.Image, size: int | None, *, shrink_only: bool = False) -> Image.Image:
    """``im`` resized to a ``size x size`` square (bilinear, with PIL's antialiasing when it
    shrinks); ``size`` None: as it is; ``shrink_only``: only when the image is larger than that."""
    if size is None or im.size == (size, size) or (shrink_only and max(im.size) <= size):
        return im
    return im.resize((size, size), Image.Resampling.BILINEAR)


def decode_image_file(path: str | os.PathLike, mode: str = "RGB", size: int | None = None, *,
                      shrink_only: bool = False) -> np.ndarray:
    """Decode one image file to ``uint8 (H, W, C)`` (C = 3 for "RGB", 1 for "L"): the one decoder
    of training data (``imagefolder``) and of ``predict``.

    Only regular files are opened (:class:`NotRegularFileError` otherwise).  The EXIF orientation
    is applied (a portrait photo stored sideways comes out upright); 16-bit images are scaled, not
    clipped (:func:`to_8bit`).  ``size``: resize to a ``size x size`` square (bilinear, with
    PIL's antialiasing) while decoding, so that a large photo never exists at full size beyond
    the decoder (JPEGs are decoded at a reduced scale, at least ``size``, with ``draft``);
    ``shrink_only``: only when the image is larger than that.  Raises whatever PIL raises for an
    unreadable file.
    """
    kind = special_file_kind(path)
    if kind is not None:
        raise NotRegularFileError(f"not a regular file: it is {kind}")
    with Image.open(path) as im:
        if size is not None:
            im.draft(im.mode, (size, size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale, still >= size
        im = ImageOps.exif_transpose(im)
        im = fit_square(to_8bit(im, mode), size, shrink_only=shrink_only)
        array = np.array(im, dtype=np.uint8)  # a writable copy
    return array[:, :, None] if array.ndim == 2 else array


def _decode_image(path: str, size: int) -> tuple[np.ndarray | None, str | None]:
    """Decode one file to ``uint8 (size, size, 3)`` RGB (:func:`decode_image_file`); returns
    ``(array, None)`` or ``(None, error)``."""
    try:
        return decode_image_file(path, "RGB", size), None
    except NotRegularFileError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means an unreadable file
        return None, f"{type(exc).__name__}: {exc}"


def _check_image(path: str) -> str | None:
    """A cheap header/integrity check without a full decode (of regular files only); the error or None."""
    kind = special_file_kind(path)
    if kind is not None:
        return f"not a regular file: it is {kind}"
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _class_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_files(folder: Path, loops: list[str] | None = None,
                 special: list[tuple[str, str]] | None = None) -> list[str]:
    """Image files under ``folder``, recursively, following directory symlinks except those
    that lead back to a folder already on the way (a loop such as ``ln -s .. loop``, which
    would otherwise repeat the tree); those are appended to ``loops``.  Entries with an image
    name that are not regular files (FIFOs, sockets, devices: :func:`special_file_kind`) are
    left out, never opened, and appended to ``special`` as ``(path, kind)``."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = os.path.realpath(dirpath)
        keep = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            link = os.path.join(dirpath, d)
            target = os.path.realpath(link)
            if os.path.islink(link) and (here == target or here.startswith(target.rstrip(os.sep) + os.sep)
                                         or target == os.path.realpath(folder)):
                if loops is not None:
                    loops.append(link)
                continue
            keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            if not _is_image(f):
                continue
            path = os.path.join(dirpath, f)
            kind = special_file_kind(path)
            if kind is None:
                files.append(path)
            elif special is not None:
                special.append((path, kind))
    return files


def _drop_duplicates(paths: list[str], targets: list[int]) -> tuple[list[str], list[int]]:
    """Keep the first of files reached through more than one path (symlinks), with a warning."""
    seen: dict[str, str] = {}
    kept_paths, kept_targets, twice = [], [], []
    for path, target in zip(paths, targets, strict=True):
        real = os.path.realpath(path)
        if real in seen:
            twice.append((seen[real], path))
            continue
        seen[real] = path
        kept_paths.append(path)
        kept_targets.append(target)
    if twice:
        first, again = twice[0]
        _warn(f"{len(twice)} image file(s) were found twice through symbolic links (e.g. '{first}' and "
              f"'{again}'); each is used once, under the first path found.")
    return kept_paths, kept_targets


def _walk_trees(trees: Sequence[tuple[Path, int]]) -> tuple[list[str], list[int], list[Path]]:
    """The image files of every ``(folder, target)`` tree, labelled (a class folder and its class)
    or not (a split folder and -1) alike: symlink loops are not followed, entries that are not
    regular files are skipped, a file reached twice through symlinks is kept once, each with one
    warning.  Returns ``(paths, targets, folders that hold no image file)``."""
    loops: list[str] = []
    special: list[tuple[str, str]] = []
    paths: list[str] = []
    targets: list[int] = []
    empty: list[Path] = []
    for folder, target in trees:
        files = _image_files(folder, loops, special)
        if not files:
            empty.append(folder)
        paths.extend(files)
        targets.extend([target] * len(files))
    if loops:
        _warn(f"{len(loops)} symbolic link(s) to a folder above them were not followed (they loop back into the "
              f"tree, e.g. '{loops[0]}').")
    if special:
        path, kind = special[0]
        if len(special) == 1:
            _warn(f"'{path}' is not a regular file (it is {kind}); it was skipped without being opened.")
        else:
            _warn(f"{len(special)} entries named like images are not regular files and were skipped without being "
                  f"opened (e.g. '{path}' is not a regular file: it is {kind}).")
    paths, targets = _drop_duplicates(paths, targets)
    return paths, targets, empty


def _split_folders(info: DatasetInfo, root: Path, split: str) -> tuple[list[Path], list[Path]]:
    """``(folders of split, folders of every split)``, each holding ``<class>/<image>`` trees."""
    train = root / "train"
    test = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not train.is_dir():
        if test is not None:
            raise DataError(
                f"Dataset 'imagefolder': '{root}' has a '{test.name}/' folder but no 'train/' folder. "
                f"Either add ROOT/train/<class>/<image> next to it, or point data.root at "
                f"'{test}' to use it alone. {info.prepare}."
            )
        if split == "test":
            raise DataError(
                f"Dataset 'imagefolder': '{root}' has no train/ and test/ (or val/) subfolders, so "
                "the whole folder is the train split and there is no test split. Use split 'train' "
                "or 'all', or arrange the images as ROOT/train/<class>/<image> and "
                "ROOT/test/<class>/<image>."
            )
        return [root], [root]
    everything = [train] if test is None else [train, test]
    if split == "test" and test is None:
        raise DataError(
            f"Dataset 'imagefolder': '{root}' has a train/ folder but no test/ or val/ folder, so "
            "there is no test split. Use split 'train' or 'all', or add ROOT/test/<class>/<image>."
        )
    return {"train": [train], "test": [test], "all": everything}[split], everything


def _direct_images(folder: Path) -> list[str]:
    """Image files directly in ``folder`` (not in its sub-folders), sorted."""
    return sorted(str(p) for p in folder.iterdir() if p.is_file() and _is_image(p.name))


def _scan_imagefolder(
    info: DatasetInfo, root: Path, split: str, labels: str = "folders"
) -> tuple[list[str] | None, list[str], list[int] | None]:
    """``(classes, paths, targets)`` of the image files of ``split``; ``classes`` and
    ``targets`` are None when the images are read as unlabeled (``labels``: see the module doc)."""
    folders, everything = _split_folders(info, root, split)
    if labels == "auto":
        # class folders when every image sits in one: no image directly in a split folder
        loose = any(_direct_images(f) for f in everything)
        labels = "none" if loose or not any(_class_dirs(f) for f in everything) else "folders"
    if labels == "none":
        paths, _, _ = _walk_trees([(folder, -1) for folder in folders])
        if not paths:
            where = " or ".join(f"'{f}'" for f in folders)
            raise DataError(
                f"Dataset 'imagefolder': {where} holds no image files: it contains no class folders and "
                f"no images, at any depth (accepted extensions: {' '.join(IMAGE_EXTENSIONS)}, any case; "
                "names starting with a dot are ignored). Point data.root at the folder that holds your "
                f"images. {_ROOT_HINT}"
            )
        return None, paths, None
    # Classes are the union over all split folders, so that a target means the
    # same class whichever split is loaded.
    classes = sorted(set().union(*(_class_dirs(f) for f in everything)))
    trees: list[tuple[Path, int]] = []
    for folder in folders:
        present = _class_dirs(folder)
        if not present:
            raise DataError(
                f"Dataset 'imagefolder': '{folder}' contains no class folders (data.labels: folders needs "
                f"one sub-folder per class with the images inside; use data.labels: none or auto to "
                f"cluster the images without labels). {info.prepare}. {_ROOT_HINT}"
            )
        trees.extend((folder / cls, classes.index(cls)) for cls in present)
    paths, targets, empty = _walk_trees(trees)
    if empty:
        raise DataError(
            f"Dataset 'imagefolder': the class folder '{empty[0]}' holds no image files "
            f"(accepted extensions: {' '.join(IMAGE_EXTENSIONS)}, any case). Put the class's "
            "images in it or delete the empty folder."
        )
    return classes, paths, targets


def _load_imagefolder(
    info: DatasetInfo, root: Path, split: str, image_size: int, *, cache: bool, skip_corrupt: bool,
    labels: str = "auto", progress: bool = True,
) -> ImageDataset:
    """Decode ``ROOT[/split]/<class>/<image>`` files (or, unlabeled, any tree of image files)
    to RGB ``image_size`` squares."""
    name = "imagefolder"
    classes, paths, targets = _scan_imagefolder(info, root, split, labels)
    errors: list[str | None] = [None] * len(paths)
    images = torch.empty((len(paths), 3, image_size, image_size), dtype=torch.uint8) if cache else None
    workers = min(16, os.cpu_count() or 1)
    desc = f"{'decoding' if cache else 'checking'} {len(paths)} images"
    with ThreadPoolExecutor(workers) as pool:
        if cache:
            results = pool.map(lambda p: _decode_image(p, image_size), paths)
            for i, (array, err) in enumerate(tqdm(results, total=len(paths), desc=desc, leave=False,
                                                  disable=not progress)):
                errors[i] = err
                if array is not None:
                    images[i] = torch.from_numpy(array).permute(2, 0, 1)
        else:
            errors = list(tqdm(pool.map(_check_image, paths), total=len(paths), desc=desc, leave=False,
                               disable=not progress))
    bad = [i for i, err in enumerate(errors) if err is not None]
    if bad and not skip_corrupt:
        i = bad[0]
        more = f" ({len(bad) - 1} more unreadable files follow)" if len(bad) > 1 else ""
        raise DataError(
            f"Dataset 'imagefolder': cannot read image '{paths[i]}' ({errors[i]}){more}. Remove or "
            "replace the corrupt file, or load with skip_corrupt=True to drop unreadable files "
            "(they are then listed in the dataset's 'skipped' attribute)."
        )
    if len(bad) == len(paths):
        raise DataError(
            f"Dataset 'imagefolder': none of the {len(paths)} image files under '{root}' could be "
            f"read (first: '{paths[0]}': {errors[0]}). Check that the files are real images. "
            f"{info.prepare}."
        )
    keep = [i for i, err in enumerate(errors) if err is None]
    if len(keep) < 2:
        only = paths[keep[0]] if keep else paths[0]
        raise DataError(
            f"Dataset 'imagefolder': '{root}' holds only one readable image ('{only}'), and clustering "
            "needs at least two (and at least e_step.k, the number of clusters). Add images to the folder "
            "or point data.root at a folder that holds more."
        )
    skipped = [paths[i] for i in bad]
    kept_targets = [targets[i] for i in keep] if targets is not None else None
    kept_paths = [paths[i] for i in keep]
    if images is not None:
        data: torch.Tensor | _LazyImages = images[keep] if bad else images
    else:
        data = _LazyImages(kept_paths, image_size)
    return ImageDataset(name, split, classes or [], kept_targets, info, data, root=str(root), skipped=skipped,
                        paths=kept_paths)


_LOADERS: dict[str, Callable[..., ImageDataset]] = {
    "fashion_mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "stl10": _load_stl10,
    "imagefolder": _load_imagefolder,
}
