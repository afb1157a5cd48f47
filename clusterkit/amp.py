"""Mixed precision: which bf16 autocast a run gets on its device (``run.amp``, ``run.amp_cpu``).

On CUDA (``run.amp``, on by default) the trainer runs the whole loss computation and the
embedding under ``torch.autocast("cuda", dtype=torch.bfloat16)``: CUDA's autocast keeps the
reductions the losses need (norms, softmax, log-softmax, cosine similarity, ...) in float32 by
its own op lists, and the plugins that need more say so themselves.

On the CPU (``run.amp_cpu``, off by default) torch's autocast has no such list: a norm, a
softmax or a cosine similarity of bf16 inputs runs in bf16.  So here only the **modules of the
model** compute in bf16: :func:`install_cpu_autocast` puts each top-level module of the model
(the backbone, the projector and predictor, the EMA target, the heads) under
``torch.autocast("cpu", dtype=torch.bfloat16)`` for the length of its forward and returns its
floating outputs as float32.  Everything between the modules (the loss terms, the L2
normalisations, the prototypes, k-means of the E-step and the evaluation) computes in float32,
and the parameters, their gradients and the optimiser state stay float32.

A CPU without native bf16 arithmetic (AVX512-BF16 / AMX on x86, the BF16 extension on Arm)
still runs bf16 autocast, emulated and several times slower than float32 (a ResNet-18
forward and backward at 32 px on an AVX2-only AMD EPYC: about 8x): asking for it there warns.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import warn

#: The dtype of CPU autocast.
CPU_AMP_DTYPE = torch.bfloat16


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 natively, as oneDNN (torch's CPU convolutions and matmuls)
    sees it: AVX512 (BW/VL/DQ) or AVX512-BF16 / AMX on x86, the BF16 extension on Arm."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is not None:
        try:
            return bool(check())
        except RuntimeError:  # a build without oneDNN
            pass
    cpu = getattr(torch, "cpu", None)
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def cpu_model_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo's "model name"; else the platform's word)."""
    import platform

    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")),
                        platform.processor() or platform.machine())
    except OSError:
        return platform.processor() or platform.machine()


def cpu_features() -> str:
    """A few words on the CPU's bf16 support, for messages and benchmark reports."""
    cpu = torch.cpu
    flags = [name for name, fn in (("AVX512", "_is_avx512_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"),
                                   ("AMX", "_is_amx_tile_supported")) if getattr(cpu, fn, lambda: False)()]
    capability = torch.backends.cpu.get_cpu_capability()
    return f"torch CPU capability {capability}" + (f", {', '.join(flags)}" if flags else ", no AVX512/AMX")


def _to_float32(value: Any) -> Any:
    """``value`` with every bf16 tensor in it (tensors, tuples, lists, dicts) cast to float32."""
    if torch.is_tensor(value):
        return value.float() if value.dtype == CPU_AMP_DTYPE else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_to_float32(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_to_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_float32(v) for k, v in value.items()}
    return value


def autocast_module_forward(module: nn.Module, device_type: str = "cpu", dtype: torch.dtype = CPU_AMP_DTYPE) -> None:
    """Run ``module``'s forward under ``torch.autocast(device_type, dtype)`` and return its
    floating outputs as float32, by a pair of forward hooks (a deep copy of the module keeps
    them; its state_dict is unchanged).  The autocast region ends even when the forward raises."""
    regions: list[torch.autocast] = []

    def enter(_module, _args):
        region = torch.autocast(device_type, dtype=dtype)
        region.__enter__()
        regions.append(region)

    def leave(_module, _args, output):
        regions.pop().__exit__(None, None, None)
        return _to_float32(output) if output is not None else None

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


def install_cpu_autocast(model: nn.ModuleDict, device: torch.device, run) -> bool:
    """``run.amp_cpu`` on a CPU run: every top-level module of ``model`` computes in bf16
    (:func:`autocast_module_forward`); the rest stays float32.  Warns when the CPU has no native
    bf16.  Returns whether CPU autocast is on (False on CUDA, where ``run.amp`` applies, and
    when ``run.amp_cpu`` is off)."""
    if not getattr(run, "amp_cpu", False) or device.type != "cpu":
        return False
    if not cpu_bf16_native():
        warn(f"run.amp_cpu is true, but this CPU has no native bf16 arithmetic ({cpu_features()}): bf16 "
             "autocast runs emulated, typically several times slower than float32. Set run.amp_cpu: false "
             "unless you are measuring exactly that.")
    for module in model.values():
        autocast_module_forward(module, "cpu", CPU_AMP_DTYPE)
    return True
