"""Unlabeled data (data.labels) and the label-free quality measures.

Loading: a flat folder or a tree of images without class folders is unlabeled; digits and
Fashion-MNIST drop their labels with labels: none.  Training: an unlabeled run trains exactly as
the labelled run of the same recipe (labels never reach training), reports no NMI/ACC/ARI,
says "unlabeled" in its protocol, and resumes, shows and predicts like any run.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from clusterkit.cli import main
from clusterkit.cluster.quality import QUALITY_KEYS, quality_metrics, size_measures
from clusterkit.data import load_dataset
from clusterkit.errors import DataError

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _pngs(folder: Path, n: int, seed: int = 0, size: int = 8) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


# -- loading ---------------------------------------------------------------------------------------

def test_flat_folder_is_unlabeled_with_paths(tmp_path):
    files = _pngs(tmp_path / "photos", 5)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    ds = load_dataset("imagefolder", tmp_path / "photos", "train", 8)
    assert not ds.has_labels and ds.classes == []
    assert ds.targets.tolist() == [-1] * 5
    assert ds.paths == [str(p) for p in files]
    images, targets, index = ds.__getitems__([0, 4])
    assert images.shape == (2, 3, 8, 8) and targets.tolist() == [-1, -1] and index.tolist() == [0, 4]


def test_auto_reads_class_folders_only_when_every_image_sits_in_one(tmp_path):
    root = tmp_path / "tree"
    _pngs(root / "a", 2)
    _pngs(root / "b", 3, seed=1)
    labelled = load_dataset("imagefolder", root, "train", 8)
    assert labelled.has_labels and labelled.classes == ["a", "b"]
    assert labelled.targets.tolist() == [0, 0, 1, 1, 1]
    _pngs(root, 1, seed=2)  # one loose image next to the folders: no longer a class layout
    loose = load_dataset("imagefolder", root, "train", 8)
    assert not loose.has_labels and len(loose) == 6
    forced = load_dataset("imagefolder", root / "a", "train", 8, labels="none")
    assert not forced.has_labels and len(forced) == 2
    dropped = load_dataset("imagefolder", root, "train", 8, labels="none")
    assert len(dropped) == 6 and (dropped.targets == -1).all()


def test_nested_tree_without_classes_is_read_at_every_depth(tmp_path):
    root = tmp_path / "deep"
    _pngs(root / "2023" / "jan", 2)
    _pngs(root / "2024", 2, seed=1)
    _pngs(root, 1, seed=2)
    ds = load_dataset("imagefolder", root, "train", 8)
    assert not ds.has_labels and len(ds) == 5
    assert sorted(Path(p).parent.name for p in ds.paths) == ["2024", "2024", "deep", "jan", "jan"]


def test_labels_folders_needs_class_folders(tmp_path):
    _pngs(tmp_path / "flat", 3)
    with pytest.raises(DataError, match="contains no class folders"):
        load_dataset("imagefolder", tmp_path / "flat", "train", 8, labels="folders")


def test_empty_folder_and_one_image_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        load_dataset("imagefolder", tmp_path / "empty", "train", 8)
    _pngs(tmp_path / "one", 1)
    with pytest.raises(DataError, match="holds only one readable image"):
        load_dataset("imagefolder", tmp_path / "one", "train", 8)


def test_digits_and_fashion_mnist_drop_their_labels():
    digits = load_dataset("digits", None, "all", labels="none")
    same = load_dataset("digits", None, "all")
    assert not digits.has_labels and digits.classes == [] and (digits.targets == -1).all()
    assert torch.equal(digits.images, same.images)
    with pytest.raises(DataError, match="only 'imagefolder' has"):
        load_dataset("digits", None, "all", labels="folders")
    if not (FASHION / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed")
    fashion = load_dataset("fashion_mnist", FASHION, "test", labels="none")
    assert len(fashion) == 10_000 and not fashion.has_labels and (fashion.targets == -1).all()


# -- quality measures ------------------------------------------------------------------------------

def test_quality_matches_scikit_learn_on_normalised_features():
    from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 12)) + np.repeat(rng.normal(scale=3, size=(3, 12)), 200, axis=0)
    y = np.repeat(np.arange(3), 200)
    q = quality_metrics(torch.tensor(x), torch.tensor(y), k=3, confidence=torch.full((600,), 0.5))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert q["silhouette"] == pytest.approx(silhouette_score(x, y, metric="cosine"), abs=1e-6)
    assert q["calinski_harabasz"] == pytest.approx(calinski_harabasz_score(unit, y), rel=1e-6)
    assert q["davies_bouldin"] == pytest.approx(davies_bouldin_score(unit, y), rel=1e-6)
    assert q["size_entropy"] == pytest.approx(1.0) and q["min_share"] == q["max_share"] == pytest.approx(1 / 3)
    assert q["mean_confidence"] == pytest.approx(0.5)
    shuffled = quality_metrics(x, rng.permutation(y), k=3)  # random labels: a worse clustering
    assert shuffled["silhouette"] < q["silhouette"] - 0.2
    assert shuffled["davies_bouldin"] > q["davies_bouldin"]


def test_silhouette_sample_is_seeded_and_bounded():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(900, 4)), rng.integers(0, 3, 900)
    a = quality_metrics(x, y, sample=300, seed=5)["silhouette"]
    assert a == quality_metrics(x, y, sample=300, seed=5)["silhouette"]
    assert a != quality_metrics(x, y, sample=300, seed=6)["silhouette"]


def test_size_measures_count_empty_clusters_and_one_cluster_has_no_separation():
    s = size_measures([0, 0, 0, 1], k=3)  # cluster 2 is empty
    shares = np.array([0.75, 0.25])
    assert s["size_entropy"] == pytest.approx(-(shares * np.log(shares)).sum() / np.log(3))
    assert s["min_share"] == 0.0 and s["max_share"] == 0.75
    q = quality_metrics(np.random.default_rng(0).normal(size=(10, 3)), np.zeros(10, dtype=int), k=2)
    assert q["silhouette"] is None and q["davies_bouldin"] is None and q["size_entropy"] == 0.0


# -- training --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unlabeled_pair(tmp_path_factory):
    """The tiny recipe trained twice (2 epochs): on digits with labels, and with labels: none.
    Trained once for the tests below, which read the runs (the resume test works on a copy)."""
    import copy

    from conftest import TINY, torch_settings_kept

    tmp = tmp_path_factory.mktemp("pair")
    raw = copy.deepcopy(TINY)
    raw["run"].update({"threads": 1, "keep_last": 3})
    runs = {}
    for labels in ("auto", "none"):
        raw["data"]["labels"] = labels
        recipe = tmp / f"{labels}.yaml"
        recipe.write_text(yaml.safe_dump(raw))
        with torch_settings_kept():
            assert main(["run", str(recipe), "--out", str(tmp / labels)]) == 0
        runs[labels] = (recipe, tmp / labels)
    return runs


def test_unlabeled_run_trains_as_the_labelled_one_without_label_metrics(unlabeled_pair, capsys):
    (_, labelled), (_, unlabeled) = unlabeled_pair["auto"], unlabeled_pair["none"]
    a = json.loads((labelled / "summary.json").read_text())
    b = json.loads((unlabeled / "summary.json").read_text())
    assert b["protocol"]["labels"] == "unlabeled" and a["protocol"]["labels"].startswith("labelled")
    assert b["metrics"] == {"nmi": None, "acc": None, "ari": None} and b["pixel_kmeans"] is None
    assert all(a["metrics"][k] is not None for k in ("nmi", "acc", "ari"))
    assert a["quality"] == b["quality"] and set(b["quality"]) == set(QUALITY_KEYS)  # same training, same clusters
    assert -1 <= b["quality"]["silhouette"] <= 1 and 0 < b["quality"]["size_entropy"] <= 1
    ka = torch.load(labelled / "checkpoints" / "epoch_0001.pt", weights_only=False)["model"]
    kb = torch.load(unlabeled / "checkpoints" / "epoch_0001.pt", weights_only=False)["model"]
    assert all(torch.equal(ka[name], kb[name]) for name in ka)  # labels never reach training
    records = [json.loads(line) for line in (unlabeled / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "silhouette" in r]
    assert [r["epoch"] for r in evaluated] == [1, 2]
    assert not any(k in r for r in records for k in ("nmi", "acc", "ari"))
    capsys.readouterr()
    assert main(["show", str(unlabeled)]) == 0
    shown = capsys.readouterr().out
    assert "unlabeled data: no NMI/ACC/ARI" in shown and "silh" in shown and "NMI " not in shown


def test_unlabeled_run_resumes_to_the_same_end(unlabeled_pair, tmp_path, restore_threads):
    import shutil

    recipe, done = unlabeled_pair["none"]
    cut = tmp_path / "cut"
    shutil.copytree(done, cut)
    (cut / "checkpoints" / "epoch_0001.pt").unlink()
    (cut / "summary.json").unlink()
    assert main(["run", str(recipe), "--resume", str(cut)]) == 0
    again = json.loads((cut / "summary.json").read_text())
    assert again["quality"] == json.loads((done / "summary.json").read_text())["quality"]


def test_unlabeled_run_predicts_new_images(unlabeled_pair, tmp_path, capsys):
    from clusterkit.data.readers import _digits_arrays

    _, run = unlabeled_pair["none"]
    images = _digits_arrays()[0][:6, 0]
    folder = tmp_path / "new"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i}.png")
    capsys.readouterr()
    assert main(["predict", str(run), "--images", str(folder), "--out", str(tmp_path / "p.csv")]) == 0
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "path,cluster,confidence" and len(rows) == 7
    assert all(0 <= int(r.split(",")[1]) < 10 for r in rows[1:])


def test_torchrun_two_processes_on_an_unlabeled_folder(tmp_path):
    """torchrun, 2 gloo processes, a flat folder: rank 0 alone writes an unlabeled summary."""
    import os
    import subprocess
    import sys

    from conftest import TINY

    _pngs(tmp_path / "flat", 24)
    raw = {**TINY, "data": {**TINY["data"], "dataset": "imagefolder", "root": str(tmp_path / "flat"),
                            "batch_size": 8, "eval_batch_size": 16},
           "e_step": {"k": 3}, "schedule": {"epochs": 2, "warmup_epochs": 1},
           "run": {**TINY["run"], "threads": 1, "device": "cpu"}, "eval": {"pixel_baseline": "never"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "clusterkit",
           "run", "r.yaml", "--out", "out"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(2 processes)" in proc.stderr and proc.stdout.count("label-free quality") == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["protocol"]["labels"] == "unlabeled"
    assert summary["metrics"]["nmi"] is None and summary["quality"]["size_entropy"] is not None
    assert summary["steps"] == 2 * 3  # 24 images over 2 ranks: 12 per rank, 4 per step -> 3 steps per epoch
    epochs = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if "seconds" in r] == [1, 2]


def test_compare_reports_label_free_quality_of_unlabeled_runs(tmp_path, restore_threads):
    import copy
    import csv
    import statistics

    from conftest import TINY

    from clusterkit.compare import compare

    raw = copy.deepcopy(TINY)
    raw["data"]["labels"] = "none"
    raw["schedule"] = {"epochs": 1, "warmup_epochs": 0}
    raw["run"]["threads"] = 1
    recipe = tmp_path / "tiny_unlabeled.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    res = compare([str(recipe)], seeds=[0, 1], out=tmp_path / "cmp", isolate=False, echo=None)
    assert res.ok
    summaries = [r.summary for r in res.runs]
    silhouettes = [s["quality"]["silhouette"] for s in summaries]
    row = next(csv.DictReader((tmp_path / "cmp" / "results.csv").open()))
    assert row["nmi_mean"] == "" and row["acc_mean"] == ""  # nothing from fake labels
    assert float(row["silhouette_mean"]) == pytest.approx(statistics.mean(silhouettes))
    assert float(row["silhouette_std"]) == pytest.approx(statistics.stdev(silhouettes))
    md = (tmp_path / "cmp" / "results.md").read_text()
    assert "## Label-free quality" in md
    quality_row = md.split("## Label-free quality")[1].split("\n| tiny")[1].split("\n")[0]
    assert f"{statistics.mean(silhouettes):.3f} ± {statistics.stdev(silhouettes):.3f}" in quality_row
    assert "Label-free clustering quality" in (tmp_path / "cmp" / "results.tex").read_text()


def test_compare_reuses_a_run_made_before_data_labels_existed(tmp_path):
    """A finished run whose recipe.yaml lacks data.labels (an older clusterkit) is the same recipe."""
    import copy

    from conftest import TINY

    from clusterkit.compare.plan import plan_run
    from clusterkit.recipe import load_recipe

    recipe = load_recipe(data=copy.deepcopy(TINY))
    old = recipe.to_dict()
    del old["data"]["labels"]
    run = tmp_path / "seed0"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump(old))
    (run / "summary.json").write_text(json.dumps({"recipe_hash": "0123456789ab"}))
    assert plan_run(run, recipe) == "reuse"
    changed = load_recipe(data={**copy.deepcopy(TINY), "schedule": {"epochs": 7}})
    with pytest.raises(Exception, match="different recipe"):
        plan_run(run, changed)
