"""UMAP + k-means: the strong baseline rows and clustering on the learned manifold
(clusterkit.cluster.manifold, clusterkit.baselines, kmeans_e_step's reduce: umap).

UMAP compiles its numba kernels once per process (~15-20 s on a 2-core machine); the tests
here share that compile and use small data."""

import copy
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from clusterkit.cluster import cluster_metrics
from clusterkit.cluster import manifold as mf
from clusterkit.cluster.manifold import ManifoldKMeans, UmapParams, feature_centers, umap_kmeans_scores, wanted

pytest.importorskip("umap")

REPO = Path(__file__).resolve().parents[2]


def blobs(n_per=60, k=3, d=16, spread=0.15, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1) * 3
    labels = torch.arange(k).repeat_interleave(n_per)
    return centres[labels] + spread * torch.randn(len(labels), d, generator=g), labels, centres


def test_manifold_kmeans_finds_blobs_and_places_new_points_on_the_kept_manifold(tmp_path):
    x, truth, centres = blobs()
    rule = ManifoldKMeans(3, UmapParams(n_components=4, n_neighbors=10, metric="cosine"), seed=0)
    fitted = rule.fit(x)
    assert cluster_metrics(truth, fitted.labels)["nmi"] > 0.95
    # the training points themselves get their training clusters
    assert torch.equal(rule.assign(x).labels, fitted.labels)
    # new points near a blob go to that blob's cluster (majority label of its training points)
    g = torch.Generator().manual_seed(1)
    new_truth = torch.arange(3).repeat_interleave(20)
    new = centres[new_truth] + 0.15 * torch.randn(60, 16, generator=g)
    blob_cluster = torch.stack([fitted.labels[truth == j].mode().values for j in range(3)])
    placed = rule.assign(new)
    assert (placed.labels == blob_cluster[new_truth]).float().mean() >= 0.95
    assert placed.confidence.shape == (60,) and bool((placed.confidence <= 0).all())
    # the state is tensors and plain data: it loads with weights_only=True and predicts the same
    torch.save(rule.state_dict(), tmp_path / "m.pt")
    saved = torch.load(tmp_path / "m.pt", weights_only=True)
    again = ManifoldKMeans(3, UmapParams(**saved["umap"]), seed=saved["seed"])
    again.load_state_dict(saved)
    assert torch.equal(again.assign(new).labels, placed.labels)


def test_placement_is_the_membership_weighted_mean_of_the_neighbours():
    rule = ManifoldKMeans(2, UmapParams(n_neighbors=2, metric="cosine"))
    rule.train_features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    rule.embedding = torch.tensor([[0.0, 0.0], [10.0, 0.0], [-50.0, 0.0]])
    rule.centers = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    # equidistant from the first two training points: weights equal, the midpoint of their embeddings
    assert torch.allclose(rule.place(torch.tensor([[1.0, 1.0]])), torch.tensor([[5.0, 0.0]]), atol=1e-4)
    # an exact training feature takes its training embedding
    assert torch.equal(rule.place(torch.tensor([[0.0, 2.0]])), torch.tensor([[10.0, 0.0]]))
    with pytest.raises(Exception, match="cannot assign new images"):
        ManifoldKMeans(2).assign(torch.ones(1, 2))


def test_feature_centers_are_normalised_cluster_means():
    f = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    c = feature_centers(f, torch.tensor([0, 1, 1]), 3)
    assert torch.allclose(c, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))


def test_auto_follows_the_pixel_baseline():
    assert wanted("auto", "auto", 1797, 64) and not wanted("auto", "auto", 10_000, 3072)
    assert not wanted("auto", "never", 10, 4) and wanted("auto", "always", 10_000, 3072)
    assert wanted("always", "never", 10, 4) and not wanted("never", "always", 10, 4)


def test_without_umap_learn_the_rows_say_how_to_install_it(monkeypatch, capsys):
    from clusterkit.errors import PluginError
    from clusterkit.plugin_manager import discover

    monkeypatch.setattr(mf, "umap_available", lambda: False)
    row = umap_kmeans_scores(np.zeros((10, 4)), 2)
    assert row == {"unavailable": "umap-learn is not installed; install it with: pip install 'clusterkit[umap]'"}
    cls = discover()["kmeans_e_step"].load()
    with pytest.raises(PluginError, match=r"pip install 'clusterkit\[umap\]'"):
        cls(cls.Params(reduce="umap"))
    from clusterkit.cli import print_run_summary

    summary = {"metrics": {"nmi": 0.8, "acc": 0.8, "ari": 0.7}, "pixel_kmeans": {"nmi": 0.7, "acc": 0.7, "ari": 0.6},
               "umap_kmeans": row, "protocol": {"dataset": "digits", "eval_split": "all", "labels": "labelled"},
               "epochs": 1, "wall_time_s": 1.0, "device": "cpu"}
    print_run_summary(summary, "t", 10, tmp := __import__("pathlib").Path("."))
    out = capsys.readouterr().out
    assert "UMAP + k-means on pixels" in out and "pip install 'clusterkit[umap]'" in out and str(tmp) in out


