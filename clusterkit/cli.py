"""The ``clusterkit`` command line.

    clusterkit run RECIPE [--set key.path=value ...] [--out DIR] [--resume RUN_DIR] [--force]
    clusterkit plugins [--params NAME] [--core]
    clusterkit new-plugin NAME [--dir DIR]
    clusterkit compare RECIPE... [--seeds 0 1 2] [--set key.path=value ...] [--out DIR]
    clusterkit plot RUN_DIR [--out DIR]            (a compare folder: its convergence plot)
    clusterkit predict RUN_DIR --images DIR_OR_FILES... [--out preds.csv]
    clusterkit show RUN_DIR [--base RECIPE_OR_RUN_DIR]
    clusterkit choose-k RUN_DIR [--k 2:30] [--criterion silhouette] [--out DIR] [--force]
    clusterkit export RUN_DIR --to DIR [--link | --copy] [--top N]

User mistakes print one paragraph and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import textwrap
from pathlib import Path

from .errors import ClusterkitError
from .rundir import CHECKPOINTS, PLOTS, RunDir

_DEVICE_HELP = "cpu, cuda, ... (default: CUDA when present, else cpu)"


def _parser() -> argparse.ArgumentParser:
    """The ``clusterkit`` argument parser: one sub-command per verb (docs/gen_reference.py
    writes the command-line reference from it)."""
    p = argparse.ArgumentParser(prog="clusterkit", description="Contrastive deep clustering with plugins.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_plugins, _add_new_plugin, _add_compare, _add_plot, _add_predict, _add_show,
                _add_choose_k, _add_export):
        command = add(sub)
        # --debug after the verb too (clusterkit run --debug ...), not shown in its help
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def _add_run(sub) -> argparse.ArgumentParser:
    run = sub.add_parser("run", help="train a recipe")
    run.add_argument("recipe", help="recipe YAML file, e.g. recipes/quickstart.yaml")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe value, e.g. --set schedule.epochs=5 (repeatable)")
    run.add_argument("--out", help="run directory (default: run.out_dir/<name>/<time>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    run.add_argument("--force", action="store_true", help="overwrite a non-empty --out directory")
    return run


def _add_plugins(sub) -> argparse.ArgumentParser:
    plugins = sub.add_parser("plugins", help="list installed plugins, their hooks and parameters")
    plugins.add_argument("--params", metavar="NAME", help="show one plugin's parameters with their docs")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.add_argument("--core", action="store_true",
                         help="list the core recipe keys (data, model, optim, schedule, ...) with their docs")
    return plugins


def _add_new_plugin(sub) -> argparse.ArgumentParser:
    new = sub.add_parser("new-plugin", help="write a ready-to-install plugin package skeleton")
    new.add_argument("name", metavar="NAME", help="the plugin's name in recipes, a lower-case identifier, e.g. my_loss")
    new.add_argument("--dir", default=".", help="folder to create the package folder in (default: .)")
    return new


def _add_compare(sub) -> argparse.ArgumentParser:
    compare = sub.add_parser("compare", help="run recipes x seeds and write comparison tables and plots")
    compare.add_argument("recipes", nargs="+", metavar="RECIPE", help="recipe YAML files to put side by side")
    compare.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="N",
                         help="run.seed values, each recipe runs once per seed (default: 0 1 2)")
    compare.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override applied to every recipe, e.g. --set schedule.epochs=5 (repeatable)")
    compare.add_argument("--out", default="runs/compare",
                         help="comparison folder: OUT/<recipe>/seed<N>/ runs and results.* (default: runs/compare)")
    compare.add_argument("--no-plots", dest="plots", action="store_false", help="skip convergence.png")
    compare.add_argument("--force", action="store_true",
                         help="replace the results of a different comparison in --out")
    compare.add_argument("--in-process", action="store_true",
                         help="run in this process instead of one process per run (peak memory then accumulates)")
    return compare


def _add_plot(sub) -> argparse.ArgumentParser:
    plot = sub.add_parser("plot", help="draw a run's plots (convergence, losses, t-SNE, montage, confusion)")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, or a compare --out folder")
    plot.add_argument("--out", help=f"folder for the PNG files (default: RUN_DIR/{PLOTS})")
    plot.add_argument("--max-points", type=int, default=2000, help="t-SNE subsample size (default: 2000)")
    plot.add_argument("--device", help=_DEVICE_HELP)
    return plot


def _add_predict(sub) -> argparse.ArgumentParser:
    predict = sub.add_parser("predict", help="cluster new images with a finished run's model")
    predict.add_argument("run_dir", metavar="RUN_DIR", help=f"the run directory (holds {CHECKPOINTS}/)")
    predict.add_argument("--images", nargs="+", required=True, metavar="DIR_OR_FILE",
                         help="image files (PNG, JPEG, ...) or folders, searched recursively")
    predict.add_argument("--out", help="CSV file to write (default: print the CSV)")
    predict.add_argument("--device", help=_DEVICE_HELP)
    return predict


def _add_show(sub) -> argparse.ArgumentParser:
    show = sub.add_parser("show", help="print a run's summary, recipe diff and metrics table")
    show.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    show.add_argument("--base", metavar="RECIPE_OR_RUN_DIR",
                      help="diff the recipe against this recipe file or run (default: clusterkit's defaults)")
    return show


def _add_choose_k(sub) -> argparse.ArgumentParser:
    ck = sub.add_parser("choose-k", help="score K = 2..30 clusters of a run's final features without labels")
    ck.add_argument("run_dir", metavar="RUN_DIR", help=f"a trained run directory (holds {CHECKPOINTS}/)")
    ck.add_argument("--k", default="2:30", metavar="RANGE",
                    help="cluster counts: FIRST:LAST (inclusive), FIRST:LAST:STEP or a list 5,10,20 (default: 2:30)")
    ck.add_argument("--criterion", default="silhouette", choices=["silhouette", "calinski_harabasz", "davies_bouldin"],
                    help="the measure that chooses K (default: silhouette, cosine)")
    ck.add_argument("--n-init", type=int, default=3, help="k-means restarts per K (default: 3)")
    ck.add_argument("--out", help="folder for choose_k.csv/.json/.png (default: RUN_DIR/choose_k)")
    ck.add_argument("--force", action="store_true", help="replace the files of an earlier choose-k in --out")
    ck.add_argument("--device", help=_DEVICE_HELP)
    return ck


def _add_export(sub) -> argparse.ArgumentParser:
    ex = sub.add_parser("export", help="write a run's images into one folder per cluster, most confident first")
    ex.add_argument("run_dir", metavar="RUN_DIR", help=f"a trained run directory (holds {CHECKPOINTS}/)")
    ex.add_argument("--to", required=True, metavar="DIR", help="a new (or empty) folder for cluster_NN/ folders")
    how = ex.add_mutually_exclusive_group()
    how.add_argument("--link", dest="mode", action="store_const", const="link",
                     help="symbolic links to the original files (the default)")
    how.add_argument("--copy", dest="mode", action="store_const", const="copy", help="copies of the files")
    ex.add_argument("--top", type=int, metavar="N", help="only each cluster's N most confident images")
    ex.add_argument("--device", help=_DEVICE_HELP)
    return ex


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def cmd_run(args) -> int:
    from . import distributed
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    distributed.init_from_env(recipe.run.device)  # torchrun: join the process group (a no-op otherwise)
    try:
        return _run(args, recipe)
    finally:
        if distributed.is_distributed():
            import torch.distributed

            torch.distributed.destroy_process_group()


def _run(args, recipe) -> int:
    new = not args.resume and (args.out is None or not Path(args.out).exists())
    run_dir = _prepare_run_dir(args, recipe)
    args.run_started = True  # from here an interruption leaves a run to resume (see _main)
    try:
        return _train(args, recipe, run_dir)
    except BaseException:
        if new:
            RunDir(run_dir).remove_if_empty()
        raise
    finally:
        RunDir(run_dir).release()


def _prepare_run_dir(args, recipe) -> Path:
    """The run directory, checked and locked by rank 0 (:mod:`clusterkit.runlock`): ``--resume``'s
    must hold a checkpoint; a new one is made (its name may hold the time).  Rank 0 tells the
    other ranks the path, or its error, which every rank then raises (none waits)."""
    from . import distributed

    made = None
    if distributed.is_main():
        try:
            if args.resume:
                resumed = RunDir(args.resume)
                resumed.check_resumable()
                resumed.lock()
                made = str(args.resume)
            else:
                made = str(RunDir.create(recipe, args.out, args.force).path)
        except Exception as exc:  # every rank raises it, none waits for a directory
            made = exc
    made = distributed.broadcast_object(made)
    if isinstance(made, Exception):
        raise made
    return Path(made)


def _train(args, recipe, run_dir: Path) -> int:
    from . import distributed
    from .trainer import Trainer

    main = distributed.is_main()
    if main:
        world = distributed.world_size()
        procs = f" ({world} processes)" if world > 1 else ""
        print(f"clusterkit: {recipe.name} -> {run_dir}{procs}", file=sys.stderr)
    summary = Trainer(recipe, run_dir, resume=bool(args.resume)).fit()
    if not main:
        return 0
    print_run_summary(summary, recipe.name, recipe.e_step.k, run_dir)
    return 0


def print_run_summary(summary: dict, name: str, k: int, run_dir: Path) -> None:
    """What ``run`` prints at the end: NMI/ACC/ARI of the run and of its baselines (labelled
    data), the label-free quality (of the run and, unlabeled, of the UMAP rows)."""
    from .baselines import BASELINE_ROWS

    rows = [("clusterkit (" + name + ")", summary["metrics"])]
    rows += [(row, summary[key]) for key, row in BASELINE_ROWS.items() if summary.get(key)]
    width = max(len(r[0]) for r in rows)
    proto = summary["protocol"]
    unlabeled = proto.get("labels") == "unlabeled"
    print(f"\n{name}: {proto['dataset']} ({proto['eval_split']} split{', unlabeled' if unlabeled else ''}), "
          f"{summary['epochs']} epochs, {summary['wall_time_s']:.0f}s on {summary['device']}")
    if not unlabeled:
        print(f"{'':{width}}    NMI    ACC    ARI")
        for row, m in rows:
            if m.get("unavailable"):
                print(f"{row:{width}}  {m['unavailable']}")
            else:
                seconds = f"  ({m['seconds']:.1f}s)" if m.get("seconds") is not None else ""
                print(f"{row:{width}}  {_fmt(m.get('nmi'))}  {_fmt(m.get('acc'))}  {_fmt(m.get('ari'))}{seconds}")
    print(quality_line(summary.get("quality") or {}, k))
    for row, m in rows[1:]:
        if unlabeled and m.get("unavailable"):
            print(f"{row}: {m['unavailable']}")
        elif unlabeled and m.get("quality"):
            print(f"{row} ({m['seconds']:.1f}s), " + quality_line(m["quality"], k) + " (on its UMAP embedding)")
    print(f"\nsummary: {RunDir(run_dir).summary_file}")


def quality_line(q: dict, k: int) -> str:
    """The label-free quality of a run on one line (what ``run`` prints last)."""
    def f(key, digits=3):
        v = q.get(key)
        return "-" if v is None else f"{v:.{digits}f}"

    return (f"label-free quality (K = {k}): silhouette {f('silhouette')} (cosine, higher is better), "
            f"Davies-Bouldin {f('davies_bouldin')} (lower), Calinski-Harabasz {f('calinski_harabasz', 1)}, "
            f"size entropy {f('size_entropy')}, cluster shares {f('min_share')}-{f('max_share')}, "
            f"mean confidence {f('mean_confidence')}")


def cmd_plugins(args) -> int:
    from .plugin_manager import AUTOLOAD_ENV, hidden_plugins, name_conflicts

    if args.core:
        return _print_core_keys(args.json)
    found, clashes = name_conflicts()  # a name two packages register is listed, marked, not fatal
    # third-party plugins CLUSTERKIT_DISABLE_PLUGIN_AUTOLOAD keeps out
    hidden = {n: i for n, i in hidden_plugins(strict=False).items() if n not in found}
    infos = _plugin_infos(args.params, found, clashes, hidden)
    if args.json:
        print(json.dumps(infos, indent=2, default=str))
        return 0
    for d in infos:
        _print_plugin(d, with_docs=bool(args.params))
    if hidden and not args.params:
        print(f"clusterkit: {AUTOLOAD_ENV} is set: {len(hidden)} third-party plugin(s) not loaded: "
              f"{', '.join(sorted(hidden))}", file=sys.stderr)
    return 0


def _plugin_infos(name: str | None, found: dict, clashes: dict, hidden: dict) -> list[dict]:
    """The description of plugin ``name`` (every plugin when None), with the packages of a name
    registered twice; PluginError for a plugin that is hidden or unknown."""
    from .errors import PluginError
    from .plugin_manager import AUTOLOAD_ENV, describe
    from .schema import did_you_mean

    if name:
        if name in hidden:
            raise PluginError(f"Plugin '{name}' (package '{hidden[name].package}') is installed but "
                              f"not loaded: {AUTOLOAD_ENV} is set. Unset it to see the plugin, or name it in a "
                              "recipe's allow_plugins to use it.")
        if name not in found:
            raise PluginError(f"No plugin named '{name}'.{did_you_mean(name, found)} "
                              f"Installed: {', '.join(sorted(found))}.")
        infos = [describe(found[name])]
    else:
        infos = [describe(info) for _, info in sorted(found.items())]
    for d in infos:
        if d["name"] in clashes:
            d["conflict"] = [f"{i.package} {i.version} ({i.value})" for i in clashes[d["name"]]]
    return infos


def _print_plugin(d: dict, with_docs: bool) -> None:
    """One plugin as ``clusterkit plugins`` lists it (``with_docs``: each parameter's doc too)."""
    print(f"{d['name']}  [{d['source']}]")
    if d["source"] != f"{d['package']} {d['version']}":  # a third party's source already names both
        print(f"  package: {d['package']} {d['version']}")
    if "conflict" in d:
        print(f"  CONFLICT: this name is registered by {' and by '.join(d['conflict'])}; a recipe that uses "
              f"'{d['name']}' fails until one package is uninstalled or renames its entry point "
              "(listed here: the first)")
    if "error" in d:
        print(f"  failed to import: {d['error']}")
        return
    if d["doc"]:
        print(textwrap.fill(d["doc"], 88, initial_indent="  ", subsequent_indent="  "))
    print(f"  hooks:  {', '.join(d['hooks'])}")
    if d["params"]:
        print("  params:")
        for name, tp, default, doc in d["params"]:
            line = f"    {name}: {tp} = {default!r}"
            print(line + (f"  -- {doc}" if doc and with_docs else ""))
    print()


def core_keys() -> list[tuple[str, str, object, str]]:
    """(key path, type, default, doc) of every core recipe key, nested sections flattened."""
    import typing

    import attrs

    from .recipe import Recipe
    from .schema import field_docs

    rows = []

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for name, tp, default, doc in field_docs(cls):
            inner = hints.get(name)
            if isinstance(inner, type) and attrs.has(inner):
                walk(inner, f"{prefix}{name}.")
            else:
                rows.append((f"{prefix}{name}", tp, default, doc))

    walk(Recipe, "")
    return rows


def _print_core_keys(as_json: bool) -> int:
    rows = core_keys()
    if as_json:
        print(json.dumps([{"key": k, "type": t, "default": d, "doc": doc} for k, t, d, doc in rows], indent=2,
                         default=str))
        return 0
    for key, tp, default, doc in rows:
        print(f"{key}: {tp} = {default!r}")
        if doc:
            print(textwrap.fill(doc, 96, initial_indent="    ", subsequent_indent="    "))
    return 0


def cmd_new_plugin(args) -> int:
    from .scaffold import new_plugin

    root = new_plugin(args.name, args.dir)
    print(f"clusterkit: wrote {root}/; install it and run its tests with:\n\n"
          f"    pip install -e {root} && pytest -q {root}\n\n"
          f"then add '{args.name}' under plugins: in a recipe (see {root}/recipes/).")
    return 0


def cmd_compare(args) -> int:
    from .compare import compare

    try:
        res = compare(args.recipes, args.seeds, args.overrides, args.out, isolate=not args.in_process,
                      plots=args.plots, force=args.force)
    except KeyboardInterrupt:
        print(f"clusterkit: interrupted; run the same compare command again to continue (finished runs in "
              f"{args.out} are reused, the interrupted one resumes from its last checkpoint)", file=sys.stderr)
        return 130
    print(res.files[0].read_text())  # results.md, or results.failed.md beside complete results
    failed = [r for r in res.runs if r.status != "ok"]
    if failed:
        print(f"clusterkit: {len(failed)} of {len(res.runs)} runs failed (see the Failures section above)",
              file=sys.stderr)
    return 1 if failed else 0


def cmd_plot(args) -> int:
    from .compare import COMPARE_FILE, plot_compare_dir
    from .plots import plot_run, require_matplotlib

    require_matplotlib()
    run_dir = Path(args.run_dir)
    if (run_dir / COMPARE_FILE).exists() and not RunDir(run_dir).recipe_file.exists():
        paths = [plot_compare_dir(run_dir, args.out)]
    else:
        paths = plot_run(run_dir, args.out, max_points=args.max_points, device=args.device)
    for path in paths:
        print(path)
    return 0


def cmd_predict(args) -> int:
    import csv

    from .inference import find_images, load
    from .outputs import CSV_ERRORS, write_csv

    if args.out:
        _check_output_file(Path(args.out))
    files = find_images(args.images)
    model = load(args.run_dir, args.device)
    pred = model.predict([str(f) for f in files])
    header = ["path", "cluster", "confidence"]
    rows = [[os.fsdecode(path), label, f"{conf:.6f}"]
            for path, label, conf in zip(files, pred.labels.tolist(), pred.confidence.tolist(), strict=True)]
    if args.out:  # whole or not at all; any file name round-trips (clusterkit.outputs)
        write_csv(args.out, header, rows)
    else:
        if hasattr(sys.stdout, "reconfigure"):  # a non-UTF-8 file name is printed as its own bytes
            sys.stdout.reconfigure(errors=CSV_ERRORS)
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    state = "" if model.finished else " (unfinished run: its last checkpoint)"
    print(f"clusterkit: {len(files)} images -> clusters of {model.recipe.name}, epoch {model.epoch}{state}"
          + (f" -> {args.out}" if args.out else ""), file=sys.stderr)
    return 0


def _check_output_file(path: Path) -> None:
    """``predict --out``: a file that can be written, checked before the model is loaded."""
    from .errors import RunDirError

    if path.is_dir():
        raise RunDirError(f"--out '{path}' is a folder; pass the CSV file to write, e.g. {path / 'preds.csv'}.")
    if not path.parent.is_dir():
        raise RunDirError(f"Cannot write --out '{path}': its folder '{path.parent}' does not exist. Create it "
                          "first, or pass another path.")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise RunDirError(f"Cannot write --out '{path}': permission denied. Pass a path in a folder you can "
                          "write to.")
    import tempfile

    try:  # what the CSV's temporary file will need (root passes os.access, not a read-only file system or /proc)
        fd, probe = tempfile.mkstemp(prefix=".clusterkit-write-check-", dir=path.parent)
    except OSError as exc:
        raise RunDirError(f"Cannot write --out '{path}': writing in '{path.parent}' fails "
                          f"({exc.strerror or type(exc).__name__}); nothing was computed. Pass a path in a folder "
                          "you can write to.") from None
    os.close(fd)
    os.unlink(probe)


def cmd_show(args) -> int:
    from .show import show_run

    show_run(args.run_dir, args.base)
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that the run directory's lock is released and
    the message printed as for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def cmd_choose_k(args) -> int:
    from .choose_k import choose_k, parse_ks

    ks = parse_ks(args.k)
    res = choose_k(args.run_dir, ks, out=args.out, criterion=args.criterion, n_init=args.n_init, force=args.force,
                   device=args.device)
    model = res["model"]
    print(f"choose-k: {model.recipe.name} (epoch {model.epoch}), spherical k-means (n_init {args.n_init}) on the "
          f"final features of {res['num_images']} images, K = {ks[0]}..{ks[-1]} "
          f"(the run used K = {model.num_clusters})")
    print(res["table"])
    print(f"\n{res['recommendation'].text()}")
    for path in res["files"]:
        print(path)
    return 0


def cmd_export(args) -> int:
    from .export import export_run

    res = export_run(args.run_dir, args.to, args.mode or "link", args.top, args.device)
    sizes = res["sizes"]
    total = sum(sizes.values())
    shown = ", ".join(f"{c}: {n}" for c, n in sizes.items())
    print(f"clusterkit: {total} images of {res['model'].recipe.name} in {len(sizes)} clusters -> {res['to']} "
          f"({res['exported']} {res['files_from']}{f', top {args.top} per cluster' if args.top else ''}); "
          f"cluster sizes {shown}; every image's cluster and confidence: {res['csv']}")
    return 0


def main(argv=None) -> int:
    import signal
    import threading

    args = _parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return _main(args)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(args) -> int:
    try:
        return {"run": cmd_run, "plugins": cmd_plugins, "new-plugin": cmd_new_plugin, "compare": cmd_compare,
                "plot": cmd_plot, "predict": cmd_predict, "show": cmd_show, "choose-k": cmd_choose_k,
                "export": cmd_export}[args.command](args)
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
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, _Terminated)
        what = "terminated (SIGTERM)" if terminated else "interrupted"
        if getattr(args, "run_started", False):
            print(f"clusterkit: {what}; resume with --resume RUN_DIR (the last checkpoint is kept)", file=sys.stderr)
        elif args.command == "run":
            print(f"clusterkit: {what} before the run started (while the recipe was read and checked); nothing "
                  "was trained and no run directory was written. Run the same command again.", file=sys.stderr)
        else:
            print(f"clusterkit: {what}; {args.command} stopped before it finished.", file=sys.stderr)
        return 143 if terminated else 130
    except BrokenPipeError:  # the reader went away (clusterkit plugins | head): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        return 0
    except OSError as exc:  # after BrokenPipeError, an OSError too
        if args.debug or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # a write outside the checkpoint's own (metrics.jsonl, an exported file): same words
        where = f" writing '{exc.filename}'" if exc.filename else ""
        print(textwrap.fill(f"clusterkit: error: The disk is full{where} ({exc.strerror}). Free some space there, "
                            "then run the command again (a run continues from its last checkpoint with --resume "
                            "RUN_DIR).", 100, break_on_hyphens=False, break_long_words=False), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
