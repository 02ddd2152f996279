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
