"""The distributed equivalence check (:func:`check_distributed_equivalence`): a plugin set
trained in one process on global batches, and in gloo processes under DDP on their shards,
must give the same loss values, gradients and model state.

(PYTEST_DONT_REWRITE: see :mod:`clusterkit.testing`.)
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from .. import distributed
from ..data import BatchedTwoView
from ..engine.trainer import built
from ..plugin_manager import PluginInfo, autoload_disabled, discover
from ..recipe import deep_merge, load_recipe
from .tiny import PluginCheckError, TinyTrainer, keep_threads, resolve, scratch_dir, tiny_recipe

__all__ = ["check_distributed_equivalence"]


def _plugin_set(plugin, params, name, with_plugins) -> tuple[dict[str, dict], dict[str, PluginInfo]]:
    """(recipe plugins, available plugins) from the helpers' usual arguments, or from a dict
    {installed name: params} given as ``plugin``."""
    if isinstance(plugin, dict):
        if params is not None or with_plugins:
            raise ValueError("pass either a dict of plugins, or a plugin with params and with_plugins")
        return {k: dict(v or {}) for k, v in plugin.items()}, discover()
    name, available = resolve(plugin, name)
    return {**(with_plugins or {}), name: params or {}}, available


def _freeze_batch_norm(model: torch.nn.Module) -> None:
    """BatchNorm layers in eval mode: normalise by their running statistics, per sample."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def equivalence_batches(raw: dict, available, steps: int, global_batch: int, seed: int) -> list[tuple]:
    """``steps`` global batches: (view0, view1, index), the same for every process count."""
    trainer = TinyTrainer(load_recipe(data=raw), scratch_dir(), available_plugins=available)
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


