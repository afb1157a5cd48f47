"""What the trainer shares with plugins: the training state and the per-step cache."""

from __future__ import annotations

from typing import Any, Callable

import attrs
import torch
from torch import nn

__all__ = ["TrainState", "StepCache", "ParamGroup", "Prediction", "DIRECTIONS"]

#: The two directions of a symmetric loss: (online view, target view).
DIRECTIONS = ((0, 1), (1, 0))


@attrs.define
class ParamGroup:
    """Parameters that need their own optimiser settings (returned from ``setup``)."""

    params: list
    lr_scale: float = 1.0
    weight_decay: float | None = None  # None: the recipe's weight decay
    name: str = ""


@attrs.frozen
class Prediction:
    """Cluster predictions for N samples: ``labels`` (N,) int64, ``confidence`` (N,) float."""

    labels: torch.Tensor
    confidence: torch.Tensor


@attrs.define(eq=False)
class TrainState:
    """Everything plugins may read (and the few things they may write) during a run.

    Written by the core: ``epoch`` (0-based, current), ``step`` (global optimiser steps
    done), ``step_in_epoch``, ``steps_per_epoch``.  Written by E-step plugins:
    ``pseudo_labels`` (N,) and ``centers`` (K, D).  ``extra`` is a picklable dict that
    is saved in checkpoints for state that is not a tensor in ``model``.
    """

    recipe: Any
    device: torch.device
    model: nn.ModuleDict
    num_train: int
    steps_per_epoch: int
    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    stage: str | None = None
    pseudo_labels: torch.Tensor | None = None
    centers: torch.Tensor | None = None
    extra: dict = attrs.field(factory=dict)
    feature_fn: Callable[[str], torch.Tensor] | None = None
    scalars: dict = attrs.field(factory=dict)

    @property
    def num_clusters(self) -> int:
        return self.recipe.e_step.k

    @property
    def epochs(self) -> int:
        return self.recipe.schedule.epochs

    @property
    def total_steps(self) -> int:
        return self.recipe.schedule.epochs * self.steps_per_epoch

    @property
    def in_warmup(self) -> bool:
        """True during the first ``schedule.warmup_epochs`` epochs (the losses' warm-up gate)."""
        return self.epoch < self.recipe.schedule.warmup_epochs

    def features(self, split: str = "train") -> torch.Tensor:
        """Embeddings (N, D) of a split ("train" = the training data, "eval" = the evaluation
        data), from the ``embed`` hook in eval mode; computed once per optimiser step."""
        return self.feature_fn(split)

    def log(self, name: str, value) -> None:
        """Record an extra scalar for the progress bar and metrics.jsonl."""
        self.scalars[name] = float(value)


class StepCache:
    """The step's inputs and lazily computed, shared outputs.

    ``views``: two float tensors (B, C, S, S); ``index``: LongTensor (B,) dataset indices.
    ``cache[name, view]`` computes output ``name`` for ``view`` with the function a
    plugin registered in ``register_outputs``, once per step.
    """

    def __init__(self, views, index: torch.Tensor, producers: dict[str, Callable], state: TrainState):
        self.views = list(views)
        self.index = index
        self.state = state
        self._producers = producers
        self._values: dict[tuple[str, int], Any] = {}

    def __getitem__(self, key: tuple[str, int]):
        if key not in self._values:
            name, view = key
            if name not in self._producers:
                known = ", ".join(sorted(self._producers)) or "none"
                raise KeyError(f"no plugin produces step output '{name}' (registered: {known}); "
                               "add the plugin that provides it to the recipe")
            self._values[key] = self._producers[name](self, view)
        return self._values[key]

    def __contains__(self, key) -> bool:
        return key in self._values

    def put(self, name: str, view: int, value) -> None:
        self._values[(name, view)] = value

    @property
    def batch_size(self) -> int:
        return self.views[0].shape[0]
