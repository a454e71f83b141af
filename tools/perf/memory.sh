#!/usr/bin/env bash
# The Memory table of docs/performance.md: the listener's resident set (SQLite store)
# at start, while 10,000 idle TCP connections from 20 source addresses are held on one
# port, and after they closed; one fresh listener per port. Then, on a listener with
# --max-frame 1MiB, 300 connections each one byte short of a 1 MiB frame against the
# default --max-buffered (64 MiB).
#
#   [BIN=dir] [NODE_BIN=dir] tools/perf/memory.sh
#
# BIN is where the registrar under test is, NODE_BIN where registrar-node is (default:
# BIN): to measure an older listener with today's hostile tool.
# Needs `ulimit -n` of at least 20,000 (10,000 connections each side).
set -euo pipefail
cd "$(dirname "$0")/../.."
. tools/perf/common.sh
node_bin=${NODE_BIN:-$bin}
ulimit -n 65536 2>/dev/null || true

serve() {
    # Gone before the next listener starts: its ready line must be its own.
    rm -rf "$work/data" "$work/listener.out" "$work/listener.err"
    "$bin/registrar" --data-dir "$work/data" --store sqlite serve --bind 127.0.0.1 \
        --cert-port 0 --reg-port 0 --state-port 0 --envelope-port 0 --idle-timeout 10m "$@" \
        >"$work/listener.out" 2>"$work/listener.err" &
    listener=$!
    pids+=("$listener")
    until grep -q '^registrar listening' "$work/listener.out"; do
        kill -0 "$listener" || { cat "$work/listener.err"; exit 1; }
        sleep 0.1
    done
}
rss() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$listener/status"; }
# Samples the listener's RSS every 0.2 s while a command runs; prints the peak.
peak_while() {
    local peak=0 now
    "$@" >"$work/attack.json" & local job=$!
    while kill -0 "$job" 2>/dev/null; do
        now=$(awk '/VmRSS/ {print $2}' "/proc/$listener/status")
        [ "$now" -gt "$peak" ] && peak=$now
        sleep 0.2
    done
    wait "$job"
    awk -v k="$peak" 'BEGIN {printf "%.1f", k / 1024}'
}

echo "| port | at start (MB) | holding 10,000 idle connections (MB) | after they closed (MB) |"
echo "|---|---:|---:|---:|"
for port in cert reg state envelope; do
    serve
    start=$(rss)
    held=$(peak_while "$node_bin/registrar-node" --json hostile tcp --port "$(listener_port "$port")" \
        --connections 10000 --sources 20 --hold 10s)
    sleep 1
    echo "| $port | $start | $held | $(rss) |"
    kill "$listener"; wait "$listener" 2>/dev/null || true
done

echo
echo "| envelope, --max-frame 1MiB | at start (MB) | peak while 300 connections send 1 MiB − 1 byte (MB) | closed by the budget |"
echo "|---|---:|---:|---:|"
serve --max-frame 1048576
start=$(rss)
held=$(peak_while "$node_bin/registrar-node" --json hostile tcp --port "$(listener_port envelope)" \
    --connections 300 --sources 1 --behaviour partial --declared 1048576 --partial 1048575 \
    --hold 15s)
closed=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["closed_by_listener"])' "$work/attack.json")
echo "| default --max-buffered (64 MiB) | $start | $held | $closed of 300 |"
