"""Step-by-step preparation guides for the datasets of the shipped recipes.

clusterkit ships no images.  A recipe names its guide in ``data.guide``; when the
training data cannot be found (a missing or empty root, missing files), the trainer
appends that guide to the error, so the user sees the shell steps that build the
folder the recipe expects.  The same texts make up ``docs/data.md``.

    >>> from clusterkit.data.guides import GUIDES, guide_text
    >>> guide_text("imagenet10").splitlines()[0]
    'How to prepare ImageNet-10:'

Print a guide from the shell with ``python -m clusterkit.data.guides imagenet10``
(no argument: the list of guides).

Every path in the guides is relative to the directory ``clusterkit run`` is started
from, because the recipes' ``data.root`` values (``data/imagenet-10`` ...) are.
"""

from __future__ import annotations

import sys

from clusterkit.errors import DataError, RecipeError
from clusterkit.schema import did_you_mean

__all__ = ["GUIDES", "guide_text", "train_data_missing"]

# The command that prints a shipped synset list, one WordNet id a line.
_SYNSETS = "python -c \"import clusterkit.data as d; print('\\n'.join(d.read_synsets('{name}')))\""


def _imagenet_subset(title: str, name: str, n_classes: int, kind: str, n_images: str, root: str,
                     recipe: str) -> str:
    synsets = _SYNSETS.format(name=name)
    return f"""\
How to prepare {title}:
{title} is the {n_images} ILSVRC2012 training images of {n_classes} {kind} (1,300
per synset), the subset used by DAC, CC, ProPos and DigPro. clusterkit ships the list of synsets,
not the images: build the folder from an ILSVRC2012 (ImageNet-1k) train folder you already
have, laid out as <train>/<wnid>/<image>.JPEG. Run the steps from the directory you start
clusterkit in, with the python that has clusterkit installed.
  1. Point a shell variable at your ILSVRC2012 train folder:
       IMAGENET_TRAIN=/path/to/ILSVRC/Data/CLS-LOC/train
  2. List the {n_classes} WordNet ids (shipped as clusterkit/data/synsets/{name}_synsets.txt):
       {synsets}
  3. Copy those class folders into {root} (to save disk space, link them instead:
     ln -s "$IMAGENET_TRAIN/$s" in place of cp -r, with an absolute IMAGENET_TRAIN):
       mkdir -p {root}
       for s in $({synsets}); do cp -r "$IMAGENET_TRAIN/$s" {root}/$s; done
  4. Check: {n_classes} class folders, {n_images} images in all:
       ls {root} | wc -l
       find -L {root} -type f -name '*.JPEG' | wc -l
  5. Train: clusterkit run recipes/{recipe}
     (data kept elsewhere: add --set data.root=PATH).
"""


_TINY_IMAGENET = """\
How to prepare Tiny-ImageNet:
Tiny-ImageNet (tiny-imagenet-200) is the 64x64 ImageNet subset of Stanford's CS231n course:
200 classes with 500 training images each (100,000), 50 labelled validation images each
(10,000) and 10,000 unlabelled test images. DigPro's Table 1 clusters the 100,000 training
images (data.split: train), resized to 32x32. clusterkit reads it as an image folder with
train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, so the archive's layout has to be rearranged.
  1. Download tiny-imagenet-200.zip from the Tiny ImageNet page of Stanford's CS231n course and
     unzip it under data/:
       mkdir -p data && unzip -q tiny-imagenet-200.zip -d data
       cd data/tiny-imagenet-200
  2. Flatten the training folders, train/<wnid>/images/*.JPEG -> train/<wnid>/*.JPEG (the
     bounding-box files are not needed):
       for d in train/*/; do mv "$d"images/*.JPEG "$d" && rmdir "$d"images && rm -f "$d"*_boxes.txt; done
  3. Sort the validation images into class folders, val/images/<file> -> val/<wnid>/<file>,
     with <wnid> the second column of val/val_annotations.txt:
       while IFS=$'\\t' read -r file wnid _; do mkdir -p "val/$wnid" && mv "val/images/$file" "val/$wnid/"; done < val/val_annotations.txt
       rmdir val/images
  4. Move the unlabelled test/ folder out of the tree (clusterkit would take test/ for the
     labelled test split, in preference to val/):
       mv test ../tiny-imagenet-200-test-unlabelled
       cd ../..
  5. Check: 200 class folders and 100,000 images in train/, 10,000 images in val/:
       ls data/tiny-imagenet-200/train | wc -l
       find data/tiny-imagenet-200/train -name '*.JPEG' | wc -l
       find data/tiny-imagenet-200/val -name '*.JPEG' | wc -l
  6. Train: clusterkit run recipes/digpro_tiny_imagenet.yaml
     (data kept elsewhere: add --set data.root=PATH).
"""  # noqa: E501  (step 3's shell loop stays on one line, to be copied as is)

