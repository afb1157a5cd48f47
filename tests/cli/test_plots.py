"""Plots: every per-run and comparison picture is a valid PNG of non-trivial size; without
matplotlib the user gets the install command."""

import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import flat
from PIL import Image

from clusterkit.cli import main
from clusterkit.plots import MissingDependency, plot_confusion, plot_convergence, plot_montage, plot_run, plot_tsne

PNG = b"\x89PNG\r\n\x1a\n"
PER_RUN = ("convergence.png", "losses.png", "tsne.png", "montage.png", "confusion.png")


def assert_png(path, min_bytes=10_000, min_side=300):
    data = path.read_bytes()
    assert data[:8] == PNG, f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path} is only {len(data)} bytes"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert min(im.size) >= min_side


@pytest.fixture(scope="module")
def run_dir(tiny_run, tmp_path_factory):
    """A copy of the shared tiny run (the plots are drawn into it)."""
    path = tmp_path_factory.mktemp("plotted") / "run"
    shutil.copytree(tiny_run[0], path)
    return path


def test_plot_cli_draws_every_per_run_plot(run_dir, capsys):
    assert main(["plot", str(run_dir), "--max-points", "300"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(run_dir / "plots" / name) for name in PER_RUN]
    for name in PER_RUN:
        assert_png(run_dir / "plots" / name)


def test_plot_run_into_another_folder(run_dir, tmp_path):
    paths = plot_run(run_dir, tmp_path / "pictures", max_points=200)
    assert sorted(p.name for p in paths) == sorted(PER_RUN)
    assert all(p.parent == tmp_path / "pictures" for p in paths)


def synthetic_records(offset):
    return [{"epoch": e, "step": 7 * e, "lr": 0.1, "loss": 1.0 / e, "term_a": 0.5 / e, "seconds": 1.0,
             **({"nmi": 0.1 * e + offset, "acc": 0.08 * e + offset, "ari": 0.05 * e + offset} if e % 2 == 0 else {})}
            for e in range(1, 9)]


def test_comparison_curves_montage_confusion_and_tsne_on_synthetic_data(tmp_path):
    groups = {"method_a": [synthetic_records(0.0), synthetic_records(0.05)], "method_b": [synthetic_records(0.1)]}
    assert_png(plot_convergence(groups, tmp_path / "conv.png", baseline={"nmi": 0.5, "acc": 0.5, "ari": 0.4}))
    gen = torch.Generator().manual_seed(0)
    n, k = 400, 12  # more clusters than the 10 classes: two clusters stay unmatched
    images = torch.randint(0, 256, (n, 3, 20, 20), dtype=torch.uint8, generator=gen)
    targets = torch.arange(n) % 10
    labels = torch.where(torch.rand(n, generator=gen) < 0.7, targets, torch.randint(0, k, (n,), generator=gen))
    conf = torch.rand(n, generator=gen)
    assert_png(plot_montage(images, labels, conf, tmp_path / "montage.png", targets=targets,
                            class_names=[f"class {i}" for i in range(10)]))
    assert_png(plot_montage(images, labels, conf, tmp_path / "montage_few.png", max_clusters=4))
    assert_png(plot_confusion(targets, labels, tmp_path / "confusion.png"))
    feats = torch.randn(n, 16, generator=gen) + 3 * torch.nn.functional.one_hot(targets, 16).float()
    assert_png(plot_tsne(feats, labels, tmp_path / "tsne.png", targets=targets, max_points=150))
    assert_png(plot_tsne(feats.numpy(), np.asarray(labels), tmp_path / "tsne_one_panel.png", max_points=150))


def test_without_matplotlib_the_error_names_the_extra(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingDependency, match=r"pip install 'clusterkit\[plot\]'"):
        plot_convergence({"a": [synthetic_records(0.0)]}, tmp_path / "x.png")
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'clusterkit[plot]'" in flat(err) and "Traceback" not in err
    assert not (tmp_path / "none").exists()
