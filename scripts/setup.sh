#!/usr/bin/env bash
# Create .venv (once) and install slime with the CPU stack and test tools into it.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
EXTRAS="${SLIME_EXTRAS:-cpu,test}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The constraints file pins the CPU torch build so no CUDA torch is ever pulled.
.venv/bin/python -m pip install -q -c requirements/constraints-cpu.txt -e ".[${EXTRAS}]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# SGLang's own definitions, for the SGLang contract test only: the pinned package without its dependencies
# (they pin a CUDA torch, which must never replace the CPU build). A failure here only makes that test skip.
SGLANG_PIN="$(grep -E '^sglang==' requirements/constraints-cuda.txt 2>/dev/null | head -n 1 || true)"
if [ -n "$SGLANG_PIN" ] && ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('sglang') != '${SGLANG_PIN#sglang==}')" 2>/dev/null; then
  .venv/bin/python -m pip install -q --no-deps "$SGLANG_PIN" \
    || echo "setup: could not install $SGLANG_PIN (pip install --no-deps '$SGLANG_PIN'); the SGLang contract test will skip" >&2
fi
