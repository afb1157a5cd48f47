"""A whole comparison, :func:`compare`: load and check every recipe, run every (recipe, seed)
(reused, resumed or started), aggregate, and write the tables, ``compare.json`` and the figure."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import attrs

from ..errors import ClusterkitError, RecipeError
from ..outputs import check_output_folder
from ..recipe import load_recipe
from ..rundir import RunDir
from ..show import format_value
from .aggregate import aggregate
from .convergence import plot_comparison
from .plan import check_same_compare, plan_run, previous_compare, recipe_differences, run_labels
from .results import COMPARE_FILE, IGNORED_KEYS, RESULTS, RESULTS_FAILED, CompareResult, RunResult
from .runner import ChildFailed, check_plugins, error_text, run_in_process, run_isolated
from .tables import fmt, seeds_text, write_csv, write_markdown, write_tex

__all__ = ["compare"]

Say = Callable[[str], None]


@attrs.define
class _Recipes:
    """The compared recipe files, their run-folder labels, and each one loaded (None when it
    cannot be) with its load error (None when it loaded)."""

    paths: list[str]
    labels: list[str]
    loaded: list
    errors: list[str | None]

    @property
    def ok(self) -> list:
        return [r for r in self.loaded if r is not None]


@attrs.define
class _Settings:
    """What every run of the comparison shares."""

    seeds: list[int]
    overrides: list[str]
    out: Path
    isolate: bool
    quiet_runs: bool


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def compare(recipes: Sequence[str | os.PathLike], seeds: Sequence[int] = (0, 1, 2),
            overrides: Sequence[str] = (), out: str | os.PathLike = "runs/compare", isolate: bool = True,
            plots: bool = True, echo: Callable[[str], None] | None = _stderr, quiet_runs: bool = False,
            command: str | None = None, force: bool = False) -> CompareResult:
    """Run every recipe for every seed and write the comparison tables (see :mod:`clusterkit.compare`).

    Args:
        recipes: recipe files.  seeds: ``run.seed`` values.  overrides: ``--set`` strings
            applied to every recipe.  out: the comparison folder.
        isolate: one ``clusterkit run`` process per run (True) or in-process Trainers.
        plots: draw ``convergence.png`` (skipped with a warning without matplotlib).
        echo: progress lines (None: silent).  quiet_runs: do not pass the runs' own
            progress output through (isolate=True).
        command: the command line recorded in results.md.
        force: replace the results of a different comparison in ``out`` (otherwise an error).

    The results of an earlier comparison in ``out`` are never lost: a comparison of other
    recipes, seeds or overrides is refused before anything runs (unless ``force``), and a rerun
    with failed runs writes ``results.failed.{md,csv,tex}`` beside complete results, which it
    leaves as they are (with ``compare.json`` and ``convergence.png``).

    Returns a :class:`CompareResult`.  Raises RecipeError only when no recipe can be loaded.
    """
    say = echo or (lambda _text: None)
    settings = _Settings(_checked_seeds(recipes, seeds), list(overrides), Path(out), isolate, quiet_runs)
    found = _load_recipes([str(p) for p in recipes], settings)
    previous = previous_compare(settings.out)
    if previous is not None and not force:
        check_same_compare(settings.out, previous, found.labels, settings.seeds, settings.overrides)
    check_output_folder(settings.out, "--out")  # before anything trains
    differences = recipe_differences(found.ok) if len(found.ok) > 1 else []
    _announce(say, found, settings, differences)
    runs = _run_all(say, found, settings)
    rows = [aggregate(label, path, [r for r in runs if r.label == label])
            for path, label in zip(found.paths, found.labels, strict=True)]
    res = CompareResult(settings.out, rows, runs, differences, [])
    settings.out.mkdir(parents=True, exist_ok=True)
    if command is None:
        command = _command_line(found.paths, settings)
    keep_previous = bool(not res.ok and previous is not None and previous.get("complete") and not force)
    _write_tables(res, RESULTS_FAILED if keep_previous else RESULTS, settings, command)
    if keep_previous:
        say(f"compare: {sum(r.status != 'ok' for r in runs)} run(s) failed; the complete results already in "
            f"{settings.out} (results.md, .csv, .tex) are kept, and this attempt's tables are in {RESULTS_FAILED}.md, "
            ".csv, .tex")
        say(f"compare: wrote {', '.join(str(f) for f in res.files)}")
        return res
    for stale in (f"{RESULTS_FAILED}.md", f"{RESULTS_FAILED}.csv", f"{RESULTS_FAILED}.tex"):
        (settings.out / stale).unlink(missing_ok=True)
    _write_record(res, found, settings, command)
    if plots:
        try:
            res.files.append(plot_comparison(settings.out, runs))
        except ClusterkitError as exc:  # matplotlib missing: the tables stand on their own
            say(f"compare: warning: no convergence.png: {error_text(exc)}")
    say(f"compare: wrote {', '.join(str(f) for f in res.files)}")
    return res


def _checked_seeds(recipes: Sequence, seeds: Sequence[int]) -> list[int]:
    """The seeds as ints; RecipeError for no recipe, or seeds that are none or repeat."""
    seeds = [int(s) for s in seeds]
    if not recipes:
        raise RecipeError("Name at least one recipe file to compare, e.g. clusterkit compare "
                          "recipes/quickstart.yaml recipes/quickstart_propos.yaml --seeds 0 1.")
    if not seeds or len(set(seeds)) != len(seeds):
        raise RecipeError(f"--seeds must list distinct seeds, got {seeds}.")
    return seeds


def _load_recipes(paths: list[str], settings: _Settings) -> _Recipes:
    """Every recipe with the first seed, its plugins' parameters checked; RecipeError when none loads."""
    loaded: list = []
    errors: list[str | None] = []
    for path in paths:
        try:
            recipe = load_recipe(path, [*settings.overrides, f"run.seed={settings.seeds[0]}"])
            check_plugins(recipe)  # a plugin parameter error shows before any recipe trains
            loaded.append(recipe)
            errors.append(None)
        except ClusterkitError as exc:
            loaded.append(None)
            errors.append(error_text(exc))
    if all(r is None for r in loaded):
        raise RecipeError(f"No recipe could be loaded; the first error: {errors[0]}")
    return _Recipes(paths, run_labels(paths, [r.name if r is not None else None for r in loaded]), loaded, errors)


