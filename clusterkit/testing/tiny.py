"""The tiny run every testing helper trains: the tiny recipe, the synthetic data, and the
:class:`TinyTrainer` (the real Trainer, with the synthetic data built in memory and a record of
what each plugin's ``setup`` added); :func:`train_tiny` trains it.

(PYTEST_DONT_REWRITE: see :mod:`clusterkit.testing`.)
"""

from __future__ import annotations

import atexit
import contextlib
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ..data import DatasetInfo, ImageDataset
from ..engine import Trainer
from ..plugin_manager import HookDispatcher, PluginInfo, autoload_disabled, discover
from ..recipe import deep_merge, load_recipe
from ..rundir import TIMING_KEYS, RunDir

__all__ = ["PluginCheckError", "TINY_RECIPE", "DIGITS", "SYNTHETIC_INFO", "synthetic_dataset", "TinyTrainer",
           "tiny_recipe", "make_trainer", "train_tiny"]


class PluginCheckError(AssertionError):
    """A plugin failed one of the checks; the message says which check, why, and what to look at."""


#: The tiny recipe every helper starts from (``overrides`` are deep-merged over it).
TINY_RECIPE: dict = {
    "name": "plugin_test",
    "data": {"dataset": "synthetic", "split": "all", "image_size": 8, "batch_size": 64, "eval_batch_size": 256,
             "augment": {"crop_scale": [0.6, 1.0], "hflip": False}},
    "model": {"backbone": "resnet18_cifar", "backbone_kwargs": {"channels": [8, 16, 16, 32]}},
    "optim": {"name": "sgd", "lr": 0.05, "lr_scaling": "none"},
    "schedule": {"epochs": 1, "warmup_epochs": 0},
    "e_step": {"k": 4},
    "eval": {"pixel_baseline": "never"},
    # one thread: tiny models gain nothing from more, and lose a lot on a busy machine; the
    # helpers give the process its previous thread count back when they return
    "run": {"seed": 0, "device": "cpu", "threads": 1, "progress": False, "keep_last": 3, "log_every": 1000},
}

#: What ``data="digits"`` merges over :data:`TINY_RECIPE`: scikit-learn's 1,797 digits, K = 10, batch 256.
DIGITS: dict = {"data": {"dataset": "digits", "batch_size": 256, "eval_batch_size": 512}, "e_step": {"k": 10}}

#: Normalisation and channels of :func:`synthetic_dataset`.
SYNTHETIC_INFO = DatasetInfo(mean=(0.5,), std=(0.25,), hflip=False, channels=1,
                             prepare="built in memory by clusterkit.testing.synthetic_dataset")


def synthetic_dataset(n: int = 256, classes: int = 4, size: int = 8, seed: int = 0) -> ImageDataset:
    """``n`` grey ``size`` x ``size`` uint8 images (n, 1, size, size) of ``classes`` smooth random
    patterns (labels ``i % classes``), each shifted by up to one pixel and with Gaussian noise:
    clusterable, but not trivially.  Deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(classes, 1, 3, 3, generator=g)
    templates = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)
    labels = torch.arange(n) % classes
    images = templates[labels].clone()
    shifts = torch.randint(-1, 2, (n, 2), generator=g)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        images[i] = torch.roll(images[i], shifts=(dy, dx), dims=(1, 2))
    images = (images + 0.08 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    pixels = (images * 255).round().to(torch.uint8)
    return ImageDataset("synthetic", "all", [f"pattern_{c}" for c in range(classes)], labels, SYNTHETIC_INFO,
                        pixels)


class _RecordingDispatcher(HookDispatcher):
    """The trainer's hook dispatcher, recording for each plugin's ``setup`` the ``state.model``
    keys it added (``setup_keys``) and the parameters of the ParamGroups it returned
    (``setup_params``)."""

    def __init__(self, pm, state=None):
        super().__init__(pm, state)
        self.setup_keys: dict[str, list[str]] = {}
        self.setup_params: dict[str, list] = {}

    def call_one(self, impl, hook: str, kwargs: dict) -> Any:
        if hook != "setup":
            return super().call_one(impl, hook, kwargs)
        model = kwargs["state"].model
        before = set(model.keys())
        result = super().call_one(impl, hook, kwargs)
        self.setup_keys[impl.plugin_name] = [k for k in model.keys() if k not in before]
        self.setup_params[impl.plugin_name] = [p for g in (result or []) for p in g.params]
        return result


class TinyTrainer(Trainer):
    """The real :class:`~clusterkit.engine.trainer.Trainer`, plus: ``data.dataset: synthetic`` is
    built in memory, and ``setup_keys[plugin]`` records the ``state.model`` keys each plugin's
    ``setup`` added (``setup_params[plugin]``: the parameters it returned in ParamGroups; both
    empty before :meth:`build`).  ``plugin_name``: the plugin under test (:func:`make_trainer`)."""

    synthetic_size = 256
    dispatcher_class = _RecordingDispatcher
    plugin_name: str | None = None

    def load_data(self) -> tuple[Any, Any]:
        d = self.recipe.data
        if d.dataset != "synthetic":
            return super().load_data()
        ds = synthetic_dataset(self.synthetic_size, self.recipe.e_step.k, d.image_size, self.recipe.run.seed)
        return ds, ds

    @property
    def setup_keys(self) -> dict[str, list[str]]:
        return self.hooks.setup_keys if isinstance(self.hooks, _RecordingDispatcher) else {}

    @property
    def setup_params(self) -> dict[str, list]:
        return self.hooks.setup_params if isinstance(self.hooks, _RecordingDispatcher) else {}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def scratch_dir() -> Path:
    """A fresh temporary folder, removed when the process exits."""
    path = Path(tempfile.mkdtemp(prefix="clusterkit-plugin-test-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@contextlib.contextmanager
def keep_threads() -> Iterator[None]:
    """Restore torch's CPU thread count (a recipe's run.threads sets it for the whole process)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_recipe(plugins: dict[str, dict], *, epochs: int = 1, data: str = "synthetic",
                overrides: dict | None = None) -> dict:
    """:data:`TINY_RECIPE` with ``plugins`` (name -> params), ``epochs``, ``data`` ("synthetic" or
    "digits": :data:`DIGITS` merged in) and ``overrides`` deep-merged over it."""
    if data not in ("synthetic", "digits"):
        raise ValueError(f"data must be 'synthetic' or 'digits', got {data!r}")
    raw = deep_merge(TINY_RECIPE, DIGITS) if data == "digits" else deep_merge(TINY_RECIPE, {})
    raw["schedule"]["epochs"] = epochs
    raw = deep_merge(raw, overrides or {})
    raw["plugins"] = {name: dict(p or {}) for name, p in plugins.items()}
    return raw


