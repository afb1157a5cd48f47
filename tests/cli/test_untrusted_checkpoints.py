"""Issue 23, items 1, 3 and 5: a checkpoint is read as data, a resume refuses changed data, and a
full disk is a clear error that leaves nothing half-written.

Item 1 plants a pickle payload (``os.system`` through ``__reduce__``) as a run's newest
checkpoint and opens the run through every entry point: none may run it.  The same payload does
run when the user opts in with ``CLUSTERKIT_TRUST_CHECKPOINTS=1``, which shows that the payload
is live and that the test can fail.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY, error_paragraph, flat, image_tree, run_main
from PIL import Image

from clusterkit import checkpoint
from clusterkit.checkpoint import TRUST_ENV, load_checkpoint, rng_state, set_rng_state

pytestmark = pytest.mark.usefixtures("restore_threads")


def tiny(**run) -> dict:
    raw = copy.deepcopy(TINY)
    raw["eval"] = {"pixel_baseline": "never"}
    raw["run"].update(threads=1, keep_last=3, **run)
    return raw


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(recipe file, a finished two-epoch run of the tiny ProPos recipe with both checkpoints)."""
    from conftest import torch_settings_kept

    tmp = tmp_path_factory.mktemp("untrusted")
    recipe = tmp / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny()))
    with torch_settings_kept():
        res = run_main("run", recipe, "--out", tmp / "run")
    assert res.returncode == 0, res.stderr
    return recipe, tmp / "run"


def _interrupted(done, run):
    """A copy of the finished run ``done`` at ``run`` as if killed during its second epoch: only
    the first checkpoint, no summary."""
    shutil.copytree(done, run)
    (run / "summary.json").unlink()
    (run / "checkpoints" / "epoch_0001.pt").unlink()
    return run


class _Payload:
    """Unpickling this runs a shell command (what a hostile checkpoint would do)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _plant(run, marker) -> None:
    """Make the newest checkpoint of ``run`` a checkpoint-shaped dict carrying the payload."""
    newest = run / "checkpoints" / "epoch_0001.pt"
    ckpt = load_checkpoint(newest)
    ckpt["extra"] = {"note": _Payload(f"touch '{marker}'")}
    torch.save(ckpt, newest)


def _entry_points(recipe, run, tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(image)
    return {
        "predict": ("predict", run, "--images", image),
        "plot": ("plot", run, "--out", tmp_path / "plots"),
        "export": ("export", run, "--to", tmp_path / "export"),
        "choose-k": ("choose-k", run, "--k", "2:4", "--out", tmp_path / "ck"),
    }


def test_1_a_planted_payload_runs_from_no_entry_point(tmp_path, finished):
    recipe, done = finished
    marker = tmp_path / "payload-ran"
    run = tmp_path / "run"
    shutil.copytree(done, run)
    _plant(run, marker)
    for name, args in _entry_points(recipe, run, tmp_path).items():
        paragraph = error_paragraph(run_main(*args))
        assert "epoch_0001.pt" in paragraph and "posix.system" in paragraph, (name, paragraph)
        assert f"{TRUST_ENV}=1" in paragraph and "nothing ran" in paragraph, (name, paragraph)
        assert not marker.exists(), name
    assert run_main("show", run).returncode == 0 and not marker.exists()  # show reads no checkpoint

    import clusterkit
    from clusterkit.errors import UntrustedCheckpointError

    with pytest.raises(UntrustedCheckpointError, match="posix.system"):
        clusterkit.load(run, "cpu")
    assert not marker.exists()

    # an unfinished run with the payload: run --resume and compare (which resumes it) refuse it
    (run / "summary.json").unlink()
    paragraph = error_paragraph(run_main("run", recipe, "--resume", run))
    assert "posix.system" in paragraph and not marker.exists()
    out = tmp_path / "compare"
    shutil.copytree(run, out / "tiny" / "seed0")
    res = run_main("compare", recipe, "--seeds", "0", "--out", out, "--in-process", "--no-plots")
    assert res.returncode != 0 and "posix.system" in flat(res.stderr) and not marker.exists(), res.stderr
    res = run_main("compare", recipe, "--seeds", "0", "--out", out, "--no-plots")  # each run in its own process
    assert res.returncode != 0 and "posix.system" in flat(res.stderr) and not marker.exists(), res.stderr


def test_1_the_opt_in_loads_an_untrusted_checkpoint(tmp_path, finished, monkeypatch):
    """The control: the same payload runs once the user opts in (so the test above could fail)."""
    import clusterkit

    _, done = finished
    marker = tmp_path / "payload-ran"
    run = tmp_path / "run"
    shutil.copytree(done, run)
    _plant(run, marker)
    monkeypatch.setenv(TRUST_ENV, "1")
    model = clusterkit.load(run, "cpu")
    assert marker.exists() and model.epoch == 2


def test_1_checkpoints_hold_only_data(finished):
    """What clusterkit saves loads with torch's weights_only unpickler and no allow-list."""
    _, done = finished
    for path in sorted((done / "checkpoints").glob("epoch_*.pt")):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(ckpt["rng"]["numpy"]["keys"], torch.Tensor) and ckpt["data_fingerprint"]["count"] == 1797


