"""Recipes: YAML files that say which data, backbone, optimiser and plugins a run uses.

A recipe file may ``extends:`` another (path relative to the file, or a list of them):
the base is loaded first and the child is deep-merged over it (mappings merge key by
key; anything else replaces).  ``--set a.b=value`` overrides are applied last; the value
is parsed as YAML and then converted to the schema's type.  The result is validated by
the attrs classes below; plugin parameters (``plugins: {name: {...}}``) are validated
by each plugin's own ``Params`` class when the plugin manager loads them.

Example::

    extends: _base/imagenet10.yaml
    name: digpro_imagenet10
    data:  {dataset: imagefolder, root: data/imagenet-10, image_size: 96, batch_size: 128}
    model: {backbone: resnet18_cifar}
    plugins:
      byol_target: {momentum: 0.996}
"""

from __future__ import annotations

import copy
import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Literal

import attrs
import yaml

from .data.augment import AugmentParams, resolve_blur_kernel
from .data.decode import file_kind
from .errors import RecipeError
from .schema import build, in_range, non_negative, plain_name, positive, positive_finite, unstructure

field = attrs.field


def _doc(text: str) -> dict:
    return {"doc": text}


@attrs.define
class DataConfig:
    dataset: str = field(default="digits", metadata=_doc(
        "digits | fashion_mnist | cifar10 | cifar100 | stl10 | imagefolder"))
    root: str | None = field(default=None, metadata=_doc("data folder (not needed for digits)"))
    guide: str | None = field(default=None, metadata=_doc(
        "name of the preparation guide (clusterkit.data.guides) printed when the data is missing"))
    split: Literal["train", "test", "all"] = field(default="train", metadata=_doc(
        "training data: train split, test split, or all = train+test (the clustering papers' protocol)"))
    eval_split: Literal["train", "test", "all"] | None = field(default=None, metadata=_doc(
        "data the metrics are computed on; default: the training data"))
    labels: Literal["auto", "folders", "none"] = field(default="auto", metadata=_doc(
        "how labels are read (they are only ever used for NMI/ACC/ARI, never for training). auto: the "
        "dataset's own labels; for imagefolder, class folders when every image sits in one, else unlabeled. "
        "folders: imagefolder's class folders (an error without them). none: unlabeled, whatever the "
        "dataset: only the label-free quality measures are reported"))
    image_size: int = field(default=32, validator=positive, metadata=_doc("side of the augmented views"))
    decode_size: int | None = field(default=None, validator=in_range(1, None), metadata=_doc(
        "imagefolder: side the files are resized to when decoded (null: image_size). Set it to the files' "
        "own size to cut the random crops from the stored resolution, as torchvision's RandomResizedCrop "
        "on the original image does; the other datasets always keep their stored resolution"))
    batch_size: int = field(default=256, validator=positive, metadata=_doc(
        "images per step: the global batch, split evenly over the processes under torchrun"))
    eval_batch_size: int = field(default=512, validator=positive)
    num_workers: int = field(default=0, validator=non_negative, metadata=_doc("DataLoader workers"))
    pipeline: Literal["batched", "per_image"] = field(default="batched", metadata=_doc(
        "how the two views are made. batched: the loader yields uint8 batches and the whole batch is "
        "augmented at once on the training device (fast; the default). per_image: torchvision transforms.v2 "
        "on one image at a time in the DataLoader workers (data.num_workers), as the official code of the "
        "papers does (the paper recipes' choice) and the path for data too big to cache (data.cache: false). "
        "Both draw from the same augmentation distribution, but train measurably differently "
        "(docs/fidelity.md)"))
    drop_last: bool = True
    cache: bool = field(default=True, metadata=_doc("decode folder datasets once into a uint8 tensor"))
    skip_corrupt: bool = field(default=False, metadata=_doc("skip unreadable images and list them in the summary"))
    augment: AugmentParams = field(factory=AugmentParams)
    augment_second: AugmentParams | None = field(default=None, metadata=_doc(
        "the second view's augmentation (weak/strong views, as PICI's option); null: the same as augment. "
        "Unset keys take AugmentParams' defaults, not augment's values"))


