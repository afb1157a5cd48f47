"""Do the batched and per-image pipelines draw the same views?  Summary statistics of many views
of the same images, made by each (issue 24, item 2).

Loads a parity recipe (``benchmarks/parity/{cc,propos}_fmnist.yaml``) on the harness's image
folder (decoded at ``data.decode_size`` as in training), makes R views of 256 images with
:class:`BatchedTwoView` and with :class:`PerImageTwoView` (the first view), maps them back to
[0, 1] pixels and compares, per view, the mean, std, chroma (max - min over channels), min, max
and mean horizontal gradient: the mean of each over all views per pipeline and the difference in
standard errors.  A distribution difference in any op that changes these shows up as |diff/se|
well above 2.

Usage (repo root, clusterkit's venv; the folder is written by benchmarks/parity.py)::

    nice -n 15 python benchmarks/pipeline_view_stats.py cc 40 \
        /tmp/pipeline-parity/cc_batched/data/fmnist_test_first5000
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(1)
from clusterkit.data import load_dataset  # noqa: E402
from clusterkit.data.augment import BatchedTwoView, PerImageTwoView  # noqa: E402
from clusterkit.recipe import apply_overrides, load_raw, load_recipe  # noqa: E402

method = sys.argv[1]
root = sys.argv[3] if len(sys.argv) > 3 else "/tmp/pipeline-parity/cc_batched/data/fmnist_test_first5000"
raw = apply_overrides(load_raw(Path(__file__).resolve().parent / "parity" / f"{method}_fmnist.yaml"),
                      [f"data.root={root}"])
d = load_recipe(data=raw).data
ds = load_dataset(d.dataset, d.root, d.split, d.decode_size or d.image_size, cache=False)
print(d.augment)
idx = torch.arange(0, 5000, 10)[:256]
imgs = torch.stack([ds[int(i)][0] if isinstance(ds[int(i)], tuple) else ds[int(i)] for i in idx])
print(imgs.shape, imgs.dtype)
torch.manual_seed(0)
bt = BatchedTwoView(d.augment, d.image_size, ds.info)
pi = PerImageTwoView(d.augment, d.image_size, ds.info)
mean = torch.tensor(ds.info.mean).view(1, 3, 1, 1)
std = torch.tensor(ds.info.std).view(1, 3, 1, 1)


def stats(v):
    x = v * std + mean  # back to [0, 1]
    gray = (x.amax(1) - x.amin(1)).mean((1, 2))  # colourfulness per view
    return {"mean": x.mean((1, 2, 3)), "std": x.std((1, 2, 3)), "chroma": gray,
            "frac_gray": (gray < 1e-4).float(), "min": x.amin((1, 2, 3)), "max": x.amax((1, 2, 3)),
            "edge": (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))}


acc = {"batched": {}, "per_image": {}}
R = int(sys.argv[2]) if len(sys.argv) > 2 else 20
for _rep in range(R):
    v1, _ = bt(imgs)
    for k, s in stats(v1).items():
        acc["batched"].setdefault(k, []).append(s)
    w = torch.stack([pi(im)[0] for im in imgs])
    for k, s in stats(w).items():
        acc["per_image"].setdefault(k, []).append(s)
for k in acc["batched"]:
    b = torch.cat(acc["batched"][k]).double()
    p = torch.cat(acc["per_image"][k]).double()
    se = (b.var() / b.numel() + p.var() / p.numel()).sqrt()
    print(f"{k:10s} batched {b.mean():.5f} (sd {b.std():.4f})  per_image {p.mean():.5f} (sd {p.std():.4f})  "
          f"diff/se {(p.mean() - b.mean()) / se:+.1f}")
