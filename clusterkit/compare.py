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
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shlex
import subprocess
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

import attrs

from .errors import ClusterkitError, RecipeError, RunDirError
from .outputs import check_output_folder
from .rundir import RECIPE, RunDir

__all__ = ["compare", "CompareResult", "RunResult", "RecipeRow", "aggregate", "recipe_differences",
           "IGNORED_KEYS", "STD_NOTE"]

#: Keys left out when the compared recipes are diffed.
IGNORED_KEYS = ("name", "description", "run.seed", "run.out_dir")
#: How the tables state their spread.
STD_NOTE = "mean ± sample standard deviation (ddof = 1) over the seeds that finished"
METRIC_KEYS = ("nmi", "acc", "ari")
#: Label-free quality measures in the tables (summary.json's "quality"), with short headers.
QUALITY_COLUMNS = (("silhouette", "silhouette"), ("calinski_harabasz", "Calinski-Harabasz"),
                   ("davies_bouldin", "Davies-Bouldin"), ("size_entropy", "size entropy"),
                   ("min_share", "min share"), ("max_share", "max share"), ("mean_confidence", "mean confidence"))
QUALITY_KEYS = tuple(key for key, _ in QUALITY_COLUMNS)


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
    out: Path
    rows: list[RecipeRow]
    runs: list[RunResult]
    differences: list[tuple[str, list]]
    files: list[Path]

    @property
    def ok(self) -> bool:
        return all(run.status == "ok" for run in self.runs) and bool(self.runs)


# -- recipes and what differs ----------------------------------------------------------------------

def recipe_differences(recipes: Sequence) -> list[tuple[str, list]]:
    """[(dotted key, [value per recipe])] where the resolved recipes differ (plugin parameters
    completed by their defaults; :data:`IGNORED_KEYS` left out)."""
    from .show import differing_keys, resolved_dict

    return differing_keys([resolved_dict(r) for r in recipes], ignore=IGNORED_KEYS)


def _fmt_value(value) -> str:
    from .show import _flat

    return _flat(value)


def _labels(paths: Sequence[str], names: Sequence[str | None]) -> list[str]:
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


# -- one run ---------------------------------------------------------------------------------------

def _plan(run_dir: Path, recipe) -> str:
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
    from .recipe import load_recipe

    try:
        return load_recipe(data=RunDir(run_dir).read_recipe()).to_dict() == recipe.to_dict()
    except Exception:  # noqa: BLE001 - unreadable: not the same
        return False


def _recipe_change(run_dir: Path, recipe) -> str:
    from .recipe import load_recipe
    from .show import differing_keys

    try:
        old = load_recipe(data=RunDir(run_dir).read_recipe())
        diff = differing_keys([old.to_dict(), recipe.to_dict()])
        return "; ".join(f"{k}: {_fmt_value(a)} -> {_fmt_value(b)}" for k, (a, b) in diff) or "formatting only"
    except Exception:  # noqa: BLE001 - only for the message
        return f"its {RECIPE} cannot be read"


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, ClusterkitError):
        return " ".join(str(exc).partition("\n\n")[0].split())
    return f"{type(exc).__name__}: {exc}"


def _child_error(tail: str, rc: int) -> str:
    """The error paragraph a ``clusterkit run`` child printed (or its last line), from its stderr."""
    text = tail.replace("\r", "\n")
    at = text.rfind("clusterkit: error:")
    if at >= 0:
        para = text[at + len("clusterkit: error:"):].strip().split("\n\n")[0]
        return " ".join(para.split())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else "no output"
    return f"the run exited with status {rc}: {last}"