@attrs.define
class ModelConfig:
    backbone: str = field(default="resnet18_cifar", metadata=_doc("any timm model name"))
    pretrained: bool = field(default=False, metadata=_doc("passed to timm; needs local weights"))
    pretrained_file: str | None = field(default=None, metadata=_doc("local weights file for pretrained=true"))
    backbone_kwargs: dict[str, Any] = field(factory=dict, metadata=_doc("extra timm.create_model arguments"))
    zero_init_last: bool | None = field(default=None, metadata=_doc(
        "zero-initialise the last BatchNorm of each residual block (timm's zero_init_last), for any backbone "
        "that takes the argument; backbones without it (ViTs, ConvNeXt) ignore it; null: the model's default"))


@attrs.define
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = field(default=0.05, validator=positive_finite, metadata=_doc("base learning rate"))
    lr_scaling: Literal["linear", "none"] = field(default="linear", metadata=_doc(
        "linear: lr x batch_size / 256 (ProPos/DigPro); none: lr as given"))
    momentum: float = field(default=0.9, validator=in_range(0, 1))
    weight_decay: float = field(default=5.0e-4, validator=non_negative)
    betas: tuple[float, float] = (0.9, 0.999)
    fused: bool | None = field(default=None, metadata=_doc(
        "torch's fused optimiser kernel; null: on CUDA (the same update, one kernel per step)"))


@attrs.define
class ScheduleConfig:
    epochs: int = field(default=100, validator=in_range(1, None))
    warmup_epochs: int = field(default=0, validator=non_negative, metadata=_doc(
        "linear lr warm-up; also the loss warm-up gates of diffused_sampling and prototype_aggregation"))
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    cosine_denominator: Literal["total", "after_warmup"] = field(default="total", metadata=_doc(
        "official ProPos/DigPro quirk: the cosine divides by the total epochs, so the last lr is not 0"))
    lr_clock: Literal["official", "zero_based"] = field(default="official", metadata=_doc(
        "official: iteration n (counted from 1) trains with the lr of epoch n / steps_per_epoch, so the "
        "first step's lr is above 0 (ProPos/DigPro code); zero_based: the first step has lr 0"))


@attrs.define
class EStepConfig:
    k: int = field(default=10, validator=in_range(2, None), metadata=_doc("number of clusters K"))
    every: int = field(default=1, validator=in_range(1, None), metadata=_doc("run the E-step every N epochs"))


@attrs.define
class EvalConfig:
    every: int = field(default=1, validator=in_range(1, None), metadata=_doc("evaluate every N epochs (and last)"))
    pixel_baseline: Literal["auto", "always", "never"] = field(default="auto", metadata=_doc(
        "k-means on raw pixels of the eval data for the summary; auto: when the data is small"))
    umap_baseline: Literal["auto", "always", "never"] = field(default="auto", metadata=_doc(
        "the strong baseline 'UMAP + k-means on pixels' (umap-learn, an optional extra) for the summary; "
        "auto: exactly when the pixel baseline is computed (so pixel_baseline: never skips it too)"))
    umap_view: Literal["auto", "always", "never"] = field(default="auto", metadata=_doc(
        "the evaluation view 'k-means on UMAP of the final features' (cosine UMAP) in the summary; auto: as "
        "umap_baseline"))
    umap_components: int = field(default=10, validator=in_range(1, None), metadata=_doc(
        "UMAP n_components of the baseline and the view (N2D: 10)"))
    umap_neighbors: int = field(default=20, validator=in_range(2, None), metadata=_doc(
        "UMAP n_neighbors of the baseline and the view (N2D: 20)"))
    umap_min_dist: float = field(default=0.0, validator=in_range(0, None), metadata=_doc(
        "UMAP min_dist of the baseline and the view (N2D: 0)"))
    collapse_share: float = field(default=0.9, validator=in_range(0, 1, lo_open=True), metadata=_doc(
        "warn of cluster collapse when one predicted cluster holds more than this share of the data"))
    collapse_std_ratio: float = field(default=0.1, validator=non_negative, metadata=_doc(
        "warn of feature collapse when the std of the L2-normalised features is below this times 1/sqrt(D)"))
    bn: Literal["running", "recalibrate"] = field(default="running", metadata=_doc(
        "BatchNorm statistics when embedding the data (E-step and evaluation): running = the training "
        "averages (the official code); recalibrate = re-estimated on the un-augmented images first "
        "(AdaBN / precise-BN), training statistics restored afterwards. New images given to predict "
        "are embedded with the running statistics"))


