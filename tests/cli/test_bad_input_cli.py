"""Every kind of bad input, through the command line.

Each case runs ``clusterkit run ...`` (``clusterkit.cli.main``, in this process: the code path
of the console script without a Python and torch start per case) and expects exit status 2,
exactly one ``clusterkit: error:`` paragraph that names the problem, and no traceback.  One
case goes through a real ``python -m clusterkit`` process, for the exit status and stderr of
the process itself.  Images that PIL can convert (16-bit grayscale PNG, CMYK JPEG) are not bad
input: they are converted to RGB and train; a garbage file with ``data.skip_corrupt: true`` is
skipped and listed in summary.json.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import error_paragraph, flat, image_tree
from PIL import Image

from clusterkit.recipe import load_recipe


def run_cli(*args, timeout=300):
    """A real ``python -m clusterkit`` process."""
    return subprocess.run([sys.executable, "-m", "clusterkit", *args], capture_output=True, text=True,
                          timeout=timeout)


def _write(path, data):
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _imagefolder(raw, root):
    raw["data"].update({"dataset": "imagefolder", "root": str(root), "batch_size": 4, "eval_batch_size": 16})
    raw["e_step"]["k"] = 2
    return raw


# Each case edits the tiny recipe (and the tmp dir) and returns (extra CLI args, text the error names).
def _unknown_plugin(tmp, raw):
    raw["plugins"]["prototype_agregation"] = {}
    return [], "Unknown plugin 'prototype_agregation' in the recipe's plugins. Did you mean 'prototype_aggregation'?"


def _unknown_key(tmp, raw):
    raw["data"]["batchsize"] = 3
    return [], "Did you mean 'batch_size'"


def _wrong_type(tmp, raw):
    raw["schedule"]["epochs"] = "ten"
    return [], "'schedule.epochs' must be an integer, got 'ten'"


def _out_of_range(tmp, raw):
    raw["optim"]["lr"] = -0.1
    return [], "'optim.lr' must be in (0, inf), got -0.1"


def _extends_cycle(tmp, raw):
    _write(tmp / "base.yaml", {"extends": "bad.yaml"})
    raw["extends"] = "base.yaml"
    return [], "'extends' forms a cycle"


def _extends_missing(tmp, raw):
    raw["extends"] = "_base/nope.yaml"
    return [], "extends '_base/nope.yaml', but"


def _malformed_yaml(tmp, raw):
    return [], "is not valid YAML at line 3"


def _missing_root(tmp, raw):
    _imagefolder(raw, tmp / "no_such_folder")
    return [], str(tmp / "no_such_folder")


def _empty_root(tmp, raw):
    (tmp / "empty").mkdir()
    _imagefolder(raw, tmp / "empty")
    return [], "contains no class folders"


def _corrupt_image(tmp, raw):
    root = image_tree(tmp / "images")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG not really an image")
    _imagefolder(raw, root)
    return [], f"cannot read image '{root / 'b' / 'broken.png'}'"


def _k_below_2(tmp, raw):
    raw["e_step"]["k"] = 1
    return [], "'e_step.k' must be in [2, inf], got 1"


def _k_above_dataset(tmp, raw):
    raw["e_step"]["k"] = 5000
    return [], "e_step.k = 5000 clusters is more than the 1797 training images"


def _batch_above_dataset(tmp, raw):
    raw["data"]["batch_size"] = 5000
    return [], "data.batch_size = 5000 is larger than the 1797 training images"


def _zero_epochs(tmp, raw):
    raw["schedule"]["epochs"] = 0
    return [], "'schedule.epochs' must be in [1, inf], got 0"


def _unknown_backbone(tmp, raw):
    raw["model"]["backbone"] = "resnet181"
    return [], "timm does not know the backbone 'resnet181' (model.backbone). Close names: resnet18"


def _pretrained_without_weights(tmp, raw):
    raw["model"].update({"backbone": "resnet18", "pretrained": True, "backbone_kwargs": {}})
    return [], ("cannot download anything at run time; put the weights file on this machine and set "
                "model.pretrained_file")


def _pretrained_file_missing(tmp, raw):
    raw["model"].update({"backbone": "resnet18", "pretrained": True, "backbone_kwargs": {},
                         "pretrained_file": str(tmp / "weights.safetensors")})
    return [], f"model.pretrained_file '{tmp / 'weights.safetensors'}' does not exist"


def _set_unknown_path(tmp, raw):
    return ["--set", "data.batchsize=3"], "Override 'data.batchsize=3': there is no key 'batchsize' in data"


def _resume_without_checkpoint(tmp, raw):
    (tmp / "out").mkdir()
    return ["--resume", str(tmp / "out")], "holds no checkpoint"


def _resume_missing_dir(tmp, raw):
    return ["--resume", str(tmp / "nowhere")], "no such directory"


def _resume_changed_recipe(tmp, raw):
    started = load_recipe(_write(tmp / "started.yaml", raw))  # what the run started with
    (tmp / "out" / "checkpoints").mkdir(parents=True)
    torch.save({"recipe": started.to_dict(), "recipe_hash": started.hash()},
               tmp / "out" / "checkpoints" / "epoch_0000.pt")
    return ["--resume", str(tmp / "out"), "--set", "optim.lr=0.5"], "with a changed recipe: optim.lr: 0.05 -> 0.5"


CASES = [_unknown_plugin, _unknown_key, _wrong_type, _out_of_range, _extends_cycle, _extends_missing,
         _malformed_yaml, _missing_root, _empty_root, _corrupt_image, _k_below_2, _k_above_dataset,
         _batch_above_dataset, _zero_epochs, _unknown_backbone, _pretrained_without_weights,
         _pretrained_file_missing, _set_unknown_path, _resume_without_checkpoint, _resume_missing_dir,
         _resume_changed_recipe]


def _bad_recipe(tmp_path, raw, case):
    """The tiny recipe (one epoch, one thread) edited by ``case``: (recipe file, CLI args, needle)."""
    raw["schedule"]["epochs"] = 1
    raw["eval"] = {"pixel_baseline": "never"}
    raw["run"]["threads"] = 1
    args, needle = case(tmp_path, raw)
    recipe = tmp_path / "bad.yaml"
    _write(recipe, "name: bad\ndata: {dataset: digits\n  batch_size: [\n" if case is _malformed_yaml else raw)
    if "--resume" not in args:
        args = [*args, "--out", str(tmp_path / "out")]
    return recipe, args, needle


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.strip("_") for c in CASES])
def test_bad_input_exits_2_with_one_paragraph(tmp_path, tiny_recipe_data, case, cli):
    recipe, args, needle = _bad_recipe(tmp_path, tiny_recipe_data, case)
    res = cli("run", str(recipe), *args)
    assert needle in error_paragraph(res)
    if "--resume" not in args:
        assert not (tmp_path / "out").exists()  # a refused run leaves no run directory


def test_bad_input_through_a_real_process(tmp_path, tiny_recipe_data):
    """The process boundary: ``python -m clusterkit`` exits with status 2 and prints the one
    paragraph on its stderr, no traceback (no network retries: it fails in seconds)."""
    recipe, args, needle = _bad_recipe(tmp_path, tiny_recipe_data, _unknown_plugin)
    res = run_cli("run", str(recipe), *args)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert res.stderr.count("clusterkit: error:") == 1
    assert needle in flat(res.stderr[res.stderr.index("clusterkit: error:"):].split("\n\n")[0])


def test_odd_image_modes_train_and_corrupt_images_are_skipped(tmp_path, tiny_recipe_data, cli):
    """16-bit grayscale PNG and CMYK JPEG are converted to RGB (not an error); with
    data.skip_corrupt a garbage .png is dropped and listed in summary.json."""
    root = image_tree(tmp_path / "images")
    deep = (np.arange(64, dtype="<u2").reshape(8, 8) * 1000).tobytes()
    Image.frombytes("I;16", (8, 8), deep).save(root / "a" / "deep.png")
    Image.new("CMYK", (8, 8), (10, 200, 30, 0)).save(root / "b" / "cmyk.jpg")
    broken = root / "b" / "broken.png"
    broken.write_bytes(b"\x89PNG not really an image")
    raw = _imagefolder(tiny_recipe_data, root)
    raw["data"]["skip_corrupt"] = True
    raw["schedule"].update({"epochs": 1, "warmup_epochs": 0})
    raw["eval"] = {"pixel_baseline": "never"}
    raw["run"]["threads"] = 1
    recipe = _write(tmp_path / "odd.yaml", raw)
    res = cli("run", str(recipe), "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["skipped_images"] == [str(broken)]
    assert summary["num_train"] == 2 * 4 + 2  # both converted images are kept
