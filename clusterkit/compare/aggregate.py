"""Statistics over the seeds of a comparison: each recipe's mean, sample standard deviation,
best, time and memory, and the baseline rows (k-means on pixels, UMAP + k-means) the tables
show under the recipes."""

from __future__ import annotations

import json
import math

from .results import METRIC_KEYS, QUALITY_KEYS, RecipeRow, RunResult

__all__ = ["aggregate", "baseline_stats", "baseline_rows", "mean", "sample_std"]


def mean(values: list[float]) -> float | None:
    """The mean; None for no values."""
    return sum(values) / len(values) if values else None


def sample_std(values: list[float]) -> float | None:
    """Sample standard deviation (ddof = 1); None for fewer than two values."""
    if len(values) < 2:
        return None
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _status(runs: list[RunResult], done: list[RunResult], failed: list[RunResult]) -> str:
    """"ok", "failed", or "k of n seeds failed"."""
    if not runs:
        return "failed"
    if not failed:
        return "ok"
    if not done:
        return "failed"
    return f"{len(failed)} of {len(runs)} seeds failed"


def aggregate(label: str, path: str, runs: list[RunResult]) -> RecipeRow:
    """Mean, sample std, best, time and memory over the finished seeds of one recipe."""
    done = [r for r in runs if r.status == "ok" and r.summary]
    failed = [r for r in runs if r.status != "ok"]
    row = RecipeRow(label, path, _status(runs, done, failed), runs, error=failed[0].error if failed else None)
    summaries = [r.summary for r in done if r.summary]
    for key in METRIC_KEYS:
        values = [float(s["metrics"][key]) for s in summaries if s["metrics"].get(key) is not None]
        row.mean[key] = mean(values)
        row.std[key] = sample_std(values)
        row.best[key] = max(values) if values else None
    for key in QUALITY_KEYS:
        values = [float(q[key]) for s in summaries if (q := s.get("quality") or {}).get(key) is not None]
        row.mean[key] = mean(values)
        row.std[key] = sample_std(values)
    spe = [s["seconds_per_epoch"] for s in summaries if s.get("seconds_per_epoch") is not None]
    row.seconds_per_epoch = mean(spe)
    row.wall_time_s = sum(s["wall_time_s"] for s in summaries) if summaries else None
    row.peak_memory_mb = max(s["peak_memory_mb"] for s in summaries) if summaries else None
    row.num_params = summaries[0].get("num_params") if summaries else None
    return row


def baseline_stats(runs: list[RunResult], key: str = "pixel_kmeans") -> tuple[dict, dict, int] | None:
    """(mean, sample std, seeds) of the baseline ``key`` of :data:`clusterkit.baselines.BASELINE_ROWS`
    in the runs' summaries (``pixel_kmeans``: k-means on the raw pixels), one per seed, when the
    finished runs share one dataset and evaluation split; None otherwise or when no summary holds
    it (or only its ``unavailable`` note)."""
    done = [r for r in runs if r.status == "ok" and r.summary]
    protocols = {json.dumps([(r.summary.get("protocol") or {}).get(k) for k in ("dataset", "eval_split")])
                 for r in done if r.summary}
    if len(protocols) != 1:
        return None
    per_seed: dict[int, dict] = {}
    for r in done:
        if r.summary and r.summary.get(key) and not r.summary[key].get("unavailable"):
            per_seed.setdefault(r.seed, r.summary[key])
    if not per_seed:
        return None
    values = {k: [m[k] for m in per_seed.values() if m.get(k) is not None] for k in METRIC_KEYS}
    return ({k: mean(v) for k, v in values.items()}, {k: sample_std(v) for k, v in values.items()}, len(per_seed))


def baseline_rows(runs: list[RunResult]) -> list[tuple[str, dict, dict, int, str | None]]:
    """The baseline rows every table shows under the recipes: ``(name, mean, sample std, seeds,
    note)`` for each baseline of :data:`clusterkit.baselines.BASELINE_ROWS` the runs' summaries
    hold with labels (``nmi``); ``note``: why it is missing (umap-learn not installed), else None."""
    from ..baselines import BASELINE_ROWS

    out: list[tuple[str, dict, dict, int, str | None]] = []
    for key, name in BASELINE_ROWS.items():
        row = baseline_stats(runs, key)
        if row is not None and any(v is not None for v in row[0].values()):
            out.append((name, *row, None))
            continue
        notes = {(r.summary or {}).get(key, {}).get("unavailable") for r in runs if r.status == "ok" and r.summary
                 and (r.summary or {}).get(key)}
        notes.discard(None)
        if notes:
            out.append((name, {}, {}, len({r.seed for r in runs if r.status == "ok"}), sorted(notes)[0]))
    return out
