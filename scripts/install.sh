#!/usr/bin/env bash
# Install prioqd as a systemd service (run as root; `make install` calls this):
#   venv        $PREFIX              (default /opt/prioqd; ProtectHome= hides /root and /home)
#   config      $ETC/config.toml     (default /etc/prioqd; an existing one is kept)
#   password    $ETC/redis-password  (mode 0600, empty = no password; kept if present)
#   web token   $ETC/web-token       (mode 0600, a random one; kept if present)
#   units       $UNIT_DIR/prioqd.service, $UNIT_DIR/prioqd-web.service (the dashboard)
# Then: systemctl enable --now prioqd (and prioqd-web for the dashboard)
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
"$PREFIX/bin/pip" install -q $PIP_ARGS "$SRC[web]"

install -d -m 0755 "$ETC"
if [ ! -e "$ETC/config.toml" ]; then
    install -m 0644 "$SRC/config.example.toml" "$ETC/config.toml"
    echo "wrote $ETC/config.toml (edit [redis] url and [tasks] modules)"
fi
if [ ! -e "$ETC/redis-password" ]; then
    install -m 0600 /dev/null "$ETC/redis-password"
    echo "wrote an empty $ETC/redis-password (put the Redis password there, if any)"
fi

if [ ! -e "$ETC/web-token" ]; then
    install -m 0600 /dev/null "$ETC/web-token"
    "$PREFIX/bin/python" -c 'import secrets; print(secrets.token_hex(32))' >"$ETC/web-token"
    echo "wrote a random dashboard token to $ETC/web-token"
fi

install -d -m 0755 "$UNIT_DIR"
for unit in prioqd.service prioqd-web.service; do
    sed -e "s#/opt/prioqd/bin/prioqd#$PREFIX/bin/prioqd#" \
        -e "s#/etc/prioqd/#$ETC/#g" \
        "$SRC/systemd/$unit" >"$UNIT_DIR/$unit"
    chmod 0644 "$UNIT_DIR/$unit"
    echo "installed $UNIT_DIR/$unit"
done

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    echo "next: systemctl enable --now prioqd && systemctl status prioqd"
    echo "      systemctl enable --now prioqd-web   # the dashboard on 127.0.0.1:8080"
else
    echo "systemd is not running here; enable the unit where it is"
fi