def _announce(say: Say, found: _Recipes, settings: _Settings, differences: list[tuple[str, list]]) -> None:
    """What will run, the keys in which the recipes that loaded differ, and which cannot run."""
    say(f"compare: {len(found.paths)} recipes x {len(settings.seeds)} seeds ({seeds_text(settings.seeds)}) -> "
        f"{settings.out}")
    if len(found.ok) > 1:
        # the difference table covers the recipes that loaded; align its columns with them
        shown = [lab for lab, r in zip(found.labels, found.loaded, strict=True) if r is not None]
        if differences:
            say(f"compare: the recipes differ in {len(differences)} key(s) ({', '.join(IGNORED_KEYS)} not compared):")
            for key, values in differences:
                say(f"  {key}:  " + "  |  ".join(f"{lab} = {format_value(v)}"
                                                  for lab, v in zip(shown, values, strict=True)))
        else:
            say("compare: the recipes are identical apart from their names")
    for label, load_error in zip(found.labels, found.errors, strict=True):
        if load_error is not None:  # said before anything trains; its rows are reported as failed
            say(f"compare: {label} cannot run and is reported as failed: {load_error}")


def _run_all(say: Say, found: _Recipes, settings: _Settings) -> list[RunResult]:
    """Every (recipe, seed) in turn; a recipe that did not load fails each of its seeds."""
    runs: list[RunResult] = []
    total = len(found.paths) * len(settings.seeds)
    n = 0
    for path, label, load_error in zip(found.paths, found.labels, found.errors, strict=True):
        for seed in settings.seeds:
            n += 1
            head = f"[{n}/{total}] {label} seed {seed}"
            if load_error is not None:
                runs.append(RunResult(label, seed, None, "failed", error=load_error))
                say(f"{head}: FAILED: {load_error}")
                continue
            runs.append(_run_one(say, head, path, label, seed, settings))
    return runs


