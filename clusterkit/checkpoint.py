"""Checkpoints: written atomically, read as data only.

Writing: to a temporary file, fsync, then rename over the target.  A checkpoint is never seen
half-written: a crash during the write leaves the previous checkpoint intact, and the temporary
file it leaves behind (``.epoch_XXXX.pt.tmp-PID``) is never taken for a checkpoint and is removed
by the next save.  A write that fails (a full disk) removes its temporary file and raises
:class:`~clusterkit.errors.DiskFullError` naming the folder and the space needed.  The newest
``keep_last`` checkpoints are kept.

Reading: a run folder may come from someone else, and a pickle can run code when it is
unpickled.  Checkpoints are therefore loaded with ``torch.load(weights_only=True)``: tensors,
numbers, strings and plain containers only.  Checkpoints hold nothing else: the numpy RNG state
is stored as a tensor (:func:`rng_state`).  Checkpoints written before that kept it as a numpy
array; the three numpy globals that rebuild an array are allowed for them, so they still resume.
A checkpoint that holds any other object is refused (:class:`~clusterkit.errors.UntrustedCheckpointError`)
unless the user sets ``CLUSTERKIT_TRUST_CHECKPOINTS=1``, the documented opt-in for a file
whose origin they trust.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, cast

import numpy as np
import torch

if TYPE_CHECKING:
    from .cluster.kmeans import KMeansPredictor
    from .errors import DiskFullError, UntrustedCheckpointError
    from .state import TrainState

__all__ = ["TRUST_ENV", "atomic_save", "atomic_write", "atomic_write_text", "checkpoint_file", "latest_checkpoint",
           "load_checkpoint", "load_latest_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]

#: The environment variable that lets ``torch.load`` unpickle any object (run code) from a checkpoint.
TRUST_ENV = "CLUSTERKIT_TRUST_CHECKPOINTS"

_PATTERN = re.compile(r"epoch_(\d+)\.pt")  # matched against the whole file name


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


_open = open  # the file opener of the atomic writes (a test swaps in one whose disk fills up)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, fsync, then rename it over ``path``.

    Raises DiskFullError (the temporary file removed, ``path`` as it was) when the disk fills up."""
    atomic_write(path, lambda fh: torch.save(obj, fh), "wb")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the whole new one."""
    atomic_write(path, lambda fh: fh.write(text))


def atomic_write(path: str | os.PathLike, write: Callable[[Any], Any], mode: str = "w", **open_kwargs: Any) -> None:
    """Call ``write(file)`` on a temporary file beside ``path`` (opened with ``mode`` and
    ``open_kwargs``), fsync it and rename it over ``path``: a reader sees the old file or the
    whole new one.  Whatever fails, the temporary file is removed; a full disk raises DiskFullError."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        with _open(tmp, mode, **open_kwargs) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if _disk_full(exc):
            raise _disk_full_error(path, written) from None
        raise
    _fsync_dir(path.parent)


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is "no space left": torch.save turns the
    OSError of a full disk into a RuntimeError ("unexpected pos") raised from it, or after it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _disk_full_error(path: Path, written: int) -> DiskFullError:
    from .errors import DiskFullError

    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = 0
    previous = [p for p in _checkpoints(path.parent) if p != path] if _PATTERN.fullmatch(path.name) else []
    need = max([written] + [p.stat().st_size for p in previous[-1:]])
    kept = f" The previous checkpoint, '{previous[-1]}', is kept." if previous else ""
    return DiskFullError(f"The disk holding '{path.parent}' is full: writing '{path.name}' failed with "
                         f"{_mib(free)} free, and it needs about {_mib(need)}; no partial file was left behind."
                         f"{kept} Free at least {_mib(need)} there (or move the folder to a larger disk), then run "
                         "the command again (a run continues from its last checkpoint with --resume RUN_DIR).")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _fsync_dir(folder: Path) -> None:
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def checkpoint_file(ckpt_dir: Path, epoch: int) -> Path:
    """``ckpt_dir/epoch_XXXX.pt``: where the checkpoint of ``epoch`` (0-based) is written."""
    return Path(ckpt_dir) / f"epoch_{epoch:04d}.pt"


def save_checkpoint(obj: dict, ckpt_dir: Path, epoch: int, keep_last: int) -> Path:
    """Save ``obj`` as ``ckpt_dir/epoch_XXXX.pt`` atomically and prune older ones."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_file(ckpt_dir, epoch)
    atomic_save(obj, path)
    for old in _checkpoints(ckpt_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    for stale in ckpt_dir.glob(".epoch_*.pt.tmp-*"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    return path


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).glob("epoch_*.pt") if (m := _PATTERN.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete ``epoch_XXXX.pt`` (temporary files of unfinished saves are ignored)."""
    found = _checkpoints(ckpt_dir) if Path(ckpt_dir).is_dir() else []
    return found[-1] if found else None


