"""The trainer's public loop (issue 14): fit() is build/begin_run/begin_epoch/train_step/
end_epoch/summary, other modules use only public names of the engine (the Trainer and its
parts), plugin state goes through Plugin.state_dict, and the step path works with either data
pipeline."""

import ast
import copy
import json
from pathlib import Path

import pytest
import torch

from clusterkit import Plugin, hookimpl
from clusterkit.plugin_manager import PluginInfo, discover
from clusterkit.recipe import load_recipe
from clusterkit.testing import check_losses, make_trainer
from clusterkit.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


ENGINE = REPO / "clusterkit" / "engine"


def _private_engine_names() -> set[str]:
    """The ``_`` methods of the engine's classes (the Trainer and its parts) and the ``self._x``
    attributes the engine assigns."""
    names = set()
    for path in sorted(ENGINE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                names |= {f.name for f in node.body if isinstance(f, ast.FunctionDef)
                          and f.name.startswith("_") and not f.name.startswith("__")}
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                    and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return names


def test_no_module_outside_the_engine_touches_a_private_engine_name():
    private = _private_engine_names()
    assert {"_restore_rng", "_feature_memo", "_call_state_hook", "_epoch"} <= private  # the scan sees what it should
    found = []
    for folder in ("clusterkit", "plugins", "benchmarks", "tests", "examples"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.is_relative_to(ENGINE) or path == Path(__file__).resolve():
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in private:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: .{node.attr}")
                if isinstance(node, ast.FunctionDef) and node.name in private:  # an override
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: def {node.name}")
    assert not found, "private engine names used outside clusterkit/engine:\n" + "\n".join(found)


def test_fit_is_the_composition_of_the_public_steps(tmp_path, tiny_recipe_data, restore_threads):
    """Driving build/begin_run/begin_epoch/train_step/end_epoch/summary by hand gives the
    records fit() gives."""
    raw = copy.deepcopy(tiny_recipe_data)
    raw["run"]["threads"] = 1
    (tmp_path / "fit").mkdir()
    (tmp_path / "manual").mkdir()
    by_fit = Trainer(load_recipe(data=raw), tmp_path / "fit").fit()

    t = Trainer(load_recipe(data=raw), tmp_path / "manual")
    t.build()
    assert t.begin_run() == 0
    records, steps = [], 0
    for epoch in range(raw["schedule"]["epochs"]):
        t.begin_epoch(epoch)
        for batch in t.loader:
            terms = t.train_step(batch)
            assert terms is not None and set(terms) >= {"loss"}
            steps += 1
        records.append(t.end_epoch())
    summary = t.summary()
    assert steps == summary["steps"] == by_fit["steps"]
    assert summary["metrics"] == by_fit["metrics"]
    fit_records = [json.loads(x) for x in (tmp_path / "fit" / "metrics.jsonl").read_text().splitlines()]
    manual = [json.loads(x) for x in (tmp_path / "manual" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rs]  # noqa: E731
    assert strip(manual) == strip(fit_records)
    assert [r["epoch"] for r in records] == [1, 2] and "nmi" in records[-1]


def test_an_epoch_record_times_the_e_step_that_opened_it(tmp_path, tiny_recipe_data, restore_threads):
    """e_step_seconds is in the record of every epoch that began with an E-step (epoch 0, then
    every e_step.every epochs), is part of the epoch's seconds, and is absent otherwise; so is
    eval_seconds for every evaluated epoch."""
    raw = copy.deepcopy(tiny_recipe_data)
    raw["run"]["threads"] = 1
    raw["schedule"]["epochs"] = 3
    raw.setdefault("e_step", {})["every"] = 2
    Trainer(load_recipe(data=raw), tmp_path).fit()
    epochs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"seconds"' in x]
    assert [("e_step_seconds" in r) for r in epochs] == [True, False, True]  # E-steps before epochs 0 and 2
    assert all(0 < r["e_step_seconds"] < r["seconds"] for r in epochs if "e_step_seconds" in r)
    assert all(0 < r["eval_seconds"] < r["seconds"] for r in epochs)  # eval.every 1: every epoch


def test_fit_fits_on_one_screen():
    import inspect

    assert len(inspect.getsource(Trainer.fit).splitlines()) <= 30


def test_check_losses_runs_with_the_per_image_pipeline():
    """The step path used trainer.augment, which is None with data.pipeline: per_image."""
    report = check_losses("diffused_sampling", with_plugins={"byol_target": {"hidden_dim": 32, "out_dim": 16}},
                          overrides={"data": {"pipeline": "per_image"}})
    assert set(report.terms) == {"diffused_sampling"} and report.backbone_grad["diffused_sampling"] > 0


class _Counter(Plugin):
    """Logs a scalar only in the first epoch, and keeps a count through state_dict."""

    def __init__(self, params=None):
        super().__init__(params)
        self.count = 0

    @hookimpl
    def after_step(self, state):
        self.count += 1
        if state.epoch == 0:
            state.log("first_epoch_only", 1.0)

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state_dict):
        self.count = state_dict["count"]


def _with_counter(raw):
    available = {**discover(), "counter": PluginInfo("counter", "tests:_Counter", "(test)", "0", _cls=_Counter)}
    raw = copy.deepcopy(raw)
    raw["plugins"]["counter"] = {}
    raw["run"]["threads"] = 1
    return raw, available


def test_a_logged_scalar_belongs_to_the_epoch_that_logged_it(tmp_path, tiny_recipe_data, restore_threads):
    raw, available = _with_counter(tiny_recipe_data)
    Trainer(load_recipe(data=raw), tmp_path, available_plugins=available).fit()
    epochs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"seconds"' in x]
    assert epochs[0]["first_epoch_only"] == 1.0
    assert "first_epoch_only" not in epochs[1]


def test_plugin_state_dict_is_checkpointed_and_restored_on_resume(tmp_path, tiny_recipe_data, restore_threads):
    raw, available = _with_counter(tiny_recipe_data)
    first = Trainer(load_recipe(data=raw), tmp_path, available_plugins=available)
    first.fit()
    steps = first.state.step
    assert first.plugins["counter"].count == steps
    ckpt = torch.load(tmp_path / "checkpoints" / "epoch_0001.pt", weights_only=False)
    assert ckpt["plugins"]["counter"] == {"count": steps}
    assert ckpt["plugins"]["kmeans_e_step"]["predict_centers"].shape[0] == 10
    (tmp_path / "checkpoints" / "epoch_0001.pt").unlink()
    (tmp_path / "summary.json").unlink()
    resumed = Trainer(load_recipe(data=raw), tmp_path, resume=True, available_plugins=available)
    resumed.fit()
    assert resumed.plugins["counter"].count == steps  # half restored from epoch 1, half trained again


def test_a_plugin_without_load_state_dict_refuses_saved_state():
    with pytest.raises(TypeError, match="does not define load_state_dict"):
        Plugin().load_state_dict({"x": 1})


def test_the_core_k_means_and_kmeans_e_step_predict_by_the_same_rule(tiny_recipe_data):
    """One k-means prediction path: with the same settings the plugin and the core agree."""
    from clusterkit.cluster import KMeansPredictor

    torch.manual_seed(0)
    feats = torch.randn(120, 8) + 3 * torch.randn(4, 8).repeat(30, 1)
    trainer = make_trainer("kmeans_e_step", {"n_init": 10}, with_plugins={"diffused_sampling": {}, "byol_target": {
        "hidden_dim": 32, "out_dim": 16}})
    trainer.build()
    by_plugin = trainer.predict(feats, fit=True)
    core = KMeansPredictor(trainer.recipe.e_step.k, metric="cosine", seed=trainer.recipe.run.seed,
                           distributed=True)
    by_core = core.fit(feats)
    assert torch.equal(by_plugin.labels, by_core.labels)
    assert torch.allclose(by_plugin.confidence, by_core.confidence)
    new = torch.randn(10, 8)
    assert torch.equal(trainer.predict(new, fit=False).labels, core.assign(new).labels)
