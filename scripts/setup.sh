#!/usr/bin/env bash
# Create a venv (once) and install slime with the CPU stack and test tools into it: the one install route.
# Developers run it as is; CI runs it only through .ci/install (which .ci/run and every generated CPU job of
# .github/workflows/ call), so CI's environments are made exactly as a developer's are.
# Idempotent: a second run only checks that everything is installed.
#   PYTHON            the interpreter the venv is made from (default python3)
#   SLIME_VENV        where the venv lives (default .venv)
#   SLIME_EXTRAS      the extras installed (default cpu,test)
#   SLIME_CONSTRAINTS the constraints file (default requirements/constraints-cpu.txt)
#   SLIME_STACK=tpu   the TPU stack on JAX's CPU build instead (Python 3.12 in .venv-tpu: JAX, flax, optax, orbax,
#                     the test tools, and sglang-jax at its known-good commit from SGLANG_JAX_WHEEL, a wheel file,
#                     else ../shared/wheels/ where present, else the commit's git URL); the defaults above follow
set -euo pipefail
cd "$(dirname "$0")/.."
STACK="${SLIME_STACK:-default}"
if [ "$STACK" = tpu ]; then
  PYTHON="${PYTHON:-$(bash scripts/find_python.sh 3.12)}"
  VENV="${SLIME_VENV:-.venv-tpu}"
  EXTRAS="${SLIME_EXTRAS:-tpu-stack,test}"
  CONSTRAINTS="${SLIME_CONSTRAINTS:-requirements/constraints-tpu-cpu.txt}"
else
  PYTHON="${PYTHON:-python3}"
  VENV="${SLIME_VENV:-.venv}"
  EXTRAS="${SLIME_EXTRAS:-cpu,test}"
  CONSTRAINTS="${SLIME_CONSTRAINTS:-requirements/constraints-cpu.txt}"
fi
if [ -z "$PYTHON" ]; then
  echo "setup: SLIME_STACK=$STACK needs Python 3.12 (python3.12 on PATH, or pyenv's 3.12); set PYTHON=..." >&2
  exit 3
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The constraints file pins the CPU torch build so no CUDA torch is ever pulled.
"$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" -e ".[${EXTRAS}]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
if [ "$STACK" = tpu ]; then
  bash scripts/install_sglang_jax.sh "$VENV/bin/python" "$CONSTRAINTS"
  exit 0
fi
# SGLang's own definitions, for the SGLang contract test only: the pinned package without its dependencies
# (they pin a CUDA torch, which must never replace the CPU build). A failure here only makes that test skip.
SGLANG_PIN="$(grep -E '^sglang==' requirements/constraints-cuda.txt 2>/dev/null | head -n 1 || true)"
if [ -n "$SGLANG_PIN" ] && ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('sglang') != '${SGLANG_PIN#sglang==}')" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q --no-deps "$SGLANG_PIN" \
    || echo "setup: could not install $SGLANG_PIN (pip install --no-deps '$SGLANG_PIN'); the SGLang contract test will skip" >&2
fi