def _summary(seed, nmi, umap_row):
    return {"metrics": {"nmi": 0.8, "acc": 0.8, "ari": 0.7}, "epochs": 1, "wall_time_s": 1.0,
            "seconds_per_epoch": 1.0, "peak_memory_mb": 1.0, "num_params": 1,
            "protocol": {"dataset": "digits", "eval_split": "all"},
            "pixel_kmeans": {"nmi": 0.7, "acc": 0.5, "ari": 0.4}, "umap_kmeans": umap_row(nmi),
            "umap_view": {"nmi": 0.95, "acc": 0.9, "ari": 0.85, "seconds": 1.0}}


def test_compare_tables_show_the_umap_rows(tmp_path):
    from clusterkit.compare import CompareResult, RunResult, aggregate, write_csv, write_markdown, write_tex

    def run(label, seed, nmi, row=lambda v: {"nmi": v, "acc": 0.88, "ari": 0.82, "seconds": 9.0}):
        summary = _summary(seed, nmi, row)
        return RunResult(label, seed, tmp_path / label / f"seed{seed}", "ok", "started", summary=summary)

    runs = [run("a", 0, 0.90), run("a", 1, 0.92)]
    res = CompareResult(tmp_path, [aggregate("a", "a.yaml", runs)], runs, [], [])
    md = write_markdown(res, [0, 1], "clusterkit compare a", True)
    lines = md.splitlines()
    at = {name: next(i for i, line in enumerate(lines) if line.startswith(f"| {name} |"))
          for name in ("a", "k-means on pixels", "UMAP + k-means on pixels", "k-means on UMAP of the final features")}
    assert at["a"] < at["k-means on pixels"] < at["UMAP + k-means on pixels"] < at["k-means on UMAP of the final "
                                                                                    "features"]
    assert "| UMAP + k-means on pixels | baseline | 2/2 | 0.910 ± 0.014 | 0.880 ± 0.000 |" in md
    rows = list(__import__("csv").reader(io.StringIO(write_csv(res, [0, 1]))))
    umap_row = next(r for r in rows if r[0] == "UMAP + k-means on pixels")
    header = rows[0]
    assert float(umap_row[header.index("nmi_mean")]) == pytest.approx(0.91) and umap_row[2] == "baseline"
    assert all(len(r) == len(header) for r in rows)
    tex = write_tex(res, [0, 1])
    assert r"UMAP + k-means on pixels & baseline & 0.910 $\pm$ 0.014 & 0.880 $\pm$ 0.000" in tex
    # without umap-learn the row carries the note instead of numbers
    note = "umap-learn is not installed; install it with: pip install 'clusterkit[umap]'"
    runs = [run("a", 0, 0.9, row=lambda v: {"unavailable": note})]
    res = CompareResult(tmp_path, [aggregate("a", "a.yaml", runs)], runs, [], [])
    md = write_markdown(res, [0], "clusterkit compare a", True)
    assert f"| UMAP + k-means on pixels | {note} | 0/1 |" in md
    assert note in write_csv(res, [0])


def test_unlabeled_baseline_scores_are_label_free():
    x, _, _ = blobs(n_per=30)
    row = umap_kmeans_scores(x, 3, None, UmapParams(n_components=4, n_neighbors=10), seed=0)
    assert row["nmi"] is None and row["acc"] is None and row["seconds"] > 0
    assert row["quality"]["size_entropy"] > 0.95 and row["quality"]["silhouette"] > 0.5


@pytest.fixture(scope="module")
def manifold_run(tmp_path_factory):
    """The conftest tiny recipe on a folder of 200 digits (0-4, 40 each: UMAP on 1,797 points
    costs seconds per fit), 1 epoch, E-step and prediction on the UMAP manifold, both UMAP rows on."""
    from conftest import TINY, torch_settings_kept
    from PIL import Image
    from sklearn.datasets import load_digits

    from clusterkit.recipe import load_recipe
    from clusterkit.trainer import Trainer

    root = tmp_path_factory.mktemp("digits5")
    x, y = load_digits(return_X_y=True)
    for c in range(5):
        (root / str(c)).mkdir()
        for i, row in enumerate(x[y == c][:40]):
            Image.fromarray((row.reshape(8, 8) * 255 / 16).astype(np.uint8), mode="L").save(root / str(c) / f"{i}.png")
    raw = copy.deepcopy(TINY)
    raw["data"] = {**raw["data"], "dataset": "imagefolder", "root": str(root), "batch_size": 64}
    raw["schedule"] = {"epochs": 1, "warmup_epochs": 0}
    raw["e_step"] = {"k": 5}
    raw["eval"] = {"umap_baseline": "always", "umap_view": "always", "umap_neighbors": 15}
    raw["plugins"]["kmeans_e_step"] = {"n_init": 2, "reduce": "umap", "umap_neighbors": 15}
    raw["run"]["threads"] = 1
    path = tmp_path_factory.mktemp("manifold_run")
    with torch_settings_kept():
        trainer = Trainer(load_recipe(data=raw), path)
        summary = trainer.fit()
    return path, trainer, summary


