"""Before a comparison trains: the runs' folder names, the keys in which the recipes differ,
whether each run is reused, resumed or started, and whether ``OUT`` holds another comparison."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..errors import RecipeError, RunDirError
from ..recipe import differing_keys, load_recipe
from ..rundir import RECIPE, RunDir
from ..show import format_value, resolved_dict
from .results import COMPARE_FILE, IGNORED_KEYS

__all__ = ["recipe_differences", "run_labels", "plan_run", "previous_compare", "check_same_compare"]


def recipe_differences(recipes: Sequence) -> list[tuple[str, list]]:
    """[(dotted key, [value per recipe])] where the resolved recipes differ (plugin parameters
    completed by their defaults; :data:`IGNORED_KEYS` left out)."""
    return differing_keys([resolved_dict(r) for r in recipes], ignore=IGNORED_KEYS)


def run_labels(paths: Sequence[str], names: Sequence[str | None]) -> list[str]:
    """Folder names: the recipe's name, or name-<file stem> where two recipes share a name."""
    labels = []
    for path, name in zip(paths, names, strict=True):
        base = name or Path(path).stem
        clash = sum(1 for n in names if n == name) > 1
        labels.append(f"{base}-{Path(path).stem}" if clash and name else base)
    for label in labels:
        if labels.count(label) > 1:
            raise RecipeError(f"The recipe '{label}' is listed twice; compare each recipe file once.")
    return labels


def plan_run(run_dir: Path, recipe) -> str:
    """"reuse", "resume" or "start" for ``run_dir`` (RunDirError when it holds another recipe)."""
    summary = RunDir(run_dir).summary_file
    if summary.exists():
        try:
            done = json.loads(summary.read_text())
        except (OSError, json.JSONDecodeError):
            done = {}
        if done.get("recipe_hash") == recipe.hash() or _same_recipe(run_dir, recipe):
            return "reuse"
        raise RunDirError(f"'{run_dir}' holds a finished run of a different recipe "
                          f"({_recipe_change(run_dir, recipe)}). Delete that folder to rerun it, or pass "
                          "another --out.")
    if RunDir(run_dir).latest_checkpoint() is not None:
        return "resume"
    return "start"


def _same_recipe(run_dir: Path, recipe) -> bool:
    """Whether the run's recipe.yaml, re-read through today's schema, is ``recipe``: a run made
    before a key was added to clusterkit (at its default, e.g. data.labels) is the same recipe,
    though its hash differs."""
    try:
        return load_recipe(data=RunDir(run_dir).read_recipe()).to_dict() == recipe.to_dict()
    except Exception:  # noqa: BLE001 - unreadable: not the same
        return False


def _recipe_change(run_dir: Path, recipe) -> str:
    try:
        old = load_recipe(data=RunDir(run_dir).read_recipe())
        diff = differing_keys([old.to_dict(), recipe.to_dict()])
        return "; ".join(f"{k}: {format_value(a)} -> {format_value(b)}" for k, (a, b) in diff) or "formatting only"
    except Exception:  # noqa: BLE001 - only for the message
        return f"its {RECIPE} cannot be read"


def previous_compare(out: Path) -> dict | None:
    """The ``compare.json`` of an earlier comparison in ``out`` (``{}`` when unreadable), or None.
    ``complete``: whether all its runs finished (missing in files of older versions: read from
    its runs)."""
    path = out / COMPARE_FILE
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(info, dict):
        return {}
    if "complete" not in info:
        info["complete"] = bool(info.get("runs")) and all(r.get("status") == "ok" for r in info["runs"])
    return info


def check_same_compare(out: Path, previous: dict, labels: list[str], seeds: list[int], overrides: list[str]) -> None:
    """RunDirError when ``out`` holds the results of a comparison of other recipes, seeds or
    overrides (its results would be replaced by tables of another experiment)."""
    was = {"recipes": [r.get("label") for r in previous.get("recipes", [])], "seeds": previous.get("seeds"),
           "overrides": previous.get("overrides")}
    now = {"recipes": labels, "seeds": seeds, "overrides": overrides}
    changed = [f"{k}: {was[k]} -> {now[k]}" for k in now if was[k] != now[k]]
    if changed:
        raise RunDirError(f"'{out}' holds the results of a different comparison ({'; '.join(changed)}); running "
                          "this one there would replace its results.md, .csv and .tex. Choose another --out, or "
                          "pass --force to replace them (its finished runs of the same recipes are reused).")
