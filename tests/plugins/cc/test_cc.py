"""CC (Contrastive Clustering): the losses against naive loop computations, the heads, the
plugins' listing, the recipes, and one-epoch trainings of CC recipes on the bundled digits."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score
from torch import nn

from clusterkit import StepCache
from clusterkit.cli import main
from clusterkit.errors import PluginError
from clusterkit.plugin_manager import load_plugins
from clusterkit.recipe import load_recipe
from clusterkit_plugins.cc.cluster_contrast import ClusterContrast, cluster_contrastive_loss, cluster_entropy_loss
from clusterkit_plugins.cc.heads import ContrastiveHeads
from clusterkit_plugins.cc.instance_contrast import InstanceContrast, instance_contrastive_loss

REPO = Path(__file__).resolve().parents[3]
RECIPES = REPO / "recipes"
DATASETS = ["cifar10", "imagenet10", "imagenet_dogs", "tiny_imagenet"]
CC_PLUGINS = ("contrastive_heads", "instance_contrast", "cluster_contrast")


# -- naive references: plain Python floats and loops -------------------------------------------------

def _unit(vec, eps=1e-8):
    """vec / max(|vec|, eps): torch's CosineSimilarity, as the official cluster loss."""
    norm = math.sqrt(sum(x * x for x in vec))
    return [x / max(norm, eps) for x in vec]


def _dot(u, v):
    return sum(x * y for x, y in zip(u, v, strict=True))


def naive_nt_xent(vectors_a, vectors_b, tau):
    """NT-Xent over the 2N vectors [a_1..a_N, b_1..b_N]: anchor a_i's positive is b_i and
    vice versa; every other vector but the anchor itself is a negative.  Mean over 2N anchors."""
    n = len(vectors_a)
    vecs = [_unit(v) for v in list(vectors_a) + list(vectors_b)]
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        sims = {j: _dot(vecs[i], vecs[j]) / tau for j in range(2 * n) if j != i}
        total += -math.log(math.exp(sims[pos]) / sum(math.exp(s) for s in sims.values()))
    return total / (2 * n)


def naive_instance_loss(z_a, z_b, tau):
    return naive_nt_xent(z_a.tolist(), z_b.tolist(), tau)


def naive_cluster_loss(c_a, c_b, tau):
    """The cluster vectors are the columns of the B x K matrices, collected entry by entry."""
    rows_a, rows_b = c_a.tolist(), c_b.tolist()
    k = len(rows_a[0])
    cols_a = [[row[j] for row in rows_a] for j in range(k)]
    cols_b = [[row[j] for row in rows_b] for j in range(k)]
    return naive_nt_xent(cols_a, cols_b, tau)


def naive_entropy_term(c):
    """log K - H(P), P_k = (sum_t c_tk) / (sum_t sum_j c_tj), 0 log 0 = 0."""
    rows = c.tolist()
    k = len(rows[0])
    mass = [sum(row[j] for row in rows) for j in range(k)]
    total = sum(mass)
    entropy = -sum((m / total) * math.log(m / total) for m in mass if m > 0)
    return math.log(k) - entropy


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _probs(b, k, seed, scale=2.0):
    return torch.softmax(scale * torch.randn(b, k, generator=_gen(seed), dtype=torch.float64), dim=1)


# -- instance-level loss -----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau", [0.5, 0.1])
def test_instance_loss_matches_naive(seed, tau):
    g = _gen(seed)
    z_a = F.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1)
    z_b = F.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1)
    got = instance_contrastive_loss(z_a, z_b, tau).item()
    assert got == pytest.approx(naive_instance_loss(z_a, z_b, tau), rel=1e-10)


def test_instance_loss_normalises_raw_rows():
    g = _gen(3)
    z_a = 5 * torch.randn(5, 3, generator=g, dtype=torch.float64)
    z_b = torch.randn(5, 3, generator=g, dtype=torch.float64)
    got = instance_contrastive_loss(z_a, z_b, 0.5).item()
    assert got == pytest.approx(naive_instance_loss(z_a, z_b, 0.5), rel=1e-10)
    assert got == pytest.approx(instance_contrastive_loss(F.normalize(z_a, dim=1), F.normalize(z_b, dim=1), 0.5).item())


