"""Running one (recipe, seed) of a comparison: in its own ``clusterkit run`` process or in this
one, with the error it failed with written to the run's ``error.txt``."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import traceback
from pathlib import Path

from ..errors import ClusterkitError
from ..rundir import RunDir

__all__ = ["ChildFailed", "error_text", "child_error", "check_plugins", "run_isolated", "run_in_process"]


class ChildFailed(Exception):
    """A ``clusterkit run`` child failed; the message is its error paragraph."""


def error_text(exc: BaseException) -> str:
    """A failed run's error in one line: a user error's first paragraph, else the exception."""
    if isinstance(exc, ClusterkitError):
        return " ".join(str(exc).partition("\n\n")[0].split())
    return f"{type(exc).__name__}: {exc}"


def child_error(tail: str, rc: int) -> str:
    """The error paragraph a ``clusterkit run`` child printed (or its last line), from its stderr."""
    text = tail.replace("\r", "\n")
    at = text.rfind("clusterkit: error:")
    if at >= 0:
        para = text[at + len("clusterkit: error:"):].strip().split("\n\n")[0]
        return " ".join(para.split())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else "no output"
    return f"the run exited with status {rc}: {last}"


def check_plugins(recipe) -> None:
    """Load the recipe's plugins (validating their parameters) without training anything."""
    from ..plugin_manager import load_plugins

    load_plugins(recipe.plugins, allow=recipe.allow_plugins)


def run_isolated(path: str, overrides: list[str], seed: int, run_dir: Path, resume: bool, quiet: bool) -> None:
    """``python -m clusterkit run`` for one seed, its stderr passed through (unless ``quiet``);
    ChildFailed, with the run's error.txt written, when it fails or writes no summary."""
    cmd = [sys.executable, "-m", "clusterkit", "run", str(path)]
    for o in [*overrides, f"run.seed={seed}"]:
        cmd += ["--set", o]
    cmd += ["--resume", str(run_dir)] if resume else ["--out", str(run_dir), "--force"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tail = _pass_through(proc, quiet)
    rc = proc.wait()
    if rc != 0 or not RunDir(run_dir).summary_file.exists():
        text = tail.decode(errors="replace")
        RunDir(run_dir).write_error(f"$ {shlex.join(cmd)}\n(exit status {rc}; the end of its stderr)\n\n{text}")
        raise ChildFailed(child_error(text, rc))


def _pass_through(proc: subprocess.Popen, quiet: bool) -> bytes:
    """Copy the child's stderr to ours as it comes (unless ``quiet``); returns its last 16 KiB."""
    tail = b""
    fd = proc.stderr.fileno()
    while True:
        chunk = os.read(fd, 8192)
        if not chunk:
            break
        tail = (tail + chunk)[-16384:]
        if not quiet:
            try:
                sys.stderr.buffer.write(chunk)
                sys.stderr.buffer.flush()
            except (AttributeError, ValueError):  # a captured stream without a buffer
                sys.stderr.write(chunk.decode(errors="replace"))
    return tail


def run_in_process(recipe, run_dir: Path, resume: bool) -> None:
    """Train one seed in this process, in its locked run directory (error.txt on failure)."""
    from ..trainer import Trainer

    run = RunDir(run_dir)
    if not resume:
        RunDir.create(recipe, run_dir, force=True)
    else:
        run.lock()
    try:
        Trainer(recipe, run_dir, resume=resume).fit()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        run.write_error("".join(traceback.format_exception(exc)))
        raise
    finally:
        run.release()
