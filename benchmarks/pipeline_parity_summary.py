"""Per-epoch NMI of clusterkit's two augmentation pipelines in the parity setting (issue 24, item 2).

Reads the parity harness's JSON records and prints markdown tables: for each method, the NMI of
every run per epoch, grouped by ``data.pipeline`` (batched / per_image), the range (min-max) and
mean of each pipeline over its runs, whether the two ranges overlap, and the official code's
runs for reference.  Two sources of clusterkit runs:

* this issue's runs (``benchmarks/pipeline_parity.sh``, 1 torch thread):
  ``benchmarks/results/pipeline_parity/{method}_{pipeline}.json``;
* the runs recorded for issue 13 (2 torch threads): ``parity.json`` (ProPos, DigPro, batched),
  ``parity_per_image.json`` (ProPos, DigPro, per_image), ``parity_cc.json`` (CC, batched) and
  probe 4 of ``parity_probes.md`` (CC, per_image; only a markdown table there, copied below).

A run with the same seed at another thread count has the same initial network, data order and
augmentation draws; only the float rounding of the parallel reductions differs, and the runs
drift apart from epoch 1 on.  Such a pair shows how far rounding alone moves the NMI.

Usage: ``python benchmarks/pipeline_parity_summary.py > /tmp/tables.md`` (from the repo root).
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
NEW = RESULTS / "pipeline_parity"
#: CC, clusterkit, data.pipeline=per_image, 2 threads: parity_probes.md, probe 4 (seeds 0 and 1),
#: NMI of epochs 0-6 as printed there (3 decimals).
CC_PER_IMAGE_PROBE4 = {0: [0.037, 0.414, 0.447, 0.479, 0.507, 0.535, 0.524],
                       1: [0.005, 0.409, 0.432, 0.499, 0.506, 0.511, 0.540]}
OLD = {("propos", "batched"): "parity.json", ("digpro", "batched"): "parity.json",
       ("propos", "per_image"): "parity_per_image.json", ("digpro", "per_image"): "parity_per_image.json",
       ("cc", "batched"): "parity_cc.json"}
OFFICIAL = {"propos": "parity.json", "digpro": "parity.json", "cc": "parity_cc.json"}
LABEL = {"propos": "ProPos", "digpro": "DigPro", "cc": "CC"}


def _runs(path: Path, method: str, system: str) -> dict[int, list[dict]]:
    """seed -> epoch records of a harness JSON (empty if the file is missing)."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {r["seed"]: r["epochs"] for r in data["runs"] if r["method"] == method and r["system"] == system}


def collect(method: str) -> tuple[dict, dict]:
    """(columns, official): columns maps (pipeline, threads, seed) to NMI per epoch."""
    cols: dict[tuple[str, int, int], list[float]] = {}
    for pipe in ("batched", "per_image"):
        for seed, eps in sorted(_runs(NEW / f"{method}_{pipe}.json", method, "clusterkit").items()):
            cols[(pipe, 1, seed)] = [e["nmi"] for e in eps]
        if (method, pipe) in OLD:
            for seed, eps in sorted(_runs(RESULTS / OLD[(method, pipe)], method, "clusterkit").items()):
                cols[(pipe, 2, seed)] = [e["nmi"] for e in eps]
    if method == "cc":
        for seed, nmi in CC_PER_IMAGE_PROBE4.items():
            cols[("per_image", 2, seed)] = list(nmi)
    official = {seed: [e["nmi"] for e in eps]
                for seed, eps in sorted(_runs(RESULTS / OFFICIAL[method], method, "official").items())}
    return cols, official


def table(method: str) -> str:
    cols, official = collect(method)
    if not cols:
        return f"(no records for {method})\n"
    n = max(len(v) for v in [*cols.values(), *official.values()])
    order = sorted(cols, key=lambda k: (k[0] != "batched", k[1], k[2]))
    head = ["epoch", *[f"{'B' if p == 'batched' else 'P'} s{s} t{t}" for p, t, s in order],
            "batched range (mean)", "per_image range (mean)", "overlap", "per_image - batched",
            *[f"official s{s}" for s in official], "official mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ep in range(n):
        row = [str(ep)]
        row += [f"{cols[k][ep]:.3f}" if ep < len(cols[k]) else "" for k in order]
        stats = {}
        for pipe in ("batched", "per_image"):
            vals = [cols[k][ep] for k in order if k[0] == pipe and ep < len(cols[k])]
            stats[pipe] = vals
            row.append(f"{min(vals):.3f}-{max(vals):.3f} ({sum(vals) / len(vals):.3f})" if vals else "")
        b, p = stats["batched"], stats["per_image"]
        if b and p:
            overlap = max(min(b), min(p)) <= min(max(b), max(p))
            gap = min(p) - max(b) if min(p) > max(b) else (max(p) - min(b) if max(p) < min(b) else 0.0)
            row.append("yes" if overlap else f"**no** (gap {gap:+.3f})")
            row.append(f"{sum(p) / len(p) - sum(b) / len(b):+.3f}")
        else:
            row += ["", ""]
        off = [official[s][ep] for s in official if ep < len(official[s])]
        row += [f"{official[s][ep]:.3f}" if ep < len(official[s]) else "" for s in official]
        row.append(f"{sum(off) / len(off):.3f}" if off else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def official_table(method: str) -> str:
    """Each pipeline against the official runs: mean difference and issue 13's NMI criterion (a run's
    NMI within the official seeds' range or within 0.05 of their mean) per epoch."""
    cols, official = collect(method)
    if not cols or not official:
        return ""
    n = max(len(v) for v in official.values())
    head = ["epoch", "official mean", "batched mean - official", "per_image mean - official",
            "batched runs meeting the criterion", "per_image runs meeting the criterion"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    total = {"batched": [0, 0], "per_image": [0, 0]}
    for ep in range(1, n):
        off = [official[s][ep] for s in official if ep < len(official[s])]
        mean = sum(off) / len(off)
        row = [str(ep), f"{mean:.3f}"]
        ok = {}
        for pipe in ("batched", "per_image"):
            vals = [v[ep] for k, v in cols.items() if k[0] == pipe and ep < len(v)]
            row.append(f"{sum(vals) / len(vals) - mean:+.3f}" if vals else "")
            good = sum(min(off) <= x <= max(off) or abs(x - mean) <= 0.05 for x in vals)
            total[pipe][0] += good
            total[pipe][1] += len(vals)
            ok[pipe] = f"{good} of {len(vals)}"
        row += [ok["batched"], ok["per_image"]]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(f"Epochs 1-{n - 1}: batched {total['batched'][0]} of {total['batched'][1]} run-epochs meet the "
                 f"criterion, per_image {total['per_image'][0]} of {total['per_image'][1]}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    print("Columns: B = `data.pipeline: batched`, P = `per_image`; sN = seed N; t1 = this issue's runs "
          "(1 torch thread), t2 = issue 13's records (2 threads). Ranges and means pool every run of a "
          "pipeline at that epoch; overlap: the two ranges intersect.\n")
    for method in ("propos", "cc", "digpro"):
        print(f"### {LABEL[method]}\n")
        print(table(method))
        print(f"Against the official code ({LABEL[method]}):\n")
        print(official_table(method))


if __name__ == "__main__":
    main()