def _run_isolated(path: str, overrides: list[str], seed: int, run_dir: Path, resume: bool,
                  echo: Callable[[str], None], quiet: bool) -> None:
    cmd = [sys.executable, "-m", "clusterkit", "run", str(path)]
    for o in [*overrides, f"run.seed={seed}"]:
        cmd += ["--set", o]
    cmd += ["--resume", str(run_dir)] if resume else ["--out", str(run_dir), "--force"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
    rc = proc.wait()
    if rc != 0 or not RunDir(run_dir).summary_file.exists():
        text = tail.decode(errors="replace")
        RunDir(run_dir).write_error(f"$ {shlex.join(cmd)}\n(exit status {rc}; the end of its stderr)\n\n{text}")
        raise _ChildFailed(_child_error(text, rc))


class _ChildFailed(Exception):
    pass


def _run_in_process(recipe, run_dir: Path, resume: bool) -> None:
    from .trainer import Trainer

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


# -- aggregation -----------------------------------------------------------------------------------

def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _sample_std(values: list[float]) -> float | None:
    """Sample standard deviation (ddof = 1); None for fewer than two values."""
    if len(values) < 2:
        return None
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def aggregate(label: str, path: str, runs: list[RunResult]) -> RecipeRow:
    """Mean, sample std, best, time and memory over the finished seeds of one recipe."""
    done = [r for r in runs if r.status == "ok" and r.summary]
    failed = [r for r in runs if r.status != "ok"]
    if not runs:
        status = "failed"
    elif not failed:
        status = "ok"
    elif not done:
        status = "failed"
    else:
        status = f"{len(failed)} of {len(runs)} seeds failed"
    row = RecipeRow(label, path, status, runs, error=failed[0].error if failed else None)
    for key in METRIC_KEYS:
        values = [float(r.summary["metrics"][key]) for r in done if r.summary["metrics"].get(key) is not None]
        row.mean[key] = _mean(values)
        row.std[key] = _sample_std(values)
        row.best[key] = max(values) if values else None
    for key in QUALITY_KEYS:
        values = [float(q[key]) for r in done if (q := r.summary.get("quality") or {}).get(key) is not None]
        row.mean[key] = _mean(values)
        row.std[key] = _sample_std(values)
    spe = [r.summary["seconds_per_epoch"] for r in done if r.summary.get("seconds_per_epoch") is not None]
    row.seconds_per_epoch = _mean(spe)
    row.wall_time_s = sum(r.summary["wall_time_s"] for r in done) if done else None
    row.peak_memory_mb = max(r.summary["peak_memory_mb"] for r in done) if done else None
    row.num_params = done[0].summary.get("num_params") if done else None
    return row


# -- tables ----------------------------------------------------------------------------------------

def _f(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pm(mean, std, digits: int = 3, sep: str = " ± ") -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f}{sep}{std:.{digits}f}"


def _int(value) -> str:
    return "–" if value is None else f"{int(value):,}"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _seeds_text(seeds: Sequence[int]) -> str:
    return ", ".join(str(s) for s in seeds)


def _notes(isolate: bool) -> list[str]:
    memory = ("peak memory: the highest over the seeds (CPU: the run process's peak resident set size; "
              "CUDA: peak allocated GPU memory)" if isolate else
              "peak memory: the highest over the seeds, of the one process that ran every run in turn "
              "(in-process compare: a run's figure includes those before it)")
    return [f"NMI / ACC / ARI: {STD_NOTE} (one seed: no std); best: the highest value over those seeds.",
            "s / epoch: mean over the seeds; wall time: summed over the seeds; " + memory + "; parameters: "
            "every module of the model (backbone, heads, EMA target)."]


def write_markdown(res: CompareResult, seeds: Sequence[int], command: str, isolate: bool) -> str:
    out = io.StringIO()
    w = out.write
    w("# clusterkit compare\n\n")
    w(f"`{command}`  \n{datetime.now().strftime('%Y-%m-%d %H:%M')}; seeds {_seeds_text(seeds)}; "
      f"runs in `{res.out}/<recipe>/seed<N>/`.\n\n")
    for note in _notes(isolate):
        w(f"{note}  \n")
    w("\n| recipe | status | seeds | NMI | ACC | ARI | best NMI | best ACC | best ARI | s / epoch | "
      "wall time (s) | peak memory (MB) | parameters |\n")
    w("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    for row in res.rows:
        done = sum(1 for r in row.runs if r.status == "ok")
        cells = [row.label, row.status, f"{done}/{len(row.runs)}"]
        cells += [_pm(row.mean.get(k), row.std.get(k)) for k in METRIC_KEYS]
        cells += [_f(row.best.get(k)) for k in METRIC_KEYS]
        cells += [_f(row.seconds_per_epoch, 2), _f(row.wall_time_s, 1), _f(row.peak_memory_mb, 0),
                  _int(row.num_params)]
        w("| " + " | ".join(_md_cell(c) for c in cells) + " |\n")
    for name, mean, std, n, missing in baseline_rows(res.runs):
        if missing:
            w(f"| {_md_cell(name)} | {_md_cell(missing)} | 0/{n} |" + " – |" * 10 + "\n")
            continue
        cells = [name, "baseline", f"{n}/{n}"] + [_pm(mean[k], std[k]) for k in METRIC_KEYS]
        w("| " + " | ".join(_md_cell(c) for c in cells + ["–"] * 7) + " |\n")
    if any(row.mean.get(k) is not None for row in res.rows for k in QUALITY_KEYS):
        w("\n## Label-free quality\n\nOn the final features and predictions, no labels used "
          "(clusterkit.cluster.quality): silhouette (cosine, on a seeded sample) and Calinski-Harabasz higher is "
          "better, Davies-Bouldin lower is better; size entropy 1 = equal cluster sizes; min / max share: the "
          "smallest / largest cluster's share of the data; mean confidence depends on the prediction rule. "
          f"{STD_NOTE}.\n\n| recipe | " + " | ".join(h for _, h in QUALITY_COLUMNS) + " |\n|---|"
          + "---:|" * len(QUALITY_COLUMNS) + "\n")
        for row in res.rows:
            digits = {"calinski_harabasz": 1}
            cells = [row.label] + [_pm(row.mean.get(k), row.std.get(k), digits.get(k, 3)) for k in QUALITY_KEYS]
            w("| " + " | ".join(_md_cell(c) for c in cells) + " |\n")
    w("\n## Per seed\n\n| recipe | seed | status | NMI | ACC | ARI | epochs | s / epoch | wall time (s) | "
      "peak memory (MB) | run |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|\n")
    for run in res.runs:
        s = run.summary or {}
        m = s.get("metrics", {})
        status = run.status if run.status != "ok" else f"ok ({run.how})"
        cells = [run.label, str(run.seed), status, _f(m.get("nmi")), _f(m.get("acc")), _f(m.get("ari")),
                 str(s.get("epochs", "–")), _f(s.get("seconds_per_epoch"), 2), _f(s.get("wall_time_s"), 1),
                 _f(s.get("peak_memory_mb"), 0), f"`{run.run_dir}`" if run.run_dir else "–"]
        w("| " + " | ".join(_md_cell(c) for c in cells) + " |\n")
    w("\n## What differs between the recipes\n\n")
    if res.differences:
        w(f"Resolved recipes, plugin parameters completed by their defaults ({', '.join(IGNORED_KEYS)} not "
          "compared):\n\n| key | " + " | ".join(_md_cell(r.label) for r in res.rows) + " |\n|---|"
          + "---|" * len(res.rows) + "\n")
        for key, values in res.differences:
            w(f"| `{key}` | " + " | ".join(_md_cell(f"`{_fmt_value(v)}`") for v in values) + " |\n")
    else:
        w("Nothing apart from their names: the recipes are the same.\n")
    failures = [r for r in res.runs if r.status != "ok"]
    if failures:
        w("\n## Failures\n\n")
        for run in failures:
            where = f" (details: `{RunDir(run.run_dir).error_file}`)" if run.run_dir and \
                RunDir(run.run_dir).error_file.exists() else ""
            w(f"- **{_md_cell(run.label)}**, seed {run.seed}: {_md_cell(run.error)}{where}\n")
    return out.getvalue()


def pixel_baseline_row(runs: list[RunResult], key: str = "pixel_kmeans") -> tuple[dict, dict, int] | None:
    """(mean, sample std, seeds) of the runs' k-means on the raw pixels (``pixel_kmeans`` in their
    summaries, or another baseline ``key`` of :data:`clusterkit.baselines.BASELINE_ROWS`), one per
    seed, when the finished runs share one dataset and evaluation split; None otherwise or when no
    summary holds it (or only its ``unavailable`` note)."""
    done = [r for r in runs if r.status == "ok" and r.summary]
    protocols = {json.dumps([(r.summary.get("protocol") or {}).get(k) for k in ("dataset", "eval_split")])
                 for r in done}
    if len(protocols) != 1:
        return None
    per_seed: dict[int, dict] = {}
    for r in done:
        if r.summary.get(key) and not r.summary[key].get("unavailable"):
            per_seed.setdefault(r.seed, r.summary[key])
    if not per_seed:
        return None
    values = {k: [m[k] for m in per_seed.values() if m.get(k) is not None] for k in METRIC_KEYS}
    return ({k: _mean(v) for k, v in values.items()}, {k: _sample_std(v) for k, v in values.items()}, len(per_seed))


def baseline_rows(runs: list[RunResult]) -> list[tuple[str, dict, dict, int, str | None]]:
    """The baseline rows every table shows under the recipes: ``(name, mean, sample std, seeds,
    note)`` for each baseline of :data:`clusterkit.baselines.BASELINE_ROWS` the runs' summaries
    hold with labels (``nmi``); ``note``: why it is missing (umap-learn not installed), else None."""
    from .baselines import BASELINE_ROWS

    out: list[tuple[str, dict, dict, int, str | None]] = []
    for key, name in BASELINE_ROWS.items():
        row = pixel_baseline_row(runs, key)
        if row is not None and any(v is not None for v in row[0].values()):
            out.append((name, *row, None))
            continue
        notes = {(r.summary or {}).get(key, {}).get("unavailable") for r in runs if r.status == "ok" and r.summary
                 and (r.summary or {}).get(key)}
        notes.discard(None)
        if notes:
            out.append((name, {}, {}, len({r.seed for r in runs if r.status == "ok"}), sorted(notes)[0]))
    return out


def _csv_num(value) -> str:
    return "" if value is None else repr(float(value)) if isinstance(value, float) else str(value)


def write_csv(res: CompareResult, seeds: Sequence[int]) -> str:
    """One row per recipe: full-precision means, sample stds (ddof 1), bests and per-seed values."""
    out = io.StringIO()
    header = ["recipe", "recipe_file", "status", "seeds", "seeds_ok"]
    for k in METRIC_KEYS:
        header += [f"{k}_mean", f"{k}_std", f"{k}_best"]
    for k in QUALITY_KEYS:
        header += [f"{k}_mean", f"{k}_std"]
    for s in seeds:
        header += [f"{k}_seed{s}" for k in METRIC_KEYS]
    header += ["seconds_per_epoch", "wall_time_s", "peak_memory_mb", "num_params", "error"]
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in res.rows:
        by_seed = {r.seed: r for r in row.runs}
        values = [row.label, row.path, row.status, " ".join(str(s) for s in seeds),
                  sum(1 for r in row.runs if r.status == "ok")]
        for k in METRIC_KEYS:
            values += [_csv_num(row.mean.get(k)), _csv_num(row.std.get(k)), _csv_num(row.best.get(k))]
        for k in QUALITY_KEYS:
            values += [_csv_num(row.mean.get(k)), _csv_num(row.std.get(k))]
        for s in seeds:
            run = by_seed.get(s)
            m = run.summary["metrics"] if run is not None and run.status == "ok" and run.summary else {}
            values += [_csv_num(m.get(k)) for k in METRIC_KEYS]
        values += [_csv_num(row.seconds_per_epoch), _csv_num(row.wall_time_s), _csv_num(row.peak_memory_mb),
                   _csv_num(row.num_params), row.error or ""]
        writer.writerow(values)
    for name, mean, std, n, missing in baseline_rows(res.runs):  # status "baseline"; no best, time, per seed
        values = [name, "", "baseline" if not missing else "unavailable", "", 0 if missing else n]
        for k in METRIC_KEYS:
            values += [_csv_num(mean.get(k)), _csv_num(std.get(k)), ""]
        values += [""] * (len(header) - len(values) - 1) + [missing or ""]
        writer.writerow(values)
    return out.getvalue()


def _tex(text) -> str:
    repl = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}
    repl["±"] = r"$\pm$"
    return "".join(repl.get(c, c) for c in str(text))


def write_tex(res: CompareResult, seeds: Sequence[int]) -> str:
    """Two booktabs tables: mean ± sample std with best-of, time and memory; and per seed."""
    lines = ["% clusterkit compare; needs \\usepackage{booktabs}",
             "\\begin{table}[t]", "\\centering", "\\small",
             f"\\caption{{Clustering results, {_tex(STD_NOTE)} (seeds {_seeds_text(seeds)}); best: the highest "
             "value over those seeds. Time: seconds per epoch (mean) and total wall time (all seeds); memory: "
             "the highest peak over the seeds.}",
             "\\label{tab:clusterkit-compare}",
             "\\begin{tabular}{llccccccrrrr}", "\\toprule",
             "Recipe & Status & NMI & ACC & ARI & best NMI & best ACC & best ARI & s/epoch & wall time (s) & "
             "memory (MB) & parameters \\\\", "\\midrule"]
    for row in res.rows:
        cells = [_tex(row.label), _tex(row.status)]
        cells += [_pm(row.mean.get(k), row.std.get(k), sep=" $\\pm$ ").replace("–", "--") for k in METRIC_KEYS]
        cells += [_f(row.best.get(k)).replace("–", "--") for k in METRIC_KEYS]
        cells += [_f(row.seconds_per_epoch, 2).replace("–", "--"), _f(row.wall_time_s, 1).replace("–", "--"),
                  _f(row.peak_memory_mb, 0).replace("–", "--"), _int(row.num_params).replace("–", "--")
                  .replace(",", "{,}")]
        lines.append(" & ".join(cells) + " \\\\")
    for name, mean, std, _n, missing in baseline_rows(res.runs):
        cells = [_tex(name), _tex("baseline" if not missing else "unavailable")]
        cells += [_pm(mean.get(k), std.get(k), sep=" $\\pm$ ").replace("–", "--") for k in METRIC_KEYS]
        lines.append(" & ".join(cells + ["--"] * 7) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}", "",
              *_tex_quality(res),
              "\\begin{table}[t]", "\\centering", "\\small",
              "\\caption{Per-seed clustering results (final epoch).}", "\\label{tab:clusterkit-compare-seeds}",
              "\\begin{tabular}{lrlccc}", "\\toprule", "Recipe & Seed & Status & NMI & ACC & ARI \\\\", "\\midrule"]
    for run in res.runs:
        m = (run.summary or {}).get("metrics", {}) if run.status == "ok" else {}
        cells = [_tex(run.label), str(run.seed), _tex(run.status)] + \
                [_f(m.get(k)).replace("–", "--") for k in METRIC_KEYS]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(lines)


