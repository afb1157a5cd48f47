#!/usr/bin/env bash
# Set up the official code that benchmarks/parity.py and benchmarks/parity/make_golden.py run
# (issue 24, item 4): checkouts of the official repositories at the commits every recorded result
# names, side by side in one folder (parity.py's --official-root, default /work/official), and a
# virtual environment with the packages that code imports (parity.py's --official-python, default
# /work/official-venv/bin/python).  Nothing of the official code is copied into clusterkit.
#
# Usage (from anywhere):
#   bash benchmarks/setup_official.sh [--root DIR] [--venv DIR] [--source DIR|URL] [--torch-from PYTHON]
#                                     [--only NAME ...] [--no-venv] [--no-checkout]
#
#   --root DIR         where the checkouts go (default /work/official): DIR/ProPos, DIR/DigPro, ...
#   --venv DIR         the official code's virtual environment (default /work/official-venv)
#   --source SRC       where to clone from (default https://github.com). A URL prefix: SRC/<owner>/<name>.git.
#                      A local folder: the first of SRC/<owner>+<name>/repo, SRC/<owner>/<name>[.git], SRC/<name>,
#                      SRC/<name>.git that is a git repository (a clone, a bare repository or a mirror)
#   --torch-from PY    pin torch and torchvision to the versions this python has (default: the repo's
#                      .venv/bin/python if it exists, else python3); without torch there, the newest allowed
#   --only NAME        set up only these repositories (repeatable; names as in the table below)
#   --no-venv          checkouts only;  --no-checkout: the environment only
#   --python PY        the python that creates the environment (default python3)
#
# Existing checkouts are fetched only if the pinned commit is missing, then checked out (detached)
# at it; a checkout with local changes is refused (the harness runs the official code unmodified).
# Re-running is safe: an existing environment is reused and the packages are (re)installed into it.
set -euo pipefail

# name  owner/repo  commit (the commits in benchmarks/results/parity*.md and tests/golden/*.pt)
REPOS=(
  "ProPos                 Hzzone/ProPos                     cc35d8ca276aab8aa5dfb638fa15f919cf483824"
  "torch_clustering       Hzzone/torch_clustering           b7fb417f7a144a8332ed9f9417e212f2a6ea7c05"
  "DigPro                 Regan-Zhang/DigPro                dfa30b3e77d3c0c7553e84d303b91cb1cc468d06"
  "Contrastive-Clustering Yunfan-Li/Contrastive-Clustering  61daba8b5fdb41eb1be7c93128cd1ed02a8e04a8"
  # HaDis: parity.py --methods hadis and make_golden.py; PICI: make_golden.py (tests/golden/pici_losses.pt)
  "HaDis                  Regan-Zhang/HaDis                 36aab39622c9d52611b0a164ed9a15a0a41f6de0"
  "PICI                   Regan-Zhang/PICI                  9feab42c09e752a5c7af6ffdc3019248816eb19f"
)
# What the official code imports besides the standard library (its requirements.txt / README,
# checked against its import lines): numpy < 2 (written for numpy 1), lightly 1.4.24 (DigPro's
# SMoG prototypes and memory bank), scikit-learn 1.3.2 (CC's evaluation), munkres, scipy, pyyaml,
# matplotlib, tqdm, pillow, timm.  Not installed: wandb (the harness turns it off), tensorboard and
# prettytable (listed but never imported), faiss (imported only inside a try), opencv (only
# ProPos' unused multicrop_transform.py and CC's blur, which parity.py replaces by an empty cv2).
PACKAGES=("numpy<2" "lightly==1.4.24" "scikit-learn==1.3.2" munkres scipy pyyaml matplotlib tqdm pillow timm)

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
root=/work/official
venv=/work/official-venv
source=https://github.com
torch_from=""
python=python3
only=()
do_venv=1
do_checkout=1

die() { echo "setup_official.sh: $*" >&2; exit 2; }
need() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --root) need "$@"; root=$2; shift 2 ;;
    --venv) need "$@"; venv=$2; shift 2 ;;
    --source) need "$@"; source=$2; shift 2 ;;
    --torch-from) need "$@"; torch_from=$2; shift 2 ;;
    --python) need "$@"; python=$2; shift 2 ;;
    --only) need "$@"; only+=("$2"); shift 2 ;;
    --no-venv) do_venv=0; shift ;;
    --no-checkout) do_checkout=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

