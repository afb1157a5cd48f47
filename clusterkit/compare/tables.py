"""The comparison's tables: ``results.md`` (Markdown), ``results.csv`` (full precision) and
``results.tex`` (booktabs), written from a :class:`~clusterkit.compare.results.CompareResult`."""

from __future__ import annotations

import csv
import io
from datetime import datetime
from typing import Sequence

from ..rundir import RunDir
from ..show import format_value
from .aggregate import baseline_rows
from .results import IGNORED_KEYS, METRIC_KEYS, QUALITY_COLUMNS, QUALITY_KEYS, STD_NOTE, CompareResult

__all__ = ["write_markdown", "write_csv", "write_tex", "fmt", "seeds_text"]


def fmt(value, digits: int = 3) -> str:
    """A number with ``digits`` decimals; "–" for None."""
    return "–" if value is None else f"{value:.{digits}f}"


def _pm(mean, std, digits: int = 3, sep: str = " ± ") -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f}{sep}{std:.{digits}f}"


def _int(value) -> str:
    return "–" if value is None else f"{int(value):,}"


def seeds_text(seeds: Sequence[int]) -> str:
    """``"0, 1, 2"``."""
    return ", ".join(str(s) for s in seeds)


# -- results.md ------------------------------------------------------------------------------------

def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_row(cells: list) -> str:
    return "| " + " | ".join(_md_cell(c) for c in cells) + " |\n"


def _notes(isolate: bool) -> list[str]:
    memory = ("peak memory: the highest over the seeds (CPU: the run process's peak resident set size; "
              "CUDA: peak allocated GPU memory)" if isolate else
              "peak memory: the highest over the seeds, of the one process that ran every run in turn "
              "(in-process compare: a run's figure includes those before it)")
    return [f"NMI / ACC / ARI: {STD_NOTE} (one seed: no std); best: the highest value over those seeds.",
            "s / epoch: mean over the seeds; wall time: summed over the seeds; " + memory + "; parameters: "
            "every module of the model (backbone, heads, EMA target)."]


def _md_summary(res: CompareResult) -> str:
    """The main table: a row per recipe, then the baseline rows."""
    text = ("\n| recipe | status | seeds | NMI | ACC | ARI | best NMI | best ACC | best ARI | s / epoch | "
            "wall time (s) | peak memory (MB) | parameters |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    for row in res.rows:
        done = sum(1 for r in row.runs if r.status == "ok")
        cells = [row.label, row.status, f"{done}/{len(row.runs)}"]
        cells += [_pm(row.mean.get(k), row.std.get(k)) for k in METRIC_KEYS]
        cells += [fmt(row.best.get(k)) for k in METRIC_KEYS]
        cells += [fmt(row.seconds_per_epoch, 2), fmt(row.wall_time_s, 1), fmt(row.peak_memory_mb, 0),
                  _int(row.num_params)]
        text += _md_row(cells)
    for name, mean, std, n, missing in baseline_rows(res.runs):
        if missing:
            text += f"| {_md_cell(name)} | {_md_cell(missing)} | 0/{n} |" + " – |" * 10 + "\n"
            continue
        cells = [name, "baseline", f"{n}/{n}"] + [_pm(mean[k], std[k]) for k in METRIC_KEYS]
        text += _md_row(cells + ["–"] * 7)
    return text


def _md_quality(res: CompareResult) -> str:
    """The label-free quality section (none when no run reported quality)."""
    if not any(row.mean.get(k) is not None for row in res.rows for k in QUALITY_KEYS):
        return ""
    text = ("\n## Label-free quality\n\nOn the final features and predictions, no labels used "
            "(clusterkit.cluster.quality): silhouette (cosine, on a seeded sample) and Calinski-Harabasz higher is "
            "better, Davies-Bouldin lower is better; size entropy 1 = equal cluster sizes; min / max share: the "
            "smallest / largest cluster's share of the data; mean confidence depends on the prediction rule. "
            f"{STD_NOTE}.\n\n| recipe | " + " | ".join(h for _, h in QUALITY_COLUMNS) + " |\n|---|"
            + "---:|" * len(QUALITY_COLUMNS) + "\n")
    digits = {"calinski_harabasz": 1}
    for row in res.rows:
        text += _md_row([row.label] + [_pm(row.mean.get(k), row.std.get(k), digits.get(k, 3)) for k in QUALITY_KEYS])
    return text


def _md_per_seed(res: CompareResult) -> str:
    text = ("\n## Per seed\n\n| recipe | seed | status | NMI | ACC | ARI | epochs | s / epoch | wall time (s) | "
            "peak memory (MB) | run |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|\n")
    for run in res.runs:
        s = run.summary or {}
        m = s.get("metrics", {})
        status = run.status if run.status != "ok" else f"ok ({run.how})"
        text += _md_row([run.label, str(run.seed), status, fmt(m.get("nmi")), fmt(m.get("acc")), fmt(m.get("ari")),
                         str(s.get("epochs", "–")), fmt(s.get("seconds_per_epoch"), 2), fmt(s.get("wall_time_s"), 1),
                         fmt(s.get("peak_memory_mb"), 0), f"`{run.run_dir}`" if run.run_dir else "–"])
    return text


def _md_differences(res: CompareResult) -> str:
    text = "\n## What differs between the recipes\n\n"
    if not res.differences:
        return text + "Nothing apart from their names: the recipes are the same.\n"
    text += (f"Resolved recipes, plugin parameters completed by their defaults ({', '.join(IGNORED_KEYS)} not "
             "compared):\n\n| key | " + " | ".join(_md_cell(r.label) for r in res.rows) + " |\n|---|"
             + "---|" * len(res.rows) + "\n")
    for key, values in res.differences:
        text += f"| `{key}` | " + " | ".join(_md_cell(f"`{format_value(v)}`") for v in values) + " |\n"
    return text


def _md_failures(res: CompareResult) -> str:
    failures = [r for r in res.runs if r.status != "ok"]
    if not failures:
        return ""
    text = "\n## Failures\n\n"
    for run in failures:
        error_file = RunDir(run.run_dir).error_file if run.run_dir else None
        where = f" (details: `{error_file}`)" if error_file is not None and error_file.exists() else ""
        text += f"- **{_md_cell(run.label)}**, seed {run.seed}: {_md_cell(run.error)}{where}\n"
    return text


def write_markdown(res: CompareResult, seeds: Sequence[int], command: str, isolate: bool) -> str:
    """``results.md``: the summary table with the baselines, label-free quality, per seed, what
    differs between the recipes, and the failures."""
    head = ("# clusterkit compare\n\n"
            f"`{command}`  \n{datetime.now().strftime('%Y-%m-%d %H:%M')}; seeds {seeds_text(seeds)}; "
            f"runs in `{res.out}/<recipe>/seed<N>/`.\n\n" + "".join(f"{note}  \n" for note in _notes(isolate)))
    return head + _md_summary(res) + _md_quality(res) + _md_per_seed(res) + _md_differences(res) + _md_failures(res)


# -- results.csv -----------------------------------------------------------------------------------

def _csv_num(value) -> str:
    return "" if value is None else repr(float(value)) if isinstance(value, float) else str(value)


def _csv_header(seeds: Sequence[int]) -> list[str]:
    header = ["recipe", "recipe_file", "status", "seeds", "seeds_ok"]
    for k in METRIC_KEYS:
        header += [f"{k}_mean", f"{k}_std", f"{k}_best"]
    for k in QUALITY_KEYS:
        header += [f"{k}_mean", f"{k}_std"]
    for s in seeds:
        header += [f"{k}_seed{s}" for k in METRIC_KEYS]
    return header + ["seconds_per_epoch", "wall_time_s", "peak_memory_mb", "num_params", "error"]


def write_csv(res: CompareResult, seeds: Sequence[int]) -> str:
    """One row per recipe: full-precision means, sample stds (ddof 1), bests and per-seed values."""
    out = io.StringIO()
    header = _csv_header(seeds)
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


# -- results.tex -----------------------------------------------------------------------------------

def _tex(text) -> str:
    repl = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}
    repl["±"] = r"$\pm$"
    return "".join(repl.get(c, c) for c in str(text))


