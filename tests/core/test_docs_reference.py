"""The documentation stays true to the code and its links resolve.

* The generated reference pages (docs/reference/cli.md, recipe-keys.md, plugins.md) are committed;
  each must equal what docs/gen_reference.py writes from the code now.  When one differs, run
  ``python docs/gen_reference.py`` and commit the result.
* Every relative link in the README, in docs/ and in benchmarks/results/history.md names a file or
  folder of the repository (``mkdocs build --strict`` checks the links between pages of the site;
  this also covers the README and links to files outside docs/).
* The README stays a short front page: under 220 lines, every command of the parser in its
  command table, and the reliability section with the opt-in for an untrusted checkpoint.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated():
    return _generator().generate()


@pytest.mark.parametrize("name", ["cli.md", "recipe-keys.md", "plugins.md"])
def test_generated_reference_page_is_up_to_date(generated, name):
    path = ROOT / "docs" / "reference" / name
    assert path in generated
    assert path.is_file(), f"{path} is missing: run python docs/gen_reference.py"
    assert path.read_text() == generated[path], f"{path} is stale: run python docs/gen_reference.py and commit it"


def test_cli_page_has_every_command_and_option(generated):
    import argparse

    from clusterkit.cli import _parser

    text = generated[ROOT / "docs" / "reference" / "cli.md"]
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        section = text.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            for flag in action.option_strings:
                assert f"`{flag}" in section or f", {flag}" in section, f"{name} {flag} missing from cli.md"


def test_recipe_keys_page_has_every_core_key(generated):
    from clusterkit.cli import core_keys

    text = generated[ROOT / "docs" / "reference" / "recipe-keys.md"]
    missing = [key for key, *_ in core_keys() if f"| `{key}` |" not in text]
    assert not missing


def test_plugin_page_lists_only_the_builtin_plugins(generated):
    text = generated[ROOT / "docs" / "reference" / "plugins.md"]
    names = re.findall(r"^## (\w+)$", text, flags=re.M)
    assert "momentum_grouping" in names and "masked_vit" in names
    assert "align_uniform" not in names  # the example package the tests install is not clusterkit's


def _markdown_files() -> list[Path]:
    return [README, ROOT / "benchmarks" / "results" / "history.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _links(text: str) -> list[str]:
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # not inside code blocks
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    broken = []
    for link in _links(path.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#", link):
            continue
        target = (path.parent / link.split("#", 1)[0]).resolve()
        if not target.exists() or ROOT not in (target, *target.parents):
            broken.append(link)
    assert not broken, f"links in {path.relative_to(ROOT)} to missing files: {broken}"


def test_readme_is_a_short_front_page():
    text = README.read_text()
    assert len(text.splitlines()) < 220


def test_readme_command_table_names_every_command():
    import argparse

    from clusterkit.cli import _parser

    text = README.read_text().split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [name for name in sub.choices if f"| `clusterkit {name}" not in text]
    assert not missing, f"commands missing from the README's command table: {missing}"


def test_readme_keeps_the_reliability_section():
    text = README.read_text()
    section = text.split("\n## Files from others: read as data, refused with a reason\n", 1)[1].split("\n## ", 1)[0]
    assert "CLUSTERKIT_TRUST_CHECKPOINTS=1" in section
    assert "(docs/reliability.md)" in section
    full = (ROOT / "docs" / "reliability.md").read_text()
    assert "CLUSTERKIT_TRUST_CHECKPOINTS=1" in full and "weights_only=True" in full


def test_repository_links_in_the_site_are_checked(tmp_path):
    """docs/hooks.py rewrites links to files outside docs/ and warns (failing --strict) on a missing one."""
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    docs = ROOT / "docs"
    text = "[parity](../benchmarks/results/parity.md) [page](data.md)\n```\n[x](../nowhere.md)\n```\n"
    out = hooks._rewrite(text, "fidelity.md", docs, ROOT, None)
    assert out.startswith("parity (`benchmarks/results/parity.md`) [page](data.md)")
    assert "[x](../nowhere.md)" in out  # code blocks are left alone
    out = hooks._rewrite("[p](../benchmarks/results/parity.md#a)", "fidelity.md", docs, ROOT, "https://example.org/r")
    assert out == "[p](https://example.org/r/blob/main/benchmarks/results/parity.md#a)"
    import logging

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep()
    hooks.log.addHandler(handler)
    try:
        hooks._rewrite("[gone](../benchmarks/results/gone.md)", "benchmarks.md", docs, ROOT, None)
    finally:
        hooks.log.removeHandler(handler)
    assert [r.levelno for r in records] == [logging.WARNING]
