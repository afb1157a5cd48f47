"""End to end through the CLI: a tiny run, its files, resume equivalence and user errors.

The commands run in this process (``clusterkit.cli.main``); ``--debug``'s traceback is the
one case here that needs a real ``python -m clusterkit`` process."""

import importlib.metadata
import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import flat

import clusterkit
from clusterkit.cli import main


def run_cli(*args):
    """A real ``python -m clusterkit`` process."""
    return subprocess.run([sys.executable, "-m", "clusterkit", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture
def tiny_file(tmp_path, tiny_recipe_data):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_data))
    return path


def test_run_writes_summary_metrics_recipe_and_checkpoints(tmp_path, tiny_file, capsys):
    out = tmp_path / "run"
    assert main(["run", str(tiny_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "NMI" in printed and "k-means on pixels" in printed
    summary = json.loads((out / "summary.json").read_text())
    for key in ("nmi", "acc", "ari"):
        assert 0.0 <= summary["metrics"][key] <= 1.0
        assert 0.0 <= summary["pixel_kmeans"][key] <= 1.0
    assert summary["protocol"]["train_split"] == "all"
    assert summary["protocol"]["test_data_used_for_training"] is True
    assert summary["seed"] == 0 and summary["steps"] == 2 * 7
    # the installed distributions' versions (torch's may carry a local tag, e.g. 2.4.0+cpu)
    assert summary["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert summary["versions"]["timm"] == importlib.metadata.version("timm")
    assert summary["versions"]["clusterkit"] == clusterkit.__version__
    assert len(summary["recipe_hash"]) == 12 and summary["peak_memory_mb"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "nmi" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert {"diffused_sampling", "prototype_aggregation", "loss", "lr"} <= set(epochs[0])
    assert any("nmi" not in r for r in records)  # step records every log_every steps
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["plugins"]["byol_target"]["hidden_dim"] == 32
    assert resolved["optim"]["momentum"] == 0.9  # defaults are written out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0000.pt", "epoch_0001.pt"]


def test_resume_gives_the_uninterrupted_result(tmp_path, tiny_recipe_data):
    tiny_recipe_data["run"]["keep_last"] = 3
    tiny_file = tmp_path / "tiny.yaml"
    tiny_file.write_text(yaml.safe_dump(tiny_recipe_data))
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["run", str(tiny_file), "--out", str(full), "--set", "schedule.epochs=3"]) == 0
    shutil.copytree(full, cut)  # the same run (training is deterministic on the CPU: not trained twice)
    # simulate a crash during the last epochs: only the first checkpoint survives
    for name in ("epoch_0001.pt", "epoch_0002.pt"):
        (cut / "checkpoints" / name).unlink()
    (cut / "summary.json").unlink()
    assert main(["run", str(tiny_file), "--resume", str(cut), "--set", "schedule.epochs=3"]) == 0
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((cut / "summary.json").read_text())
    assert a["metrics"] == b["metrics"]
    wa = torch.load(full / "checkpoints" / "epoch_0002.pt", weights_only=False)["model"]
    wb = torch.load(cut / "checkpoints" / "epoch_0002.pt", weights_only=False)["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    lines = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if "nmi" in r] == [1, 2, 3]


def test_resume_refuses_a_changed_recipe(tmp_path, tiny_file, cli):
    out = tmp_path / "run"
    assert cli("run", str(tiny_file), "--out", str(out), "--set", "schedule.epochs=1").returncode == 0
    res = cli("run", str(tiny_file), "--resume", str(out), "--set", "schedule.epochs=1", "--set", "optim.lr=0.5")
    assert res.returncode == 2 and "optim.lr: 0.05 -> 0.5" in flat(res.stderr) and "Traceback" not in res.stderr


def test_existing_run_dir_is_not_overwritten(tmp_path, tiny_file, cli):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    res = cli("run", str(tiny_file), "--out", str(out))
    assert res.returncode == 2 and "--resume" in res.stderr and "--force" in res.stderr
    assert (out / "precious.txt").read_text() == "keep"


def test_debug_shows_the_traceback(tmp_path, tiny_recipe_data):
    tiny_recipe_data["plugins"]["nope"] = {}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_data))
    res = run_cli("--debug", "run", str(path))
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_builtin_plugins_come_from_entry_points():
    from clusterkit.plugin_manager import discover

    found = discover()
    for name in ("byol_target", "kmeans_e_step", "diffused_sampling", "prototype_aggregation", "momentum_grouping"):
        assert found[name].package == "clusterkit"
        assert found[name].value.startswith("clusterkit_plugins.")
        assert found[name].load().__module__.startswith("clusterkit_plugins.")


def test_plugins_lists_builtins_with_hooks_and_params(cli):
    res = cli("plugins")
    assert res.returncode == 0
    for name in ("byol_target", "kmeans_e_step", "diffused_sampling", "prototype_aggregation", "momentum_grouping"):
        assert f"{name}  [built-in]" in res.stdout
    assert "hooks:  setup, register_outputs, embed, before_optimizer_step, after_step" in res.stdout
    assert "hooks:  e_step, predict" in res.stdout
    assert "sigma: float = 0.001" in res.stdout
    one = cli("plugins", "--params", "diffused_sampling")
    assert "std of the Gaussian noise" in one.stdout and "byol_target" not in one.stdout
