"""Dataset loaders, each on tiny files written in the real on-disk format."""

from __future__ import annotations

import gzip
import os
import pickle
import re
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from clusterkit.data import (
    DATASETS,
    ImageDataset,
    collate_batched,
    load_dataset,
    read_synsets,
)
from clusterkit.errors import DataError


def _one_paragraph(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, "DataError messages must be one paragraph"
    return message


def _check_dataset(ds: ImageDataset, n: int, shape: tuple[int, ...]) -> None:
    assert len(ds) == n
    image, target, index = ds[n - 1]
    assert image.dtype == torch.uint8 and tuple(image.shape) == shape
    assert isinstance(target, int) and index == n - 1
    images, targets, indices = ds.__getitems__([0, n - 1])
    assert images.dtype == torch.uint8 and tuple(images.shape) == (2, *shape)
    assert targets.dtype == torch.long and indices.tolist() == [0, n - 1]
    assert torch.equal(images[1], image) and targets[1] == target
    pixels = ds.pixels()
    assert pixels.dtype == torch.float32 and tuple(pixels.shape) == (n, int(np.prod(shape)))
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0
    assert torch.allclose(pixels[0], images[0].flatten().float() / 255)


# --------------------------------------------------------------------------- digits


def test_digits_all_splits_are_the_full_set():
    ds = load_dataset("digits", root=None, split="train")
    _check_dataset(ds, 1797, (1, 8, 8))
    assert ds.classes == [str(i) for i in range(10)]
    assert ds.images.max() == 255 and ds.images.min() == 0
    assert torch.bincount(ds.targets).tolist() == torch.bincount(ds.targets, minlength=10).tolist()
    for split in ("test", "all"):
        other = load_dataset("digits", root=None, split=split)
        assert other.split == split
        assert torch.equal(other.images, ds.images) and torch.equal(other.targets, ds.targets)
    assert ds.info.channels == 1 and ds.info.hflip is False


def test_dataloader_with_collate_batched():
    ds = load_dataset("digits", root=None)
    loader = torch.utils.data.DataLoader(ds, batch_size=100, shuffle=True, collate_fn=collate_batched)
    images, targets, indices = next(iter(loader))
    assert images.shape == (100, 1, 8, 8) and images.dtype == torch.uint8
    assert torch.equal(images, ds.images[indices]) and torch.equal(targets, ds.targets[indices])
    # A list of per-sample tuples (a wrapper without __getitems__) is stacked the same way.
    samples = [ds[i] for i in (3, 1, 4)]
    images, targets, indices = collate_batched(samples)
    assert indices.tolist() == [3, 1, 4] and torch.equal(images, ds.images[[3, 1, 4]])


def test_unknown_name_and_split():
    with pytest.raises(DataError) as err:
        load_dataset("cifar1O", root=None)
    assert "cifar10" in _one_paragraph(err)
    with pytest.raises(DataError) as err:
        load_dataset("digits", root=None, split="val")
    assert "'val'" in _one_paragraph(err)


# --------------------------------------------------------------------------- fashion-mnist


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 9, 4]))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([5, 6, 7]))

    ds = load_dataset("fashion_mnist", tmp_path, split="train")
    _check_dataset(ds, 5, (1, 28, 28))
    assert np.array_equal(ds.images[:, 0].numpy(), train)
    assert ds.targets.tolist() == [0, 1, 2, 9, 4]
    assert len(ds.classes) == 10 and ds.classes[9] == "Ankle boot"
    both = load_dataset("fashion_mnist", tmp_path, split="all")
    assert both.split == "all" and len(both) == 8
    assert both.targets.tolist() == [0, 1, 2, 9, 4, 5, 6, 7]
    assert np.array_equal(both.images[5:, 0].numpy(), test)


def test_fashion_mnist_truncated_file(tmp_path):
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((5, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5))
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "rb") as f:
        data = f.read()
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(data[:-10])
    with pytest.raises(DataError) as err:
        load_dataset("fashion_mnist", tmp_path)
    assert "train-images-idx3-ubyte.gz" in _one_paragraph(err)


@pytest.mark.skipif(
    not os.path.isfile("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"),
    reason="Debian's dataset-fashion-mnist package is not installed",
)
def test_fashion_mnist_default_root_real_files():
    ds = load_dataset("fashion_mnist", root=None, split="test")
    assert ds.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.targets).tolist() == [1000] * 10


