"""Reading run directories: ``clusterkit show RUN_DIR``.

A run directory holds ``recipe.yaml`` (resolved), ``metrics.jsonl``, ``checkpoints/``
and, once finished, ``summary.json``.  :func:`show_run` prints

1. the summary: final NMI/ACC/ARI (and k-means on the pixels, UMAP + k-means on the pixels and
   k-means on UMAP of the final features, :mod:`clusterkit.baselines`), the protocol, time,
   memory, parameters and warnings (or, for an unfinished run, how far it got);
2. the recipe's differences from its base.  The base is clusterkit's defaults: the
   schema's default for every core key and each plugin's ``Params`` defaults, so the
   diff lists exactly the settings that make this recipe what it is (a recipe's
   ``extends`` chain is not kept in the run, the resolved recipe is).  ``--base FILE``
   diffs against another recipe file, ``--base RUN_DIR`` against another run;
3. the per-epoch table from ``metrics.jsonl``: loss terms, NMI/ACC/ARI, lr, seconds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TextIO

import attrs
import yaml

from .cluster.quality import QUALITY_KEYS
from .errors import RunDirError
from .recipe import ABSENT as _ABSENT
from .recipe import differing_keys
from .rundir import CONTENTS, METRICS_LOG, SUMMARY, TIMING_KEYS, RunDir

__all__ = ["show_run", "epoch_records", "step_records", "resolved_dict", "recipe_diff", "differing_keys",
           "format_value", "NOT_A_LOSS"]

#: Keys of an epoch record in metrics.jsonl that are not loss terms.
NOT_A_LOSS = frozenset({"epoch", "step", "lr", "stage", "nmi", "acc", "ari", "collapse_share", "feature_std",
                        *TIMING_KEYS, *QUALITY_KEYS})
#: Quality columns of the per-epoch table (short headers).
TABLE_QUALITY = (("silhouette", "silh"), ("davies_bouldin", "DB"), ("size_entropy", "size_H"),
                 ("min_share", "min_sh"), ("mean_confidence", "conf"))


# -- metrics.jsonl ---------------------------------------------------------------------------------

def epoch_records(run_dir: str | Path) -> list[dict]:
    """The end-of-epoch records of ``metrics.jsonl`` (loss means, NMI/ACC/ARI when evaluated,
    lr, seconds), one per epoch (:meth:`clusterkit.rundir.RunDir.epoch_records`)."""
    return RunDir(run_dir).epoch_records()


def step_records(run_dir: str | Path) -> list[dict]:
    """The every-``run.log_every``-steps records of ``metrics.jsonl``."""
    return RunDir(run_dir).step_records()


def loss_terms(records: list[dict]) -> list[str]:
    """Names of the numeric series in epoch records that are loss terms or logged scalars
    (``loss``, the total, first)."""
    names: list[str] = []
    for record in records:
        for key, value in record.items():
            if key not in NOT_A_LOSS and key not in names and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                names.append(key)
    return sorted(names, key=lambda n: (n != "loss", names.index(n)))


# -- recipes ---------------------------------------------------------------------------------------

def resolved_dict(recipe) -> dict:
    """``recipe.to_dict()`` with every plugin's parameters completed by its ``Params`` defaults
    (a plugin that cannot be loaded, or whose parameters do not validate, keeps what the
    recipe says)."""
    from .plugin_manager import discover
    from .schema import build, unstructure

    data = recipe.to_dict()
    try:
        found = discover()
    except Exception:  # noqa: BLE001 - a broken environment: compare raw values
        found = {}
    plugins = {}
    for name, raw in data.get("plugins", {}).items():
        try:
            params_cls = getattr(found[name].load(), "Params", None)
        except Exception:  # noqa: BLE001 - unknown or broken plugin: what the recipe says
            plugins[name] = raw
            continue
        try:
            plugins[name] = unstructure(build(params_cls, raw or {}, f"plugins.{name}")) if params_cls else {}
        except Exception:  # noqa: BLE001 - invalid values: the recipe's over the defaults, unchecked
            defaults = unstructure(params_cls()) if attrs.has(params_cls) else {}
            plugins[name] = {**defaults, **(raw or {})}
    data["plugins"] = plugins
    return data


def _default_dict(names: list[str]) -> dict:
    """clusterkit's defaults, with the plugins ``names`` at their Params defaults."""
    from .recipe import load_recipe

    base = load_recipe(data={"plugins": {name: {} for name in names}})
    return resolved_dict(base)


