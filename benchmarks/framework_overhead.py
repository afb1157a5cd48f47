"""Framework overhead: a DigPro training step through clusterkit's hooks vs. the same step as one plain function.

The hook path is ``Trainer.step`` after the batched augmentation (:func:`hook_step`) of a
trainer built for a DigPro recipe (default ``recipes/quickstart.yaml``: byol_target, kmeans_e_step,
diffused_sampling, prototype_aggregation, momentum_grouping).  The plain path is one
function written directly against the same modules of ``trainer.state.model`` (a deep
copy of them, with a deep copy of the optimiser), the same augmentation object
(``trainer.augment``) and the plugins' pure loss functions: forward of both views, the
three losses, their sum, zero_grad, backward, the optimiser step, the EMA of the target,
the memory-bank push and the regrouping k-means at the same iterations.  No hooks, no
StepCache, no loss-term bookkeeping, no finiteness check.

1. Equivalence: from identical model, optimiser and RNG state, ``--check-steps`` steps of
   each path (enough to include a regrouping iteration) must give the same loss terms, and
   afterwards the same parameters and buffers (to ``--tol``).  The script stops otherwise:
   the timing would compare different computations.
2. Timing, in one process, interleaved (hook, plain, hook, plain, ...; which one goes first
   alternates per pair), after ``--warmup`` pairs, ``--steps`` steps of each on the same
   batch; torch's global RNG is re-seeded identically before the two steps of a pair, so
   both paths do exactly the same arithmetic (including the data-dependent k-means
   iterations of the regrouping) and their states stay equal, which is checked again at
   the end.  Reported: median, min, mean of each path, the ratio hook/plain of the medians
   and of the minima, the median of the paired differences, and the share of a hook step
   spent outside the plain computation, (hook - plain) / hook.  The target (issue 6) is a
   hook path at most 5% slower.
3. Dispatch micro-timings: the cost of one ``trainer.hooks.call`` of a hook whose only
   implementation returns at once, of the trainer's non-finite watch, and of StepCache
   construction and lookups, each alone, for scale (pieces whose internals changed are left out).

The plain step mirrors the plugins as they are: if a plugin changes what it computes (or
how it draws its noise), the equivalence check fails and the script stops, naming no
timing; update ``PlainStep`` then.

The step runs after the warm-up epochs (every loss term active) and after one E-step.
The batch is one batch of the recipe's data loader (uint8 images at their stored size,
the augmentation crops them to ``data.image_size``), reused for every step.

Usage (from the repository root):

    python benchmarks/framework_overhead.py                 # quickstart, batch 256, 2 threads
    python benchmarks/framework_overhead.py --set data.image_size=32 --steps 100    # 32x32 views
    python benchmarks/framework_overhead.py --quick         # smoke run (< 30 s), writes nothing

Writes benchmarks/results/framework_overhead.md (``--out``), and prints it.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import inspect
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from step_setup import augmented_step, trainer_after_warmup  # noqa: E402

from clusterkit.recipe import load_recipe  # noqa: E402
from clusterkit.state import StepCache  # noqa: E402
from clusterkit.trainer import Trainer  # noqa: E402
from clusterkit_plugins.digpro.momentum_grouping import grouping_direction, regroup  # noqa: E402
from clusterkit_plugins.propos.byol_target import cosine_momentum, ema_update  # noqa: E402
from clusterkit_plugins.propos.diffused_sampling import diffuse, diffused_sampling_loss  # noqa: E402
from clusterkit_plugins.propos.prototype_aggregation import prototype_aggregation_loss  # noqa: E402

DEFAULT_RECIPE = ROOT / "recipes" / "quickstart.yaml"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "framework_overhead.md"
TARGET = 1.05  # issue 6: the hook path at most 5% slower
PLUGINS = ("byol_target", "kmeans_e_step", "diffused_sampling", "prototype_aggregation", "momentum_grouping")
TERMS = ("diffused_sampling", "prototype_aggregation", "momentum_grouping")
#: diffuse(q, sigma, eps): the noise comes from the caller, drawn per step from (run.seed, step, salt)
#: (clusterkit's StepCache.randn); diffuse(q, sigma): drawn inside from torch's global RNG.
NOISE_FROM_CALLER = len(inspect.signature(diffuse).parameters) == 3


# -- the hook path's trainer ------------------------------------------------------------------------

def build_trainer(recipe_path: str, overrides: list[str], threads: int, device: str | None) -> Trainer:
    """:func:`step_setup.trainer_after_warmup` for a recipe with exactly the plugins the plain step
    mirrors."""
    recipe = load_recipe(recipe_path, overrides)
    if set(recipe.plugins) != set(PLUGINS):
        raise SystemExit(f"framework_overhead: the plain step mirrors exactly the plugins {', '.join(PLUGINS)}; "
                         f"the recipe has {', '.join(recipe.plugins)}.")
    sets = overrides if device is None else [*overrides, f"run.device={device}"]
    return trainer_after_warmup(recipe_path, sets, threads, "clusterkit-overhead-")


hook_step = augmented_step  # the hook path: the trainer's own step


def plugin_params(trainer: Trainer) -> dict:
    """The parameters the plain step reads (refusing options it does not mirror)."""
    p = {name: trainer.plugins[name].params for name in PLUGINS}
    mg = p["momentum_grouping"]
    if mg.extra_ema or mg.group_init == "kmeans":
        raise SystemExit("framework_overhead: the plain step does not mirror momentum_grouping's extra_ema or "
                         "group_init='kmeans'; benchmark with their defaults.")
    if trainer.state.in_warmup:
        raise SystemExit("framework_overhead: the benchmark step must run after the warm-up epochs.")
    return p


# -- the plain path ----------------------------------------------------------------------------------

class PlainStep:
    """The DigPro step of the recipe as one function over its own copy of the model and optimiser.

    Same order of operations as the hook path (so the same RNG draws and BatchNorm updates):
    diffused sampling (q0, noise, p, k1; q1, noise, p, k0), prototype aggregation, dynamic
    grouping (p(q0), direction 0->1, groups <- G'; p(q1), direction 1->0, groups <- G'), the
    sum, backward, optimiser step, EMA of the target, bank push, regrouping.  In one process
    the plugins' gathered "global batch" is the batch, so no gather appears here.  The
    diffusion noise is drawn as diffused_sampling draws it (see :meth:`diffused`).
    """

    def __init__(self, trainer: Trainer):
        state = trainer.state
        self.model, self.optimizer = copy.deepcopy((state.model, trainer.optimizer))
        self.memory = copy.deepcopy(trainer.plugins["momentum_grouping"].memory)  # its own groups and bank
        self._check_optimizer()
        self.augment = trainer.augment
        self.device = trainer.device
        self.use_amp = trainer.use_amp
        self.pseudo_labels = state.pseudo_labels
        self.num_clusters = state.num_clusters
        self.total_steps = state.total_steps
        self.step_count = state.step
        self.run_seed = state.recipe.run.seed
        self.channels_last = bool(getattr(state.recipe.run, "channels_last", False))
        p = plugin_params(trainer)
        self.byol, self.mg = p["byol_target"], p["momentum_grouping"]
        self.sigma = trainer.plugins["diffused_sampling"].sigma(state)
        self.ds_weight = p["diffused_sampling"].weight
        self.pa_weight, self.pa_tau = p["prototype_aggregation"].weight, p["prototype_aggregation"].temperature
        self.regroup_every = self.mg.regroup_every or state.num_clusters
        self.mg_seed = state.recipe.run.seed if self.mg.seed is None else self.mg.seed

    def _check_optimizer(self) -> None:
        ids = {id(q) for q in self.model.parameters()}
        opt_ids = [id(q) for g in self.optimizer.param_groups for q in g["params"]]
        if not opt_ids or any(i not in ids for i in opt_ids):
            raise SystemExit("framework_overhead: the copied optimiser does not hold the copied model's parameters.")

    def diffused(self, q: torch.Tensor, view: int) -> torch.Tensor:
        """q + sigma * eps (q itself when sigma is 0), with the noise drawn as the plugin draws it."""
        if self.sigma == 0:
            return q
        if not NOISE_FROM_CALLER:
            return diffuse(q, self.sigma)
        # one process: the global batch is the batch; a generator seeded by (run.seed, step, salt)
        seed = zlib.crc32(f"{self.run_seed}:{self.step_count}:diffused_sampling/view{view}".encode())
        gen = torch.Generator(device=q.device).manual_seed(seed)
        eps = torch.randn(q.shape, generator=gen, device=q.device, dtype=torch.float32)
        return diffuse(q, self.sigma, eps)

    @torch.no_grad()
    def regroup(self, memory, iteration: int) -> None:
        """G <- normalised k-means centres of the bank (kept when it has fewer rows than groups)."""
        bank = memory.filled()
        if bank.shape[0] >= memory.groups.shape[0]:
            mg = self.mg
            memory.groups.copy_(regroup(bank, memory.groups.shape[0], seed=self.mg_seed + iteration,
                                        n_init=mg.kmeans_n_init, max_iter=mg.kmeans_max_iter, tol=mg.kmeans_tol,
                                        metric=mg.regroup_metric))

    def __call__(self, images: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.model
        backbone, projector, predictor = m["backbone"], m["projector"], m["predictor"]
        t_backbone, t_projector, memory = m["target_backbone"], m["target_projector"], self.memory
        timing = self.mg.regroup_timing
        iteration = memory.iteration + 1  # numbered from 1, as the plugin counts
        regroups = (iteration > 1 if timing == "start" else True) and iteration % self.regroup_every == 0
        if regroups and timing == "start":  # official: before the forward, on the earlier bank
            self.regroup(memory, iteration)
        v0, v1 = self.augment(images.to(self.device, non_blocking=True))
        if self.channels_last:
            v0, v1 = (v.contiguous(memory_format=torch.channels_last) for v in (v0, v1))
        index = index.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            # diffused sampling, DigPro Eq. 2 (both directions)
            q0 = projector(backbone(v0))
            d0 = predictor(self.diffused(q0, 0))
            with torch.no_grad():
                k1 = t_projector(t_backbone(v1))
            q1 = projector(backbone(v1))
            d1 = predictor(self.diffused(q1, 1))
            with torch.no_grad():
                k0 = t_projector(t_backbone(v0))
            ds = self.ds_weight * torch.stack([diffused_sampling_loss(d0, k1), diffused_sampling_loss(d1, k0)]).mean()
            # prototype aggregation, Eq. 7-9
            labels = self.pseudo_labels[index]
            pa = self.pa_weight * torch.stack([
                prototype_aggregation_loss(q0, k1, labels, self.num_clusters, self.pa_tau),
                prototype_aggregation_loss(q1, k0, labels, self.num_clusters, self.pa_tau)]).mean()
            # dynamic grouping, Eq. 3-6: G is updated after each direction
            group_losses = []
            for q_a, k_b in ((q0, k1), (q1, k0)):
                loss, new_groups, _ = grouping_direction(q_a, k_b, predictor(q_a), memory.groups,
                                                         self.mg.beta, self.mg.temperature)
                memory.groups.copy_(new_groups.detach())
                group_losses.append(loss)
            mg = self.mg.weight * torch.stack(group_losses).mean()
        ds, pa, mg = ds.float(), pa.float(), mg.float()
        total = ds + pa + mg
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        # EMA of the target (parameters only): from the pre-step online weights (ema_timing
        # "before_step", official) or from the updated ones ("after_step")
        b = self.byol
        alpha = (cosine_momentum(b.momentum, self.step_count + 1, self.total_steps) if b.cosine_increase
                 else b.momentum)
        if b.ema_timing == "before_step":
            ema_update(t_backbone, backbone, alpha)
            ema_update(t_projector, projector, alpha)
        self.optimizer.step()
        self.step_count += 1
        if b.ema_timing == "after_step":
            ema_update(t_backbone, backbone, alpha)
            ema_update(t_projector, projector, alpha)
        # memory bank of norm(q) of both views; regroup_timing "end" regroups after the step
        with torch.no_grad():
            rows = torch.cat([F.normalize(q.detach().float(), dim=1) for q in (q0, q1)])
            memory.push_truncating(rows) if self.mg.bank == "official" else memory.push(rows)
            memory.iteration += 1
        if regroups and timing == "end":
            self.regroup(memory, iteration)
        return {"diffused_sampling": ds.detach(), "prototype_aggregation": pa.detach(),
                "momentum_grouping": mg.detach(), "loss": total.detach()}


# -- checks ------------------------------------------------------------------------------------------

def _full_state(model: torch.nn.Module, memory) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers, and momentum_grouping's groups, bank and counters."""
    grouping = {f"momentum_grouping.{k}": v if torch.is_tensor(v) else torch.tensor(float(v))
                for k, v in memory.state_dict().items()}
    return {**model.state_dict(), **grouping}