def _tex_quality(res: CompareResult) -> list[str]:
    """The label-free quality table (none when no run reported quality)."""
    if not any(row.mean.get(k) is not None for row in res.rows for k in QUALITY_KEYS):
        return []
    lines = ["\\begin{table}[t]", "\\centering", "\\small",
             f"\\caption{{Label-free clustering quality, {_tex(STD_NOTE)}: silhouette (cosine), Calinski-Harabasz "
             "(higher is better), Davies-Bouldin (lower is better), cluster-size entropy (1: equal sizes), the "
             "smallest and largest cluster's share, mean confidence.}", "\\label{tab:clusterkit-compare-quality}",
             "\\begin{tabular}{l" + "c" * len(QUALITY_KEYS) + "}", "\\toprule",
             "Recipe & " + " & ".join(_tex(h) for _, h in QUALITY_COLUMNS) + " \\\\", "\\midrule"]
    for row in res.rows:
        cells = [_tex(row.label)] + [_pm(row.mean.get(k), row.std.get(k), 1 if k == "calinski_harabasz" else 3,
                                         sep=" $\\pm$ ").replace("–", "--") for k in QUALITY_KEYS]
        lines.append(" & ".join(cells) + " \\\\")
    return lines + ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]


# -- the comparison --------------------------------------------------------------------------------

