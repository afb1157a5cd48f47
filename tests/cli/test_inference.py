"""Using finished runs: clusterkit.load(...).predict/.embed, `clusterkit predict` and `clusterkit show`."""

import copy
import csv
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import flat
from PIL import Image

import clusterkit
from clusterkit.cli import main
from clusterkit.cluster import cluster_metrics
from clusterkit.data import load_dataset
from clusterkit.errors import DataError, PluginError
from clusterkit.recipe import load_recipe
from clusterkit.trainer import Trainer


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None, "all")


@pytest.fixture(scope="module")
def trained(tiny_run):
    """A tiny finished ProPos run and the predictions of its own final evaluation (read only)."""
    return tiny_run


def test_load_predicts_the_runs_own_final_clusters(trained, digits):
    run_dir, final, summary = trained
    model = clusterkit.load(run_dir)
    assert model.finished and model.epoch == 2 and model.num_clusters == 10
    images = digits.all_images()
    pred = model.predict(images)
    assert torch.equal(pred.labels, final.labels.cpu())
    assert torch.allclose(pred.confidence, final.confidence.cpu(), atol=1e-5)
    assert cluster_metrics(digits.targets, pred.labels) == summary["metrics"]
    # new images are assigned to the saved centres, never re-clustered: a few images keep their clusters
    few = model.predict(images[100:107])
    assert torch.equal(few.labels, pred.labels[100:107])
    feats = model.embed(images[:5])
    assert feats.shape == (5, 16) and feats.dtype == torch.float32
    assert torch.allclose(feats.norm(dim=1), torch.ones(5), atol=1e-5)  # byol_target's norm(k)


def test_predict_accepts_single_float_and_rgb_images(trained, digits):
    model = clusterkit.load(trained[0])
    images = digits.all_images()[:6]
    ref = model.predict(images).labels
    assert int(model.predict(images[0].float() / 255).labels) == int(ref[0])           # (C, H, W) float in [0, 1]
    assert int(model.predict(images[1, 0].numpy()).labels) == int(ref[1])              # (H, W) numpy uint8
    rgb = images.expand(-1, 3, -1, -1)
    assert torch.equal(model.predict(rgb).labels, ref)                                # luma of gray RGB = gray
    with pytest.raises(DataError, match="raw pixel values"):
        model.predict((images.float() - 100) / 50)                                    # already normalised
    with pytest.raises(DataError, match="channels"):
        model.predict(torch.zeros(2, 5, 8, 8, dtype=torch.uint8))


def write_pngs(folder, images, rgb=()):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        array = image[0].numpy()
        im = Image.fromarray(array, mode="L")
        if i in rgb:
            im = im.convert("RGB")
        path = folder / f"img_{i:03d}.png"
        im.save(path)
        paths.append(path)
    return paths


def test_cli_predict_writes_one_row_per_image(trained, digits, tmp_path, capsys):
    run_dir = trained[0]
    images = digits.all_images()[200:212]
    write_pngs(tmp_path / "imgs" / "nested", images[:8], rgb=(3,))
    write_pngs(tmp_path / "more", images[8:])
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")  # ignored inside folders
    out = tmp_path / "preds.csv"
    single = tmp_path / "more" / "img_001.png"
    assert main(["predict", str(run_dir), "--images", str(tmp_path / "imgs"), str(single), "--out", str(out)]) == 0
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "cluster", "confidence"]
    assert len(rows) == 9 and rows[-1]["path"] == str(single)
    clusters = [int(r["cluster"]) for r in rows]
    assert all(0 <= c < 10 for c in clusters)
    assert all(-1.0 <= float(r["confidence"]) <= 1.0 + 1e-6 for r in rows)
    expected = clusterkit.load(run_dir).predict(torch.cat([images[:8], images[9:10]])).labels.tolist()
    assert clusters == expected  # PNG round trip of uint8 digits is lossless
    assert "9 images" in capsys.readouterr().err
    assert main(["predict", str(run_dir), "--images", str(single)]) == 0  # no --out: CSV on stdout
    assert capsys.readouterr().out.splitlines()[0] == "path,cluster,confidence"


