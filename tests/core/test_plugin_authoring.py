"""The third-party plugin path, tried as a plugin author would.

* clusterkit.testing on a built-in plugin and on deliberately broken plugins (each must fail
  its check with a message that says what is wrong);
* plugin management: versions in ``clusterkit plugins``, the duplicate-name error,
  ``CLUSTERKIT_DISABLE_PLUGIN_AUTOLOAD`` and a recipe's ``allow_plugins``;
* the example package in examples/: pip-installed into this environment, listed by
  ``clusterkit plugins``, trained for an epoch from its recipe, and its own tests run;
* ``clusterkit new-plugin``: the skeleton installs and its tests pass; bad names exit 2.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import torch
import torch.nn.functional as F
from conftest import flat
from torch import nn

from clusterkit import Plugin, hookimpl
from clusterkit.cli import main
from clusterkit.errors import PluginError, RecipeError
from clusterkit.plugin_manager import AUTOLOAD_ENV, PluginInfo, discover, installed, load_plugins, select
from clusterkit.recipe import load_recipe
from clusterkit.schema import positive
from clusterkit.testing import PluginCheckError, check_checkpoint_roundtrip, check_losses, synthetic_dataset, train_tiny
from clusterkit.trainer import Trainer

pytest_plugins = ["clusterkit.testing"]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "clusterkit-align-uniform"
BYOL = {"byol_target": {"hidden_dim": 32, "out_dim": 16}}


def _env() -> dict:
    """The environment for subprocesses: this interpreter's, without the autoload switch."""
    return {k: v for k, v in os.environ.items() if k != AUTOLOAD_ENV}


