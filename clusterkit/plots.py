"""Pictures of runs (matplotlib, PNG, no display needed).

Per run (``clusterkit plot RUN_DIR`` -> ``RUN_DIR/plots/``):

* ``convergence.png``: NMI, ACC and ARI versus epoch;
* ``losses.png``: every loss term (and logged scalar) versus epoch, one panel each;
* ``tsne.png``: a t-SNE of the final features (scikit-learn's TSNE, 500 iterations, on at
  most 2,000 L2-normalised feature vectors, a random subsample when there are more), coloured by
  predicted cluster (left; each cluster in the colour of the class it is matched to) and
  by true class (right), as the DigPro paper's Fig. 4;
* ``montage.png``: the 10 most confident images of each cluster, rows ordered by the
  matched class, images the classes disagree with framed in red, as its Fig. 2;
* ``confusion.png``: true class against Hungarian-matched predicted class.

An unlabeled run (``data.labels: none``, or a folder without class folders) has no classes:
``convergence.png`` then shows the label-free quality measures (silhouette, Davies-Bouldin,
size entropy) versus epoch, the t-SNE and the montage are drawn by cluster alone (no red
frames; each row is titled with its cluster's size and share), and there is no confusion matrix.

Per comparison (``clusterkit compare`` -> ``OUT/convergence.png``): the convergence
curves of every recipe, the mean over seeds with a min-max band.

The figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas,
never through pyplot, so the caller's matplotlib backend is left alone.  matplotlib is
an optional dependency (``pip install 'clusterkit[plot]'``); without it every function
here raises :class:`MissingDependency` saying so.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .errors import ClusterkitError
from .rundir import CONTENTS, METRICS_LOG, RunDir

__all__ = ["MissingDependency", "require_matplotlib", "plot_convergence", "plot_losses", "plot_tsne",
           "plot_montage", "plot_confusion", "plot_run", "METRICS", "QUALITY_CURVES"]

METRICS = (("nmi", "NMI"), ("acc", "ACC"), ("ari", "ARI"))
#: What the convergence plot shows for an unlabeled run.
QUALITY_CURVES = (("silhouette", "silhouette (cosine, higher is better)"),
                  ("davies_bouldin", "Davies-Bouldin (lower is better)"),
                  ("size_entropy", "size entropy (1 = equal sizes)"))
DPI = 120
#: t-SNE optimisation steps (scikit-learn's default is 1000; 500 settle for a few thousand points in half the time).
TSNE_ITERATIONS = 500


class MissingDependency(ClusterkitError):
    """An optional dependency (matplotlib) is not installed."""


def require_matplotlib():
    """Import matplotlib's object-oriented API; MissingDependency with the install command if absent."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependency(
            "Plotting needs matplotlib, which is not installed in this environment. Install it with "
            "pip install 'clusterkit[plot]' (or pip install matplotlib) and run the command again.") from None
    return Figure


def _figure(width: float, height: float):
    Figure = require_matplotlib()
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, facecolor="white")
    return path


