"""Images per second of the two training pipelines: batched on the device vs per-image.

``data.pipeline: batched`` augments whole uint8 batches with clusterkit's BatchedTwoView;
``data.pipeline: per_image`` runs torchvision transforms.v2 (PerImageTwoView) on one
image at a time in DataLoader workers.  Both are built by
clusterkit.data.pipeline.build_train_pipeline from the same recipe ``data`` section
(the DigPro/ProPos CIFAR-10 setting: data.augment defaults, image_size 32, batch 256,
drop_last) over the same in-memory 32x32 uint8 images, and timed from the first batch
request to the two views of the last batch (one epoch, worker start-up included, as in
training), side by side in one process, the order rotating between repeats, with the
same CPU budget: ``--threads`` cores.

Usage:
    python benchmarks/data_pipeline.py [--threads 2] [--repeats 5] [--data synthetic|fashion_mnist]
    python benchmarks/data_pipeline.py --quick        # smoke run (seconds, 1 thread), writes nothing

The default run (10,000 images, 5 repeats, 2 threads) takes about 3 minutes on 2 idle cores.
Run it on an idle machine: with other jobs on the cores, multi-threaded timings collapse.

Writes a markdown table to benchmarks/results/data_pipeline.md (and prints it).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clusterkit.data import DATASETS, ImageDataset, load_dataset  # noqa: E402
from clusterkit.data.pipeline import build_train_pipeline  # noqa: E402
from clusterkit.recipe import DataConfig  # noqa: E402

IMAGE_SIZE = 32
BATCH = 256
TARGET = 3.0  # issue 6: batched >= 3x per-image


def synthetic_cifar(n: int, seed: int = 0) -> ImageDataset:
    """``n`` CIFAR-like uint8 (3, 32, 32) images: smooth random colour layouts plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                      align_corners=False)
    x = (x + 0.08 * torch.randn(x.shape, generator=g)).clamp_(0, 1)
    images = x.mul_(255).round_().to(torch.uint8)
    return ImageDataset("cifar10", "synthetic", [str(c) for c in range(10)], torch.arange(n) % 10,
                        DATASETS["cifar10"], images)


def fashion_mnist_32(n: int) -> ImageDataset:
    """The first ``n`` Fashion-MNIST test images, bilinearly resized 28 -> 32, uint8 (1, 32, 32)."""
    ds = load_dataset("fashion_mnist", None, "test")
    images = ds.images[:n].float()
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = images.round_().clamp_(0, 255).to(torch.uint8)
    return ImageDataset("fashion_mnist", "test", ds.classes, ds.targets[:n], ds.info, images)