known=" $(for r in "${REPOS[@]}"; do set -- $r; printf '%s ' "$1"; done)"
for n in "${only[@]+"${only[@]}"}"; do
  [[ "$known" == *" $n "* ]] || die "--only $n: not one of:$known"
done

# The clone source of one repository: a URL, or a git repository inside a local folder.
source_of() {  # owner/name
  local slug=$1 owner=${1%%/*} name=${1##*/} c
  if [ -d "$source" ]; then
    for c in "$source/$owner+$name/repo" "$source/$owner/$name" "$source/$owner/$name.git" "$source/$name" "$source/$name.git"; do
      [ -d "$c" ] || continue
      c=$(cd "$c" && pwd -P)
      gd=$(git -C "$c" rev-parse --absolute-git-dir 2>/dev/null) || continue
      if [ "$gd" = "$c" ] || [ "$gd" = "$c/.git" ]; then  # the folder itself is a repository (bare or not)
        echo "$c"; return 0
      fi
    done
    die "no git repository for $slug under $source (tried <owner>+<name>/repo, <owner>/<name>[.git], <name>[.git])"
  elif [[ "$source" == *://* || "$source" == *@*:* ]]; then
    echo "${source%/}/$slug.git"
  else
    die "--source $source is neither a folder nor a URL"
  fi
}

checkout() {  # name owner/name commit
  local name=$1 slug=$2 commit=$3 dest="$root/$1" src
  src=$(source_of "$slug")
  if [ -e "$dest" ] && ! git -C "$dest" rev-parse --git-dir >/dev/null 2>&1; then
    die "$dest exists and is not a git checkout; move it away"
  fi
  if [ ! -e "$dest" ]; then
    echo "clone $slug from $src"
    git clone -q --no-checkout "$src" "$dest"
  elif [ -n "$(git -C "$dest" status --porcelain --untracked-files=no)" ]; then
    die "$dest has local changes; the harness runs the official code unmodified (git -C $dest stash, or remove it)"
  fi
  if ! git -C "$dest" cat-file -e "$commit^{commit}" 2>/dev/null; then
    echo "fetch $slug from $src"
    git -C "$dest" fetch -q "$src" || true
    git -C "$dest" cat-file -e "$commit^{commit}" 2>/dev/null || git -C "$dest" fetch -q "$src" "$commit" || true
    git -C "$dest" cat-file -e "$commit^{commit}" 2>/dev/null || die "$slug: commit $commit not found in $src"
  fi
  git -C "$dest" -c advice.detachedHead=false checkout -q --detach "$commit"
  missing=$(git -C "$dest" status --porcelain --untracked-files=no | sed -n 's/^ D //p')
  if [ -n "$missing" ]; then  # a partial mirror (large files left out): say which, the harness needs none of
    echo "warning: $slug: files missing from the source, not checked out:" $missing >&2  # these (pdf, checkpoints)
  fi
  echo "$name: $slug@$(git -C "$dest" rev-parse HEAD) in $dest"
}

if [ "$do_checkout" = 1 ]; then
  mkdir -p "$root"
  for r in "${REPOS[@]}"; do
    set -- $r
    if [ ${#only[@]} -eq 0 ] || [[ " ${only[*]} " == *" $1 "* ]]; then checkout "$1" "$2" "$3"; fi
  done
fi

if [ "$do_venv" = 1 ]; then
  if [ -z "$torch_from" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then torch_from="$REPO/.venv/bin/python"; else torch_from=python3; fi
  fi
  torch_pins=(torch torchvision)
  if versions=$("$torch_from" -c 'import torch, torchvision; print(torch.__version__.split("+")[0], torchvision.__version__.split("+")[0])' 2>/dev/null); then
    set -- $versions
    torch_pins=("torch==$1" "torchvision==$2")
  else
    echo "note: $torch_from has no torch; installing the newest torch/torchvision pip allows"
  fi
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  echo "install into $venv: ${torch_pins[*]} ${PACKAGES[*]}"
  "$venv/bin/python" -m pip install -q "${torch_pins[@]}" "${PACKAGES[@]}"
  "$venv/bin/python" - <<'EOF'
import lightly, munkres, numpy, sklearn, torch, torchvision  # noqa: F401  (what the official code imports)
print(f"official venv: torch {torch.__version__}, torchvision {torchvision.__version__}, numpy {numpy.__version__}, "
      f"lightly {lightly.__version__}, scikit-learn {sklearn.__version__}")
EOF
fi
echo "done: python benchmarks/parity.py --official-root $root --official-python $venv/bin/python ..."
