"""Untrusted files stay data (issue 23): special files, 16-bit and rotated images, symlinked
unlabeled folders, huge photos at predict time, and more loader workers than cores.

Each case goes through the command line or the Python API a user meets.  A FIFO named like an
image would block whoever opens it, forever: the calls that meet one run in a daemon thread with
a time limit (:func:`within`), and a blocked reader is released by opening the FIFO for writing,
so that a regression fails the test instead of hanging the suite.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import error_paragraph, flat, image_tree, run_main
from PIL import Image

import clusterkit
from clusterkit.data import load_dataset
from clusterkit.errors import DataError

pytestmark = pytest.mark.usefixtures("restore_threads")

LIMIT_S = 60  # far beyond what any call here needs; only a blocked open() reaches it


def within(fn, *fifos: Path, limit: float = LIMIT_S):
    """``fn()``'s result (or its exception, raised here), failing the test when it has not
    returned within ``limit`` seconds: then every FIFO in ``fifos`` is opened for writing once,
    which releases a reader blocked in open() (it reads end-of-file)."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        thread.join(limit)
        pytest.fail(f"still running after {limit} s: a FIFO was opened and blocked")
    if "error" in box:
        raise box["error"]
    return box["result"]


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.fixture(scope="module")
def model(tiny_run):
    """The tiny finished digits run (1 channel, 8 x 8 inputs: not an image folder), loaded."""
    return clusterkit.load(tiny_run[0])


# ---------------------------------------------------------------------------------------------
# 4. a FIFO (or any special file) named like an image is skipped, never opened
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("labels", ["folders", "none"])
@pytest.mark.parametrize("cache", [True, False])
def test_4_a_fifo_in_the_training_folder_is_skipped_with_a_warning(tmp_path, capsys, labels, cache):
    root = image_tree(tmp_path / "data")
    pipe = fifo(root / "a" / "pipe.png")
    ds = within(lambda: load_dataset("imagefolder", root, image_size=8, labels=labels, cache=cache), pipe)
    assert len(ds) == 8 and str(pipe) not in ds.paths and ds.skipped == []
    assert len(ds.all_images()) == 8
    err = flat(capsys.readouterr().err)
    assert err.count("clusterkit: warning:") == 1, err
    assert f"'{pipe}' is not a regular file" in err and "FIFO" in err, err


def test_4_predict_images_fifo_says_not_a_regular_file(tiny_run, tmp_path):
    pipe = fifo(tmp_path / "pipe.png")
    res = within(lambda: run_main("predict", tiny_run[0], "--images", pipe), pipe)
    paragraph = error_paragraph(res)
    assert f"'{pipe}' is not a regular file" in paragraph and "FIFO" in paragraph, paragraph
    assert "does not exist" not in paragraph, paragraph


def test_4_predict_folder_with_a_fifo_skips_it_with_a_warning(tiny_run, tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"{i}.png")
    pipe = fifo(folder / "pipe.png")
    res = within(lambda: run_main("predict", tiny_run[0], "--images", folder), pipe)
    assert res.returncode == 0, res.stderr
    rows = res.stdout.splitlines()
    assert rows[0] == "path,cluster,confidence" and len(rows) == 3 and "pipe.png" not in res.stdout, res.stdout
    err = flat(res.stderr)
    assert err.count("clusterkit: warning:") == 1 and "not a regular file" in err and "FIFO" in err, err


def test_4_the_python_api_never_opens_a_fifo(model, tmp_path):
    pipe = fifo(tmp_path / "pipe.png")
    with pytest.raises(DataError, match="not a regular file"):
        within(lambda: model.predict([str(pipe)]), pipe)


# ---------------------------------------------------------------------------------------------
# 6. 16-bit images are scaled, not clipped; the EXIF orientation is applied
# ---------------------------------------------------------------------------------------------

def gradient16(path: Path) -> Path:
    """A 16-bit grayscale PNG whose columns run 0..65535: mean 127.5 in 0..255 units."""
    row = np.linspace(0, 65535, 64).round().astype(np.uint16)
    Image.fromarray(np.tile(row, (32, 1))).save(path)
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I") and np.asarray(im).max() == 65535  # really 16 bits on disk
    return path