def test_instance_loss_by_hand_2x2():
    # z_a = z_b = I: each anchor has positive sim 1/tau and two negatives with sim 0
    eye = torch.eye(2, dtype=torch.float64)
    assert instance_contrastive_loss(eye, eye, 1.0).item() == pytest.approx(math.log(1 + 2 / math.e), rel=1e-12)
    assert instance_contrastive_loss(eye, eye, 0.5).item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-12)


def test_instance_loss_all_samples_identical_is_log_2b_minus_1():
    z = F.normalize(torch.ones(7, 4, dtype=torch.float64), dim=1)
    assert instance_contrastive_loss(z, z.clone(), 0.5).item() == pytest.approx(math.log(2 * 7 - 1), rel=1e-12)


def test_instance_loss_single_image_has_no_negatives():
    z = F.normalize(torch.randn(1, 4, dtype=torch.float64), dim=1)
    assert instance_contrastive_loss(z, -z, 0.5).item() == 0.0


def test_instance_loss_gradient_and_shapes():
    z_a = torch.randn(8, 5, requires_grad=True)
    z_b = torch.randn(8, 5, requires_grad=True)
    instance_contrastive_loss(z_a, z_b, 0.5).backward()
    assert torch.isfinite(z_a.grad).all() and z_a.grad.abs().sum() > 0 and z_b.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        instance_contrastive_loss(torch.randn(4, 3), torch.randn(5, 3), 0.5)


# -- cluster-level loss ------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_cluster_loss_matches_naive(seed, tau):
    c_a, c_b = _probs(9, 4, seed), _probs(9, 4, seed + 100)
    got = cluster_contrastive_loss(c_a, c_b, tau).item()
    assert got == pytest.approx(naive_cluster_loss(c_a, c_b, tau), rel=1e-10)


def test_cluster_loss_with_more_clusters_than_samples():
    c_a, c_b = _probs(3, 7, 4), _probs(3, 7, 5)   # K = 7 cluster vectors of length B = 3
    got = cluster_contrastive_loss(c_a, c_b, 1.0).item()
    assert got == pytest.approx(naive_cluster_loss(c_a, c_b, 1.0), rel=1e-10)


@pytest.mark.parametrize("logit", [-10.0, -30.0])
def test_cluster_loss_with_an_empty_cluster(logit):
    # cluster 2 gets (almost) no mass in either view: its column is ~1e-5 (norm above the
    # cosine's eps 1e-8: an exact cosine) or ~1e-13 (below it: divided by eps, as torch's
    # CosineSimilarity in the official code) everywhere
    logits_a = torch.randn(8, 5, generator=_gen(6), dtype=torch.float64)
    logits_b = torch.randn(8, 5, generator=_gen(7), dtype=torch.float64)
    logits_a[:, 2] = logits_b[:, 2] = logit
    c_a, c_b = torch.softmax(logits_a, 1), torch.softmax(logits_b, 1)
    assert c_a[:, 2].max() < (1e-4 if logit == -10.0 else 1e-12)
    got = cluster_contrastive_loss(c_a, c_b, 1.0).item()
    assert got == pytest.approx(naive_cluster_loss(c_a, c_b, 1.0), rel=1e-10)
    assert cluster_entropy_loss(c_a).item() == pytest.approx(naive_entropy_term(c_a), rel=1e-10)
    assert torch.isfinite(torch.tensor(got))


def test_cluster_loss_with_an_exactly_zero_column_is_finite_with_finite_gradients():
    c_a = _probs(6, 4, 8).clone()
    c_a[:, 1] = 0.0                              # e.g. a softmax that underflowed
    c_a = (c_a / c_a.sum(1, keepdim=True)).requires_grad_()
    c_b = _probs(6, 4, 9)
    contrast = cluster_contrastive_loss(c_a, c_b, 1.0)
    entropy = cluster_entropy_loss(c_a)
    # a zero vector has cosine 0 with everything (the naive _unit returns the zero vector)
    assert contrast.item() == pytest.approx(naive_cluster_loss(c_a.detach(), c_b, 1.0), rel=1e-10)
    assert entropy.item() == pytest.approx(naive_entropy_term(c_a.detach()), rel=1e-10)
    (contrast + entropy).backward()
    assert torch.isfinite(c_a.grad).all()


def test_cluster_loss_by_hand_2x2():
    # two images, two clusters, confident and consistent: columns e1, e2 in both views
    eye = torch.eye(2, dtype=torch.float64)
    assert cluster_contrastive_loss(eye, eye, 1.0).item() == pytest.approx(math.log(1 + 2 / math.e), rel=1e-12)
    assert cluster_entropy_loss(eye).item() == pytest.approx(0.0, abs=1e-12)   # masses (1/2, 1/2)


