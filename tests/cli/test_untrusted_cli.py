"""Issue 23, "untrusted files stay data": what a user's recipe, file names and run folders may hold
never sends output elsewhere, never crashes a command half-way, and never reads as a traceback.

One tiny run over an image folder (``folder_run``, module scope) serves every case that needs a
trained run; its folder holds a file whose name is not valid UTF-8.  A case that changes the
run's files works on a copy.  Checks never depend on where a message wraps (paragraphs are
compared with their whitespace collapsed), on how long a temporary path is, or on timing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import error_paragraph, image_tree, run_main, tiny_recipe, torch_settings_kept, write_recipe
from PIL import Image

# every test here may train or load a model in this process: put the torch settings back
pytestmark = pytest.mark.usefixtures("restore_threads")

#: A file name that is not valid UTF-8 (Latin-1 bytes, as a camera or an old system may write).
BAD_NAME = b"\xff\xfe.png"


def assert_clear(res, *needles, code=2) -> str:
    """Exit ``code``, one error paragraph holding every needle, no traceback; the paragraph."""
    paragraph = error_paragraph(res, code)
    for needle in needles:
        assert needle in paragraph, paragraph
    return paragraph


def tiny(**changes) -> dict:
    """The tiny ProPos recipe, one epoch without warm-up, one thread, no pixel baseline (``a__b=v``
    sets a.b)."""
    return tiny_recipe(**{"schedule__warmup_epochs": 0, **changes})


write = write_recipe


def tree(folder: Path) -> list[str]:
    """Every path under ``folder``, relative (what "nothing else was written" compares)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A finished one-epoch run (``run.progress: false``) over a two-class image folder of 9 images,
    one of them named with the bytes ``BAD_NAME``: (data root, run directory, the run's stderr)."""
    tmp = tmp_path_factory.mktemp("untrusted")
    root = image_tree(tmp / "data", classes=("a", "b"))
    bad = os.fsencode(root / "a") + b"/" + BAD_NAME
    with open(bad, "wb") as fh:  # a bytes path: the name is exactly these bytes
        fh.write(_png_bytes(7))
    recipe = write(tmp / "folder.yaml", tiny(data__dataset="imagefolder", data__root=str(root), data__batch_size=4,
                                             data__eval_batch_size=16, e_step__k=2, schedule__warmup_epochs=0))
    with torch_settings_kept():
        res = run_main("run", recipe, "--out", tmp / "run")
    assert res.returncode == 0, res.stderr
    return root, tmp / "run", res.stderr


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a run's model fails the test: a check that must come before any computation."""
    import clusterkit.inference

    def refuse(*_args, **_kwargs):
        raise AssertionError("the run's model was loaded before the output folder was checked")

    monkeypatch.setattr(clusterkit.inference, "load", refuse)


# ---------------------------------------------------------------------------------------------
# 2. a recipe name is a name, never a path out of the output folder
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["set-relative", "file-absolute", "set-dotdot", "set-backslash"])
def test_2_a_recipe_name_that_is_a_path_is_refused(tmp_path, how):
    work = tmp_path / "work"
    runs = work / "runs"
    runs.mkdir(parents=True)
    outside = tmp_path / "outside"  # where an absolute name would send the run
    name = {"set-relative": "../../x", "file-absolute": str(outside), "set-dotdot": "..",
            "set-backslash": "a\\b"}[how]
    recipe = write(work / "r.yaml", tiny(run__out_dir=str(runs), **({"name": name} if how == "file-absolute" else {})))
    extra = [] if how == "file-absolute" else ["--set", f"name={name}"]
    before = tree(tmp_path)
    res = run_main("run", recipe, *extra)
    assert_clear(res, "'name' must be a plain name, not a path", f"got {name!r}", "e.g. my_run")
    assert tree(tmp_path) == before  # no run folder anywhere, in run.out_dir or outside it


def test_2_compare_with_a_path_as_name_writes_nothing_outside_its_out(tmp_path):
    recipe = write(tmp_path / "r.yaml", tiny(name="fine"))
    out = tmp_path / "a" / "b" / "C"
    before = tree(tmp_path)
    res = run_main("compare", recipe, "--seeds", "0", "--set", "name=../../x", "--out", out, "--no-plots",
                   "--in-process")
    assert_clear(res, "'name' must be a plain name, not a path", "got '../../x'")
    assert tree(tmp_path) == before  # neither C nor a/x (where C/../../x/seed0 would lead)


# ---------------------------------------------------------------------------------------------
# 7. a file name that is not UTF-8: export and predict write every row, and the name round-trips
# ---------------------------------------------------------------------------------------------