def test_6_a_16_bit_png_is_scaled_not_clipped_in_training(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for i in range(2):
        gradient16(root / f"{i}.png")
    ds = load_dataset("imagefolder", root, image_size=16, labels="none")
    images = ds.all_images().float()
    assert abs(float(images.mean()) - 127.5) < 2, float(images.mean())
    assert int(images[0, :, :, 0].max()) < 10 and int(images[0, :, :, -1].min()) > 245  # dark to bright


def test_6_a_16_bit_png_is_scaled_not_clipped_in_predict(model, tmp_path):
    from clusterkit.inference import read_image

    path = gradient16(tmp_path / "g.png")
    as_run = model.to_images([str(path)])[0]  # the digits run's path: 1 channel, float in [0, 1]
    assert abs(float(as_run.mean()) * 255 - 127.5) < 2, float(as_run.mean()) * 255
    folder_run = read_image(path, 3, resize_to=16)  # an image-folder run's path
    assert folder_run.shape == (3, 16, 16)
    assert abs(float(folder_run.float().mean()) - 127.5) < 2, float(folder_run.float().mean())


def sideways_jpeg(path: Path) -> Path:
    """A JPEG stored 40 wide x 20 tall, dark left half, bright right half, with EXIF orientation 6
    (rotate 90 degrees clockwise to display): upright it is 20 wide x 40 tall, dark on top."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, 20:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    return path


def assert_dark_on_top(image: torch.Tensor) -> None:
    """``image`` (C, H, W): its top half dark, its bottom half bright, left and right alike."""
    x = image.float()
    h = x.shape[1]
    top, bottom = float(x[:, : h // 2 - 1].mean()), float(x[:, h // 2 + 1:].mean())
    assert top < 0.2 * float(x.max()) and bottom > 0.8 * float(x.max()), (top, bottom)


def test_6_exif_orientation_is_applied_in_training(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for i in range(2):
        sideways_jpeg(root / f"{i}.jpg")
    ds = load_dataset("imagefolder", root, image_size=16, labels="none")
    for image in ds.all_images():
        assert_dark_on_top(image)


def test_6_exif_orientation_is_applied_in_predict(model, tmp_path):
    from clusterkit.inference import read_image

    path = sideways_jpeg(tmp_path / "photo.jpg")
    upright = read_image(path, 3)
    assert upright.shape == (3, 40, 20)  # transposed: 40 tall, 20 wide
    assert_dark_on_top(upright)
    assert_dark_on_top(read_image(path, 3, resize_to=16))
    assert_dark_on_top(model.to_images([str(path)])[0])


# ---------------------------------------------------------------------------------------------
# 8. unlabeled folders get the symlink checks of labelled ones
# ---------------------------------------------------------------------------------------------

def test_8_two_links_to_one_unlabeled_folder_train_each_image_once(tmp_path, capsys):
    root = tmp_path / "photos"
    image_tree(root, classes=("trip",), per_class=4)
    (root / "again").symlink_to(root / "trip", target_is_directory=True)
    (root / "and_again").symlink_to(root / "trip", target_is_directory=True)
    ds = load_dataset("imagefolder", root, image_size=8, labels="none")
    assert len(ds) == 4 and len({os.path.realpath(p) for p in ds.paths}) == 4, ds.paths
    err = flat(capsys.readouterr().err)
    assert err.count("clusterkit: warning:") == 1 and "found twice through symbolic links" in err, err


def test_8_a_loop_link_in_an_unlabeled_folder_is_warned_about(tmp_path, capsys):
    root = tmp_path / "photos"
    image_tree(root, classes=("trip",), per_class=4)
    loop = root / "trip" / "loop"
    loop.symlink_to(root, target_is_directory=True)
    ds = load_dataset("imagefolder", root, image_size=8, labels="none")
    assert len(ds) == 4
    err = flat(capsys.readouterr().err)
    assert err.count("clusterkit: warning:") == 1, err
    assert "not followed" in err and "loop back" in err and f"'{loop}'" in err, err


# ---------------------------------------------------------------------------------------------
# 9. predict reads a large photo at the run's size, never at full size in float32
# ---------------------------------------------------------------------------------------------

def float_sizes(monkeypatch) -> list[int]:
    """The element counts of the float images predict makes from its inputs (a spy on the one
    conversion every input goes through), filled as predict runs."""
    import clusterkit.inference as inference

    sizes: list[int] = []
    as_float = inference._as_unit_float

    def spy(x):
        sizes.append(x.numel())
        return as_float(x)

    monkeypatch.setattr(inference, "_as_unit_float", spy)
    return sizes


def test_9_a_large_photo_is_shrunk_as_it_is_read(model, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    big = tmp_path / "big.jpg"
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).resize((3000, 2000)).save(big)
    with Image.open(big) as im:
        pil = im.copy()
    sizes = float_sizes(monkeypatch)
    pred = model.predict([str(big), pil])
    assert len(pred.labels) == 2
    s = model.image_size
    assert len(sizes) == 2 and max(sizes) <= s * s, (sizes, s)  # 1 channel at the run's 8 x 8, not 3000 x 2000
    assert [tuple(x.shape) for x in model.to_images([str(big), pil])] == [(1, s, s)] * 2


def test_9_predict_cli_on_a_large_photo(tiny_run, tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((2000, 3000), np.uint8)).save(big)
    sizes = float_sizes(monkeypatch)
    res = run_main("predict", tiny_run[0], "--images", big)
    assert res.returncode == 0 and len(res.stdout.splitlines()) == 2, res.stderr
    assert len(sizes) == 1 and sizes[0] <= 8 * 8, sizes  # the tiny run takes 1 x 8 x 8 images


# ---------------------------------------------------------------------------------------------
# 13. no more DataLoader workers than cores
# ---------------------------------------------------------------------------------------------

def pipeline_with(monkeypatch, cores: int, workers: int):
    from clusterkit.data.pipeline import build_train_pipeline
    from clusterkit.recipe import DataConfig

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    ds = load_dataset("digits", None)
    return build_train_pipeline(ds, DataConfig(image_size=8, num_workers=workers), batch_size=64, device="cpu")


def test_13_num_workers_is_capped_at_the_cores_available(monkeypatch, capsys):
    pipe = pipeline_with(monkeypatch, cores=2, workers=8)
    assert pipe.loader.num_workers == 2
    err = capsys.readouterr().err
    assert err.count("clusterkit: note:") == 1, err
    assert "data.num_workers 8 capped at the 2 cores available" in flat(err), err


def test_13_num_workers_within_the_cores_is_left_alone(monkeypatch, capsys):
    pipe = pipeline_with(monkeypatch, cores=16, workers=8)
    assert pipe.loader.num_workers == 8
    assert "clusterkit: note:" not in capsys.readouterr().err
