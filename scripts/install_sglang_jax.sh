#!/usr/bin/env bash
# Install sglang-jax at its known-good commit (slime/backends/pinned_source.py names it) into the environment of
# PYTHON, with CONSTRAINTS applied to its dependencies: from SGLANG_JAX_WHEEL (a wheel built from that commit),
# else the wheel in ../shared/wheels/ where present, else the commit's git URL. Idempotent.
#   install_sglang_jax.sh PYTHON CONSTRAINTS
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${1:?usage: install_sglang_jax.sh PYTHON CONSTRAINTS}"
CONSTRAINTS="${2:?usage: install_sglang_jax.sh PYTHON CONSTRAINTS}"
if "$PYTHON" -m slime.backends.pinned_source --check sglang-jax >/dev/null 2>&1; then
  exit 0
fi
source_of_wheel="${SGLANG_JAX_WHEEL:-}"
if [ -z "$source_of_wheel" ]; then
  source_of_wheel="$(ls ../shared/wheels/sglang_jax-*.whl 2>/dev/null | head -n 1 || true)"
fi
if [ -z "$source_of_wheel" ]; then
  source_of_wheel="$("$PYTHON" -m slime.backends.pinned_source --requirement sglang-jax)"
fi
"$PYTHON" -m pip install -q -c "$CONSTRAINTS" "$source_of_wheel" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
"$PYTHON" -m slime.backends.pinned_source --check sglang-jax
