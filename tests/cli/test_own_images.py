"""A folder of images without classes, end to end through the command line: run, show, plot,
choose-k, export, predict; choosing K on features of known structure; and the bad input of
that path (empty folder, one image, K above the number of images, choose-k without features,
an export target that exists), each one paragraph with exit status 2 and nothing overwritten.

The commands run in this process (``clusterkit.cli.main``, the console script's code path, its
exit status and output captured): the process boundary is tested in test_fault_cases.py and
test_bad_input_cli.py.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, error_paragraph, run_main, torch_settings_kept
from PIL import Image

from clusterkit.choose_k import parse_ks, recommend, score_ks
from clusterkit.errors import RecipeError

# the commands run in this process: the torch settings a run changes are put back after each test
pytestmark = pytest.mark.usefixtures("restore_threads")


def run_cli(*args):
    """``clusterkit ARGS`` in this process: (returncode, stdout, stderr)."""
    return run_main(*args)


def one_paragraph(res, needle: str) -> str:
    """Exit 2, one error paragraph holding ``needle`` (whitespace-normalised), no traceback."""
    text = error_paragraph(res)
    assert needle in text, text
    return text


def _shapes_folder(folder: Path, per_shape: int = 12) -> list[Path]:
    """A flat folder of 16x16 PNGs: two kinds of picture (bright disc, dark bars), shuffled names."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]
    files = []
    for i in range(2 * per_shape):
        if i % 2:
            img = (((xx - 8) ** 2 + (yy - 8) ** 2) < 25 + rng.integers(0, 10)) * 220
        else:
            img = ((xx // 3) % 2) * 90 + 20
        rgb = np.clip(np.stack([img] * 3, -1) + rng.integers(0, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
        path = folder / f"photo_{rng.integers(1e6):06d}_{i}.png"
        Image.fromarray(rgb).save(path)
        files.append(path)
    return files


def _own_recipe_args(root: Path, out: Path) -> list[str]:
    """The README command on a tiny budget (the recipe as shipped, plus size overrides)."""
    return ["run", str(REPO / "recipes" / "own_images.yaml"), "--set", f"data.root={root}", "--out", str(out),
            "--set", "data.image_size=8", "--set", "data.batch_size=8", "--set", "schedule.epochs=2",
            "--set", "schedule.warmup_epochs=1", "--set", "e_step.k=3", "--set", "eval.every=1",
            "--set", "model.backbone_kwargs.channels=[8,8,16,16]", "--set", "plugins.byol_target.hidden_dim=32",
            "--set", "plugins.byol_target.out_dim=16", "--set", "plugins.momentum_grouping.bank_size=16",
            "--set", "run.threads=1", "--set", "run.progress=false"]


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("own")
    files = _shapes_folder(tmp / "photos")
    with torch_settings_kept():
        res = run_cli(*_own_recipe_args(tmp / "photos", tmp / "run"))
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp, files, res


# -- the README path -------------------------------------------------------------------------------

def test_readme_command_clusters_a_flat_folder(flat_run):
    tmp, files, res = flat_run
    assert "unlabeled" in res.stdout and "NMI" not in res.stdout and "silhouette" in res.stdout
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    assert summary["protocol"]["labels"] == "unlabeled" and summary["num_train"] == len(files)
    assert summary["metrics"]["nmi"] is None and summary["quality"]["size_entropy"] is not None
    shown = run_cli("show", str(tmp / "run"))
    assert shown.returncode == 0 and "unlabeled data: no NMI/ACC/ARI" in shown.stdout


def test_plot_draws_the_montage_without_labels(flat_run):
    pytest.importorskip("matplotlib")
    tmp, _, _ = flat_run
    res = run_cli("plot", str(tmp / "run"))
    assert res.returncode == 0, res.stderr[-2000:]
    names = sorted(Path(p).name for p in res.stdout.split())
    assert names == ["convergence.png", "losses.png", "montage.png", "tsne.png"]  # no confusion matrix


def test_export_links_copies_and_lists_every_image(flat_run):
    tmp, files, _ = flat_run
    res = run_cli("export", str(tmp / "run"), "--to", str(tmp / "sorted"))
    assert res.returncode == 0, res.stderr[-2000:]
    rows = list(csv.DictReader((tmp / "sorted" / "assignments.csv").open()))
    assert sorted(r["path"] for r in rows) == sorted(str(f) for f in files)
    clusters = sorted(p.name for p in (tmp / "sorted").iterdir() if p.is_dir())
    assert clusters == ["cluster_00", "cluster_01", "cluster_02"]
    for row in rows:
        target = tmp / "sorted" / row["exported"]
        assert target.is_symlink() and target.resolve() == Path(row["path"]).resolve()
        assert target.parent.name == f"cluster_{int(row['cluster']):02d}"
    for folder in clusters:  # most confident first in the names
        members = sorted((r for r in rows if f"cluster_{int(r['cluster']):02d}" == folder),
                         key=lambda r: Path(r["exported"]).name)
        confidence = [float(r["confidence"]) for r in members]
        assert confidence == sorted(confidence, reverse=True)
        assert [int(r["rank"]) for r in members] == list(range(1, len(members) + 1))
    # the same clusters as predict gives the same images
    pred = run_cli("predict", str(tmp / "run"), "--images", str(tmp / "photos"))
    assert pred.returncode == 0, pred.stderr[-2000:]
    predicted = {r["path"]: r["cluster"] for r in csv.DictReader(pred.stdout.splitlines())}
    assert predicted == {r["path"]: r["cluster"] for r in rows}

    top = run_cli("export", str(tmp / "run"), "--to", str(tmp / "top1"), "--copy", "--top", "1")
    assert top.returncode == 0, top.stderr[-2000:]
    written = [p for p in (tmp / "top1").rglob("*.png")]
    assert len(written) == 3 and not any(p.is_symlink() for p in written)
    assert all(p.name.startswith("0001_") for p in written)


def test_choose_k_writes_table_plot_and_a_recommendation(flat_run):
    tmp, _, _ = flat_run
    res = run_cli("choose-k", str(tmp / "run"), "--k", "2:5", "--out", str(tmp / "ck"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "recommended K = " in res.stdout and "silhouette" in res.stdout
    data = json.loads((tmp / "ck" / "choose_k.json").read_text())
    assert [r["k"] for r in data["rows"]] == [2, 3, 4, 5] and data["labels"] == "unlabeled"
    rec = data["recommendation"]
    best = max(data["rows"], key=lambda r: r["silhouette"])
    assert rec["criterion"] == "silhouette" and rec["k"] == best["k"]
    assert f"recommended K = {rec['k']}" in res.stdout
    assert not any("nmi" in r for r in data["rows"])  # unlabeled: no NMI column
    if (tmp / "ck" / "choose_k.png").exists() is False:
        pytest.importorskip("matplotlib")
        raise AssertionError("choose_k.png missing")


# -- choosing K on known structure -----------------------------------------------------------------

@pytest.mark.parametrize("true_k", [4, 7, 12])
def test_choose_k_finds_the_blobs(true_k):
    """Blobs in distinct directions (the features are clustered by cosine): within +-1 of the truth."""
    rng = np.random.default_rng(true_k)
    centres = rng.normal(size=(true_k, 32))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.repeat(centres, 150, axis=0) + rng.normal(scale=0.08, size=(true_k * 150, 32))
    rows = score_ks(torch.tensor(x, dtype=torch.float32), range(2, 21), progress=False)
    for criterion in ("silhouette", "calinski_harabasz", "davies_bouldin"):
        assert abs(recommend(rows, criterion).k - true_k) <= 1, criterion


def test_parse_ks():
    assert parse_ks("2:6") == [2, 3, 4, 5, 6] and parse_ks("5:20:5") == [5, 10, 15, 20]
    assert parse_ks("10,3,5") == [3, 5, 10]
    for bad in ("x", "1:5", "7", "2:9:0"):
        with pytest.raises(RecipeError):
            parse_ks(bad)


# -- bad input -------------------------------------------------------------------------------------

def test_empty_folder_is_one_paragraph(tmp_path):
    (tmp_path / "empty").mkdir()
    res = run_cli(*_own_recipe_args(tmp_path / "empty", tmp_path / "out"))
    one_paragraph(res, "holds no image files: it contains no class folders and no images")


def test_one_image_is_one_paragraph(tmp_path):
    _shapes_folder(tmp_path / "one", per_shape=1)
    (sorted((tmp_path / "one").iterdir())[0]).unlink()
    res = run_cli(*_own_recipe_args(tmp_path / "one", tmp_path / "out"))
    one_paragraph(res, "holds only one readable image")


def test_k_above_the_number_of_images_is_one_paragraph(tmp_path):
    _shapes_folder(tmp_path / "few", per_shape=3)
    res = run_cli(*_own_recipe_args(tmp_path / "few", tmp_path / "out"), "--set", "e_step.k=10",
                  "--set", "data.batch_size=4")
    one_paragraph(res, "e_step.k = 10 clusters is more than the 6 training images")


def test_choose_k_range_above_the_images_is_one_paragraph(flat_run):
    tmp, files, _ = flat_run
    res = run_cli("choose-k", str(tmp / "run"), "--k", "2:40", "--out", str(tmp / "ck_big"))
    one_paragraph(res, f"--k goes up to 40 clusters, but the run's evaluation data has {len(files)} images")
    assert not (tmp / "ck_big").exists()


def test_choose_k_without_features_is_one_paragraph(tmp_path):
    run = tmp_path / "started"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump({"name": "x"}))
    res = run_cli("choose-k", str(run))
    one_paragraph(res, "holds no checkpoint (checkpoints/epoch_*.pt), so there are no features to cluster")
    assert sorted(p.name for p in run.iterdir()) == ["recipe.yaml"]


def test_existing_outputs_are_never_overwritten(flat_run, tmp_path):
    tmp, _, _ = flat_run
    target = tmp_path / "taken"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    res = run_cli("export", str(tmp / "run"), "--to", str(target))
    one_paragraph(res, "already exists and is not empty; nothing was written or overwritten")
    assert sorted(p.name for p in target.iterdir()) == ["mine.txt"] and (target / "mine.txt").read_text() == "keep me"
    inside = run_cli("export", str(tmp / "run"), "--to", str(tmp / "photos" / "sorted"))
    one_paragraph(inside, "lies inside the run's data folder")
    assert not (tmp / "photos" / "sorted").exists()
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "choose_k.csv").write_text("mine")
    again = run_cli("choose-k", str(tmp / "run"), "--k", "2:3", "--out", str(ck))
    one_paragraph(again, "already holds choose_k.csv")
    assert (ck / "choose_k.csv").read_text() == "mine"
