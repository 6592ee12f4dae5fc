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
exit $missing
