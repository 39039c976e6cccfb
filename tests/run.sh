#!/usr/bin/env bash
# The whole test suite, runnable on a fresh machine: installs what the tests need (Debian
# packages, Python packages), then checks formatting and lints, runs the unit and property
# tests, builds the binary once and runs the end-to-end tests against it.
set -euo pipefail
cd "$(dirname "$0")/.."

need=""
for pair in nsd:nsd dig:bind9-dnsutils kdig:knot-dnsutils dnsperf:dnsperf systemd-analyze:systemd; do
  command -v "${pair%%:*}" >/dev/null || need="$need ${pair#*:}"
done
if [ -n "$need" ]; then
  echo "installing:$need"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -r tests/requirements.txt

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo nextest run --locked --no-fail-fast
cargo build --locked --bin mskdns
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
MSKDNS_BIN="$target/debug/mskdns" python3 -m pytest -q -p no:cacheprovider tests/e2e "$@"
