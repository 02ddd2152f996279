#!/usr/bin/env bash
# Print the path of a working Python X.Y interpreter (pyenv's newest X.Y.*, else pythonX.Y on PATH), or nothing.
# Each candidate is run once: a pyenv shim on PATH may name a version that is not the active one.
set -uo pipefail
want="${1:?usage: find_python.sh X.Y}"
candidates=()
if command -v pyenv >/dev/null 2>&1; then
  version="$(pyenv versions --bare 2>/dev/null | grep -E "^${want//./\\.}\.[0-9]+$" | sort -V | tail -n 1)"
  [ -n "$version" ] && candidates+=("$(pyenv root)/versions/$version/bin/python")
fi
command -v "python$want" >/dev/null 2>&1 && candidates+=("$(command -v "python$want")")
for python in "${candidates[@]}"; do
  if "$python" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$want'.split('.'))))" 2>/dev/null; then
    echo "$python"
    exit 0
  fi
done
exit 0