def test_cli_predict_errors_are_one_paragraph_with_exit_status_2(trained, tmp_path, capsys):
    run_dir = trained[0]
    good = write_pngs(tmp_path / "ok", torch.zeros(1, 1, 8, 8, dtype=torch.uint8))[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    (tmp_path / "empty").mkdir()
    no_ckpt = tmp_path / "unstarted_run"
    no_ckpt.mkdir()
    (no_ckpt / "recipe.yaml").write_text("name: x\n")
    cases = [
        (["predict", str(run_dir), "--images", str(tmp_path / "nope.png")], "does not exist"),
        (["predict", str(run_dir), "--images", str(good), str(broken)], "broken.png"),
        (["predict", str(run_dir), "--images", str(tmp_path / "empty")], "holds no image files"),
        (["predict", str(no_ckpt), "--images", str(good)], "holds no checkpoint"),
        (["predict", str(tmp_path / "no_run"), "--images", str(good)], "does not exist"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        # the paragraph is wrapped at 100 columns wherever the temporary path ends: compare it flat
        assert err.startswith("clusterkit: error:") and needle in flat(err) and "Traceback" not in err, err


def test_a_checkpoint_without_saved_centres_cannot_assign(trained, digits):
    model = clusterkit.load(trained[0])
    model.plugins["kmeans_e_step"].predict_centers = None  # as a checkpoint written before any evaluation
    with pytest.raises(PluginError, match="cannot assign new images"):
        model.predict(digits.all_images()[:3])


def test_the_core_kmeans_rule_also_keeps_its_centres(tmp_path, tiny_recipe_data, digits):
    """Without a predict plugin the core's k-means predicts; new images go to its saved centres."""
    data = copy.deepcopy(tiny_recipe_data)
    data["plugins"] = {"byol_target": {"hidden_dim": 32, "out_dim": 16}, "diffused_sampling": {}}
    data["schedule"]["epochs"] = 1
    data["eval"] = {"pixel_baseline": "never"}
    trainer = Trainer(load_recipe(data=data), tmp_path)
    trainer.fit()
    pred = clusterkit.load(tmp_path).predict(digits.all_images())
    assert torch.equal(pred.labels, trainer.last_prediction.labels.cpu())


def test_show_prints_summary_recipe_diff_and_metrics_table(trained, tmp_path, capsys):
    run_dir = trained[0]
    assert main(["show", str(run_dir)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"NMI {summary['metrics']['nmi']:.3f}" in out and "k-means on the raw pixels" in out
    assert "protocol: digits, trained on 'all'" in out and "peak memory" in out
    assert "recipe vs. clusterkit's defaults" in out
    assert "plugins.byol_target.hidden_dim: 4096 -> 32" in out and "schedule.epochs: 100 -> 2" in out
    assert "plugins.kmeans_e_step.metric" not in out  # unchanged defaults are not listed
    table = out.split("per epoch")[1].splitlines()[1:]
    assert table[0].split()[:2] == ["epoch", "loss"] and "nmi" in table[0]
    assert [line.split()[0] for line in table[1:]] == ["1", "2"]
    # against another recipe file, and an unfinished copy of the run
    from conftest import TINY

    other = copy.deepcopy(TINY)
    other["optim"]["lr"] = 0.2
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    assert main(["show", str(run_dir), "--base", str(tmp_path / "other.yaml")]) == 0
    out = capsys.readouterr().out
    diff = out.split("recipe vs.")[1].split("per epoch")[0]
    assert "optim.lr: 0.2 -> 0.05" in diff and len(diff.strip().splitlines()) == 2
    cut = tmp_path / "cut"
    shutil.copytree(run_dir, cut)
    (cut / "summary.json").unlink()
    assert main(["show", str(cut)]) == 0
    assert "UNFINISHED: 2 of 2 epochs logged" in capsys.readouterr().out
    assert main(["show", str(tmp_path / "nothing")]) == 2


def test_images_are_found_recursively_and_sorted(tmp_path):
    from clusterkit.inference import find_images

    write_pngs(tmp_path / "b", torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    write_pngs(tmp_path / "a", torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    found = find_images([tmp_path])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/img_000.png", "b/img_000.png", "b/img_001.png"]
    with pytest.raises(DataError, match="not an image file"):
        (tmp_path / "x.txt").write_text("x")
        find_images([tmp_path / "x.txt"])
    assert np.array_equal(np.asarray(Image.open(found[0])), np.zeros((8, 8), dtype=np.uint8))
