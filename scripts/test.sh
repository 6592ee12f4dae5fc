#!/usr/bin/env bash
# The project's test command: builds every binary (integration tests run the real
# ones) and runs the whole suite with cargo-nextest.
#
# As root (CI, and the partition tests need it anyway) the suite runs in a network
# namespace of its own whose ephemeral ports are 50000-60999: the tests' clusters
# listen on fixed ports in 8000-49999, and on the host's default range (32768-60999)
# any outgoing connection may take one of them as its source port first, which fails
# a test now and then with "address in use" or "connection refused". The namespace
# also keeps the suite's loopback traffic apart from anything else on the machine.
# MPP_HA_TEST_NO_NETNS=1 runs it in the current namespace instead.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/check-machine.sh
cargo build --workspace --bins
if [ "$(id -u)" = 0 ] && command -v ip >/dev/null && [ -z "${MPP_HA_TEST_NO_NETNS:-}" ]; then
    # Build (and fetch) the tests outside: the namespace has no route out.
    cargo nextest run --workspace --no-run
    ns="mpp-test-$$"
    ip netns add "$ns"
    trap 'ip netns delete "$ns" 2>/dev/null || true' EXIT
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_local_port_range="50000 60999"
    ip netns exec "$ns" cargo nextest run --workspace "$@"
else
    cargo nextest run --workspace "$@"
fi
