"""A comparison's figure: ``OUT/convergence.png``, every recipe's NMI/ACC/ARI curves (mean over
seeds, min-max band), drawn after the runs or redrawn later from ``compare.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import RunDirError
from ..rundir import RunDir
from .results import COMPARE_FILE, CONVERGENCE_FILE, RunResult

__all__ = ["plot_comparison", "plot_compare_dir"]


def plot_comparison(out: Path, runs: list[RunResult]) -> Path:
    """``OUT/convergence.png``: every recipe's NMI/ACC/ARI curves (mean over seeds, min-max band)."""
    from ..plots import METRICS, QUALITY_CURVES, baselines_of, plot_convergence, require_matplotlib

    require_matplotlib()
    groups: dict[str, list[list[dict]]] = {}
    baseline = None
    for run in runs:
        if run.status == "ok" and run.run_dir is not None:
            groups.setdefault(run.label, []).append(RunDir(run.run_dir).epoch_records())
            baseline = baseline or baselines_of(run.summary)
    same_data = len({json.dumps((r.summary or {}).get("protocol", {}).get("dataset")) for r in runs
                     if r.status == "ok"}) <= 1
    labelled = any((r.summary or {}).get("metrics", {}).get("nmi") is not None for r in runs if r.status == "ok")
    return plot_convergence(groups, out / CONVERGENCE_FILE, title="Comparison",
                            baseline=baseline if same_data else None,
                            metrics=METRICS if labelled or not groups else QUALITY_CURVES)


def plot_compare_dir(out: str | os.PathLike, plot_dir: str | os.PathLike | None = None) -> Path:
    """Redraw ``convergence.png`` of a comparison folder from its ``compare.json``, into
    ``plot_dir`` (default: the comparison folder itself)."""
    out = Path(out)
    try:
        info = json.loads((out / COMPARE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise RunDirError(f"Cannot read '{out / COMPARE_FILE}' ({_reason_text(exc)}); rerun the compare command "
                          "that made this folder to rewrite it.") from None
    runs = []
    for r in info["runs"]:
        run_dir = Path(r["run_dir"]) if r["run_dir"] else None
        summary = None
        if r["status"] == "ok" and run_dir is not None and RunDir(run_dir).summary_file.exists():
            summary = json.loads(RunDir(run_dir).summary_file.read_text())
        runs.append(RunResult(r["label"], r["seed"], run_dir, r["status"] if summary else "failed",
                              summary=summary))
    target = Path(plot_dir) if plot_dir is not None else out
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"Cannot create the plot folder '{target}': {exc.strerror or exc}. Choose another "
                          "--out.") from None
    return plot_comparison(target, runs)


def _reason_text(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
