#!/usr/bin/env bash
# GTM benchmark: starts a GTM pair (gtm1 primary, gtm2 standby) on loopback ports
# 29101/29102 with a temporary base dir, measures GXIDs/s and p50/p99 latency per call
# with 1, 64 and 256 concurrent callers over the client's stream (standby attached)
# beside the ceiling measured in the same run (a no-op RPC, streamed and unary), then
# SIGKILLs the primary and times a `promote` order to the first GXID from the promoted
# standby. Kills exactly the processes it started and removes its dir.
#
# Usage: bench/gtm.sh [seconds per run]    (build first: cargo build --release -p gtm -p cm-ctl;
# the pair runs with mutual TLS, as configs/local.toml says, on certificates made by
# `cm_ctl cert init` in the temporary dir)
# Environment: CLIENTS (default 1,64,256), BLOCK_SIZE (gtm.block_size, default 2000),
# IN_FLIGHT (messages in flight on the client's stream, default the client's).
set -euo pipefail

cd "$(dirname "$0")/.."
GTM=${GTM:-target/release/gtm}
CM_CTL=${CM_CTL:-target/release/cm_ctl}
DURATION=${1:-5}
CLIENTS=${CLIENTS:-1,64,256}
BLOCK_SIZE=${BLOCK_SIZE:-2000}
IN_FLIGHT_ARG=()
[ -n "${IN_FLIGHT:-}" ] && IN_FLIGHT_ARG=(--in-flight "$IN_FLIGHT")
[ -x "$GTM" ] || { echo "bench/gtm.sh: $GTM not found: cargo build --release -p gtm" >&2; exit 1; }
[ -x "$CM_CTL" ] || { echo "bench/gtm.sh: $CM_CTL not found: cargo build --release -p cm-ctl" >&2; exit 1; }

DIR=$(mktemp -d /tmp/mpp-ha-bench-gtm.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    rm -rf "$DIR"
}
trap cleanup EXIT

CONFIG=$DIR/cluster.toml
sed -e "s|^base_dir = .*|base_dir = \"$DIR\"|" \
    -e 's/^port = 7101$/port = 29101/' -e 's/^port = 7102$/port = 29102/' \
    -e "s/^block_size = 2000$/block_size = $BLOCK_SIZE/" \
    configs/local.toml > "$CONFIG"
# TLS is on by default: the pair and the bench need the cluster's certificates.
"$CM_CTL" cert init --config "$CONFIG" > /dev/null

start() {
    "$GTM" serve --config "$CONFIG" --node "$1" >> "$DIR/$1.log" 2>&1 &
    PIDS+=($!)
    eval "PID_$1=$!"
}

# Waits (bounded: 100 x 0.1 s) until `gtm status --node $1` prints a line matching $2.
wait_status() {
    for _ in $(seq 100); do
        if "$GTM" status --config "$CONFIG" --node "$1" 2>/dev/null | grep -q "$2"; then return 0; fi
        sleep 0.1
    done
    echo "bench/gtm.sh: timed out waiting for $1 to match '$2'" >&2
    "$GTM" status --config "$CONFIG" >&2 || true
    exit 1
}

start gtm1
start gtm2
wait_status gtm2 'ready=true'
wait_status gtm1 'role=primary'
"$GTM" next --config "$CONFIG" > /dev/null
wait_status gtm1 'standby_attached=true'

echo "GTM pair: block_size $BLOCK_SIZE, standby attached, ${DURATION}s of GXIDs per run (as long again for each no-op)"
"$GTM" bench --config "$CONFIG" --clients "$CLIENTS" --duration "$DURATION" "${IN_FLIGHT_ARG[@]}"
"$GTM" status --config "$CONFIG"

# Failover: SIGKILL the primary, promote the standby, time the first GXID from it.
kill -9 "$PID_gtm1"
wait "$PID_gtm1" 2>/dev/null || true
# --force: this bare pair has no CMServer to fence the old primary (it is already dead here).
"$GTM" promote --config "$CONFIG" --node gtm2 --run-alone --force --time-first-gxid
