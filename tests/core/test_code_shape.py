"""The package keeps its shape: no function in clusterkit/ is longer than 60 lines (from its
``def`` line to its last line, docstring included), so that every part can be read whole.
ruff holds complexity, branches and statements (pyproject.toml); this test holds length."""

import ast
from pathlib import Path

import clusterkit

MAX_LINES = 60
PACKAGE = Path(clusterkit.__file__).parent

# Functions allowed over MAX_LINES, each with the reason (none today; a stale entry fails below).
ALLOWED: set[str] = set()


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")


def long_functions(root: Path, limit: int = MAX_LINES) -> dict[str, int]:
    """``{"path::name": lines}`` of the functions under ``root`` longer than ``limit`` lines."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name, node in _functions(tree):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                found[f"{path.relative_to(root).as_posix()}::{name}"] = lines
    return found


def test_no_function_in_clusterkit_is_longer_than_60_lines():
    offenders = {name: n for name, n in long_functions(PACKAGE).items() if name not in ALLOWED}
    assert not offenders, (
        f"functions over {MAX_LINES} lines (split them into named parts): "
        + ", ".join(f"clusterkit/{name} ({n} lines)" for name, n in sorted(offenders.items())))


def test_the_allow_list_names_only_functions_that_are_still_long():
    # an entry whose function was split (or removed) must go, so the list cannot hide a new one
    stale = ALLOWED - set(long_functions(PACKAGE))
    assert not stale, f"remove from ALLOWED (no longer over {MAX_LINES} lines): {sorted(stale)}"


def test_the_measure_counts_from_def_to_last_line_with_the_docstring(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(57))
    (tmp_path / "m.py").write_text(f'def ok():\n    """Doc."""\n{body}\n    return 0\n\n\n'
                                   f'class C:\n    def long(self):\n        """Doc.\n\n        More."""\n'
                                   + "\n".join(f"        y{i} = {i}" for i in range(57)) + "\n")
    assert long_functions(tmp_path) == {"m.py::C.long": 61}
