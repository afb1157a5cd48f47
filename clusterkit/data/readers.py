"""The readers of the array datasets, each from its original on-disk format: scikit-learn's
bundled ``digits``, Fashion-MNIST's IDX files, the CIFAR python pickles (unpickled with an
allow-list, so a data file never runs code) and STL-10's binary files."""

from __future__ import annotations

import functools
import gzip
import math
import pickle
import struct
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from clusterkit.data.dataset import ImageDataset
from clusterkit.data.registry import ROOT_HINT, DatasetInfo
from clusterkit.errors import DataError

__all__ = ["read_digits", "read_fashion_mnist", "read_cifar10", "read_cifar100", "read_stl10", "READERS"]


_FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_STL10_CLASSES = [
    "airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck",
]  # fmt: skip


def _find_folder(name: str, info: DatasetInfo, root: Path, subdirs: Sequence[str], marker: str, what: str) -> Path:
    """The first of ``root``, ``root/<subdir>`` that contains ``marker``."""
    candidates = [root] + [root / s for s in subdirs]
    for folder in candidates:
        if (folder / marker).is_file():
            return folder
    looked = " and ".join(f"'{c / marker}'" for c in candidates)
    raise DataError(
        f"Dataset '{name}': no {what} files under '{root}' (looked for {looked}). {info.prepare}. "
        f"{ROOT_HINT}"
    )


def _require_file(name: str, info: DatasetInfo, path: Path) -> Path:
    if not path.is_file():
        raise DataError(
            f"Dataset '{name}': the file '{path}' is missing (the download looks incomplete). "
            f"{info.prepare}. {ROOT_HINT}"
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


def read_digits(info: DatasetInfo, split: str) -> ImageDataset:
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


def read_fashion_mnist(info: DatasetInfo, root: Path, split: str) -> ImageDataset:
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
            f"{info.prepare}. {ROOT_HINT}"
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


def read_cifar10(info: DatasetInfo, root: Path, split: str) -> ImageDataset:
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


def read_cifar100(info: DatasetInfo, root: Path, split: str) -> ImageDataset:
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


def read_stl10(info: DatasetInfo, root: Path, split: str) -> ImageDataset:
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


#: The readers of the datasets stored in array files, by name (digits needs no folder).
READERS: dict[str, Callable[..., ImageDataset]] = {
    "fashion_mnist": read_fashion_mnist,
    "cifar10": read_cifar10,
    "cifar100": read_cifar100,
    "stl10": read_stl10,
}
