# Sourced by the benchmark scripts (load/, layout/, pgo/): what they share.

log() { printf '== %s\n' "$*" >&2; }

# Builds binaries as the image ships them: profile `dist` (fat LTO, one codegen unit;
# Cargo.toml) optimized with the execution profile crates/portcullis/pgo.profdata
# (benches/pgo/run.sh; the Dockerfile passes the same flag). RUSTFLAGS applies to every crate
# of the build, dependencies included: a `[profile]` cannot carry it on stable Cargo, and the
# other profiles (tests, `cargo run`) do without.
dist_build() { # cargo build arguments (packages, binaries)
    RUSTFLAGS="-Cprofile-use=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/crates/portcullis/pgo.profdata" \
        cargo build --profile dist --locked "$@"
}

# What the execution profile was taken of: a SHA-256 for every file the profiled binaries are
# compiled from (the crates' sources, build scripts and manifests, the floor's source, the
# lock file) and for the toolchain. benches/pgo/run.sh writes the list beside the profile
# (crates/portcullis/pgo.sources); the load benchmark compares. Functions whose code changed
# are compiled as without a profile: a stale one costs speed, never correctness, and easily
# ~0.3 µs a request when the request path's types change, which a comparison of builds would
# otherwise put down to the change itself.
PROFILE_SOURCES=crates/portcullis/pgo.sources
profile_sources() { # (run from the repository's root)
    git ls-files -co --exclude-standard -- ':(glob)crates/*/src/**/*.rs' \
        ':(glob)crates/*/build.rs' ':(glob)crates/*/Cargo.toml' benches/load/floor.rs \
        Cargo.toml Cargo.lock | sort | xargs sha256sum
    printf '%s  (toolchain) %s\n' "$(rustc -vV | sha256sum | cut -c1-64)" "$(rustc -V)"
}
# "current", or which of the listed files changed since the profile was taken.
profile_staleness() { # (run from the repository's root)
    if [ ! -f "$PROFILE_SOURCES" ]; then
        echo "unknown ($PROFILE_SOURCES is missing)"
        return
    fi
    local changed
    changed="$(diff <(profile_sources) "$PROFILE_SOURCES" | sed -n 's/^[<>] [0-9a-f]*  //p' \
        | sort -u)"
    if [ -z "$changed" ]; then
        echo "current (taken of these sources)"
    else
        echo "STALE: $(wc -l <<<"$changed") of its files changed since it was taken" \
            "($(head -5 <<<"$changed" | paste -sd' ')$([ "$(wc -l <<<"$changed")" -le 5 ] || echo ' ...'));" \
            "regenerate it (benches/pgo/run.sh) before comparing builds"
    fi
}

# Waits up to two minutes for a listener on a local port (a proxy under valgrind starts slowly).
wait_port() { # port
    for _ in $(seq 2400); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    log "nothing listening on $1"
    return 1
}

# The profiling workloads' upstreams (layout/, pgo/), on 18080 and 18081; the SSE server also
# answers /bench/1k, so every fixture config's upstream is one of them. Whatever else listened
# on the ports the workload uses would answer in the profiled code's place (an nginx left on
# 18080 made the SSE upstream fail to bind, and the layout list lacked the streaming path).
# Appends the servers' pids to the caller's `pids`.
sse_upstreams() { # benchmark tool (portcullis-bench)
    local port
    for port in 18080 18081 19443 19901; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            log "port $port is in use: stop what listens there first"
            exit 1
        fi
    done
    for port in 18080 18081; do
        "$1" sse-upstream "127.0.0.1:$port" 5 10 &
        pids+=("$!")
    done
}

# A request over mTLS as the fixtures' agent (files in $work), its body discarded.
tls_curl() { # extra curl args...
    curl -sS -o /dev/null --http1.1 --cacert "$work/ca.pem" --cert "$work/agent.pem" \
        --key "$work/agent-key.pem" "$@"
}

# The profiling workloads' paths besides the requests they load (layout/, pgo/): the admin
# endpoints, a denied request and two malformed ones, against the proxy on 19443 / 19901.
edge_requests() {
    local path url=https://127.0.0.1:19443
    for path in healthz readyz metrics; do curl -sS -o /dev/null "http://127.0.0.1:19901/$path"; done
    tls_curl "$url/admin/users" -X POST -d '{}'           # denied
    tls_curl "$url/bench/%zz"                             # malformed path
    tls_curl "$url/bench/1k" -H "content-length: x" || :  # malformed head: 400
}

# A scratch directory, $work, removed on exit (KEEP_WORK=1 keeps it) after the processes
# whose pids the script appends to `pids` are stopped.
scratch() {
    work="$(mktemp -d)"
    pids=()
    trap cleanup EXIT
}
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "${KEEP_WORK:-}" ]; then log "kept $work"; else rm -rf "$work"; fi
}
