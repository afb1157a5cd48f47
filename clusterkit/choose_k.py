"""Choosing the number of clusters: ``clusterkit choose-k RUN_DIR --k 2:30``.

The run's model embeds its evaluation data once; the features are then clustered with
spherical k-means (cosine, as the methods' E-step) for every K of the range, and each
clustering is scored with the label-free measures of :mod:`clusterkit.cluster.quality`.
The recommended K is the best K by one criterion (``--criterion``; default the cosine
silhouette, the measure that needs no assumption about cluster sizes or shapes beyond
"tight and apart"); what the other criteria pick is printed next to it, so a user sees whether
they agree.  When the data has labels, NMI per K is shown for reference; it never takes part
in the choice.

Writes ``OUT/choose_k.csv`` (one row per K), ``OUT/choose_k.json`` (the rows and the
recommendation) and ``OUT/choose_k.png`` (each criterion versus K, the chosen K marked);
``OUT`` defaults to ``RUN_DIR/choose_k`` and is never overwritten without ``--force``.

Example::

    >>> from clusterkit.choose_k import score_ks, recommend
    >>> rows = score_ks(features, range(2, 16))                   # doctest: +SKIP
    >>> recommend(rows, "silhouette").k                             # doctest: +SKIP
    10
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import attrs
import numpy as np
import torch
from tqdm.auto import tqdm

from .cluster import cluster_metrics, kmeans
from .cluster.quality import HIGHER_IS_BETTER, QUALITY_KEYS, QUALITY_NAMES, SILHOUETTE_SAMPLE, quality_metrics
from .errors import ClusterkitError, RecipeError, RunDirError
from .outputs import check_output_folder

__all__ = ["CRITERIA", "Recommendation", "parse_ks", "score_ks", "recommend", "choose_k", "format_table"]

#: Criteria that can choose K (each a key of the quality measures).
CRITERIA = ("silhouette", "calinski_harabasz", "davies_bouldin")
OUTPUTS = ("choose_k.csv", "choose_k.json", "choose_k.png")
#: The most Ks one choose-k scores (each is a k-means run with n_init restarts).
MAX_KS = 1000


@attrs.define
class Recommendation:
    """The chosen K: ``k`` by ``criterion``, its ``value``, and every criterion's own pick."""

    k: int
    criterion: str
    value: float
    picks: dict[str, int | None]

    def text(self) -> str:
        better = "highest" if HIGHER_IS_BETTER[self.criterion] else "lowest"
        name = QUALITY_NAMES[self.criterion]
        agree = [QUALITY_NAMES[c] for c, k in self.picks.items() if c != self.criterion and k == self.k]
        others = [f"{QUALITY_NAMES[c]} {k}" for c, k in self.picks.items() if c != self.criterion and k != self.k]
        parts = [f"recommended K = {self.k}: the {better} {name} ({self.value:.3f}) of the range"]
        if agree:
            parts.append(f"{' and '.join(agree)} agree{'s' if len(agree) == 1 else ''}")
        if others:
            parts.append(f"the other criteria pick: {', '.join(others)}")
        return "; ".join(parts) + "."


def parse_ks(text: str) -> list[int]:
    """``"2:30"`` (inclusive), ``"2:30:2"`` (step), ``"5,10,20"`` or ``"10"`` -> sorted distinct Ks >= 2."""
    text = str(text).strip()
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] < 1):
                raise ValueError
            span = range(parts[0], parts[1] + 1, parts[2] if len(parts) == 3 else 1)
            if len(span) > MAX_KS:  # counted before the list is built (2:100000000000 would not fit in memory)
                raise RecipeError(f"--k '{text}' gives {len(span)} cluster counts, but choose-k scores at most "
                                  f"{MAX_KS} (each K is a k-means run on every image); nothing was computed. Give a "
                                  "shorter range or a step, e.g. --k 2:30 or --k 10:1000:10.")
            ks = list(span)
        else:
            ks = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise RecipeError(f"--k '{text}' is not a range of cluster counts. Write FIRST:LAST (inclusive, e.g. 2:30), "
                          "FIRST:LAST:STEP (e.g. 5:50:5) or a list (e.g. 5,10,20).") from None
    if len(set(ks)) > MAX_KS:
        raise RecipeError(f"--k '{text[:40]}...' lists {len(set(ks))} cluster counts, but choose-k scores at most "
                          f"{MAX_KS}; nothing was computed. Give fewer, e.g. --k 2:30.")
    ks = sorted(set(ks))
    if len(ks) < 2 or ks[0] < 2:
        raise RecipeError(f"--k '{text}' must give at least two cluster counts, each at least 2 (one cluster has "
                          "no quality to compare), e.g. --k 2:30.")
    return ks


