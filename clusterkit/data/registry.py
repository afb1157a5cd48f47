"""The dataset registry: the names ``data.dataset`` accepts, each with its normalisation
statistics, flip default and the text that says how to get its files; where a dataset's
files are looked for; the ImageNet subsets' synset lists."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import attrs

from clusterkit.errors import DataError

__all__ = ["DATASETS", "IMAGE_EXTENSIONS", "LABEL_MODES", "SPLITS", "ROOT_HINT", "DatasetInfo", "read_synsets",
           "resolve_root"]

#: The splits: ``"all"`` is train followed by test.
SPLITS = ("train", "test", "all")
#: How labels are read (``data.labels``): see :mod:`clusterkit.data.datasets`.
LABEL_MODES = ("auto", "folders", "none")
#: The file name endings (any case) read as images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
#: The last sentence of a missing-data message.
ROOT_HINT = "Then set data.root in the recipe or pass --set data.root=PATH."


@attrs.define(eq=False)
class DatasetInfo:
    """Per-dataset defaults.

    Attributes:
        mean, std: per-channel normalisation statistics in ``[0, 1]`` units
            (length ``channels``).
        hflip: whether horizontal flipping preserves the class (False for digits
            and clothes, True for natural images); the augmentation default.
        channels: number of image channels (1 or 3).
        prepare: how to obtain and lay out the files; quoted in error messages.
        default_root: folder used when ``root`` is None (None: a root is required,
            except for bundled data).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool
    channels: int
    prepare: str
    default_root: str | None = None


_IMAGENET_HINT = (
    "For ImageNet-10 or ImageNet-Dogs, copy the class folders named by "
    "clusterkit.data.read_synsets('imagenet10') or read_synsets('imagenet_dogs') out of an "
    "ImageNet-1k train folder into ROOT"
)

DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(
        mean=(0.3053,),
        std=(0.3759,),
        hflip=False,
        channels=1,
        prepare="Nothing to prepare: the 1797 8x8 digit images ship with scikit-learn "
        "(sklearn.datasets.load_digits) and no root is needed",
    ),
    "fashion_mnist": DatasetInfo(
        mean=(0.2860,),
        std=(0.3530,),
        hflip=False,
        channels=1,
        prepare="Install Debian's package with `apt-get install dataset-fashion-mnist` (it puts "
        "the files in /usr/share/datasets/fashion-mnist, the default root), or on a machine with "
        "internet download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from the Fashion-MNIST project "
        "page (github.com/zalandoresearch/fashion-mnist) and put the four files directly in ROOT",
        default_root="/usr/share/datasets/fashion-mnist",
    ),
    "cifar10": DatasetInfo(
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        hflip=True,
        channels=3,
        prepare="On a machine with internet, download cifar-10-python.tar.gz (the 'CIFAR-10 python "
        "version') from the CIFAR page (www.cs.toronto.edu/~kriz/cifar.html) and extract it with "
        "`tar xzf cifar-10-python.tar.gz -C ROOT` so that ROOT/cifar-10-batches-py/data_batch_1 "
        "exists",
    ),
    "cifar100": DatasetInfo(
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        hflip=True,
        channels=3,
        prepare="On a machine with internet, download cifar-100-python.tar.gz (the 'CIFAR-100 "
        "python version') from the CIFAR page (www.cs.toronto.edu/~kriz/cifar.html) and extract "
        "it with `tar xzf cifar-100-python.tar.gz -C ROOT` so that ROOT/cifar-100-python/train "
        "exists (the 20 coarse superclasses are the targets)",
    ),
    "stl10": DatasetInfo(
        mean=(0.4467, 0.4398, 0.4066),
        std=(0.2603, 0.2566, 0.2713),
        hflip=True,
        channels=3,
        prepare="On a machine with internet, download stl10_binary.tar.gz (the binary version) "
        "from the STL-10 page (cs.stanford.edu/~acoates/stl10) and extract it with "
        "`tar xzf stl10_binary.tar.gz -C ROOT` so that ROOT/stl10_binary/train_X.bin exists "
        "(only train_X/y.bin, test_X/y.bin and class_names.txt are read; unlabeled_X.bin may be "
        "deleted)",
    ),
    "imagefolder": DatasetInfo(
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        hflip=True,
        channels=3,
        prepare="Put the images in ROOT (extensions "
        + " ".join(IMAGE_EXTENSIONS)
        + "): a flat folder or any tree of them is unlabeled data (data.labels: none, or auto "
        "when some image sits outside a sub-folder); for labelled data arrange them as "
        "ROOT/<class>/<image> with one folder per class, or split as ROOT/train/<class>/<image> and "
        "ROOT/test/<class>/<image> (val/ is accepted for test/). "
        + _IMAGENET_HINT,
    ),
}


def read_synsets(name: str) -> list[str]:
    """WordNet ids of a standard ImageNet subset: ``"imagenet10"`` (10) or ``"imagenet_dogs"`` (15)."""
    names = ("imagenet10", "imagenet_dogs")
    if name not in names:
        raise DataError(f"Unknown synset list '{name}'; choose one of {', '.join(names)}.")
    text = resources.files("clusterkit.data").joinpath("synsets", f"{name}_synsets.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def resolve_root(name: str, info: DatasetInfo, root: str | os.PathLike | None) -> Path:
    """The data folder of dataset ``name``: ``root``, or its default; DataError when it is not a folder."""
    if root is None:
        if info.default_root is None:
            raise DataError(
                f"Dataset '{name}' needs a data folder but no root was given. {info.prepare}. "
                f"{ROOT_HINT}"
            )
        root = info.default_root
    path = Path(os.path.expanduser(os.fspath(root)))
    if not path.is_dir():
        raise DataError(
            f"Dataset '{name}': the data root '{path}' does not exist or is not a folder. "
            f"{info.prepare}. {ROOT_HINT}"
        )
    return path
