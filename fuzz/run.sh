#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 600), two at a time, each from its seed
# corpus (fuzz/seeds/<target>, committed) into fuzz/corpus/<target> (not committed).
# Needs the nightly toolchain and cargo-fuzz: `cargo install cargo-fuzz`.
# Crashes land in fuzz/artifacts/<target>/; turn each into a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
targets=$(cargo +nightly fuzz list)
cargo +nightly fuzz build -O
run() {
    local t=$1
    mkdir -p "fuzz/corpus/$t"
    cargo +nightly fuzz run -O "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"fuzz/$t.log" 2>&1 || true
    printf '%-26s %s runs, %s\n' "$t" \
        "$(grep -o 'stat::number_of_executed_units: *[0-9]*' "fuzz/$t.log" | grep -o '[0-9]*$')" \
        "$(grep -q 'SUMMARY\|panicked' "fuzz/$t.log" && echo CRASH || echo clean)"
}
export -f run; export seconds
printf '%s\n' $targets | xargs -P 2 -I{} bash -c 'run {}'