def _run(*args, cwd=ROOT, timeout=300):
    return subprocess.run([*args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# clusterkit.testing on built-in plugins
# ---------------------------------------------------------------------------------------------

def test_synthetic_data_is_deterministic_and_labelled_by_pattern():
    a, b = synthetic_dataset(64, classes=4, seed=3), synthetic_dataset(64, classes=4, seed=3)
    assert torch.equal(a.images, b.images) and a.images.shape == (64, 1, 8, 8) and a.images.dtype == torch.uint8
    assert a.targets.tolist() == [i % 4 for i in range(64)]
    assert not torch.equal(a.images, synthetic_dataset(64, classes=4, seed=4).images)


def test_train_tiny_runs_a_builtin_loss_and_returns_the_summary():
    summary = train_tiny("diffused_sampling", with_plugins=BYOL)
    assert summary["steps"] == 4 and summary["protocol"]["dataset"] == "synthetic"
    (epoch,) = summary["history"]
    assert set(summary["metrics"]) == {"nmi", "acc", "ari"} and "diffused_sampling" in epoch


def test_check_losses_on_builtins_reports_terms_and_gradients():
    report = check_losses("diffused_sampling", with_plugins=BYOL)
    assert set(report.terms) == {"diffused_sampling"} and report.backbone_grad["diffused_sampling"] > 0
    # byol_target has no loss: its projector and predictor are trained by the companion's loss
    report = check_losses("byol_target", BYOL["byol_target"], with_plugins={"diffused_sampling": {}})
    assert report.terms == {} and set(report.module_grad) == {"projector", "predictor"}


def test_checkpoint_roundtrip_of_a_stateful_builtin(plugin_tester):
    """DigPro's momentum grouping keeps groups, a memory bank and a counter as buffers."""
    summary = plugin_tester.check_checkpoint_roundtrip(
        "momentum_grouping", {"bank_size": 128, "regroup_every": 3},
        with_plugins={**BYOL, "kmeans_e_step": {"n_init": 1, "max_iter": 10}, "diffused_sampling": {}})
    assert summary["steps"] == 8


# ---------------------------------------------------------------------------------------------
# ... and on broken plugins
# ---------------------------------------------------------------------------------------------

class _Head(Plugin):
    """A projector of its own on cache['h', v]; subclasses break it in one way each."""

    @attrs.define
    class Params:
        weight: float = attrs.field(default=1.0, validator=positive, metadata={"doc": "loss weight"})

    key = "probe_head"

    @hookimpl
    def setup(self, state):
        state.model[self.key] = nn.Linear(state.model["backbone"].num_features, 8)

    def z(self, state, cache, view):
        return F.normalize(state.model[self.key](cache["h", view]), dim=1)

    def loss(self, state, cache):
        return self.params.weight * (self.z(state, cache, 0) - self.z(state, cache, 1)).pow(2).sum(1).mean()

    @hookimpl
    def compute_losses(self, state, cache):
        return {"probe": self.loss(state, cache)}


class DetachedLoss(_Head):
    def loss(self, state, cache):
        return super().loss(state, cache).detach()


class DetachedFeatures(_Head):
    def z(self, state, cache, view):
        return F.normalize(state.model[self.key](cache["h", view].detach()), dim=1)


class DeadModule(_Head):
    @hookimpl
    def setup(self, state):
        super().setup(state)
        state.model["probe_unused"] = nn.Linear(4, 4)


class NonFinite(_Head):
    def loss(self, state, cache):
        return super().loss(state, cache) * torch.log(torch.zeros(()))


class LooseCounter(_Head):
    """Scales its loss by a step counter kept in a plain attribute: lost on resume."""

    def __init__(self, params=None):
        super().__init__(params)
        self.calls = 0

    def loss(self, state, cache):
        self.calls += 1
        return super().loss(state, cache) * (1 + self.calls % 3)


class BufferedCounter(_Head):
    """The same counter kept in a buffer of its module: checkpointed, so a resume is exact."""

    @hookimpl
    def setup(self, state):
        super().setup(state)
        state.model[self.key].register_buffer("calls", torch.zeros((), dtype=torch.long))

    def loss(self, state, cache):
        calls = state.model[self.key].calls
        calls += 1
        return super().loss(state, cache) * (1 + int(calls) % 3)


def test_a_healthy_plugin_class_passes_every_check(plugin_tester):
    report = plugin_tester.check_losses(_Head, name="probe")
    assert report.terms["probe"] > 0 and report.module_grad["probe_head"] > 0
    summary = plugin_tester.train(_Head, {"weight": 0.5}, name="probe")
    assert summary["history"][0]["probe"] > 0


@pytest.mark.parametrize("cls, message", [
    (DetachedLoss, "loss term 'probe' is detached from the autograd graph"),
    (DetachedFeatures, "the gradient of loss term 'probe' does not reach the backbone"),
    (DeadModule, r"parameters of state.model\['probe_unused'\], which its setup added, get no gradient"),
    (NonFinite, "loss term 'probe' is -inf on the first training step"),
])
def test_broken_plugins_fail_the_loss_check_with_the_reason(cls, message):
    with pytest.raises(PluginCheckError, match=message):
        check_losses(cls, name="probe")


def test_a_loss_on_detached_features_passes_when_the_backbone_is_meant_to_be_frozen():
    report = check_losses(DetachedFeatures, name="probe", backbone=False)
    assert report.backbone_grad["probe"] == 0 and report.module_grad["probe_head"] > 0


def test_state_in_a_plain_attribute_fails_the_checkpoint_roundtrip_and_a_buffer_passes(tmp_path):
    with pytest.raises(PluginCheckError, match=r"checkpoint round-trip failed: .*model\..*not in plain attributes"):
        check_checkpoint_roundtrip(LooseCounter, name="probe", run_dir=tmp_path / "loose")
    check_checkpoint_roundtrip(BufferedCounter, name="probe", run_dir=tmp_path / "buffered")


# ---------------------------------------------------------------------------------------------
# plugin management
# ---------------------------------------------------------------------------------------------

class Third(_Head):
    pass


def _third(name="probe", package="clusterkit-probe", value="probe_pkg:Third", cls=Third):
    return PluginInfo(name, value, package, "1.2.3", _cls=cls)


def _available(*extra):
    return {**discover(), **{info.name: info for info in extra}}


def test_two_packages_registering_one_name_is_an_error_naming_both():
    a, b = _third(package="pkg-one", value="one:P"), _third(package="pkg-two", value="two:P")
    with pytest.raises(PluginError, match=r"'probe': 'pkg-one' \(one:P\) and 'pkg-two' \(two:P\)"):
        select([a, b])
    # the same entry point seen twice (one distribution on two sys.path entries) is not a conflict
    assert list(select([a, a])[0]) == ["probe"]
    # a package the allow-list excludes takes no part in the check
    assert select([a, b], allow=["pkg-two"])[0]["probe"].package == "pkg-two"


def test_autoload_switch_keeps_third_party_plugins_out_unless_the_recipe_allows_them(monkeypatch):
    available = _available(_third())
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    assert all(info.package == "clusterkit" for info in discover().values())  # built-ins only
    with pytest.raises(PluginError, match=rf"'probe' \(package 'clusterkit-probe' 1.2.3\) is installed but not "
                                          rf"loaded: {AUTOLOAD_ENV} is set.*allow_plugins: \[probe\]"):
        load_plugins({"diffused_sampling": {}, "probe": {}}, available)
    for allow in (["probe"], ["clusterkit-probe"], ["Clusterkit_Probe"]):  # plugin or package name (PEP 503)
        _, plugins = load_plugins({"diffused_sampling": {}, "probe": {}}, available, allow=allow)
        assert list(plugins) == ["diffused_sampling", "probe"]
    for off in ("0", "false", ""):
        monkeypatch.setenv(AUTOLOAD_ENV, off)
        assert "probe" in load_plugins({"probe": {}}, available)[1]


def test_allow_list_loads_only_the_named_plugins_without_the_switch(monkeypatch, tmp_path, tiny_recipe_data):
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    other = _third(name="other", package="clusterkit-other", value="other:Third")
    available = _available(_third(), other)
    _, plugins = load_plugins({"probe": {}, "kmeans_e_step": {}}, available, allow=["probe"])
    assert list(plugins) == ["probe", "kmeans_e_step"]  # built-ins are always allowed
    with pytest.raises(RecipeError, match=r"'other' \(package 'clusterkit-other' 1.2.3\).*allow_plugins \(probe\) "
                                          r"names neither it nor its package"):
        load_plugins({"probe": {}, "other": {}}, available, allow=["probe"])
    with pytest.raises(RecipeError, match=r"allow_plugins names 'prob'.*Did you mean 'probe'"):
        load_plugins({"probe": {}}, available, allow=["prob"])
    # through a recipe and the trainer: refused before any data is loaded or model built
    raw = {**tiny_recipe_data, "allow_plugins": [], "plugins": {**tiny_recipe_data["plugins"], "other": {}}}
    trainer = Trainer(load_recipe(data=raw), tmp_path, available_plugins=available)
    with pytest.raises(RecipeError, match=r"allow_plugins \(empty\)"):
        trainer.fit()
    assert trainer.train_ds is None  # no data was loaded
    with pytest.raises(RecipeError, match="'allow_plugins' must be a list"):
        load_recipe(data={"allow_plugins": "probe"})


def test_plugins_command_shows_package_and_version(capsys):
    assert main(["plugins", "--params", "kmeans_e_step"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("kmeans_e_step  [built-in]\n  package: clusterkit 0.1.0\n")
    assert main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["package"], r["version"]) for r in rows if r["source"] == "built-in"} == {("clusterkit", "0.1.0")}


def test_plugins_command_under_the_autoload_switch(monkeypatch, capsys):
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    monkeypatch.setattr("clusterkit.plugin_manager.installed", lambda: [*installed(), _third(cls=None)])
    assert main(["plugins"]) == 0
    captured = capsys.readouterr()
    assert "probe" not in captured.out and f"{AUTOLOAD_ENV} is set: " in captured.err and "probe" in captured.err
    assert main(["plugins", "--params", "probe"]) == 2
    assert "installed but not loaded" in flat(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------
# the example package, installed like a user's
# ---------------------------------------------------------------------------------------------

def _installed_from(folder: Path, dist: str) -> bool:
    """True when distribution ``dist`` is installed editable from ``folder`` (nothing to do)."""
    try:
        direct = json.loads(md.distribution(dist).read_text("direct_url.json") or "{}")
    except md.PackageNotFoundError:
        return False
    return direct.get("url") == folder.as_uri() and direct.get("dir_info", {}).get("editable", False)


def pip_install(folder: Path, dist: str) -> None:
    """``pip install --no-deps --no-build-isolation -e folder`` into this interpreter, unless done."""
    if _installed_from(folder, dist):
        return
    res = _run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(folder))
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture(scope="module")
def example_installed():
    pip_install(EXAMPLE, "clusterkit-align-uniform")
    return EXAMPLE


def test_example_is_listed_by_clusterkit_plugins(example_installed):
    res = _run(sys.executable, "-m", "clusterkit", "plugins", "--params", "align_uniform")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("align_uniform  [clusterkit-align-uniform 0.1.0]")
    assert "hooks:  setup, register_outputs, compute_losses" in res.stdout
    assert "t: float = 2.0  -- temperature of the uniformity Gaussian kernel" in res.stdout


def test_example_recipe_trains_for_an_epoch(example_installed, tmp_path):
    res = _run(sys.executable, "-m", "clusterkit", "run", str(EXAMPLE / "recipes" / "align_uniform_digits.yaml"),
               "--out", str(tmp_path / "run"), "--set", "schedule.epochs=1", "--set", "data.image_size=8",
               "--set", "data.batch_size=256", "--set", "model.backbone_kwargs.channels=[8,16,16,32]",
               "--set", "plugins.align_uniform.hidden_dim=32", "--set", "run.threads=1",
               "--set", "plugins.kmeans_e_step.n_init=1", "--set", "eval.pixel_baseline=never",
               "--set", "run.progress=false")
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 1797 // 256 and summary["metrics"]["nmi"] > 0
    assert summary["protocol"]["prediction"] == ("predict hook: kmeans_e_step "
                                                 "(spherical k-means (n_init 1) of the features)")
    (epoch,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                if "seconds" in line]
    assert epoch["au_uniform"] < 0 < epoch["au_align"]


def test_example_package_tests_pass(example_installed):
    res = _run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE), cwd=EXAMPLE)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "skipped" not in res.stdout


