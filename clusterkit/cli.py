"""The ``clusterkit`` command line.

    clusterkit run RECIPE [--set key.path=value ...] [--out DIR] [--resume RUN_DIR] [--force]
    clusterkit plugins [--params NAME]

User mistakes print one paragraph and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from .errors import ClusterkitError, RunDirError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clusterkit", description="Contrastive deep clustering with plugins.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train a recipe")
    run.add_argument("recipe", help="recipe YAML file, e.g. recipes/quickstart.yaml")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe value, e.g. --set schedule.epochs=5 (repeatable)")
    run.add_argument("--out", help="run directory (default: run.out_dir/<name>/<time>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    run.add_argument("--force", action="store_true", help="overwrite a non-empty --out directory")
    run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    plugins = sub.add_parser("plugins", help="list installed plugins, their hooks and parameters")
    plugins.add_argument("--params", metavar="NAME", help="show one plugin's parameters with their docs")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def cmd_run(args) -> int:
    from .recipe import load_recipe
    from .trainer import Trainer, make_run_dir

    recipe = load_recipe(args.recipe, args.overrides)
    if args.resume:
        run_dir = Path(args.resume)
        if not run_dir.is_dir():
            raise RunDirError(f"Cannot resume '{run_dir}': no such directory. Pass the run directory that "
                              "holds recipe.yaml and checkpoints/ (printed when the run started).")
    else:
        run_dir = make_run_dir(recipe, args.out, args.force)
    print(f"clusterkit: {recipe.name} -> {run_dir}", file=sys.stderr)
    summary = Trainer(recipe, run_dir, resume=bool(args.resume)).fit()
    rows = [("clusterkit (" + recipe.name + ")", summary["metrics"])]
    if summary.get("pixel_kmeans"):
        rows.append(("k-means on pixels", summary["pixel_kmeans"]))
    width = max(len(r[0]) for r in rows)
    proto = summary["protocol"]
    print(f"\n{recipe.name}: {proto['dataset']} ({proto['eval_split']} split), {summary['epochs']} epochs, "
          f"{summary['wall_time_s']:.0f}s on {summary['device']}")
    print(f"{'':{width}}    NMI    ACC    ARI")
    for name, m in rows:
        print(f"{name:{width}}  {_fmt(m.get('nmi'))}  {_fmt(m.get('acc'))}  {_fmt(m.get('ari'))}")
    print(f"\nsummary: {run_dir / 'summary.json'}")
    return 0


def cmd_plugins(args) -> int:
    from .errors import PluginError
    from .plugin_manager import describe, discover
    from .schema import did_you_mean

    found = discover()
    if args.params:
        if args.params not in found:
            raise PluginError(f"No plugin named '{args.params}'.{did_you_mean(args.params, found)} "
                              f"Installed: {', '.join(sorted(found))}.")
        infos = [describe(found[args.params])]
    else:
        infos = [describe(info) for _, info in sorted(found.items())]
    if args.json:
        print(json.dumps(infos, indent=2, default=str))
        return 0
    for d in infos:
        print(f"{d['name']}  [{d['source']}]")
        if "error" in d:
            print(f"  failed to import: {d['error']}")
            continue
        if d["doc"]:
            print(textwrap.fill(d["doc"], 88, initial_indent="  ", subsequent_indent="  "))
        print(f"  hooks:  {', '.join(d['hooks'])}")
        if d["params"]:
            print("  params:")
            for name, tp, default, doc in d["params"]:
                line = f"    {name}: {tp} = {default!r}"
                print(line + (f"  -- {doc}" if doc and args.params else ""))
        print()
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"run": cmd_run, "plugins": cmd_plugins}[args.command](args)
    except ClusterkitError as exc:
        if args.debug:
            raise
        # the first paragraph is the error; anything after a blank line (e.g. data preparation
        # steps) is printed as written
        head, _, rest = str(exc).partition("\n\n")
        # never break inside a path or a key (they are copied from here)
        print(textwrap.fill(f"clusterkit: error: {head}", 100, break_on_hyphens=False, break_long_words=False),
              file=sys.stderr)
        if rest:
            print("\n" + rest, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("clusterkit: interrupted; resume with --resume RUN_DIR (the last checkpoint is kept)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
