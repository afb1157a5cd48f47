"""Sorted output: ``clusterkit export RUN_DIR --to DIR [--link | --copy] [--top N]``.

The run's model assigns every image of its evaluation data to a cluster with the run's own
prediction rule (``fit=False``, as ``clusterkit predict``: the final k-means centres, or the
cluster head), and the images are laid out as::

    DIR/cluster_00/0001_<name>.png     most confident first: 0001 is the most confident image
    DIR/cluster_00/0002_<name>.jpg
    DIR/cluster_01/...
    DIR/assignments.csv                path, cluster, confidence, rank, exported (every image)

``--link`` (the default) makes symbolic links to the original files (absolute paths, no
space used), ``--copy`` copies them.  Datasets stored in array files (digits, Fashion-MNIST,
CIFAR, STL-10) have no image files: their images are written as PNG files
(``<rank>_<index>.png``), and ``path`` in the CSV is ``<dataset>[<index>]``.  ``--top N`` exports
only each cluster's N most confident images (the CSV still lists every image).  ``DIR`` must
not exist or be empty, and must not lie inside the run's data folder (the next run would read
the exported images as more data): nothing is ever overwritten.  ``assignments.csv`` is written
whole or not at all, and a file name that is not valid UTF-8 is kept byte for byte
(:mod:`clusterkit.outputs` says how to read such a name back).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import DataError, RunDirError
from .outputs import check_output_folder, write_csv

__all__ = ["export_run", "MODES"]

MODES = ("link", "copy")


def _check_target(to: Path, data_root: str | None = None) -> None:
    if to.exists() and not to.is_dir():
        raise RunDirError(f"The export target '{to}' exists and is a file, not a folder; nothing was written. Pass "
                          "--to a new folder.")
    if to.is_dir() and any(to.iterdir()):
        raise RunDirError(f"The export target '{to}' already exists and is not empty; nothing was written or "
                          "overwritten. Pass --to a new (or empty) folder, or delete the old export first.")
    if data_root is not None:
        root, target = Path(data_root).resolve(), to.resolve()
        if target == root or root in target.parents:
            raise RunDirError(f"The export target '{to}' lies inside the run's data folder '{data_root}'; the next "
                              "run on that folder would read the exported images as more data. Pass --to a folder "
                              "outside it.")


def _png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    array = image.numpy()
    array = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
    Image.fromarray(np.ascontiguousarray(array)).save(path)


def export_run(run_dir: str | os.PathLike, to: str | os.PathLike, mode: str = "link", top: int | None = None,
               device: str | None = None, progress: bool = True) -> dict:
    """Write the run's evaluation images into one folder per cluster (see the module doc).

    Returns ``{"sizes": {cluster: n}, "exported": n files, "to": Path, "csv": Path,
    "files_from": "links" | "copies" | "PNG"}``.  Raises RunDirError for an existing non-empty
    target (or one inside the data folder) and DataError for a bad ``top`` or ``mode``.
    """
    from .inference import load

    if mode not in MODES:
        raise DataError(f"Unknown export mode '{mode}'; use --link (symbolic links) or --copy.")
    if top is not None and top < 1:
        raise DataError(f"--top must be at least 1 (the most confident images per cluster), got {top}.")
    to = Path(to)
    _check_target(to)  # before anything is loaded
    check_output_folder(to, "--to")
    model = load(run_dir, device)
    d = model.recipe.data
    _check_target(to, d.root if d.dataset == "imagefolder" else None)
    ds = model.eval_dataset()
    feats = model.embed_dataset(ds, progress=progress)
    pred = model.predict_features(feats, fit=False)
    labels, conf = pred.labels.long().cpu(), pred.confidence.float().cpu()
    k = max(model.num_clusters, int(labels.max()) + 1)
    rank, sizes = _rank_in_clusters(labels, conf, k)
    files = ds.paths
    todo = [i for i in range(len(ds)) if top is None or int(rank[i]) <= top]
    exported = _write_clusters(ds, to, labels, rank, sizes, todo, mode, progress)
    how = "PNG" if files is None else {"link": "links", "copy": "copies"}[mode]
    csv_path = write_csv(to / "assignments.csv", ["path", "cluster", "confidence", "rank", "exported"],
                         ([os.fsdecode(files[i]) if files is not None else f"{ds.name}[{i}]", int(labels[i]),
                           f"{float(conf[i]):.6f}", int(rank[i]), exported[i]] for i in range(len(ds))))
    return {"sizes": sizes, "exported": len(todo), "to": to, "csv": csv_path, "files_from": how,
            "model": model}


def _rank_in_clusters(labels: torch.Tensor, conf: torch.Tensor, k: int) -> tuple[torch.Tensor, dict[int, int]]:
    """``(rank of each image in its cluster, 1 = most confident; {cluster: size})``."""
    rank = torch.empty_like(labels)
    sizes: dict[int, int] = {}
    for c in range(k):
        members = torch.nonzero(labels == c).flatten()
        sizes[c] = len(members)
        order = members[torch.argsort(-conf[members], stable=True)]
        rank[order] = torch.arange(1, len(order) + 1)
    return rank, sizes


def _write_clusters(ds, to: Path, labels: torch.Tensor, rank: torch.Tensor, sizes: dict[int, int],
                    todo: list[int], mode: str, progress: bool) -> list[str]:
    """The ``cluster_NN/`` folders (one per cluster of ``sizes``) with the images of ``todo``
    (links, copies or PNG files); returns each image's exported path relative to ``to`` ("" for
    one left out)."""
    k = len(sizes)
    width = max(2, len(str(k - 1)))
    digits = max(4, len(str(max(sizes.values(), default=1))))
    files = ds.paths
    to.mkdir(parents=True, exist_ok=True)
    for c in range(k):
        (to / f"cluster_{c:0{width}d}").mkdir()
    exported = [""] * len(ds)
    for i in tqdm(todo, desc=f"exporting {len(todo)} images", unit="img", leave=False, disable=not progress):
        folder = to / f"cluster_{int(labels[i]):0{width}d}"
        if files is None:
            target = folder / f"{int(rank[i]):0{digits}d}_{i:05d}.png"
            _png(ds[i][0], target)
        else:
            source = Path(files[i])
            target = folder / f"{int(rank[i]):0{digits}d}_{source.name}"
            _place(source, target, mode)
        exported[i] = str(target.relative_to(to))
    return exported


def _place(source: Path, target: Path, mode: str) -> None:
    """``target`` as a copy of ``source`` or a symbolic link to it (absolute)."""
    if mode == "copy":
        shutil.copy2(source, target)
        return
    try:
        os.symlink(source.resolve(), target)
    except OSError as exc:
        raise RunDirError(f"Cannot make the symbolic link '{target}' ({exc}); this file system may not "
                          "support links. Delete the partial export and rerun with --copy.") from None
