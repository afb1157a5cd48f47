"""Shared fixtures and helpers: a tiny, fast recipe on the bundled digits, the command line
called in this process, and small image folders.

The folders below mirror the package: ``core/`` (the framework), ``cli/`` (what a user meets
through ``clusterkit ...``) and ``plugins/<paper>/``.  Test file names are unique across the
folders (pytest's default import mode imports each file by its base name).
"""

import contextlib
import copy
import io
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from clusterkit.testing import tiny_recipe as tiny_plugin_recipe

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    """One torch thread in the test process (and in each pytest-xdist worker): the tiny models
    here train no faster on more, and on a 2-core machine more threads contend with the
    subprocesses the tests start and with the other worker."""
    torch.set_num_threads(1)


#: The tests' tiny run: clusterkit.testing's tiny recipe (the plugin helpers' narrow ResNet on
#: 8x8 images) on the bundled digits (``data="digits"``), with ProPos's plugins for 2 epochs after
#: a 1-epoch warm-up.  Unlike the helpers' runs it keeps the run defaults (``run.device: auto``,
#: torch's thread count, ``keep_last: 2``) and the pixel baseline, and logs every 2 steps.
TINY = tiny_plugin_recipe(
    {"byol_target": {"hidden_dim": 32, "out_dim": 16},
     "kmeans_e_step": {"n_init": 1, "max_iter": 20},
     "diffused_sampling": {},
     "prototype_aggregation": {}},
    epochs=2, data="digits",
    overrides={"name": "tiny", "schedule": {"warmup_epochs": 1},
               # the UMAP rows (clusterkit.baselines) cost seconds per run and a numba compile per process:
               # the tests that check them switch them on (tests/core/test_manifold.py)
               "eval": {"pixel_baseline": "auto", "umap_baseline": "never", "umap_view": "never"},
               "run": {"device": "auto", "threads": None, "keep_last": 2, "log_every": 2}})


def tiny_recipe(**changes) -> dict:
    """``TINY`` for one epoch on one thread without the pixel baseline, with ``changes`` applied:
    ``a__b=value`` sets ``raw["a"]["b"]`` (so ``schedule__epochs=2`` trains two epochs)."""
    raw = copy.deepcopy(TINY)
    raw["schedule"]["epochs"] = 1
    raw["eval"]["pixel_baseline"] = "never"
    raw["run"]["threads"] = 1
    for key, value in changes.items():
        node = raw
        *head, last = key.split("__")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = value
    return raw


def write_recipe(path: Path, data) -> Path:
    """``data`` (a recipe dict, or YAML text as it is) written to ``path``."""
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.fixture
def one_thread():
    """One torch thread for tests of tiny tensors (they gain nothing from more, and lose a lot
    on a busy machine), whatever an earlier test left set."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_recipe_data():
    """A plain-dict recipe that trains ProPos on digits in a few seconds per epoch."""
    return copy.deepcopy(TINY)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny recipe (``TINY``, 2 epochs) trained once in this process: (run directory, the
    predictions of its final evaluation, its summary).  For tests that only read the run; one
    that changes its files works on a copy."""
    from clusterkit.recipe import load_recipe
    from clusterkit.trainer import Trainer

    path = tmp_path_factory.mktemp("tiny_run")
    with torch_settings_kept():
        trainer = Trainer(load_recipe(data=copy.deepcopy(TINY)), path)
        summary = trainer.fit()
    return path, trainer.last_prediction, summary


@contextlib.contextmanager
def torch_settings_kept():
    """Put back the process-wide torch settings the trainer changes (threads, determinism)."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@pytest.fixture
def restore_threads():
    """The trainer sets process-wide torch settings: put them back for the other tests."""
    with torch_settings_kept():
        yield


# ---------------------------------------------------------------------------------------------
# the command line, in this process
# ---------------------------------------------------------------------------------------------

class CliResult(NamedTuple):
    """What ``clusterkit ARGS`` gave: its exit status and what it printed."""

    returncode: int
    stdout: str
    stderr: str


def run_main(*args) -> CliResult:
    """``clusterkit ARGS`` through :func:`clusterkit.cli.main` in this process, its output captured.

    The same code path as the console script (``python -m clusterkit`` is ``sys.exit(main())``)
    without starting Python and importing torch again.  An exception that ``main`` does not turn
    into an exit status (a bug: the user would see a traceback) propagates and fails the test.
    Tests of the process itself (signals, closed pipes, two processes at once, torchrun, the
    traceback of ``--debug``) start real processes instead.
    """
    from clusterkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli(restore_threads):
    """:func:`run_main`, with the torch settings a run changes put back afterwards."""
    return run_main


def flat(text: str) -> str:
    """``text`` with its whitespace collapsed: a message compared wherever it wraps (error
    paragraphs are wrapped at 100 columns, so a long temporary path moves the breaks)."""
    return " ".join(text.split())


def error_paragraph(res: CliResult, code: int = 2) -> str:
    """Exit ``code``, exactly one ``clusterkit: error:`` paragraph and no traceback: that
    paragraph, whitespace collapsed."""
    assert res.returncode == code, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("clusterkit: error:") == 1, res.stderr
    return flat(res.stderr[res.stderr.index("clusterkit: error:"):].split("\n\n")[0])


# ---------------------------------------------------------------------------------------------
# small image folders
# ---------------------------------------------------------------------------------------------

def image_tree(root: Path, classes=("a", "b"), per_class: int = 4) -> Path:
    """ROOT/<class>/<i>.png: small random 8x8 RGB images (seeded)."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root