_RSOD = """\
How to prepare RSOD:
RSOD is the RSOD-Dataset of Wuhan University (LIESMARS), published for object detection in
remote-sensing images: 976 images of 4 classes, aircraft (446), oiltank (165), overpass (176) and
playground (189). Clustering uses each image's class and ignores the boxes. clusterkit reads it
as one folder per class: data/rsod/<class>/<image>.
  1. Download the four class archives of the RSOD-Dataset (aircraft, oiltank, overpass,
     playground) from the dataset's official release by Wuhan University and unpack them into
     one folder, here called RSOD/, so that RSOD/<class>/JPEGImages/ holds the images (the
     annotation folders beside it are not needed).
  2. Copy the images into one folder per class:
       for c in aircraft oiltank overpass playground; do
         mkdir -p data/rsod/$c && cp RSOD/$c/JPEGImages/*.jpg data/rsod/$c/
       done
  3. Check: 4 class folders, 976 images in all:
       ls data/rsod
       find data/rsod -type f | wc -l
  4. Train: clusterkit run recipes/digpro_rsod.yaml
     (data kept elsewhere: add --set data.root=PATH).
"""

_UC_MERCED = """\
How to prepare UC-Merced:
UC-Merced is the UC Merced Land Use dataset of the University of California, Merced (Yang and
Newsam, 2010), cut from USGS aerial orthoimagery: 21 land-use classes x 100 images = 2,100
images, 256x256 pixel TIFF files. clusterkit reads it as one folder per class:
data/uc-merced/<class>/<image>.tif.
  1. Download UCMerced_LandUse.zip from the dataset's page at UC Merced and unzip it:
       unzip -q UCMerced_LandUse.zip
     which gives UCMerced_LandUse/Images/<class>/<class>NN.tif (agricultural ... tenniscourt).
  2. Use the Images folder as the data root:
       mkdir -p data && mv UCMerced_LandUse/Images data/uc-merced
  3. Check: 21 class folders, 2,100 images in all:
       ls data/uc-merced | wc -l
       find data/uc-merced -type f -name '*.tif' | wc -l
  4. Train: clusterkit run recipes/digpro_uc_merced.yaml
     (data kept elsewhere: add --set data.root=PATH).
"""

_SIRI_WHU = """\
How to prepare SIRI-WHU:
SIRI-WHU is the Google-imagery scene classification dataset of Wuhan University's RS-IDEA group
(Zhao, Zhong and Zhang): 12 classes x 200 images = 2,400 images of 200x200 pixels (agriculture,
commercial, harbor, idle_land, industrial, meadow, overpass, park, pond, residential, river,
water). clusterkit reads it as one folder per class: data/siri-whu/<class>/<image>.
  1. Download the SIRI-WHU Google image dataset from the RS-IDEA group's release at Wuhan
     University and unpack it. Find the folder that holds the 12 class folders (its name differs
     between releases), here called SIRI/.
  2. Copy it as the data root (only the 12 class folders may be inside; move out any readme
     folder, since every sub-folder counts as a class):
       mkdir -p data && cp -r SIRI data/siri-whu
  3. Check: 12 class folders, 2,400 images in all:
       ls data/siri-whu | wc -l
       find data/siri-whu -type f | wc -l
  4. Train: clusterkit run recipes/digpro_siri_whu.yaml
     (data kept elsewhere: add --set data.root=PATH).
"""

