"""The fault and bad-input cases of issue 16, each through the command line where a user meets it.

``run_cli`` calls ``clusterkit.cli.main`` in this process (the console script's code path, its
exit status and output captured); the cases about processes (two runs at once, a lock held
by a live process, SIGTERM, a closed pipe) start real ``python -m clusterkit`` processes.

"Clear" means: a non-zero exit (2 for a user's mistake), exactly one ``clusterkit: error:``
paragraph naming the problem and the fix, no traceback, and no file of the user's changed.
The checks never depend on where a message wraps (paragraphs are compared with their
whitespace collapsed) or on how long a temporary path is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, flat, image_tree, run_main, tiny_recipe, torch_settings_kept, write_recipe
from PIL import Image

# every test here may train in this process: the torch settings a run changes are put back
pytestmark = pytest.mark.usefixtures("restore_threads")


def run_cli(*args):
    """``clusterkit ARGS`` in this process: (returncode, stdout, stderr)."""
    return run_main(*args)


def assert_clear(res, *needles, code=2):
    """Exit ``code``, one error paragraph holding every needle, no traceback."""
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("clusterkit: error:") == 1, res.stderr
    paragraph = flat(res.stderr[res.stderr.index("clusterkit: error:"):].split("\n\n")[0])
    for needle in needles:
        assert needle in paragraph, paragraph


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes (what "no file changed" compares)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny(**changes) -> dict:
    """The tiny ProPos-on-digits recipe, one epoch, one thread, no pixel baseline."""
    return tiny_recipe(**changes)


write = write_recipe


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished two-epoch run with both checkpoints (its folder is copied by the tests that
    change it)."""
    tmp = tmp_path_factory.mktemp("finished")
    recipe = write(tmp / "tiny.yaml", tiny(schedule__epochs=2))
    with torch_settings_kept():
        res = run_cli("run", recipe, "--out", tmp / "run")
    assert res.returncode == 0, res.stderr
    return recipe, tmp / "run"


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# 1. --resume of a folder that is not a run directory changes nothing in it
# ---------------------------------------------------------------------------------------------

def test_1_resume_of_a_project_folder_keeps_its_recipe(tmp_path):
    proj = tmp_path / "myproj"
    proj.mkdir()
    write(tmp_path / "base.yaml", tiny())
    write(proj / "recipe.yaml", "extends: ../base.yaml\nname: mine\n")
    before = snapshot(proj)
    res = run_cli("run", proj / "recipe.yaml", "--resume", proj)
    assert_clear(res, f"Cannot resume '{proj}'", "not a run directory", "nothing in this folder was changed")
    assert snapshot(proj) == before and sorted(p.name for p in proj.iterdir()) == ["recipe.yaml"]


def test_1_resume_of_a_data_folder_writes_nothing_into_it(tmp_path):
    data = tmp_path / "data"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(data / c / "0.png")
    recipe = write(tmp_path / "r.yaml", tiny())
    before = snapshot(data)
    res = run_cli("run", recipe, "--resume", data)
    assert_clear(res, "not a run directory")
    assert snapshot(data) == before and not (data / "recipe.yaml").exists()


# ---------------------------------------------------------------------------------------------
# 2. one run at a time in a run directory
# ---------------------------------------------------------------------------------------------

def test_2_two_runs_started_at_once_into_one_out(tmp_path):
    recipe = write(tmp_path / "r.yaml", tiny())
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "clusterkit", "run", str(recipe), "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results  # exactly one ran; the other was refused
    refused = next(err for rc, err in results if rc == 2)
    assert "Traceback" not in refused and ("in use by another clusterkit run" in flat(refused)
                                           or "already exists and is not empty" in flat(refused))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == sorted(json.loads(line)["step"] for line in lines)
    assert sum("seconds" in json.loads(line) for line in lines) == 1  # one run's epoch, not two
    assert (out / "summary.json").exists() and not (out / ".clusterkit.lock").exists()


