"""The plugin guide stays true to the code (as datasette's plugin-hook docs tests do).

* Every hook spec in clusterkit/hookspecs.py has its own section (a ``### `name` `` heading)
  in docs/writing-a-plugin.md, and the guide documents no hook that does not exist.
* Every hook spec has a contract test: a function ``test_hook_<name>`` somewhere in tests/
  that runs a plugin implementing that hook through the real trainer and checks what the
  guide promises about it (when it runs, what it may read and write, what its return
  value does).  The contract tests below share one tiny run of a recording plugin that
  implements every hook; ``test_every_hook_spec_is_called_by_the_trainer`` fails when a
  spec exists that the trainer never calls (the recorder then has to implement it, and
  its ``test_hook_`` test has to be written).  Looking for ``test_hook_<name>`` is a name
  convention, not proof of a good test; what proves the hook is called is the recorded run.
* The worked example in the guide is the examples/ package, file for file: every code
  block marked ``<!-- file: PATH -->`` equals that file.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from clusterkit import ParamGroup, Plugin, Prediction, hookimpl
from clusterkit.plugin_manager import hook_names
from clusterkit.testing import make_trainer

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "writing-a-plugin.md"
K = 4


# -- the guide -------------------------------------------------------------------------------------------

def _guide_hook_headings() -> list[str]:
    text = GUIDE.read_text()
    section = text.split("\n## Hooks", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^### `(\w+)`", section, flags=re.M)


def test_every_hook_spec_has_a_section_in_the_guide():
    documented = _guide_hook_headings()
    missing = [h for h in hook_names() if h not in documented]
    assert not missing, f"hooks without a '### `name`' section under '## Hooks' in {GUIDE.name}: {missing}"
    unknown = [h for h in documented if h not in hook_names()]
    assert not unknown, f"{GUIDE.name} documents hooks that hookspecs.py does not define: {unknown}"
    assert documented == hook_names(), "the guide's hook sections should follow hookspecs.py's order (the loop's)"


def test_every_hook_spec_has_a_contract_test():
    tests = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_hook_"):
                tests.add(node.name[len("test_hook_"):])
    missing = [h for h in hook_names() if h not in tests]
    assert not missing, f"hook specs without a test_hook_<name> contract test in tests/: {missing}"


def test_the_worked_example_in_the_guide_is_the_example_package():
    text = GUIDE.read_text()
    blocks = re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```\n", text, flags=re.S)
    shown = {path for path, _ in blocks}
    example = ROOT / "examples" / "clusterkit-align-uniform"
    def source(path: Path) -> bool:  # not build output (build/, *.egg-info, caches)
        parts = path.relative_to(example).parts
        return not any(x in ("build", "__pycache__") or x.startswith(".") or x.endswith(".egg-info") for x in parts)

    expected = {str(p.relative_to(ROOT)) for p in example.rglob("*")
                if p.is_file() and p.suffix in (".py", ".toml", ".yaml") and source(p)}
    assert expected <= shown, f"files of the example package the guide does not show: {sorted(expected - shown)}"
    for path, body in blocks:
        assert (ROOT / path).read_text() == body, f"the guide's copy of {path} differs from the file"


# -- one recorded run --------------------------------------------------------------------------------------

class Recorder(Plugin):
    """Implements every hook; records what each one saw.  Its predictions are the synthetic data's
    true labels (sample i has class i % K), so perfect metrics prove that predict's labels are used."""

    def __init__(self, params=None):
        super().__init__(params)
        self.events: list[tuple] = []
        self.output_calls: list[tuple[int, int]] = []

    def log(self, hook, state, **info):
        self.events.append((hook, state.epoch, state.step, info))

    @hookimpl
    def setup(self, state):
        self.log("setup", state, has_optimizer=False)
        state.model["recorder_head"] = nn.Linear(state.model["backbone"].num_features, 8)
        return [ParamGroup(list(state.model["recorder_head"].parameters()), lr_scale=0.5, name="recorder")]

    @hookimpl
    def register_outputs(self, state):
        self.log("register_outputs", state)
        head = state.model["recorder_head"]

        def z(cache, view):
            self.output_calls.append((state.step, view))
            return head(cache["h", view])

        return {"rec_z": z}

    @hookimpl
    def on_epoch_start(self, state):
        self.log("on_epoch_start", state)

    @hookimpl
    def e_step(self, state):
        self.log("e_step", state)
        state.pseudo_labels = torch.arange(state.num_train, device=state.device) % K

    @hookimpl
    def embed(self, state, images):
        self.log("embed", state, grad=torch.is_grad_enabled(), training=state.model.training)
        return state.model["recorder_head"](state.model["backbone"](images))

    @hookimpl
    def on_step_start(self, state, cache):
        self.log("on_step_start", state, computed=("rec_z", 0) in cache,
                 weight=state.model["recorder_head"].weight.detach().clone())

    @hookimpl
    def compute_losses(self, state, cache):
        z0, z1 = cache["rec_z", 0], cache["rec_z", 1]
        labels_ok = bool(torch.equal(state.pseudo_labels[cache.index], cache.index % K))
        self.log("compute_losses", state, labels_ok=labels_ok, once=cache["rec_z", 0] is z0)  # read again
        return {"rec_loss": (z0 - z1).pow(2).mean(), "rec_const": torch.tensor(0.25)}

    @hookimpl
    def before_optimizer_step(self, state, cache):
        head = state.model["recorder_head"]
        self.log("before_optimizer_step", state, weight=head.weight.detach().clone(),
                 has_grad=head.weight.grad is not None)

    @hookimpl
    def after_step(self, state, cache):
        self.log("after_step", state, weight=state.model["recorder_head"].weight.detach().clone())

    @hookimpl
    def predict(self, state, features):
        self.log("predict", state, shape=tuple(features.shape))
        labels = torch.arange(features.shape[0]) % K
        return Prediction(labels, torch.ones(features.shape[0]))

    @hookimpl
    def on_epoch_end(self, state, metrics):
        self.log("on_epoch_end", state, keys=sorted(metrics))
        metrics["rec_epoch_end"] = state.epoch + 1


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """3 epochs x 4 steps on the synthetic data, E-step every 2 epochs."""
    trainer = make_trainer(Recorder, name="recorder", epochs=3, run_dir=tmp_path_factory.mktemp("recorded"),
                           overrides={"e_step": {"every": 2}})
    threads = torch.get_num_threads()
    try:
        summary = trainer.fit()
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"trainer": trainer, "plugin": trainer.plugins["recorder"], "summary": summary,
            "epochs": [r for r in records if "seconds" in r]}


