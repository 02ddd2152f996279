#!/usr/bin/env bash
# Install sglang-jax at its known-good commit (slime/backends/pinned_source.py names it) into the environment of
# PYTHON, with CONSTRAINTS applied to its dependencies: from SGLANG_JAX_WHEEL (a wheel built from that commit),
# else the wheel in ../shared/wheels/ where present, else the commit's git URL. Idempotent.
#   install_sglang_jax.sh PYTHON CONSTRAINTS
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${1:?usage: install_sglang_jax.sh PYTHON CONSTRAINTS}"
CONSTRAINTS="${2:?usage: install_sglang_jax.sh PYTHON CONSTRAINTS}"
if "$PYTHON" -W ignore::RuntimeWarning -m slime.backends.pinned_source --check sglang-jax >/dev/null 2>&1; then
  exit 0
fi
source_of_wheel="${SGLANG_JAX_WHEEL:-}"
if [ -z "$source_of_wheel" ]; then
  source_of_wheel="$(ls ../shared/wheels/sglang_jax-*.whl 2>/dev/null | head -n 1 || true)"
fi
if [ -z "$source_of_wheel" ]; then
  source_of_wheel="$("$PYTHON" -W ignore::RuntimeWarning -m slime.backends.pinned_source --requirement sglang-jax)"
fi
"$PYTHON" -m pip install -q -c "$CONSTRAINTS" "$source_of_wheel" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# sglang-jax requires msgpack-python 0.5.6, the old name of msgpack: its files overwrite msgpack 1.x's module, and
# Ray (which needs msgpack >= 1) then fails to decode its own errors. Put msgpack 1.x's files back; sglang-jax's
# calls (packb / unpackb) are the same in 1.x.
msgpack="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("msgpack"))' 2>/dev/null || true)"
if [ -n "$msgpack" ]; then
  "$PYTHON" -m pip install -q --force-reinstall --no-deps "msgpack==$msgpack" 2> >(grep -v "is ignored" >&2)
fi
"$PYTHON" -W ignore::RuntimeWarning -m slime.backends.pinned_source --check sglang-jax
