"""What a comparison records: one run, one recipe's row over its seeds, the whole comparison;
the columns of its tables and the file names of its folder."""

from __future__ import annotations

from pathlib import Path

import attrs

from ..cluster.quality import QUALITY_KEYS, QUALITY_NAMES

__all__ = ["RunResult", "RecipeRow", "CompareResult", "IGNORED_KEYS", "STD_NOTE", "METRIC_KEYS", "QUALITY_KEYS",
           "QUALITY_COLUMNS", "COMPARE_FILE", "CONVERGENCE_FILE", "RESULTS", "RESULTS_FAILED"]

#: Keys left out when the compared recipes are diffed.
IGNORED_KEYS = ("name", "description", "run.seed", "run.out_dir")
#: How the tables state their spread.
STD_NOTE = "mean ± sample standard deviation (ddof = 1) over the seeds that finished"
#: The label-based metrics, in table order.
METRIC_KEYS = ("nmi", "acc", "ari")
#: Label-free quality measures in the tables (summary.json's "quality"), with short headers: those of
#: :mod:`clusterkit.cluster.quality`, in its order.
QUALITY_COLUMNS = tuple((key, QUALITY_NAMES[key]) for key in QUALITY_KEYS)
#: What ran (machine-readable); its presence marks a comparison folder.
COMPARE_FILE = "compare.json"
#: Every recipe's NMI/ACC/ARI curves.
CONVERGENCE_FILE = "convergence.png"
#: The tables' file stem, and that of a rerun with failures beside complete results.
RESULTS = "results"
RESULTS_FAILED = "results.failed"


@attrs.define
class RunResult:
    """One (recipe, seed) of a comparison."""

    label: str
    seed: int
    run_dir: Path | None
    status: str                      # "ok" or "failed"
    how: str = ""                    # "started", "resumed", "reused" (or "" when it never ran)
    error: str | None = None
    summary: dict | None = None


@attrs.define
class RecipeRow:
    """Aggregate over the seeds of one recipe (None where no seed finished)."""

    label: str
    path: str
    status: str                      # "ok", "failed", or "k of n seeds failed"
    runs: list[RunResult]
    mean: dict = attrs.field(factory=dict)     # metric -> mean over finished seeds
    std: dict = attrs.field(factory=dict)      # metric -> sample std (ddof 1); None with < 2 seeds
    best: dict = attrs.field(factory=dict)     # metric -> max over finished seeds
    seconds_per_epoch: float | None = None     # mean over finished seeds
    wall_time_s: float | None = None           # sum over finished seeds
    peak_memory_mb: float | None = None        # max over finished seeds
    num_params: int | None = None
    error: str | None = None                   # the first error, if any


@attrs.define
class CompareResult:
    """A whole comparison: its folder, one row per recipe, every run, the keys in which the
    recipes differ and the files written."""

    out: Path
    rows: list[RecipeRow]
    runs: list[RunResult]
    differences: list[tuple[str, list]]
    files: list[Path]

    @property
    def ok(self) -> bool:
        return all(run.status == "ok" for run in self.runs) and bool(self.runs)