@attrs.define
class RunConfig:
    seed: int = field(default=0, validator=in_range(0, 2**32 - 1), metadata=_doc(
        "seed of every random draw (python, numpy, torch); numpy takes 0 .. 2**32 - 1"))
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=_doc("auto: CUDA when present"))
    amp: bool = field(default=True, metadata=_doc(
        "bf16 autocast on CUDA: the step's forward and losses and the embedding (CUDA's autocast keeps "
        "norms, softmax and the like in float32); the CPU has run.amp_cpu"))
    amp_cpu: bool = field(default=False, metadata=_doc(
        "bf16 autocast on the CPU, for CPUs with native bf16 (AVX512 / AVX512-BF16 / AMX on x86, BF16 on "
        "Arm; elsewhere it runs emulated, several times slower, and warns): the model's modules compute in "
        "bf16 and hand float32 on; the losses, normalisations and k-means stay float32 (clusterkit/amp.py)"))
    deterministic: bool = field(default=True, metadata=_doc("deterministic algorithms where torch has them"))
    threads: int | None = field(default=None, validator=in_range(1, None), metadata=_doc(
        "torch CPU threads (default: torch's choice)"))
    out_dir: str = field(default="runs", metadata=_doc("runs go to OUT_DIR/<name>/<time>/"))
    log_every: int = field(default=50, validator=in_range(1, None), metadata=_doc("metrics.jsonl every N steps"))
    keep_last: int = field(default=2, validator=in_range(1, None), metadata=_doc("checkpoints kept"))
    progress: bool = field(default=True, metadata=_doc("tqdm progress bar"))
    nonfinite: Literal["stop", "skip"] = field(default="stop", metadata=_doc(
        "a NaN/inf loss term: stop the run (keeping the last checkpoint), or skip that optimiser step"))
    max_skipped_steps: int = field(default=10, validator=non_negative, metadata=_doc(
        "with nonfinite: skip, stop once more than this many steps were skipped"))
    sync_every: int = field(default=50, validator=in_range(1, None), metadata=_doc(
        "host-device syncs: the non-finite-loss check (nonfinite: stop) and the progress bar read the GPU "
        "every N steps, not every step (nonfinite: skip must check every step)"))
    channels_last: bool = field(default=False, metadata=_doc(
        "channels_last memory format for the model and the views (faster convolutions on recent GPUs)"))
    compile: bool = field(default=False, metadata=_doc("torch.compile the backbone (in place: checkpoints "
                                                        "keep their keys)"))
    compile_backend: str = field(default="inductor", metadata=_doc(
        "torch.compile backend (inductor; eager or aot_eager to debug)"))
    sync_bn: bool = field(default=False, metadata=_doc(
        "under torchrun: SyncBatchNorm (batch statistics over all processes; torch runs it on GPUs only)"))
    find_unused_parameters: bool | None = field(default=None, metadata=_doc(
        "DDP's find_unused_parameters; null: true when the recipe has stages (a switched-off plugin's "
        "parameters get no gradient)"))


