"""A projection on paper of feeding a GPU training step (issue 24, item 6): images/s a step needs, what
the batched on-device augmentation and 8 per-image loader workers deliver, at CIFAR-10 and ImageNet-10 sizes.

Nothing here runs on a GPU.  What is counted or measured on this machine:

* the forward FLOPs of each recipe's backbone at its image size (``torch.utils.flop_counter``, one
  image) and of the reference network, timm's ``resnet50`` (v1.5: the stride on the 3x3) at 224 px;
* for the batched path (``data.pipeline: batched``, :class:`clusterkit.data.augment.BatchedTwoView`,
  both views of one batch of the recipe's size): the aten operations it runs and the bytes they read
  and write (every tensor argument and result; a dispatch mode counts them, no timing);
* for the per-image path (``data.pipeline: per_image``, :class:`PerImageTwoView`, torchvision
  transforms v2): the **CPU time** (``time.process_time``, one torch thread, the main process) per
  image for its two views, and the CPU time to decode a 500x375 JPEG (a typical ImageNet file) with
  PIL, which a worker also pays when the files are read per image (``data.cache: false``, or the
  official code's ``ImageFolder``).  CPU time, unlike wall time, barely moves when other jobs share
  the cores, but cache and memory-bandwidth contention still slow it somewhat.

What is assumed, and labelled so in the report: the GPU step runs at the FLOP rate NVIDIA reports
for ResNet-50 v1.5 training with mixed precision on one A100 80GB (2,470 images/s, NVIDIA
DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md, "Training performance:
NVIDIA DGX A100 (8x A100 80GB)", 1 GPU), an H100 at twice that; a contrastive step costs 3x a forward
per view trained (forward and backward) plus one forward per view through an EMA target (ProPos /
DigPro: 2 views x (3 + 1) = 8 forwards per image; CC: 2 views x 3 = 6); the batched augmentation
is bound by memory traffic at half the card's peak bandwidth (A100 80GB 2.0 TB/s, H100 SXM 3.35 TB/s)
plus 10 microseconds of launch overhead per aten operation.  Small images use a GPU less well than
ResNet-50 at 224 px, so the step rates are upper bounds: what the data pipeline must at most deliver.

Usage::

    python benchmarks/gpu_projection.py                  # writes benchmarks/results/gpu_projection.md
    python benchmarks/gpu_projection.py --quick          # fewer images timed, writes nothing
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from clusterkit.data import DATASETS  # noqa: E402
from clusterkit.data.augment import BatchedTwoView, PerImageTwoView  # noqa: E402
from clusterkit.models import create_backbone  # noqa: E402
from clusterkit.recipe import load_recipe  # noqa: E402

#: (label, recipe, forwards per image in a step) of the cases projected.
CASES = [
    ("CIFAR-10, ProPos / DigPro", "recipes/propos_cifar10.yaml", 8),
    ("ImageNet-10, ProPos / DigPro", "recipes/propos_imagenet10.yaml", 8),
    ("ImageNet-10, CC", "recipes/cc_imagenet10.yaml", 6),
]
#: Assumptions (see the module doc).
RN50_A100_IMAGES_PER_S = 2470
GPUS = {"A100 80GB": {"step_scale": 1.0, "bandwidth": 2.0e12}, "H100 SXM": {"step_scale": 2.0, "bandwidth": 3.35e12}}
BANDWIDTH_USED = 0.5
LAUNCH_SECONDS = 10e-6
WORKERS = 8


def forward_flops(model: torch.nn.Module, size: int) -> float:
    """FLOPs of one forward of ``model`` on one 3 x size x size image (eval mode, no grad)."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


class Traffic(TorchDispatchMode):
    """Counts aten operations and the bytes of their tensor arguments and results."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for x in (*args, *(kwargs or {}).values(), *(out if isinstance(out, (tuple, list)) else (out,))):
            if torch.is_tensor(x):
                self.bytes += x.numel() * x.element_size()
        return out


def synthetic_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` uint8 (3, size, size) images: smooth random colour layouts plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=(size, size), mode="bilinear")
    return (x + 0.08 * torch.randn(x.shape, generator=g)).clamp(0, 1).mul(255).round().to(torch.uint8)


def cpu_seconds(fn, repeats: int) -> float:
    """CPU seconds (this process) per call of ``fn``, after one untimed call."""
    fn()
    t0 = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - t0) / repeats


def jpeg_decode_seconds(repeats: int) -> float:
    """CPU seconds to decode a 500x375 RGB JPEG (quality 90) with PIL."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((500, 375), Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    data = buf.getvalue()

    def decode():
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB").load()

    return cpu_seconds(decode, repeats)