def test_cluster_loss_all_samples_identical():
    row = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    c = row.repeat(5, 1)                                      # every column is a multiple of (1,..,1)
    assert cluster_contrastive_loss(c, c.clone(), 1.0).item() == pytest.approx(math.log(2 * 3 - 1), rel=1e-12)
    h = -sum(p * math.log(p) for p in row.tolist())
    assert cluster_entropy_loss(c).item() == pytest.approx(math.log(3) - h, rel=1e-12)


# -- entropy term ------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_entropy_term_matches_naive(seed):
    c = _probs(10, 6, seed, scale=3.0)
    assert cluster_entropy_loss(c).item() == pytest.approx(naive_entropy_term(c), rel=1e-10)


def test_entropy_term_bounds_and_paper_form():
    k = 4
    uniform = torch.full((8, k), 1.0 / k, dtype=torch.float64)
    collapsed = F.one_hot(torch.zeros(8, dtype=torch.long), k).to(torch.float64)
    assert cluster_entropy_loss(uniform).item() == pytest.approx(0.0, abs=1e-12)
    assert cluster_entropy_loss(collapsed).item() == pytest.approx(math.log(k), rel=1e-12)
    c = _probs(8, k, 2)
    # the paper's -H(P) differs from the code's form by the constant log K only
    assert cluster_entropy_loss(c, offset=False).item() == pytest.approx(
        cluster_entropy_loss(c).item() - math.log(k), rel=1e-12)
    a = c.clone().requires_grad_()
    b = c.clone().requires_grad_()
    cluster_entropy_loss(a).backward()
    cluster_entropy_loss(b, offset=False).backward()
    assert torch.allclose(a.grad, b.grad)


# -- the plugins on a hand-made step -----------------------------------------------------------------

class _NoViews(nn.Module):
    """A backbone that must not be called on the views: the heads read cache["h", v]."""

    num_features = 6

    def forward(self, x):
        raise AssertionError("the CC heads called the backbone instead of reading cache['h', v]")


def _state(k=3):
    recipe = SimpleNamespace(e_step=SimpleNamespace(k=k))
    return SimpleNamespace(model=nn.ModuleDict({"backbone": _NoViews()}), num_clusters=k, recipe=recipe,
                           device=torch.device("cpu"))


def _step(state, producers, h):
    views = [torch.zeros(h[0].shape[0], 1, 2, 2)] * 2
    producers = {"h": lambda cache, v: h[v], **producers}
    return StepCache(views, torch.arange(h[0].shape[0]), producers, state)


def test_heads_read_h_and_produce_z_and_c():
    torch.manual_seed(0)
    state = _state(k=3)
    heads = ContrastiveHeads(ContrastiveHeads.Params(instance_dim=5))
    heads.setup(state)
    m = state.model
    assert [type(x) for x in m["instance_head"]] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (m["instance_head"][0].in_features, m["instance_head"][0].out_features) == (6, 6)   # hidden = d
    assert m["instance_head"][2].out_features == 5 and m["cluster_head"][2].out_features == 3
    h = [torch.randn(4, 6), torch.randn(4, 6)]               # e.g. a masked encoder's features
    cache = _step(state, heads.register_outputs(state), h)
    z, c = cache["z", 1], cache["c", 0]
    assert torch.allclose(z, F.normalize(m["instance_head"](h[1]), dim=1))
    assert torch.allclose(z.norm(dim=1), torch.ones(4))
    assert torch.allclose(c, torch.softmax(m["cluster_head"](h[0]), dim=1))
    assert torch.allclose(c.sum(1), torch.ones(4))

    losses = {**InstanceContrast().compute_losses(state, cache), **ClusterContrast().compute_losses(state, cache)}
    assert set(losses) == {"instance_contrast", "cluster_contrast", "cluster_entropy"}
    assert losses["instance_contrast"].item() == pytest.approx(
        naive_instance_loss(cache["z", 0].detach().double(), cache["z", 1].detach().double(), 0.5), rel=1e-5)
    c_a, c_b = cache["c", 0].detach().double(), cache["c", 1].detach().double()
    assert losses["cluster_contrast"].item() == pytest.approx(naive_cluster_loss(c_a, c_b, 1.0), rel=1e-5)
    assert losses["cluster_entropy"].item() == pytest.approx(
        naive_entropy_term(c_a) + naive_entropy_term(c_b), rel=1e-5, abs=1e-7)


