#!/usr/bin/env bash
# Checks what a fresh machine needs before building and testing; says what is missing.
set -euo pipefail
missing=0
need() { if ! command -v "$1" >/dev/null 2>&1; then echo "missing: $1 ($2)" >&2; missing=1; fi; }
need cargo "install Rust with rustup"
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "missing: cargo-nextest (cargo install cargo-nextest --locked)" >&2; missing=1
fi
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
for b in initdb pg_ctl postgres pg_basebackup pg_rewind; do
  [ -x "$PG_BIN/$b" ] || { echo "missing: $PG_BIN/$b (apt-get install postgresql-15)" >&2; missing=1; }
done
id postgres >/dev/null 2>&1 || { echo "missing: OS user 'postgres' (created by the postgresql package)" >&2; missing=1; }
# The partition tests cut links with ip (iproute2) and nftables, as root.
need ip "apt-get install iproute2"
if ! command -v nft >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing nftables (the partition tests need nft)" >&2
    { apt-get install -y nftables >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get install -y nftables >/dev/null; }; } || { echo "missing: nft (apt-get install nftables failed)" >&2; missing=1; }
  else
    echo "missing: nft (apt-get install nftables; the partition tests need it and root)" >&2; missing=1
  fi
fi
# The status page test (cluster_status_page) loads the CMServer's page in headless Chromium.
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium (the status page test runs it headless)" >&2
    { apt-get install -y chromium >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get install -y chromium >/dev/null; }; } || { echo "missing: /usr/bin/chromium (apt-get install chromium failed)" >&2; missing=1; }
  else
    echo "missing: /usr/bin/chromium (apt-get install chromium; the status page test needs it)" >&2; missing=1
  fi
fi
exit $missing