def format_value(value) -> str:
    if value is _ABSENT:
        return value
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip()
    return repr(value)


def recipe_diff(run_dir: Path, base: str | None = None) -> tuple[str, list[str]]:
    """(what the base is, ["key: base -> run" lines]) for the run's resolved recipe."""
    from .recipe import load_recipe

    run = load_recipe(data=RunDir(run_dir).read_recipe())
    mine = resolved_dict(run)
    if base is None:
        label = "clusterkit's defaults (core schema and each plugin's Params)"
        theirs = _default_dict(list(run.plugins))
    else:
        path = Path(base)
        if path.is_dir():
            other = load_recipe(data=RunDir(path).read_recipe())
            label = f"run '{path}'"
        else:
            other = load_recipe(path)
            label = f"recipe '{path}'"
        theirs = resolved_dict(other)
    lines = [f"{key}: {format_value(a)} -> {format_value(b)}" for key, (a, b) in differing_keys([theirs, mine])]
    return label, lines


# -- printing --------------------------------------------------------------------------------------

def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 10 ** -digits or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def _summary_lines(run_dir: Path, summary: dict | None, records: list[dict], recipe: dict) -> list[str]:
    name = recipe.get("name", "?")
    if summary is None:
        done = records[-1]["epoch"] if records else 0
        total = recipe.get("schedule", {}).get("epochs", "?")
        lines = [f"{name}  ({run_dir})  UNFINISHED: {done} of {total} epochs logged, no {SUMMARY} yet. "
                 f"Continue it with: clusterkit run RECIPE --resume {run_dir}"]
        last = next((r for r in reversed(records) if r.get("nmi") is not None), None)
        if last:
            lines.append(f"last evaluation (epoch {last['epoch']}): NMI {_num(last['nmi'])}  ACC {_num(last['acc'])}  "
                         f"ARI {_num(last['ari'])}")
        return lines
    m, p = summary["metrics"], summary["protocol"]
    lines = [f"{summary['name']}  ({run_dir})  finished, seed {summary['seed']}, recipe hash {summary['recipe_hash']}"]
    if p.get("labels") == "unlabeled":
        lines.append(f"metrics (final epoch {summary['epochs']}):  unlabeled data: no NMI/ACC/ARI, label-free quality "
                     "only")
    else:
        lines.append(f"metrics (final epoch {summary['epochs']}):  NMI {_num(m.get('nmi'))}  ACC {_num(m.get('acc'))}  "
                     f"ARI {_num(m.get('ari'))}")
    q = summary.get("quality") or {}
    if q:
        lines.append(f"label-free quality: silhouette {_num(q.get('silhouette'))} (cosine; higher is better)  "
                     f"Davies-Bouldin {_num(q.get('davies_bouldin'))} (lower)  Calinski-Harabasz "
                     f"{_num(q.get('calinski_harabasz'), 1)}  size entropy {_num(q.get('size_entropy'))}  "
                     f"cluster shares {_num(q.get('min_share'))}-{_num(q.get('max_share'))}  mean confidence "
                     f"{_num(q.get('mean_confidence'))}")
    if summary.get("pixel_kmeans"):
        b = summary["pixel_kmeans"]
        lines.append(f"k-means on the raw pixels:       NMI {_num(b['nmi'])}  ACC {_num(b['acc'])}  "
                     f"ARI {_num(b['ari'])}")
    lines += umap_lines(summary)
    used = "yes" if p.get("test_data_used_for_training") else "no"
    labels = f"; labels: {p['labels']}" if p.get("labels") else ""
    lines.append(f"protocol: {p['dataset']}, trained on '{p['train_split']}', evaluated on '{p['eval_split']}' "
                 f"(test data used for training: {used}); prediction: {p['prediction']}; "
                 f"model selection: {p['model_selection']}{labels}")
    spe = summary.get("seconds_per_epoch")
    lines.append(f"time: {summary['wall_time_s']:.1f} s ({_num(spe, 2)} s/epoch, {summary['epochs']} epochs, "
                 f"{summary['steps']} steps, {summary['num_train']} training images) on {summary['device']}; "
                 f"peak memory {summary['peak_memory_mb']:.0f} MB; {summary['num_params']:,} parameters")
    warnings = summary.get("collapse_warnings") or []
    if warnings:
        kinds = sorted({w["kind"] for w in warnings})
        lines.append(f"warnings: {len(warnings)} collapse warnings ({', '.join(kinds)}), last at epoch "
                     f"{warnings[-1]['epoch']}")
    if summary.get("skipped_steps"):
        lines.append(f"skipped optimiser steps (non-finite loss): {summary['skipped_steps']}")
    if summary.get("skipped_images"):
        lines.append(f"skipped unreadable images: {len(summary['skipped_images'])}")
    return lines