def test_cluster_contrast_weights_scale_both_terms():
    state = _state(k=3)
    heads = ContrastiveHeads()
    heads.setup(state)
    h = [torch.randn(5, 6), torch.randn(5, 6)]
    base = ClusterContrast().compute_losses(state, _step(state, heads.register_outputs(state), h))
    params = ClusterContrast.Params(weight=0.5, entropy_weight=3.0)
    scaled = ClusterContrast(params).compute_losses(state, _step(state, heads.register_outputs(state), h))
    assert scaled["cluster_contrast"].item() == pytest.approx(0.5 * base["cluster_contrast"].item(), rel=1e-6)
    assert scaled["cluster_entropy"].item() == pytest.approx(1.5 * base["cluster_entropy"].item(), rel=1e-6)


def test_predict_is_the_cluster_heads_argmax():
    state = _state(k=4)
    heads = ContrastiveHeads(ContrastiveHeads.Params(hidden_dim=8))
    heads.setup(state)
    feats = torch.randn(20, 6)
    pred = heads.predict(state, feats)
    probs = torch.softmax(state.model["cluster_head"](feats), dim=1)
    assert torch.equal(pred.labels, probs.argmax(1))
    assert torch.allclose(pred.confidence, probs.max(1).values)
    assert not pred.confidence.requires_grad
    with pytest.raises(PluginError, match="List contrastive_heads first"):
        heads.predict(state, torch.randn(20, 256))


# -- listing and recipes -----------------------------------------------------------------------------

def test_clusterkit_plugins_lists_the_cc_plugins(capsys):
    assert main(["plugins", "--json"]) == 0
    infos = {d["name"]: d for d in json.loads(capsys.readouterr().out)}
    for name in CC_PLUGINS:
        assert name in infos and "error" not in infos[name], name
        assert infos[name]["source"] == "built-in"
        assert all(doc for _, _, _, doc in infos[name]["params"]), f"{name}: a parameter without a doc"
    assert set(infos["contrastive_heads"]["hooks"]) == {"setup", "register_outputs", "embed", "predict"}
    assert infos["instance_contrast"]["hooks"] == ["compute_losses"]
    assert infos["cluster_contrast"]["hooks"] == ["compute_losses"]
    defaults = {name: {p[0]: p[2] for p in infos[name]["params"]} for name in CC_PLUGINS}
    assert defaults["contrastive_heads"] == {"instance_dim": 128, "hidden_dim": None}
    assert defaults["instance_contrast"] == {"temperature": 0.5, "weight": 1.0}
    assert defaults["cluster_contrast"] == {"temperature": 1.0, "weight": 1.0, "entropy_weight": 1.0,
                                            "entropy_offset": True}


@pytest.mark.parametrize("key", DATASETS)
def test_cc_recipes_follow_the_paper_and_the_matched_twins_digpro(key):
    published = load_recipe(RECIPES / f"cc_{key}.yaml")
    matched = load_recipe(RECIPES / f"cc_{key}_matched.yaml")
    digpro = load_recipe(RECIPES / f"digpro_{key}.yaml")
    for r in (published, matched):
        load_plugins(r.plugins)
        assert set(r.plugins) == set(CC_PLUGINS)
        assert r.plugins["instance_contrast"]["temperature"] == 0.5
        assert r.plugins["cluster_contrast"]["temperature"] == 1.0
        assert (r.optim.name, r.optim.lr, r.optim.lr_scaling, r.optim.weight_decay) == ("adam", 3e-4, "none", 0.0)
        assert (r.schedule.epochs, r.schedule.warmup_epochs, r.schedule.lr_schedule) == (1000, 0, "constant")
        assert r.data.drop_last and r.e_step.k == digpro.e_step.k and r.data.split == digpro.data.split
        s = 1.0 if key in ("imagenet10", "imagenet_dogs") else 0.5
        a = r.data.augment
        assert a.jitter == (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s) and (a.jitter_p, a.grayscale_p) == (0.8, 0.2)
        assert a.blur_p == (0.5 if s == 1.0 else 0.0)
    assert (published.model.backbone, published.data.image_size, published.data.batch_size) == ("resnet34", 224, 256)
    assert (matched.model.backbone, matched.data.image_size, matched.data.batch_size) == (
        digpro.model.backbone, digpro.data.image_size, digpro.data.batch_size)
    # apart from backbone, size, batch and evaluation cadence the twin is the published recipe
    a, b = published.to_dict(), matched.to_dict()
    for d in (a, b):
        d.pop("name"), d.pop("model"), d["data"].pop("image_size"), d["data"].pop("batch_size"), d.pop("eval")
    assert a == b
    assert "Published" in (RECIPES / f"cc_{key}.yaml").read_text()
    assert "Published" in (RECIPES / f"cc_{key}_matched.yaml").read_text()