def _numpy_array_globals() -> list:
    """The globals a pickled numpy array needs (the RNG state of checkpoints written before it was
    stored as a tensor): the array, its dtype and the function that rebuilds it; none runs code."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_checkpoint(path: Path) -> dict:
    """``torch.load`` of a checkpoint as data only (tensors, numbers, strings, plain containers).

    Raises UntrustedCheckpointError when the file holds any other object, unless the user opted in
    with ``CLUSTERKIT_TRUST_CHECKPOINTS=1``; other failures (a corrupt file) propagate."""
    if os.environ.get(TRUST_ENV) == "1":
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise
        raise _untrusted(Path(path)) from None


def _untrusted(path: Path) -> UntrustedCheckpointError:
    from .errors import UntrustedCheckpointError

    try:  # read from the pickle's opcodes, nothing is run
        names = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path)) or "unknown objects"
    except Exception:  # noqa: BLE001 - only for the message
        names = "unknown objects"
    return UntrustedCheckpointError(
        f"The checkpoint '{path}' holds Python objects that clusterkit never loads from a checkpoint ({names}); "
        "clusterkit's own checkpoints hold tensors and plain data only, and unpickling such objects can run "
        "code. Nothing was loaded and nothing ran. If you trust where this run folder came from (you made it "
        f"with an older or modified clusterkit), set the environment variable {TRUST_ENV}=1 for this one "
        "command to load it anyway.")


def load_latest_checkpoint(ckpt_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint in ``ckpt_dir`` that can be read, as ``(path, contents)``; None when
    there is none.

    A truncated or corrupt newest checkpoint (a disk that filled up, a copy cut short) is
    passed over, with a warning on stderr, for the previous one that ``run.keep_last`` kept.
    Raises RunDirError naming every file when none can be read.
    """
    from .errors import RunDirError, UntrustedCheckpointError

    found = _checkpoints(ckpt_dir) if Path(ckpt_dir).is_dir() else []
    if not found:
        return None
    bad: list[str] = []
    for path in reversed(found):
        try:
            ckpt = load_checkpoint(path)
        except UntrustedCheckpointError:
            raise  # never passed over for an older one: the folder was changed by someone
        except Exception as exc:  # noqa: BLE001 - any failure to unpickle means an unreadable file
            bad.append(f"'{path}' ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")
            continue
        if not isinstance(ckpt, dict) or "recipe" not in ckpt:
            bad.append(f"'{path}' (not a clusterkit checkpoint)")
            continue
        if bad:
            print(f"clusterkit: warning: cannot read checkpoint {'; '.join(bad)}; using the previous one, "
                  f"'{path}' (epoch {ckpt.get('epoch', -1) + 1}).", file=sys.stderr)
        return path, ckpt
    raise RunDirError(f"No checkpoint in '{ckpt_dir}' can be read: {'; '.join(bad)}. They are truncated or "
                      "corrupt (a full disk, or a copy cut short); copy the run directory again from where it "
                      "was made, or start the run anew.")


def rng_state() -> dict:
    """The process's RNG states as tensors and plain data (what ``weights_only`` loading reads):
    numpy's Mersenne Twister state as ``{"keys": int64 tensor (624,), "pos", "has_gauss",
    "cached_gaussian"}``."""
    _, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved (also the numpy tuple of checkpoints before it)."""
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    if isinstance(saved, dict):
        saved = ("MT19937", saved["keys"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"],
                 saved["cached_gaussian"])
    np.random.set_state(saved)
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_training_state(state: TrainState, plugins: dict, core_predictor: KMeansPredictor, ckpt: dict) -> None:
    """Load a checkpoint's model weights and training state into a built run: ``state.model``,
    ``step``, ``epoch`` (the checkpoint's, 0-based), ``pseudo_labels``, ``centers``,
    ``extra``, each plugin's :meth:`~clusterkit.plugin.Plugin.load_state_dict` and the core
    k-means rule's centres.  The one loading path of ``--resume`` and of ``clusterkit.load``.

    ``plugins``: {name: plugin instance}; ``core_predictor``: the trainer's
    :class:`~clusterkit.cluster.KMeansPredictor` (used when no plugin predicts).
    Checkpoints of clusterkit before plugin state dicts kept the k-means centres in ``extra``
    (``core.predict_centers``, ``<plugin>.predict_centers``) and a plugin's tensors as buffers of
    a module ``state.model[<plugin>]`` (``momentum_grouping``, ``cross_level_interaction``);
    those are read too, the buffers as the plugin's state dict.
    """
    weights, legacy = _legacy_plugin_buffers(ckpt["model"], state.model, plugins)
    state.model.load_state_dict(weights)
    state.step, state.epoch = ckpt["step"], ckpt["epoch"]
    to = state.device
    state.pseudo_labels = None if ckpt["pseudo_labels"] is None else ckpt["pseudo_labels"].to(to)
    state.centers = None if ckpt["centers"] is None else ckpt["centers"].to(to)
    extra = dict(ckpt.get("extra") or {})
    saved = dict(ckpt.get("plugins") or {})
    if ckpt.get("plugins") is None:  # an older checkpoint: the centres were extra keys
        saved = {name: {"predict_centers": extra.pop(f"{name}.predict_centers")}
                 for name in plugins if f"{name}.predict_centers" in extra}
    for name, buffers in legacy.items():
        if not saved.get(name):
            saved[name] = buffers
    state.extra = extra
    for name, plugin in plugins.items():
        plugin.load_state_dict(saved.get(name, {}))
    core = ckpt.get("core") or {"predict": {"centers": extra.pop("core.predict_centers", None)}}
    core_predictor.load_state_dict(core["predict"])


def _legacy_plugin_buffers(weights: dict, model: torch.nn.ModuleDict, plugins: dict) -> tuple[dict, dict]:
    """Split a checkpoint's model weights into those of ``model`` and, per plugin, the buffers of a
    module ``<plugin name>.*`` that this run's ``state.model`` no longer has (older checkpoints kept
    plugin state there): ``(weights for model, {plugin name: {buffer name: tensor}})``."""
    legacy: dict = {}
    for name in plugins:
        prefix = f"{name}."
        if name in model or not any(key.startswith(prefix) for key in weights):
            continue
        legacy[name] = {key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)}
    if not legacy:
        return weights, legacy
    kept = {key: value for key, value in weights.items() if key.split(".", 1)[0] not in legacy}
    return kept, legacy
