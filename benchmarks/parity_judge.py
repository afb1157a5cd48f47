"""Judge clusterkit runs of one parity results file against the official runs of another.

A clusterkit-only run of ``benchmarks/parity.py`` (``--systems clusterkit``, e.g. a lever or a probe) has no
official runs in its own file. This script applies parity.py's own criteria (:func:`parity.compare`: issue
13's NMI and largest-cluster criteria, epoch by epoch) to the official runs of ``OFFICIAL.json`` and the
clusterkit runs of ``CLUSTERKIT.json``, both written by parity.py in the same setting, and prints the
per-epoch table and the verdict. Usage (repo root)::

    python benchmarks/parity_judge.py OFFICIAL.json CLUSTERKIT.json --method propos [--epochs 6]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _parity():
    spec = importlib.util.spec_from_file_location("parity_for_judge", HERE / "parity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def judge(official: dict, clusterkit: dict, method: str, epochs: int) -> tuple[list[str], dict]:
    """parity.compare's markdown rows and verdict for ``method``: the official runs of the results
    ``official`` against the clusterkit runs of the results ``clusterkit`` (parity.py's JSON)."""
    results: dict = {}
    for data, system in ((official, "official"), (clusterkit, "clusterkit")):
        for run in data["runs"]:
            if run["method"] == method and run["system"] == system:
                results.setdefault((method, system), {})[run["seed"]] = run["epochs"]
    for system in ("official", "clusterkit"):
        if (method, system) not in results:
            raise SystemExit(f"no {system} run of '{method}' in the {system} file: pass a parity.py results "
                             f"file (.json) that holds {system} runs of that method")
    return _parity().compare(results, method, epochs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("official", type=Path, help="parity.py results (.json) holding the official runs")
    ap.add_argument("clusterkit", type=Path, help="parity.py results (.json) holding the clusterkit runs")
    ap.add_argument("--method", required=True, choices=["propos", "digpro", "hadis", "cc", "pici"])
    ap.add_argument("--epochs", type=int, default=6, help="last epoch to judge (epochs 0..E)")
    args = ap.parse_args(argv)
    files = []
    for path in (args.official, args.clusterkit):
        try:
            files.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            ap.error(f"cannot read '{path}' as parity.py's JSON results ({exc}); pass the .json beside the .md")
    lines, verdict = judge(*files, args.method, args.epochs)
    print("\n".join(lines))
    print(f"\nNMI criterion met in {verdict['nmi_ok']} of {verdict['checked']} (epoch, seed) cells; "
          f"largest-cluster criterion in {verdict['share_ok']} of {verdict['checked']}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