def state_difference(trainer: Trainer, plain: PlainStep) -> tuple[float, str]:
    """Largest absolute difference over every parameter and buffer and the group memory, and where."""
    sa = _full_state(trainer.state.model, trainer.plugins["momentum_grouping"].memory)
    sb = _full_state(plain.model, plain.memory)
    if sa.keys() != sb.keys():
        return float("inf"), "different keys"
    worst, where = 0.0, ""
    for key in sa:
        x, y = sa[key], sb[key]
        d = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
        if d > worst or not where:
            worst, where = d, key
    return worst, where


def check_equivalence(trainer: Trainer, plain: PlainStep, images, index, steps: int, tol: float, seed: int) -> dict:
    """``steps`` steps of each path from the same state and RNG; max |difference| per term and of the state."""
    diffs = {t: 0.0 for t in (*TERMS, "loss")}
    first = {}
    for i in range(steps):
        torch.manual_seed(seed + i)
        hook = hook_step(trainer, images, index)
        torch.manual_seed(seed + i)
        flat = plain(images, index)
        if hook is None:
            raise SystemExit("framework_overhead: the hook step was skipped (non-finite loss).")
        if set(hook) != set(flat):
            raise SystemExit(f"framework_overhead: loss terms differ: hook {sorted(hook)}, plain {sorted(flat)}.")
        for t in diffs:
            diffs[t] = max(diffs[t], abs(float(hook[t]) - float(flat[t])))
        if i == 0:
            first = {t: (float(hook[t]), float(flat[t])) for t in diffs}
    state_diff, where = state_difference(trainer, plain)
    ok = max(diffs.values()) <= tol and state_diff <= tol
    return {"steps": steps, "terms": diffs, "first": first, "state": state_diff, "state_where": where, "ok": ok}


