"""Reliability: divergence guards, collapse warnings, and nothing lost when a run is killed.

The NaN tests inject a tiny third-party-style plugin (``nan_probe``) through
``Trainer(available_plugins=...)``; the SIGKILL test runs the real CLI in a subprocess,
kills it twice and checks that the resumed run equals an uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import attrs
import pytest
import torch
import yaml

from clusterkit.checkpoint import latest_checkpoint, save_checkpoint
from clusterkit.guards import collapse_report
from clusterkit.plugin import Plugin, hookimpl
from clusterkit.plugin_manager import PluginInfo, discover
from clusterkit.recipe import load_recipe
from clusterkit.rundir import TIMING_KEYS, trim_metrics_log
from clusterkit.trainer import DivergenceError, Trainer


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The recipes here use run.threads: 1; give the rest of the session its threads back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# collapse detection (pure function)
# ---------------------------------------------------------------------------------------------

def test_collapse_report_flags_one_dominant_cluster():
    feats = torch.randn(100, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0] * 95 + [1] * 5)
    report = collapse_report(feats, labels, k=10, share_limit=0.9, std_ratio=0.1)
    assert report["collapse_share"] == pytest.approx(0.95)
    assert [kind for kind, _ in report["warnings"]] == ["cluster_share"]
    assert report["warnings"][0][1] == pytest.approx(0.95)


def test_collapse_report_flags_features_collapsed_to_a_point():
    g = torch.Generator().manual_seed(0)
    point = torch.randn(1, 64, generator=g)
    feats = point + 1e-4 * torch.randn(200, 64, generator=g)  # every sample ~ the same direction
    labels = torch.arange(200) % 10
    report = collapse_report(feats, labels, k=10)
    assert report["collapse_share"] == pytest.approx(0.1)
    assert report["feature_std"] < 0.1 / math.sqrt(64)
    assert [kind for kind, _ in report["warnings"]] == ["feature_std"]


def test_collapse_report_is_quiet_on_spread_features_and_balanced_clusters():
    feats = torch.randn(500, 32, generator=torch.Generator().manual_seed(1))
    report = collapse_report(feats, torch.arange(500) % 5, k=5)
    assert report["warnings"] == []
    # isotropic Gaussian features: the std of the normalised features is about 1/sqrt(D)
    assert report["feature_std"] == pytest.approx(1 / math.sqrt(32), rel=0.1)
    assert collapse_report(None, torch.zeros(10, dtype=torch.long), k=2)["warnings"] == [("cluster_share", 1.0)]


# ---------------------------------------------------------------------------------------------
# divergence guard: a plugin that returns NaN on chosen steps
# ---------------------------------------------------------------------------------------------

class NanProbe(Plugin):
    """Adds a zero loss term, NaN on the chosen calls of compute_losses."""

    @attrs.define
    class Params:
        at: list[int] = attrs.field(factory=list)  # 0-based call numbers; -1: every call

    def __init__(self, params=None):
        super().__init__(params)
        self.calls = 0

    @hookimpl
    def compute_losses(self, state, cache):
        bad = -1 in self.params.at or self.calls in self.params.at
        self.calls += 1
        return {"nan_probe": torch.tensor(float("nan") if bad else 0.0)}


def _nan_trainer(tiny_recipe_data, run_dir, at, epochs=2, **run):
    """The tiny recipe (3 steps per epoch) plus nan_probe, on an injected plugin list."""
    raw = tiny_recipe_data
    raw["data"]["batch_size"] = 512
    raw["schedule"]["epochs"] = epochs
    raw["eval"] = {"pixel_baseline": "never"}
    raw["run"].update({"threads": 1, "keep_last": 5, **run})
    raw["plugins"]["nan_probe"] = {"at": at}
    available = {**discover(), "nan_probe": PluginInfo("nan_probe", "tests:NanProbe", "tests", "0", _cls=NanProbe)}
    run_dir.mkdir()
    return Trainer(load_recipe(data=raw), run_dir, available_plugins=available)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_recipe_data):
    trainer = _nan_trainer(tiny_recipe_data, tmp_path / "run", at=[4])  # epoch 2, step 2
    with pytest.raises(DivergenceError) as info:
        trainer.fit()
    msg = str(info.value)
    assert "'nan_probe' became nan at epoch 2, step 2" in msg and "last good checkpoint" in msg
    assert "run.nonfinite: skip" in msg
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["epoch_0000.pt"]
    assert not (tmp_path / "run" / "summary.json").exists()


def test_nan_steps_are_skipped_counted_and_recorded(tmp_path, tiny_recipe_data, capsys):
    trainer = _nan_trainer(tiny_recipe_data, tmp_path / "run", at=[1, 4], nonfinite="skip")
    summary = trainer.fit()
    assert summary["skipped_steps"] == 2
    assert summary["steps"] == 2 * 3 - 2  # a skipped step takes no optimiser step
    assert "skipped this optimiser step" in capsys.readouterr().err
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["skipped_steps"] == 2
    epochs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in epochs)


def test_too_many_skipped_steps_stop_the_run(tmp_path, tiny_recipe_data):
    trainer = _nan_trainer(tiny_recipe_data, tmp_path / "run", at=[-1], epochs=1, nonfinite="skip",
                           max_skipped_steps=2)
    with pytest.raises(DivergenceError, match=r"more than run.max_skipped_steps = 2"):
        trainer.fit()
    assert trainer.skipped_steps == 3 and trainer.state.step == 0


# ---------------------------------------------------------------------------------------------
# crash safety
# ---------------------------------------------------------------------------------------------

def test_latest_checkpoint_ignores_half_written_temp_files(tmp_path):
    ckpt = tmp_path / "checkpoints"
    save_checkpoint({"epoch": 0}, ckpt, 0, keep_last=3)
    (ckpt / ".epoch_0001.pt.tmp-4242").write_bytes(b"half a checkpoint")  # a save killed mid-write
    (ckpt / "epoch_0002.pt.tmp").write_bytes(b"junk")
    assert latest_checkpoint(ckpt).name == "epoch_0000.pt"
    save_checkpoint({"epoch": 1}, ckpt, 1, keep_last=3)
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch_0000.pt", "epoch_0001.pt", "epoch_0002.pt.tmp"]


def test_resume_drops_a_torn_metrics_line_and_the_killed_epoch(tmp_path, tiny_recipe_data):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"epoch": 1, "step": 2}, {"epoch": 1, "step": 7, "nmi": 0.5}, {"epoch": 2, "step": 8}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"epoch": 2, "st')
    trim_metrics_log(run, epochs_done=1, step=7)
    assert [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] == lines[:2]


def _cli(*args):
    return subprocess.Popen([sys.executable, "-m", "clusterkit", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _kill_after_checkpoint(proc, ckpt_dir, more_than: int) -> bool:
    """SIGKILL ``proc`` once ``ckpt_dir`` holds more than ``more_than`` checkpoints; False if it
    finished first."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if len(list(ckpt_dir.glob("epoch_*.pt"))) > more_than:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint appeared within 10 minutes")