# -- end to end ----------------------------------------------------------------------------------------

def test_cc_trains_one_epoch_on_digits(tmp_path, tiny_recipe_data, restore_threads):
    from clusterkit.checkpoint import latest_checkpoint, load_checkpoint
    from clusterkit.rundir import make_run_dir
    from clusterkit.trainer import Trainer

    raw = tiny_recipe_data
    raw["name"] = "cc_digits_test"
    raw["optim"] = {"name": "adam", "lr": 1e-3, "lr_scaling": "none", "weight_decay": 0.0}
    raw["schedule"] = {"epochs": 1, "warmup_epochs": 0, "lr_schedule": "constant"}
    raw["eval"] = {"pixel_baseline": "never"}
    raw["run"].update({"device": "cpu", "threads": 1})
    raw["plugins"] = {"contrastive_heads": {"instance_dim": 16}, "instance_contrast": {}, "cluster_contrast": {}}
    recipe = load_recipe(data=raw)
    run_dir = make_run_dir(recipe, str(tmp_path / "run"), force=False)
    trainer = Trainer(recipe, run_dir)
    summary = trainer.fit()

    assert summary["steps"] == 1797 // 256
    assert summary["protocol"]["prediction"] == "predict hook: contrastive_heads"
    labels = trainer.last_prediction.labels
    assert labels.shape == (1797,) and int(labels.min()) >= 0 and int(labels.max()) < 10
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    # that the method learns (NMI above the untrained network's): tests/plugins/test_methods_learn.py
    assert summary["metrics"] == {name: record[name] for name in ("nmi", "acc", "ari")}  # the last evaluation
    # of the cluster head's predictions, recomputed here (scikit-learn's arithmetic NMI)
    assert summary["metrics"]["nmi"] == pytest.approx(
        normalized_mutual_info_score(trainer.eval_ds.targets.numpy(), labels.cpu().numpy()), abs=1e-9)
    for term in ("instance_contrast", "cluster_contrast", "cluster_entropy"):
        assert math.isfinite(record[term]), term
    model = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))["model"]
    assert model["instance_head.2.weight"].shape == (16, 32)      # d = 32 (the narrow ResNet's width)
    assert model["cluster_head.2.weight"].shape == (10, 32)


DIGITS = ["data.dataset=digits", "data.root=null", "data.guide=null", "data.split=all",
          "data.augment.hflip=false", "data.augment.crop_scale=[0.6, 1.0]",
          "model.backbone_kwargs={channels: [8, 16, 16, 32]}", "schedule.epochs=1",
          "eval.pixel_baseline=never", "run.progress=false", "run.device=cpu", "run.threads=1"]


@pytest.mark.parametrize("recipe,size", [("cc_cifar10_matched", 8), ("cc_imagenet10_matched", 8),
                                         ("cc_tiny_imagenet_matched", 8), ("cc_imagenet_dogs", 32)])
def test_cc_recipe_trains_one_epoch_shrunk_to_digits(tmp_path, restore_threads, recipe, size):
    """The shipped recipes run as they are, with their data swapped for the bundled digits
    (and, for the published ResNet-34 recipe, a narrow network at 32 px)."""
    out = tmp_path / "run"
    args = ["run", str(RECIPES / f"{recipe}.yaml"), "--out", str(out)]
    for o in DIGITS + [f"data.image_size={size}"]:
        args += ["--set", o]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    base = load_recipe(RECIPES / f"{recipe}.yaml")
    assert summary["num_train"] == 1797 and summary["steps"] == 1797 // base.data.batch_size
    for key in ("nmi", "acc", "ari"):
        assert 0.0 <= summary["metrics"][key] <= 1.0
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"instance_contrast", "cluster_contrast", "cluster_entropy"} <= set(last)
