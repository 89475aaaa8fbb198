#!/usr/bin/env bash
# The tests and the demo start their own redis-server (never the one on 6379);
# make sure the binaries exist, installing Debian's package if we are root.
set -euo pipefail
if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing redis-server (Debian package)..." >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    # The package's own service is not needed: tests and demo start their own.
    exit 0
fi
echo "redis-server and redis-cli are required: install Redis 6.2 or newer" >&2
exit 1
