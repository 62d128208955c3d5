#!/usr/bin/env bash
# Regenerates crates/portcullis/symbol-order.txt, the order in which the linker lays out the
# functions of the shipped binary (profile `dist`): those the request path runs, hottest
# first, then those only a start runs; the rest of the code after them.
#
# Why: the kernel maps a started binary's code 64 KiB at a time around each page it touches
# (fault-around) and reads ahead around it. Left in the compiler's order, a start touches ~150
# scattered 64 KiB blocks of the 16 MB of code and ~11 MiB of it becomes resident, most of
# the sidecar's idle RSS (issue #17). Packed, what runs sits in a few contiguous megabytes.
#
# How: runs the dist build under valgrind's callgrind (which records every function executed,
# unlike sampling) through a start, then the first-byte workload of the load benchmark (HTTP/1.1
# and HTTP/2 handshakes and requests, SSE streaming), user tokens, a denied and two malformed
# requests and the admin endpoints. Symbol names carry hashes of the toolchain, of each
# crate's version and of its dependencies: rerun this after updating the toolchain or a
# dependency, or adding one to a crate of ours, and after benches/pgo/run.sh (the execution
# profile decides what is inlined, so which functions exist: the list is read from the build
# optimized with it). `--check` says how much of the list a build still has. Needs valgrind
# (installed if missing) and curl.
#
# Usage: benches/layout/run.sh           regenerate the list
#        benches/layout/run.sh --check   how much of the list the dist build still has, and
#                                        whether its code is laid out in that order (exit 1
#                                        unless all of it is: time to regenerate. A change to
#                                        code a start runs renames or adds functions the
#                                        list cannot know of; at 99% present idle RSS was
#                                        1.5 MiB over the regenerated list's)
#        (SKIP_BUILD=1 uses the existing target/dist build)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root="$PWD"
source benches/common.sh
ORDER="$root/crates/portcullis/symbol-order.txt"

if [ "${1:-}" = "--check" ]; then
    [ -n "${SKIP_BUILD:-}" ] || dist_build -p portcullis --bin portcullis >&2
    python3 - "$root/target/dist/portcullis" "$ORDER" <<'PY'
import subprocess, sys
binary, order = sys.argv[1:3]
address = {}
for line in subprocess.run(["nm", "--defined-only", binary], capture_output=True, text=True,
                           check=True).stdout.splitlines():
    fields = line.split()
    if len(fields) == 3 and fields[1] in "tTwW":
        address.setdefault(fields[2], int(fields[0], 16))
listed = [n for n in open(order).read().split() if n]
present = [n for n in listed if n in address]
in_order = sum(1 for a, b in zip(present, present[1:]) if address[a] < address[b])
share = len(present) / max(len(listed), 1)
print(f"{len(present)} of {len(listed)} listed functions are in {binary} ({share:.0%}); "
      f"{in_order + 1 if present else 0} of them laid out in the list's order")
# A few (~0.5%) never follow the list (folded or placed by the linker on its own).
sys.exit(0 if len(present) == len(listed) and in_order + 1 >= 0.99 * len(present) else 1)
PY
    exit
fi

if ! command -v valgrind >/dev/null; then
    log "installing valgrind"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
fi
if [ -z "${SKIP_BUILD:-}" ]; then
    dist_build -p portcullis --bin portcullis >&2
    cargo build --release --locked -p portcullis-benches --bin portcullis-bench >&2
fi
BIN="$root/target/dist/portcullis"
TOOL="$root/target/release/portcullis-bench"

scratch
"$TOOL" fixtures "$work" >/dev/null
sse_upstreams "$TOOL"

profile() { # name (a fixture config); then the workload runs
    local name="$1"
    log "profiling a start and requests with portcullis-$name.yaml"
    valgrind --tool=callgrind --demangle=no --callgrind-out-file="$work/cg.$name.out" \
        "$BIN" run --config "$work/portcullis-$name.yaml" 2>"$work/valgrind.$name.log" &
    local pid="$!"
    pids+=("$pid")
    wait_port 19443
    wait_port 19901
    # The start ends here: its functions go to the first part, cg.NAME.out.1.
    callgrind_control -d "$pid" >/dev/null
    workload "$name"
    kill -INT "$pid"
    wait "$pid" || true
}

workload() {
    local url=https://127.0.0.1:19443
    if [ "$1" = token ]; then
        for _ in 1 2 3; do
            tls_curl -H "x-portcullis-user-token: $(cat "$work/token.txt")" "$url/bench/1k"
        done
        tls_curl -H "x-portcullis-user-token: not-a-jwt" "$url/bench/1k"
    else
        "$TOOL" firstbyte "$work" "portcullis=$url" >/dev/null
        tls_curl --http2 "$url/bench/1k"
    fi
    edge_requests
}

profile firstbyte
profile token

python3 - "$work" "$BIN" "$ORDER" <<'PY'
import collections, glob, re, subprocess, sys
work, binary, out = sys.argv[1:4]

def functions(path):
    """Self cost per function of the binary itself, from a callgrind profile."""
    cost, names, objects = collections.Counter(), {}, {}
    current = obj = None
    skip = False
    for line in open(path, errors="replace"):
        if skip:  # the line after calls= is the call's inclusive cost
            skip = False
            continue
        if line.startswith("calls="):
            skip = True
            continue
        m = re.match(r"(ob|cob|fn|cfn)=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
        if m:
            kind, key, name = m.groups()
            table = objects if kind in ("ob", "cob") else names
            if name:
                table[key] = name
            if kind == "ob":
                obj = objects[key]
            elif kind == "fn":
                current = (names[key], obj)
            continue
        if current and line[:1] and (line[0].isdigit() or line[0] in "+-*"):
            fields = line.split()
            if len(fields) >= 2 and fields[-1].isdigit():
                cost[current] += int(fields[-1])
    per = collections.Counter()
    for (name, owner), c in cost.items():
        name = re.sub(r"'\d+$", "", name)  # callgrind's recursion marker
        if owner == binary and c > 0 and re.match(r"[A-Za-z_]", name):
            per[name] += c
    return per

start, serve = collections.Counter(), collections.Counter()
for path in glob.glob(f"{work}/cg.*.out.1"):
    start.update(functions(path))
for path in glob.glob(f"{work}/cg.*.out"):
    serve.update(functions(path))
# The request path together, hottest first (what it shares with a start, then its own), then
# what only a start runs: a start touches the first and last groups, serving the first two.
order = [n for n, _ in serve.most_common() if n in start]
order += [n for n, _ in serve.most_common() if n not in start]
order += [n for n, _ in start.most_common() if n not in serve]

defined = set()
for line in subprocess.run(["nm", "--defined-only", binary], capture_output=True,
                           text=True, check=True).stdout.splitlines():
    fields = line.split()
    if len(fields) == 3 and fields[1] in "tTwW":
        defined.add(fields[2])
missing = [n for n in order if n not in defined]
with open(out, "w") as f:
    f.write("\n".join(n for n in order if n in defined) + "\n")
print(f"{out}: {len(order) - len(missing)} functions "
      f"({len(start)} run by a start, {len(serve)} by requests, {len(set(start) & set(serve))} by both); "
      f"{len(missing)} not found in the binary's symbols, left out", file=sys.stderr)
PY