def measure(args) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    rn50 = forward_flops(create_backbone(load_recipe(data={"model": {"backbone": "resnet50"}}).model), 224)
    decode = jpeg_decode_seconds(20 if args.quick else 200)
    for label, recipe_path, forwards in CASES:
        r = load_recipe(REPO / recipe_path)
        d, size = r.data, r.data.image_size
        info = DATASETS["cifar10" if "cifar10" in recipe_path else "imagefolder"]
        flops = forward_flops(create_backbone(r.model), size)
        stored = d.decode_size or size
        batch = d.batch_size
        batched = BatchedTwoView(d.augment, size, info, d.augment_second)
        images = synthetic_images(batch, stored)
        torch.manual_seed(0)
        with Traffic() as traffic:
            batched(images)
        n_time = max(8 if args.quick else 64, (64 if args.quick else 512) * 32 * 32 // (size * size))
        per_image = PerImageTwoView(d.augment, size, info, d.augment_second)
        pool = synthetic_images(n_time, stored, seed=1)
        per_image_s = cpu_seconds(lambda f=per_image, xs=pool: [f(im) for im in xs], 1) / n_time
        small = synthetic_images(min(batch, 64), stored, seed=2)
        batched_cpu_s = cpu_seconds(lambda f=batched, x=small: f(x), 2) / len(small)
        rows.append({"case": label, "recipe": recipe_path, "backbone": r.model.backbone, "size": size,
                     "stored": stored, "batch": batch, "forwards": forwards, "flops": flops,
                     "ops_per_batch": traffic.ops, "bytes_per_image": traffic.bytes / batch,
                     "per_image_cpu_s": per_image_s, "batched_cpu_s": batched_cpu_s})
    return [{"rn50_flops": rn50, "jpeg_decode_s": decode}, *rows]


def project(meta: dict, row: dict, gpu: dict) -> dict:
    """Images/s: the step's need, the batched path's supply and 8 per-image workers' supply."""
    step_flops_per_s = RN50_A100_IMAGES_PER_S * 3 * meta["rn50_flops"] * gpu["step_scale"]
    need = step_flops_per_s / (row["forwards"] * row["flops"])
    per_batch = (row["bytes_per_image"] * row["batch"] / (gpu["bandwidth"] * BANDWIDTH_USED)
                 + row["ops_per_batch"] * LAUNCH_SECONDS)
    batched = row["batch"] / per_batch
    workers = WORKERS / row["per_image_cpu_s"]
    workers_decoding = WORKERS / (row["per_image_cpu_s"] + meta["jpeg_decode_s"])
    return {"need": need, "batched": batched, "workers": workers, "workers_decoding": workers_decoding}


def report(args, measured: list[dict]) -> str:
    meta, rows = measured[0], measured[1:]
    from clusterkit.amp import cpu_model_name

    cpu = cpu_model_name()
    load = os.getloadavg()
    lines = [
        "# GPU feeding projection (on paper)",
        "",
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} by `{shlex.join(['python', *args.argv])}` on "
        f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 torch thread; load average at the end "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}" + (" (other jobs shared the cores: the CPU times are "
                                                           "somewhat high)" if load[0] > 1.5 else "") + ".",
        "",
        "**Assumptions** (not measured here): the GPU step runs at the FLOP rate of ResNet-50 v1.5 mixed-precision "
        f"training on one A100 80GB, {RN50_A100_IMAGES_PER_S:,} images/s (NVIDIA DeepLearningExamples, "
        "PyTorch/Classification/ConvNets/resnet50v1.5/README.md, 1 GPU, AMP), and an H100 at twice that; a step "
        "costs 3 forwards per view trained plus 1 per view through an EMA target; the batched augmentation is "
        f"memory-bound at {BANDWIDTH_USED:.0%} of the card's peak bandwidth (A100 80GB 2.0 TB/s, H100 SXM 3.35 TB/s) "
        f"plus {LAUNCH_SECONDS * 1e6:.0f} µs per aten operation; {WORKERS} workers each on a free core of this "
        "CPU's speed, nothing else limiting them. Small images use a GPU less well than ResNet-50 at 224 px, so "
        "the step's images/s are upper bounds of what the data must deliver.",
        "",
        f"**Counted and measured here**: forward FLOPs (torch.utils.flop_counter; ResNet-50 at 224 px: "
        f"{meta['rn50_flops'] / 1e9:.2f} GFLOPs); the batched path's aten operations and bytes read + written for "
        "both views of one batch (a dispatch mode, no timing); CPU seconds (`time.process_time`, main process, 1 "
        "thread) per image for the per-image path's two views from a cached uint8 image, and "
        f"{meta['jpeg_decode_s'] * 1e3:.2f} ms to decode a 500x375 JPEG with PIL (paid per image when files are "
        "decoded in the workers: `data.cache: false`, or the official code's ImageFolder).",
        "",
        "| case (recipe) | backbone, views | GFLOPs / forward | forwards / image | batched path: ops / batch, "
        "MB / image | per-image CPU ms / image (2 views) | batched CPU ms / image (here, 1 thread) |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} (`{r['recipe']}`) | {r['backbone']}, {r['size']} px from {r['stored']} px, "
                     f"batch {r['batch']} | {r['flops'] / 1e9:.3f} | {r['forwards']} | {r['ops_per_batch']}, "
                     f"{r['bytes_per_image'] / 1e6:.2f} | {r['per_image_cpu_s'] * 1e3:.2f} | "
                     f"{r['batched_cpu_s'] * 1e3:.2f} |")
    lines += ["", "Projected images/s (each image = two views):", "",
              "| case | GPU | step needs (upper bound) | batched path on the GPU delivers | "
              f"{WORKERS} per-image workers deliver (cached uint8) | {WORKERS} workers decoding JPEGs |",
              "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        for name, gpu in GPUS.items():
            p = project(meta, r, gpu)
            lines.append(f"| {r['case']} | {name} | {p['need']:,.0f} | {p['batched']:,.0f} | {p['workers']:,.0f} | "
                         f"{p['workers_decoding']:,.0f} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer images timed; writes nothing unless --out")
    p.add_argument("--out", default=None, help="default benchmarks/results/gpu_projection.md")
    args = p.parse_args(argv)
    args.argv = ["benchmarks/gpu_projection.py", *(argv if argv is not None else sys.argv[1:])]
    text = report(args, measure(args))
    print(text)
    out = args.out or (None if args.quick else str(REPO / "benchmarks" / "results" / "gpu_projection.md"))
    if out:
        Path(out).write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