def test_summary_printout_and_show_hold_the_umap_rows(manifold_run, capsys):
    path, trainer, summary = manifold_run
    pix, um, view = summary["pixel_kmeans"], summary["umap_kmeans"], summary["umap_view"]
    for row in (um, view):
        assert all(0 <= row[k] <= 1 for k in ("nmi", "acc", "ari")) and row["seconds"] > 0
        assert row["quality"]["size_entropy"] is not None
    assert um["umap"] == {"n_components": 10, "n_neighbors": 15, "min_dist": 0.0, "metric": "euclidean"}
    assert view["umap"]["metric"] == "cosine"
    # the row is UMAP (the recipe's parameters, the run's seed) of the evaluation pixels, then k-means
    ds = trainer.eval_ds
    again = umap_kmeans_scores(ds.pixels(), 5, ds.targets, UmapParams(n_neighbors=15), seed=0)
    assert (again["nmi"], again["ari"]) == (um["nmi"], um["ari"]) and pix["nmi"] != um["nmi"]
    from clusterkit.cli import main, print_run_summary

    print_run_summary(summary, "tiny", 5, path)
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("UMAP + k-means on pixels "))
    assert line.split()[-4:-1] == [f"{um[k]:.3f}" for k in ("nmi", "acc", "ari")], out
    assert "k-means on UMAP of the final features" in out
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"UMAP + k-means on pixels: NMI {um['nmi']:.3f}" in out
    assert f"k-means on UMAP of the final features: NMI {view['nmi']:.3f}" in out


def test_manifold_e_step_and_prediction(manifold_run):
    import clusterkit
    path, trainer, summary = manifold_run
    plugin = trainer.plugins["kmeans_e_step"]
    assert isinstance(plugin.manifold, ManifoldKMeans) and plugin.predict_centers is None  # no spherical k-means
    assert summary["protocol"]["prediction"] == ("predict hook: kmeans_e_step (k-means (n_init 2) on a UMAP "
                                                 "(cosine, 10 components, 15 neighbours) of the features)")
    centers = trainer.state.centers
    assert centers.shape == (5, 16) and torch.allclose(centers.norm(dim=1), torch.ones(5), atol=1e-5)
    assert summary["metrics"]["nmi"] == cluster_metrics(trainer.eval_ds.targets,
                                                        trainer.last_prediction.labels.cpu())["nmi"]
    # an E-step now (same features as the final evaluation: one UMAP + k-means serves both) publishes
    # the manifold clusters as pseudo-labels and their mean features as centres
    plugin.e_step(trainer.state)
    assert torch.equal(trainer.state.pseudo_labels.cpu(), trainer.last_prediction.labels.cpu())
    feats = trainer.state.features("train")
    assert torch.allclose(trainer.state.centers, feature_centers(feats, trainer.state.pseudo_labels, 5))
    # a finished run (checkpoint read with weights_only=True) assigns training images to their clusters
    model = clusterkit.load(path)
    pred = model.predict(trainer.eval_ds.all_images())
    assert torch.equal(pred.labels, trainer.last_prediction.labels.cpu())


def test_estep_cross_scores_a_run_under_both_rules(manifold_run, tmp_path):
    """benchmarks/estep_cross.py: both E-step rules on a run's last checkpoint; the spherical rule equals
    k-means of the run's own training features, and ``drop`` reads a checkpoint whose recipe names a
    plugin no package provides (as parity.py's runs do) without touching the run folder."""
    import importlib.util

    import torch.nn.functional as F

    from clusterkit.cluster import kmeans
    from clusterkit.errors import ClusterkitError

    spec = importlib.util.spec_from_file_location("estep_cross", REPO / "benchmarks" / "estep_cross.py")
    cross = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cross)
    path, trainer, _ = manifold_run
    res = cross.cross_scores(path, 0)
    assert res["reduce"] == "umap" and res["epoch"] == 1
    feats = trainer.state.features("train").float().cpu()
    expected = kmeans(F.normalize(feats, dim=1), 5, metric="cosine", n_init=10, seed=0)
    assert res["rules"]["spherical k-means"] == cluster_metrics(trainer.eval_ds.targets, expected.labels.cpu())
    assert all(0 <= res["rules"]["UMAP + k-means"][k] <= 1 for k in ("nmi", "acc", "ari"))
    # a run folder whose checkpoint names an unknown plugin
    ghost = tmp_path / "ghost_run"
    shutil.copytree(path, ghost)
    ckpt_path = sorted((ghost / "checkpoints").glob("epoch_*.pt"))[-1]
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["recipe"]["plugins"]["ghost_probe"] = {}
    ckpt["plugins"]["ghost_probe"] = {}
    torch.save(ckpt, ckpt_path)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in ghost.rglob("*"))
    with pytest.raises(ClusterkitError):
        cross.cross_scores(ghost, 0)
    again = cross.cross_scores(ghost, 0, drop=["ghost_probe"])
    assert again["rules"]["spherical k-means"] == res["rules"]["spherical k-means"]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in ghost.rglob("*")) == before
