"""Image folders (``data.dataset: imagefolder``): finding the image files of a split (class
folders or any tree, symlink loops and special files skipped, duplicates kept once) and
decoding them on a thread pool into RGB squares, or checking them for lazy decoding."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from clusterkit.data.dataset import ImageDataset, LazyImages
from clusterkit.data.decode import check_image, decode_image, special_file_kind
from clusterkit.data.registry import IMAGE_EXTENSIONS, ROOT_HINT, DatasetInfo
from clusterkit.errors import DataError
from clusterkit.errors import warn as _warn

__all__ = ["read_imagefolder", "scan_imagefolder"]


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _class_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_files(folder: Path, loops: list[str] | None = None,
                 special: list[tuple[str, str]] | None = None) -> list[str]:
    """Image files under ``folder``, recursively, following directory symlinks except those
    that lead back to a folder already on the way (a loop such as ``ln -s .. loop``, which
    would otherwise repeat the tree); those are appended to ``loops``.  Entries with an image
    name that are not regular files (FIFOs, sockets, devices: :func:`special_file_kind`) are
    left out, never opened, and appended to ``special`` as ``(path, kind)``."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = os.path.realpath(dirpath)
        keep = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            link = os.path.join(dirpath, d)
            target = os.path.realpath(link)
            if os.path.islink(link) and (here == target or here.startswith(target.rstrip(os.sep) + os.sep)
                                         or target == os.path.realpath(folder)):
                if loops is not None:
                    loops.append(link)
                continue
            keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            if not _is_image(f):
                continue
            path = os.path.join(dirpath, f)
            kind = special_file_kind(path)
            if kind is None:
                files.append(path)
            elif special is not None:
                special.append((path, kind))
    return files


def _drop_duplicates(paths: list[str], targets: list[int]) -> tuple[list[str], list[int]]:
    """Keep the first of files reached through more than one path (symlinks), with a warning."""
    seen: dict[str, str] = {}
    kept_paths, kept_targets, twice = [], [], []
    for path, target in zip(paths, targets, strict=True):
        real = os.path.realpath(path)
        if real in seen:
            twice.append((seen[real], path))
            continue
        seen[real] = path
        kept_paths.append(path)
        kept_targets.append(target)
    if twice:
        first, again = twice[0]
        _warn(f"{len(twice)} image file(s) were found twice through symbolic links (e.g. '{first}' and "
              f"'{again}'); each is used once, under the first path found.")
    return kept_paths, kept_targets


def _walk_trees(trees: Sequence[tuple[Path, int]]) -> tuple[list[str], list[int], list[Path]]:
    """The image files of every ``(folder, target)`` tree, labelled (a class folder and its class)
    or not (a split folder and -1) alike: symlink loops are not followed, entries that are not
    regular files are skipped, a file reached twice through symlinks is kept once, each with one
    warning.  Returns ``(paths, targets, folders that hold no image file)``."""
    loops: list[str] = []
    special: list[tuple[str, str]] = []
    paths: list[str] = []
    targets: list[int] = []
    empty: list[Path] = []
    for folder, target in trees:
        files = _image_files(folder, loops, special)
        if not files:
            empty.append(folder)
        paths.extend(files)
        targets.extend([target] * len(files))
    if loops:
        _warn(f"{len(loops)} symbolic link(s) to a folder above them were not followed (they loop back into the "
              f"tree, e.g. '{loops[0]}').")
    if special:
        path, kind = special[0]
        if len(special) == 1:
            _warn(f"'{path}' is not a regular file (it is {kind}); it was skipped without being opened.")
        else:
            _warn(f"{len(special)} entries named like images are not regular files and were skipped without being "
                  f"opened (e.g. '{path}' is not a regular file: it is {kind}).")
    paths, targets = _drop_duplicates(paths, targets)
    return paths, targets, empty


def _split_folders(info: DatasetInfo, root: Path, split: str) -> tuple[list[Path], list[Path]]:
    """``(folders of split, folders of every split)``, each holding ``<class>/<image>`` trees."""
    train = root / "train"
    test = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not train.is_dir():
        if test is not None:
            raise DataError(
                f"Dataset 'imagefolder': '{root}' has a '{test.name}/' folder but no 'train/' folder. "
                f"Either add ROOT/train/<class>/<image> next to it, or point data.root at "
                f"'{test}' to use it alone. {info.prepare}."
            )
        if split == "test":
            raise DataError(
                f"Dataset 'imagefolder': '{root}' has no train/ and test/ (or val/) subfolders, so "
                "the whole folder is the train split and there is no test split. Use split 'train' "
                "or 'all', or arrange the images as ROOT/train/<class>/<image> and "
                "ROOT/test/<class>/<image>."
            )
        return [root], [root]
    everything = [train] if test is None else [train, test]
    if split == "test" and test is None:
        raise DataError(
            f"Dataset 'imagefolder': '{root}' has a train/ folder but no test/ or val/ folder, so "
            "there is no test split. Use split 'train' or 'all', or add ROOT/test/<class>/<image>."
        )
    return {"train": [train], "test": [test], "all": everything}[split], everything


def _direct_images(folder: Path) -> list[str]:
    """Image files directly in ``folder`` (not in its sub-folders), sorted."""
    return sorted(str(p) for p in folder.iterdir() if p.is_file() and _is_image(p.name))


