#!/usr/bin/env bash
# prioqd demo: a throwaway redis-server, one daemon with a single slot, and jobs of
# mixed priorities pushed with plain redis-cli. They finish highest priority first,
# FIFO within a priority. Everything started here is stopped here.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
WORK=$(mktemp -d /tmp/prioqd-demo.XXXXXX)
PORT=$("$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
CLI=(redis-cli -p "$PORT")
REDIS_PID=""
DAEMON_PID=""

cleanup() {
    [ -n "$DAEMON_PID" ] && kill "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null
    [ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null && wait "$REDIS_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "starting a throwaway redis-server on 127.0.0.1:$PORT"
redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$WORK" --logfile "$WORK/redis.log" &
REDIS_PID=$!
until "${CLI[@]}" ping >/dev/null 2>&1; do sleep 0.05; done

cat >"$WORK/config.toml" <<TOML
[redis]
url = "redis://127.0.0.1:$PORT/0"
[workers]
slots = 1            # one job at a time, so the order is easy to see
[tasks]
modules = ["prioqd.examples"]
[log]
format = "json"
TOML

say "starting the daemon: prioqd run --config $WORK/config.toml (1 slot, square sleeps 0.3 s)"
PRIOQD_SQUARE_DELAY_S=0.3 "$BIN/prioqd" run --config "$WORK/config.toml" >"$WORK/daemon.log" 2>&1 &
DAEMON_PID=$!
until grep -q '"daemon ready"' "$WORK/daemon.log" 2>/dev/null; do
    kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$WORK/daemon.log"; exit 1; }
    sleep 0.05
done

say "pushing jobs with redis-cli while the only slot is busy"
push() {  # push PRIORITY ID X
    local json="{\"id\":\"$2\",\"task\":\"square\",\"args\":[$3]}"
    echo "redis-cli LPUSH prioqd:queue:$1 '$json'"
    "${CLI[@]}" LPUSH "prioqd:queue:$1" "$json" >/dev/null
}
push low    first-low   1
sleep 0.1   # it starts at once; the rest queue up behind it
push low    low-2       2
push normal normal-1    3
push high   high-1      4
push low    low-3       5
push high   high-2      6
push normal normal-2    7
echo "redis-cli LPUSH prioqd:queue:high 'this is not JSON'"
"${CLI[@]}" LPUSH prioqd:queue:high 'this is not JSON' >/dev/null

say "waiting with redis-cli BLPOP prioqd:done:<id> ... (outcomes in the order they finish)"
ids=(first-low low-2 normal-1 high-1 low-3 high-2 normal-2)
keys=()
for id in "${ids[@]}"; do keys+=("prioqd:done:$id"); done
cat >"$WORK/show.py" <<'PY'
import json, sys, time
o = json.loads(sys.argv[1])
when = time.strftime("%H:%M:%S", time.localtime(o["finished_at"]))
print(f"{when}   {o['priority']:<8} {o['id']:<10} {o['status']:<10} result={o['result']}")
PY
printf '%-10s %-8s %-10s %-10s %s\n' "finished" "priority" "id" "status" "result"
for _ in "${ids[@]}"; do
    mapfile -t reply < <("${CLI[@]}" --raw BLPOP "${keys[@]}" 30)
    "$BIN/python" "$WORK/show.py" "${reply[1]}"
done

say "the job hash of high-1: redis-cli HGETALL prioqd:job:high-1"
"${CLI[@]}" HGETALL prioqd:job:high-1 | paste - -

say "the malformed job went to the dead letters: prioqd dead list"
"$BIN/prioqd" dead list --url "redis://127.0.0.1:$PORT/0"

say "prioqd status"
"$BIN/prioqd" status --url "redis://127.0.0.1:$PORT/0"

say "a few of the daemon's log lines (JSON, one event per line)"
grep -E '"job (started|finished|rejected)"' "$WORK/daemon.log" | head -5

say "stopping the daemon with SIGTERM"
kill -TERM "$DAEMON_PID"
status=0
wait "$DAEMON_PID" || status=$?
DAEMON_PID=""
tail -1 "$WORK/daemon.log"
echo "daemon exited with status $status"
