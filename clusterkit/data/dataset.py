"""The dataset class: :class:`ImageDataset` (uint8 images in memory or decoded lazily from
files, labelled or not), the fingerprint ``--resume`` checks, and the DataLoader collate."""

from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

import numpy as np
import torch

from clusterkit.data.decode import decode_image
from clusterkit.data.registry import DatasetInfo
from clusterkit.errors import DataError

__all__ = ["ImageDataset", "LazyImages", "collate_batched", "FINGERPRINT_MAX_FILES"]


class LazyImages:
    """Image files decoded on access: ``[i] -> uint8 (3, S, S)``."""

    def __init__(self, paths: Sequence[str], image_size: int):
        self.paths = list(paths)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        array, error = decode_image(self.paths[i], self.image_size)
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
        images: torch.Tensor | LazyImages,
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
        if isinstance(images, LazyImages):
            self.images: torch.Tensor | None = None
            self._lazy: LazyImages | None = images
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
