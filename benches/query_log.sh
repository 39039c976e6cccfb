#!/usr/bin/env bash
# The query log's cost, in one run of the shared harness (../shared/bench/run.sh: the server pinned
# to CPU 1, dnsperf to CPU 0): mskdns with the log off, mskdns with every query logged as dnstap to
# a file, unbound with dnstap off, and unbound with dnstap on (every client and forwarder message,
# to fstrm_capture on a unix socket: unbound writes dnstap to a socket only).
# usage: benches/query_log.sh [seconds]     env: MSKDNS_BIN (default: the release build), MISS=1
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared}
SECS=${1:-10}
W=${BENCH_WORK:-/tmp/bench}
target=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
BIN=${MSKDNS_BIN:-$target/release/mskdns}
command -v fstrm_capture >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fstrm-bin >/dev/null; }
UNBOUND=$(command -v unbound || echo /usr/sbin/unbound)
mkdir -p "$W/qlog-bin"
rm -f "$W"/mskdns-queries.tap* "$W/unbound-queries.tap"

# The harness starts "$MSKDNS_BIN --config FILE": this one adds [query_log] to FILE's copy.
cat > "$W/qlog-bin/mskdns-logged" <<EOF
#!/bin/sh
cp "\$2" "\$2.logged"
printf '\n[query_log]\nformat = "dnstap"\npath = "$W/mskdns-queries.tap"\n' >> "\$2.logged"
exec "$BIN" --config "\$2.logged"
EOF
# The harness starts "unbound -d -c FILE": this one adds a dnstap section to FILE's copy.
cat > "$W/qlog-bin/unbound" <<EOF
#!/bin/sh
cp "\$3" "\$3.tap"
printf 'dnstap:\n dnstap-enable: yes\n dnstap-bidirectional: yes\n dnstap-socket-path: "$W/dnstap.sock"\n dnstap-send-identity: yes\n dnstap-send-version: yes\n dnstap-log-client-query-messages: yes\n dnstap-log-client-response-messages: yes\n dnstap-log-forwarder-query-messages: yes\n dnstap-log-forwarder-response-messages: yes\n' >> "\$3.tap"
exec "$UNBOUND" -d -c "\$3.tap"
EOF
chmod +x "$W/qlog-bin/mskdns-logged" "$W/qlog-bin/unbound"

echo "== mskdns, query log off"
MSKDNS_BIN="$BIN" "$SHARED/bench/run.sh" "$SECS" project
echo "== mskdns, every query as dnstap to a file"
# The log's own counters, read from the admin endpoint (the harness's config leaves it on
# 127.0.0.1:9153) every second while the server runs: queries logged, and dropped by reason.
( while sleep 1; do curl -s --max-time 1 http://127.0.0.1:9153/metrics >"$W/qlog-metrics.new" 2>/dev/null &&
    grep -q mskdns_query_log_records_total "$W/qlog-metrics.new" && mv "$W/qlog-metrics.new" "$W/qlog-metrics"; done ) &
scraper=$!
MSKDNS_BIN="$W/qlog-bin/mskdns-logged" "$SHARED/bench/run.sh" "$SECS" project
kill "$scraper" 2>/dev/null; wait "$scraper" 2>/dev/null || true
ls -l "$W"/mskdns-queries.tap* | awk '{s+=$5} END{printf "  dnstap written by mskdns: %.1f MiB in %d files (rotated at 100 MiB, 5 kept)\n", s/1048576, NR}'
awk '/^mskdns_query_log_records_total/{w=$2} /^mskdns_query_log_dropped_total/{d+=$2} /^mskdns_queries_total/{q+=$2}
  END{printf "  queries %d, logged %d, dropped %d (%.1f%% logged; the fixed-rate phases log all)\n", q, w, d, 100*w/(q?q:1)}' "$W/qlog-metrics"
echo "== unbound, dnstap off"
"$SHARED/bench/run.sh" "$SECS" unbound
echo "== unbound, dnstap on (to fstrm_capture)"
rm -f "$W/dnstap.sock"
taskset -c 0 fstrm_capture -t protobuf:dnstap.Dnstap -u "$W/dnstap.sock" -w "$W/unbound-queries.tap" >/dev/null 2>&1 &
cap=$!
sleep 1
PATH="$W/qlog-bin:$PATH" "$SHARED/bench/run.sh" "$SECS" unbound
kill -INT "$cap" 2>/dev/null; wait "$cap" 2>/dev/null || true
ls -l "$W/unbound-queries.tap" | awk '{printf "  dnstap written by unbound: %.1f MiB\n", $5/1048576}'
