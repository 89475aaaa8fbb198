#!/usr/bin/env bash
# System packages the tests and the demo need, installed from Debian's packages when
# missing and we are root:
#   redis-server, redis-cli   the tests and the demo start their own (never 6379's)
#   systemd-nspawn            the end-to-end tests boot a real systemd in a container
#   systemd-analyze           the unit file tests (part of systemd itself)
#   openssl                   a throwaway CA for the rediss:// (TLS) tests
#   faketime                  a daemon with a skewed clock (eta uses Redis's clock)
#   chromium, chromium-driver the dashboard's browser tests (Selenium drives them)
#   promtool                  checks contrib/'s alert rules and dashboard queries
#                             (Debian's prometheus package; its service is not enabled
#                             here: only the tool is used)
set -euo pipefail
missing=()
command -v redis-server >/dev/null && command -v redis-cli >/dev/null || missing+=(redis-server)
command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v openssl >/dev/null || missing+=(openssl)
command -v faketime >/dev/null || missing+=(faketime)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
command -v promtool >/dev/null || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]} (Debian packages)..." >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
        # Installed for promtool alone: no Prometheus server left running.
        systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    fi
    exit 0
fi
if ! command -v redis-server >/dev/null; then
    echo "redis-server and redis-cli are required: install Redis 6.2 or newer" >&2
    exit 1
fi
echo "note: ${missing[*]} missing; the tests that need them will be skipped" >&2