def umap_lines(summary: dict) -> list[str]:
    """The UMAP rows of a summary (:mod:`clusterkit.baselines`): scores, or how to install umap-learn."""
    from .baselines import BASELINE_ROWS

    lines = []
    for key in ("umap_kmeans", "umap_view"):
        b = summary.get(key)
        if not b:
            continue
        name = BASELINE_ROWS[key]
        if b.get("unavailable"):
            lines.append(f"{name}: {b['unavailable']}")
            continue
        q = b.get("quality") or {}
        scores = (f"NMI {_num(b.get('nmi'))}  ACC {_num(b.get('acc'))}  ARI {_num(b.get('ari'))}  "
                  if b.get("nmi") is not None else "")
        lines.append(f"{name}: {scores}({_num(b.get('seconds'), 1)} s); on its UMAP embedding: silhouette "
                     f"{_num(q.get('silhouette'))}  Davies-Bouldin {_num(q.get('davies_bouldin'))}  size entropy "
                     f"{_num(q.get('size_entropy'))}  cluster shares {_num(q.get('min_share'))}-"
                     f"{_num(q.get('max_share'))}")
    return lines


def metrics_table(records: list[dict]) -> list[str]:
    """The per-epoch table: epoch, [stage], loss terms, NMI, ACC, ARI (when the data has labels),
    label-free quality (silhouette, Davies-Bouldin, size entropy, smallest share, mean confidence),
    lr, seconds."""
    if not records:
        return [f"({METRICS_LOG} holds no epoch records yet)"]
    cols = ["epoch"] + (["stage"] if any("stage" in r for r in records) else [])
    cols += loss_terms(records)
    cols += [c for c in ("nmi", "acc", "ari") if any(r.get(c) is not None for r in records)]
    quality = [(key, short) for key, short in TABLE_QUALITY if any(r.get(key) is not None for r in records)]
    cols += [key for key, _ in quality] + ["lr", "seconds"]
    cells = [[_num(r.get(c)) if c not in ("epoch", "stage") else str(r.get(c, "-")) for c in cols]
             for r in records]
    cols = [dict(quality).get(c, c) for c in cols]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return lines


def show_run(run_dir: str | Path, base: str | None = None, out: TextIO | None = None) -> None:
    """Print a run's summary, its recipe diff against ``base`` and its metrics table."""
    import sys

    out = out or sys.stdout
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"'{run_dir}' is a file, not a run directory; nothing was read from it. Pass the folder "
                          f"a run wrote (it holds {CONTENTS}), e.g. runs/quickstart/<time>.")
    if not run_dir.is_dir():
        raise RunDirError(f"Run directory '{run_dir}' does not exist. Pass the folder a run wrote (it holds "
                          f"{CONTENTS}).")
    recipe = RunDir(run_dir).read_recipe()
    summary = RunDir(run_dir).read_summary()
    records = epoch_records(run_dir)
    label, diff = recipe_diff(run_dir, base)
    lines = _summary_lines(run_dir, summary, records, recipe)
    lines += ["", f"recipe vs. {label}:"] + ([f"  {d}" for d in diff] or ["  (no differences)"])
    lines += ["", f"per epoch ({METRICS_LOG}; loss terms are epoch means, metrics where evaluated; silh: silhouette, "
              "DB: Davies-Bouldin, size_H: size entropy, min_sh: smallest cluster's share, conf: mean confidence):"]
    lines += metrics_table(records)
    print("\n".join(lines), file=out)
