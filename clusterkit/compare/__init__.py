"""Head-to-head comparisons: ``clusterkit compare RECIPE... --seeds 0 1 2``.

Every recipe runs for every seed with the same ``--set`` overrides, as an ordinary run in
``OUT/<recipe name>/seed<N>/`` (recipe.yaml, metrics.jsonl, checkpoints/, summary.json).
Before anything runs, the keys in which the resolved recipes differ are printed (their
``name``, ``description``, ``run.seed`` and ``run.out_dir`` are not compared), so an unfair
comparison (another backbone, batch size or epoch budget) is visible.

A run is

* **reused** when its folder already holds a ``summary.json`` of the same resolved
  recipe (same recipe hash): it is not trained again;
* **resumed** from its last checkpoint when it has checkpoints but no summary (an
  interrupted compare), so rerunning the same command continues where it stopped;
* **started** otherwise.  A folder holding a run of a different recipe is an error for
  that run (delete the folder or choose another ``--out``), never overwritten.

Each run executes in its own ``python -m clusterkit run`` process (``isolate=True``, the
CLI's default), so its peak memory is its own and a crash cannot take the comparison
down; ``isolate=False`` runs in-process (faster to start; peak memory then is the
process's so far).  A failing run (bad plugin parameter, missing data, divergence) is
reported in the tables with its error and the others go on.

Outputs in ``OUT``: ``results.md``, ``results.csv`` and ``results.tex`` (NMI/ACC/ARI mean ±
sample standard deviation, ddof = 1, over the seeds that finished; the best seed's value;
per-seed values; seconds per epoch; total wall time; peak memory; parameter count; and the
label-free quality measures of :mod:`clusterkit.cluster.quality`, mean ± std, the only scores
of unlabeled runs, whose NMI/ACC/ARI cells stay empty),
``compare.json`` (what ran, machine-readable) and ``convergence.png`` (matplotlib).

The package, one concern a module: :mod:`~clusterkit.compare.results` (what a comparison
records), :mod:`~clusterkit.compare.plan` (labels, recipe differences, reuse/resume/start),
:mod:`~clusterkit.compare.runner` (one run, in a child process or in this one),
:mod:`~clusterkit.compare.aggregate` (statistics over seeds, baseline rows),
:mod:`~clusterkit.compare.tables` (Markdown, CSV, LaTeX), :mod:`~clusterkit.compare.convergence`
(the figure) and :mod:`~clusterkit.compare.experiment` (:func:`compare`, composing them).
"""

from __future__ import annotations

from .aggregate import aggregate, baseline_rows, baseline_stats
from .convergence import plot_compare_dir, plot_comparison
from .experiment import compare
from .plan import recipe_differences
from .results import (
    COMPARE_FILE,
    IGNORED_KEYS,
    METRIC_KEYS,
    QUALITY_COLUMNS,
    QUALITY_KEYS,
    STD_NOTE,
    CompareResult,
    RecipeRow,
    RunResult,
)
from .tables import write_csv, write_markdown, write_tex

__all__ = ["compare", "CompareResult", "RunResult", "RecipeRow", "aggregate", "recipe_differences",
           "IGNORED_KEYS", "STD_NOTE", "METRIC_KEYS", "QUALITY_KEYS", "QUALITY_COLUMNS", "COMPARE_FILE",
           "baseline_rows", "baseline_stats", "write_markdown", "write_csv", "write_tex", "plot_comparison",
           "plot_compare_dir"]
