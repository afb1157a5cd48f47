"""clusterkit compare: tables checked against the runs' summaries, reuse and resume of an
interrupted comparison, failing recipes reported in the table."""

import csv
import json
import shutil
import statistics

import pytest
import torch
import yaml

from clusterkit import trainer as trainer_module
from clusterkit.cli import main
from clusterkit.compare import compare
from clusterkit.compare.runner import child_error

PNG = b"\x89PNG\r\n\x1a\n"


def write_recipe(folder, data, **changes):
    data = json.loads(json.dumps(data))
    for dotted, value in changes.items():
        node = data
        *head, last = dotted.split("__")
        for key in head:
            node = node.setdefault(key, {})
        node[last] = value
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def two_recipes(tmp_path_factory):
    """Two tiny ProPos recipes that differ in one plugin parameter, compared over seeds 0 and 1."""
    import copy

    from conftest import TINY

    folder = tmp_path_factory.mktemp("recipes")
    a = write_recipe(folder, copy.deepcopy(TINY), name="tiny_a")
    b = write_recipe(folder, copy.deepcopy(TINY), name="tiny_b", plugins__prototype_aggregation={"weight": 0.5})
    return a, b


@pytest.fixture(scope="module")
def compared(two_recipes, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("cmp") / "out"
    lines = []
    res = compare(list(map(str, two_recipes)), seeds=[0, 1], out=out, isolate=False, echo=lines.append)
    return res, out, lines


def read_csv(path):
    with open(path, newline="") as fh:
        return {row["recipe"]: row for row in csv.DictReader(fh)}


def test_tables_hold_mean_sample_std_best_and_per_seed_values_of_the_summaries(compared):
    res, out, lines = compared
    assert res.ok and [r.how for r in res.runs] == ["started"] * 4
    rows = read_csv(out / "results.csv")
    md = (out / "results.md").read_text()
    tex = (out / "results.tex").read_text()
    assert "sample standard deviation (ddof = 1)" in md and "sample standard deviation (ddof = 1)" in tex
    for label in ("tiny_a", "tiny_b"):
        summaries = [json.loads((out / label / f"seed{s}" / "summary.json").read_text()) for s in (0, 1)]
        assert [s["seed"] for s in summaries] == [0, 1]
        row = rows[label]
        assert row["status"] == "ok" and row["seeds_ok"] == "2"
        for key in ("nmi", "acc", "ari"):
            values = [s["metrics"][key] for s in summaries]
            mean, std = statistics.fmean(values), statistics.stdev(values)  # stdev: ddof = 1
            assert float(row[f"{key}_mean"]) == pytest.approx(mean, abs=1e-12)
            assert float(row[f"{key}_std"]) == pytest.approx(std, abs=1e-12)
            assert float(row[f"{key}_best"]) == max(values)
            assert [float(row[f"{key}_seed{s}"]) for s in (0, 1)] == values
            assert f"{mean:.3f} ± {std:.3f}" in md
            assert f"{mean:.3f} $\\pm$ {std:.3f}" in tex
        assert float(row["wall_time_s"]) == pytest.approx(sum(s["wall_time_s"] for s in summaries))
        assert float(row["seconds_per_epoch"]) == pytest.approx(statistics.fmean(
            s["seconds_per_epoch"] for s in summaries))
        assert float(row["peak_memory_mb"]) == max(s["peak_memory_mb"] for s in summaries)
        assert int(row["num_params"]) == summaries[0]["num_params"] > 0
        assert f"{summaries[0]['num_params']:,}" in md
    # the one key that differs is printed before running and recorded in results.md
    assert any("plugins.prototype_aggregation.weight" in line and "tiny_a = 0.1" in line and "tiny_b = 0.5" in line
               for line in lines)
    assert "`plugins.prototype_aggregation.weight`" in md and "| `run.seed`" not in md and "| `name`" not in md
    assert (out / "convergence.png").read_bytes()[:8] == PNG
    assert json.loads((out / "compare.json").read_text())["seeds"] == [0, 1]


def test_rerun_reuses_finished_runs_and_completes_an_interrupted_one(compared, two_recipes, tmp_path, monkeypatch):
    _, done, _ = compared
    out = tmp_path / "out"
    shutil.copytree(done, out)
    # interrupt tiny_b seed 1 after its first epoch: no summary, only the first checkpoint
    cut = out / "tiny_b" / "seed1"
    before = json.loads((cut / "summary.json").read_text())
    (cut / "summary.json").unlink()
    (cut / "checkpoints" / "epoch_0001.pt").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/checkpoints/*.pt") if not p.is_relative_to(cut)}
    fits = []
    real_fit = trainer_module.Trainer.fit
    monkeypatch.setattr(trainer_module.Trainer, "fit", lambda self: fits.append((self.run_dir, self.resume))
                        or real_fit(self))
    res = compare(list(map(str, two_recipes)), seeds=[0, 1], out=out, isolate=False, echo=None)
    assert fits == [(cut, True)]
    assert [(r.label, r.seed, r.how) for r in res.runs] == [
        ("tiny_a", 0, "reused"), ("tiny_a", 1, "reused"), ("tiny_b", 0, "reused"), ("tiny_b", 1, "resumed")]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    after = json.loads((cut / "summary.json").read_text())
    assert after["metrics"] == before["metrics"]  # resuming on the CPU gives the uninterrupted result
    assert read_csv(out / "results.csv")["tiny_b"]["nmi_mean"] == read_csv(done / "results.csv")["tiny_b"]["nmi_mean"]
    assert "ok (resumed)" in (out / "results.md").read_text()


def test_a_changed_recipe_is_not_mixed_with_an_old_run(compared, two_recipes, tmp_path):
    _, done, _ = compared
    out = tmp_path / "out"
    shutil.copytree(done, out)
    a, b = two_recipes
    changed = tmp_path / "tiny_b.yaml"
    data = yaml.safe_load(b.read_text())
    data["optim"]["lr"] = 0.2
    changed.write_text(yaml.safe_dump(data))
    res = compare([str(a), str(changed)], seeds=[0, 1], out=out, isolate=False, echo=None)
    assert [r.status for r in res.runs] == ["ok", "ok", "failed", "failed"]
    assert "different recipe" in res.runs[2].error and "optim.lr: 0.05 -> 0.2" in res.runs[2].error
    old = json.loads((done / "tiny_b" / "seed0" / "summary.json").read_text())
    assert json.loads((out / "tiny_b" / "seed0" / "summary.json").read_text()) == old  # left untouched
    # the complete results already there are kept; this attempt's tables are written beside them
    assert read_csv(out / "results.failed.csv")["tiny_b"]["status"] == "failed"
    assert (out / "results.csv").read_text() == (done / "results.csv").read_text()


def test_failing_recipes_are_reported_and_the_others_complete(tmp_path, tiny_recipe_data):
    torch.set_num_threads(1)
    good = write_recipe(tmp_path, tiny_recipe_data, name="good")
    bad_param = write_recipe(tmp_path, tiny_recipe_data, name="bad_param", plugins__diffused_sampling={"sigma": -1.0})
    no_data = write_recipe(tmp_path, tiny_recipe_data, name="no_data", data__dataset="cifar10",
                           data__root=str(tmp_path / "nowhere"))
    missing = tmp_path / "missing.yaml"
    out = tmp_path / "out"
    res = compare([str(bad_param), str(missing), str(good), str(no_data)], seeds=[0], out=out, isolate=False,
                  echo=None, plots=False)
    status = {r.label: r.status for r in res.runs}
    assert status == {"bad_param": "failed", "missing": "failed", "good": "ok", "no_data": "failed"}
    errors = {r.label: r.error for r in res.runs}
    assert "plugins.diffused_sampling.sigma" in errors["bad_param"]
    assert "does not exist" in errors["missing"]
    assert "nowhere" in errors["no_data"]
    rows = read_csv(out / "results.csv")
    good_nmi = json.loads((out / "good" / "seed0" / "summary.json").read_text())["metrics"]["nmi"]
    assert rows["good"]["status"] == "ok" and rows["good"]["seeds_ok"] == "1"
    assert float(rows["good"]["nmi_mean"]) == pytest.approx(good_nmi, abs=1e-12)  # the one seed's NMI
    assert float(rows["good"]["nmi_seed0"]) == good_nmi and rows["good"]["nmi_std"] == ""
    assert rows["bad_param"]["status"] == "failed" and "sigma" in rows["bad_param"]["error"]
    assert rows["bad_param"]["nmi_mean"] == ""
    md = (out / "results.md").read_text()
    assert "## Failures" in md and "**no_data**" in md and "| good | ok | 1/1 |" in md
    assert "failed" in (out / "results.tex").read_text()
    assert (out / "no_data" / "seed0" / "error.txt").exists()
    assert not (out / "bad_param").exists()  # its plugin parameters were checked before anything trained


def test_cli_compare_runs_each_run_in_its_own_process(tmp_path, tiny_recipe_data, capsys):
    """The CLI's default: one `clusterkit run` process per run, with its own peak memory."""
    tiny_recipe_data["schedule"]["epochs"] = 1
    tiny_recipe_data["eval"] = {"pixel_baseline": "never"}
    good = write_recipe(tmp_path, tiny_recipe_data, name="good")
    out = tmp_path / "out"
    rc = main(["compare", str(good), str(tmp_path / "typo.yaml"), "--seeds", "3", "--out", str(out), "--no-plots"])
    captured = capsys.readouterr()
    assert rc == 1  # a run failed; the tables are still written and printed
    assert "| good | ok | 1/1 |" in captured.out and "## Failures" in captured.out
    rows = read_csv(out / "results.csv")
    assert rows["good"]["status"] == "ok" and rows["good"]["nmi_seed3"] != ""
    assert rows["typo"]["status"] == "failed" and "typo.yaml' does not exist" in rows["typo"]["error"]
    summary = json.loads((out / "good" / "seed3" / "summary.json").read_text())
    assert summary["seed"] == 3 and summary["peak_memory_mb"] > 0
    assert "[1/2] good seed 3: training" in captured.err and "[2/2] typo seed 3: FAILED" in captured.err


def test_a_failing_run_process_is_reported_with_its_error_paragraph():
    tail = ("epoch 1/2: 100%|##########| 7/7 [00:01<00:00]\r\nclusterkit: error: Plugin 'x' failed in hook\n"
            "'setup': bad value. Fix the\nrecipe.\n")
    assert child_error(tail, 2) == "Plugin 'x' failed in hook 'setup': bad value. Fix the recipe."
    crash = "Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: boom\n"
    assert child_error(crash, 1) == "the run exited with status 1: RuntimeError: boom"


def test_plot_redraws_a_comparison_folder(compared, capsys):
    _, out, _ = compared
    (out / "convergence.png").unlink()
    assert main(["plot", str(out)]) == 0
    assert (out / "convergence.png").read_bytes()[:8] == PNG
    assert str(out / "convergence.png") in capsys.readouterr().out


def test_compare_without_matplotlib_still_writes_the_tables(compared, two_recipes, tmp_path, monkeypatch):
    import sys

    _, done, _ = compared
    out = tmp_path / "out"
    shutil.copytree(done, out)
    (out / "convergence.png").unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    lines = []
    res = compare(list(map(str, two_recipes)), seeds=[0, 1], out=out, isolate=False, echo=lines.append)
    assert res.ok and not (out / "convergence.png").exists() and (out / "results.md").exists()
    assert any("pip install 'clusterkit[plot]'" in line for line in lines)