def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def compare(recipes: Sequence[str | os.PathLike], seeds: Sequence[int] = (0, 1, 2),
            overrides: Sequence[str] = (), out: str | os.PathLike = "runs/compare", isolate: bool = True,
            plots: bool = True, echo: Callable[[str], None] | None = _stderr, quiet_runs: bool = False,
            command: str | None = None, force: bool = False) -> CompareResult:
    """Run every recipe for every seed and write the comparison tables (see the module doc).

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
    from .recipe import load_recipe

    say = echo or (lambda _text: None)
    seeds = [int(s) for s in seeds]
    if not recipes:
        raise RecipeError("Name at least one recipe file to compare, e.g. clusterkit compare "
                          "recipes/quickstart.yaml recipes/quickstart_propos.yaml --seeds 0 1.")
    if not seeds or len(set(seeds)) != len(seeds):
        raise RecipeError(f"--seeds must list distinct seeds, got {seeds}.")
    overrides = list(overrides)
    out = Path(out)
    paths = [str(p) for p in recipes]
    loaded: list = []
    load_errors: list[str | None] = []
    for path in paths:
        try:
            recipe = load_recipe(path, [*overrides, f"run.seed={seeds[0]}"])
            _check_plugins(recipe)  # a plugin parameter error shows before any recipe trains
            loaded.append(recipe)
            load_errors.append(None)
        except ClusterkitError as exc:
            loaded.append(None)
            load_errors.append(_error_text(exc))
    if all(r is None for r in loaded):
        raise RecipeError(f"No recipe could be loaded; the first error: {load_errors[0]}")
    labels = _labels(paths, [r.name if r is not None else None for r in loaded])
    previous = _previous_compare(out)
    if previous is not None and not force:
        _check_same_compare(out, previous, labels, seeds, overrides)
    check_output_folder(out, "--out")  # before anything trains
    ok = [r for r in loaded if r is not None]
    differences = recipe_differences(ok) if len(ok) > 1 else []
    # the difference table covers the recipes that loaded; align its columns with them
    say(f"compare: {len(paths)} recipes x {len(seeds)} seeds ({_seeds_text(seeds)}) -> {out}")
    if len(ok) > 1:
        shown = [lab for lab, r in zip(labels, loaded, strict=True) if r is not None]
        if differences:
            say(f"compare: the recipes differ in {len(differences)} key(s) ({', '.join(IGNORED_KEYS)} not compared):")
            for key, values in differences:
                say(f"  {key}:  " + "  |  ".join(f"{lab} = {_fmt_value(v)}"
                                                  for lab, v in zip(shown, values, strict=True)))
        else:
            say("compare: the recipes are identical apart from their names")
    for label, load_error in zip(labels, load_errors, strict=True):
        if load_error is not None:  # said before anything trains; its rows are reported as failed
            say(f"compare: {label} cannot run and is reported as failed: {load_error}")
    runs: list[RunResult] = []
    total = len(paths) * len(seeds)
    n = 0
    for path, label, recipe0, load_error in zip(paths, labels, loaded, load_errors, strict=True):
        for seed in seeds:
            n += 1
            head = f"[{n}/{total}] {label} seed {seed}"
            if recipe0 is None:
                runs.append(RunResult(label, seed, None, "failed", error=load_error))
                say(f"{head}: FAILED: {load_error}")
                continue
            run_dir = out / label / f"seed{seed}"
            result = RunResult(label, seed, run_dir, "failed")
            runs.append(result)
            t0 = time.perf_counter()
            try:
                recipe = load_recipe(path, [*overrides, f"run.seed={seed}"])
                plan = _plan(run_dir, recipe)
                if plan == "reuse":
                    result.how = "reused"
                    say(f"{head}: reused the finished run in {run_dir}")
                else:
                    RunDir(run_dir).error_file.unlink(missing_ok=True)  # from an earlier failed attempt
                    result.how = "resumed" if plan == "resume" else "started"
                    say(f"{head}: {'resuming' if plan == 'resume' else 'training'} -> {run_dir}")
                    if isolate:
                        _run_isolated(path, overrides, seed, run_dir, plan == "resume", say, quiet_runs)
                    else:
                        _run_in_process(recipe, run_dir, plan == "resume")
                result.summary = json.loads(RunDir(run_dir).summary_file.read_text())
                result.status = "ok"
                m = result.summary["metrics"]
                done_in = "" if plan == "reuse" else f" in {time.perf_counter() - t0:.0f} s"
                q = result.summary.get("quality") or {}
                say(f"{head}: done{done_in}: NMI {_f(m.get('nmi'))}  ACC {_f(m.get('acc'))}  ARI {_f(m.get('ari'))}  "
                    f"silhouette {_f(q.get('silhouette'))}")
            except KeyboardInterrupt:
                raise
            except _ChildFailed as exc:
                result.error = str(exc)
                say(f"{head}: FAILED: {result.error}")
            except Exception as exc:  # noqa: BLE001 - one failing run must not stop the others
                result.error = _error_text(exc)
                say(f"{head}: FAILED: {result.error}")
    rows = [aggregate(label, path, [r for r in runs if r.label == label])
            for path, label in zip(paths, labels, strict=True)]
    res = CompareResult(out, rows, runs, differences, [])
    out.mkdir(parents=True, exist_ok=True)
    if command is None:
        command = "clusterkit compare " + " ".join(shlex.quote(p) for p in paths) + \
            " --seeds " + " ".join(map(str, seeds)) + "".join(f" --set {shlex.quote(o)}" for o in overrides) + \
            f" --out {shlex.quote(str(out))}"
    keep_previous = not res.ok and previous is not None and previous.get("complete") and not force
    stem = "results.failed" if keep_previous else "results"
    files = {f"{stem}.md": write_markdown(res, seeds, command, isolate), f"{stem}.csv": write_csv(res, seeds),
             f"{stem}.tex": write_tex(res, seeds)}
    for name, text in files.items():
        (out / name).write_text(text)
        res.files.append(out / name)
    if keep_previous:
        say(f"compare: {sum(r.status != 'ok' for r in runs)} run(s) failed; the complete results already in {out} "
            f"(results.md, .csv, .tex) are kept, and this attempt's tables are in {stem}.md, .csv, .tex")
        say(f"compare: wrote {', '.join(str(f) for f in res.files)}")
        return res
    for stale in ("results.failed.md", "results.failed.csv", "results.failed.tex"):
        (out / stale).unlink(missing_ok=True)
    (out / "compare.json").write_text(json.dumps({
        "command": command, "seeds": seeds, "overrides": overrides, "isolated": isolate,
        "recipes": [{"label": lab, "path": p} for lab, p in zip(labels, paths, strict=True)],
        "runs": [{"label": r.label, "seed": r.seed, "run_dir": str(r.run_dir) if r.run_dir else None,
                  "status": r.status, "how": r.how, "error": r.error} for r in runs],
        "differences": [{"key": k, "values": v} for k, v in differences],
        "complete": res.ok,
    }, indent=2, default=str))
    res.files.append(out / "compare.json")
    if plots:
        try:
            res.files.append(plot_comparison(out, runs))
        except ClusterkitError as exc:  # matplotlib missing: the tables stand on their own
            say(f"compare: warning: no convergence.png: {_error_text(exc)}")
    say(f"compare: wrote {', '.join(str(f) for f in res.files)}")
    return res


def _check_plugins(recipe) -> None:
    """Load the recipe's plugins (validating their parameters) without training anything."""
    from .plugin_manager import load_plugins

    load_plugins(recipe.plugins, allow=recipe.allow_plugins)


