#!/usr/bin/env bash
# Real external clients across upgrades, for BENCHMARKS.md:
#   1. wrk against hello-http under baton while baton upgrades it every UPGRADE_EVERY seconds;
#   2. redis-benchmark against kv-server under `baton run --state`, upgraded the same way
#      for as long as redis-benchmark runs.
# Prints each client's own output and the upgrade reports. Needs a release build, wrk and
# redis-benchmark (scripts/install-test-deps installs them).
#
#   cargo build --release --workspace && bench/external.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}        # where baton, hello-http and kv-server are
DURATION=${DURATION:-20}          # seconds of wrk load
REQUESTS=${REQUESTS:-1000000}     # redis-benchmark requests per test (set, get)
UPGRADE_EVERY=${UPGRADE_EVERY:-1} # seconds between upgrades
TMP=$(mktemp -d /tmp/baton-external-XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT

for tool in wrk redis-benchmark; do
    command -v "$tool" >/dev/null || { echo "$tool not installed (scripts/install-test-deps)" >&2; exit 2; }
done

# start NAME LISTEN [baton options...] -- PROGRAM...: runs baton, waits (bounded) for an active
# generation, sets ADDR to the listener's HOST:PORT.
start() {
    local name=$1 listen=$2; shift 2
    local ctl="$TMP/$name.sock"
    "$BIN/baton" run --listen "$listen" --control "$ctl" "$@" >"$TMP/$name.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 200); do
        if ADDR=$("$BIN/baton" status --json --control "$ctl" 2>/dev/null |
            jq -er 'select(.pid != null) | .listeners[0].addr'); then
            return 0
        fi
        sleep 0.05
    done
    echo "baton $name did not start; log:" >&2; cat "$TMP/$name.log" >&2; exit 1
}

# upgrade_loop NAME PID: one `baton upgrade --wait` every UPGRADE_EVERY s while the client PID
# runs; prints a summary.
upgrade_loop() {
    local ctl="$TMP/$1.sock" client=$2 ok=0 bad=0
    sleep "$UPGRADE_EVERY"
    while kill -0 "$client" 2>/dev/null; do
        if "$BIN/baton" upgrade --wait --control "$ctl" >>"$TMP/$1.upgrades" 2>&1; then
            ok=$((ok + 1))
        else
            bad=$((bad + 1))
        fi
        sleep "$UPGRADE_EVERY"
    done
    echo "upgrades: $ok promoted, $bad rolled back"
    echo "last upgrade: $("$BIN/baton" status --json --control "$ctl" | jq -c .last_upgrade)"
}

echo "== machine: $(nproc) cores, kernel $(uname -r); baton $(git rev-parse --short HEAD)"

start http http=127.0.0.1:0 -- "$BIN/hello-http" --label external
addr=$ADDR
echo
echo "== wrk -t2 -c64 -d${DURATION}s --latency http://$addr/   (upgrade every ${UPGRADE_EVERY}s)"
wrk -t2 -c64 -d"${DURATION}s" --latency "http://$addr/" &
client=$!
upgrade_loop http "$client" >"$TMP/http.summary"
wait "$client"
cat "$TMP/http.summary"

start kv kv=127.0.0.1:0 --state -- "$BIN/kv-server"
port=${ADDR##*:}
# redis-benchmark redraws a progress line with \r; keep only its results and errors.
results() { tr '\r' '\n' | grep -v -e 'rps=' -e '^ *$' || true; }
echo
echo "== redis-benchmark -p $port -c 50 -r 100000 -n 300000 -t set,get -q   (--state, no upgrade)"
redis-benchmark -p "$port" -c 50 -r 100000 -n 300000 -t set,get -q 2>&1 | results
echo

echo "== redis-benchmark -p $port -c 50 -r 100000 -n $REQUESTS -t set,get -q   (--state; upgrade every ${UPGRADE_EVERY}s while it runs)"
# redis-benchmark treats a connection closed by the server as fatal (it exits), and stalls
# on a lost reply; the timeout only bounds the run.
started=$SECONDS
timeout 300 redis-benchmark -p "$port" -c 50 -r 100000 -n "$REQUESTS" -t set,get -q >"$TMP/rb.out" 2>&1 &
client=$!
upgrade_loop kv "$client" >"$TMP/kv.summary"
set +e
wait "$client"
rc=$?
set -e
results <"$TMP/rb.out"
echo "(redis-benchmark exit status $rc after $((SECONDS - started))s)"
cat "$TMP/kv.summary"
echo "DBSIZE after the upgrades: $(redis-cli -p "$port" dbsize)"
