"""The checkpoint round-trip check (:func:`check_checkpoint_roundtrip`): a run resumed from a
checkpoint must equal the uninterrupted run, bit for bit.

(PYTEST_DONT_REWRITE: see :mod:`clusterkit.testing`.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..rundir import METRICS_LOG, RunDir
from .tiny import PluginCheckError, epoch_records, keep_threads, make_trainer, scratch_dir

__all__ = ["check_checkpoint_roundtrip"]

#: The parts of a checkpoint that a resumed run must reproduce exactly.
COMPARED = ("model", "optimizer", "pseudo_labels", "centers", "extra", "plugins", "core", "step")


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
    folder = Path(run_dir) if run_dir is not None else scratch_dir()
    kwargs: dict[str, Any] = dict(name=name, with_plugins=with_plugins, epochs=epochs, data=data, overrides=overrides,
                                  run_dir=folder)
    first = make_trainer(plugin, params, **kwargs)
    with keep_threads():
        full = first.fit()
    name = first.plugin_name
    last = RunDir(folder).checkpoint_of(epochs - 1)
    uninterrupted = torch.load(last, weights_only=False)
    records = epoch_records(folder)
    last.unlink()  # as if the run had been killed during its last epoch
    RunDir(folder).summary_file.unlink()
    with keep_threads():
        resumed = make_trainer(plugin, params, resume=True, **kwargs).fit()
    again = torch.load(last, weights_only=False)
    problems = []
    for part in COMPARED:
        diff = _differences(uninterrupted[part], again[part], part)
        if diff:
            problems.append(", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else ""))
    if epoch_records(folder) != records:
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