def equivalence_run(raw: dict, available, batches: list[tuple], out: str) -> None:
    """Train the recipe on this process's rows of ``batches`` and save, per step, the loss terms
    (mean over the processes), every parameter's gradient and the model's state after the step."""
    trainer = TinyTrainer(load_recipe(data=raw), Path(out).parent, available_plugins=available)
    trainer.build()
    trainer.begin_epoch(0)
    rank, world = distributed.rank(), distributed.world_size()
    state = built(trainer.state)
    record: dict = {"pseudo_labels": state.pseudo_labels, "steps": []}
    for v0, v1, index in batches:
        rows = slice(rank * (len(index) // world), (rank + 1) * (len(index) // world))
        state.model.train()
        _freeze_batch_norm(state.model)
        trainer.set_lr(state.epoch * state.steps_per_epoch)
        terms = trainer.step([v0[rows], v1[rows]], index[rows])
        if terms is None:
            raise PluginCheckError("a loss term was not finite during the distributed equivalence check")
        names = sorted(terms)
        packed = distributed.all_reduce(torch.stack([terms[k].float() for k in names]), "mean")
        record["steps"].append({
            "terms": dict(zip(names, packed.tolist(), strict=True)),
            "grads": {n: p.grad.detach().clone() for n, p in state.model.named_parameters() if p.grad is not None},
            "state": _comparable_state(trainer),
        })
    torch.save(record, out)


def _comparable_state(trainer: TinyTrainer) -> dict[str, torch.Tensor]:
    """Every tensor of ``state.model`` and of every plugin's ``state_dict()`` (numbers as 0-d
    tensors), keyed ``<model key>`` and ``plugins.<plugin>.<key>``."""
    state = {k: v.detach().clone() for k, v in built(trainer.state).model.state_dict().items()}
    for name, plugin in built(trainer.plugins).items():
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
        equivalence_run(raw, available, batches, str(Path(out_dir) / f"rank{rank}.pt"))
    finally:
        torch_dist.destroy_process_group()


class _Comparison:
    """The differences between one process's record and another rank's, as lines."""

    def __init__(self, who: str, atol: float, rtol: float):
        self.who, self.atol, self.rtol = who, atol, rtol
        self.problems: list[str] = []

    def close(self, a, b, what: str) -> None:
        """Note ``what`` unless ``a`` and ``b`` (tensors or numbers) agree to atol/rtol (exactly if integer)."""
        if not torch.is_tensor(a):
            a, b = torch.tensor(a), torch.tensor(b)
        if a.shape != b.shape:
            self.problems.append(f"{self.who}: {what}: shape {tuple(b.shape)} instead of {tuple(a.shape)}")
        elif a.is_floating_point():
            if not torch.allclose(a.double(), b.double(), atol=self.atol, rtol=self.rtol):
                err = (a.double() - b.double()).abs().max().item()
                self.problems.append(f"{self.who}: {what} differs by up to {err:.2e} (|1 process| up to "
                                     f"{a.double().abs().max().item():.2e})")
        elif not torch.equal(a, b):
            self.problems.append(f"{self.who}: {what} differs ({int((a != b).sum())} of {a.numel()} entries)")

    def both(self, ref: dict, got: dict, what: str, present: str) -> None:
        """Compare the entries of two {name: value} records; ``present``: what a one-sided entry is."""
        for name in sorted(set(ref) | set(got)):
            if name not in ref or name not in got:
                self.problems.append(f"{self.who}: {present.format(name=name)} in one run only")
            else:
                self.close(ref[name], got[name], what.format(name=name))


def _compare(reference: dict, other: dict, who: str, atol: float, rtol: float) -> list[str]:
    c = _Comparison(who, atol, rtol)
    if reference["pseudo_labels"] is not None or other["pseudo_labels"] is not None:
        c.close(reference["pseudo_labels"], other["pseudo_labels"], "E-step pseudo-labels")
    for i, (ref, got) in enumerate(zip(reference["steps"], other["steps"], strict=False)):
        step = f"step {i + 1}"
        c.both(ref["terms"], got["terms"], f"{step}: loss term '{{name}}'", f"{step}: loss term '{{name}}' present")
        c.both(ref["grads"], got["grads"], f"{step}: gradient of {{name}}",
               f"{step}: parameter {{name}} has a gradient")
        for name, value in ref["state"].items():
            if name.endswith("num_batches_tracked"):
                continue
            if name not in got["state"]:
                c.problems.append(f"{who}: {step}: state entry {name} missing")
                continue
            c.close(value, got["state"][name], f"{step}: state entry {name} after the step")
    return c.problems


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
    plugins, available = _plugin_set(plugin, params, name, with_plugins)
    global_batch = world_size * batch_size
    raw = tiny_recipe(plugins, overrides=deep_merge({"data": {"batch_size": global_batch}}, overrides or {}))
    if overrides and "model" in overrides:  # another backbone: its kwargs, not the tiny ResNet's
        raw["model"] = copy.deepcopy(overrides["model"])
    raw["run"]["seed"] = seed
    if not isinstance(plugin, (str, dict)) and (raw.get("allow_plugins") is not None or autoload_disabled()):
        raw["allow_plugins"] = [*(raw.get("allow_plugins") or []), *plugins]
    batches = equivalence_batches(raw, available, steps, global_batch, seed)
    reference, problems = _run_and_compare(raw, available, batches, world_size, atol, rtol)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise PluginCheckError(
            f"plugins {', '.join(plugins)}: {world_size} processes on shards of the batch do not match one process "
            f"on the whole batch: {shown}. A loss that contrasts samples across the batch must read its inputs "
            "with cache.gather(name, view) (and labels via cache.global_index) and compute the loss of the global "
            "batch; per-sample noise must come from cache.randn/cache.rand (see docs/writing-a-plugin.md).")
    compared = sum(len(s["terms"]) + len(s["grads"]) + len(s["state"]) for s in reference["steps"])
    return {"terms": [s["terms"] for s in reference["steps"]], "compared": compared * world_size}


def _run_and_compare(raw: dict, available, batches: list[tuple], world_size: int, atol: float,
                     rtol: float) -> tuple[dict, list[str]]:
    """Train the recipe in this process and in ``world_size`` spawned gloo processes on the same
    fixed ``batches``: (the single process's record, the differences of every rank)."""
    import torch.multiprocessing as mp

    work = scratch_dir()
    with keep_threads():
        torch.set_num_threads(1)
        equivalence_run(raw, available, batches, str(work / "single.pt"))
    reference = torch.load(work / "single.pt", weights_only=False)
    init_file = work / "dist_init"
    mp.start_processes(_equivalence_worker, args=(world_size, str(init_file), raw, available, batches, str(work)),
                       nprocs=world_size, start_method="spawn")
    problems = []
    for r in range(world_size):
        got = torch.load(work / f"rank{r}.pt", weights_only=False)
        problems += _compare(reference, got, f"rank {r} of {world_size}", atol, rtol)
    return reference, problems
