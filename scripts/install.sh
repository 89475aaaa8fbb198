#!/usr/bin/env bash
# Install prioqd as a systemd service (run as root; `make install` calls this):
#   venv        $PREFIX              (default /opt/prioqd; ProtectHome= hides /root and /home)
#   config      $ETC/config.toml     (default /etc/prioqd; an existing one is kept)
#   password    $ETC/redis-password  (mode 0600, empty = no password; kept if present)
#   unit        $UNIT_DIR/prioqd.service
# Then: systemctl enable --now prioqd
# PIP_ARGS adds pip options (e.g. "--no-index --find-links /wheels" offline).
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-/opt/prioqd}
ETC=${ETC:-/etc/prioqd}
UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}
PYTHON=${PYTHON:-python3}
PIP_ARGS=${PIP_ARGS:-}

echo "installing prioqd into $PREFIX"
"$PYTHON" -m venv "$PREFIX"
# shellcheck disable=SC2086
"$PREFIX/bin/pip" install -q $PIP_ARGS "$SRC"

install -d -m 0755 "$ETC"
if [ ! -e "$ETC/config.toml" ]; then
    install -m 0644 "$SRC/config.example.toml" "$ETC/config.toml"
    echo "wrote $ETC/config.toml (edit [redis] url and [tasks] modules)"
fi
if [ ! -e "$ETC/redis-password" ]; then
    install -m 0600 /dev/null "$ETC/redis-password"
    echo "wrote an empty $ETC/redis-password (put the Redis password there, if any)"
fi

install -d -m 0755 "$UNIT_DIR"
sed -e "s#/opt/prioqd/bin/prioqd#$PREFIX/bin/prioqd#" \
    -e "s#/etc/prioqd/#$ETC/#g" \
    "$SRC/systemd/prioqd.service" >"$UNIT_DIR/prioqd.service"
chmod 0644 "$UNIT_DIR/prioqd.service"
echo "installed $UNIT_DIR/prioqd.service"

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    echo "next: systemctl enable --now prioqd && systemctl status prioqd"
else
    echo "systemd is not running here; enable the unit where it is"
fi