def make_case(ds: ImageDataset, pipeline: str, workers: int, threads: int, device: torch.device):
    """(label, note, run one epoch) for one configuration."""
    cfg = DataConfig(image_size=IMAGE_SIZE, batch_size=BATCH, pipeline=pipeline, num_workers=workers)
    gen = torch.Generator()
    pipe = build_train_pipeline(ds, cfg, batch_size=BATCH, device=device, generator=gen)
    if pipeline == "batched":
        label = f"batched (BatchedTwoView), torch threads {threads}"
        note = f"main process, {threads} torch thread(s)"
    elif workers == 0:
        label = "per_image (transforms.v2), num_workers 0"
        note = f"main process, {threads} torch thread(s)"
    else:
        label = f"per_image (transforms.v2), num_workers {workers}"
        note = f"{workers} worker process(es) x 1 torch thread; main process only collects"

    def epoch(seed: int, max_batches: int | None = None) -> tuple[float, int]:
        torch.set_num_threads(threads)
        gen.manual_seed(seed)
        torch.manual_seed(seed)
        n = 0
        t0 = time.perf_counter()
        for i, batch in enumerate(pipe.loader):
            views, index = pipe.views(batch)
            n += len(index)
            if max_batches is not None and i + 1 >= max_batches:
                break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, n

    return label, note, epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU cores for every configuration (default 2; 1 with --quick)")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per configuration")
    parser.add_argument("--images", type=int, default=10_000, help="images in the data set")
    parser.add_argument("--data", choices=["synthetic", "fashion_mnist"], default="synthetic",
                        help="synthetic: CIFAR-like 3x32x32 (full colour augmentation); fashion_mnist: the test "
                        "split resized to 32x32 (1 channel: no saturation, hue or grayscale)")
    parser.add_argument("--device", default="cpu", help="where the views go (batched: where they are made)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 512 images, 2 repeats, 1 thread; writes "
                        "nothing unless --out is given")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/data_pipeline.md)")
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats = min(args.images, 512), min(args.repeats, 2)
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    out = args.out or (None if args.quick else str(Path(__file__).resolve().parent / "results" / "data_pipeline.md"))
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)

    ds = synthetic_cifar(args.images) if args.data == "synthetic" else fashion_mnist_32(args.images)
    cases = [make_case(ds, "batched", 0, args.threads, device),
             make_case(ds, "per_image", 0, args.threads, device),
             make_case(ds, "per_image", args.threads, args.threads, device)]
    if args.threads > 1:
        cases.append(make_case(ds, "batched", 0, 1, device))

    for _, _, epoch in cases:  # warm-up: lazy imports, thread pools, the first worker start
        epoch(10_000, max_batches=2)

    load_before = os.getloadavg()
    times: list[list[float]] = [[] for _ in cases]
    counts = [0] * len(cases)
    for rep in range(args.repeats):
        order = list(range(len(cases)))
        order = order[rep % len(order):] + order[:rep % len(order)]
        for c in order:
            seconds, counts[c] = cases[c][2](rep)
            times[c].append(seconds)
            print(f"rep {rep}: {cases[c][0]}: {counts[c] / seconds:,.0f} images/s ({seconds:.2f} s)", flush=True)
    load_after = os.getloadavg()
    torch.set_num_threads(args.threads)
    busy = max(load_before[0], load_after[0]) > 0.5

    rate_med = [counts[c] / statistics.median(times[c]) for c in range(len(cases))]
    rate_best = [counts[c] / min(times[c]) for c in range(len(cases))]
    best_per_image = max(rate_med[1], rate_med[2])
    ratio = rate_med[0] / best_per_image
    data_text = ("synthetic CIFAR-like uint8 3x32x32 images (smooth random colour layouts plus noise, seed 0)"
                 if args.data == "synthetic"
                 else "Fashion-MNIST test images, resized 28 -> 32 (bilinear), uint8 1x32x32")
    lines = [
        "# Training data pipeline: batched vs per-image (images/s)",
        "",
        f"Command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}` (from the repo root)"
        + ("  \n**Smoke run (--quick): not for reporting.**" if args.quick else ""),
        "",
        f"Data: {ds.images.shape[0]:,} {data_text}, held in memory. Setting: data.augment defaults (the "
        f"DigPro/ProPos CIFAR-10 augmentation: RandomResizedCrop(32, scale 0.08-1), flip, ColorJitter(0.4, 0.4, "
        f"0.4, 0.1) p 0.8, grayscale p 0.2, no blur), two views, image_size {IMAGE_SIZE}, batch {BATCH}, "
        f"drop_last; views go to `{device}`. One timed epoch = {counts[0]:,} images, from the first batch request "
        f"to the two views of the last batch (worker start-up included, as in training); median and best of "
        f"{args.repeats} epochs per configuration, the order rotating between repeats. CPU budget {args.threads} "
        "core(s) for every configuration (see the 'CPU use' column).",
        "",
        f"Environment: torch {torch.__version__}, torchvision {torchvision.__version__}, Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); "
        f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}; {datetime.now():%Y-%m-%d %H:%M}.",
        "",
        "| configuration | CPU use | images/s (median) | images/s (best) | s/epoch (median) | x per-image |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for c, (label, note, _) in enumerate(cases):
        lines.append(f"| {label} | {note} | {rate_med[c]:,.0f} | {rate_best[c]:,.0f} | "
                     f"{statistics.median(times[c]):.2f} | {rate_med[c] / best_per_image:.2f} |")
    verdict = "met" if ratio >= TARGET else "NOT met"
    lines += [
        "",
        f"Ratio (median images/s): batched with {args.threads} thread(s) / the faster per-image configuration = "
        f"**{ratio:.2f}x** (issue 6 target: >= {TARGET:.0f}x, {verdict}).",
    ]
    if busy:
        lines += [
            "",
            "Warning: other work was running (load average above 0.5). On a busy machine torch's multi-threaded "
            "kernels can slow down many times over (threads waiting for cores), so these timings, those with "
            "more than 1 thread above all, do not measure the pipelines. Rerun on an idle machine.",
        ]
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"written to {path}")


if __name__ == "__main__":
    main()