def _run_one(say: Say, head: str, path: str, label: str, seed: int, settings: _Settings) -> RunResult:
    """One seed of one recipe: reused, resumed or started; a failure is recorded, not raised."""
    run_dir = settings.out / label / f"seed{seed}"
    result = RunResult(label, seed, run_dir, "failed")
    t0 = time.perf_counter()
    try:
        recipe = load_recipe(path, [*settings.overrides, f"run.seed={seed}"])
        plan = plan_run(run_dir, recipe)
        if plan == "reuse":
            result.how = "reused"
            say(f"{head}: reused the finished run in {run_dir}")
        else:
            RunDir(run_dir).error_file.unlink(missing_ok=True)  # from an earlier failed attempt
            result.how = "resumed" if plan == "resume" else "started"
            say(f"{head}: {'resuming' if plan == 'resume' else 'training'} -> {run_dir}")
            if settings.isolate:
                run_isolated(path, settings.overrides, seed, run_dir, plan == "resume", settings.quiet_runs)
            else:
                run_in_process(recipe, run_dir, plan == "resume")
        result.summary = json.loads(RunDir(run_dir).summary_file.read_text())
        result.status = "ok"
        m = result.summary["metrics"]
        done_in = "" if plan == "reuse" else f" in {time.perf_counter() - t0:.0f} s"
        q = result.summary.get("quality") or {}
        say(f"{head}: done{done_in}: NMI {fmt(m.get('nmi'))}  ACC {fmt(m.get('acc'))}  ARI {fmt(m.get('ari'))}  "
            f"silhouette {fmt(q.get('silhouette'))}")
    except KeyboardInterrupt:
        raise
    except ChildFailed as exc:
        result.error = str(exc)
        say(f"{head}: FAILED: {result.error}")
    except Exception as exc:  # noqa: BLE001 - one failing run must not stop the others
        result.error = error_text(exc)
        say(f"{head}: FAILED: {result.error}")
    return result


def _command_line(paths: list[str], settings: _Settings) -> str:
    """The ``clusterkit compare`` command that makes this comparison (for results.md)."""
    return ("clusterkit compare " + " ".join(shlex.quote(p) for p in paths)
            + " --seeds " + " ".join(map(str, settings.seeds))
            + "".join(f" --set {shlex.quote(o)}" for o in settings.overrides)
            + f" --out {shlex.quote(str(settings.out))}")


def _write_tables(res: CompareResult, stem: str, settings: _Settings, command: str) -> None:
    """``STEM.md``, ``STEM.csv`` and ``STEM.tex`` in the comparison folder."""
    files = {f"{stem}.md": write_markdown(res, settings.seeds, command, settings.isolate),
             f"{stem}.csv": write_csv(res, settings.seeds), f"{stem}.tex": write_tex(res, settings.seeds)}
    for name, text in files.items():
        (settings.out / name).write_text(text)
        res.files.append(settings.out / name)


def _write_record(res: CompareResult, found: _Recipes, settings: _Settings, command: str) -> None:
    """``compare.json``: what ran, machine-readable (read back by a rerun and by ``clusterkit plot``)."""
    path = settings.out / COMPARE_FILE
    path.write_text(json.dumps({
        "command": command, "seeds": settings.seeds, "overrides": settings.overrides, "isolated": settings.isolate,
        "recipes": [{"label": lab, "path": p} for lab, p in zip(found.labels, found.paths, strict=True)],
        "runs": [{"label": r.label, "seed": r.seed, "run_dir": str(r.run_dir) if r.run_dir else None,
                  "status": r.status, "how": r.how, "error": r.error} for r in res.runs],
        "differences": [{"key": k, "values": v} for k, v in res.differences],
        "complete": res.ok,
    }, indent=2, default=str))
    res.files.append(path)
