#!/usr/bin/env bash
# Reproduces the README's pubkey rows on this machine, each with its bounds measured in
# the same sitting:
#   bound A: 2 × `openssl speed ecdsap256` verify/s (one verify per request, two cores)
#   bound B: redis-benchmark running the same Lua script (register_device.lua /
#            attest_device.lua) through EVALSHA against a private redis-server
# then `registrar-node load pubkey` for register and attest over TCP and UDP against a
# listener on that Redis. Needs `cargo build --release` (or BIN=dir holding both
# binaries, to compare builds). Traffic stays on 127.0.0.1.
#
#   [PIPELINE=8] tools/perf/pubkey.sh [COUNT]
#
# PIPELINE is the requests each of the 32 connections keeps in flight (--pipeline of
# the load tool; 1 = one at a time, as a lone device does).
set -euo pipefail
cd "$(dirname "$0")/../.."
count=${1:-30000}
. tools/perf/common.sh

verify=$(openssl speed -seconds 3 ecdsap256 2>/dev/null | awk '/256 bits ecdsa \(nistp256\)/ {print $NF}')
echo "bound A: openssl speed ecdsap256: $verify verify/s per core × $(nproc) cores"

start_redis
port=$redis_port
reg_sha=$(redis-cli -p "$port" script load "$(cat src/store/redis/scripts/pubkey/register_device.lua)")
att_sha=$(redis-cli -p "$port" script load "$(cat src/store/redis/scripts/pubkey/attest_device.lua)")
spki=$(printf '%0182x' 7)
# Register: a fresh device id per call (__rand_int__ over a large keyspace).
redis-benchmark -p "$port" -n 200000 -c 32 -r 100000000 -q \
    EVALSHA "$reg_sha" 1 "rg:{dev:__rand_int__}" "$spki" 1795343905194 \
    | tr '\r' '\n' | tail -1 | sed -E 's/.*: ([0-9.]+ requests per second).*/bound B (register_device.lua): \1/' 
# Attest: one registered device, a fresh nonce key per call.
redis-cli -p "$port" evalsha "$reg_sha" 1 "rg:{dev:bench}" "$spki" 1 >/dev/null
redis-benchmark -p "$port" -n 200000 -c 32 -r 100000000 -q \
    EVALSHA "$att_sha" 2 "rg:{dev:bench}" "rg:{dev:bench}:nonce:__rand_int__" 1795343905194 120000 \
    | tr '\r' '\n' | tail -1 | sed -E 's/.*: ([0-9.]+ requests per second).*/bound B (attest_device.lua): \1/' 
redis-cli -p "$port" flushall >/dev/null

start_listener "redis://127.0.0.1:$port/"
env_port=$(listener_port envelope)
for mode in register attest; do
    for transport in tcp udp; do
        udp=(); [ "$transport" = udp ] && udp=(--udp)
        REGISTRAR_LOG=warn "$bin/registrar-node" load pubkey --server 127.0.0.1 \
            --envelope-port "$env_port" --mode "$mode" --count "$count" --connections 32 \
            --pipeline "${PIPELINE:-8}" --listener-pid "$listener" "${udp[@]}" \
            | awk -v bound="$((2 * ${verify%.*}))" 'NR == 1 { print; match($0, /[0-9.]+\/s$/); rate = substr($0, RSTART, RLENGTH - 2); printf "  = %.2f of bound A (%d/s)\n", rate / bound, bound } /^listener CPU|^of which|^outcomes|^machine CPU/ { print "  " $0 }' 
    done
done