@pytest.fixture
def live_pid():
    """The pid of a process that is alive for the duration of the test."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_2_a_locked_run_directory_is_refused_even_with_force(tmp_path, finished_run, live_pid):
    recipe, done = finished_run
    run = copy_run(done, tmp_path / "run")
    (run / ".clusterkit.lock").write_text(f"{live_pid} {os.uname().nodename}\n")
    before = snapshot(run)
    for args in (["--out", run, "--force"], ["--resume", run]):
        res = run_cli("run", recipe, *args)
        assert_clear(res, f"Run directory '{run}' is in use by another clusterkit run (process {live_pid}")
        assert snapshot(run) == before


def test_2_a_stale_lock_of_a_killed_run_is_taken_over(tmp_path, finished_run):
    recipe, done = finished_run
    run = copy_run(done, tmp_path / "run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".clusterkit.lock").write_text(f"{dead.pid} {os.uname().nodename}\n")
    res = run_cli("run", recipe, "--resume", run)
    assert res.returncode == 0, res.stderr
    assert f"was locked by process {dead.pid}, which no longer runs" in flat(res.stderr)
    assert not (run / ".clusterkit.lock").exists()


# ---------------------------------------------------------------------------------------------
# 5-7. what is trained is what the recipe and the overrides say
# ---------------------------------------------------------------------------------------------

def test_5_an_override_of_an_absent_plugin_is_an_error(tmp_path):
    propos = REPO / "recipes" / "quickstart_propos.yaml"
    res = run_cli("run", propos, "--set", "plugins.momentum_grouping.weight=0.5", "--out", tmp_path / "out")
    assert_clear(res, "the recipe has no plugin 'momentum_grouping'", "--set plugins.momentum_grouping.enabled=true")
    assert not (tmp_path / "out").exists()


def test_5_enabled_adds_and_removes_a_plugin():
    from clusterkit.recipe import load_recipe

    propos = REPO / "recipes" / "quickstart_propos.yaml"
    added = load_recipe(propos, ["plugins.momentum_grouping.weight=0.5", "plugins.momentum_grouping.enabled=true"])
    assert added.plugins["momentum_grouping"] == {"weight": 0.5}
    removed = load_recipe(REPO / "recipes" / "quickstart.yaml", ["plugins.momentum_grouping.enabled=false"])
    assert "momentum_grouping" not in removed.plugins
    from clusterkit.errors import RecipeError

    with pytest.raises(RecipeError, match="the recipe has no plugin 'momentum_grouping'"):
        load_recipe(propos, ["plugins={momentum_grouping: {weight: 0.5}}"])  # nor through the whole block


def test_6_a_mapping_override_merges_into_the_block(tmp_path):
    recipe = write(tmp_path / "r.yaml", tiny())
    out = tmp_path / "out"
    res = run_cli("run", recipe, "--set", "data.augment={hflip: true}", "--out", out)
    assert res.returncode == 0, res.stderr
    augment = yaml.safe_load((out / "recipe.yaml").read_text())["data"]["augment"]
    assert augment["hflip"] is True and augment["crop_scale"] == [0.6, 1.0]  # the recipe's crop is kept
    assert "epoch 1/1  loss" in res.stderr  # run.progress: false keeps the per-epoch result line


def test_7_a_key_written_twice_is_an_error(tmp_path):
    raw = yaml.safe_dump(tiny())
    recipe = write(tmp_path / "r.yaml", raw + "schedule: {warmup_epochs: 0}\n")
    res = run_cli("run", recipe, "--out", tmp_path / "out")
    assert_clear(res, "key 'schedule' appears twice", "merge the two into one")


# ---------------------------------------------------------------------------------------------
# 9, 12. values the schema must reject
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, needle", [
    ("optim.lr=nan", "'optim.lr' must be a finite number in (0, inf), got nan"),
    ("optim.lr=inf", "'optim.lr' must be a finite number in (0, inf), got inf"),
    ("run.seed=-5", "'run.seed' must be in [0, 4294967295], got -5"),
    ("run.threads=-1", "'run.threads' must be in [1, inf], got -1"),
])
def test_9_12_values_out_of_range(tmp_path, override, needle):
    recipe = write(tmp_path / "r.yaml", tiny())
    res = run_cli("run", recipe, "--set", override, "--out", tmp_path / "out")
    assert_clear(res, needle)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# 3. compare and plot never overwrite results they were not asked to; --force leaves nothing stale
# ---------------------------------------------------------------------------------------------

def _old_compare(out: Path, label: str, seeds: list[int], run_dir: Path | None = None) -> dict:
    """A folder holding the complete results of an earlier comparison."""
    out.mkdir(parents=True, exist_ok=True)
    runs = [{"label": label, "seed": s, "run_dir": str(run_dir) if run_dir else None, "status": "ok",
             "how": "started", "error": None} for s in seeds]
    write(out / "compare.json", json.dumps({"command": "old", "seeds": seeds, "overrides": [], "isolated": True,
                                            "recipes": [{"label": label, "path": "x.yaml"}], "runs": runs,
                                            "differences": []}))
    for name in ("results.md", "results.csv", "results.tex", "convergence.png"):
        write(out / name, f"the old {name}\n")
    return snapshot(out)


def test_3_a_changed_compare_does_not_replace_earlier_results(tmp_path):
    recipe = write(tmp_path / "tiny.yaml", tiny())
    out = tmp_path / "cmp"
    before = _old_compare(out, "tiny", [0])
    res = run_cli("compare", recipe, "--seeds", "1", "--out", out, "--no-plots")
    assert_clear(res, f"'{out}' holds the results of a different comparison", "seeds: [0] -> [1]", "--force")
    assert snapshot(out) == before


def test_3_a_failed_rerun_keeps_complete_results(tmp_path):
    # the recipe loads, but its run fails (no data where it points): a failed row, not a refusal
    recipe = write(tmp_path / "bad.yaml", tiny(name="bad", data__dataset="imagefolder",
                                               data__root=str(tmp_path / "no-such-folder")))
    out = tmp_path / "cmp"
    before = _old_compare(out, "bad", [0])
    res = run_cli("compare", recipe, "--seeds", "0", "--out", out, "--no-plots")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "no-such-folder" in (out / "results.failed.md").read_text()
    assert "are kept" in flat(res.stderr)
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k in before} == before  # the old results, byte for byte


def test_3_a_compare_whose_recipes_all_fail_to_load_changes_nothing(tmp_path):
    recipe = write(tmp_path / "bad.yaml", tiny(name="bad", plugins__diffused_sampling={"sigma": -1.0}))
    out = tmp_path / "cmp"
    before = _old_compare(out, "bad", [0])
    res = run_cli("compare", recipe, "--seeds", "0", "--out", out, "--no-plots")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "plugins.diffused_sampling.sigma" in flat(res.stderr)
    assert snapshot(out) == before  # nothing written, the old results byte for byte


def test_3_plot_of_a_compare_folder_writes_to_out(tmp_path, finished_run):
    _, run = finished_run
    cmp = tmp_path / "cmp"
    before = _old_compare(cmp, "tiny", [0], run)
    res = run_cli("plot", cmp, "--out", tmp_path / "plots")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "plots" / "convergence.png").read_bytes()[:4] == b"\x89PNG"
    assert snapshot(cmp) == before


def test_3_force_removes_the_old_runs_plots(tmp_path, finished_run):
    recipe, done = finished_run
    run = copy_run(done, tmp_path / "run")
    (run / "plots").mkdir()
    write(run / "plots" / "tsne.png", "an old plot")
    write(run / "notes.txt", "mine")
    res = run_cli("run", recipe, "--out", run, "--force")
    assert res.returncode == 0, res.stderr
    assert not (run / "plots").exists() and (run / "notes.txt").read_text() == "mine"
    assert "left what clusterkit did not write there: notes.txt" in flat(res.stderr)


# ---------------------------------------------------------------------------------------------
# 4. a symlink loop in an image folder is not followed; images found twice are said and used once
# ---------------------------------------------------------------------------------------------

def _folder_recipe(tmp: Path, root: Path) -> Path:
    return write(tmp / "folder.yaml", tiny(data__dataset="imagefolder", data__root=str(root), data__batch_size=4,
                                           data__eval_batch_size=16, e_step__k=2, schedule__warmup_epochs=0))


def test_4_a_symlink_loop_is_not_followed(tmp_path):
    root = image_tree(tmp_path / "data", classes=("one", "zero"))
    (root / "zero" / "loop").symlink_to("..")
    res = run_cli("run", _folder_recipe(tmp_path, root), "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["num_train"] == 8  # not the tree again and again under zero/loop
    assert "symbolic link(s) to a folder above them were not followed" in flat(res.stderr)
    assert str(root / "zero" / "loop") in flat(res.stderr)


def test_4_images_found_twice_are_said_and_used_once():
    import tempfile

    from clusterkit.data.imagefolder import scan_imagefolder
    from clusterkit.data.registry import DATASETS

    with tempfile.TemporaryDirectory() as tmp:
        root = image_tree(Path(tmp) / "data", classes=("one", "zero"))
        (root / "one" / "more").symlink_to(root / "zero")  # zero's images reached twice
        import io
        from contextlib import redirect_stderr

        err = io.StringIO()
        with redirect_stderr(err):
            classes, paths, targets = scan_imagefolder(DATASETS["imagefolder"], root, "train")
    assert len(paths) == 8 and len({os.path.realpath(p) for p in paths}) == 8
    assert "4 image file(s) were found twice through symbolic links" in flat(err.getvalue())


# ---------------------------------------------------------------------------------------------
# 9. a divergence inside a plugin's after_step is the non-finite guard's clear stop
# ---------------------------------------------------------------------------------------------

def test_9_digpro_diverging_in_after_step_stops_clearly(tmp_path):
    res = run_cli("run", REPO / "recipes" / "quickstart.yaml", "--out", tmp_path / "out", "--set", "optim.lr=1e8",
                  "--set", "schedule.warmup_epochs=0", "--set", "schedule.epochs=1", "--set", "run.threads=1",
                  "--set", "eval.pixel_baseline=never", "--set", "run.progress=false")
    assert_clear(res, "at epoch 1", "the run stopped and no checkpoint was written yet", "Lower optim.lr")
    assert "the last good checkpoint" not in res.stderr


# ---------------------------------------------------------------------------------------------
# 10. a truncated latest checkpoint: the previous one is used, and said; none readable: clear
# ---------------------------------------------------------------------------------------------

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _digit_png(path: Path) -> Path:
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(path)
    return path


def test_10_a_truncated_latest_checkpoint_falls_back_to_the_previous(tmp_path, finished_run):
    recipe, done = finished_run
    run = copy_run(done, tmp_path / "run")
    latest = run / "checkpoints" / "epoch_0001.pt"
    _truncate(latest)
    image = _digit_png(tmp_path / "x.png")
    res = run_cli("predict", run, "--images", image)
    assert res.returncode == 0, res.stderr
    assert f"cannot read checkpoint '{latest}'" in flat(res.stderr)
    assert f"using the previous one, '{run / 'checkpoints' / 'epoch_0000.pt'}' (epoch 1)" in flat(res.stderr)
    assert res.stdout.splitlines()[0] == "path,cluster,confidence"
    res = run_cli("run", recipe, "--resume", run)  # trains epoch 2 again from epoch 1's checkpoint
    assert res.returncode == 0, res.stderr
    assert f"cannot read checkpoint '{latest}'" in flat(res.stderr)
    assert json.loads((run / "summary.json").read_text())["metrics"] == \
        json.loads((done / "summary.json").read_text())["metrics"]


def test_10_no_readable_checkpoint_is_a_clear_error(tmp_path, finished_run):
    _, done = finished_run
    run = copy_run(done, tmp_path / "run")
    for ckpt in (run / "checkpoints").glob("*.pt"):
        _truncate(ckpt)
    before = snapshot(run)
    res = run_cli("predict", run, "--images", _digit_png(tmp_path / "x.png"))
    assert_clear(res, f"No checkpoint in '{run / 'checkpoints'}' can be read", "epoch_0000.pt", "epoch_0001.pt")
    assert snapshot(run) == before


def test_10_clusterkit_load_names_the_unreadable_file(tmp_path, finished_run, capsys):
    import clusterkit

    _, done = finished_run
    run = copy_run(done, tmp_path / "run")
    _truncate(run / "checkpoints" / "epoch_0001.pt")
    model = clusterkit.load(run, "cpu")
    assert model.epoch == 1 and model.checkpoint.name == "epoch_0000.pt"
    assert "epoch_0001.pt" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 11. plot draws the confusion matrix of a collapsed run
# ---------------------------------------------------------------------------------------------

def test_11_plot_of_a_collapsed_run(tmp_path):
    root = tmp_path / "black"
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8)).save(root / c / f"{i}.png")
    recipe = _folder_recipe(tmp_path, root)
    res = run_cli("run", recipe, "--out", tmp_path / "run")
    assert res.returncode == 0, res.stderr
    res = run_cli("plot", tmp_path / "run")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "run" / "plots" / "confusion.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------
# 12. paths that cannot be written, truncated files, a closed pipe, a clashing plugin name
# ---------------------------------------------------------------------------------------------

def test_12_out_that_is_a_file_or_under_a_file(tmp_path):
    recipe = write(tmp_path / "r.yaml", tiny())
    a_file = write(tmp_path / "notes.txt", "mine")
    res = run_cli("run", recipe, "--out", a_file)
    assert_clear(res, f"Cannot use '{a_file}' as the run directory: it is a file")
    res = run_cli("run", recipe, "--out", a_file / "run")
    assert_clear(res, f"Cannot create the run directory '{a_file / 'run'}'")
    assert a_file.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_12_out_in_a_read_only_folder(tmp_path):
    recipe = write(tmp_path / "r.yaml", tiny())
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        res = run_cli("run", recipe, "--out", locked / "run")
        assert_clear(res, f"Cannot create the run directory '{locked / 'run'}'")
    finally:
        locked.chmod(0o755)


def test_12_predict_out_that_cannot_be_written(tmp_path, finished_run):
    _, run = finished_run
    image = _digit_png(tmp_path / "x.png")
    res = run_cli("predict", run, "--images", image, "--out", tmp_path)
    assert_clear(res, f"--out '{tmp_path}' is a folder")
    res = run_cli("predict", run, "--images", image, "--out", tmp_path / "missing" / "p.csv")
    assert_clear(res, f"its folder '{tmp_path / 'missing'}' does not exist")


def test_12_truncated_summary_in_show_and_predict(tmp_path, finished_run):
    _, done = finished_run
    run = copy_run(done, tmp_path / "run")
    summary = run / "summary.json"
    summary.write_text(summary.read_text()[:50])
    for args in (["show", run], ["predict", run, "--images", _digit_png(tmp_path / "x.png")]):
        res = run_cli(*args)
        assert_clear(res, f"The run's summary '{summary}' cannot be read", "--resume")


def test_12_plugins_into_a_closed_pipe():
    proc = subprocess.Popen([sys.executable, "-m", "clusterkit", "plugins", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written, as with | head -1 on a long list
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_12_new_plugin_dir_that_is_a_file(tmp_path):
    a_file = write(tmp_path / "notes.txt", "mine")
    assert_clear(run_cli("new-plugin", "my_loss", "--dir", a_file), f"--dir '{a_file}' is a file, not a folder")
    assert_clear(run_cli("new-plugin", "my_loss", "--dir", a_file / "sub"), "Cannot write the plugin package")
    assert a_file.read_text() == "mine"


def test_12_a_package_reusing_a_builtin_name_is_listed_as_a_conflict(tmp_path, monkeypatch):
    dist = tmp_path / "site" / "clashing_pkg-0.1.dist-info"
    dist.mkdir(parents=True)
    write(dist / "METADATA", "Metadata-Version: 2.1\nName: clashing-pkg\nVersion: 0.1\n")
    write(dist / "entry_points.txt", "[clusterkit.plugins]\nbyol_target = clashing_pkg:Thing\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))  # as PYTHONPATH would: the package is installed
    res = run_cli("plugins")
    assert res.returncode == 0, res.stderr
    # other third-party plugins (the example package) may be installed and listed before it
    assert res.stdout.startswith("byol_target  [built-in]") or "\nbyol_target  [built-in]\n" in res.stdout
    block = res.stdout.split("byol_target  [built-in]\n", 1)[1].split("\n\n")[0]  # byol_target's entry
    assert "CONFLICT: this name is registered by" in flat(block) and "clashing-pkg 0.1" in block
    assert "kmeans_e_step  [built-in]" in res.stdout  # the other plugins are listed as usual


# ---------------------------------------------------------------------------------------------
# 13. predict takes a batch of grayscale images (N, H, W); ambiguous shapes are an error
# ---------------------------------------------------------------------------------------------

def test_13_predict_of_a_grayscale_batch(finished_run):
    import clusterkit
    from clusterkit.errors import DataError

    _, run = finished_run
    model = clusterkit.load(run, "cpu")
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 17, (5, 8, 8)).astype(np.uint8) * 15)
    batch = model.predict(images)                                    # (N, H, W): five images
    assert batch.labels.shape == (5,)
    assert torch.equal(batch.labels, model.predict(images[:, None]).labels)  # = (N, 1, H, W)
    assert int(model.predict(images[2]).labels) == int(batch.labels[2])      # (H, W): one image
    with pytest.raises(DataError, match="channels-last"):
        model.predict(np.zeros((5, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="channels-last"):
        model.predict(np.zeros((32, 32, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------
# 8. settings that train to NMI 0 are warned about
# ---------------------------------------------------------------------------------------------

def test_8_root_one_level_too_high_and_warmup_as_long_as_the_run(tmp_path):
    root = tmp_path / "data"
    image_tree(root / "inner", classes=("one", "zero"))  # data/inner/<class>/<image>
    raw = yaml.safe_load(_folder_recipe(tmp_path, root).read_text())
    raw["schedule"].update({"epochs": 1, "warmup_epochs": 1})
    res = run_cli("run", write(tmp_path / "r.yaml", raw), "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    err = flat(res.stderr)
    assert f"data.root '{root}' holds a single class folder, 'inner'" in err
    assert f"Set data.root to '{root / 'inner'}'" in err
    assert "schedule.warmup_epochs = 1 is not below schedule.epochs = 1" in err
    assert "warm-up-gated losses of diffused_sampling, prototype_aggregation never turn on" in err


def test_8_a_single_class_dataset(tmp_path):
    root = image_tree(tmp_path / "data", classes=("only",), per_class=8)
    res = run_cli("run", _folder_recipe(tmp_path, root), "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert "the training data has a single class ('only')" in flat(res.stderr)


# ---------------------------------------------------------------------------------------------
# smaller items
# ---------------------------------------------------------------------------------------------

def test_sigterm_says_how_to_resume_and_releases_the_lock(tmp_path):
    import signal
    import time

    recipe = write(tmp_path / "r.yaml", tiny(schedule__epochs=200))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "clusterkit", "run", str(recipe), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while not list((out / "checkpoints").glob("epoch_*.pt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 143, err
    assert "clusterkit: terminated (SIGTERM); resume with --resume RUN_DIR" in err and "Traceback" not in err
    assert not (out / ".clusterkit.lock").exists()


def test_compare_checks_every_recipe_before_training(tmp_path):
    good = write(tmp_path / "good.yaml", tiny(name="good"))
    bad = write(tmp_path / "bad.yaml", tiny(name="bad", plugins__diffused_sampling={"sigma": -1.0}))
    res = run_cli("compare", good, bad, "--seeds", "0", "--out", tmp_path / "cmp", "--no-plots")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    err = flat(res.stderr)
    said = err.index("compare: bad cannot run and is reported as failed: 'plugins.diffused_sampling.sigma'")
    assert said < err.index("[1/2] good seed 0: training")
    assert not (tmp_path / "cmp" / "bad").exists()


def test_an_empty_recipe_does_not_start_training(tmp_path):
    recipe = write(tmp_path / "empty.yaml", "")
    res = run_cli("run", recipe, "--out", tmp_path / "out")
    assert_clear(res, "No plugin in the recipe returns a loss", "the recipe has no plugins")
    assert not (tmp_path / "out").exists()  # no empty run directory left behind


def test_resume_with_more_epochs(tmp_path, finished_run):
    recipe, done = finished_run  # cosine schedule, 2 epochs
    run = copy_run(done, tmp_path / "run")
    before = snapshot(run)
    res = run_cli("run", recipe, "--resume", run, "--set", "schedule.epochs=3")
    assert_clear(res, f"Cannot extend '{run}' from 2 to 3 epochs", "schedule.lr_schedule: constant")
    assert snapshot(run) == before
    constant = write(tmp_path / "constant.yaml", tiny(schedule__epochs=1, schedule__lr_schedule="constant",
                                                      schedule__warmup_epochs=0))
    res = run_cli("run", constant, "--out", tmp_path / "c")
    assert res.returncode == 0, res.stderr
    res = run_cli("run", constant, "--resume", tmp_path / "c", "--set", "schedule.epochs=2")
    assert res.returncode == 0, res.stderr
    assert "extending" in res.stderr and json.loads((tmp_path / "c" / "summary.json").read_text())["epochs"] == 2
    assert yaml.safe_load((tmp_path / "c" / "recipe.yaml").read_text())["schedule"]["epochs"] == 2


def test_plugins_core_lists_the_core_recipe_keys(capsys):
    from clusterkit.cli import main

    assert main(["plugins", "--core"]) == 0
    out = capsys.readouterr().out
    for key in ("run.threads: int | None = None", "run.progress: bool = True", "optim.lr: float = 0.05",
                "data.augment.hflip: bool"):
        assert key in out


def test_compare_tables_show_the_pixel_baseline(tmp_path):
    from clusterkit.compare import CompareResult, RunResult, aggregate, write_markdown

    def run(label, seed, nmi):
        summary = {"metrics": {"nmi": 0.8, "acc": 0.8, "ari": 0.7}, "epochs": 1, "wall_time_s": 1.0,
                   "seconds_per_epoch": 1.0, "peak_memory_mb": 1.0, "num_params": 1,
                   "protocol": {"dataset": "digits", "eval_split": "all"},
                   "pixel_kmeans": {"nmi": nmi, "acc": 0.5, "ari": 0.4}}
        return RunResult(label, seed, tmp_path / label / f"seed{seed}", "ok", "started", summary=summary)

    runs = [run("a", 0, 0.70), run("a", 1, 0.72), run("b", 0, 0.70), run("b", 1, 0.72)]
    rows = [aggregate(label, f"{label}.yaml", [r for r in runs if r.label == label]) for label in ("a", "b")]
    md = write_markdown(CompareResult(tmp_path, rows, runs, [], []), [0, 1], "clusterkit compare a b", True)
    assert "| k-means on pixels | baseline | 2/2 | 0.710 ± 0.014 | 0.500 ± 0.000 |" in md