def score_ks(features: torch.Tensor, ks: Sequence[int], *, seed: int = 0, n_init: int = 3,
             sample: int = SILHOUETTE_SAMPLE, targets=None, progress: bool = True) -> list[dict]:
    """Spherical k-means of ``features`` (N, D) for every K of ``ks``, each scored.

    Returns one dict per K: ``k``, every key of :data:`~clusterkit.cluster.quality.QUALITY_KEYS`
    (``mean_confidence``: mean cosine to the assigned centre) and, with ``targets`` (N,)
    (labels, for reference only), ``nmi``/``acc``/``ari``.
    """
    x = features.float()
    unit = torch.nn.functional.normalize(x, dim=1)
    rows = []
    for k in tqdm(list(ks), desc="k-means per K", unit="K", leave=False, disable=not progress):
        res = kmeans(x, int(k), metric="cosine", n_init=n_init, seed=seed)
        conf = (unit * res.centers[res.labels]).sum(1)
        row = {"k": int(k), **quality_metrics(unit, res.labels, int(k), conf, sample=sample, seed=seed)}
        if targets is not None:
            row.update(cluster_metrics(targets, res.labels.cpu()))
        rows.append(row)
    return rows


def recommend(rows: list[dict], criterion: str = "silhouette") -> Recommendation:
    """The best K of ``rows`` by ``criterion`` (highest, or lowest for Davies-Bouldin; the
    smallest K on a tie), with every criterion's pick."""
    if criterion not in CRITERIA:
        raise RecipeError(f"Unknown criterion '{criterion}'; choose one of {', '.join(CRITERIA)}.")

    def pick(c: str) -> dict | None:
        scored = [r for r in rows if r.get(c) is not None]
        if not scored:
            return None
        sign = 1 if HIGHER_IS_BETTER[c] else -1
        return max(scored, key=lambda r: (sign * r[c], -r["k"]))

    best = pick(criterion)
    if best is None:
        raise ClusterkitError(f"No K of the range has a {QUALITY_NAMES[criterion]} score (every clustering put "
                              "all the data in one cluster: the features have collapsed). Train the run longer "
                              "or check its collapse warnings (clusterkit show RUN_DIR).")
    picks = {c: (p["k"] if (p := pick(c)) is not None else None) for c in CRITERIA}
    return Recommendation(best["k"], criterion, best[criterion], picks)


_COLUMNS = [("k", "K", "{}"), ("silhouette", "silhouette", "{:.3f}"), ("calinski_harabasz", "Calinski-H", "{:.1f}"),
            ("davies_bouldin", "Davies-B", "{:.3f}"), ("size_entropy", "size H", "{:.3f}"),
            ("min_share", "min share", "{:.3f}"), ("max_share", "max share", "{:.3f}"),
            ("mean_confidence", "mean cos", "{:.3f}")]


def format_table(rows: list[dict], rec: Recommendation | None = None) -> str:
    """A plain-text table, one line per K (the recommended K marked ``<-``); NMI when present
    ("for reference: labels, not used to choose")."""
    cols = list(_COLUMNS) + ([("nmi", "NMI*", "{:.3f}")] if any("nmi" in r for r in rows) else [])
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        cells.append([("-" if r.get(key) is None else fmt.format(r[key])) for key, _, fmt in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = []
    for i, row in enumerate(cells):
        line = "  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True))
        if rec is not None and i > 0 and rows[i - 1]["k"] == rec.k:
            line += "  <- " + QUALITY_NAMES[rec.criterion]
        lines.append(line)
    if len(cols) > len(_COLUMNS):
        lines.append("* NMI against the dataset's labels, for reference only: it takes no part in the choice.")
    return "\n".join(lines)


def _csv(rows: list[dict]) -> str:
    keys = ["k", *QUALITY_KEYS] + [k for k in ("nmi", "acc", "ari") if any(k in r for r in rows)]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(keys)
    for r in rows:
        writer.writerow(["" if r.get(k) is None else r[k] for k in keys])
    return out.getvalue()


def plot_choose_k(rows: list[dict], rec: Recommendation, path: str | Path, title: str = "") -> Path:
    """Silhouette, Calinski-Harabasz, Davies-Bouldin and size entropy versus K, the chosen K marked."""
    from matplotlib.ticker import MaxNLocator

    from .plots import _figure, _save

    panels = [*CRITERIA, "size_entropy"] + (["nmi"] if any("nmi" in r for r in rows) else [])
    fig = _figure(3.4 * len(panels), 3.4)
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharex=True))
    ks = [r["k"] for r in rows]
    for ax, key in zip(axes, panels, strict=True):
        values = [np.nan if r.get(key) is None else r[key] for r in rows]
        ax.plot(ks, values, marker="o", ms=3, color="tab:blue" if key != "nmi" else "0.5")
        ax.axvline(rec.k, color="tab:red", ls="--", lw=1)
        chosen = values[ks.index(rec.k)]
        if key == rec.criterion:
            ax.plot([rec.k], [chosen], marker="*", ms=14, color="tab:red", label=f"chosen K = {rec.k}")
            ax.legend(fontsize=8, loc="best")
        if key == "nmi":
            name = "NMI (labels; reference only)"
        else:
            better = HIGHER_IS_BETTER[key]
            name = QUALITY_NAMES[key] + (" (1 = equal sizes)" if key == "size_entropy" else
                                         " (higher is better)" if better else " (lower is better)")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("K")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: label-free quality of spherical k-means on the final features; "
                 f"K = {rec.k} by {QUALITY_NAMES[rec.criterion]}", fontsize=10)
    return _save(fig, path)


