#!/usr/bin/env bash
# The whole test suite, runnable on a fresh machine: installs what the tests need (Debian
# packages, Python packages), then checks formatting and lints, runs the unit and property
# tests, builds the binary once and runs the end-to-end tests against it.
set -euo pipefail
cd "$(dirname "$0")/.."

need=""
for pair in nsd:nsd dig:bind9-dnsutils kdig:knot-dnsutils dnsperf:dnsperf systemd-analyze:systemd haproxy:haproxy named:bind9 openssl:openssl fstrm_capture:fstrm-bin dnstap-ldns:dnstap-ldns dnstap:golang-github-dnstap-golang-dnstap-cli; do
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
# One build of every target: dev-dependency features are unified only when tests are built, so
# a separate `cargo build --bin` would compile much of the dependency tree a second time.
cargo build --locked --all-targets
cargo nextest run --locked --no-fail-fast
# The fuzz targets, briefly (cargo fuzz on the stable toolchain through RUSTC_BOOTSTRAP; the
# long runs are recorded in docs/fuzzing.md). New inputs go to a scratch copy of the corpus.
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz@0.13.2
# The Debian package is built and installed by the e2e tests (tests/e2e/test_package.py).
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb@3.8.0
scratch=$(mktemp -d)
for t in request upstream_response config kafka_frame sni_front doh; do
  mkdir -p "$scratch/$t"
  (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -O "$t" "$scratch/$t" "corpus/$t" -- -max_total_time="${FUZZ_SECS:-20}" 2>&1 | tail -n 3)
done
rm -rf "$scratch"

target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
export MSKDNS_BIN="$target/debug/mskdns"
python3 -m pytest -q -p no:cacheprovider tests/e2e "$@"