def resolve(plugin, name: str | None) -> tuple[str, dict[str, PluginInfo]]:
    """(recipe name, available plugins): a class is injected under ``name`` (default: its class name
    in snake_case), a string names an installed plugin."""
    available = discover()
    if isinstance(plugin, str):
        return plugin, available
    cls = plugin
    name = name or _snake(cls.__name__)
    value = f"{cls.__module__}:{cls.__qualname__}"
    available = {**available, name: PluginInfo(name, value, "(test)", "0", _cls=cls)}
    return name, available


def make_trainer(plugin, params: dict | None = None, *, name: str | None = None,
                 with_plugins: dict[str, dict] | None = None, epochs: int = 1, data: str = "synthetic",
                 overrides: dict | None = None, run_dir: str | Path | None = None,
                 resume: bool = False) -> TinyTrainer:
    """A :class:`TinyTrainer` for the tiny recipe with ``with_plugins`` and then the plugin.

    ``plugin``: a plugin class or an installed plugin name; ``params``: its recipe parameters;
    ``run_dir``: where the run writes (default: a fresh temporary folder)."""
    name, available = resolve(plugin, name)
    plugins = {**(with_plugins or {}), name: params or {}}
    raw = tiny_recipe(plugins, epochs=epochs, data=data, overrides=overrides)
    if not isinstance(plugin, str) and (raw.get("allow_plugins") is not None or autoload_disabled()):
        # a class handed over explicitly is meant to run, whatever filters the environment sets
        raw["allow_plugins"] = [*(raw.get("allow_plugins") or []), name]
    folder = Path(run_dir) if run_dir is not None else scratch_dir()
    folder.mkdir(parents=True, exist_ok=True)
    trainer = TinyTrainer(load_recipe(data=raw), folder, resume=resume, available_plugins=available)
    trainer.plugin_name = name
    return trainer


def epoch_records(run_dir: Path) -> list[dict]:
    """The per-epoch records of the run's metrics log, without the timing."""
    return [{k: v for k, v in record.items() if k not in TIMING_KEYS} for record in RunDir(run_dir).epoch_records()]


def train_tiny(plugin, params: dict | None = None, *, name: str | None = None,
               with_plugins: dict[str, dict] | None = None, epochs: int = 1, data: str = "synthetic",
               overrides: dict | None = None, run_dir: str | Path | None = None) -> dict:
    """Train the plugin (with ``with_plugins``) for ``epochs`` on tiny data; return the run's
    summary (as summary.json) plus ``history``: the per-epoch records of metrics.jsonl (every loss
    term's epoch mean, NMI/ACC/ARI).  A NaN/inf loss term stops the run with DivergenceError."""
    trainer = make_trainer(plugin, params, name=name, with_plugins=with_plugins, epochs=epochs, data=data,
                           overrides=overrides, run_dir=run_dir)
    with keep_threads():
        summary = trainer.fit()
    return {**summary, "history": epoch_records(trainer.run_dir)}
