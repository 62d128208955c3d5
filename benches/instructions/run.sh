#!/usr/bin/env bash
# Instructions a request costs, counted, not timed: the floor (the chosen stack alone) and
# Portcullis at 10 and 1,000 policies, each under valgrind's callgrind while oha sends the
# same requests (HTTP/1.1 over mTLS, 16 connections, 1 KiB responses), split by thread.
#
# Why: the load benchmark (benches/load/run.sh) times CPU per request, which moves 5-15%
# between runs on a shared 2-core VM, about the size of what a change to the request path
# gains or loses. An instruction count is the same for the same binary and requests whatever
# else the machine does, so it tells whether a change cut work, and where (run it before and
# after; `KEEP_WORK=1` keeps the callgrind files for callgrind_annotate). It is not a time:
# a cache miss or a syscall costs far more than an instruction, and the kernel's share of a
# request (most of it on these VMs: TCP and wake-ups) is not counted at all.
#
# One caveat in the audit writer's row: valgrind's CPU has no SHA extensions, so the audit
# chain's SHA-256 runs sha2's portable code there (~57k instructions for a ~900-byte record
# against a few thousand with SHA-NI). The runtime thread's row, where the request is served,
# has no such distortion.
#
# By source line: build Portcullis with line tables in a target directory of its own (the
# code is the same; ~15 minutes on 2 cores), count with each instruction's address, then put
# the counts on lines (benches/instructions/lines.py; --function NAME for one function's):
#   source benches/common.sh; CARGO_PROFILE_DIST_DEBUG=line-tables-only \
#       CARGO_TARGET_DIR=target/lines dist_build -p portcullis --bin portcullis
#   PORTCULLIS=target/lines/dist/portcullis DUMP_INSTR=1 KEEP_WORK=1 benches/instructions/run.sh
#   benches/instructions/lines.py <kept dir>/cg.portcullis-10.1-01 \
#       target/lines/dist/portcullis 20000 [--function authorize_and_forward]
# By function and by call site, of the build measured (no line tables needed):
#   DUMP_INSTR=1 KEEP_WORK=1 SKIP_BUILD=1 benches/instructions/run.sh
#   benches/instructions/sites.py <kept dir>/cg.portcullis-10.1-01 target/dist/portcullis \
#       20000 [--callee memcpy]   (each call site's calls a request, and a move's size)
#
# Usage: benches/instructions/run.sh   (SKIP_BUILD=1 uses the existing target/dist build;
#                                       REQUESTS=N requests measured a row, 20000 by default;
#                                       PORTCULLIS=path counts that binary instead;
#                                       DUMP_INSTR=1 keeps instruction addresses)
# Needs valgrind (installed if missing), oha (cargo install oha --locked), curl.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root="$PWD"
source benches/common.sh
REQUESTS="${REQUESTS:-20000}"
CONNECTIONS=16

if ! command -v valgrind >/dev/null; then
    log "installing valgrind"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
fi
command -v oha >/dev/null || { log "needs oha: cargo install oha --locked"; exit 1; }
if [ -z "${SKIP_BUILD:-}" ]; then
    dist_build -p portcullis -p portcullis-benches --bin portcullis --bin portcullis-floor >&2
    cargo build --release --locked -p portcullis-benches --bin portcullis-bench >&2
fi
TOOL="$root/target/release/portcullis-bench"
PORTCULLIS="${PORTCULLIS:-$root/target/dist/portcullis}"
dump_instr=()
[ -n "${DUMP_INSTR:-}" ] && dump_instr=(--dump-instr=yes)
log "execution profile: $(profile_staleness)"

scratch
"$TOOL" fixtures "$work" >/dev/null
sse_upstreams "$TOOL"

load() { # requests
    taskset -c 1 oha --no-tui -n "$1" -c "$CONNECTIONS" --cacert "$work/ca.pem" --cert "$work/agent.pem" \
        --key "$work/agent-key.pem" https://127.0.0.1:19443/bench/1k --output-format json \
        > "$work/oha.json"
    python3 - "$work/oha.json" "$1" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))["summary"]
if summary["successRate"] != 1.0:
    sys.exit(f"only {summary['successRate']:.2%} of {sys.argv[2]} requests succeeded")
PY
}

# Runs NAME under callgrind (one output file a thread), warms it up (connections, sessions,
# the policy's first decisions), zeroes the counts, sends $REQUESTS requests and dumps.
measure() { # name, command...
    local name="$1"
    shift
    # One CPU, as a sidecar gets: the runtime is tokio's current-thread one, on the main thread.
    taskset -c 0 valgrind --tool=callgrind --separate-threads=yes --demangle=no \
        "${dump_instr[@]}" --callgrind-out-file="$work/cg.$name" "$@" \
        2>"$work/valgrind.$name.log" &
    local pid="$!"
    pids+=("$pid")
    wait_port 19443
    load 2000
    callgrind_control -z "$pid" >/dev/null 2>&1
    load "$REQUESTS"
    callgrind_control -d "$pid" >/dev/null 2>&1
    kill "$pid"
    wait "$pid" 2>/dev/null || true
}

measure floor "$root/target/dist/portcullis-floor" 127.0.0.1:19443 127.0.0.1:18080 "$work"
for policies in 10 1000; do
    measure "portcullis-$policies" "$PORTCULLIS" run \
        --config "$work/portcullis-$policies.yaml"
done

# The dump's files are cg.NAME.<dump>-<thread>.
python3 - "$work" "$REQUESTS" <<'PY'
import glob, os, re, sys
work, requests = sys.argv[1], int(sys.argv[2])

def threads(name):
    """(thread label, instructions) for each thread of the zeroed-then-dumped interval."""
    rows = []
    for path in sorted(glob.glob(f"{work}/cg.{name}.1-*")):
        text = open(path).read()
        total = int(re.search(r"^(?:summary|totals): (\d+)", text, re.M).group(1))
        if total == 0:
            continue
        # On one CPU both run tokio's current-thread runtime on the main thread; the audit
        # writer is the thread that hashes.
        if path.endswith("-01"):
            label = "runtime (serving)"
        elif "sha2" in text:
            label = "audit writer"
        else:
            label = "other"
        rows.append((label, total))
    return rows

names = ["floor", "portcullis-10", "portcullis-1000"]
per = {}
for name in names:
    per[name] = {}
    for label, total in threads(name):
        per[name][label] = per[name].get(label, 0) + total
floor = per["floor"].get("runtime (serving)", 0) / requests
print(f"instructions per request ({requests} requests, {os.cpu_count()} CPUs, callgrind):")
print("| path | runtime thread | vs floor | audit writer (portable SHA-256) | other |")
print("|---|---|---|---|---|")
for name in names:
    runtime = per[name].get("runtime (serving)", 0) / requests
    writer = per[name].get("audit writer", 0) / requests
    other = per[name].get("other", 0) / requests
    ratio = f"{runtime / floor:.2f}x" if floor else "-"
    print(f"| {name} | {runtime:,.0f} | {ratio} | {writer:,.0f} | {other:,.0f} |")
PY