# ---------------------------------------------------------------------------------------------
# clusterkit new-plugin
# ---------------------------------------------------------------------------------------------

def test_new_plugin_skeleton_installs_and_its_tests_pass(tmp_path):
    assert main(["new-plugin", "ck_skeleton_probe", "--dir", str(tmp_path)]) == 0
    root = tmp_path / "clusterkit-ck-skeleton-probe"
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == [
        "README.md", "clusterkit_ck_skeleton_probe/__init__.py", "clusterkit_ck_skeleton_probe/plugin.py",
        "pyproject.toml", "recipes/ck_skeleton_probe_digits.yaml", "tests/test_ck_skeleton_probe.py"]
    try:
        pip_install(root, "clusterkit-ck-skeleton-probe")
        res = _run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root), cwd=root)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
        assert "6 passed" in res.stdout
    finally:
        _run(sys.executable, "-m", "pip", "uninstall", "-y", "-q", "clusterkit-ck-skeleton-probe")
    assert "ck_skeleton_probe" not in {info.name for info in installed()}


@pytest.mark.parametrize("name, message", [
    ("My-Loss", "'My-Loss' is not a valid plugin name"),
    ("2fast", "'2fast' is not a valid plugin name"),
    ("class", "'class' is not a valid plugin name"),
    ("diffused_sampling", "'diffused_sampling' is already registered by the installed package 'clusterkit'"),
])
def test_new_plugin_refuses_bad_names(name, message, tmp_path, capsys):
    assert main(["new-plugin", name, "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clusterkit: error: ") and message in " ".join(err.split())
    assert list(tmp_path.iterdir()) == []


def test_new_plugin_refuses_an_existing_folder(tmp_path, capsys):
    (tmp_path / "clusterkit-my-loss").mkdir()
    assert main(["new-plugin", "my_loss", "--dir", str(tmp_path)]) == 2
    assert "already exists" in flat(capsys.readouterr().err)  # the paragraph wraps after the temporary path