# --------------------------------------------------------------------------- CIFAR


def _pickle(path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_rows(rng, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)


def test_cifar10_pickles(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = []
    for i in range(1, 6):
        rows = _cifar_rows(rng, 2)
        batches.append(rows)
        # Real files are Python 2 pickles with bytes keys.
        _pickle(folder / f"data_batch_{i}", {b"data": rows, b"labels": [i, i + 1], b"batch_label": b"x"})
    test_rows = _cifar_rows(rng, 3)
    _pickle(folder / "test_batch", {b"data": test_rows, b"labels": [7, 8, 9]})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _pickle(folder / "batches.meta", {b"label_names": names})

    ds = load_dataset("cifar10", tmp_path, split="train")  # the parent folder
    _check_dataset(ds, 10, (3, 32, 32))
    assert ds.targets.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    assert ds.classes[1] == "automobile"
    # Rows are channel-major: the first 1024 bytes are the red plane.
    assert np.array_equal(ds.images[0, 0].numpy(), batches[0][0, :1024].reshape(32, 32))
    assert np.array_equal(ds.images[0, 2].numpy(), batches[0][0, 2048:].reshape(32, 32))

    test = load_dataset("cifar10", folder, split="test")  # the folder itself
    assert len(test) == 3 and test.targets.tolist() == [7, 8, 9]
    both = load_dataset("cifar10", folder, split="all")
    assert len(both) == 13 and torch.equal(both.images[10:], test.images)
    assert torch.equal(both.images[:10], ds.images)


class _Payload:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_pickles_are_read_as_data_only(tmp_path, protocol):
    """The CIFAR loaders unpickle with an allow-list (numpy arrays, plain containers): real files
    of any pickle protocol load, and a file from elsewhere that carries code runs nothing."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rows = _cifar_rows(np.random.default_rng(3), 2)
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": rows, b"labels": [0, 1]}, f, protocol=protocol)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": rows, b"labels": [1, 0]}, f, protocol=protocol)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"a", b"b"]}, f, protocol=protocol)
    ds = load_dataset("cifar10", folder, split="all")
    assert len(ds) == 12 and np.array_equal(ds.images[11, 0].numpy(), rows[1, :1024].reshape(32, 32))

    marker = tmp_path / "payload-ran"
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": rows, b"labels": [1, 0], b"x": _Payload(f"touch '{marker}'")}, f, protocol=protocol)
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", folder, split="test")
    assert "posix.system" in _one_paragraph(err) and "nothing ran" in _one_paragraph(err)
    assert not marker.exists()


def test_cifar100_coarse_labels(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train = {b"data": _cifar_rows(rng, 4), b"fine_labels": [50, 60, 70, 80], b"coarse_labels": [0, 19, 3, 3]}
    _pickle(folder / "train", train)
    _pickle(folder / "test", {b"data": _cifar_rows(rng, 2), b"fine_labels": [1, 2], b"coarse_labels": [5, 6]})
    coarse = [f"super{i}".encode() for i in range(20)]
    _pickle(folder / "meta", {b"coarse_label_names": coarse, b"fine_label_names": [b"f"] * 100})

    ds = load_dataset("cifar100", tmp_path, split="all")
    _check_dataset(ds, 6, (3, 32, 32))
    assert ds.targets.tolist() == [0, 19, 3, 3, 5, 6]
    assert len(ds.classes) == 20 and ds.classes[19] == "super19"


def test_cifar_missing_root_message(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", missing)
    message = _one_paragraph(err)
    assert str(missing) in message and "cifar-10-python.tar.gz" in message and "data.root" in message
    # An existing folder without the files names where it looked.
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", tmp_path)
    message = _one_paragraph(err)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in message
    with pytest.raises(DataError) as err:
        load_dataset("stl10", None)
    assert "stl10_binary" in _one_paragraph(err)


# --------------------------------------------------------------------------- STL-10


def test_stl10_binary_column_major(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    # An upright asymmetric pattern: a bright bar on the top rows, a gradient left to right.
    upright = np.zeros((3, 3, 96, 96), dtype=np.uint8)
    upright[:, 0, :10, :] = 255  # red: top bar
    upright[:, 1] = np.arange(96, dtype=np.uint8)[None, None, :]  # green: increases to the right
    upright[:, 2, :, :5] = 200  # blue: left bar
    upright[1] = 255 - upright[1]
    # The file stores each channel column by column (Fortran order).
    upright.transpose(0, 1, 3, 2).tofile(folder / "train_X.bin")
    np.array([1, 10, 3], dtype=np.uint8).tofile(folder / "train_y.bin")
    upright[:2].transpose(0, 1, 3, 2).tofile(folder / "test_X.bin")
    np.array([2, 2], dtype=np.uint8).tofile(folder / "test_y.bin")
    (folder / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")

    ds = load_dataset("stl10", tmp_path, split="train")
    _check_dataset(ds, 3, (3, 96, 96))
    assert np.array_equal(ds.images.numpy(), upright)
    assert ds.images[0, 0, 0, 50] == 255 and ds.images[0, 0, 50, 0] == 0  # bar on top, not left
    assert ds.targets.tolist() == [0, 9, 2]
    assert ds.classes == [f"c{i}" for i in range(10)]
    both = load_dataset("stl10", tmp_path / "stl10_binary", split="all")
    assert len(both) == 5 and both.targets.tolist() == [0, 9, 2, 1, 1]


# --------------------------------------------------------------------------- image folder


def _save(path, mode: str, size: tuple[int, int], color) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def _make_tree(root) -> None:
    _save(root / "cat" / "a.png", "RGB", (20, 10), (200, 10, 30))
    _save(root / "cat" / "b.JPG", "RGB", (16, 16), (0, 0, 255))
    _save(root / "dog" / "c.png", "L", (12, 12), 77)  # grayscale
    _save(root / "dog" / "d.png", "RGBA", (16, 24), (10, 200, 30, 128))  # with alpha
    _save(root / "dog" / "sub" / "e.bmp", "RGB", (8, 8), (1, 2, 3))  # nested
    (root / "dog" / "notes.txt").write_text("not an image")


def test_imagefolder_decodes_and_converts(tmp_path):
    _make_tree(tmp_path)
    ds = load_dataset("imagefolder", tmp_path, image_size=16)
    _check_dataset(ds, 5, (3, 16, 16))
    assert ds.classes == ["cat", "dog"] and ds.targets.tolist() == [0, 0, 1, 1, 1]
    assert ds.split == "train" and ds.skipped == []
    assert ds.images[0, :, 5, 5].tolist() == [200, 10, 30]  # resized solid colour is unchanged
    assert (ds.images[1, 2].float() > 240).all()  # JPEG blue, lossy
    assert ds.images[2].unique().tolist() == [77]  # grayscale -> 3 equal channels
    assert ds.images[3, :, 8, 8].tolist() == [10, 200, 30]  # RGBA -> RGB
    assert ds.images[4, :, 0, 0].tolist() == [1, 2, 3]

    lazy = load_dataset("imagefolder", tmp_path, image_size=16, cache=False)
    assert lazy.images is None and len(lazy) == 5
    assert torch.equal(lazy.__getitems__(range(5))[0], ds.images)
    assert torch.equal(lazy[3][0], ds.images[3])
    assert torch.equal(lazy.pixels(), ds.pixels())
    with pytest.raises(DataError):
        load_dataset("imagefolder", tmp_path, split="test")


def test_imagefolder_split_layout(tmp_path):
    _save(tmp_path / "train" / "a" / "1.png", "RGB", (8, 8), (1, 1, 1))
    _save(tmp_path / "train" / "b" / "2.png", "RGB", (8, 8), (2, 2, 2))
    _save(tmp_path / "val" / "b" / "3.png", "RGB", (8, 8), (3, 3, 3))
    _save(tmp_path / "val" / "c" / "4.png", "RGB", (8, 8), (4, 4, 4))
    train = load_dataset("imagefolder", tmp_path, split="train", image_size=8)
    test = load_dataset("imagefolder", tmp_path, split="test", image_size=8)
    both = load_dataset("imagefolder", tmp_path, split="all", image_size=8)
    # Classes are shared by all splits so that targets agree.
    for ds in (train, test, both):
        assert ds.classes == ["a", "b", "c"]
    assert train.targets.tolist() == [0, 1] and test.targets.tolist() == [1, 2]
    assert both.targets.tolist() == [0, 1, 1, 2] and both.split == "all"
    assert both.images[:, 0, 0, 0].tolist() == [1, 2, 3, 4]


def test_imagefolder_missing_and_empty_roots(tmp_path):
    missing = tmp_path / "absent"
    with pytest.raises(DataError) as err:
        load_dataset("imagefolder", missing)
    message = _one_paragraph(err)
    assert str(missing) in message and "<class>" in message

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as err:
        load_dataset("imagefolder", empty)
    assert str(empty) in _one_paragraph(err)

    _save(tmp_path / "tree" / "full" / "x.png", "RGB", (4, 4), (0, 0, 0))
    (tmp_path / "tree" / "hollow").mkdir()
    (tmp_path / "tree" / "hollow" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError) as err:
        load_dataset("imagefolder", tmp_path / "tree")
    assert str(tmp_path / "tree" / "hollow") in _one_paragraph(err)


@pytest.mark.parametrize("cache", [True, False])
def test_imagefolder_corrupt_image(tmp_path, cache):
    _save(tmp_path / "a" / "good.png", "RGB", (8, 8), (9, 9, 9))
    _save(tmp_path / "b" / "good.jpeg", "RGB", (8, 8), (9, 9, 9))
    bad = tmp_path / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    with pytest.raises(DataError) as err:
        load_dataset("imagefolder", tmp_path, image_size=8, cache=cache)
    message = _one_paragraph(err)
    assert str(bad) in message and "skip_corrupt" in message

    ds = load_dataset("imagefolder", tmp_path, image_size=8, cache=cache, skip_corrupt=True)
    assert ds.skipped == [str(bad)]
    assert len(ds) == 2 and ds.targets.tolist() == [0, 1]
    assert ds.__getitems__([0, 1])[0].shape == (2, 3, 8, 8)


# --------------------------------------------------------------------------- misc


def test_read_synsets_and_prepare_texts():
    ten, dogs = read_synsets("imagenet10"), read_synsets("imagenet_dogs")
    assert len(ten) == 10 and len(dogs) == 15 and len(set(dogs)) == 15
    assert all(re.fullmatch(r"n\d{8}", s) for s in ten + dogs)
    with pytest.raises(DataError):
        read_synsets("imagenet100")
    for name, info in DATASETS.items():
        assert info.prepare and "\n" not in info.prepare, name
        assert len(info.mean) == len(info.std) == info.channels, name
    assert DATASETS["fashion_mnist"].hflip is False and DATASETS["cifar10"].hflip is True


def test_decode_size_keeps_the_stored_resolution_and_views_have_image_size(tmp_path):
    """data.decode_size: the imagefolder files are decoded at 8 px (their own size), the two
    augmented views are cut from that and resized to image_size 16, and evaluation resizes to 16."""
    import attrs

    from clusterkit import Plugin, hookimpl
    from clusterkit.testing import make_trainer

    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "tree" / f"c{c}").mkdir(parents=True)
        for i in range(8):
            image = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
            image.save(tmp_path / "tree" / f"c{c}" / f"{i}.png")

    class ViewShapes(Plugin):
        @attrs.define
        class Params:
            pass

        seen: list = []

        @hookimpl
        def compute_losses(self, state, cache):
            ViewShapes.seen.append(tuple(cache.views[0].shape))
            return {"shape_probe": cache["h", 0].mean() * 0}

        @hookimpl
        def embed(self, state, images):
            ViewShapes.seen.append(("eval", tuple(images.shape[-2:])))
            return state.model["backbone"](images)

    trainer = make_trainer(ViewShapes, overrides={
        "data": {"dataset": "imagefolder", "root": str(tmp_path / "tree"), "image_size": 16, "decode_size": 8,
                 "batch_size": 8, "split": "train"},
        "e_step": {"k": 2}, "eval": {"pixel_baseline": "never"}})
    trainer.fit()
    assert tuple(trainer.train_ds[0][0].shape) == (3, 8, 8)  # stored at 8 px
    assert (8, 3, 16, 16) in ViewShapes.seen and ("eval", (16, 16)) in ViewShapes.seen