_CIFAR10 = """\
How to prepare CIFAR-10:
CIFAR-10 is read from the "CIFAR-10 python version" archive (pickled batches), not as an image
folder. The recipes cluster all 60,000 images (data.split: all = the 50,000 training images
followed by the 10,000 test images), the protocol of the clustering papers.
  1. On a machine with internet, download cifar-10-python.tar.gz (the "CIFAR-10 python version")
     from the CIFAR page of the University of Toronto (www.cs.toronto.edu/~kriz/cifar.html).
  2. Extract it under data/cifar10:
       mkdir -p data/cifar10 && tar xzf cifar-10-python.tar.gz -C data/cifar10
  3. Check: data/cifar10/cifar-10-batches-py/ holds data_batch_1 ... data_batch_5, test_batch and
     batches.meta:
       ls data/cifar10/cifar-10-batches-py
  4. Train: clusterkit run recipes/digpro_cifar10.yaml
     (data kept elsewhere: add --set data.root=PATH).
"""

GUIDES: dict[str, str] = {
    "imagenet10": _imagenet_subset("ImageNet-10", "imagenet10", 10, "synsets", "13,000", "data/imagenet-10",
                                   "digpro_imagenet10.yaml"),
    "imagenet_dogs": _imagenet_subset("ImageNet-Dogs", "imagenet_dogs", 15, "dog synsets", "19,500",
                                      "data/imagenet-dogs", "digpro_imagenet_dogs.yaml"),
    "tiny_imagenet": _TINY_IMAGENET,
    "rsod": _RSOD,
    "uc_merced": _UC_MERCED,
    "siri_whu": _SIRI_WHU,
    "cifar10": _CIFAR10,
}
"""Guide name (a recipe's ``data.guide``) -> the guide: a title line, then numbered steps."""


def guide_text(name: str) -> str:
    """The preparation guide ``name``; an unknown name is a :class:`RecipeError` with a did-you-mean."""
    try:
        return GUIDES[name]
    except (KeyError, TypeError):
        raise RecipeError(
            f"Unknown data guide '{name}' in data.guide.{did_you_mean(name, GUIDES)} Known guides: "
            f"{', '.join(sorted(GUIDES))}. Set data.guide to one of them, or remove it (it only "
            "chooses the preparation steps shown when the data is missing)."
        ) from None


# Phrases of the loaders' messages (clusterkit.data.registry, .readers, .imagefolder) for absent data: no root
# given, a root that does not exist, no dataset files under the root, a missing file, a
# folder without class folders, an empty class folder, a val/ folder without train/.
_MISSING_MARKERS = (
    "needs a data folder but no root was given",
    "does not exist or is not a folder",
    "(looked for ",
    "is missing (the download looks incomplete)",
    "contains no class folders",
    "holds no image files",
    "but no 'train/' folder",
)
# Phrases of the messages for data that is present but unreadable or inconsistent: a guide
# does not help there (the fix is to replace the file), so these win over the markers above.
_BROKEN_MARKERS = (
    "cannot read",
    "cannot decode",
    "could be read",
    "are inconsistent",
)


def train_data_missing(exc: DataError) -> bool:
    """True when ``exc`` says the training data is missing (absent or empty root, missing
    files), so a preparation guide is the right help; False for corrupt or inconsistent
    files and for every other error."""
    message = str(exc)
    if any(marker in message for marker in _BROKEN_MARKERS):
        return False
    return any(marker in message for marker in _MISSING_MARKERS)


def _main(argv: list[str]) -> int:
    if not argv:
        print("Data preparation guides (python -m clusterkit.data.guides NAME):")
        for name, text in GUIDES.items():
            print(f"  {name:15s} {text.splitlines()[0]}")
        return 0
    try:
        print(guide_text(argv[0]), end="")
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
