"""Building a run's parts from a recipe: the device, the plugins, the data and its pipeline,
the model with the plugins' modules, the optimiser and DDP.

:func:`build_training` builds everything a training run needs before its first epoch, in a
fixed order (the random draws of the backbone's and the plugins' initialisation depend on it).
:func:`build_model` is the part a finished run's model needs too (``clusterkit.load``): the
backbone, the training state, the plugins' ``setup`` and ``register_outputs``, and the
:class:`~clusterkit.engine.evaluation.Evaluator`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Callable

import attrs
import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import amp, distributed
from ..cluster import KMeansPredictor
from ..data import load_dataset
from ..data.guides import guide_text, train_data_missing
from ..data.pipeline import TrainPipeline, build_train_pipeline
from ..errors import DataError, PluginError, RecipeError
from ..errors import warn as _warn
from ..models import create_backbone
from ..models.backbones import require_local_weights
from ..plugin_manager import HookDispatcher, load_plugins
from ..recipe import Recipe, RunConfig, check_stages
from ..state import ParamGroup, StepCache, TrainState
from .evaluation import Evaluator, RunEvaluation
from .step import StepLosses

__all__ = ["seed_everything", "apply_run_settings", "training_device", "inference_device", "PluginSet",
           "load_plugin_set", "load_data", "make_pipeline", "BuiltModel", "build_model", "make_optimizer",
           "wrap_ddp", "TrainingSetup", "build_training"]


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global random number generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def apply_run_settings(run: RunConfig) -> None:
    """The process-wide settings of ``run``: torch's CPU threads, the seed, deterministic algorithms."""
    if run.threads:
        torch.set_num_threads(run.threads)
    seed_everything(run.seed)
    if run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


def training_device(run: RunConfig) -> torch.device:
    """The device ``run.device`` names (auto: CUDA when present); under torchrun, this process's GPU."""
    want = run.device
    if want == "cuda" and not torch.cuda.is_available():
        raise RecipeError("run.device is 'cuda' but no CUDA device is available; set run.device: auto "
                          "(CUDA when present, CPU otherwise) or cpu.")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and distributed.is_distributed():  # torchrun: this process's GPU (LOCAL_RANK)
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(want)


def inference_device(recipe: Recipe, device: str | None = None) -> torch.device:
    """``device``, or by default CUDA when present unless the recipe says cpu (a GPU run
    predicts on a laptop too)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() and recipe.run.device != "cpu" else "cpu"
    return torch.device(device)


@attrs.frozen
class PluginSet:
    """A recipe's plugins: the pluggy manager, ``plugins`` {recipe name: instance} and the
    ``hooks`` dispatcher that calls them."""

    pm: Any
    plugins: dict[str, Any]
    hooks: HookDispatcher


def load_plugin_set(recipe: Recipe, available: dict | None = None,
                    dispatcher_class: type[HookDispatcher] = HookDispatcher) -> PluginSet:
    """Load the recipe's plugins (``available``: the installed plugins to choose from, default all)."""
    pm, plugins = load_plugins(recipe.plugins, available, allow=recipe.allow_plugins)
    return PluginSet(pm, plugins, dispatcher_class(pm))


def require_a_loss(recipe: Recipe, hooks: HookDispatcher) -> None:
    """RecipeError when no plugin returns a loss (checked before the data is loaded)."""
    if not hooks.impls("compute_losses"):
        raise RecipeError("No plugin in the recipe returns a loss (compute_losses), so there is nothing to "
                          f"train{' (the recipe has no plugins)' if not recipe.plugins else ''}; add at least one "
                          "loss plugin under plugins:, e.g. diffused_sampling, or start from "
                          "recipes/quickstart.yaml.")


def load_data(recipe: Recipe) -> tuple[Any, Any]:
    """(training dataset, evaluation dataset) of the recipe's ``data`` section (ImageDatasets,
    the same object when ``data.eval_split`` is the training split), checked against
    ``e_step.k``, ``data.batch_size`` and the process count."""
    d = recipe.data
    eval_split = d.eval_split or d.split
    try:
        size = d.decode_size or d.image_size
        bar = recipe.run.progress and distributed.is_main()  # run.progress: false shows no bar at all
        train = load_dataset(d.dataset, d.root, d.split, size, cache=d.cache, skip_corrupt=d.skip_corrupt,
                             labels=d.labels, progress=bar)
        evald = train if eval_split == d.split else load_dataset(
            d.dataset, d.root, eval_split, size, cache=d.cache, skip_corrupt=d.skip_corrupt, labels=d.labels,
            progress=bar)
    except DataError as exc:
        if d.guide is None or not train_data_missing(exc):
            raise
        raise DataError(f"{exc}\n\n{guide_text(d.guide)}") from None
    check_data_size(recipe, len(train))
    return train, evald