def print_equivalence(eq: dict, tol: float) -> None:
    print(f"equivalence over {eq['steps']} steps from the same state (tolerance {tol:g}):")
    for t, d in eq["terms"].items():
        h, p = eq["first"][t]
        print(f"  {t:22s} step 1: hook {h:+.8f}  plain {p:+.8f}   max |diff| {d:.2e}")
    print(f"  model state (params + buffers) and group memory max |diff| {eq['state']:.2e} ({eq['state_where']})")
    print("  -> " + ("EQUIVALENT" if eq["ok"] else "NOT EQUIVALENT"))


# -- timing ------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, images, index, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn(images, index)
    _sync(device)
    return time.perf_counter() - t0


def interleaved(trainer: Trainer, plain: PlainStep, images, index, warmup: int, steps: int, seed: int) -> dict:
    """Pairs of (hook, plain) steps, the order alternating per pair, the RNG re-seeded alike."""
    hook_fn, device = (lambda images, index: hook_step(trainer, images, index)), trainer.device
    hook_t, plain_t, regroup_pair = [], [], []
    every = plain.regroup_every
    gc.collect()
    for i in range(warmup + steps):
        runs = [("hook", hook_fn), ("plain", plain)] if i % 2 == 0 else [("plain", plain), ("hook", hook_fn)]
        times = {}
        for name, fn in runs:
            torch.manual_seed(seed + i)
            times[name] = timed(fn, images, index, device)
        if i >= warmup:
            hook_t.append(times["hook"])
            plain_t.append(times["plain"])
            regroup_pair.append(trainer.plugins["momentum_grouping"].memory.iteration % every == 0)
    return {"hook": hook_t, "plain": plain_t, "regroup": regroup_pair}


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "mean": statistics.fmean(xs), "n": len(xs)}


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def dispatch_microtimings(trainer: Trainer, images, index, repeats: int) -> dict:
    """Cost of pieces of the framework's per-step machinery in isolation (best of 5 rounds of
    ``repeats`` calls); pieces whose trainer internals have changed are left out."""
    views = trainer.augment(images.to(trainer.device))
    cache = StepCache(views, index.to(trainer.device), trainer.producers, trainer.state)
    cache.put("q", 0, views[0])

    def best(fn) -> float:
        rounds = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            rounds.append((time.perf_counter() - t0) / repeats)
        return min(rounds)

    out = {}
    try:  # on_step_start's only implementation (momentum_grouping without extra_ema) returns at once
        if trainer.hooks.names("on_step_start") == ["momentum_grouping"] and \
                not trainer.plugins["momentum_grouping"].params.extra_ema:
            out["`hooks.call` of a hook whose one implementation returns at once (on_step_start)"] = \
                best(lambda: trainer.hooks.call("on_step_start", cache=cache))
    except (AttributeError, TypeError, KeyError):
        pass
    watch = getattr(trainer, "nonfinite", None)
    if watch is not None and callable(getattr(watch, "update", None)):
        dummy = [torch.zeros((), device=trainer.device) for _ in TERMS]
        saved = dict(vars(watch))
        try:
            out["non-finite watch `trainer.nonfinite.update` of 3 terms (on the device, no sync)"] = \
                best(lambda: watch.update(dummy, 0))
        except (TypeError, AttributeError, RuntimeError):
            pass
        vars(watch).update(saved)
    out["`StepCache(...)` construction"] = best(lambda: StepCache(views, index, trainer.producers, trainer.state))
    out["`cache['q', 0]` lookup of a computed output"] = best(lambda: cache["q", 0])
    return out