def _tex_summary(res: CompareResult, seeds: Sequence[int]) -> list[str]:
    """Mean ± sample std with best-of, time and memory, then the baseline rows."""
    lines = ["\\begin{table}[t]", "\\centering", "\\small",
             f"\\caption{{Clustering results, {_tex(STD_NOTE)} (seeds {seeds_text(seeds)}); best: the highest "
             "value over those seeds. Time: seconds per epoch (mean) and total wall time (all seeds); memory: "
             "the highest peak over the seeds.}",
             "\\label{tab:clusterkit-compare}",
             "\\begin{tabular}{llccccccrrrr}", "\\toprule",
             "Recipe & Status & NMI & ACC & ARI & best NMI & best ACC & best ARI & s/epoch & wall time (s) & "
             "memory (MB) & parameters \\\\", "\\midrule"]
    for row in res.rows:
        cells = [_tex(row.label), _tex(row.status)]
        cells += [_pm(row.mean.get(k), row.std.get(k), sep=" $\\pm$ ").replace("–", "--") for k in METRIC_KEYS]
        cells += [fmt(row.best.get(k)).replace("–", "--") for k in METRIC_KEYS]
        cells += [fmt(row.seconds_per_epoch, 2).replace("–", "--"), fmt(row.wall_time_s, 1).replace("–", "--"),
                  fmt(row.peak_memory_mb, 0).replace("–", "--"), _int(row.num_params).replace("–", "--")
                  .replace(",", "{,}")]
        lines.append(" & ".join(cells) + " \\\\")
    for name, mean, std, _n, missing in baseline_rows(res.runs):
        cells = [_tex(name), _tex("baseline" if not missing else "unavailable")]
        cells += [_pm(mean.get(k), std.get(k), sep=" $\\pm$ ").replace("–", "--") for k in METRIC_KEYS]
        lines.append(" & ".join(cells + ["--"] * 7) + " \\\\")
    return lines + ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]


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


def _tex_per_seed(res: CompareResult) -> list[str]:
    lines = ["\\begin{table}[t]", "\\centering", "\\small",
             "\\caption{Per-seed clustering results (final epoch).}", "\\label{tab:clusterkit-compare-seeds}",
             "\\begin{tabular}{lrlccc}", "\\toprule", "Recipe & Seed & Status & NMI & ACC & ARI \\\\", "\\midrule"]
    for run in res.runs:
        m = (run.summary or {}).get("metrics", {}) if run.status == "ok" else {}
        cells = [_tex(run.label), str(run.seed), _tex(run.status)] + \
                [fmt(m.get(k)).replace("–", "--") for k in METRIC_KEYS]
        lines.append(" & ".join(cells) + " \\\\")
    return lines + ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]


def write_tex(res: CompareResult, seeds: Sequence[int]) -> str:
    """Booktabs tables: mean ± sample std with best-of, time and memory; label-free quality; per seed."""
    lines = ["% clusterkit compare; needs \\usepackage{booktabs}",
             *_tex_summary(res, seeds), *_tex_quality(res), *_tex_per_seed(res)]
    return "\n".join(lines)