def _events(recorded, hook):
    return [e for e in recorded["plugin"].events if e[0] == hook]


def test_every_hook_spec_is_called_by_the_trainer(recorded):
    called = {e[0] for e in recorded["plugin"].events}
    assert [h for h in hook_names() if h not in called] == []


def test_hook_setup(recorded):
    trainer, events = recorded["trainer"], recorded["plugin"].events
    assert [e[0] for e in events[:2]] == ["setup", "register_outputs"]  # once, before any epoch
    assert len(_events(recorded, "setup")) == 1
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    head = trainer.state.model["recorder_head"]
    assert groups["recorder"]["lr_scale"] == 0.5
    assert {id(p) for p in groups["recorder"]["params"]} == {id(p) for p in head.parameters()}
    ckpt = torch.load(trainer.run_dir / "checkpoints" / "epoch_0002.pt", weights_only=False)
    assert torch.equal(ckpt["model"]["recorder_head.weight"], head.weight)  # checkpointed with the model


def test_hook_register_outputs(recorded):
    calls = recorded["plugin"].output_calls
    steps = recorded["summary"]["steps"]
    assert steps == 12 and len(calls) == 2 * steps  # each (output, view) once per step, though read twice
    assert all(e[3]["once"] for e in _events(recorded, "compute_losses"))
    assert sorted(set(calls)) == [(s, v) for s in range(steps) for v in (0, 1)]


def test_hook_on_epoch_start(recorded):
    order = [(e[0], e[1]) for e in recorded["plugin"].events if e[0] in ("on_epoch_start", "e_step")]
    assert order == [("on_epoch_start", 0), ("e_step", 0), ("on_epoch_start", 1),
                     ("on_epoch_start", 2), ("e_step", 2)]


def test_hook_e_step(recorded):
    assert [e[1] for e in _events(recorded, "e_step")] == [0, 2]  # before the first epoch, then every 2
    assert all(e[3]["labels_ok"] for e in _events(recorded, "compute_losses"))  # its pseudo-labels are seen


def test_hook_embed(recorded):
    embeds = _events(recorded, "embed")
    assert embeds and all(not e[3]["grad"] and not e[3]["training"] for e in embeds)  # no_grad, eval mode
    assert {e[3]["shape"] for e in _events(recorded, "predict")} == {(256, 8)}  # its output is the features


def test_hook_on_step_start(recorded):
    starts = _events(recorded, "on_step_start")
    assert [e[2] for e in starts] == list(range(12))  # before each step's optimiser step
    assert not any(e[3]["computed"] for e in starts)  # before the forward: no output computed yet


def test_hook_compute_losses(recorded):
    for record in recorded["epochs"]:
        assert record["rec_const"] == pytest.approx(0.25)  # every term is logged under its name
        assert record["loss"] == pytest.approx(record["rec_loss"] + 0.25)  # and summed into the loss


def test_hook_before_optimizer_step(recorded):
    befores, starts = _events(recorded, "before_optimizer_step"), _events(recorded, "on_step_start")
    afters = _events(recorded, "after_step")
    assert [e[2] for e in befores] == list(range(12))  # state.step does not count the step yet
    assert all(e[3]["has_grad"] for e in befores)  # after backward
    # before the optimiser step: the weights are still those the losses saw, and they move after it
    assert all(torch.equal(b[3]["weight"], s[3]["weight"]) for b, s in zip(befores, starts, strict=True))
    # (the last of the 12 iterations trains at lr 0: the official clock reads the cosine at its end)
    assert all(not torch.equal(b[3]["weight"], a[3]["weight"]) for b, a in zip(befores[:-1], afters[:-1], strict=True))


def test_hook_after_step(recorded):
    afters, starts = _events(recorded, "after_step"), _events(recorded, "on_step_start")
    assert [e[2] for e in afters] == list(range(1, 13))  # state.step counts the step just taken
    # after the optimiser step: the trainable head has moved since the step started (but in the
    # last iteration, which trains at lr 0: the official clock reads the cosine at its end)
    assert all(not torch.equal(a[3]["weight"], s[3]["weight"]) for a, s in zip(afters[:-1], starts[:-1], strict=True))


def test_hook_predict(recorded):
    summary = recorded["summary"]
    assert summary["protocol"]["prediction"] == "predict hook: recorder"
    assert summary["metrics"] == {"nmi": pytest.approx(1.0), "acc": pytest.approx(1.0), "ari": pytest.approx(1.0)}


def test_hook_on_epoch_end(recorded):
    ends = _events(recorded, "on_epoch_end")
    assert [e[1] for e in ends] == [0, 1, 2]
    assert all("nmi" in e[3]["keys"] and "loss" in e[3]["keys"] for e in ends)  # after evaluation
    assert [r["rec_epoch_end"] for r in recorded["epochs"]] == [1, 2, 3]  # keys it adds are logged
