"""``clusterkit new-plugin NAME``: write a ready-to-install plugin package, no cookiecutter needed.

The skeleton is a working loss plugin: NT-Xent (SimCLR) on a projector of its own, with
its ``Params``, a test that compares the loss with a naive loop and runs the plugin
through :mod:`clusterkit.testing`, and a recipe.  Its tests pass out of the box after
``pip install -e``; replace the loss with yours and keep the tests honest.

Layout for ``NAME = my_loss`` (``--dir DIR``, default the current folder)::

    DIR/clusterkit-my-loss/
        pyproject.toml                  entry point my_loss = clusterkit_my_loss.plugin:MyLoss
        README.md
        clusterkit_my_loss/__init__.py
        clusterkit_my_loss/plugin.py    the loss function and the plugin class
        recipes/my_loss_digits.yaml
        tests/test_my_loss.py
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path
from string import Template

from .errors import PluginError

__all__ = ["new_plugin", "package_names"]

_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")


def package_names(name: str) -> dict[str, str]:
    """The names derived from plugin name ``name``: distribution, import package, class."""
    return {
        "name": name,
        "dist": "clusterkit-" + name.replace("_", "-"),
        "package": "clusterkit_" + name,
        "cls": "".join(part.capitalize() for part in name.split("_") if part),
    }


def _check_name(name: str, folder: Path) -> None:
    if not _NAME.match(name) or keyword.iskeyword(name) or "__" in name or name.endswith("_"):
        raise PluginError(
            f"'{name}' is not a valid plugin name. Use a lower-case Python identifier: letters, digits and single "
            "underscores, starting with a letter (e.g. my_loss). It becomes the name recipes write under "
            "plugins:, the entry-point name and part of the package name.")
    from .plugin_manager import installed

    taken = {info.name: info for info in installed()}
    if name in taken:
        info = taken[name]
        raise PluginError(
            f"The plugin name '{name}' is already registered by the installed package '{info.package}' "
            f"{info.version} ({info.value}); two packages registering one name is an error. Choose another name "
            "for the new plugin.")
    if folder.exists():
        raise PluginError(
            f"'{folder}' already exists, so the new plugin package would overwrite it. Choose another name, "
            "another --dir, or remove that folder first.")


def new_plugin(name: str, directory: str | Path = ".") -> Path:
    """Write the skeleton package of plugin ``name`` under ``directory``; returns its folder.

    Raises :class:`PluginError` for a name that is not a lower-case identifier, a name an
    installed plugin already uses, or a package folder that exists already."""
    names = package_names(name)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise PluginError(f"--dir '{directory}' is a file, not a folder; pass the folder to create the plugin's "
                          f"package folder in (default: the current folder).")
    root = directory / names["dist"]
    _check_name(name, root)
    files = {
        "pyproject.toml": _PYPROJECT,
        "README.md": _README,
        f"{names['package']}/__init__.py": _INIT,
        f"{names['package']}/plugin.py": _PLUGIN,
        f"recipes/{name}_digits.yaml": _RECIPE,
        f"tests/test_{name}.py": _TEST,
    }
    try:
        for rel, template in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(Template(template).substitute(names))
    except OSError as exc:
        raise PluginError(f"Cannot write the plugin package into '{directory}': {exc.strerror or exc} "
                          f"('{exc.filename}'). Pass a --dir you can write to.") from None
    return root


# -- the templates ($name, $dist, $package, $cls) ------------------------------------------------------------

_PYPROJECT = '''\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "The $name loss plugin for clusterkit."
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["clusterkit>=0.1"]

[project.optional-dependencies]
test = ["pytest>=7.4"]

# The entry-point name is the name a recipe writes under `plugins:`.
[project.entry-points."clusterkit.plugins"]
$name = "$package.plugin:$cls"

[tool.setuptools]
packages = ["$package"]

[tool.pytest.ini_options]
testpaths = ["tests"]
'''

_README = '''\
# $dist

The `$name` loss plugin for clusterkit, made by `clusterkit new-plugin $name`.  It starts as
NT-Xent (SimCLR) on a projector of its own: replace the loss in `$package/plugin.py` with
yours (see clusterkit's docs/writing-a-plugin.md).

```bash
pip install -e .                          # registers the entry point `$name`
pytest -q                                 # the loss against a naive loop; training, gradients, resume
clusterkit plugins --params $name         # its package, version, hooks and parameters
clusterkit run recipes/${name}_digits.yaml
```
'''

_INIT = '''\
"""The $name loss plugin for clusterkit (a recipe's ``plugins: {$name: {...}}``)."""

from .plugin import $cls, nt_xent_loss

__all__ = ["$cls", "nt_xent_loss"]
'''

_PLUGIN = '''\
"""The $name plugin: NT-Xent (Chen et al., "A Simple Framework for Contrastive Learning of
Visual Representations", ICML 2020, Eq. 1) on a projector of its own.

For the step's two views of B images, z_v = norm(g(cache["h", v])) with g this plugin's
projector.  Each of the 2B projections is an anchor; its positive is the other view of the
same image, its negatives the other 2B - 2 projections:

    l(i) = -log( exp(s(i, pos(i)) / tau) / sum_{k != i} exp(s(i, k) / tau) ),   s = cosine
    loss = weight * mean_i l(i)

Replace ``nt_xent_loss`` and ``compute_losses`` with your method; keep the loss a plain
function of tensors so the tests can check it against a naive loop.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from clusterkit import Plugin, hookimpl
from clusterkit.schema import non_negative, positive

#: The key of this plugin's projector in ``state.model`` (checkpointed with the model).
PROJECTOR = "${name}_projector"
#: The step output this plugin registers: the normalised projection of a view.
OUTPUT = "${name}_z"


def nt_xent_loss(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over the 2B anchors.  z0, z1: (B, D), rows L2-normalised -> scalar."""
    b = z0.shape[0]
    z = torch.cat([z0, z1])                                         # (2B, D)
    logits = z @ z.t() / temperature                                # (2B, 2B)
    self_pairs = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pairs, float("-inf"))          # an anchor is not its own negative
    positives = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, positives)


