"""One training step's checks of a plugin: finite, floating-point, attached loss terms whose
gradients reach the backbone and every module the plugin added (:func:`check_losses`).

The step is the trainer's own first half (:meth:`~clusterkit.engine.step.Stepper.prepare`: the
step cache and ``on_step_start``) and its loss terms (:func:`~clusterkit.engine.step.plugin_terms`),
taken after the first epoch's E-step.

(PYTEST_DONT_REWRITE: see :mod:`clusterkit.testing`.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import attrs
import torch

from ..engine.step import plugin_terms
from ..engine.trainer import built
from ..plugin_manager import implemented_hooks
from .tiny import PluginCheckError, TinyTrainer, keep_threads, make_trainer

__all__ = ["StepReport", "check_losses"]


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
    with keep_threads():
        return _check_step(trainer, backbone)


def _check_step(trainer: TinyTrainer, backbone: bool) -> StepReport:
    name = built(trainer.plugin_name)
    where = f"plugin '{name}'"
    own, total = _first_step_terms(trainer)
    if "compute_losses" in implemented_hooks(type(built(trainer.plugins)[name])) and not own:
        raise PluginCheckError(f"{where} implements compute_losses but returned no loss terms on a training step "
                               "(after the E-step, outside warm-up). Return {term name: weighted scalar tensor}.")
    _check_terms(where, own)
    backbone_grad = _backbone_grads(where, built(trainer.state).model, own, backbone)
    module_grad = _module_grads(where, trainer, total)
    return StepReport(name, {t: float(v.detach()) for t, v in own.items()}, backbone_grad, module_grad)


def _first_step_terms(trainer: TinyTrainer) -> tuple[dict[str, Any], list[Any]]:
    """Build the trainer and take the first half of its first step (after the E-step, at the first
    iteration's lr): ({term: value} of the plugin under test, every plugin's term values)."""
    trainer.build()
    trainer.begin_epoch(0)
    trainer.set_lr(0)
    views, index = built(trainer.pipeline).views(next(iter(trainer.loader)))  # either data.pipeline
    cache = built(trainer.stepper).prepare(views, index)
    terms = plugin_terms(built(trainer.hooks), cache)
    return {term: value for impl, term, value in terms if impl == trainer.plugin_name}, [v for _, _, v in terms]


def _check_terms(where: str, own: dict[str, Any]) -> None:
    """Each term a finite floating-point scalar tensor, attached to the autograd graph."""
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


def _backbone_grads(where: str, model: torch.nn.ModuleDict, own: dict[str, torch.Tensor],
                    backbone: bool) -> dict[str, float]:
    """{term: the norm of its gradient on the backbone's parameters}; with ``backbone``, each non-zero."""
    backbone_params = [p for p in model["backbone"].parameters() if p.requires_grad]
    backbone_grad = {}
    for term, value in own.items():
        grads = torch.autograd.grad(value, backbone_params, retain_graph=True, allow_unused=True)
        backbone_grad[term] = _norm(grads)
        if backbone and not backbone_grad[term] > 0:
            raise PluginCheckError(f"{where}: the gradient of loss term '{term}' does not reach the backbone (its "
                                   "gradient there is zero or missing). The features were detached on the way "
                                   "(.detach(), torch.no_grad(), a target branch); read cache['h', view] or "
                                   "another plugin's trainable output, or pass backbone=False if that is intended.")
    return backbone_grad


def _module_grads(where: str, trainer: TinyTrainer, total: list[Any]) -> dict[str, float]:
    """{state.model key the plugin added (or "(its ParamGroups)"): the norm of the total loss's
    gradient on its trainable parameters}, each of which must get a non-zero gradient."""
    name, model, optimizer = trainer.plugin_name, built(trainer.state).model, built(trainer.optimizer)
    keys = trainer.setup_keys.get(name or "", [])
    extra_params = trainer.setup_params.get(name or "", [])
    module_grad: dict[str, float] = {}
    if not keys and not extra_params:
        return module_grad
    optimizer.zero_grad(set_to_none=True)
    graph = [v.float().sum() for v in total if torch.is_tensor(v) and v.requires_grad]
    if graph:
        cast(torch.Tensor, sum(graph)).backward()
    groups = {key: [p for p in model[key].parameters() if p.requires_grad] for key in keys}
    covered = {id(p) for ps in groups.values() for p in ps}
    others = [p for p in extra_params if p.requires_grad and id(p) not in covered]
    if others:  # ParamGroups of modules it did not add itself
        groups["(its ParamGroups)"] = others
    for key, ps in groups.items():
        if not ps:
            continue
        missing = [n for n, p in _named(model, ps) if p.grad is None]
        module_grad[key] = _norm([p.grad for p in ps])
        if missing or not module_grad[key] > 0:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "") if missing else "all of them"
            raise PluginCheckError(
                f"{where}: parameters of state.model['{key}'], which its setup added, get no gradient from the "
                f"step's loss ({shown}). Use the module in a loss term, mark it requires_grad_(False) if it "
                "is not trained by gradients (an EMA target), or do not create it.")
    optimizer.zero_grad(set_to_none=True)
    return module_grad


def _norm(grads) -> float:
    """The L2 norm of a list of gradients (None: no gradient), 0.0 when there is none."""
    present = [g.detach().float().pow(2).sum() for g in grads if g is not None]
    return float(torch.stack(present).sum().sqrt()) if present else 0.0


def _named(model: torch.nn.Module, params: list) -> list[tuple[str, torch.Tensor]]:
    ids = {id(p) for p in params}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]
