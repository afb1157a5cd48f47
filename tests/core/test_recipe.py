"""Recipe loading, extends, --set overrides and the errors users see."""

import pytest
import yaml

from clusterkit.errors import RecipeError
from clusterkit.plugin_manager import load_plugins
from clusterkit.recipe import load_recipe
from clusterkit.trainer import lr_at, lr_for_step


def write(path, data):
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_extends_deep_merges_and_child_wins(tmp_path):
    write(tmp_path / "base.yaml", {"data": {"dataset": "cifar10", "batch_size": 64}, "schedule": {"epochs": 5}})
    child = write(tmp_path / "child.yaml", {"extends": "base.yaml", "name": "c", "data": {"batch_size": 32}})
    r = load_recipe(child)
    assert (r.name, r.data.dataset, r.data.batch_size, r.schedule.epochs) == ("c", "cifar10", 32, 5)


def test_extends_list_later_base_wins(tmp_path):
    write(tmp_path / "a.yaml", {"schedule": {"epochs": 5, "warmup_epochs": 1}})
    write(tmp_path / "b.yaml", {"schedule": {"epochs": 7}})
    r = load_recipe(write(tmp_path / "c.yaml", {"extends": ["a.yaml", "b.yaml"]}))
    assert (r.schedule.epochs, r.schedule.warmup_epochs) == (7, 1)


def test_set_overrides_are_converted_to_schema_types(tmp_path):
    path = write(tmp_path / "r.yaml", {"name": "x"})
    r = load_recipe(path, ["schedule.epochs=3", "optim.lr=1", "data.root=123", "run.amp=false",
                           "data.augment.crop_scale=[0.2, 1]", "plugins.byol_target.momentum=0.9",
                           "plugins.byol_target.enabled=true"])  # an override alone never adds a plugin
    assert r.schedule.epochs == 3 and isinstance(r.optim.lr, float) and r.optim.lr == 1.0
    assert r.data.root == "123" and r.run.amp is False and r.data.augment.crop_scale == (0.2, 1.0)
    assert r.plugins["byol_target"] == {"momentum": 0.9}


@pytest.mark.parametrize("overrides, needle", [
    (["schedule.epoch=3"], "did you mean 'epochs'"),
    (["nope.x=1"], "no key 'nope'"),
    (["schedule.epochs=abc"], "'schedule.epochs' must be an integer"),
    (["schedule.epochs=2.5"], "must be an integer"),
    (["schedule.epochs=0"], "'schedule.epochs' must be in [1"),
    (["e_step.k=1"], "'e_step.k' must be in [2"),
    (["optim.name=sgdd"], "Did you mean 'sgd'"),
    (["run.amp=maybe"], "must be true or false"),
    (["schedule.epochs"], "must look like key.path=value"),
])
def test_bad_overrides_name_the_key(tmp_path, overrides, needle):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path / "r.yaml", {}), overrides)
    assert needle.lower() in str(err.value).lower()


def test_unknown_key_in_file_suggests(tmp_path):
    with pytest.raises(RecipeError, match=r"Unknown key 'data.batchsize'.*Did you mean 'batch_size'"):
        load_recipe(write(tmp_path / "r.yaml", {"data": {"batchsize": 3}}))


def test_extends_cycle_and_missing_base_and_malformed_yaml(tmp_path):
    write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(write(tmp_path / "c.yaml", {"extends": "missing.yaml"}))
    with pytest.raises(RecipeError, match="not valid YAML at line 3"):
        load_recipe(write(tmp_path / "d.yaml", "name: x\ndata: [1, 2\n"))
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nothing.yaml")


def test_plugin_params_validated_by_plugin_class():
    _, plugins = load_plugins({"byol_target": {"momentum": 0.9}, "prototype_aggregation": {}})
    assert plugins["byol_target"].params.momentum == 0.9
    assert plugins["prototype_aggregation"].params.temperature == 0.5
    with pytest.raises(RecipeError, match=r"Unknown key 'plugins.byol_target.momentun'.*'momentum'"):
        load_plugins({"byol_target": {"momentun": 0.9}})
    with pytest.raises(RecipeError, match=r"'plugins.byol_target.momentum' must be in \[0, 1\]"):
        load_plugins({"byol_target": {"momentum": 1.5}})
    with pytest.raises(RecipeError, match=r"'plugins.diffused_sampling.sigma' must be a number"):
        load_plugins({"diffused_sampling": {"sigma": "big"}})
    with pytest.raises(RecipeError, match=r"Unknown plugin 'byol_targt'.*Did you mean 'byol_target'"):
        load_plugins({"byol_targt": {}})


def test_recipe_hash_ignores_spelling(tmp_path):
    a = load_recipe(write(tmp_path / "a.yaml", {"optim": {"lr": 1}}))
    b = load_recipe(write(tmp_path / "b.yaml", {"optim": {"lr": 1.0}}))
    c = load_recipe(write(tmp_path / "c.yaml", {"optim": {"lr": 2.0}}))
    assert a.hash() == b.hash() != c.hash()


def test_shipped_recipes_load_and_validate():
    import pathlib

    recipes = sorted(p for p in pathlib.Path(__file__).parents[2].joinpath("recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        r = load_recipe(path)
        load_plugins(r.plugins)  # plugin parameters validate too
        assert r.name == path.stem


class Sched:
    def __init__(self, epochs, warmup, denominator="total", kind="cosine", clock="official"):
        self.epochs, self.warmup_epochs, self.cosine_denominator, self.lr_schedule = epochs, warmup, denominator, kind
        self.lr_clock = clock


def test_lr_schedule_warmup_then_cosine_official_quirk():
    s = Sched(100, 10)
    assert lr_at(0, s, 1.0) == 0 and lr_at(5, s, 1.0) == pytest.approx(0.5)
    assert lr_at(10, s, 1.0) == pytest.approx(1.0)
    # official: the cosine divides by the total epochs, so the end is 0.5 (1 + cos(0.9 pi)), not 0
    import math
    assert lr_at(100, s, 1.0) == pytest.approx(0.5 * (1 + math.cos(0.9 * math.pi)))
    assert lr_at(100, Sched(100, 10, "after_warmup"), 1.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(50, Sched(100, 10, kind="constant"), 0.3) == pytest.approx(0.3)


def test_lr_clock_official_counts_iterations_from_one():
    """The official n_iter starts at 1: the first step trains at lr(1 / steps_per_epoch) > 0; the
    zero-based clock starts at 0.  3 steps per epoch, 2 warm-up epochs, base lr 1."""
    official, zero = Sched(10, 2), Sched(10, 2, clock="zero_based")
    assert lr_for_step(0, 3, official, 1.0) == pytest.approx((1 / 3) / 2)
    assert lr_for_step(0, 3, zero, 1.0) == 0.0
    # one iteration apart: the official clock is the zero-based one shifted by a step
    assert [lr_for_step(s, 3, official, 1.0) for s in range(12)] == \
        pytest.approx([lr_for_step(s + 1, 3, zero, 1.0) for s in range(12)])
    # the warm-up ends at iteration 6 (counted from 1) on the official clock
    assert lr_for_step(5, 3, official, 1.0) == pytest.approx(1.0)
