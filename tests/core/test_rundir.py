"""clusterkit.rundir: the run directory's layout, creation, --force clearing, resume check,
lock and reading back, without training (the CLI tests cover the same through real runs)."""

import json
import os

import pytest
import torch

from clusterkit.errors import RecipeError, RunDirError
from clusterkit.recipe import load_recipe
from clusterkit.rundir import (
    CHECKPOINTS,
    LOCK_NAME,
    METRICS_LOG,
    RECIPE,
    RUN_OUTPUTS,
    SUMMARY,
    RunDir,
    check_resumable,
    make_run_dir,
    read_summary,
    trim_metrics_log,
)
from clusterkit.runlock import release_run_dir


@pytest.fixture
def recipe(tmp_path):
    return load_recipe(data={"name": "tiny", "data": {"dataset": "digits"}, "run": {"out_dir": str(tmp_path / "runs")}})


def test_layout_names_every_file_once(tmp_path):
    run = RunDir(tmp_path)
    assert run.recipe_file == tmp_path / "recipe.yaml" and run.metrics_log == tmp_path / "metrics.jsonl"
    assert run.checkpoints == tmp_path / "checkpoints" and run.summary_file == tmp_path / "summary.json"
    assert run.lock_file == tmp_path / ".clusterkit.lock" and run.plots == tmp_path / "plots"
    assert set(RUN_OUTPUTS) >= {RECIPE, METRICS_LOG, CHECKPOINTS, SUMMARY} and LOCK_NAME not in RUN_OUTPUTS
    assert run.checkpoint_of(3) == tmp_path / "checkpoints" / "epoch_0003.pt"


def test_create_without_out_makes_a_new_timestamped_folder_and_locks_it(recipe, tmp_path):
    first = RunDir.create(recipe, None, force=False)
    second = RunDir.create(recipe, None, force=False)
    try:
        assert first.path.parent == second.path.parent == tmp_path / "runs" / "tiny"
        assert first.path != second.path  # the same second: "-1" appended
        assert first.lock_file.read_text().split()[0] == str(os.getpid())
    finally:
        first.release()
        second.release()
    assert not first.lock_file.exists()


def test_create_refuses_a_file_and_a_non_empty_folder(recipe, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="it is a file, not a folder"):
        make_run_dir(recipe, str(tmp_path / "file"), force=False)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / SUMMARY).write_text("{}")
    with pytest.raises(RunDirError, match="already exists and is not empty. Use --resume"):
        make_run_dir(recipe, str(tmp_path / "run"), force=False)


def test_force_clears_the_outputs_and_keeps_other_files_with_a_note(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    (out / CHECKPOINTS).mkdir(parents=True)
    (out / CHECKPOINTS / "epoch_0000.pt").write_bytes(b"x")
    for name in (RECIPE, METRICS_LOG, SUMMARY):
        (out / name).write_text("old")
    (out / ".summary.json.tmp-123").write_text("torn")
    (out / "notes.txt").write_text("mine")
    path = make_run_dir(recipe, str(out), force=True)
    try:
        assert sorted(p.name for p in path.iterdir()) == [LOCK_NAME, "notes.txt"]
        assert "left what clusterkit did not write there: notes.txt" in capsys.readouterr().err
    finally:
        release_run_dir(path)


def test_check_resumable_says_what_is_missing(tmp_path):
    with pytest.raises(RunDirError, match="no such directory"):
        check_resumable(tmp_path / "nowhere")
    with pytest.raises(RunDirError, match="it has no checkpoints/ folder"):
        check_resumable(tmp_path)
    (tmp_path / CHECKPOINTS).mkdir()
    with pytest.raises(RunDirError, match=r"holds no checkpoint \(checkpoints/epoch_\*\.pt\)"):
        check_resumable(tmp_path)
    RunDir(tmp_path).save_checkpoint({"recipe": {}}, 0, keep_last=1)
    check_resumable(tmp_path)
    assert RunDir(tmp_path).latest_checkpoint() == RunDir(tmp_path).checkpoint_of(0)
    path, ckpt = RunDir(tmp_path).load_latest_checkpoint()
    assert path.name == "epoch_0000.pt" and ckpt == {"recipe": {}}


def test_records_skip_torn_lines_and_keep_the_last_record_of_an_epoch(tmp_path):
    run = RunDir(tmp_path)
    for record in ({"epoch": 1, "step": 2, "loss": 1.0}, {"epoch": 1, "step": 4, "loss": 0.9, "seconds": 1.0},
                   {"epoch": 1, "step": 4, "loss": 0.8, "seconds": 1.5}):  # a resumed epoch 1 wins
        run.append_record(record)
    with open(run.metrics_log, "a") as fh:
        fh.write('{"epoch": 2, "st\n')  # a torn line
    assert run.step_records() == [{"epoch": 1, "step": 2, "loss": 1.0}]
    assert run.epoch_records() == [{"epoch": 1, "step": 4, "loss": 0.8, "seconds": 1.5}]
    run.append_record({"epoch": "two", "seconds": 1.0})
    with pytest.raises(RunDirError, match="Line 5 of .* has epoch 'two', not a whole number"):
        run.records()


def test_trim_metrics_log_keeps_what_the_checkpoint_holds(tmp_path):
    run = RunDir(tmp_path)
    for epoch, step in ((1, 2), (1, 4), (2, 6), (2, 8)):
        run.append_record({"epoch": epoch, "step": step})
    trim_metrics_log(tmp_path, epochs_done=1, step=4)
    assert [json.loads(line)["step"] for line in run.metrics_log.read_text().splitlines()] == [2, 4]


def test_summary_and_recipe_round_trip_and_damage_is_an_error(recipe, tmp_path):
    run = RunDir(tmp_path)
    assert read_summary(tmp_path) is None
    run.write_summary({"metrics": {"nmi": 0.5}})
    assert read_summary(tmp_path) == {"metrics": {"nmi": 0.5}}
    run.summary_file.write_text("[1, 2]")
    with pytest.raises(RunDirError, match="holds no JSON object"):
        run.read_summary()
    run.summary_file.write_text('{"metrics": ')
    with pytest.raises(RunDirError, match="truncated or corrupt"):
        run.read_summary()
    with pytest.raises(RunDirError, match="holds no recipe.yaml, so it is not a clusterkit run directory"):
        run.read_recipe()
    run.write_recipe(recipe)
    assert load_recipe(data=run.read_recipe()).to_dict() == recipe.to_dict()
    run.recipe_file.write_text("- a list\n")
    with pytest.raises(RecipeError, match="does not hold a recipe mapping"):
        run.read_recipe()


def test_remove_if_empty_removes_only_a_folder_holding_just_the_lock(recipe, tmp_path):
    run = RunDir.create(recipe, tmp_path / "a", force=False)
    run.remove_if_empty()
    assert not run.path.exists()
    kept = RunDir.create(recipe, tmp_path / "b", force=False)
    kept.write_error("boom")
    kept.remove_if_empty()
    try:
        assert kept.error_file.read_text() == "boom"
    finally:
        kept.release()


def test_a_checkpoint_written_through_the_run_dir_is_pruned_to_keep_last(tmp_path):
    run = RunDir(tmp_path)
    for epoch in range(3):
        run.save_checkpoint({"recipe": {}, "w": torch.zeros(1)}, epoch, keep_last=2)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["epoch_0001.pt", "epoch_0002.pt"]