def _colors(n: int) -> list:
    """n distinguishable colours (tab10, tab20, then an evenly spaced hue wheel)."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["hsv"](i / n) for i in range(n)]


# -- curves ----------------------------------------------------------------------------------------

def _series(records: list[dict], key: str) -> dict[int, float]:
    return {int(r["epoch"]): float(r[key]) for r in records if r.get(key) is not None}


_BASELINE_STYLES = [("0.4", "--"), ("0.2", "-."), ("0.55", ":")]


def baselines_of(summary: dict | None) -> dict[str, dict]:
    """``{row name: {"nmi", "acc", "ari", ...}}`` of the baseline rows a run's summary holds
    (:data:`clusterkit.baselines.BASELINE_ROWS`; rows without scores left out)."""
    from .baselines import BASELINE_ROWS

    summary = summary or {}
    return {name: summary[key] for key, name in BASELINE_ROWS.items()
            if summary.get(key) and summary[key].get("nmi") is not None}


def plot_convergence(groups: dict[str, list[list[dict]]], path: str | Path, title: str | None = None,
                     baseline: dict | None = None, metrics: Sequence[tuple[str, str]] = METRICS) -> Path:
    """NMI, ACC and ARI (or ``metrics``: ``(key, title)`` pairs, e.g. :data:`QUALITY_CURVES`)
    versus epoch, one line per group (a recipe or a run).

    ``groups``: label -> one list of epoch records (``metrics.jsonl``) per seed.  The line
    is the mean over seeds at the epochs every seed evaluated, the band their min-max.
    ``baseline``: optional ``{"nmi": .., "acc": .., "ari": ..}`` drawn dashed (k-means on pixels),
    or ``{row name: such a dict}`` (:func:`baselines_of`: every baseline row of a summary), each
    drawn as a grey horizontal line of its own style.
    """
    fig = _figure(12, 3.8)
    from matplotlib.ticker import MaxNLocator

    axes = np.atleast_1d(fig.subplots(1, len(metrics), sharex=True))
    colors = _colors(max(len(groups), 1))
    multi = any(len(runs) > 1 for runs in groups.values())
    for ax, (key, name) in zip(axes, metrics, strict=False):
        for color, (label, runs) in zip(colors, groups.items(), strict=False):
            per_seed = [_series(records, key) for records in runs]
            per_seed = [s for s in per_seed if s]
            if not per_seed:
                continue
            epochs = sorted(set.intersection(*(set(s) for s in per_seed)))
            if not epochs:
                continue
            values = np.array([[s[e] for e in epochs] for s in per_seed])
            ax.plot(epochs, values.mean(0), marker="o", ms=3, color=color,
                    label=f"{label} ({len(per_seed)} seed{'s' if len(per_seed) > 1 else ''})")
            if len(per_seed) > 1:
                ax.fill_between(epochs, values.min(0), values.max(0), color=color, alpha=0.2, lw=0)
        lines = {"k-means on pixels": baseline} if baseline and "nmi" in baseline else (baseline or {})
        for (label, b), style in zip(lines.items(), _BASELINE_STYLES * 3, strict=False):
            if b and b.get(key) is not None:
                ax.axhline(b[key], color=style[0], ls=style[1], lw=1, label=label)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score on the evaluation data")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(handles, labels, fontsize=8, loc="lower right")
    band = "mean over seeds, band: min-max over seeds" if multi else "one seed per line"
    names = " / ".join(name.split(" (")[0] for _, name in metrics)
    fig.suptitle(f"{title or 'Convergence'}: {names} vs. epoch ({band})", fontsize=11)
    return _save(fig, path)


def plot_losses(records: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Every loss term (epoch means) and logged scalar of one run versus epoch, one panel each."""
    from .show import loss_terms

    terms = loss_terms(records)
    if not terms:
        raise ClusterkitError(f"The run's {METRICS_LOG} holds no loss values yet (no finished epoch); train at "
                              "least one epoch before plotting its losses.")
    cols = min(3, len(terms))
    rows = math.ceil(len(terms) / cols)
    fig = _figure(4.2 * cols, 2.8 * rows)
    from matplotlib.ticker import MaxNLocator

    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, squeeze=False)).ravel()
    for ax, term, color in zip(axes, terms, _colors(len(terms)), strict=False):
        points = sorted(_series(records, term).items())
        ax.plot([e for e, _ in points], [v for _, v in points], marker="o", ms=2.5, color=color)
        ax.set_title("loss (total)" if term == "loss" else term, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        ax.grid(alpha=0.3)
    for ax in axes[len(terms):]:
        ax.set_visible(False)
    for col in range(cols):  # the lowest visible panel of each column carries the epoch axis
        ax = axes[max(i for i in range(col, len(terms), cols))]
        ax.tick_params(labelbottom=True)
        ax.set_xlabel("epoch")
    fig.suptitle(f"{title or 'Run'}: loss terms per epoch (epoch means, each plugin's weighted term)",
                 fontsize=11)
    return _save(fig, path)


# -- pictures of the clustering --------------------------------------------------------------------

def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def _match(targets, labels) -> dict[int, int]:
    from .cluster.metrics import hungarian_match

    return hungarian_match(targets, labels)


def plot_tsne(features, labels, path: str | Path, targets=None, class_names: Sequence[str] | None = None,
              max_points: int = 2000, seed: int = 0, title: str | None = None) -> Path:
    """t-SNE of ``features`` (N, D), coloured by predicted cluster (and by class, with ``targets``).

    At most ``max_points`` points (a seeded random subsample) are embedded; the features
    are L2-normalised first (the methods cluster them by cosine).  With ``targets`` each
    cluster takes the colour of the class it is Hungarian-matched to.
    """
    require_matplotlib()
    feats = _as_numpy(features).astype(np.float32)
    labels = _as_numpy(labels).astype(np.int64)
    n_all = len(feats)
    idx, emb, perplexity = _tsne(feats, max_points, seed)
    clusters = sorted(set(labels.tolist()))
    t = _as_numpy(targets).astype(np.int64) if targets is not None else None
    classes, mapping, colors, cluster_color = _tsne_colours(labels, t, clusters)
    name = _namer(class_names)
    panels = 2 if t is not None else 1
    fig = _figure(6.2 * panels, 6.0)
    axes = np.atleast_1d(fig.subplots(1, panels))
    size = 6 if len(idx) > 1000 else 12
    for c in clusters:
        sel = labels[idx] == c
        to = f" → {name(mapping[c])}" if mapping.get(c, -1) != -1 else ""
        axes[0].scatter(emb[sel, 0], emb[sel, 1], s=size, color=cluster_color[c], label=f"cluster {c}{to}", lw=0)
    axes[0].set_title("coloured by predicted cluster" + (" (colour of its matched class)" if panels == 2 else ""),
                      fontsize=10)
    if t is not None:
        for i, k in enumerate(classes):
            sel = t[idx] == k
            axes[1].scatter(emb[sel, 0], emb[sel, 1], s=size, color=colors[i], label=name(k), lw=0)
        axes[1].set_title("coloured by true class", fontsize=10)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        if len(ax.get_legend_handles_labels()[0]) <= 20:
            ax.legend(fontsize=7, markerscale=2, loc="best", framealpha=0.8)
    shown = f"all {n_all} points" if len(idx) == n_all else f"{len(idx)} of {n_all} points, random subsample"
    fig.suptitle(f"{title or 'Run'}: t-SNE of the final features ({shown}; perplexity {perplexity:g})",
                 fontsize=11)
    return _save(fig, path)


def _tsne(feats: np.ndarray, max_points: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """``(indices embedded, their 2-D t-SNE, perplexity)``: at most ``max_points`` rows (a seeded
    subsample), L2-normalised."""
    from sklearn.manifold import TSNE

    n_all = len(feats)
    idx = np.arange(n_all)
    if n_all > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(n_all, max_points, replace=False))
    x = feats[idx] / np.maximum(np.linalg.norm(feats[idx], axis=1, keepdims=True), 1e-12)
    perplexity = float(min(30.0, max(2.0, (len(idx) - 1) / 3)))
    emb = TSNE(n_components=2, init="pca", learning_rate="auto", perplexity=perplexity, max_iter=TSNE_ITERATIONS,
               random_state=seed).fit_transform(x)
    return idx, emb, perplexity


def _tsne_colours(labels: np.ndarray, targets: np.ndarray | None, clusters: list[int]) -> tuple[
        list[int], dict[int, int], list, dict[int, Any]]:
    """``(classes, cluster -> matched class (-1: none), colours, cluster -> colour)``: with targets
    a cluster takes its Hungarian-matched class's colour (an unmatched one a colour of its own)."""
    if targets is None:
        colors = _colors(len(clusters))
        return [], {}, colors, {c: colors[i] for i, c in enumerate(clusters)}
    classes = sorted(set(targets.tolist()))
    mapping = _match(targets, labels)
    colors = _colors(len(classes) + sum(1 for c in clusters if mapping[c] == -1))
    extra = iter(range(len(classes), len(colors)))
    cluster_color = {c: colors[classes.index(mapping[c])] if mapping[c] != -1 else colors[next(extra)]
                     for c in clusters}
    return classes, mapping, colors, cluster_color


def _namer(class_names: Sequence[str] | None) -> Callable[[int], str]:
    """Class index -> its name (the index itself when there is no name for it)."""
    names = list(class_names) if class_names is not None else None

    def name(k: int) -> str:
        return names[k] if names is not None and 0 <= k < len(names) else str(k)

    return name


def _cell(image: np.ndarray, scale: int) -> np.ndarray:
    """uint8 (C, H, W) -> float RGB (H*scale, W*scale, 3) in [0, 1]."""
    x = image.astype(np.float32) / 255.0
    x = np.repeat(x, 3, axis=0) if x.shape[0] == 1 else x[:3]
    x = x.transpose(1, 2, 0)
    return np.kron(x, np.ones((scale, scale, 1), dtype=np.float32)) if scale > 1 else x


def plot_montage(images, labels, confidence, path: str | Path, targets=None,
                 class_names: Sequence[str] | None = None, per_cluster: int = 10, max_clusters: int = 20,
                 title: str | None = None) -> Path:
    """The ``per_cluster`` most confident images of each cluster, one row per cluster.

    ``images``: uint8 (N, C, H, W) at their stored resolution.  With ``targets`` rows are
    ordered by the class each cluster is Hungarian-matched to, labelled with it, and an
    image whose true class is not that class gets a red frame.  With more than
    ``max_clusters`` clusters the largest ``max_clusters`` are shown.
    """
    require_matplotlib()
    images = _as_numpy(images)
    if images.dtype != np.uint8:
        raise ValueError("plot_montage expects uint8 images (N, C, H, W)")
    labels = _as_numpy(labels).astype(np.int64)
    conf = _as_numpy(confidence).astype(np.float64)
    sizes = {c: int((labels == c).sum()) for c in sorted(set(labels.tolist()))}
    clusters = sorted(sizes, key=lambda c: -sizes[c])[:max_clusters]
    mapping = _match(targets, labels) if targets is not None else {}
    t = _as_numpy(targets).astype(np.int64) if targets is not None else None
    class_name = _namer(class_names)
    clusters.sort(key=lambda c: (mapping.get(c, -1) == -1, mapping.get(c, c), c))
    _, _, h, w = images.shape
    scale = max(1, math.ceil(32 / max(h, w))) if max(h, w) < 32 else 1
    ch, cw = h * scale, w * scale
    pad = max(2, ch // 16)
    canvas = np.ones((len(clusters) * (ch + 2 * pad), per_cluster * (cw + 2 * pad), 3), dtype=np.float32)
    row_labels = []
    wrong = 0
    for r, c in enumerate(clusters):
        members = np.nonzero(labels == c)[0]
        top = members[np.argsort(-conf[members], kind="stable")][:per_cluster]
        matched = mapping.get(c, -1)
        to = "" if t is None else f"\n→ {class_name(matched)}" if matched != -1 else "\n→ no class (unmatched)"
        row_labels.append(f"cluster {c} (n={sizes[c]}, {sizes[c] / len(labels):.0%}){to}")
        for j, i in enumerate(top):
            y, x = r * (ch + 2 * pad), j * (cw + 2 * pad)
            if t is not None and t[i] != matched:
                canvas[y:y + ch + 2 * pad, x:x + cw + 2 * pad] = (0.85, 0.1, 0.1)
                wrong += 1
            canvas[y + pad:y + pad + ch, x + pad:x + pad + cw] = _cell(images[i], scale)
    fig = _figure(2.0 + per_cluster * 0.62, 0.8 + len(clusters) * 0.62)
    ax = fig.subplots()
    ax.imshow(canvas, interpolation="nearest" if max(h, w) <= 64 else "antialiased")
    ax.set_yticks([(r + 0.5) * (ch + 2 * pad) for r in range(len(clusters))], row_labels, fontsize=7)
    ax.set_xticks([(j + 0.5) * (cw + 2 * pad) for j in range(per_cluster)], [str(j + 1) for j in range(per_cluster)],
                  fontsize=7)
    ax.set_xlabel("rank by confidence (1 = most confident)", fontsize=8)
    for side in ax.spines.values():
        side.set_visible(False)
    more = f" (the {len(clusters)} largest of {len(sizes)} clusters)" if len(sizes) > len(clusters) else ""
    framed = f"\nred frame: the true class differs from the cluster's matched class " \
        f"({wrong} of {sum(min(per_cluster, sizes[c]) for c in clusters)} images)" if t is not None else ""
    fig.suptitle(f"{title or 'Run'}: the {per_cluster} most confident images per cluster{more}{framed}",
                 fontsize=10)
    return _save(fig, path)


def plot_confusion(targets, labels, path: str | Path, class_names: Sequence[str] | None = None,
                   title: str | None = None) -> Path:
    """Confusion matrix of true class (rows) against the Hungarian-matched predicted class
    (columns; clusters left without a class form an 'unmatched' column).  Colours are
    row-normalised; counts are written in the cells for up to 20 classes."""
    require_matplotlib()
    t = _as_numpy(targets).astype(np.int64)
    p = _as_numpy(labels).astype(np.int64)
    mapping = _match(t, p)
    classes = sorted(set(t.tolist()))
    names = list(class_names) if class_names is not None else None
    cols = list(classes) + ([-1] if any(v == -1 for v in mapping.values()) else [])
    matched = np.array([mapping[int(c)] for c in p])
    table = np.zeros((len(classes), len(cols)), dtype=np.int64)
    for i, k in enumerate(classes):
        for j, m in enumerate(cols):
            table[i, j] = int(((t == k) & (matched == m)).sum())
    frac = table / np.maximum(table.sum(1, keepdims=True), 1)
    acc = float(np.trace(table[:, :len(classes)]) / len(t))
    side = max(4.5, 0.45 * len(cols) + 2)
    fig = _figure(side + 1, side)
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    inverse = {v: c for c, v in mapping.items() if v != -1}

    def name(k: int) -> str:
        return names[k] if names is not None and 0 <= k < len(names) else str(k)

    # a class no cluster is matched to (a collapsed run: fewer clusters than classes) has no cluster id
    xt = [("unmatched" if m == -1 else f"{name(m)}\n(c{inverse[m]})" if m in inverse else f"{name(m)}\n(none)")
          for m in cols]
    small = len(cols) <= 20
    ax.set_xticks(range(len(cols)), xt if small else [], fontsize=7)
    ax.set_yticks(range(len(classes)), [name(k) for k in classes] if small else [], fontsize=7)
    ax.set_xlabel("predicted cluster, as its matched class (cluster id)")
    ax.set_ylabel("true class")
    if small:
        for i in range(len(classes)):
            for j in range(len(cols)):
                if table[i, j]:
                    ax.text(j, i, str(table[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] > 0.6 else "black")
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the true class")
    ax.set_title(f"{title or 'Run'}: Hungarian-matched predictions, ACC {acc:.3f} ({len(t)} images)", fontsize=10)
    return _save(fig, path)


# -- a whole run -----------------------------------------------------------------------------------

def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, max_points: int = 2000,
             device: str | None = None) -> list[Path]:
    """Draw every per-run plot of ``run_dir`` into ``out_dir`` (default ``RUN_DIR/plots``).

    The model is rebuilt from the last checkpoint; the evaluation data is embedded and
    predicted by the method's own rule, as the run's final evaluation did.  Returns the PNG paths.
    """
    from .errors import RecipeError, RunDirError
    from .inference import load
    from .outputs import check_output_folder

    require_matplotlib()
    run_dir = Path(run_dir)
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 2:
        raise RecipeError(f"--max-points must be at least 2 (the points the t-SNE embeds; a random subsample when "
                          f"the data has more), got {max_points!r}; nothing was drawn. The default is 2000.")
    if not run_dir.is_dir():
        raise RunDirError(f"Run directory '{run_dir}' does not exist"
                          f"{' (it is a file)' if run_dir.exists() else ''}. Pass the folder a run wrote (it holds "
                          f"{CONTENTS}), or a compare --out folder.")
    out = Path(out_dir) if out_dir is not None else RunDir(run_dir).plots
    check_output_folder(out, "--out")  # before the model is loaded and the data embedded
    model = load(run_dir, device)
    name = f"{model.recipe.name} (epoch {model.epoch})"
    records = RunDir(run_dir).epoch_records()
    ds = model.eval_dataset()
    targets = ds.targets if ds.has_labels else None  # unlabeled: nothing to match clusters to
    paths = [plot_convergence({model.recipe.name: [records]}, out / "convergence.png", title=name,
                              baseline=baselines_of(model.summary),
                              metrics=METRICS if targets is not None else QUALITY_CURVES),
             plot_losses(records, out / "losses.png", title=name)]
    feats = model.embed_dataset(ds)
    pred = model.predict_features(feats, fit=True)  # the run's own evaluation rule on its evaluation data
    labels, conf = pred.labels.cpu(), pred.confidence.float().cpu()
    seed = model.recipe.run.seed
    paths.append(plot_tsne(feats.cpu(), labels, out / "tsne.png", targets=targets, class_names=ds.classes,
                           max_points=max_points, seed=seed, title=name))
    paths.append(plot_montage(ds.all_images(), labels, conf, out / "montage.png", targets=targets,
                              class_names=ds.classes, title=name))
    if targets is not None:
        paths.append(plot_confusion(targets, labels, out / "confusion.png", class_names=ds.classes, title=name))
    return paths