class $cls(Plugin):
    """NT-Xent on a projector of its own (the clusterkit new-plugin skeleton)."""

    @attrs.define
    class Params:
        temperature: float = attrs.field(default=0.5, validator=positive, metadata={
            "doc": "softmax temperature tau"})
        weight: float = attrs.field(default=1.0, validator=non_negative, metadata={"doc": "loss weight"})
        out_dim: int = attrs.field(default=128, validator=positive, metadata={"doc": "projection dimension"})

    @hookimpl
    def setup(self, state):
        width = state.model["backbone"].num_features
        state.model[PROJECTOR] = nn.Sequential(
            nn.Linear(width, width), nn.ReLU(), nn.Linear(width, self.params.out_dim))

    @hookimpl
    def register_outputs(self, state):
        projector = state.model[PROJECTOR]

        def z(cache, view):
            return F.normalize(projector(cache["h", view]), dim=1)

        return {OUTPUT: z}

    @hookimpl
    def compute_losses(self, state, cache):
        loss = nt_xent_loss(cache[OUTPUT, 0], cache[OUTPUT, 1], self.params.temperature)
        return {"$name": self.params.weight * loss}
'''

_RECIPE = '''\
# The $name plugin on scikit-learn's bundled digits, on CPU (a few minutes).
# Predictions: spherical k-means on the backbone's features (kmeans_e_step).
name: ${name}_digits
allow_plugins: [$dist]            # third-party code this recipe may load (built-ins always may)
data:
  dataset: digits
  split: all
  image_size: 16
  batch_size: 64
  augment: {crop_scale: [0.7, 1.0], crop_ratio: [0.8, 1.25], hflip: false}
model:
  backbone: resnet18_cifar
  backbone_kwargs: {channels: [16, 32, 64, 128]}
optim: {name: sgd, lr: 0.05, lr_scaling: none}
schedule: {epochs: 20, warmup_epochs: 2}
e_step: {k: 10, every: 20}
eval: {every: 5}
plugins:
  $name: {temperature: 0.5, weight: 1.0}
  kmeans_e_step: {n_init: 3}
'''

_TEST = '''\
"""Tests of the $name plugin: the loss against a naive loop, then the plugin in clusterkit's
tiny training loop through its installed entry point (clusterkit.testing)."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clusterkit.recipe import load_recipe
from clusterkit.testing import check_checkpoint_roundtrip, check_losses, train_tiny
from $package import nt_xent_loss

PARAMS = {"out_dim": 16}


def naive_nt_xent(z0, z1, temperature):
    z = z0.tolist() + z1.tolist()
    b = len(z0)
    total = 0.0
    for i in range(2 * b):
        sims = {k: sum(x * y for x, y in zip(z[i], z[k])) / temperature for k in range(2 * b) if k != i}
        positive = (i + b) % (2 * b)
        total += -sims[positive] + math.log(sum(math.exp(s) for s in sims.values()))
    return total / (2 * b)


@pytest.mark.parametrize("temperature", [0.5, 0.1])
def test_loss_matches_a_naive_loop(temperature):
    g = torch.Generator().manual_seed(0)
    z0 = F.normalize(torch.randn(5, 3, generator=g, dtype=torch.float64), dim=1)
    z1 = F.normalize(torch.randn(5, 3, generator=g, dtype=torch.float64), dim=1)
    assert nt_xent_loss(z0, z1, temperature).item() == pytest.approx(naive_nt_xent(z0, z1, temperature), rel=1e-10)


def test_trains_one_epoch():
    summary = train_tiny("$name", PARAMS)
    assert summary["steps"] > 0 and math.isfinite(summary["history"][-1]["$name"])


def test_loss_is_finite_and_reaches_the_backbone_and_the_projector():
    report = check_losses("$name", PARAMS)
    assert set(report.terms) == {"$name"} and report.backbone_grad["$name"] > 0


def test_resume_from_a_checkpoint_is_exact():
    check_checkpoint_roundtrip("$name", PARAMS)


def test_recipe_is_valid():
    recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "${name}_digits.yaml")
    assert "$name" in recipe.plugins
'''