def check_data_size(recipe: Recipe, n: int) -> None:
    """DataError/RecipeError when ``n`` training images are too few for ``e_step.k`` or
    ``data.batch_size``, or the batch does not split evenly over the processes."""
    d, k = recipe.data, recipe.e_step.k
    if k > n:
        raise DataError(f"e_step.k = {k} clusters is more than the {n} training images of "
                        f"'{d.dataset}' ({d.split} split). Lower e_step.k or use more data.")
    if d.batch_size > n:
        raise DataError(f"data.batch_size = {d.batch_size} is larger than the {n} training images "
                        f"of '{d.dataset}' ({d.split} split), so no full batch exists. Lower data.batch_size "
                        f"to at most {n}.")
    world = distributed.world_size()
    if d.batch_size % world:
        raise RecipeError(f"data.batch_size = {d.batch_size} is the global batch, split evenly over the "
                          f"{world} processes torchrun started, but {d.batch_size} is not a multiple of {world}. "
                          f"Use a batch size divisible by {world} (e.g. {d.batch_size - d.batch_size % world}) "
                          "or another --nproc_per_node.")


def warn_about_setup(recipe: Recipe, ds: Any, plugins: dict[str, Any]) -> None:
    """Warn of settings that train but cannot give a meaningful result (NMI 0 with nothing said
    otherwise): a warm-up as long as the run, one class in labelled data, a data.root one level
    above the class folders."""
    sched = recipe.schedule
    if 0 < sched.epochs <= sched.warmup_epochs:
        gated = [name for name, plugin in plugins.items()
                 if getattr(getattr(plugin, "params", None), "warmup_gate", False)]
        also = f", and the warm-up-gated losses of {', '.join(gated)} never turn on" if gated else ""
        _warn(f"schedule.warmup_epochs = {sched.warmup_epochs} is not below schedule.epochs = {sched.epochs}: "
              f"the learning rate never leaves its linear warm-up{also}. Lower schedule.warmup_epochs or raise "
              "schedule.epochs.")
    if not ds.has_labels:  # unlabeled data (data.labels): no classes to count
        return
    classes = sorted(set(np.asarray(ds.targets).tolist()))
    if len(classes) != 1:
        return
    name = ds.classes[classes[0]] if classes[0] < len(getattr(ds, "classes", [])) else str(classes[0])
    inner = Path(getattr(ds, "root", None) or ".") / name
    if recipe.data.dataset == "imagefolder" and inner.is_dir() and any(
            p.is_dir() and not p.name.startswith(".") for p in inner.iterdir()):
        _warn(f"data.root '{ds.root}' holds a single class folder, '{name}', whose sub-folders look like the "
              f"classes: data.root is probably one level too high. Set data.root to '{inner}'.")
    else:
        _warn(f"the training data has a single class ('{name}'), so NMI, ACC and ARI against its labels are "
              "0 or meaningless. Check data.root and data.split (one folder per class is expected).")


def make_pipeline(recipe: Recipe, train_ds: Any, device: torch.device) -> TrainPipeline:
    """The training loader and augmentation (``data.pipeline``).  Each process loads
    batch_size / world_size images per step: a DistributedSampler under torchrun
    (reseeded each epoch by ``set_epoch``), shuffling with a seeded generator in a single
    process."""
    d = recipe.data
    world = distributed.world_size()
    sampler: torch.utils.data.Sampler | None = None
    if world > 1:
        sampler = torch.utils.data.DistributedSampler(
            train_ds, num_replicas=world, rank=distributed.rank(), shuffle=True, seed=recipe.run.seed)
    return build_train_pipeline(train_ds, d, batch_size=d.batch_size // world, device=device,
                                sampler=sampler, generator=torch.Generator())


def make_core_predictor(recipe: Recipe) -> KMeansPredictor:
    """The core's prediction rule when no plugin predicts: spherical k-means."""
    return KMeansPredictor(recipe.e_step.k, metric="cosine", seed=recipe.run.seed)


