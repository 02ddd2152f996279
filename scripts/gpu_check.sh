#!/usr/bin/env bash
# One-shot GPU check (see slime/backends/cuda/gpu_check.py for what it measures).
#
#   scripts/gpu_check.sh --prepare DIR        on a networked machine: download the wheels the check needs into DIR
#                                             (megatron-core and einops for Python 3.12, x86_64; at most 60 MiB)
#   scripts/gpu_check.sh [--wheels DIR] [--out FILE]
#                                             on the GPU machine (no network): install DIR's wheels into a scratch
#                                             folder, run the check, write one JSON report (default gpu_check.json)
#
# The GPU image is expected to hold Python 3.12, CUDA torch, Triton, transformers (JAX/flax/optax for the JAX hook);
# it lacks megatron-core, sglang and Ray, and the check needs none but megatron-core.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
MAX_BYTES=$((60 * 1024 * 1024))
WHEELS=(megatron-core==0.16.1 einops==0.8.1)

prepare() {
    local dir="$1"
    mkdir -p "$dir"
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
        -d "$dir" "${WHEELS[@]}"
    local bytes
    bytes=$(du -sb "$dir" | cut -f1)
    if [ "$bytes" -gt "$MAX_BYTES" ]; then
        echo "gpu_check --prepare: $dir holds $bytes bytes, over the 60 MiB budget" >&2
        exit 1
    fi
    echo "gpu_check --prepare: $dir ready ($bytes bytes: $(ls "$dir" | tr '\n' ' '))"
}

if [ "${1:-}" = "--prepare" ]; then
    [ $# -eq 2 ] || { echo "usage: $0 --prepare DIR" >&2; exit 2; }
    prepare "$2"
    exit 0
fi

wheels="" out="gpu_check.json"
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) wheels="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        *) echo "usage: $0 [--prepare DIR | --wheels DIR] [--out FILE]" >&2; exit 2 ;;
    esac
done

# No GPU: one line, at once, before anything is installed or imported.
PYTHONPATH="$REPO" "$PYTHON" -c "
import sys
from slime.backends.cuda.gpu_check import no_gpu_reason
reason = no_gpu_reason()
if reason:
    print(f'gpu_check: no GPU on this machine ({reason}); nothing to check')
    sys.exit(2)
" || exit $?

site=""
if [ -n "$wheels" ]; then
    site="$(mktemp -d)/site"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links "$wheels" --target "$site" "${WHEELS[@]}"
fi
cd "$REPO"
PYTHONPATH="$REPO${site:+:$site}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" timeout 240 \
    "$PYTHON" -m slime.backends.cuda.gpu_check --out "$out"
