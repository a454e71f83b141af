# Shared by the perf scripts: a temp dir, cleanup of what they start, a private
# redis-server and a listener on free ports. Source it from the repository root.

bin=${BIN:-target/release}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

# Starts a private redis-server on a free port; sets redis_port.
start_redis() {
    redis_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$work" --save "" --appendonly no --daemonize no >"$work/redis.log" 2>&1 &
    pids+=($!)
    until redis-cli -p "$redis_port" ping >/dev/null 2>&1; do :; done
}

# Starts the listener on free ports with STORE and any extra serve options, waits for
# its ready line; sets listener (its pid).
start_listener() {
    local store=$1; shift
    "$bin/registrar" --data-dir "$work/data" --store "$store" serve --bind 127.0.0.1 \
        --cert-port 0 --reg-port 0 --state-port 0 --envelope-port 0 --rate-per-source 0 "$@" \
        >"$work/listener.out" 2>"$work/listener.err" &
    listener=$!
    pids+=("$listener")
    until grep -q '^registrar listening' "$work/listener.out"; do
        kill -0 "$listener" || { cat "$work/listener.err"; exit 1; }
        sleep 0.1
    done
}

# The TCP port of NAME (reg, cert, envelope…) from the listener's ready line.
listener_port() {
    sed -E "s/.* $1_tcp=127\.0\.0\.1:([0-9]+).*/\1/" <<<"$(grep '^registrar listening' "$work/listener.out")"
}

# RSA private-key operations per second on one core at BITS, by `openssl speed`
# (the bound's single-core rate).
rsa_sign_rate() {
    openssl speed -seconds "${2:-3}" "rsa$1" 2>/dev/null \
        | awk -v b="$1" '$1=="rsa" && $2==b" bits" || $1=="rsa" && $2==b {print $(NF-1)}' | tail -1
}
