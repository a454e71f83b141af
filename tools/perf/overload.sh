#!/usr/bin/env bash
# The README's overload rows: the maximum rate (closed loop), then 2× that rate offered
# open-loop from 1,024 connections, then a closed-loop run right after it (recovery).
# Redis store on a private redis-server; traffic stays on 127.0.0.1.
#
#   [CRYPTO_NICE=19] [CLIENT_NICE=-10] [QUEUE_WAIT=20ms] tools/perf/overload.sh [BITS] [SECONDS]
#
# The load tool, Redis and the listener share the machine's cores. At 2× the crypto
# threads keep every core busy, and the load tool's own wait for a CPU shows up in the
# latency it measures; CLIENT_NICE runs it (and Redis) at that nice value so that what
# it reports is the listener's latency. CRYPTO_NICE and QUEUE_WAIT are the listener's
# --crypto-nice and --max-queue-wait.
set -euo pipefail
cd "$(dirname "$0")/../.."
bits=${1:-2048}; seconds=${2:-20}
. tools/perf/common.sh

start_redis
[ -n "${CLIENT_NICE:-}" ] && renice -n "$CLIENT_NICE" -p "${pids[0]}" >/dev/null
store_arg="redis://127.0.0.1:$redis_port/"
start_listener "$store_arg" --rsa-bits "$bits" --max-queue-wait "${QUEUE_WAIT:-20ms}" \
    --crypto-nice "${CRYPTO_NICE:-0}"
reg=$(listener_port reg); cert=$(listener_port cert)

load() {
    REGISTRAR_LOG=warn nice -n "${CLIENT_NICE:-0}" "$bin/registrar-node" --json load ijam \
        --server 127.0.0.1 --cert-port "$cert" --reg-port "$reg" --data-dir "$work/data" \
        --store "$store_arg" --listener-pid "$listener" "$@"
}
summary() {
    python3 -c '
import json, sys
r = json.load(sys.stdin); a = r["latency_ms_from_sent"]; n = sum(r["outcomes"].values())
shed = sum(v for k, v in r["outcomes"].items() if k != "200")
steal = (r.get("machine_cpu") or {}).get("steal_share", 0.0)
print("%s: offered %.0f/s, admitted %.0f/s, admitted p50 %.1f / p99 %.1f / max %.1f ms, not admitted %.1f%% %s (steal: %.1f%% of CPU time)" % (
    sys.argv[1], r["offered_achieved_per_second"], r["registrations_per_second"],
    a["p50"], a["p99"], a["max"], 100 * shed / n, r["outcomes"], 100 * steal))
' "$1"
}

# The closed loop's count: SECONDS at the bound (cores × openssl's rate), so it runs a
# little longer than SECONDS on any machine.
bound=$(python3 -c "import sys; print(round(float(sys.argv[1]) * $(nproc)))" "$(rsa_sign_rate "$bits" 1)")
max=$(load --connections 16 --count $((seconds * bound)) | tee "$work/max.json" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["registrations_per_second"]))')
summary "maximum (closed loop, 16 clients)" <"$work/max.json"
rate=$((2 * max))
load --connections 1024 --rate "$rate" --count $((rate * seconds)) | summary "2× offered ($rate/s, 1,024 clients)"
load --connections 16 --count $((max * 5)) | summary "right after (closed loop, 16 clients)"