def scan_imagefolder(
    info: DatasetInfo, root: Path, split: str, labels: str = "folders"
) -> tuple[list[str] | None, list[str], list[int] | None]:
    """``(classes, paths, targets)`` of the image files of ``split``; ``classes`` and
    ``targets`` are None when the images are read as unlabeled (``labels``: see the module doc)."""
    folders, everything = _split_folders(info, root, split)
    if labels == "auto":
        # class folders when every image sits in one: no image directly in a split folder
        loose = any(_direct_images(f) for f in everything)
        labels = "none" if loose or not any(_class_dirs(f) for f in everything) else "folders"
    if labels == "none":
        paths, _, _ = _walk_trees([(folder, -1) for folder in folders])
        if not paths:
            where = " or ".join(f"'{f}'" for f in folders)
            raise DataError(
                f"Dataset 'imagefolder': {where} holds no image files: it contains no class folders and "
                f"no images, at any depth (accepted extensions: {' '.join(IMAGE_EXTENSIONS)}, any case; "
                "names starting with a dot are ignored). Point data.root at the folder that holds your "
                f"images. {ROOT_HINT}"
            )
        return None, paths, None
    # Classes are the union over all split folders, so that a target means the
    # same class whichever split is loaded.
    classes = sorted(set().union(*(_class_dirs(f) for f in everything)))
    trees: list[tuple[Path, int]] = []
    for folder in folders:
        present = _class_dirs(folder)
        if not present:
            raise DataError(
                f"Dataset 'imagefolder': '{folder}' contains no class folders (data.labels: folders needs "
                f"one sub-folder per class with the images inside; use data.labels: none or auto to "
                f"cluster the images without labels). {info.prepare}. {ROOT_HINT}"
            )
        trees.extend((folder / cls, classes.index(cls)) for cls in present)
    paths, targets, empty = _walk_trees(trees)
    if empty:
        raise DataError(
            f"Dataset 'imagefolder': the class folder '{empty[0]}' holds no image files "
            f"(accepted extensions: {' '.join(IMAGE_EXTENSIONS)}, any case). Put the class's "
            "images in it or delete the empty folder."
        )
    return classes, paths, targets


def read_imagefolder(
    info: DatasetInfo, root: Path, split: str, image_size: int, *, cache: bool, skip_corrupt: bool,
    labels: str = "auto", progress: bool = True,
) -> ImageDataset:
    """Decode ``ROOT[/split]/<class>/<image>`` files (or, unlabeled, any tree of image files)
    to RGB ``image_size`` squares."""
    classes, paths, targets = scan_imagefolder(info, root, split, labels)
    errors, images = _decode_all(paths, image_size, cache, progress)
    bad = [i for i, err in enumerate(errors) if err is not None]
    keep = [i for i, err in enumerate(errors) if err is None]
    _check_readable(info, root, paths, errors, bad, keep, skip_corrupt)
    skipped = [paths[i] for i in bad]
    kept_targets = [targets[i] for i in keep] if targets is not None else None
    kept_paths = [paths[i] for i in keep]
    if images is not None:
        data: torch.Tensor | LazyImages = images[keep] if bad else images
    else:
        data = LazyImages(kept_paths, image_size)
    return ImageDataset("imagefolder", split, classes or [], kept_targets, info, data, root=str(root),
                        skipped=skipped, paths=kept_paths)


def _decode_all(paths: list[str], image_size: int, cache: bool,
                progress: bool) -> tuple[list[str | None], torch.Tensor | None]:
    """Every file on a thread pool: decoded into one ``uint8 (N, 3, S, S)`` tensor (``cache``), or
    only checked (its header) for lazy decoding.  Returns ``(error or None per file, images or None)``."""
    errors: list[str | None] = [None] * len(paths)
    images = torch.empty((len(paths), 3, image_size, image_size), dtype=torch.uint8) if cache else None
    workers = min(16, os.cpu_count() or 1)
    desc = f"{'decoding' if cache else 'checking'} {len(paths)} images"
    with ThreadPoolExecutor(workers) as pool:
        if images is not None:
            results = pool.map(lambda p: decode_image(p, image_size), paths)
            for i, (array, err) in enumerate(tqdm(results, total=len(paths), desc=desc, leave=False,
                                                  disable=not progress)):
                errors[i] = err
                if array is not None:
                    images[i] = torch.from_numpy(array).permute(2, 0, 1)
        else:
            errors = list(tqdm(pool.map(check_image, paths), total=len(paths), desc=desc, leave=False,
                               disable=not progress))
    return errors, images


def _check_readable(info: DatasetInfo, root: Path, paths: list[str], errors: list[str | None], bad: list[int],
                    keep: list[int], skip_corrupt: bool) -> None:
    """DataError for an unreadable file (unless ``skip_corrupt``), for no readable file, or for
    fewer than two."""
    if bad and not skip_corrupt:
        i = bad[0]
        more = f" ({len(bad) - 1} more unreadable files follow)" if len(bad) > 1 else ""
        raise DataError(
            f"Dataset 'imagefolder': cannot read image '{paths[i]}' ({errors[i]}){more}. Remove or "
            "replace the corrupt file, or load with skip_corrupt=True to drop unreadable files "
            "(they are then listed in the dataset's 'skipped' attribute)."
        )
    if len(bad) == len(paths):
        raise DataError(
            f"Dataset 'imagefolder': none of the {len(paths)} image files under '{root}' could be "
            f"read (first: '{paths[0]}': {errors[0]}). Check that the files are real images. "
            f"{info.prepare}."
        )
    if len(keep) < 2:
        only = paths[keep[0]] if keep else paths[0]
        raise DataError(
            f"Dataset 'imagefolder': '{root}' holds only one readable image ('{only}'), and clustering "
            "needs at least two (and at least e_step.k, the number of clusters). Add images to the folder "
            "or point data.root at a folder that holds more."
        )
