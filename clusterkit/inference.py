"""Using a finished run: ``clusterkit.load(run_dir)`` -> a model that embeds and predicts.

The model is rebuilt from the run's last checkpoint exactly as it trained (the plugins'
``setup`` runs, then the weights and the plugins' saved state are loaded); nothing is
trained and no training data is read.  Images go through the run's evaluation transform
(resize to ``data.image_size``, normalise with the dataset's statistics), and
predictions come from the method's own rule with ``fit=False``: k-means methods assign
to the centres of the run's final evaluation (confidence: cosine to the centre), a
cluster head takes its argmax (confidence: the maximum probability).

Example::

    >>> import clusterkit
    >>> model = clusterkit.load("runs/quickstart/20250101-120000")       # doctest: +SKIP
    >>> pred = model.predict(images)          # uint8 (B, C, H, W), or image paths
    >>> pred.labels, pred.confidence          # (B,) int64, (B,) float
    >>> feats = model.embed(images)           # (B, D) float, the features it clusters

Accepted images: a ``torch.Tensor`` or numpy array of raw images, ``uint8`` in 0..255 or
float in [0, 1], shaped (B, C, H, W) (channels first), (B, H, W) (B grayscale images) or
(H, W) (one image); a list of images each shaped (C, H, W) or (H, W), of PIL images or of
image file paths; a file path or a folder (searched recursively for image files; only regular
files are read, and they are decoded as the training data is: EXIF orientation applied, 16-bit
scaled to 8 bits, shrunk to the run's size as they are read).
Channels-last arrays ((H, W, C), (B, H, W, C)) are an error naming the transpose to use, and
so is a 3-D array with 3 or 4 rows for a colour run (one (C, H, W) image or several
grayscale ones?): pass ``x[None]`` for one colour image.  Images with 3 channels are converted to grayscale for a
1-channel run (ITU-R 601 luma, as PIL's ``"L"``) and 1-channel images are repeated for a
3-channel run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .checkpoint import restore_training_state
from .data import DATASETS, IMAGE_EXTENSIONS, eval_transform
from .data.datasets import NotRegularFileError, decode_image_file, fit_square, special_file_kind, to_8bit
from .engine.evaluation import Evaluator
from .engine.setup import BuiltModel, build_model, inference_device, load_plugin_set
from .errors import DataError, RunDirError
from .errors import warn as _warn
from .rundir import CHECKPOINTS, CONTENTS, RunDir
from .state import Prediction

__all__ = ["ClusterModel", "load", "rebuild", "find_images", "read_image"]

_LUMA = (0.299, 0.587, 0.114)


def rebuild(recipe, ckpt: dict, channels: int, num_train: int, device: torch.device) -> BuiltModel:
    """A checkpoint's model and plugins, built without data, optimiser or training.

    The model is built as training builds it (:func:`~clusterkit.engine.setup.build_model`: the
    plugins' ``setup`` and ``register_outputs`` run), without pretrained weights; then the
    checkpoint is loaded by the one loading path ``--resume`` uses too
    (:func:`~clusterkit.checkpoint.restore_training_state`), and the model is left in eval mode.
    ``channels``: the dataset's image channels."""
    steps = max(1, ckpt["step"] // (ckpt["epoch"] + 1))
    built = build_model(recipe, load_plugin_set(recipe), device, channels, num_train, steps, pretrained=False)
    restore_training_state(built.state, built.plugin_set.plugins, built.core_predictor, ckpt)
    built.state.model.eval()
    return built


def _run_files(run_dir: Path) -> tuple[Path, dict, dict | None]:
    """The run's newest readable checkpoint (path, contents) and its summary (None while
    unfinished); RunDirError if there is none."""
    if not run_dir.is_dir():
        raise RunDirError(f"Run directory '{run_dir}' does not exist. Pass the folder a run wrote (it holds "
                          f"{CONTENTS}), e.g. runs/quickstart/<time>.")
    found = RunDir(run_dir).load_latest_checkpoint()
    if found is None:
        raise RunDirError(f"Run directory '{run_dir}' holds no checkpoint ({CHECKPOINTS}/epoch_*.pt), so there is "
                          "no model to load. A run writes its first checkpoint at the end of its first epoch; "
                          "train it (clusterkit run RECIPE --out DIR) or pass another run directory.")
    return *found, RunDir(run_dir).read_summary()


class ClusterModel:
    """A finished (or checkpointed) run's model: :meth:`embed` and :meth:`predict` new images.

    Attributes:
        run_dir: the run directory; checkpoint: the checkpoint file loaded; epoch: its
            epoch (1-based, as the logs count); finished: whether summary.json exists.
        recipe: the run's resolved :class:`~clusterkit.recipe.Recipe`.
        info: the dataset's :class:`~clusterkit.data.DatasetInfo` (channels, mean, std).
        image_size: the side the evaluation transform resizes to.
        num_clusters: K.
        device: where the model runs.
        state: the rebuilt :class:`~clusterkit.state.TrainState` (``state.model``: the backbone
            and the plugins' modules, in eval mode); plugins: {recipe name: plugin instance},
            with the checkpoint's state.
        evaluator: the :class:`~clusterkit.engine.evaluation.Evaluator` that embeds and predicts,
            the one a training run evaluates with.
    """

    def __init__(self, run_dir: str | os.PathLike, device: str | None = None):
        from .recipe import load_recipe

        self.run_dir = Path(run_dir)
        self.checkpoint, ckpt, self.summary = _run_files(self.run_dir)
        self.recipe = load_recipe(data=ckpt["recipe"])
        dataset = self.recipe.data.dataset
        if dataset not in DATASETS:
            raise RunDirError(f"Run '{self.run_dir}' was trained on dataset '{dataset}', which this clusterkit "
                              f"does not know (known: {', '.join(DATASETS)}).")
        self.info = DATASETS[dataset]
        self.image_size = self.recipe.data.image_size
        self.num_clusters = self.recipe.e_step.k
        self.epoch = ckpt["epoch"] + 1
        self.finished = self.summary is not None
        num_train = self.summary["num_train"] if self.summary else (
            len(ckpt["pseudo_labels"]) if torch.is_tensor(ckpt.get("pseudo_labels")) else 0)
        self.device = inference_device(self.recipe, device)
        built = rebuild(self.recipe, ckpt, self.info.channels, num_train, self.device)
        self.state, self.plugins = built.state, built.plugin_set.plugins
        self.evaluator: Evaluator = built.evaluator

    def __repr__(self) -> str:
        state = "finished" if self.finished else "unfinished"
        return (f"<ClusterModel {self.recipe.name!r} from '{self.run_dir}' (epoch {self.epoch}, {state}), "
                f"K={self.num_clusters}, {self.info.channels}x{self.image_size}x{self.image_size} inputs>")

    # -- inputs ------------------------------------------------------------------------------------
    def to_images(self, images: Any) -> list[torch.Tensor]:
        """Any accepted input -> a list of raw images, each float (C, H, W) in [0, 1] with the
        run's channel count (sizes may differ; the transform resizes them)."""
        if isinstance(images, (str, os.PathLike)):
            images = find_images([images])
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        if torch.is_tensor(images):
            items = list(self._as_batch(images))
        else:
            items = list(images)
        out = []
        for item in items:
            if isinstance(item, (str, os.PathLike)) and self.recipe.data.dataset == "imagefolder":
                item = read_image(item, self.info.channels,  # as the dataset decodes
                                  resize_to=self.recipe.data.decode_size or self.image_size)
            elif isinstance(item, (str, os.PathLike)):
                # shrunk to the evaluation size as it is read: a photo is never held at full size
                item = read_image(item, self.info.channels, resize_to=self.image_size, shrink_only=True)
            elif hasattr(item, "convert") and hasattr(item, "size"):  # a PIL image
                item = _pil_to_tensor(item, self.info.channels, shrink_to=self.image_size)
            elif isinstance(item, np.ndarray):
                item = torch.from_numpy(np.ascontiguousarray(item))
            if not torch.is_tensor(item):
                raise DataError(f"Cannot read an image from a {type(item).__name__}; pass tensors, numpy arrays, "
                                "PIL images or image file paths.")
            if item.dim() == 2:
                item = item[None]
            out.append(self._channels(_as_unit_float(item)))
        if not out:
            raise DataError("No images were given to embed or predict.")
        return out

    def _as_batch(self, x: torch.Tensor) -> torch.Tensor:
        """An array of images as (N, C, H, W): (N, C, H, W) as it is, (N, H, W) as N grayscale images,
        (H, W) as one.  Channels-last shapes and a 3-D array that could be one colour image or
        several grayscale ones are an error naming the reshape to use."""
        shape = tuple(x.shape)
        if x.dim() == 2:
            return x[None, None]
        if x.dim() == 3:
            if shape[-1] in (3, 4) and min(shape[:2]) > 4:
                raise DataError(f"Images of shape {shape} look like one channels-last (H, W, C) image; clusterkit "
                                "takes (N, C, H, W), (N, H, W) or (H, W). Pass x.permute(2, 0, 1)[None] (torch) or "
                                "x.transpose(2, 0, 1)[None] (numpy).")
            if shape[0] in (3, 4) and self.info.channels > 1:
                raise DataError(f"Images of shape {shape} are ambiguous: {shape[0]} grayscale (N, H, W) images, or "
                                "one (C, H, W) colour image? A 3-D array is read as (N, H, W); pass x[None] for one "
                                "colour image, or x[:, None] to say they are grayscale images.")
            return x[:, None]
        if x.dim() == 4:
            if shape[1] not in (1, 3, 4) and shape[-1] in (1, 3, 4):
                raise DataError(f"Images of shape {shape} look channels-last (N, H, W, C); clusterkit takes "
                                "(N, C, H, W). Pass x.permute(0, 3, 1, 2) (torch) or x.transpose(0, 3, 1, 2) (numpy).")
            return x
        raise DataError(f"Images must be shaped (N, C, H, W), (N, H, W) or (H, W), got an array of shape {shape}.")

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        want, have = self.info.channels, x.shape[0]
        if have == want:
            return x
        if want == 1 and have in (3, 4):
            return (x[:3] * torch.tensor(_LUMA, dtype=x.dtype)[:, None, None]).sum(0, keepdim=True)
        if want == 3 and have == 1:
            return x.expand(3, -1, -1)
        if want == 3 and have == 4:
            return x[:3]
        raise DataError(f"Images with {have} channels cannot be used with this run, which takes {want}-channel "
                        "images; pass grayscale (1 channel) or RGB (3 channels) images.")

    def transform(self, images: Any) -> torch.Tensor:
        """The evaluation transform: float (B, C, S, S), resized and normalised as in training."""
        size, info = self.image_size, self.info
        items = self.to_images(images)
        if all(x.shape == items[0].shape for x in items):  # one batch
            return eval_transform(torch.stack(items), size, info)
        return torch.cat([eval_transform(x[None], size, info) for x in items])

    # -- model -------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, images: Any, batch_size: int | None = None) -> torch.Tensor:
        """Features (B, D) of ``images`` (CPU float32): the ``embed`` hook in eval mode, in
        batches of ``data.eval_batch_size`` as the run's evaluation."""
        x = self.transform(images)
        bs = batch_size or self.recipe.data.eval_batch_size
        return torch.cat([self.evaluator.embed(x[start:start + bs].to(self.device)).float().cpu()
                          for start in range(0, len(x), bs)])

    def eval_dataset(self):
        """The run's evaluation data (``data.eval_split``, or the training split), read as the run
        read it (same root, image size and ``data.labels``): an :class:`~clusterkit.data.ImageDataset`."""
        from .data import load_dataset

        d = self.recipe.data
        return load_dataset(d.dataset, d.root, d.eval_split or d.split, d.decode_size or d.image_size, cache=d.cache,
                            skip_corrupt=d.skip_corrupt, labels=d.labels)

    @torch.no_grad()
    def embed_dataset(self, ds, batch_size: int | None = None, progress: bool = True) -> torch.Tensor:
        """Features (N, D) of every image of the :class:`~clusterkit.data.ImageDataset` ``ds``, in
        order, on the model's device: the run's evaluation transform and ``embed`` hook, in batches
        of ``data.eval_batch_size`` (a progress bar on stderr with ``progress``), as the run's
        evaluation embedded its data (:meth:`~clusterkit.engine.evaluation.Evaluator.embed_dataset`,
        ``eval.bn`` included)."""
        return self.evaluator.embed_dataset(ds, batch_size, progress=progress)

    @torch.no_grad()
    def predict(self, images: Any, batch_size: int | None = None) -> Prediction:
        """Cluster and confidence of each image by the run's own prediction rule (``fit=False``:
        assign to the final evaluation's k-means centres, or the cluster head's argmax).

        Returns :class:`~clusterkit.state.Prediction` with ``labels`` (B,) int64 in
        ``0..K-1`` and ``confidence`` (B,) float, on the CPU.
        """
        feats = self.embed(images, batch_size).to(self.device)
        pred = self.predict_features(feats, fit=False)
        return Prediction(pred.labels.long().cpu(), pred.confidence.float().cpu())

    def predict_features(self, features: torch.Tensor, fit: bool = False) -> Prediction:
        """Cluster and confidence of features (N, D) (from :meth:`embed` or :meth:`embed_dataset`),
        on the model's device, by the run's prediction rule: ``fit=False`` applies the rule as
        the run kept it, ``fit=True`` fits it to these features first (as the run's evaluation
        did).  Returns :class:`~clusterkit.state.Prediction` (labels (N,), confidence (N,))."""
        return self.evaluator.predict(features.to(self.device), fit=fit)


def load(run_dir: str | os.PathLike, device: str | None = None) -> ClusterModel:
    """Load a run's model from its last checkpoint (see :class:`ClusterModel`).

    ``device``: "cpu", "cuda", ...; default: CUDA when present (unless the recipe's ``run.device``
    is cpu), else the CPU, whatever device the run trained on.
    Raises RunDirError when ``run_dir`` is not a run directory or holds no checkpoint.
    """
    return ClusterModel(run_dir, device)


# -- reading image files ---------------------------------------------------------------------------

def find_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (searched recursively, sorted) into image files.

    Only regular files (or symbolic links to them) are taken: in a folder, entries with an
    image name that are FIFOs, sockets or devices are skipped unopened, with a warning.
    Raises DataError for a path that does not exist, a named path that is not a regular
    file or folder, a file that is not an image, or a folder without images."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        kind = special_file_kind(path)
        if path.is_dir():
            named = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir())
            special = [(p, k) for p in named if (k := special_file_kind(p)) is not None]
            files = [p for p in named if p.is_file()]
            if special:
                first, what = special[0]
                _warn(f"{len(special)} entr{'y' if len(special) == 1 else 'ies'} under '{path}' named like an image "
                      f"{'is not a regular file' if len(special) == 1 else 'are not regular files'} and "
                      f"{'was' if len(special) == 1 else 'were'} skipped without being opened (e.g. '{first}' is "
                      f"not a regular file: it is {what}).")
            if not files:
                raise DataError(f"Folder '{path}' holds no image files (looked for {' '.join(IMAGE_EXTENSIONS)}, "
                                "recursively). Pass image files or a folder that holds some.")
            found += files
        elif kind is not None:
            raise DataError(f"Image path '{path}' is not a regular file: it is {kind}, which is never opened "
                            "(reading one could wait forever). Pass image files or folders of them.")
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise DataError(f"'{path}' is not an image file (expected one of {' '.join(IMAGE_EXTENSIONS)}). "
                                "Pass PNG/JPEG image files or folders of them.")
            found.append(path)
        else:
            raise DataError(f"Image path '{path}' does not exist. Check the path; folders are searched "
                            "recursively for image files.")
    if not found:
        raise DataError("No image paths were given; pass image files or folders.")
    return found


def _pil_to_tensor(im, channels: int, shrink_to: int | None = None) -> torch.Tensor:
    """A PIL image -> uint8 (channels, H, W), 16-bit images scaled to 8 bits (as files are
    decoded); ``shrink_to``: resized to that square first when it is larger."""
    im = fit_square(to_8bit(im, "L" if channels == 1 else "RGB"), shrink_to, shrink_only=True)
    array = np.array(im, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def read_image(path: str | os.PathLike, channels: int, resize_to: int | None = None, *,
               shrink_only: bool = False) -> torch.Tensor:
    """Decode an image file to uint8 (channels, H, W) (grayscale "L" or RGB); DataError if unreadable
    or not a regular file.

    The decoder is the training data's (:func:`~clusterkit.data.datasets.decode_image_file`): the
    EXIF orientation is applied and 16-bit images are scaled to 8 bits.  ``resize_to``: resize to a
    square of that side with PIL's bilinear filter while decoding, as the ``imagefolder`` dataset
    decodes its files (``shrink_only``: only when the image is larger)."""
    try:
        array = decode_image_file(path, "L" if channels == 1 else "RGB", resize_to, shrink_only=shrink_only)
    except FileNotFoundError:
        raise DataError(f"Image file '{path}' does not exist.") from None
    except NotRegularFileError as exc:
        raise DataError(f"Image path '{path}' is {exc}, which is never opened (reading one could wait "
                        "forever). Pass image files or folders of them.") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure means an unreadable file
        raise DataError(f"Cannot read image '{path}' ({type(exc).__name__}: {exc}). Remove or replace the "
                        "file, or leave it out of --images.") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _as_unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 or float 0..1 -> float32 in [0, 1]; DataError for normalised input."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    if x.dtype == torch.bool or not (x.is_floating_point() or x.dtype in (torch.int16, torch.int32, torch.int64)):
        raise DataError(f"Images must be uint8 (0..255) or float (0..1) tensors, got dtype {x.dtype}.")
    if not x.is_floating_point():
        if x.numel() and (int(x.min()) < 0 or int(x.max()) > 255):
            raise DataError("Integer images must hold values in 0..255.")
        return x.to(torch.float32).div_(255.0)
    x = x.to(torch.float32)
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise DataError(f"Float images must hold finite pixel values in [0, 1], but {bad} value(s) are NaN or "
                        "infinite. Replace them before predicting (e.g. torch.nan_to_num(x, 0.0)), or pass the "
                        "images as uint8 0..255.")
    if x.numel() and (float(x.min()) < -1e-3 or float(x.max()) > 1 + 1e-3):
        raise DataError(f"Float images must hold raw pixel values in [0, 1], got values in "
                        f"[{float(x.min()):.3g}, {float(x.max()):.3g}]. Pass the images before normalisation "
                        "(uint8 0..255 or float 0..1): the run's own evaluation transform normalises them.")
    return x