@attrs.frozen
class BuiltModel:
    """A recipe's model with its plugins set up, on its device.

    ``state``: the :class:`~clusterkit.state.TrainState` (``state.model``: the backbone and the
    plugins' modules); ``evaluator``: its :class:`~clusterkit.engine.evaluation.Evaluator`;
    ``evaluation``: the run's :class:`~clusterkit.engine.evaluation.RunEvaluation` when data
    was given; ``setup_groups``: the ParamGroups the plugins' ``setup`` returned;
    ``producers``: the step outputs {name: fn(cache, view)}; ``use_amp``: bfloat16 autocast."""

    plugin_set: PluginSet
    state: TrainState
    core_predictor: KMeansPredictor
    evaluator: Evaluator
    evaluation: RunEvaluation | None
    setup_groups: list[ParamGroup]
    producers: dict[str, Callable]
    use_amp: bool


def backbone_output(cache: StepCache, view: int) -> torch.Tensor:
    """The default step output ``h``: pooled backbone features (B, D) of view ``view``."""
    return cache.state.model["backbone"](cache.views[view])


def build_model(recipe: Recipe, plugin_set: PluginSet, device: torch.device, channels: int, num_train: int,
                steps_per_epoch: int, *, pretrained: bool = True, data: tuple[Any, Any] | None = None) -> BuiltModel:
    """The backbone (``channels`` input channels; ``pretrained=False``: no weights loaded, a
    checkpoint's come next), the training state, the plugins' ``setup`` (their modules and
    ParamGroups) and ``register_outputs``, on ``device``.  ``data``: (training, evaluation)
    datasets, whose :class:`~clusterkit.engine.evaluation.RunEvaluation` gives
    ``state.features`` from the plugins' ``setup`` on."""
    cfg = recipe.model if pretrained else attrs.evolve(recipe.model, pretrained=False)
    require_local_weights(cfg)
    model = nn.ModuleDict({"backbone": create_backbone(cfg, in_chans=channels)})
    state = TrainState(recipe=recipe, device=device, model=model, num_train=num_train,
                       steps_per_epoch=steps_per_epoch)
    hooks = plugin_set.hooks
    hooks.state = state
    core_predictor = make_core_predictor(recipe)
    use_amp = recipe.run.amp and device.type == "cuda"
    evaluator = Evaluator(recipe, state, hooks, core_predictor, use_amp)
    evaluation = None if data is None else RunEvaluation(recipe, evaluator, *data)
    if evaluation is not None:
        state.feature_fn = evaluation.features
    groups = [g for _, result in hooks.call("setup") if result for g in result]
    model.to(device)
    return BuiltModel(plugin_set, state, core_predictor, evaluator, evaluation, groups, _step_outputs(hooks),
                      use_amp)


def _step_outputs(hooks: HookDispatcher) -> dict[str, Callable]:
    """The step outputs {name: fn(cache, view)}: ``h`` (the backbone's, which one plugin may
    replace, e.g. a masked encoder) and those the plugins' ``register_outputs`` return."""
    producers: dict[str, Callable] = {"h": backbone_output}
    overridable = {"h"}
    for impl, result in hooks.call("register_outputs"):
        for name, fn in (result or {}).items():
            if name in overridable:
                overridable.discard(name)
            elif name in producers:
                raise PluginError(f"Plugin '{impl}' registers step output '{name}', which another plugin "
                                  "already provides. Remove one of them from the recipe.")
            producers[name] = fn
    return producers


def fast_paths(run: RunConfig, model: nn.ModuleDict, device: torch.device) -> None:
    """SyncBatchNorm (torchrun), channels_last and torch.compile, as ``run`` asks."""
    if run.sync_bn and distributed.is_distributed():
        if device.type != "cuda":
            raise RecipeError("run.sync_bn is true but this torchrun job trains on the CPU, and torch's "
                              "SyncBatchNorm runs on GPUs only. Set run.sync_bn: false for CPU runs (each "
                              "process then normalises over its own share of the batch).")
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if run.channels_last:
        model.to(memory_format=torch.channels_last)
    if run.compile:
        model["backbone"].compile(backend=run.compile_backend)