def test_1_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    np.random.seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in the state
    random.seed(4)
    torch.manual_seed(5)
    path = tmp_path / "rng.pt"
    torch.save(rng_state(), path)
    expected = (np.random.standard_normal(3), np.random.randint(0, 10**6, 3), random.random(), torch.rand(2))
    set_rng_state(torch.load(path, weights_only=True))  # no numpy object in the file
    got = (np.random.standard_normal(3), np.random.randint(0, 10**6, 3), random.random(), torch.rand(2))
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and torch.equal(got[3], expected[3])


def test_1_a_checkpoint_of_the_previous_format_resumes_exactly(tmp_path, finished):
    """Checkpoints written before the RNG state was stored as tensors held numpy's state tuple: they
    load (the numpy array globals are allowed for them) and the resumed run equals the uninterrupted one."""
    recipe, done = finished
    cut = _interrupted(done, tmp_path / "cut")
    first = cut / "checkpoints" / "epoch_0000.pt"
    ckpt = load_checkpoint(first)
    saved = ckpt["rng"]["numpy"]
    ckpt["rng"]["numpy"] = ("MT19937", saved["keys"].numpy().astype(np.uint32), saved["pos"],
                            saved["has_gauss"], saved["cached_gaussian"])
    del ckpt["data_fingerprint"]
    torch.save(ckpt, first)
    with pytest.raises(Exception, match="(?i)weights only"):
        torch.load(first, weights_only=True)  # the file really holds numpy objects
    res = run_main("run", recipe, "--resume", cut)
    assert res.returncode == 0, res.stderr
    assert "predates data fingerprints" in flat(res.stderr)
    wa = load_checkpoint(done / "checkpoints" / "epoch_0001.pt")["model"]
    wb = load_checkpoint(cut / "checkpoints" / "epoch_0001.pt")["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((cut / "summary.json").read_text())["metrics"] == \
        json.loads((done / "summary.json").read_text())["metrics"]


# ---------------------------------------------------------------------------------------------
# 3. --resume refuses training data that changed
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def folder_run(tmp_path):
    """(recipe file, data folder, a run over it interrupted after its first epoch of two)."""
    data = image_tree(tmp_path / "data", classes=("a", "b"), per_class=8)
    raw = tiny()
    raw["data"].update(dataset="imagefolder", root=str(data), batch_size=8)
    raw["e_step"]["k"] = 2
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    res = run_main("run", recipe, "--out", run)
    assert res.returncode == 0, res.stderr
    (run / "checkpoints" / "epoch_0001.pt").unlink()
    (run / "summary.json").unlink()
    return recipe, data, run


def test_3_resume_refuses_added_images_and_names_them(folder_run):
    recipe, data, run = folder_run
    for i in range(3):
        shutil.copy(data / "a" / "0.png", data / "a" / f"new{i}.png")
    before = sorted(p.name for p in run.rglob("*"))
    paragraph = error_paragraph(run_main("run", recipe, "--resume", run))
    assert "training data changed" in paragraph and "16 training images then, 19 now" in paragraph
    assert "'a/new0.png (" in paragraph and "start a new run" in paragraph
    assert sorted(p.name for p in run.rglob("*")) == before


def test_3_resume_refuses_removed_or_rewritten_images(folder_run):
    recipe, data, run = folder_run
    (data / "b" / "3.png").unlink()
    paragraph = error_paragraph(run_main("run", recipe, "--resume", run))
    assert "16 training images then, 15 now" in paragraph and "gone or changed: 'b/3.png (" in paragraph
    Image.new("RGB", (8, 8), (1, 2, 3)).save(data / "b" / "3.png")  # back, with other bytes
    paragraph = error_paragraph(run_main("run", recipe, "--resume", run))
    assert "16 training images then, 16 now" in paragraph and "'b/3.png (" in paragraph


def test_3_resume_on_the_same_data_continues(folder_run):
    recipe, _, run = folder_run
    res = run_main("run", recipe, "--resume", run)
    assert res.returncode == 0, res.stderr
    assert (run / "summary.json").exists() and "predates" not in res.stderr


def test_3_the_fingerprint_of_array_data_sees_one_pixel():
    from clusterkit.data import load_dataset

    ds = load_dataset("digits", None, "all", 8)
    a = ds.fingerprint()
    ds.images[5, 0, 3, 3] ^= 1
    b = ds.fingerprint()
    assert a["count"] == b["count"] == 1797 and a["sha256"] != b["sha256"] and a["files"] is None


# ---------------------------------------------------------------------------------------------
# 5. a full disk while writing a checkpoint
# ---------------------------------------------------------------------------------------------

class _FullDisk:
    """An ``open`` whose files take ``room`` bytes at most, then fail as a full disk does."""

    def __init__(self, room: int):
        self.room = room

    def __call__(self, path, mode="r", *args, **kwargs):
        fh = open(path, mode, *args, **kwargs)
        if "w" not in mode:
            return fh
        disk = self
        write = fh.write

        def limited(data):
            if len(data) > disk.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            disk.room -= len(data)
            return write(data)

        fh.write = limited
        return fh


def test_5_a_full_disk_during_a_checkpoint_is_clear_and_resumable(tmp_path, finished, monkeypatch):
    recipe, done = finished
    run = _interrupted(done, tmp_path / "run")
    size = (run / "checkpoints" / "epoch_0000.pt").stat().st_size
    monkeypatch.setattr(checkpoint, "_open", _FullDisk(size // 2))  # epoch 2's checkpoint does not fit
    paragraph = error_paragraph(run_main("run", recipe, "--resume", run))
    assert f"The disk holding '{run / 'checkpoints'}' is full" in paragraph
    assert "writing 'epoch_0001.pt' failed" in paragraph and "needs about" in paragraph
    assert f"The previous checkpoint, '{run / 'checkpoints' / 'epoch_0000.pt'}', is kept" in paragraph
    assert "no partial file was left behind" in paragraph and "--resume RUN_DIR" in paragraph
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_0000.pt"]  # no temporary file
    monkeypatch.setattr(checkpoint, "_open", open)  # space freed
    res = run_main("run", recipe, "--resume", run)
    assert res.returncode == 0, res.stderr
    assert json.loads((run / "summary.json").read_text())["metrics"] == \
        json.loads((done / "summary.json").read_text())["metrics"]


def test_5_a_full_disk_while_appending_the_metrics_log_is_clear(tmp_path, finished, monkeypatch):
    """Not only the checkpoint: any write of a run that hits a full disk gets the paragraph."""
    import builtins

    recipe, done = finished
    run = _interrupted(done, tmp_path / "run")
    real_open = builtins.open

    def full(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full)
    paragraph = error_paragraph(run_main("run", recipe, "--resume", run))
    assert f"The disk is full writing '{run / 'metrics.jsonl'}'" in paragraph and "--resume RUN_DIR" in paragraph