# -- environment and report --------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no",
                                "clusterkit", "plugins"], cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return f"{rev}{' (clusterkit/ or plugins/ modified)' if dirty else ''}" if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def fmt_ms(x: float) -> str:
    return f"{x * 1e3:.2f}"


def fmt_us(x: float) -> str:
    return f"{x * 1e6:.1f}"


def step_hooks_sentence(trainer: Trainer) -> str:
    hooks = ("on_step_start", "compute_losses", "after_step")
    try:
        impls = {h: trainer.hooks.names(h) for h in hooks}
    except (AttributeError, TypeError):
        return ""
    listed = "; ".join(f"{h}: {', '.join(impls[h]) or 'none'}" for h in hooks)
    return (f"A step makes {len(hooks)} hook calls reaching {sum(map(len, impls.values()))} implementations "
            f"({listed}), and a dozen or so StepCache lookups.")


def report(args, trainer: Trainer, images, eq: dict, res: dict, micro: dict, load: tuple) -> str:
    r = trainer.recipe
    hook, plain = summary(res["hook"]), summary(res["plain"])
    diffs = [h - p for h, p in zip(res["hook"], res["plain"], strict=True)]
    ratio_med, ratio_min = hook["median"] / plain["median"], hook["min"] / plain["min"]
    pair_ratios = [h / p for h, p in zip(res["hook"], res["plain"], strict=True)]
    ratio_pair = statistics.median(pair_ratios)
    share = (hook["median"] - plain["median"]) / hook["median"]
    if ratio_med <= TARGET and ratio_pair <= TARGET:
        verdict = "meets it"
    elif ratio_med > TARGET and ratio_pair > TARGET:
        verdict = "misses it"
    else:
        verdict = "inconclusive (the two ratios fall on either side of the target: too noisy)"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    busy = load[0][0] > 0.5 or load[1][0] > torch.get_num_threads() + 0.5
    recipe_path = Path(args.recipe).resolve()
    recipe_shown = recipe_path.relative_to(ROOT) if recipe_path.is_relative_to(ROOT) else args.recipe
    n_regroup = sum(res["regroup"])
    lines = [
        "# Framework overhead: DigPro step through the hooks vs. one plain function",
        "",
        f"Command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`",
        "",
        f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        "",
        "## Environment",
        "",
        f"- Machine: {cpu_name()}, {os.cpu_count()} logical CPUs ({cpus} usable); device {trainer.device}"
        + (f" ({torch.cuda.get_device_name(trainer.device)})" if trainer.device.type == "cuda" else ""),
        f"- torch {torch.__version__} with {torch.get_num_threads()} threads; Python {platform.python_version()}; "
        f"clusterkit at git {git_revision()}",
        f"- Load average (1/5/15 min) before: {load[0][0]:.2f} / {load[0][1]:.2f} / {load[0][2]:.2f}; "
        f"after: {load[1][0]:.2f} / {load[1][1]:.2f} / {load[1][2]:.2f}"
        + (" (**the machine was not idle: other processes competed for the CPUs, the timings are noisy**)"
           if busy else ""),
        "",
        "## Setting",
        "",
        f"- Recipe `{recipe_shown}` with {', '.join(f'`{s}`' for s in args.overrides) or 'no overrides'}: "
        f"{r.data.dataset}, batch "
        f"{images.shape[0]} of {tuple(images.shape[1:])} uint8 images augmented to {r.data.image_size}x"
        f"{r.data.image_size}, backbone {r.model.backbone} {r.model.backbone_kwargs or ''}, plugins "
        f"{', '.join(r.plugins)}, AMP {'on' if trainer.use_amp else 'off'}",
        f"- Epoch {trainer.state.epoch + 1} (first after {r.schedule.warmup_epochs} warm-up epochs: every loss term "
        f"active), after one E-step; one batch reused for every step; momentum_grouping regroups (k-means on its "
        f"bank) every {trainer.plugins['momentum_grouping'].regroup_every(trainer.state)} iterations, in both paths",
        f"- {args.warmup} warm-up pairs, then {hook['n']} timed steps of each path, interleaved (order alternating "
        f"per pair, torch's RNG re-seeded alike before both steps of a pair); {n_regroup} of the timed pairs "
        "regrouped",
        "",
        "## Equivalence (checked before timing)",
        "",
        f"{eq['steps']} steps of each path from the same model, optimiser and RNG state:",
        "",
        "| loss term | hook, step 1 | plain, step 1 | max abs difference |",
        "|---|---:|---:|---:|",
        *[f"| {t} | {eq['first'][t][0]:+.8f} | {eq['first'][t][1]:+.8f} | {d:.2e} |" for t, d in eq["terms"].items()],
        "",
        f"Parameters, buffers and the group memory after those steps: max abs difference {eq['state']:.2e}; "
        f"after the timed steps: {res['state_after']:.2e}. Tolerance {args.tol:g}: "
        f"**{'equivalent' if eq['ok'] and res['state_after'] <= args.tol else 'NOT equivalent'}**.",
        "",
        "## Time per step",
        "",
        "| path | median ms | min ms | mean ms |",
        "|---|---:|---:|---:|",
        *[f"| {label} | {fmt_ms(x['median'])} | {fmt_ms(x['min'])} | {fmt_ms(x['mean'])} |"
          for label, x in (("hooks (`Trainer.step`)", hook), ("plain function", plain))],
        "",
        f"- Ratio hook / plain: **{ratio_med:.4f}** (medians), {ratio_min:.4f} (minima); median of the per-pair "
        f"ratios {ratio_pair:.4f} (quartiles {' / '.join(f'{q:.4f}' for q in quartiles(pair_ratios))}).",
        f"- Paired differences hook - plain: median {fmt_ms(statistics.median(diffs))} ms, quartiles "
        f"{' / '.join(fmt_ms(q) for q in quartiles(diffs))} ms, min {fmt_ms(min(diffs))}, max {fmt_ms(max(diffs))}.",
        f"- Share of a hook step spent outside the plain computation, (hook - plain) / hook of the medians: "
        f"**{share:+.2%}**.",
        f"- Target (issue 6), the hook path at most {TARGET - 1:.0%} slower (ratio of the medians and median "
        f"per-pair ratio both <= {TARGET}): **{verdict}**.",
    ]
    if n_regroup and n_regroup < len(res["regroup"]):
        rows = []
        for label, want in (("steps without regrouping", False), ("regrouping steps", True)):
            h = [x for x, g in zip(res["hook"], res["regroup"], strict=True) if g == want]
            p = [x for x, g in zip(res["plain"], res["regroup"], strict=True) if g == want]
            rows.append(f"| {label} | {len(h)} | {fmt_ms(statistics.median(h))} | {fmt_ms(statistics.median(p))} | "
                        f"{statistics.median(h) / statistics.median(p):.4f} |")
        lines += ["", "| subset | pairs | hook median ms | plain median ms | ratio |", "|---|---:|---:|---:|---:|",
                  *rows]
    if micro:
        lines += ["", "## Dispatch micro-timings (for scale)", "",
                  "The framework's own per-step work, each piece timed alone (best of 5 rounds):", "",
                  "| piece | µs per call | share of the plain median step |", "|---|---:|---:|",
                  *[f"| {k} | {fmt_us(v)} | {v / plain['median']:.5%} |" for k, v in micro.items()],
                  "", step_hooks_sentence(trainer)]
    if args.quick:
        lines += ["", "**Smoke run (`--quick`): too few steps for a result.**"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="a DigPro recipe (default: the quickstart)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override, repeatable; applied after the script's own data.batch_size=256 "
                             "(64 with --quick), so --set data.batch_size=N wins")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: the recipe's run.device")
    parser.add_argument("--steps", type=int, default=60, help="timed steps of each path (default 60)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed pairs first (default 5)")
    parser.add_argument("--check-steps", type=int, default=None,
                        help="equivalence steps (default: one regrouping period + 1)")
    parser.add_argument("--tol", type=float, default=1e-6, help="equivalence tolerance (default 1e-6)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the per-step RNG re-seeding")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: batch 64, 4 check steps, 2 warm-up pairs, 6 timed steps; "
                             "prints the report, writes nothing unless --out is given")
    parser.add_argument("--out", default=None, help=f"results file (default {DEFAULT_OUT.relative_to(ROOT)})")
    args = parser.parse_args()
    args.overrides = ["data.batch_size=64" if args.quick else "data.batch_size=256", *args.overrides]
    if args.quick:
        args.steps, args.warmup = min(args.steps, 6), min(args.warmup, 2)
        args.check_steps = args.check_steps or 4
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    t_start = time.perf_counter()
    trainer = build_trainer(args.recipe, args.overrides, args.threads, args.device)
    loader_gen = trainer.loader.generator
    loader_gen.manual_seed(args.seed)
    images, _, index = next(iter(trainer.loader))
    plain = PlainStep(trainer)
    check_steps = args.check_steps or plain.regroup_every + 1
    print(f"built in {time.perf_counter() - t_start:.1f} s: batch {tuple(images.shape)}, device {trainer.device}, "
          f"{torch.get_num_threads()} threads")

    eq = check_equivalence(trainer, plain, images, index, check_steps, args.tol, args.seed)
    print_equivalence(eq, args.tol)
    if not eq["ok"]:
        raise SystemExit("framework_overhead: the two paths do not compute the same step; no timing.")

    res = interleaved(trainer, plain, images, index, args.warmup, args.steps, args.seed + 10_000)
    res["state_after"], _ = state_difference(trainer, plain)
    micro = dispatch_microtimings(trainer, images, index, 200 if args.quick else 2000)
    load_after = os.getloadavg()

    text = report(args, trainer, images, eq, res, micro, (load_before, load_after))
    print(text)
    out = args.out or (None if args.quick else str(DEFAULT_OUT))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        print(f"wrote {out}")
    print(f"total {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