@attrs.define
class StageConfig:
    """One stage of a staged schedule (PICI's pretrain / train / boost)."""

    name: str = field(default="", metadata=_doc("the stage's name, shown in logs and metrics"))
    until: int | None = field(default=None, validator=in_range(1, None), metadata=_doc(
        "exclusive end epoch (0-based): the stage runs from the previous stage's until; null: to the end"))
    plugins: list[str] = field(factory=list, metadata=_doc(
        "plugins active in this stage; a plugin named in no stage is active in every stage"))


@attrs.define
class Recipe:
    name: str = field(default="unnamed", validator=plain_name, metadata=_doc(
        "the run's name: runs go to run.out_dir/<name>/<time>/ (compare: OUT/<name>/); any characters but "
        "'/', '\\' and NUL, not empty, '.' or '..'"))
    description: str = ""
    data: DataConfig = field(factory=DataConfig)
    model: ModelConfig = field(factory=ModelConfig)
    optim: OptimConfig = field(factory=OptimConfig)
    schedule: ScheduleConfig = field(factory=ScheduleConfig)
    e_step: EStepConfig = field(factory=EStepConfig)
    eval: EvalConfig = field(factory=EvalConfig)
    run: RunConfig = field(factory=RunConfig)
    plugins: dict[str, Any] = field(factory=dict, metadata=_doc("plugin name -> its parameters"))
    stages: list[StageConfig] = field(factory=list, metadata=_doc(
        "optional epoch stages that switch plugins on and off (see Recipe.stage_at)"))
    allow_plugins: list[str] | None = field(default=None, metadata=_doc(
        "third-party plugins this recipe may load, by plugin name or package name (e.g. "
        "clusterkit-align-uniform); clusterkit's built-ins are always allowed. null: every installed plugin, "
        "or only the built-ins when CLUSTERKIT_DISABLE_PLUGIN_AUTOLOAD=1 is set. Entries that match no "
        "installed plugin or package are an error (see docs/writing-a-plugin.md)"))

    def stage_at(self, epoch: int) -> StageConfig | None:
        """The stage that epoch ``epoch`` (0-based) belongs to; None without stages."""
        for stage in self.stages:
            if stage.until is None or epoch < stage.until:
                return stage
        return None

    def inactive_plugins(self, epoch: int) -> set[str]:
        """Plugins whose per-epoch and per-step hooks do not run in ``epoch``: those named in
        some stage but not in the stage of ``epoch``.  Plugins named in no stage always run."""
        stage = self.stage_at(epoch)
        if stage is None:
            return set()
        staged = {name for s in self.stages for name in s.plugins}
        return staged - set(stage.plugins)

    def to_dict(self) -> dict:
        return unstructure(self)

    def hash(self) -> str:
        """Stable short hash of the resolved recipe (what ran, not how it was spelled)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# -- loading ----------------------------------------------------------------------------------------

def deep_merge(base: dict, over: dict) -> dict:
    """Merge ``over`` into a copy of ``base``: mappings merge recursively, other values replace."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


#: The value :func:`differing_keys` shows for a key that a dict does not have.
ABSENT = "(absent)"