def _previous_compare(out: Path) -> dict | None:
    """The ``compare.json`` of an earlier comparison in ``out`` (``{}`` when unreadable), or None.
    ``complete``: whether all its runs finished (missing in files of older versions: read from
    its runs)."""
    path = out / "compare.json"
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


def _check_same_compare(out: Path, previous: dict, labels: list[str], seeds: list[int], overrides: list[str]) -> None:
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


def plot_comparison(out: Path, runs: list[RunResult]) -> Path:
    """``OUT/convergence.png``: every recipe's NMI/ACC/ARI curves (mean over seeds, min-max band)."""
    from .plots import METRICS, QUALITY_CURVES, baselines_of, plot_convergence, require_matplotlib
    from .show import epoch_records

    require_matplotlib()
    groups: dict[str, list[list[dict]]] = {}
    baseline = None
    for run in runs:
        if run.status == "ok" and run.run_dir is not None:
            groups.setdefault(run.label, []).append(epoch_records(run.run_dir))
            baseline = baseline or baselines_of(run.summary)
    same_data = len({json.dumps((r.summary or {}).get("protocol", {}).get("dataset")) for r in runs
                     if r.status == "ok"}) <= 1
    labelled = any((r.summary or {}).get("metrics", {}).get("nmi") is not None for r in runs if r.status == "ok")
    return plot_convergence(groups, out / "convergence.png", title="Comparison",
                            baseline=baseline if same_data else None,
                            metrics=METRICS if labelled or not groups else QUALITY_CURVES)


def plot_compare_dir(out: str | os.PathLike, plot_dir: str | os.PathLike | None = None) -> Path:
    """Redraw ``convergence.png`` of a comparison folder from its ``compare.json``, into
    ``plot_dir`` (default: the comparison folder itself)."""
    out = Path(out)
    try:
        info = json.loads((out / "compare.json").read_text())
    except (OSError, ValueError) as exc:
        raise RunDirError(f"Cannot read '{out / 'compare.json'}' ({_reason_text(exc)}); rerun the compare command "
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
