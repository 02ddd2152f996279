#!/usr/bin/env bash
# Run a command so that nothing it starts can listen beyond this machine: Ray binds every interface even
# when told 127.0.0.1, so as root (with unshare + iproute2) the command runs in a private network namespace
# that has only loopback. Everything the command needs must already be installed (there is no network in it).
# Elsewhere the command runs as it is, with a warning.
set -euo pipefail
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null && command -v ip >/dev/null \
    && unshare -n sh -c "ip link set lo up" 2>/dev/null; then
  exec unshare -n sh -c 'ip link set lo up && exec "$@"' sh "$@"
fi
echo "note: no private network namespace here (needs root, unshare, ip); Ray's ports are open on every interface" >&2
exec "$@"