def differing_keys(dicts: list[dict], ignore: tuple[str, ...] = ()) -> list[tuple[str, list]]:
    """Dotted keys whose values differ between nested dicts: ``[(key, [value per dict])]``.

    Mappings present in every dict are compared key by key; a key missing from some dict
    shows ``"(absent)"`` for it.  ``ignore``: dotted keys to leave out."""
    out: list[tuple[str, list]] = []

    def walk(nodes: list, prefix: str) -> None:
        keys: list = []
        for node in nodes:
            for k in node:
                if k not in keys:
                    keys.append(k)
        for k in keys:
            path = f"{prefix}{k}"
            if path in ignore:
                continue
            values = [node.get(k, ABSENT) for node in nodes]
            if all(isinstance(v, dict) for v in values):
                walk(values, path + ".")
            elif any(v != values[0] for v in values[1:]):
                out.append((path, values))

    walk(list(dicts), "")
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error
    (PyYAML keeps the last one, so a repeated ``schedule:`` block silently drops the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: PyYAML reports it below
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"key '{key}' appears twice (lines {first.start_mark.line + 1} and "
                    f"{key_node.start_mark.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(text: str):
    """``yaml.safe_load`` that rejects duplicate keys (:class:`_UniqueKeyLoader`)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


#: The largest recipe file read (a recipe is a page of YAML; anything bigger is not one).
MAX_RECIPE_BYTES = 1 << 20


def _read_recipe_text(path: Path, named_by: Path | None = None) -> str:
    """The text of the recipe file ``path``: a regular file of at most :data:`MAX_RECIPE_BYTES`.

    The file is opened without blocking and checked on its open descriptor, so a FIFO (which
    would wait for a writer forever) or a device such as /dev/zero (endless) is refused before
    anything is read from it.  ``named_by``: the recipe whose ``extends`` names ``path``."""
    import os
    import stat

    via = f" (named in 'extends' of '{named_by}')" if named_by is not None else ""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise RecipeError(f"Recipe file '{path}'{via} does not exist. Check the path; recipes shipped with "
                          "clusterkit live in its recipes/ folder (e.g. recipes/quickstart.yaml).") from None
    except IsADirectoryError:
        raise RecipeError(f"Recipe file '{path}'{via} is a folder, not a file. Pass a recipe YAML file, e.g. "
                          "recipes/quickstart.yaml.") from None
    except OSError as exc:
        raise RecipeError(f"Recipe file '{path}'{via} cannot be read: {exc.strerror}.") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise RecipeError(f"Recipe file '{path}'{via} is a folder, not a file. Pass a recipe YAML file, e.g. "
                              "recipes/quickstart.yaml.")
        kind = file_kind(st.st_mode)
        if kind is not None:
            raise RecipeError(f"Recipe file '{path}'{via} is {kind}, not a regular file; nothing was read from "
                              "it. Recipes are read from regular YAML files only: point it at a .yaml file.")
        data = fh.read(MAX_RECIPE_BYTES + 1)
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"Recipe file '{path}'{via} is larger than {MAX_RECIPE_BYTES // (1 << 20)} MiB, far "
                          "more than any recipe; it was not read. Check that the path names a recipe YAML file.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"Recipe file '{path}'{via} is not UTF-8 text (byte {exc.start}); it does not look like "
                          "a recipe. Check that the path names a recipe YAML file, saved as UTF-8.") from None


def read_yaml(path: Path, named_by: Path | None = None) -> dict:
    text = _read_recipe_text(path, named_by)
    try:
        data = safe_load_unique(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if "appears twice" in problem:
            raise RecipeError(f"Recipe file '{path}': {problem}. YAML would keep only the last one and "
                              "silently drop the first; merge the two into one (or delete one).") from None
        raise RecipeError(f"Recipe file '{path}' is not valid YAML{where}: {problem}. Fix the syntax "
                          "(indentation with spaces, 'key: value' pairs) and run again.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"Recipe file '{path}' must hold a mapping (key: value lines) at the top "
                          f"level, not a {type(data).__name__}.")
    return data


def load_raw(path: str | Path, _chain: tuple[Path, ...] = (), named_by: Path | None = None) -> dict:
    """Read a recipe file and everything it ``extends``, deep-merged, as plain data."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise RecipeError(f"Recipe 'extends' forms a cycle: {cycle}. Remove one of these 'extends' "
                          "entries so that every recipe has a base that does not lead back to it.")
    data = read_yaml(path, named_by)
    bases = data.pop("extends", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise RecipeError(f"'extends' in '{path}' must be a file path or a list of file paths, got {bases!r}.")
    merged: dict = {}
    for base in bases:
        base_path = (path.parent / base)
        if not base_path.exists():
            raise RecipeError(f"Recipe '{path}' extends '{base}', but '{base_path}' does not exist. "
                              "Paths in 'extends' are relative to the recipe file that names them.")
        merged = deep_merge(merged, load_raw(base_path, (*_chain, path), named_by=path))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], parsed YAML value)."""
    if "=" not in text:
        raise RecipeError(f"Override '{text}' must look like key.path=value, e.g. "
                          "--set schedule.epochs=10 or --set plugins.byol_target.momentum=0.99.")
    key, _, raw = text.partition("=")
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise RecipeError(f"Override '{text}' has an empty key; write it as key.path=value.")
    try:
        value = safe_load_unique(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``--set`` overrides.  Core keys must exist in the schema (checked when building);
    plugin keys are checked by the plugin's own Params class.

    A mapping value is deep-merged into the mapping it replaces, as ``extends:`` merges
    (``--set "data.augment={hflip: true}"`` keeps the other augment keys).  ``plugins.X.*`` of
    a plugin the recipe does not have is an error, so that an override shared by several
    recipes (``clusterkit compare``) never adds a method to one of them; ``plugins.X.enabled=true``
    adds plugin X (with its defaults), ``plugins.X.enabled=false`` removes it.
    """
    data = copy.deepcopy(data)
    parsed = [(text, *parse_override(text)) for text in overrides or []]
    # plugins.X.enabled first, so that plugins.X.key=v may come before or after it
    parsed.sort(key=lambda item: not (len(item[1]) == 3 and item[1][0] == "plugins" and item[1][2] == "enabled"))
    for text, keys, value in parsed:
        _check_override_path(keys, text)
        if keys[0] == "plugins" and len(keys) >= 2 and _plugin_switch(data, keys, value, text):
            continue
        if keys == ["plugins"] and isinstance(value, dict):  # merged below: each name must be present
            for name in value:
                _plugin_switch(data, ["plugins", name], value[name], text)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            elif not isinstance(child, dict):
                raise RecipeError(f"Override '{text}': '{k}' holds a value ({child!r}), not a section, "
                                  "so it has no keys to set.")
            node = child
        old = node.get(keys[-1])
        node[keys[-1]] = deep_merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return data


