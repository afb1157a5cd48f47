"""benchmarks/parity.py's bookkeeping: which recorded clusterkit run may be reused, and what its
report says about the views.  (Training the official code needs its checkouts; not tested here.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def parity():
    spec = importlib.util.spec_from_file_location("parity_harness", REPO / "benchmarks" / "parity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _args(**kw):
    base = dict(limit=5000, batch_size=256, schedule_epochs=30, threads=2, extra_set=[],
                clusterkit_raw_pixels=False, epochs=6)
    return SimpleNamespace(**{**base, **kw})


def _recipes(tmp_path: Path, pipeline: str, comment: str = "") -> Path:
    """A paper-like base recipe and a parity recipe that extends it; returns the parity recipe."""
    (tmp_path / "paper.yaml").write_text(f"# {comment}\ndata:\n  pipeline: {pipeline}\n  batch_size: 256\n")
    child = tmp_path / "parity.yaml"
    child.write_text("extends: paper.yaml\nname: parity\ndata:\n  num_workers: 0\n")
    return child


def test_a_change_in_an_inherited_recipe_is_a_different_run(parity, tmp_path, monkeypatch):
    child = _recipes(tmp_path, "batched")
    monkeypatch.setitem(parity.RECIPES, "propos", child)
    before = parity._run_key(_args(), "propos", "clusterkit", 0)

    _recipes(tmp_path, "batched", comment="a comment changes nothing that trains")
    assert parity._run_key(_args(), "propos", "clusterkit", 0) == before

    _recipes(tmp_path, "per_image")  # the parity recipe's own text is unchanged
    after = parity._run_key(_args(), "propos", "clusterkit", 0)
    assert after != before
    assert '"pipeline": "per_image"' in after["recipe"]


def test_the_report_names_the_pipeline_the_runs_used(parity, tmp_path, monkeypatch):
    child = _recipes(tmp_path, "per_image")
    monkeypatch.setitem(parity.RECIPES, "propos", child)
    monkeypatch.setitem(parity.RECIPES, "digpro", child)
    words = parity._clusterkit_augmentation(_args(), ("propos", "digpro"))
    assert "`data.pipeline: per_image`" in words and "batched" not in words

    words = parity._clusterkit_augmentation(_args(extra_set=["data.pipeline=batched"]), ("propos", "digpro"))
    assert "`data.pipeline: batched`" in words and "per_image" not in words
