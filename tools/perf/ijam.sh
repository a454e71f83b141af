#!/usr/bin/env bash
# Reproduces the README's ijam performance rows on this machine, each in the same
# sitting as its bound.
#
#   [CONNECTIONS=16] tools/perf/ijam.sh BITS STORE TRANSPORT [COUNT] [extra load args…]
#     BITS       2048 | 4096
#     STORE      sqlite | redis      (redis: a private redis-server on a free port)
#     TRANSPORT  tcp | udp
#
# Prints: the bound (openssl speed sign/s × cores), the load tool's JSON summary, the
# listener's CPU efficiency (single-core RSA decryption time ÷ listener CPU time per
# registration), and the whole machine's CPU per registration split into listener, load
# tool and the rest (Redis, the kernel's threads): on shared cores, cores ÷ that figure
# is the most any listener could do in the run.
# CONNECTIONS clients in a closed loop keep about CONNECTIONS × decryption time ÷ cores
# queued; past --max-queue-wait (20 ms) that standing queue is shed by design, so keep
# it below (16 at RSA-2048 on a core doing ~1,000 decryptions/s, 8 at RSA-4096; on a
# core doing ~4,000/s, 64 and 16: fewer leave the cores partly idle, which the
# machine-CPU line shows as a busy share under 100%).
# Needs `cargo build --release` first (or BIN=dir holding both binaries, to compare
# builds). Traffic stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/../.."

bits=${1:?bits}; store=${2:?store}; transport=${3:?transport}; count=${4:-60000}
shift $(( $# < 4 ? $# : 4 ))
. tools/perf/common.sh

cores=$(nproc)
sign=$(rsa_sign_rate "$bits")
echo "bound: openssl speed rsa$bits: $sign sign/s per core × $cores cores"

store_arg=sqlite
if [ "$store" = redis ]; then
    start_redis
    store_arg="redis://127.0.0.1:$redis_port/"
fi
start_listener "$store_arg" --rsa-bits "$bits"
reg=$(listener_port reg)
cert=$(listener_port cert)
udp=(); [ "$transport" = udp ] && udp=(--udp)

REGISTRAR_LOG=warn "$bin/registrar-node" --json load ijam --server 127.0.0.1 \
    --cert-port "$cert" --reg-port "$reg" --data-dir "$work/data" --store "$store_arg" \
    --count "$count" --connections "${CONNECTIONS:-16}" --listener-pid "$listener" "${udp[@]}" "$@" | tee "$work/report.json"
python3 - "$work/report.json" "$sign" "$cores" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1])); sign = float(sys.argv[2]); cores = int(sys.argv[3])
bound = sign * cores
per_reg = r.get("listener_cpu_us_per_registration")
print(f"throughput {r['registrations_per_second']:.0f}/s = {r['registrations_per_second']/bound:.2f} of bound {bound:.0f}/s")
if per_reg:
    print(f"listener CPU {per_reg:.1f} µs/registration; efficiency vs openssl {1e6/sign/per_reg:.2f}")
    by = r.get("listener_cpu_us_per_registration_by_thread") or {}
    print("  of which, µs by thread: " + ", ".join(f"{k} {v}" for k, v in by.items() if v))
m = r.get("machine_cpu") or {}
if m.get("us_per_op"):
    tool = m["load_tool_us_per_op"]
    rest = m["us_per_op"] - tool - (per_reg or 0)
    print(f"machine CPU {m['us_per_op']:.1f} µs/registration ({100 * m['busy_share']:.0f}% of {cores} cores busy): "
          f"listener {per_reg or 0:.1f}, load tool {tool:.1f}, rest (Redis, kernel threads) {rest:.1f}")
EOF
echo "listener RSS: $(awk '/VmRSS/{print $2, $3}' /proc/$listener/status)"