def _plugin_switch(data: dict, keys: list[str], value, text: str) -> bool:
    """``plugins.X...`` overrides: apply ``plugins.X.enabled=true|false`` (returns True) and
    reject an override of a plugin the recipe does not have (returns False otherwise)."""
    from .schema import did_you_mean

    plugins = data.get("plugins") or {}
    if not isinstance(plugins, dict):
        return False
    name = keys[1]
    if len(keys) == 3 and keys[2] == "enabled":
        if not isinstance(value, bool):
            raise RecipeError(f"Override '{text}': plugins.{name}.enabled must be true (add the plugin) or "
                              f"false (remove it), got {value!r}.")
        if value:
            data["plugins"] = plugins
            if plugins.get(name) is None:
                plugins[name] = {}
        else:
            plugins.pop(name, None)
        return True
    if name not in plugins:
        have = ", ".join(sorted(plugins)) or "none"
        raise RecipeError(f"Override '{text}': the recipe has no plugin '{name}' (its plugins: {have})."
                          f"{did_you_mean(name, plugins)} An override never adds a plugin, so that a --set shared "
                          f"by several recipes cannot change which methods run; to add it, also pass "
                          f"--set plugins.{name}.enabled=true, or add it under plugins: in "
                          "the recipe.")
    return False


def _check_override_path(keys: list[str], text: str) -> None:
    """Reject ``--set`` on a core path that does not exist, with a did-you-mean."""
    from .schema import did_you_mean

    cls: type | None = Recipe
    path: list[str] = []
    for k in keys:
        if cls is None or not attrs.has(cls):
            return  # inside a free-form mapping (plugins.*, backbone_kwargs): checked later
        names = {f.name: f for f in attrs.fields(cls)}
        if k not in names:
            where = ".".join(path) or "the recipe's top level"
            raise RecipeError(f"Override '{text}': there is no key '{k}' in {where}.{did_you_mean(k, names)} "
                              f"Valid keys there are: {', '.join(sorted(names))}.")
        path.append(k)
        tp = typing.get_type_hints(cls)[k]
        cls = tp if isinstance(tp, type) and attrs.has(tp) else None


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None) -> Recipe:
    """Load, merge, override and validate a recipe (from a file, or from ``data``)."""
    raw = load_raw(path) if path is not None else copy.deepcopy(data or {})
    raw = apply_overrides(raw, overrides or [])
    raw.pop("extends", None)
    if raw.get("plugins") is None:
        raw["plugins"] = {}
    if not isinstance(raw["plugins"], dict):
        raise RecipeError("'plugins' must be a mapping of plugin names to their parameters, e.g. "
                          "plugins: {byol_target: {momentum: 0.996}}.")
    raw["plugins"] = {name: ({} if params is None else params) for name, params in raw["plugins"].items()}
    recipe = build(Recipe, raw, "")
    check_stages(recipe)
    check_augment(recipe)
    return recipe


