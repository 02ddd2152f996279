#!/usr/bin/env bash
# One-shot GPU check: slime/backends/cuda/gpu_check/ (cli.SECTIONS: what each section proves, needs and may take).
#
#   scripts/gpu_check.sh --prepare DIR      on a networked machine: download the wheels the check carries into DIR
#                                           (Python 3.12, x86_64, at most 60 MiB, ~33 MB: megatron-core, einops,
#                                           sglang --no-deps and the modules its deserialiser's import loads)
#   scripts/gpu_check.sh --dry-run [--wheels DIR]
#                                           every section, what it needs and whether this machine has it (counting
#                                           DIR's wheels as installed); runs nothing
#   scripts/gpu_check.sh [--wheels DIR] [--out FILE] [--allow-skip] [--only NAME,NAME]
#                                           on the GPU machine (no network): install DIR's wheels into a scratch
#                                           folder, run the sections (at most ~4 min on one H100), write one JSON
#                                           report (default gpu_check.json, rewritten after every section)
#
# Exit: 0 every section ok; 1 a section failed; 2 no GPU here (one line, nothing run); 3 a section skipped (a need
# unmet or out of time) without --allow-skip; 124 the hard time limit stopped it (the report holds what finished).
# The GPU image holds Python 3.12, CUDA torch, Triton, transformers, JAX with its CUDA plugin, optax; it lacks
# megatron-core and sglang (carried here) and Ray (not carried: its wheel alone is 79 MB; slime_train skips).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
MAX_BYTES=$((60 * 1024 * 1024))
HARD_LIMIT_S=230  # the Python side plans for 220 s; the wheel install comes before
# Not in the image: first on the path.
FRONT_WHEELS=(megatron-core==0.16.1 einops==0.8.1)
# sglang's own code, without its dependencies (its CUDA kernels cannot be carried and the check needs none).
SGLANG_WHEEL=sglang==0.5.10.post1
# What importing sglang.srt.utils.common / .patch_torch / weight_sync.tensor_bucket loads (needs.py,
# SGLANG_IMPORT_MODULES), resolved with their own dependencies; searched after the image's own packages.
SGLANG_IMPORTS=(pybase64 orjson ipython traitlets pygments starlette anyio idna certifi psutil pillow aiohttp
    multidict yarl requests urllib3 pydantic tqdm packaging typing_extensions)
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)

usage() {
    echo "usage: $0 --prepare DIR | --dry-run [--wheels DIR] |" \
        "[--wheels DIR] [--out FILE] [--allow-skip] [--only NAMES]" >&2
    exit 2
}

prepare() {
    local dir="$1"
    mkdir -p "$dir"
    "$PYTHON" -m pip download --quiet --no-deps "${PLATFORM[@]}" -d "$dir" "${FRONT_WHEELS[@]}" "$SGLANG_WHEEL"
    "$PYTHON" -m pip download --quiet "${PLATFORM[@]}" -d "$dir" "${SGLANG_IMPORTS[@]}"
    local bytes
    bytes=$(du -sb "$dir" | cut -f1)
    if [ "$bytes" -gt "$MAX_BYTES" ]; then
        echo "gpu_check --prepare: $dir holds $bytes bytes, over the 60 MiB budget" >&2
        exit 1
    fi
    echo "gpu_check --prepare: $dir ready ($bytes bytes in $(ls "$dir" | wc -l) wheels)"
}

# DIR's wheels into SCRATCH/front (megatron-core, einops: on PYTHONPATH) and SCRATCH/back (the rest: appended to
# sys.path, so the image's own numpy, pydantic, ... win over the carried ones).
install_wheels() {
    local dir="$1" scratch="$2" front=() back=() wheel
    for wheel in "$dir"/*.whl; do
        case "$(basename "$wheel")" in
            megatron_core-* | einops-*) front+=("$wheel") ;;
            *) back+=("$wheel") ;;
        esac
    done
    local install=("$PYTHON" -m pip install --quiet --no-index --no-deps)
    [ ${#front[@]} -eq 0 ] || "${install[@]}" --target "$scratch/front" "${front[@]}"
    [ ${#back[@]} -eq 0 ] || "${install[@]}" --target "$scratch/back" "${back[@]}"
}

wheels="" out="gpu_check.json" dry_run="" passthrough=()
while [ $# -gt 0 ]; do
    case "$1" in
        --prepare) [ $# -eq 2 ] || usage; prepare "$2"; exit 0 ;;
        --dry-run) dry_run=1; shift ;;
        --wheels) [ $# -ge 2 ] || usage; wheels="$2"; shift 2 ;;
        --out) [ $# -ge 2 ] || usage; out="$2"; shift 2 ;;
        --allow-skip) passthrough+=(--allow-skip); shift ;;
        --only) [ $# -ge 2 ] || usage; passthrough+=(--only "$2"); shift 2 ;;
        *) usage ;;
    esac
done

cd "$REPO"
if [ -n "$dry_run" ]; then
    PYTHONPATH="$REPO" exec "$PYTHON" -m slime.backends.cuda.gpu_check --dry-run ${wheels:+--wheels "$wheels"}
fi

# No GPU: one line, at once, before anything is installed or imported.
PYTHONPATH="$REPO" "$PYTHON" -c "
import sys
from slime.backends.cuda.gpu_check import no_gpu_reason
reason = no_gpu_reason()
if reason:
    print(f'gpu_check: no GPU on this machine ({reason}); nothing to check')
    sys.exit(2)
" || exit $?

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
site_after=()
if [ -n "$wheels" ]; then
    install_wheels "$wheels" "$scratch"
    [ ! -d "$scratch/back" ] || site_after=(--site-after "$scratch/back")
fi
code=0
PYTHONPATH="$REPO${wheels:+:$scratch/front}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" timeout "$HARD_LIMIT_S" \
    "$PYTHON" -m slime.backends.cuda.gpu_check --out "$out" "${site_after[@]}" "${passthrough[@]}" || code=$?
if [ "$code" -eq 124 ]; then
    echo "gpu_check: stopped at the ${HARD_LIMIT_S} s limit; $out holds the sections that finished" >&2
fi
exit "$code"