def _read_csv(path: Path) -> list[list[str]]:
    """The CSV as clusterkit.outputs documents reading it: every name back as its own bytes."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        return list(csv.reader(fh))


def test_7_export_keeps_every_row_and_the_file_names_bytes(tmp_path, folder_run):
    root, run, _ = folder_run
    to = tmp_path / "sorted"
    res = run_main("export", run, "--to", to)
    assert res.returncode == 0, res.stderr
    rows = _read_csv(to / "assignments.csv")
    assert rows[0] == ["path", "cluster", "confidence", "rank", "exported"]
    names = sorted(os.fsencode(r[0]) for r in rows[1:])
    assert len(rows) - 1 == 9 and len(set(names)) == 9  # every image of the folder, once
    assert os.fsencode(root / "a") + b"/" + BAD_NAME in names
    bad = next(r for r in rows[1:] if os.fsencode(r[0]).endswith(BAD_NAME))
    assert os.path.islink(to / bad[4]) and os.fsencode(to / bad[4]).endswith(BAD_NAME)  # its link, named alike
    assert not [p for p in to.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_7_predict_out_keeps_every_row_and_the_file_names_bytes(tmp_path, folder_run):
    root, run, _ = folder_run
    out = tmp_path / "preds.csv"
    res = run_main("predict", run, "--images", root, "--out", out)
    assert res.returncode == 0, res.stderr
    rows = _read_csv(out)
    assert rows[0] == ["path", "cluster", "confidence"] and len(rows) - 1 == 9
    names = [os.fsencode(r[0]) for r in rows[1:]]
    assert os.fsencode(root / "a") + b"/" + BAD_NAME in names
    for r in rows[1:]:  # each path read back opens the very file that was clustered
        assert os.path.isfile(r[0])


def test_7_a_failed_csv_write_leaves_no_partial_file(tmp_path):
    from clusterkit.outputs import write_csv

    target = write(tmp_path / "preds.csv", "the old file\n")

    def rows():
        yield ["a.png", 0, "0.9"]
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_csv(target, ["path", "cluster", "confidence"], rows())
    assert target.read_text() == "the old file\n" and tree(tmp_path) == ["preds.csv"]


# ---------------------------------------------------------------------------------------------
# 10. a user's mistake is one clear paragraph, never a traceback
# ---------------------------------------------------------------------------------------------

def _unwritable(tmp_path: Path, where: str) -> Path:
    """A folder no one can write, root included: one under a regular file, or one under /proc."""
    if where == "under-a-file":
        return write(tmp_path / "notes.txt", "mine") / "out"
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc on this system")
    return Path("/proc") / "clusterkit-cannot-write-here"


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
@pytest.mark.parametrize("command", ["export", "choose-k", "plot"])
def test_10_an_unwritable_out_is_refused_before_any_computation(tmp_path, folder_run, no_model_load, command, where):
    _, run, _ = folder_run
    out = _unwritable(tmp_path, where)
    flag = "--to" if command == "export" else "--out"
    res = run_main(command, run, flag, out)
    assert_clear(res, f"Cannot write {flag} '{out}'", "nothing was computed or written")
    if where == "under-a-file":
        assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_10_compare_into_an_unwritable_out_is_refused(tmp_path, where):
    # data that does not exist: nothing would train even if the check were missing
    recipe = write(tmp_path / "r.yaml", tiny(name="r", data__dataset="imagefolder", data__root=str(tmp_path / "none")))
    out = _unwritable(tmp_path, where)
    res = run_main("compare", recipe, "--seeds", "0", "--out", out, "--no-plots", "--in-process")
    assert_clear(res, f"Cannot write --out '{out}'", "nothing was computed or written")


def test_10_choose_k_n_init_zero(folder_run):
    _, run, _ = folder_run
    assert_clear(run_main("choose-k", run, "--k", "2:3", "--n-init", "0"), "--n-init must be at least 1", "got 0")


def test_10_choose_k_a_huge_range_is_refused_before_it_is_built(folder_run, no_model_load):
    _, run, _ = folder_run
    res = run_main("choose-k", run, "--k", "2:100000000000")
    assert_clear(res, "--k '2:100000000000' gives 99999999999 cluster counts", "at most 1000", "--k 2:30")


def test_10_plot_max_points_zero(folder_run, no_model_load):
    _, run, _ = folder_run
    assert_clear(run_main("plot", run, "--max-points", "0"), "--max-points must be at least 2", "got 0")


def test_10_show_of_a_damaged_recipe_yaml(tmp_path, folder_run):
    _, done, _ = folder_run
    run = shutil.copytree(done, tmp_path / "run")
    write(run / "recipe.yaml", "name: [unclosed\n  data: {\n")
    assert_clear(run_main("show", run), f"The run's recipe '{run / 'recipe.yaml'}' cannot be read")
    (run / "recipe.yaml").write_bytes(b"name: \xff\xfe\n")  # not UTF-8
    assert_clear(run_main("show", run), f"The run's recipe '{run / 'recipe.yaml'}' cannot be read")


def test_10_show_of_a_non_integer_epoch_in_metrics(tmp_path, folder_run):
    _, done, _ = folder_run
    run = shutil.copytree(done, tmp_path / "run")
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([*lines, json.dumps({"epoch": "two", "step": 99, "seconds": 1.0})]) + "\n")
    before = metrics.read_bytes()
    res = run_main("show", run)
    assert_clear(res, f"Line {len(lines) + 1} of '{metrics}' has epoch 'two', not a whole number",
                 "Delete or correct that line")
    assert metrics.read_bytes() == before


def test_10_extends_dev_zero_is_refused_unread(tmp_path):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero on this system")
    recipe = write(tmp_path / "r.yaml", "extends: /dev/zero\nname: x\n")
    res = run_main("run", recipe, "--out", tmp_path / "out")
    assert_clear(res, "Recipe file '/dev/zero'", f"named in 'extends' of '{recipe}'",
                 "is a character device, not a regular file")
    assert not (tmp_path / "out").exists()


def test_10_extends_a_fifo_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "base.yaml"
    os.mkfifo(fifo)
    recipe = write(tmp_path / "r.yaml", "extends: base.yaml\nname: x\n")

    def hung(_signum, _frame):
        raise TimeoutError("clusterkit waited on the FIFO (opened it for reading)")

    previous = signal.signal(signal.SIGALRM, hung)  # the test fails, never hangs, if the FIFO is opened
    signal.alarm(60)
    try:
        res = run_main("run", recipe, "--out", tmp_path / "out")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert_clear(res, f"Recipe file '{fifo}'", "is a FIFO (named pipe), not a regular file")
    assert not (tmp_path / "out").exists()


def test_10_a_recipe_over_the_size_cap_is_refused_unread(tmp_path):
    from clusterkit.recipe import MAX_RECIPE_BYTES

    big = write(tmp_path / "big.yaml", "name: big\n" + "#" * MAX_RECIPE_BYTES + "\n")
    assert_clear(run_main("run", big, "--out", tmp_path / "out"), f"Recipe file '{big}' is larger than 1 MiB")
    write(tmp_path / "r.yaml", "extends: big.yaml\n")
    assert_clear(run_main("run", tmp_path / "r.yaml", "--out", tmp_path / "out"), "is larger than 1 MiB")


def test_10_nan_pixels_given_to_predict(folder_run):
    import clusterkit
    from clusterkit.errors import DataError

    _, run, _ = folder_run
    model = clusterkit.load(run, "cpu")
    images = torch.full((2, 3, 8, 8), 0.5)
    assert model.predict(images).labels.shape == (2,)
    images[1, 0, 3, 3] = float("nan")
    with pytest.raises(DataError, match=r"1 value\(s\) are NaN or infinite"):
        model.predict(images)
    with pytest.raises(DataError, match="NaN or infinite"):
        model.predict(torch.full((1, 3, 8, 8), float("-inf")))


# ---------------------------------------------------------------------------------------------
# 11. words that say what happened
# ---------------------------------------------------------------------------------------------

def test_11_show_of_a_file_says_it_is_a_file(tmp_path):
    a_file = write(tmp_path / "passwd", "root:x:0:0::/root:/bin/sh\n")
    paragraph = assert_clear(run_main("show", a_file), f"'{a_file}' is a file, not a run directory")
    assert "does not exist" not in paragraph


def test_11_sigterm_while_the_recipe_loads_says_nothing_was_trained(tmp_path):
    recipe = write(tmp_path / "r.yaml", tiny())
    out = tmp_path / "out"
    # the recipe reader is held (it says so on stderr, then sleeps) so that SIGTERM arrives while loading
    script = textwrap.dedent(f"""
        import sys, time
        import clusterkit.recipe as recipe
        def held(*args, **kwargs):
            print("LOADING", file=sys.stderr, flush=True)
            time.sleep(300)
        recipe.read_yaml = held
        from clusterkit.cli import main
        sys.exit(main(["run", {str(recipe)!r}, "--out", {str(out)!r}]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        first = proc.stderr.readline()
        assert first.strip() == "LOADING", first + proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        err = proc.stderr.read()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 143, err
    text = " ".join(err.split())
    assert "clusterkit: terminated (SIGTERM) before the run started" in text, err
    assert "nothing was trained and no run directory was written" in text
    assert "checkpoint" not in text and "--resume" not in text and "Traceback" not in err
    assert not out.exists()


def test_11_no_decoding_bar_with_progress_false(folder_run):
    _, _, stderr = folder_run  # the run had run.progress: false
    assert "decoding" not in stderr and "it/s" not in stderr, stderr


def test_10_predict_out_in_an_unwritable_folder_is_refused_before_any_computation(tmp_path, folder_run,
                                                                                    no_model_load):
    root, run, _ = folder_run
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc on this system")
    out = Path("/proc") / "clusterkit-preds.csv"  # its folder exists, and no one (root included) can write there
    assert_clear(run_main("predict", run, "--images", root, "--out", out), f"Cannot write --out '{out}'",
                 "nothing was computed")
