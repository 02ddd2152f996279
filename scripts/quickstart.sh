#!/usr/bin/env bash
# The README's main command: set up (once), then the quickstart on the embedded engine and the Megatron
# trainer on Ray. Extra arguments go to `slime quickstart` (see `.venv/bin/slime quickstart --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec bash scripts/loopback.sh .venv/bin/slime quickstart "$@"
