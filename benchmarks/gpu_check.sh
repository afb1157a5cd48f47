#!/usr/bin/env bash
# GPU check (issue 24, item 6): on a machine with an NVIDIA GPU, in under 8 minutes,
#   1. the test suite's CUDA tests (the tests that run on CUDA when torch sees a GPU:
#      tests/core/test_kmeans.py::test_cuda_matches_cpu, the cuda cases of tests/core/test_pipeline.py,
#      tests/core/test_metrics.py::test_torch_and_list_inputs);
#   2. the quickstart (recipes/quickstart.yaml) trained on CUDA;
#   3. the speed benchmark (benchmarks/speed_vs_official.py --device cuda) for 2 epochs
#      (1 untimed + 1 timed) of ProPos and DigPro: official and clusterkit when the official
#      environment exists (bash benchmarks/setup_official.sh), clusterkit alone otherwise;
# and writes what it saw into one file, benchmarks/results/gpu_check.md (--out).
#
# Usage (repo root, clusterkit's environment active or --python):
#   bash benchmarks/gpu_check.sh [--python PY] [--out FILE] [--official-python PY] [--official-root DIR]
#                                [--budget SECONDS]
# Without a CUDA GPU visible to torch it stops at once (exit 3), runs nothing and writes nothing.
set -u -o pipefail

PY=python
OUT=benchmarks/results/gpu_check.md
OFFICIAL_PY=/work/official-venv/bin/python
OFFICIAL_ROOT=/work/official
BUDGET=470   # seconds for the three steps together (issue 24: under 8 minutes)
while [ $# -gt 0 ]; do
    case "$1" in
        --python) PY=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --official-python) OFFICIAL_PY=$2; shift 2 ;;
        --official-root) OFFICIAL_ROOT=$2; shift 2 ;;
        --budget) BUDGET=$2; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.." || exit 2
probe=$("$PY" -c "import clusterkit, torch; print('cuda' if torch.cuda.is_available() else f'torch {torch.__version__}, built for CUDA {torch.version.cuda}')" 2>/dev/null)
if [ -z "$probe" ]; then
    echo "gpu_check.sh: '$PY' cannot import clusterkit and torch. Activate clusterkit's environment (pip install -e \".[test]\") or pass --python PATH/TO/python." >&2
    exit 2
fi
if [ "$probe" != cuda ]; then
    smi="nvidia-smi is not installed"
    command -v nvidia-smi >/dev/null 2>&1 && smi="nvidia-smi says: $(nvidia-smi -L 2>&1 | head -n 2 | tr '\n' ' ')"
    echo "gpu_check.sh: no GPU is present: torch.cuda.is_available() is False here ($probe; $smi). This check needs a machine with an NVIDIA GPU and a CUDA build of torch; nothing was run and $OUT was not written." >&2
    exit 3
fi

START=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/clusterkit-gpu-check.XXXXXX")
SECTIONS="$WORK/sections.md"
: > "$SECTIONS"
STATUS=0

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# run_step TITLE SECONDS COMMAND...: runs the command under `timeout`, appends its command, exit status,
# time and the tail of its output to the report.
run_step() {
    local title=$1 limit=$2; shift 2
    local log="$WORK/step.log" t0 rc
    (( limit > $(left) )) && limit=$(left)
    if (( limit < 20 )); then
        printf '## %s\n\nNot run: the 8-minute budget was spent.\n\n' "$title" >> "$SECTIONS"
        STATUS=1
        return
    fi
    echo "gpu_check.sh: $title (at most ${limit} s)" >&2
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    rc=$?
    (( rc != 0 )) && STATUS=1
    {
        printf '## %s\n\n`%s`: ' "$title" "$(printf '%q ' "$@" | sed 's/ $//')"
        if (( rc == 124 || rc == 137 )); then printf '**stopped at its %s s limit**' "$limit"
        elif (( rc == 0 )); then printf 'passed'
        else printf '**failed (exit %s)**' "$rc"; fi
        printf ' in %s s.\n\n```\n' "$(( $(date +%s) - t0 ))"
        tail -n 25 "$log"
        printf '```\n\n'
    } >> "$SECTIONS"
}

