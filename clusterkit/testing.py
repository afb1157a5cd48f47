"""Testing helpers for plugin authors: a tiny training loop, loss and gradient checks, and a
checkpoint round-trip.

Each helper takes the plugin as its class (``MyLoss``) or as the name it is installed under
(``"my_loss"``, proving the entry point too), its parameters as a dict, and the plugins it
needs as ``with_plugins`` (installed names; they come first in the recipe, so their
``setup`` runs before the plugin's)::

    from clusterkit.testing import train_tiny, check_losses, check_checkpoint_roundtrip

    def test_my_loss_trains():
        summary = train_tiny(MyLoss, {"weight": 0.5})
        assert summary["steps"] == 4

    def test_my_loss_has_gradients():
        report = check_losses(MyLoss)                 # raises PluginCheckError with the reason
        assert set(report.terms) == {"my_loss"}

    def test_my_loss_resumes_exactly():
        check_checkpoint_roundtrip(MyLoss)

The data is a small synthetic set built in memory (:func:`synthetic_dataset`: 256 grey
8x8 images of ``e_step.k`` patterns), or scikit-learn's digits with ``data="digits"``; the
backbone is a narrow CIFAR ResNet-18, on the CPU.  A test runs in a second or two.

With ``pytest_plugins = ["clusterkit.testing"]`` in a ``conftest.py``, the fixture
``plugin_tester`` gives the same helpers writing into the test's ``tmp_path``.

:func:`check_distributed_equivalence` runs a plugin set in one process on a global batch and in
two gloo processes under DDP on its shards, and checks that loss values, gradients and model
state agree to 1e-5 (a contrastive loss on the local batch only fails it).

(PYTEST_DONT_REWRITE: the helpers raise PluginCheckError themselves and use no ``assert``, so
pytest need not rewrite this module, nor warn when it was imported before ``pytest_plugins``.)
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from .data import BatchedTwoView, DatasetInfo, ImageDataset
from .plugin_manager import HookDispatcher, PluginInfo, autoload_disabled, discover, implemented_hooks
from .recipe import deep_merge, load_recipe
from .rundir import METRICS_LOG, RunDir
from .state import StepCache
from .trainer import Trainer

__all__ = ["PluginCheckError", "StepReport", "TINY_RECIPE", "SYNTHETIC_INFO", "synthetic_dataset", "tiny_recipe",
           "make_trainer", "train_tiny", "check_losses", "check_checkpoint_roundtrip", "check_distributed_equivalence",
           "PluginTester"]


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

#: Normalisation and channels of :func:`synthetic_dataset`.
SYNTHETIC_INFO = DatasetInfo(mean=(0.5,), std=(0.25,), hflip=False, channels=1,
                             prepare="built in memory by clusterkit.testing.synthetic_dataset")

_DIGITS = {"data": {"dataset": "digits", "batch_size": 256, "eval_batch_size": 512}, "e_step": {"k": 10}}


def synthetic_dataset(n: int = 256, classes: int = 4, size: int = 8, seed: int = 0) -> ImageDataset:
    """``n`` grey ``size`` x ``size`` uint8 images of ``classes`` smooth random patterns (labels
    ``i % classes``), each shifted by up to one pixel and with Gaussian noise: clusterable, but not
    trivially.  Deterministic in ``seed``."""
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
    """The real :class:`~clusterkit.trainer.Trainer`, plus: ``data.dataset: synthetic`` is built in
    memory, and ``setup_keys[plugin]`` records the ``state.model`` keys each plugin's ``setup`` added
    (``setup_params[plugin]``: the parameters it returned in ParamGroups)."""

    synthetic_size = 256
    dispatcher_class = _RecordingDispatcher

    def load_data(self):
        d = self.recipe.data
        if d.dataset != "synthetic":
            return super().load_data()
        ds = synthetic_dataset(self.synthetic_size, self.recipe.e_step.k, d.image_size, self.recipe.run.seed)
        return ds, ds

    @property
    def setup_keys(self) -> dict[str, list[str]]:
        return self.hooks.setup_keys

    @property
    def setup_params(self) -> dict[str, list]:
        return self.hooks.setup_params


# -- building a tiny run -----------------------------------------------------------------------------------

def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _scratch_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="clusterkit-plugin-test-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def tiny_recipe(plugins: dict[str, dict], *, epochs: int = 1, data: str = "synthetic",
                overrides: dict | None = None) -> dict:
    """:data:`TINY_RECIPE` with ``plugins`` (name -> params), ``epochs``, ``data`` ("synthetic" or
    "digits": scikit-learn's 1,797 digits, K = 10, batch 256) and ``overrides`` deep-merged over it."""
    if data not in ("synthetic", "digits"):
        raise ValueError(f"data must be 'synthetic' or 'digits', got {data!r}")
    raw = deep_merge(TINY_RECIPE, _DIGITS) if data == "digits" else deep_merge(TINY_RECIPE, {})
    raw["schedule"]["epochs"] = epochs
    raw = deep_merge(raw, overrides or {})
    raw["plugins"] = {name: dict(p or {}) for name, p in plugins.items()}
    return raw


def _resolve(plugin, name: str | None) -> tuple[str, dict[str, PluginInfo]]:
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
    name, available = _resolve(plugin, name)
    plugins = {**(with_plugins or {}), name: params or {}}
    raw = tiny_recipe(plugins, epochs=epochs, data=data, overrides=overrides)
    if not isinstance(plugin, str) and (raw.get("allow_plugins") is not None or autoload_disabled()):
        # a class handed over explicitly is meant to run, whatever filters the environment sets
        raw["allow_plugins"] = [*(raw.get("allow_plugins") or []), name]
    run_dir = Path(run_dir) if run_dir is not None else _scratch_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = TinyTrainer(load_recipe(data=raw), run_dir, resume=resume, available_plugins=available)
    trainer.plugin_name = name
    return trainer


@contextlib.contextmanager
def _keep_threads():
    """Restore torch's CPU thread count (a recipe's run.threads sets it for the whole process)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _epoch_records(run_dir: Path) -> list[dict]:
    """The per-epoch records of metrics.jsonl, without the timing."""
    return [{k: v for k, v in record.items() if k != "seconds"} for record in RunDir(run_dir).epoch_records()]


def train_tiny(plugin, params: dict | None = None, *, name: str | None = None,
               with_plugins: dict[str, dict] | None = None, epochs: int = 1, data: str = "synthetic",
               overrides: dict | None = None, run_dir: str | Path | None = None) -> dict:
    """Train the plugin (with ``with_plugins``) for ``epochs`` on tiny data; return the run's
    summary (as summary.json) plus ``history``: the per-epoch records of metrics.jsonl (every loss
    term's epoch mean, NMI/ACC/ARI).  A NaN/inf loss term stops the run with DivergenceError."""
    trainer = make_trainer(plugin, params, name=name, with_plugins=with_plugins, epochs=epochs, data=data,
                           overrides=overrides, run_dir=run_dir)
    with _keep_threads():
        summary = trainer.fit()
    return {**summary, "history": _epoch_records(trainer.run_dir)}


# -- one step: finite losses and gradients -------------------------------------------------------------------

@attrs.define
class StepReport:
    """What :func:`check_losses` measured on one training step.

    ``terms``: the plugin's loss terms {name: value}; ``backbone_grad``: {term: gradient norm of
    that term on the backbone's parameters}; ``module_grad``: {state.model key the plugin added:
    gradient norm of the step's total loss on its trainable parameters}."""

    plugin: str
    terms: dict[str, float]
    backbone_grad: dict[str, float]
    module_grad: dict[str, float]


def _norm(grads) -> float:
    """The L2 norm of a list of gradients (None: no gradient), 0.0 when there is none."""
    present = [g.detach().float().pow(2).sum() for g in grads if g is not None]
    return float(torch.stack(present).sum().sqrt()) if present else 0.0


def check_losses(plugin, params: dict | None = None, *, name: str | None = None,
                 with_plugins: dict[str, dict] | None = None, data: str = "synthetic",
                 overrides: dict | None = None, backbone: bool = True,
                 run_dir: str | Path | None = None) -> StepReport:
    """Run one training step (after the E-step) and check the plugin's loss terms and gradients.

    Checks, each failing with a :class:`PluginCheckError` that says what to fix:

    * a plugin implementing ``compute_losses`` returns at least one term, and each is a finite,
      floating-point scalar tensor that is part of the autograd graph (not detached, not computed
      under ``torch.no_grad()``);
    * with ``backbone=True``, each term's gradient reaches the backbone (a non-zero gradient on
      its parameters); pass ``backbone=False`` for a loss on a frozen or detached backbone;
    * every trainable parameter of the modules the plugin added to ``state.model`` in ``setup``
      (and of the ParamGroups it returned) gets a gradient from the step's total loss (its own
      terms plus those of ``with_plugins``), non-zero in every module.
    """
    trainer = make_trainer(plugin, params, name=name, with_plugins=with_plugins, data=data, overrides=overrides,
                           run_dir=run_dir)
    with _keep_threads():
        return _check_step(trainer, backbone)


def _check_step(trainer: TinyTrainer, backbone: bool) -> StepReport:
    name = trainer.plugin_name
    trainer.build()
    state = trainer.state
    trainer.begin_epoch(0)
    trainer.set_lr(0)
    views, index = trainer.pipeline.views(next(iter(trainer.loader)))  # either data.pipeline
    cache = StepCache(views, index, trainer.producers, state)
    trainer.hooks.call("on_step_start", cache=cache)
    own: dict[str, Any] = {}
    total = []
    for impl, result in trainer.hooks.call("compute_losses", cache=cache):
        for term, value in (result or {}).items():
            total.append(value)
            if impl == name:
                own[term] = value
    where = f"plugin '{name}'"
    if "compute_losses" in implemented_hooks(type(trainer.plugins[name])) and not own:
        raise PluginCheckError(f"{where} implements compute_losses but returned no loss terms on a training step "
                               "(after the E-step, outside warm-up). Return {term name: weighted scalar tensor}.")
    for term, value in own.items():
        if not torch.is_tensor(value) or value.numel() != 1 or not value.is_floating_point():
            raise PluginCheckError(f"{where}: loss term '{term}' must be a floating-point scalar tensor, got "
                                   f"{type(value).__name__} {getattr(value, 'shape', '')}. Reduce the loss to one "
                                   "number (e.g. .mean() over the batch).")
        if not torch.isfinite(value).all():
            raise PluginCheckError(f"{where}: loss term '{term}' is {value.item()} on the first training step. "
                                   "Look for log(0), division by a zero norm, or exp overflow (use logsumexp, "
                                   "F.normalize, a clamp).")
        if not value.requires_grad:
            raise PluginCheckError(f"{where}: loss term '{term}' is detached from the autograd graph, so it trains "
                                   "nothing. A tensor on its way was .detach()-ed, computed under torch.no_grad(), "
                                   "or made with torch.tensor(...); compute it from the step's outputs "
                                   "(cache[name, view]) and the plugin's modules.")
    backbone_params = [p for p in state.model["backbone"].parameters() if p.requires_grad]
    backbone_grad = {}
    for term, value in own.items():
        grads = torch.autograd.grad(value, backbone_params, retain_graph=True, allow_unused=True)
        backbone_grad[term] = _norm(grads)
        if backbone and not backbone_grad[term] > 0:
            raise PluginCheckError(f"{where}: the gradient of loss term '{term}' does not reach the backbone (its "
                                   "gradient there is zero or missing). The features were detached on the way "
                                   "(.detach(), torch.no_grad(), a target branch); read cache['h', view] or "
                                   "another plugin's trainable output, or pass backbone=False if that is intended.")
    keys = trainer.setup_keys.get(name, [])
    extra_params = trainer.setup_params.get(name, [])
    module_grad = {}
    if keys or extra_params:
        trainer.optimizer.zero_grad(set_to_none=True)
        graph = [v.float().sum() for v in total if torch.is_tensor(v) and v.requires_grad]
        if graph:
            sum(graph).backward()
        groups = {key: [p for p in state.model[key].parameters() if p.requires_grad] for key in keys}
        covered = {id(p) for ps in groups.values() for p in ps}
        others = [p for p in extra_params if p.requires_grad and id(p) not in covered]
        if others:  # ParamGroups of modules it did not add itself
            groups["(its ParamGroups)"] = others
        for key, ps in groups.items():
            if not ps:
                continue
            missing = [n for n, p in _named(state.model, ps) if p.grad is None]
            module_grad[key] = _norm([p.grad for p in ps])
            if missing or not module_grad[key] > 0:
                shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "") if missing else "all of them"
                raise PluginCheckError(
                    f"{where}: parameters of state.model['{key}'], which its setup added, get no gradient from the "
                    f"step's loss ({shown}). Use the module in a loss term, mark it requires_grad_(False) if it "
                    "is not trained by gradients (an EMA target), or do not create it.")
        trainer.optimizer.zero_grad(set_to_none=True)
    return StepReport(name, {t: float(v.detach()) for t, v in own.items()}, backbone_grad, module_grad)


def _named(model: torch.nn.Module, params: list) -> list[tuple[str, torch.Tensor]]:
    ids = {id(p) for p in params}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


# -- checkpoint round-trip --------------------------------------------------------------------------------

def _differences(a, b, path: str = "") -> list[str]:
    """Paths where two checkpoint objects differ (tensors compared exactly)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        same = torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype \
            and torch.equal(a, b)
        return [] if same else [path or "(value)"]
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                out.append(sub)
            else:
                out += _differences(a[key], b[key], sub)
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [path]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path or "(value)"]


def check_checkpoint_roundtrip(plugin, params: dict | None = None, *, name: str | None = None,
                               with_plugins: dict[str, dict] | None = None, epochs: int = 2, data: str = "synthetic",
                               overrides: dict | None = None, run_dir: str | Path | None = None) -> dict:
    """Train ``epochs`` epochs, then resume from the checkpoint before the last epoch (in a new
    trainer with new plugin instances, as after a crash) and train the last epoch again: the
    model, optimiser, training state (pseudo-labels, centres, ``state.extra``, every plugin's
    ``state_dict()``) and every
    metrics record must come out identical.  Returns the summary of the resumed run.

    A difference means state that a resume loses: keep it in the plugin's ``state_dict()`` /
    ``load_state_dict()`` or, for network modules and their buffers, in ``state.model``; never
    in plain attributes only."""
    if epochs < 2:
        raise ValueError("a round-trip needs epochs >= 2 (one to checkpoint, one to resume into)")
    run_dir = Path(run_dir) if run_dir is not None else _scratch_dir()
    kwargs = dict(name=name, with_plugins=with_plugins, epochs=epochs, data=data, overrides=overrides, run_dir=run_dir)
    first = make_trainer(plugin, params, **kwargs)
    with _keep_threads():
        full = first.fit()
    name = first.plugin_name
    last = RunDir(run_dir).checkpoint_of(epochs - 1)
    uninterrupted = torch.load(last, weights_only=False)
    records = _epoch_records(run_dir)
    last.unlink()  # as if the run had been killed during its last epoch
    RunDir(run_dir).summary_file.unlink()
    with _keep_threads():
        resumed = make_trainer(plugin, params, resume=True, **kwargs).fit()
    again = torch.load(last, weights_only=False)
    problems = []
    for part in ("model", "optimizer", "pseudo_labels", "centers", "extra", "plugins", "core", "step"):
        diff = _differences(uninterrupted[part], again[part], part)
        if diff:
            shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
            problems.append(shown)
    if _epoch_records(run_dir) != records:
        problems.append(f"the {METRICS_LOG} records (loss terms or NMI/ACC/ARI)")
    if problems:
        raise PluginCheckError(
            f"plugin '{name}': checkpoint round-trip failed: after resuming from the checkpoint of epoch "
            f"{epochs - 1}, these differ from the uninterrupted run: {'; '.join(problems)}. State that must "
            "survive a resume belongs in the plugin's state_dict()/load_state_dict() (or, for network modules "
            "and their buffers, in state.model), not in plain attributes only; random numbers must come from "
            "torch's global RNG (restored on resume) or from cache.randn / cache.rand.")
    if resumed["metrics"] != full["metrics"]:
        raise PluginCheckError(f"plugin '{name}': checkpoint round-trip failed: final metrics {resumed['metrics']} "
                               f"after the resume, {full['metrics']} without it.")
    return resumed


# -- distributed equivalence -------------------------------------------------------------------------------

def _plugin_set(plugin, params, name, with_plugins) -> tuple[dict[str, dict], dict[str, PluginInfo]]:
    """(recipe plugins, available plugins) from the helpers' usual arguments, or from a dict
    {installed name: params} given as ``plugin``."""
    if isinstance(plugin, dict):
        if params is not None or with_plugins:
            raise ValueError("pass either a dict of plugins, or a plugin with params and with_plugins")
        return {k: dict(v or {}) for k, v in plugin.items()}, discover()
    name, available = _resolve(plugin, name)
    return {**(with_plugins or {}), name: params or {}}, available


def _freeze_batch_norm(model: torch.nn.Module) -> None:
    """BatchNorm layers in eval mode: normalise by their running statistics, per sample."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def _equivalence_batches(raw: dict, available, steps: int, global_batch: int, seed: int) -> list[tuple]:
    """``steps`` global batches: (view0, view1, index), the same for every process count."""
    trainer = TinyTrainer(load_recipe(data=raw), _scratch_dir(), available_plugins=available)
    train, _ = trainer.load_data()
    d = trainer.recipe.data
    augment = BatchedTwoView(d.augment, d.image_size, train.info, second=d.augment_second)
    gen = torch.Generator().manual_seed(seed)
    batches = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(steps):
            index = torch.randperm(len(train), generator=gen)[:global_batch]
            images, _, _ = train.__getitems__(index.tolist())
            v0, v1 = augment(images)
            batches.append((v0, v1, index))
    return batches


def _equivalence_run(raw: dict, available, batches: list[tuple], out: str) -> None:
    """Train the recipe on this process's rows of ``batches`` and save, per step, the loss terms
    (mean over the processes), every parameter's gradient and the model's state after the step."""
    from . import distributed

    trainer = TinyTrainer(load_recipe(data=raw), Path(out).parent, available_plugins=available)
    trainer.build()
    trainer.begin_epoch(0)
    rank, world = distributed.rank(), distributed.world_size()
    model = trainer.state.model
    record = {"pseudo_labels": trainer.state.pseudo_labels, "steps": []}
    for v0, v1, index in batches:
        rows = slice(rank * (len(index) // world), (rank + 1) * (len(index) // world))
        model.train()
        _freeze_batch_norm(model)
        trainer.set_lr(trainer.state.epoch * trainer.state.steps_per_epoch)
        terms = trainer.step([v0[rows], v1[rows]], index[rows])
        if terms is None:
            raise PluginCheckError("a loss term was not finite during the distributed equivalence check")
        names = sorted(terms)
        packed = distributed.all_reduce(torch.stack([terms[k].float() for k in names]), "mean")
        record["steps"].append({
            "terms": dict(zip(names, packed.tolist(), strict=True)),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
            "state": _comparable_state(trainer),
        })
    torch.save(record, out)


def _comparable_state(trainer) -> dict[str, torch.Tensor]:
    """Every tensor of ``state.model`` and of every plugin's ``state_dict()`` (numbers as 0-d
    tensors), keyed ``<model key>`` and ``plugins.<plugin>.<key>``."""
    state = {k: v.detach().clone() for k, v in trainer.state.model.state_dict().items()}
    for name, plugin in trainer.plugins.items():
        for key, value in plugin.state_dict().items():
            if torch.is_tensor(value):
                state[f"plugins.{name}.{key}"] = value.detach().clone()
            elif isinstance(value, (bool, int, float)):
                state[f"plugins.{name}.{key}"] = torch.tensor(value)
    return state


def _equivalence_worker(rank: int, world: int, init_file: str, raw: dict, available, batches, out_dir: str) -> None:
    import torch.distributed as torch_dist

    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _equivalence_run(raw, available, batches, str(Path(out_dir) / f"rank{rank}.pt"))
    finally:
        torch_dist.destroy_process_group()


def _compare(reference: dict, other: dict, who: str, atol: float, rtol: float) -> list[str]:
    problems = []

    def close(a, b, what):
        if not torch.is_tensor(a):
            a, b = torch.tensor(a), torch.tensor(b)
        if a.shape != b.shape:
            problems.append(f"{who}: {what}: shape {tuple(b.shape)} instead of {tuple(a.shape)}")
        elif a.is_floating_point():
            if not torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol):
                err = (a.double() - b.double()).abs().max().item()
                problems.append(f"{who}: {what} differs by up to {err:.2e} (|1 process| up to "
                                f"{a.double().abs().max().item():.2e})")
        elif not torch.equal(a, b):
            problems.append(f"{who}: {what} differs ({int((a != b).sum())} of {a.numel()} entries)")

    if reference["pseudo_labels"] is not None or other["pseudo_labels"] is not None:
        close(reference["pseudo_labels"], other["pseudo_labels"], "E-step pseudo-labels")
    for i, (ref, got) in enumerate(zip(reference["steps"], other["steps"], strict=False)):
        step = f"step {i + 1}"
        for name in sorted(set(ref["terms"]) | set(got["terms"])):
            if name not in ref["terms"] or name not in got["terms"]:
                problems.append(f"{who}: {step}: loss term '{name}' present in one run only")
            else:
                close(ref["terms"][name], got["terms"][name], f"{step}: loss term '{name}'")
        for name in sorted(set(ref["grads"]) | set(got["grads"])):
            if name not in ref["grads"] or name not in got["grads"]:
                problems.append(f"{who}: {step}: parameter {name} has a gradient in one run only")
            else:
                close(ref["grads"][name], got["grads"][name], f"{step}: gradient of {name}")
        for name, value in ref["state"].items():
            if name.endswith("num_batches_tracked"):
                continue
            if name not in got["state"]:
                problems.append(f"{who}: {step}: state entry {name} missing")
                continue
            close(value, got["state"][name], f"{step}: state entry {name} after the step")
    return problems


def check_distributed_equivalence(plugin, params: dict | None = None, *, name: str | None = None,
                                  with_plugins: dict[str, dict] | None = None, world_size: int = 2,
                                  batch_size: int = 8, steps: int = 2, overrides: dict | None = None,
                                  atol: float = 1e-5, rtol: float = 1e-5, seed: int = 0) -> dict:
    """One process on the global batch vs ``world_size`` gloo processes on its shards (CPU).

    ``steps`` global batches of ``world_size * batch_size`` two-view samples are fixed in
    advance.  One process trains on them with the tiny recipe; then ``world_size`` processes
    (torch.multiprocessing, gloo) train the same recipe under DDP, each on its rows.  After the
    E-step and after every step the check compares, to ``atol``/``rtol``:

    * the E-step's pseudo-labels (the features are embedded per shard and all-gathered, the
      k-means sharded);
    * every loss term (the mean over the processes: a loss of the global batch is the same on
      every rank, a per-sample mean averages to the global mean);
    * the gradient of every parameter (after DDP's averaging) -- the test that catches a
      contrastive loss computed on the local batch only, or a gather that drops gradients;
    * every tensor in ``state.model`` and in every plugin's ``state_dict()`` after the step
      (weights, EMA targets, banks, groups, counters), on every rank.

    BatchNorm layers run in eval mode during the check (per-sample normalisation), because
    batch statistics differ between one batch and its shards by design (``run.sync_bn`` is the
    option for that on GPUs).  ``plugin`` is a plugin class, an installed plugin name (with
    ``params`` and ``with_plugins`` as in the other helpers), or a dict {installed name: params}
    of the whole plugin set.  ``overrides`` are deep-merged into the tiny recipe, except a
    ``model`` section, which replaces the tiny ResNet's (e.g. a small ViT).  Keep the tiny
    recipe's SGD: Adam divides by the gradient's running magnitude, so a parameter whose true
    gradient is zero (e.g. attention key biases) turns rounding noise of 1e-9 into full steps
    that differ between the runs.  Raises :class:`PluginCheckError` listing what differs; returns
    ``{"terms": [per-step loss terms of the single process], "compared": number of values}``.
    """
    import torch.multiprocessing as mp

    plugins, available = _plugin_set(plugin, params, name, with_plugins)
    global_batch = world_size * batch_size
    raw = tiny_recipe(plugins, overrides=deep_merge({"data": {"batch_size": global_batch}}, overrides or {}))
    if overrides and "model" in overrides:  # another backbone: its kwargs, not the tiny ResNet's
        raw["model"] = copy.deepcopy(overrides["model"])
    raw["run"]["seed"] = seed
    if not isinstance(plugin, (str, dict)) and (raw.get("allow_plugins") is not None or autoload_disabled()):
        raw["allow_plugins"] = [*(raw.get("allow_plugins") or []), *plugins]
    work = _scratch_dir()
    batches = _equivalence_batches(raw, available, steps, global_batch, seed)
    with _keep_threads():
        torch.set_num_threads(1)
        _equivalence_run(raw, available, batches, str(work / "single.pt"))
    reference = torch.load(work / "single.pt", weights_only=False)
    init_file = work / "dist_init"
    mp.start_processes(_equivalence_worker, args=(world_size, str(init_file), raw, available, batches, str(work)),
                       nprocs=world_size, start_method="spawn")
    problems = []
    for r in range(world_size):
        got = torch.load(work / f"rank{r}.pt", weights_only=False)
        problems += _compare(reference, got, f"rank {r} of {world_size}", atol, rtol)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise PluginCheckError(
            f"plugins {', '.join(plugins)}: {world_size} processes on shards of the batch do not match one process "
            f"on the whole batch: {shown}. A loss that contrasts samples across the batch must read its inputs "
            "with cache.gather(name, view) (and labels via cache.global_index) and compute the loss of the global "
            "batch; per-sample noise must come from cache.randn/cache.rand (see docs/writing-a-plugin.md).")
    compared = sum(len(s["terms"]) + len(s["grads"]) + len(s["state"]) for s in reference["steps"])
    return {"terms": [s["terms"] for s in reference["steps"]], "compared": compared * world_size}


# -- pytest fixture ---------------------------------------------------------------------------------------

class PluginTester:
    """The helpers above, each run writing into a fresh folder under ``root`` (the fixture's
    ``tmp_path``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._n = 0

    def _dir(self) -> Path:
        self._n += 1
        return self.root / f"run_{self._n}"

    def train(self, plugin, params=None, **kwargs) -> dict:
        return train_tiny(plugin, params, run_dir=self._dir(), **kwargs)

    def check_losses(self, plugin, params=None, **kwargs) -> StepReport:
        return check_losses(plugin, params, run_dir=self._dir(), **kwargs)

    def check_checkpoint_roundtrip(self, plugin, params=None, **kwargs) -> dict:
        return check_checkpoint_roundtrip(plugin, params, run_dir=self._dir(), **kwargs)


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only needed for the fixture
    pytest = None

if pytest is not None:
    @pytest.fixture
    def plugin_tester(tmp_path) -> PluginTester:
        """clusterkit's plugin testing helpers, writing under the test's ``tmp_path``."""
        return PluginTester(tmp_path)
