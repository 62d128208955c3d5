#!/usr/bin/env bash
# Regenerates crates/portcullis/pgo.profdata, the execution profile the shipped build (profile
# `dist`: the Dockerfile, the load benchmark) is optimized with: profile-guided optimization.
#
# Why: with the profile, LLVM inlines and lays out the request path's code (ours, hyper's,
# rustls's, tokio's) by what actually runs hot; CPU per request in the load benchmark's unlimited
# run went 17.0-18.4 to 15.8-16.8 µs, lower in 6 of 6 alternating rounds at 10 and 1,000
# policies (issue #17). Builds of every other profile (tests, `cargo run`) do not use it.
#
# How: builds the dist binaries instrumented (in target/pgo-generate), runs them through the
# load benchmark's paths (HTTP/1.1 and HTTP/2 at 10, 1,000 and 10,000 policies, user tokens
# with one key set and with one per issuer, and their exchange, SSE streaming and first requests, a denial, malformed requests, the admin
# endpoints; the benchmark's floor as well, since it is compiled as Portcullis is), and merges
# what they counted. A profile goes stale as code changes: functions whose code changed are
# compiled as without one (a stale profile costs speed, never correctness). Rerun this after
# changing the request path, updating the toolchain or a dependency, then
# benches/layout/run.sh (the function order is read from the optimized build). Beside the
# profile it writes crates/portcullis/pgo.sources, the sources it was taken of, which the load
# benchmark compares with the tree's (benches/common.sh's profile_staleness).
#
# Needs the `llvm-profdata` of the toolchain's LLVM (installed with apt-get if missing), oha
# (cargo install) and curl. Takes ~9 minutes on 2 cores (the instrumented build; under one
# once it is built), then building with the new profile (benches/common.sh's dist_build) ~6.
#
# Usage: benches/pgo/run.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root="$PWD"
source benches/common.sh
PROFILE="$root/crates/portcullis/pgo.profdata"

llvm="$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
PROFDATA="$(command -v "llvm-profdata-$llvm" || true)"
if [ -z "$PROFDATA" ]; then
    log "installing llvm-$llvm (llvm-profdata must read what LLVM $llvm's instrumentation writes)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "llvm-$llvm" >/dev/null
    PROFDATA="llvm-profdata-$llvm"
fi
if ! command -v oha >/dev/null; then
    log "installing oha (compiles for a few minutes)"
    cargo install oha --locked
fi

scratch
# What the profile is taken of, listed before the build reads it (benches/common.sh).
profile_sources > "$work/sources"

log "building the instrumented dist binaries (target/pgo-generate) and the benchmark tool"
# Build scripts and proc macros are instrumented too and write their counts where this says
# (a fixed place: another path would be another RUSTFLAGS, and everything rebuilt each run);
# the binaries under test write theirs where LLVM_PROFILE_FILE says below.
RUSTFLAGS="-Cprofile-generate=$root/target/pgo-generate/build-counts" \
    cargo build --profile dist --locked --target-dir "$root/target/pgo-generate" \
    -p portcullis -p portcullis-benches --bin portcullis --bin portcullis-floor >&2
cargo build --release --locked -p portcullis-benches --bin portcullis-bench >&2
BIN="$root/target/pgo-generate/dist/portcullis"
FLOOR="$root/target/pgo-generate/dist/portcullis-floor"
TOOL="$root/target/release/portcullis-bench"
# %m: the runs of one binary add up in one file.
export LLVM_PROFILE_FILE="$work/raw/%m.profraw"

"$TOOL" fixtures "$work" >/dev/null
sse_upstreams "$TOOL"

load() { # seconds, extra oha args...
    local secs="$1"
    shift
    oha --no-tui -z "${secs}s" -c 16 --cacert "$work/ca.pem" --cert "$work/agent.pem" \
        --key "$work/agent-key.pem" "$@" https://127.0.0.1:19443/bench/1k >/dev/null
}
# The binary must exit on its own (SIGTERM, then drained) for its counts to be written.
finish() { # pid
    kill -TERM "$1"
    wait "$1"
}

log "training: the floor"
"$FLOOR" 127.0.0.1:19443 127.0.0.1:18080 "$work" &
pid="$!"
pids+=("$pid")
wait_port 19443
load 3
load 1 --http2
finish "$pid"

run() { # config name, then what it serves
    local name="$1"
    shift
    log "training: portcullis-$name.yaml"
    "$BIN" run --config "$work/portcullis-$name.yaml" >"$work/$name.log" 2>&1 &
    local pid="$!"
    pids+=("$pid")
    wait_port 19443
    wait_port 19901
    "$@"
    edge_requests
    finish "$pid"
}
token() { cat "$work/token.txt"; }
run 10 eval 'load 3; load 2 --http2'
run 1000 load 3
run 10000 load 2
run token load 3 -H "x-portcullis-user-token: $(token)"
run issuers load 2 -H "x-portcullis-user-token: $(token)"
run firstbyte "$TOOL" firstbyte "$work" portcullis=https://127.0.0.1:19443 >/dev/null

# The exchange: the token service answers RFC 8693 on stdin's lifetime.
mkfifo "$work/sts.stdin"
"$TOOL" token-service "$work" < "$work/sts.stdin" > "$work/sts.out" &
sts_pid=$!
exec {sts_stdin}>"$work/sts.stdin"
until grep -q ready "$work/sts.out" 2>/dev/null; do sleep 0.1; done
run exchange load 2 -H "x-portcullis-user-token: $(token)"
exec {sts_stdin}>&-
wait "$sts_pid" 2>/dev/null || true

# Sparse: functions that never ran are left out (a sixth of the size); LLVM compiles them as
# it would without a profile.
"$PROFDATA" merge --sparse -o "$PROFILE" "$work"/raw/*.profraw
log "$PROFILE: $("$PROFDATA" show "$PROFILE" | sed -n 's/^Total functions: //p') functions," \
    "$(du -k "$PROFILE" | cut -f1) KiB"
mv "$work/sources" "$root/$PROFILE_SOURCES"
log "$PROFILE_SOURCES: the $(wc -l < "$root/$PROFILE_SOURCES") sources it was taken of"
