"""Data preparation guides, docs/data.md, and the DigPro / ProPos paper recipes."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import flat
from PIL import Image

from clusterkit.cli import main
from clusterkit.data import load_dataset
from clusterkit.data.guides import GUIDES, guide_text, train_data_missing
from clusterkit.errors import DataError, RecipeError
from clusterkit.plugin_manager import load_plugins
from clusterkit.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
DIGPRO = sorted(RECIPES.glob("digpro_*.yaml"))
TABLE1 = ["imagenet10", "imagenet_dogs", "tiny_imagenet", "rsod", "uc_merced", "siri_whu", "cifar10"]


# -- guides --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(GUIDES))
def test_guide_is_titled_numbered_and_in_the_docs(name):
    text = guide_text(name)
    assert re.fullmatch(r"How to prepare \S+:", text.splitlines()[0])
    steps = [int(m) for m in re.findall(r"^  (\d+)\. ", text, flags=re.M)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 3
    assert text in (REPO / "docs" / "data.md").read_text(), f"docs/data.md is out of date for '{name}'"


def test_unknown_guide_suggests_a_name():
    with pytest.raises(RecipeError, match=r"Unknown data guide 'imagenet_10'.*Did you mean 'imagenet10'"):
        guide_text("imagenet_10")


def test_docs_list_the_builtin_datasets_and_splits():
    doc = (REPO / "docs" / "data.md").read_text()
    for name in ("digits", "fashion_mnist", "cifar10", "cifar100", "stl10", "imagefolder"):
        assert f"| `{name}` |" in doc
    for split in ("train", "test", "all"):
        assert f"| `{split}` |" in doc


def _error(fn) -> DataError:
    with pytest.raises(DataError) as err:
        fn()
    return err.value


def test_train_data_missing_tells_missing_from_corrupt(tmp_path):
    missing = [
        _error(lambda: load_dataset("imagefolder", tmp_path / "nope")),          # root absent
        _error(lambda: load_dataset("imagefolder", None)),                        # no root given
        _error(lambda: load_dataset("cifar10", tmp_path)),                        # no files under root
        _error(lambda: load_dataset("imagefolder", tmp_path)),                    # no class folders
    ]
    (tmp_path / "empty_class" / "a").mkdir(parents=True)
    missing.append(_error(lambda: load_dataset("imagefolder", tmp_path / "empty_class")))
    (tmp_path / "onlyval" / "val" / "a").mkdir(parents=True)
    missing.append(_error(lambda: load_dataset("imagefolder", tmp_path / "onlyval")))
    for exc in missing:
        assert train_data_missing(exc), str(exc)

    (tmp_path / "bad" / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "bad" / "a" / "ok.png")
    (tmp_path / "bad" / "a" / "broken.png").write_bytes(b"not a png")
    corrupt = _error(lambda: load_dataset("imagefolder", tmp_path / "bad", image_size=4))
    (tmp_path / "cifar" / "cifar-10-batches-py").mkdir(parents=True)
    (tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"garbage")
    bad_pickle = _error(lambda: load_dataset("cifar10", tmp_path / "cifar"))
    for exc in (corrupt, bad_pickle, DataError("Unknown dataset 'x'.")):
        assert not train_data_missing(exc), str(exc)


# -- recipes -------------------------------------------------------------------------------------

def test_every_table1_dataset_has_a_digpro_and_a_propos_recipe():
    assert sorted(p.stem for p in DIGPRO) == sorted(f"digpro_{k}" for k in TABLE1)
    for key in TABLE1:
        assert (RECIPES / f"propos_{key}.yaml").is_file()


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_recipe_loads_and_validates(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    load_plugins(recipe.plugins)
    if recipe.data.guide is not None:
        guide_text(recipe.data.guide)  # names a real guide


@pytest.mark.parametrize("digpro", DIGPRO, ids=lambda p: p.stem)
def test_propos_twin_differs_only_by_momentum_grouping(digpro):
    propos = RECIPES / digpro.name.replace("digpro_", "propos_")
    a, b = load_recipe(digpro).to_dict(), load_recipe(propos).to_dict()
    plugins_a, plugins_b = a.pop("plugins"), b.pop("plugins")
    a.pop("name"), b.pop("name")
    assert a == b
    assert "momentum_grouping" in plugins_a
    plugins_a.pop("momentum_grouping")
    assert plugins_a == plugins_b
    # the files too: apart from comments and the name, the only lines that differ are the plugin's
    def body(path):
        return [line for line in path.read_text().splitlines()
                if not line.lstrip().startswith("#") and not line.startswith("name:")]
    assert [line for line in body(digpro) if "momentum_grouping" not in line] == body(propos)


def test_digpro_recipes_follow_table1_and_the_released_code():
    expected = {  # K, image size, batch, the paper's lambda (METHODS "DigPro Table 1", "momentum_grouping")
        "imagenet10": (10, 96, 128, "0.3"), "imagenet_dogs": (15, 96, 128, "0.5"),
        "tiny_imagenet": (200, 32, 1024, "0.1"), "rsod": (4, 32, 256, "1.0"),
        "uc_merced": (21, 32, 256, "0.5"), "siri_whu": (12, 32, 256, "1.0"), "cifar10": (10, 32, 512, None),
    }
    for key, (k, size, batch, lam) in expected.items():
        path = RECIPES / f"digpro_{key}.yaml"
        r = load_recipe(path)
        mg = r.plugins["momentum_grouping"]
        # the released code hard-codes a group-loss weight of 0.3; the header names the paper's lambda
        assert (r.e_step.k, r.data.image_size, r.data.batch_size, mg["weight"]) == (k, size, batch, 0.3), key
        assert (mg["beta"], mg["temperature"], mg["bank_size"], mg["extra_ema"]) == (0.99, 0.1, 2560, True)
        assert r.data.guide == key and r.schedule.epochs == 1000
        assert r.plugins["prototype_aggregation"]["absent_clusters"] == "local"  # official, per process
        header = path.read_text()
        assert "Published" in header
        assert (f"the paper's lambda for this dataset is {lam}" if lam else "the paper gives no lambda") in header
        # official DigPro configs: 200 warm-up epochs on SIRI-WHU and UC-Merced, 50 elsewhere
        assert r.schedule.warmup_epochs == (200 if key in ("siri_whu", "uc_merced") else 50), key


# -- end to end ----------------------------------------------------------------------------------

def test_missing_data_prints_the_guide(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = cli("run", str(RECIPES / "digpro_imagenet10.yaml"), "--set", f"data.root={tmp_path / 'missing'}",
               "--out", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "does not exist" in flat(proc.stderr)  # in the error paragraph, wrapped where its path ends
    assert GUIDES["imagenet10"] in proc.stderr  # the guide follows as written


def test_digpro_recipe_trains_on_a_tiny_image_folder(tmp_path):
    # 10 classes x 6 noisy 16x16 images around a colour per class (separable, so ARI > 0)
    rng = np.random.default_rng(0)
    tree = tmp_path / "tree"
    for c in range(10):
        (tree / f"n{c:08d}").mkdir(parents=True)
        colour = rng.integers(40, 216, 3)
        for i in range(6):
            pixels = np.clip(colour + rng.integers(-40, 41, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tree / f"n{c:08d}" / f"{i}.png")
    out = tmp_path / "run"
    overrides = [
        f"data.root={tree}", "data.image_size=16", "data.batch_size=30", "schedule.epochs=1",
        "schedule.warmup_epochs=0", "model.backbone_kwargs={channels: [8, 16, 16, 32]}",
        "plugins.byol_target.hidden_dim=32", "plugins.byol_target.out_dim=16",
        "plugins.kmeans_e_step.n_init=1", "plugins.momentum_grouping.bank_size=60",
        "run.progress=false", "eval.pixel_baseline=never", "run.threads=1",
    ]
    args = ["run", str(RECIPES / "digpro_imagenet10.yaml"), "--out", str(out)]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_train"] == 60 and summary["steps"] == 2
    for key in ("nmi", "acc", "ari"):
        assert 0.0 <= summary["metrics"][key] <= 1.0
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"diffused_sampling", "prototype_aggregation", "momentum_grouping"} <= set(last)