def make_optimizer(recipe: Recipe, model: nn.Module, groups: list[ParamGroup],
                   device: torch.device) -> tuple[torch.optim.Optimizer, float]:
    """(optimiser, base lr): the ``optim`` section's optimiser over the model's trainable
    parameters, the plugins' ParamGroups first claiming theirs (each its own ``lr_scale``,
    weight decay and name), the rest in group "default"."""
    o = recipe.optim
    seen: set[int] = set()
    param_groups = []
    for g in groups:
        params = [p for p in g.params if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            param_groups.append({"params": params, "lr_scale": g.lr_scale, "name": g.name or "group",
                                 "weight_decay": o.weight_decay if g.weight_decay is None else g.weight_decay})
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    param_groups.insert(0, {"params": rest, "lr_scale": 1.0, "name": "default", "weight_decay": o.weight_decay})
    base_lr = o.lr * (recipe.data.batch_size / 256 if o.lr_scaling == "linear" else 1.0)
    fused = device.type == "cuda" if o.fused is None else o.fused
    kwargs = {"fused": True} if fused else {}
    if o.name == "sgd":
        return torch.optim.SGD(param_groups, lr=base_lr, momentum=o.momentum, **kwargs), base_lr
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(param_groups, lr=base_lr, betas=o.betas, **kwargs), base_lr


def wrap_ddp(recipe: Recipe, module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel under torchrun (as it is otherwise)."""
    if not distributed.is_distributed():
        return module
    r = recipe
    find_unused = bool(r.stages) if r.run.find_unused_parameters is None else r.run.find_unused_parameters
    # no buffer broadcast at each forward: banks and groups are kept identical by the plugins
    # themselves; BatchNorm running statistics are averaged over the ranks at each epoch's end
    import inspect

    no_buffer_sync: dict[str, Any] = ({"forward_sync_buffers": False}  # torch >= 2.14; broadcast_buffers before
                                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                                      else {"broadcast_buffers": False})
    return DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused, **no_buffer_sync)


@attrs.frozen
class TrainingSetup:
    """What :func:`build_training` built: the ``device``, the datasets, the ``pipeline``, the
    ``model`` (:class:`BuiltModel`), the ``optimizer`` and its ``base_lr``, and ``step_losses``
    (the loss computation, DDP-wrapped under torchrun); ``cpu_amp``: whether the model's modules
    run under bf16 autocast on the CPU (``run.amp_cpu``, :mod:`clusterkit.amp`)."""

    device: torch.device
    train_ds: Any
    eval_ds: Any
    pipeline: TrainPipeline
    model: BuiltModel
    optimizer: torch.optim.Optimizer
    base_lr: float
    step_losses: nn.Module
    cpu_amp: bool


def build_training(recipe: Recipe, load: Callable[[], tuple[Any, Any]], available: dict | None = None,
                   dispatcher_class: type[HookDispatcher] = HookDispatcher) -> TrainingSetup:
    """Everything a training run needs before its first epoch: settings and seed, device,
    plugins, data (``load()`` returns the two datasets), pipeline, model and the plugins'
    modules, fast paths, optimiser and (under torchrun) DDP, in that order."""
    check_stages(recipe)
    apply_run_settings(recipe.run)
    device = training_device(recipe.run)
    plugin_set = load_plugin_set(recipe, available, dispatcher_class)
    require_a_loss(recipe, plugin_set.hooks)  # before the data is loaded
    train_ds, eval_ds = load()
    warn_about_setup(recipe, train_ds, plugin_set.plugins)
    pipeline = make_pipeline(recipe, train_ds, device)  # draws no global random numbers
    built = build_model(recipe, plugin_set, device, train_ds.info.channels, len(train_ds), len(pipeline.loader),
                        data=(train_ds, eval_ds))
    model = built.state.model
    fast_paths(recipe.run, model, device)
    optimizer, base_lr = make_optimizer(recipe, model, built.setup_groups, device)
    step_losses = wrap_ddp(recipe, StepLosses(model, plugin_set.hooks, built.use_amp), device)
    cpu_amp = amp.install_cpu_autocast(model, device, recipe.run)
    if distributed.is_distributed():
        # the model starts identical on every rank (same seed, and DDP broadcasts rank 0's);
        # augmentations and the plugins' own random draws then differ per rank
        seed_everything(recipe.run.seed + 7919 * distributed.rank())
    return TrainingSetup(device, train_ds, eval_ds, pipeline, built, optimizer, base_lr, step_losses, cpu_amp)
