#!/usr/bin/env bash
# The "hostile load" table of docs/performance.md. One listener (SQLite, default
# limits but --idle-timeout 10s, so that deadlines fall inside a run, and --max-frame
# 1MiB; logging at the default level to a file); for each attack, a
# legitimate client on 127.0.0.1 registers at a modest rate over TCP while the attack
# runs from other loopback addresses (or, for the spoofing row, from 127.0.0.1 itself).
# Reports the legitimate registrations' success rate and p99, the listener's RSS before,
# during and after, and what it logged meanwhile.
#
#   [BIN=dir] [NODE_BIN=dir] tools/perf/hostile.sh [SECONDS]
#
# BIN is where the registrar under test is, NODE_BIN where registrar-node is (default:
# BIN): to measure an older listener with today's tools.
# Needs `ulimit -n` of at least 20,000 (10,000 connections each side).
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-15}
. tools/perf/common.sh
node_bin=${NODE_BIN:-$bin}
ulimit -n 65536 2>/dev/null || true

"$bin/registrar" --data-dir "$work/data" --store sqlite serve --bind 127.0.0.1 \
    --cert-port 0 --reg-port 0 --state-port 0 --envelope-port 0 --max-frame 1048576 \
    --idle-timeout 10s \
    >"$work/listener.out" 2>"$work/listener.err" &
listener=$!
pids+=("$listener")
until grep -q '^registrar listening' "$work/listener.out"; do
    kill -0 "$listener" || { cat "$work/listener.err"; exit 1; }
    sleep 0.1
done
reg=$(listener_port reg); cert=$(listener_port cert); envelope=$(listener_port envelope)
state=$(listener_port state)

rss() { awk '/VmRSS/ {print int($2 / 1024)}' "/proc/$listener/status"; }
log_bytes() { stat -c %s "$work/listener.err"; }

legit() {
    REGISTRAR_LOG=warn "$node_bin/registrar-node" --json load ijam --server 127.0.0.1 \
        --cert-port "$cert" --reg-port "$reg" --data-dir "$work/data" --store sqlite \
        --connections 4 --rate 20 --duration "${seconds}s" --timeout 5s
}

hostile() { "$node_bin/registrar-node" --json hostile "$@"; }

echo "| attack | legitimate registrations ok | p99 (ms) | RSS before → during → after (MB) | log bytes beyond the legitimate load's | what the attack got |"
echo "|---|---|---|---|---|---|"
row() {
    local name=$1; shift
    local before during after log0 log1
    before=$(rss); log0=$(log_bytes)
    if [ $# -gt 0 ]; then "$@" >"$work/attack.json" & attack=$!; sleep 1; else attack=; fi
    legit >"$work/legit.json"
    during=$(rss)
    [ -n "$attack" ] && wait "$attack"
    sleep 2
    after=$(rss); log1=$(log_bytes)
    python3 - "$name" "$before" "$during" "$after" "$((log1 - log0))" "$work/legit.json" "$work/attack.json" "${attack:+yes}" "$work/baseline_log" <<'PY'
import json, os, sys
name, before, during, after, logged, legit_path, attack_path, attacked, baseline_path = sys.argv[1:10]
# What the legitimate load logs by itself (the first row, no attack) is not the attack's.
if not attacked:
    open(baseline_path, "w").write(logged)
logged = max(int(logged) - int(open(baseline_path).read()), 0)
legit = json.load(open(legit_path))
total = sum(legit["outcomes"].values())
ok = legit["outcomes"].get("200", 0)
p99 = legit["latency_ms"]["p99"]
what = ""
if attacked:
    a = json.load(open(attack_path))
    if "behaviour" in a:
        what = "%d connected, %d refused at accept, %d closed by the listener, %d held" % (
            a["connected"], a["refused_at_accept"], a["closed_by_listener"], a["held_to_the_end"])
    else:
        per = logged * 100000 // max(a["sent"], 1)
        what = "%d datagrams of %d B: %d replies, amplification %.2f; %d log bytes per 100,000" % (
            a["sent"], a["datagram_bytes"], a["replies"], a["amplification"], per)
print("| %s | %d/%d (%.1f%%) | %.1f | %s → %s → %s | %s | %s |" % (
    name, ok, total, 100.0 * ok / max(total, 1), p99, before, during, after, logged, what))
PY
}

hold=$((seconds + 3))s
row "none"
row "10,000 idle connections, 20 sources (reg port)" \
    hostile tcp --port "$reg" --connections 10000 --sources 20 --hold "$hold"
row "10,000 Hello keep-alives every 5 s, 20 sources (envelope)" \
    hostile tcp --port "$envelope" --connections 10000 --sources 20 --behaviour hello --every 5s --hold "$hold"
row "300 connections, 1 byte short of a 1 MiB frame (envelope)" \
    hostile tcp --port "$envelope" --connections 300 --sources 1 --behaviour partial \
    --declared 1048576 --partial 1048575 --hold "$hold"
row "1,000 dribbled certificate magics (cert port)" \
    hostile tcp --port "$cert" --connections 1000 --sources 2 --behaviour dribble --hold "$hold"
row "1-byte datagrams spoofed from the client's address (reg port)" \
    hostile udp --port "$reg" --datagrams 500000 --size 1 --source 127.0.0.1
row "48-byte garbage state frames (state port)" \
    hostile udp --port "$state" --datagrams 500000 --size 48 --source 127.0.0.2
row "bare 20-byte Hellos (envelope UDP)" \
    hostile udp --port "$envelope" --datagrams 500000 --content hello --size 20 --source 127.0.0.2