def _check_out(out: Path, force: bool) -> None:
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not force:
        raise RunDirError(f"'{out}' already holds {', '.join(existing)} from an earlier choose-k; nothing was "
                          "overwritten. Pass --out ANOTHER_FOLDER, or --force to replace them.")


def choose_k(run_dir: str | os.PathLike, ks: Sequence[int], *, out: str | os.PathLike | None = None,
             criterion: str = "silhouette", n_init: int = 3, force: bool = False, device: str | None = None,
             plot: bool = True) -> dict:
    """Score every K of ``ks`` on the final features of ``run_dir`` (see the module doc).

    Returns ``{"rows": [...], "recommendation": {...}, "files": [...], "table": str}``.
    Raises RunDirError for a folder that is not a run or holds no checkpoint (no model, so no
    features), or whose outputs exist (without ``force``); RecipeError for a range with a K
    of at least the number of images.
    """
    from .inference import load
    from .rundir import CHECKPOINTS, RunDir

    run_dir = Path(run_dir)
    if criterion not in CRITERIA:
        raise RecipeError(f"Unknown criterion '{criterion}'; choose one of {', '.join(CRITERIA)}.")
    if run_dir.is_dir() and RunDir(run_dir).latest_checkpoint() is None:
        raise RunDirError(f"choose-k clusters the features of a trained model, but '{run_dir}' holds no checkpoint "
                          f"({CHECKPOINTS}/epoch_*.pt), so there are no features to cluster. Train the run for at "
                          "least one epoch (clusterkit run RECIPE --out DIR), or pass another run directory.")
    if isinstance(n_init, bool) or not isinstance(n_init, int) or n_init < 1:
        raise RecipeError(f"--n-init must be at least 1 (the k-means restarts per K; the best is kept), got "
                          f"{n_init!r}; nothing was computed. The default is 3.")
    out = Path(out) if out is not None else run_dir / "choose_k"
    _check_out(out, force)
    if run_dir.is_dir():  # a missing run is load()'s error; the folder is checked before anything is computed
        check_output_folder(out, "--out")
    model = load(run_dir, device)
    ds = model.eval_dataset()
    if max(ks) >= len(ds):
        raise RecipeError(f"--k goes up to {max(ks)} clusters, but the run's evaluation data has {len(ds)} images; "
                          f"every K must be below the number of images. Use a range ending at most at {len(ds) - 1}, "
                          f"e.g. --k 2:{min(30, len(ds) - 1)}.")
    feats = model.embed_dataset(ds)
    rows = score_ks(feats, ks, seed=model.recipe.run.seed, n_init=n_init,
                    targets=ds.targets if ds.has_labels else None)
    rec = recommend(rows, criterion)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(rows, rec)
    files = [out / "choose_k.csv", out / "choose_k.json"]
    files[0].write_text(_csv(rows))
    files[1].write_text(json.dumps({
        "run_dir": str(run_dir), "epoch": model.epoch, "num_images": len(ds), "ks": list(ks), "n_init": n_init,
        "labels": "labelled (NMI for reference only)" if ds.has_labels else "unlabeled",
        "recommendation": attrs.asdict(rec) | {"text": rec.text()}, "rows": rows}, indent=2))
    if plot:
        try:
            files.append(plot_choose_k(rows, rec, out / "choose_k.png",
                                       title=f"{model.recipe.name} (epoch {model.epoch})"))
        except ClusterkitError as exc:  # matplotlib missing: the table stands on its own
            print(f"clusterkit: warning: no choose_k.png: {exc}", file=sys.stderr)
    return {"rows": rows, "recommendation": rec, "files": files, "table": table, "num_images": len(ds),
            "model": model}
