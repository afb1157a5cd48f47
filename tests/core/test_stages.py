"""Recipe stages: plugins switched on and off by epoch (PICI's pretrain / train / boost),
the default ``h`` step output, and weak/strong views."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from clusterkit import Plugin, hookimpl
from clusterkit.errors import RecipeError
from clusterkit.plugin_manager import PluginInfo, discover
from clusterkit.recipe import load_recipe
from clusterkit.trainer import Trainer


class Recorder(Plugin):
    """Records, per epoch, which of its staged hooks ran; its loss reads the core's ``h``."""

    calls: list = []  # (plugin name, hook, epoch, stage)

    def _note(self, hook, state):
        Recorder.calls.append((self.name, hook, state.epoch, state.stage))

    @hookimpl
    def on_epoch_start(self, state):
        self._note("on_epoch_start", state)

    @hookimpl
    def compute_losses(self, state, cache):
        if state.step_in_epoch == 0:
            self._note("compute_losses", state)
        return {f"{self.name}_loss": cache["h", 0].pow(2).mean() * 1e-3}

    @hookimpl
    def after_step(self, state):
        if state.step_in_epoch == 0:
            self._note("after_step", state)

    @hookimpl
    def on_epoch_end(self, state, metrics):
        self._note("on_epoch_end", state)


def _available():
    extra = {name: PluginInfo(name, "tests:Recorder", "tests", "0", _cls=Recorder) for name in ("rec_a", "rec_b")}
    return {**discover(), **extra}


def staged_recipe(tiny_recipe_data, epochs=3, **stages_kw):
    raw = copy.deepcopy(tiny_recipe_data)
    raw["schedule"] = {"epochs": epochs, "warmup_epochs": 0}
    raw["data"]["batch_size"] = 512
    raw["plugins"] = {"kmeans_e_step": {"n_init": 1, "max_iter": 5}, "rec_a": {}, "rec_b": {}}
    raw["stages"] = stages_kw.get("stages", [
        {"name": "pretrain", "until": 1, "plugins": ["rec_a"]},
        {"name": "train", "until": 2, "plugins": ["rec_a", "rec_b"]},
        {"name": "boost", "until": None, "plugins": ["rec_b"]},
    ])
    return raw


def test_stage_at_and_inactive_plugins(tiny_recipe_data):
    recipe = load_recipe(data=staged_recipe(tiny_recipe_data))
    assert [recipe.stage_at(e).name for e in range(5)] == ["pretrain", "train", "boost", "boost", "boost"]
    assert recipe.inactive_plugins(0) == {"rec_b"}
    assert recipe.inactive_plugins(1) == set()
    assert recipe.inactive_plugins(2) == {"rec_a"}
    # kmeans_e_step is named in no stage: never switched off
    assert all("kmeans_e_step" not in recipe.inactive_plugins(e) for e in range(3))
    no_stages = load_recipe(data=tiny_recipe_data)
    assert no_stages.stage_at(0) is None and no_stages.inactive_plugins(0) == set()


