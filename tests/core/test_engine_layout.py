"""The shape of the training engine (issue 27): a Trainer of small parts, inference without a
Trainer, no function over 60 lines in the engine, inference and the testing helpers, and a core
that does not import the presentation modules."""

import ast
from pathlib import Path

import pytest

from clusterkit.recipe import load_recipe
from clusterkit.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "clusterkit"
CHECKED = [*sorted((PKG / "engine").glob("*.py")), PKG / "inference.py", *sorted((PKG / "testing").glob("*.py"))]


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def _imported_modules(path: Path) -> set[str]:
    """The modules ``path`` imports, relative imports resolved against the clusterkit package."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def test_the_trainer_class_is_under_250_lines():
    cls = next(n for n in _tree(PKG / "engine" / "trainer.py").body if isinstance(n, ast.ClassDef)
               and n.name == "Trainer")
    assert cls.end_lineno - cls.lineno + 1 < 250


def test_no_function_of_the_engine_inference_or_testing_is_over_60_lines():
    long = [f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in CHECKED for node in ast.walk(_tree(path))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60]
    assert not long, long


def test_inference_neither_imports_nor_builds_a_trainer():
    imported = _imported_modules(PKG / "inference.py")
    assert not {m for m in imported if m.startswith(("clusterkit.trainer", "clusterkit.engine.trainer"))}, imported
    names = {n.id for n in ast.walk(_tree(PKG / "inference.py")) if isinstance(n, ast.Name)}
    assert "Trainer" not in names


def test_the_engine_does_not_import_the_presentation_modules():
    presentation = ("clusterkit.show", "clusterkit.plots", "clusterkit.compare", "clusterkit.cli")
    found = {f"{path.name}: {m}" for path in [*sorted((PKG / "engine").glob("*.py")), PKG / "trainer.py"]
             for m in _imported_modules(path) if m.startswith(presentation)}
    assert not found, found


def test_every_trainer_attribute_exists_before_build(tmp_path, tiny_recipe_data):
    """Nothing is an AttributeError before build(): what build() makes is None (or empty), and the
    loop's steps say that build() must come first."""
    t = Trainer(load_recipe(data=tiny_recipe_data), tmp_path)
    made = ("device", "pm", "plugins", "hooks", "train_ds", "eval_ds", "pipeline", "loader", "augment", "state",
            "core_predictor", "producers", "optimizer", "base_lr", "step_losses", "divergence", "nonfinite",
            "stepper", "evaluator", "evaluation", "checkpoints", "reporter", "last_prediction")
    assert {name: getattr(t, name) for name in made} == dict.fromkeys(made)
    assert (t.history, t.eval_metrics, t.skipped_steps, t.collapse_warnings, t.use_amp) == ([], {}, 0, [], False)
    for call in (lambda: t.begin_epoch(0), lambda: t.step([], None), lambda: t.predict(None)):
        with pytest.raises(RuntimeError, match=r"call build\(\)"):
            call()