def _records(run_dir):
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.append({k: v for k, v in record.items() if k not in TIMING_KEYS})
    return out


def test_sigkill_twice_then_resume_equals_the_uninterrupted_run(tmp_path, tiny_recipe_data, request):
    raw = tiny_recipe_data
    raw["schedule"]["epochs"] = 4
    raw["run"].update({"keep_last": 4, "threads": 1})
    raw["eval"] = {"pixel_baseline": "never"}
    # DigPro's grouping too: its groups, bank and counter must come back exactly (regroups every 10 steps)
    raw["plugins"]["momentum_grouping"] = {"bank_size": 512}
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    full, cut = tmp_path / "full", tmp_path / "cut"

    # the uninterrupted run, in a process of its own beside the killed ones (its result does not
    # depend on when it runs; on a machine with a free core it costs no time)
    uninterrupted = _cli("run", str(recipe), "--out", str(full))
    request.addfinalizer(uninterrupted.kill)  # not left running if the test fails early
    proc = _cli("run", str(recipe), "--out", str(cut))
    assert _kill_after_checkpoint(proc, cut / "checkpoints", 0), proc.stderr.read()
    # a checkpoint save killed mid-write leaves a temp file: it must never be loaded
    (cut / "checkpoints" / ".epoch_0003.pt.tmp-99999").write_bytes(b"torn")
    done = len(list((cut / "checkpoints").glob("epoch_*.pt")))
    proc = _cli("run", str(recipe), "--resume", str(cut))
    killed_again = _kill_after_checkpoint(proc, cut / "checkpoints", done)
    if not killed_again:
        assert proc.returncode == 0, proc.stderr.read()
    proc = _cli("run", str(recipe), "--resume", str(cut))
    assert proc.wait() == 0, proc.stderr.read()
    assert uninterrupted.wait() == 0, uninterrupted.stderr.read()

    a = json.loads((full / "summary.json").read_text())
    b = json.loads((cut / "summary.json").read_text())
    assert a["metrics"] == b["metrics"] and a["steps"] == b["steps"] == 4 * 7
    ca = torch.load(full / "checkpoints" / "epoch_0003.pt", weights_only=False)
    cb = torch.load(cut / "checkpoints" / "epoch_0003.pt", weights_only=False)
    wa, wb = ca["model"], cb["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ga, gb = ca["plugins"]["momentum_grouping"], cb["plugins"]["momentum_grouping"]  # groups, bank, counters
    assert ga.keys() == gb.keys() >= {"groups", "bank", "iteration"}
    assert all(torch.equal(ga[k], gb[k]) if torch.is_tensor(ga[k]) else ga[k] == gb[k] for k in ga)
    # metrics.jsonl: every record once, in order, identical to the uninterrupted run's
    assert _records(cut) == _records(full)
    assert [r["epoch"] for r in _records(cut) if "nmi" in r] == [1, 2, 3, 4]
    assert not list((cut / "checkpoints").glob(".*tmp*"))


# ---------------------------------------------------------------------------------------------
# plugin faults
# ---------------------------------------------------------------------------------------------

class _BrokenEntryPoint:
    def load(self):
        raise ImportError("No module named 'torch_scatter'")


def test_a_plugin_that_fails_to_import_is_reported_and_the_others_keep_working():
    from clusterkit.errors import PluginError
    from clusterkit.plugin_manager import describe, load_plugins

    broken = PluginInfo("fancy_loss", "fancy.plugin:Fancy", "fancy-clusterkit", "0.3", _BrokenEntryPoint())
    available = {**discover(), "fancy_loss": broken}
    row = describe(broken)
    assert row["source"] == "fancy-clusterkit 0.3" and "torch_scatter" in row["error"]
    _, plugins = load_plugins({"byol_target": {}}, available)  # unaffected
    assert list(plugins) == ["byol_target"]
    with pytest.raises(PluginError, match=r"'fancy_loss' \(package 'fancy-clusterkit' 0.3.*failed to import"):
        load_plugins({"byol_target": {}, "fancy_loss": {}}, available)


class Crasher(Plugin):
    @hookimpl
    def after_step(self, state):
        raise ValueError("boom")


def test_an_exception_inside_a_hook_names_the_plugin_and_the_hook(tmp_path, tiny_recipe_data):
    raw = tiny_recipe_data
    raw["schedule"]["epochs"] = 1
    raw["eval"] = {"pixel_baseline": "never"}
    raw["run"]["threads"] = 1
    raw["plugins"]["crasher"] = {}
    available = {**discover(), "crasher": PluginInfo("crasher", "tests:Crasher", "tests", "0", _cls=Crasher)}
    (tmp_path / "run").mkdir()
    with pytest.raises(ValueError, match="boom") as err:
        Trainer(load_recipe(data=raw), tmp_path / "run", available_plugins=available).fit()
    assert "clusterkit: raised by plugin 'crasher' in hook 'after_step'" in err.value.__notes__