@pytest.mark.parametrize("stages, message", [
    ([{"name": "a", "until": 1, "plugins": ["rec_c"]}, {"name": "b", "plugins": []}], "not in the recipe's plugins"),
    ([{"name": "a", "until": 2, "plugins": []}, {"name": "b", "until": 2, "plugins": []}], "must be larger"),
    ([{"name": "a", "plugins": []}, {"name": "b", "until": 3, "plugins": []}], "only the last stage"),
    ([{"name": "a", "until": 1, "plugins": []}, {"name": "a", "plugins": []}], "no other stage uses"),
    ([{"until": 1, "plugins": []}, {"name": "b", "plugins": []}], "non-empty name"),
    ([{"name": "a", "until": 2, "plugins": []}], "would belong to no stage"),
    ([{"name": "a", "until": 0, "plugins": []}], "stages[0].until"),
])
def test_bad_stages_are_recipe_errors(tiny_recipe_data, stages, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(data=staged_recipe(tiny_recipe_data, stages=stages))
    assert message in str(err.value)


def test_unknown_stage_plugin_suggests_the_close_name(tiny_recipe_data):
    stages = [{"name": "a", "plugins": ["rec_aa"]}]
    with pytest.raises(RecipeError, match="Did you mean 'rec_a'"):
        load_recipe(data=staged_recipe(tiny_recipe_data, stages=stages))


def _ran(epoch, hook):
    return sorted({name for name, h, e, _ in Recorder.calls if e == epoch and h == hook})


def test_stages_switch_plugins_at_the_right_epochs_and_survive_resume(tiny_recipe_data, tmp_path):
    raw = staged_recipe(tiny_recipe_data)
    Recorder.calls = []
    run = tmp_path / "run"
    run.mkdir()
    full = Trainer(load_recipe(data=raw), run, available_plugins=_available()).fit()
    expected = {0: ["rec_a"], 1: ["rec_a", "rec_b"], 2: ["rec_b"]}
    for epoch, names in expected.items():
        for hook in ("on_epoch_start", "compute_losses", "after_step", "on_epoch_end"):
            assert _ran(epoch, hook) == names, (epoch, hook)
    assert {e: s for _, _, e, s in Recorder.calls} == {0: "pretrain", 1: "train", 2: "boost"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "seconds" in r]
    assert [r["stage"] for r in epochs] == ["pretrain", "train", "boost"]
    # the logged loss terms follow the stages: rec_b's term first appears in stage 'train'
    assert "rec_b_loss" not in epochs[0] and "rec_a_loss" not in epochs[2]

    # a run stopped after epoch 2 (stage 'train') resumes into 'boost' with the right plugins
    raw2 = staged_recipe(tiny_recipe_data)
    raw2["schedule"]["epochs"] = 3
    assert raw2 == raw  # the same recipe: the finished run is copied, not trained again
    run2 = tmp_path / "run2"
    shutil.copytree(run, run2)
    (run2 / "checkpoints" / "epoch_0002.pt").unlink()  # as if killed during the last epoch
    (run2 / "summary.json").unlink()
    Recorder.calls = []
    resumed = Trainer(load_recipe(data=raw2), run2, resume=True, available_plugins=_available()).fit()
    assert sorted({e for _, _, e, _ in Recorder.calls}) == [2]
    assert _ran(2, "compute_losses") == ["rec_b"]
    assert {s for _, _, _, s in Recorder.calls} == {"boost"}
    assert resumed["metrics"] == pytest.approx(full["metrics"])


class HOverride(Plugin):
    """Replaces the core's ``h`` output (as a masked encoder does) and counts its calls."""

    calls = 0

    @hookimpl
    def register_outputs(self, state):
        def h(cache, view):
            HOverride.calls += 1
            return state.model["backbone"](cache.views[view]) * 0.5
        return {"h": h}


class HTwice(HOverride):
    pass


def test_default_h_output_can_be_overridden_once(tiny_recipe_data, tmp_path):
    raw = tiny_recipe_data
    raw["schedule"] = {"epochs": 1, "warmup_epochs": 0}
    raw["data"]["batch_size"] = 512
    raw["plugins"] = {"kmeans_e_step": {"n_init": 1, "max_iter": 5}, "rec_a": {}, "h_override": {}}
    available = {**_available(), "h_override": PluginInfo("h_override", "tests:H", "tests", "0", _cls=HOverride),
                 "h_twice": PluginInfo("h_twice", "tests:H2", "tests", "0", _cls=HTwice)}
    HOverride.calls = 0
    (tmp_path / "a").mkdir()
    Trainer(load_recipe(data=raw), tmp_path / "a", available_plugins=available).fit()
    assert HOverride.calls == 3  # 1797 digits, batch 512, drop_last: 3 steps, view 0 each
    raw["plugins"]["h_twice"] = {}
    from clusterkit.errors import PluginError
    with pytest.raises(PluginError, match="registers step output 'h'"):
        Trainer(load_recipe(data=raw), tmp_path / "b", available_plugins=available).fit()


def test_augment_second_gives_the_second_view_its_own_parameters(tiny_recipe_data):
    from clusterkit.data import DATASETS, BatchedTwoView
    from clusterkit.data.augment import AugmentParams

    weak = AugmentParams(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False, jitter_p=0.0, grayscale_p=0.0)
    strong = AugmentParams(crop_scale=(0.2, 0.5), hflip=False)
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    torch.manual_seed(0)
    v1, v2 = BatchedTwoView(weak, 8, DATASETS["digits"], second=strong)(images)
    torch.manual_seed(0)
    same1, same2 = BatchedTwoView(weak, 8, DATASETS["digits"])(images)
    # the weak view is the identity crop, so both weak views equal the plain resized image
    assert torch.equal(v1, same1) and torch.allclose(same1, same2, atol=1e-5)
    assert not torch.allclose(v1, v2)
    recipe = load_recipe(data={**tiny_recipe_data, "data": {**tiny_recipe_data["data"],
                                                            "augment_second": {"crop_scale": [0.2, 0.5]}}})
    assert recipe.data.augment_second.crop_scale == (0.2, 0.5)
    assert recipe.data.augment_second.hflip == AugmentParams().hflip


def test_resume_accepts_a_checkpoint_written_before_a_recipe_key_existed(tiny_recipe_data, tmp_path):
    """A run started by an older clusterkit (its saved recipe lacks keys added since, e.g.
    ``stages``) resumes: absent keys take their defaults and are not a change."""
    raw = copy.deepcopy(tiny_recipe_data)
    raw["schedule"] = {"epochs": 2, "warmup_epochs": 0}
    raw["data"]["batch_size"] = 512
    run = tmp_path / "run"
    run.mkdir()
    Trainer(load_recipe(data=raw), run).fit()
    ckpt_path = run / "checkpoints" / "epoch_0000.pt"
    (run / "checkpoints" / "epoch_0001.pt").unlink()
    ckpt = torch.load(ckpt_path, weights_only=False)
    for key in ("stages", "allow_plugins"):
        del ckpt["recipe"][key]
    del ckpt["recipe"]["data"]["augment_second"]
    ckpt["recipe_hash"] = "written-by-an-older-version"
    torch.save(ckpt, ckpt_path)
    summary = Trainer(load_recipe(data=raw), run, resume=True).fit()
    assert summary["epochs"] == 2 and summary["metrics"]["nmi"] is not None
    # a real change is still refused
    raw["optim"]["lr"] = 0.5
    from clusterkit.errors import RunDirError
    (run / "checkpoints" / "epoch_0001.pt").unlink()
    with pytest.raises(RunDirError, match="optim.lr: 0.05 -> 0.5"):
        Trainer(load_recipe(data=raw), run, resume=True).fit()