run_step "CUDA tests" 150 env OMP_NUM_THREADS=2 "$PY" -m pytest -q -p no:cacheprovider \
    "tests/core/test_kmeans.py::test_cuda_matches_cpu" \
    "tests/core/test_pipeline.py" -k "cuda or test_torch_and_list_inputs" \
    "tests/core/test_metrics.py::test_torch_and_list_inputs"
# (-k keeps the cuda cases of test_pipeline.py; the two named tests match it too)

run_step "Quickstart on CUDA" 150 "$PY" -m clusterkit run recipes/quickstart.yaml --set run.device=cuda \
    --set run.progress=false --out "$WORK/quickstart"
summary="$WORK/quickstart/summary.json"
if [ -f "$summary" ]; then
    "$PY" - "$summary" >> "$SECTIONS" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
m = s.get("metrics") or {}
pix = s.get("pixel_kmeans") or {}
line = ", ".join(f"{k.upper()} {m[k]:.3f}" for k in ("nmi", "acc", "ari") if isinstance(m.get(k), (int, float)))
base = ", ".join(f"{k.upper()} {pix[k]:.3f}" for k in ("nmi", "acc", "ari") if isinstance(pix.get(k), (int, float)))
wall, per_epoch = s.get("wall_time_s"), s.get("seconds_per_epoch")
print(f"Quickstart summary ({s.get('device')}): {line or 'no metrics found'}; k-means on pixels: {base or '?'}; "
      f"{wall:.0f} s in all, {per_epoch:.2f} s per epoch; peak memory {s.get('peak_memory_mb', 0):.0f} MB.\n"
      if wall and per_epoch else f"Quickstart summary: {line or 'no metrics found'}.\n")
EOF
fi

systems=(official clusterkit)
note="official and clusterkit"
if [ ! -x "$OFFICIAL_PY" ] || [ ! -d "$OFFICIAL_ROOT/ProPos" ]; then
    systems=(clusterkit)
    note="clusterkit alone: no official environment at $OFFICIAL_PY / $OFFICIAL_ROOT (bash benchmarks/setup_official.sh)"
fi
run_step "Speed benchmark on CUDA, 2 epochs ($note)" 600 "$PY" benchmarks/speed_vs_official.py \
    --device cuda --methods propos digpro --systems "${systems[@]}" --untimed-epochs 1 --timed-epochs 1 \
    --official-python "$OFFICIAL_PY" --official-root "$OFFICIAL_ROOT" --work "$WORK/speed" \
    --out "$WORK/speed.md"
if [ -f "$WORK/speed.md" ]; then
    { echo "### The speed benchmark's report"; echo; sed 's/^#/###/' "$WORK/speed.md"; echo; } >> "$SECTIONS"
fi

mkdir -p "$(dirname "$OUT")"
{
    echo "# GPU check (benchmarks/gpu_check.sh)"
    echo
    echo "Generated $(date -u '+%Y-%m-%d %H:%M UTC') by \`bash benchmarks/gpu_check.sh\` in $(( $(date +%s) - START )) s" \
         "(budget $BUDGET s); result: $([ $STATUS = 0 ] && echo 'every step passed' || echo '**a step failed or was cut short**')."
    echo
    echo '```'
    "$PY" -c "import torch, clusterkit; p = torch.cuda.get_device_properties(0); print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}; clusterkit {clusterkit.__version__}')"
    nvidia-smi -L 2>/dev/null
    git log -1 --format='git %h %s' 2>/dev/null
    echo '```'
    echo
    cat "$SECTIONS"
} > "$OUT"
echo "gpu_check.sh: wrote $OUT" >&2
rm -rf "$WORK"
exit $STATUS
