"""What the trainer shares with plugins: the training state and the per-step cache."""

from __future__ import annotations

import zlib
from typing import Any, Callable

import attrs
import torch
from torch import nn

from . import distributed

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
    is saved in checkpoints (kept for older plugins; a plugin's own state belongs in its
    ``state_dict()``, see :class:`clusterkit.plugin.Plugin`).  ``scalars``: what plugins
    logged this epoch (:meth:`log`; cleared at each epoch's start).
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
    def rank(self) -> int:
        """This process's rank (0 without torch.distributed)."""
        return distributed.rank()

    @property
    def world_size(self) -> int:
        """Number of training processes (1 without torch.distributed)."""
        return distributed.world_size()

    @property
    def in_warmup(self) -> bool:
        """True during the first ``schedule.warmup_epochs`` epochs (the losses' warm-up gate)."""
        return self.epoch < self.recipe.schedule.warmup_epochs

    def features(self, split: str = "train") -> torch.Tensor:
        """Embeddings (N, D) of a split ("train" = the training data, "eval" = the evaluation
        data), from the ``embed`` hook in eval mode; computed once per optimiser step: until the
        next step every call returns the same tensor object, so work memoised on that object
        (``kmeans_e_step`` reuses an evaluation's k-means for the next E-step) stays valid."""
        if self.feature_fn is None:
            raise RuntimeError("state.features() is available during training only (no trainer embeds data here)")
        return self.feature_fn(split)

    def log(self, name: str, value) -> None:
        """Record a scalar for this epoch: shown in the progress bar, written in metrics.jsonl's
        step records and the epoch's record; cleared when the next epoch starts."""
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
        """B, this process's batch (the global batch is ``world_size * B``)."""
        return self.views[0].shape[0]

    # -- the global batch under DDP (identity in a single process) ------------------------------
    def gather(self, name: str, view: int) -> torch.Tensor:
        """Output ``name`` of ``view`` for the global batch: (world_size * B, ...) in rank order,
        carrying gradients (:func:`clusterkit.distributed.gather_with_grad`); computed once per
        step.  Every loss that contrasts samples across the batch reads its inputs this way and
        computes the loss of the global batch, identically on every rank."""
        key = ("gather:" + name, view)
        if key not in self._values:
            self._values[key] = distributed.gather_with_grad(self[name, view])
        return self._values[key]

    @property
    def global_index(self) -> torch.Tensor:
        """Dataset indices (world_size * B,) of the global batch, in the order of :meth:`gather`."""
        if ("gather:index", -1) not in self._values:
            self._values[("gather:index", -1)] = distributed.gather(self.index)
        return self._values[("gather:index", -1)]

    def generator(self, salt: str) -> torch.Generator:
        """A generator on the views' device seeded by (run.seed, step, salt): the same on every rank."""
        seed = zlib.crc32(f"{self.state.recipe.run.seed}:{self.state.step}:{salt}".encode())
        return torch.Generator(device=self.views[0].device).manual_seed(seed)

    def _draw(self, fn, shape, salt: str, dtype) -> torch.Tensor:
        full = fn((distributed.world_size() * self.batch_size, *shape), generator=self.generator(salt),
                  device=self.views[0].device, dtype=dtype or torch.float32)
        return distributed.local_rows(full)

    def randn(self, *shape: int, salt: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Standard normal noise (B, *shape) for this process's samples.

        Drawn for the whole global batch from a generator seeded by (run.seed, step, salt),
        then this rank's rows are kept: a sample's noise does not depend on how the batch is
        split across processes, and a resumed run draws the same noise.  ``salt`` names the
        draw (e.g. "diffused_sampling/view0"); two draws in a step need different salts.
        """
        return self._draw(torch.randn, shape, salt, dtype)

    def rand(self, *shape: int, salt: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Uniform [0, 1) noise (B, *shape), drawn as :meth:`randn` draws."""
        return self._draw(torch.rand, shape, salt, dtype)