def check_augment(recipe: Recipe) -> None:
    """Each view's blur kernel fits ``data.image_size`` (checked here so that a bad recipe fails
    when it loads, not when the first batch is augmented)."""
    for key in ("augment", "augment_second"):
        params = getattr(recipe.data, key)
        if params is None:
            continue
        try:
            resolve_blur_kernel(params, recipe.data.image_size)
        except ValueError as exc:
            raise RecipeError(f"'data.{key}.blur_kernel' {exc} (data.image_size sets the view side).") from None


def check_stages(recipe: Recipe) -> None:
    """Stages have distinct names, increasing ``until``, cover every epoch and name only the
    recipe's plugins."""
    from .schema import did_you_mean

    seen: set[str] = set()
    last = 0
    for i, stage in enumerate(recipe.stages):
        where = f"stages[{i}]"
        if not stage.name or stage.name in seen:
            raise RecipeError(f"'{where}.name' must be a non-empty name that no other stage uses, got "
                              f"{stage.name!r}. Name every stage, e.g. {{name: pretrain, until: 200, plugins: [...]}}.")
        seen.add(stage.name)
        if stage.until is None and i != len(recipe.stages) - 1:
            raise RecipeError(f"'{where}.until' is null, but only the last stage may run to the end; give "
                              f"stage '{stage.name}' the epoch it ends at.")
        if stage.until is not None and stage.until <= last:
            raise RecipeError(f"'{where}.until' = {stage.until} must be larger than the previous stage's end "
                              f"({last}): stages run one after another, each until its (exclusive) end epoch.")
        last = stage.until if stage.until is not None else last
        for name in stage.plugins:
            if name not in recipe.plugins:
                raise RecipeError(f"'{where}.plugins' names '{name}', which is not in the recipe's plugins."
                                  f"{did_you_mean(name, recipe.plugins)} Stages switch the recipe's plugins on "
                                  "and off; add it under plugins: or fix the name.")
    end = recipe.stages[-1].until if recipe.stages else None
    if recipe.stages and end is not None and end < recipe.schedule.epochs:
        raise RecipeError(f"The last stage ('{recipe.stages[-1].name}') ends at epoch {end}, but "
                          f"schedule.epochs = {recipe.schedule.epochs}: epochs {end}-{recipe.schedule.epochs - 1} "
                          "would belong to no stage. Set the last stage's until to null (to the end) or to "
                          f"{recipe.schedule.epochs}, or lower schedule.epochs.")


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
