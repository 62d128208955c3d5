#!/usr/bin/env bash
# The side-by-side load and first-byte benchmark (issues #16 and #17), in one run:
#
#   upstream      nginx serving 1 KiB (and a raw-socket SSE server for the first-byte rows)
#   direct        oha → upstream
#   nginx-mtls    oha → nginx (TLS 1.3, client certificate verified) → upstream: the baseline
#   nginx-mtls-log  the same, writing nginx's default access log line per request (a
#                 reference beside Portcullis's audit record; ratios stay against nginx-mtls)
#   nginx-mtls-identity  the same, forwarding the identity fields Portcullis forwards
#                 (X-Forwarded-For and -Proto, the agent's SPIFFE ID, a request id, a
#                 traceparent) and answering with the request id: what the upstream is handed
#                 then is Portcullis's, field for field (a reference beside Portcullis's
#                 forwarding; ratios stay against nginx-mtls)
#   floor         oha → the chosen stack alone (rustls mTLS, hyper server and client, tokio;
#                 load/floor.rs) → upstream: what Portcullis costs beyond it is its own work
#   portcullis    oha → Portcullis with 10 / 1,000 / 10,000 per-agent policies, with a
#                 user token (10 policies), with that token where each issuer has its own key
#                 set (`user_token.issuer_keys`), and with that token exchanged for the
#                 upstream's credential (RFC 8693, served from the cache after the first call)
#
# For each: p50 and p99 at a fixed rate (oha -q, latency correction on), max rps (unlimited),
# max rps under a CPU limit (CPU_LIMIT millicores as a CFS quota, as Kubernetes enforces a
# sidecar's `limits.cpu`; see "a CPU limit" below for why both),
# CPU per request (utime+stime of the proxy from /proc/<pid>/stat over the unlimited run),
# idle RSS and RSS with 512 open mTLS connections, and what the load core spent in each
# unlimited run (how busy it was, its CPU per request and the upstream's); every ratio
# against nginx-mtls from this same run. The paths take turns: every proxy is started first (each on its own port, all on
# PROXY_CORE, the idle ones idle), then ROUNDS rounds in which every path has its fixed-rate
# and its unlimited run of DURATION / ROUNDS, in an order that rotates round by round; p50 and
# p99 are over the rounds' requests pooled, max rps and CPU per request the median of the
# rounds. On a shared host a slow spell (a few milliseconds of stall, seconds long) otherwise
# lands in one row's 10 s and decides its ratios: here it lands in one round of one path, and
# the spread table (lowest and highest round) shows it. Then the first-byte table:
# first request on a new connection (client with and without TCP_NODELAY, and a fresh httpx
# client with its handshake), time to first SSE event and inter-event gaps, HTTP/1.1 and
# HTTP/2, the three paths taking turns, round by round, for the first request (200 rounds
# each).
#
# The proxy under test runs alone on PROXY_CORE; the upstream and the load generator share
# LOAD_CORE. Installs what it needs (nginx via apt-get, oha via cargo install, httpx in the
# client tests' venv via .ci/python-clients).
#
# Usage: benches/load/run.sh [--first-byte]   (env: DURATION=10s ROUNDS=5 RATE=2000
#                                              CONNECTIONS=16 PROXY_CORE=0 LOAD_CORE=1
#                                              HOLD=512 CPU_LIMIT=500 (0: no limited run)
#                                              KEEP_WORK=1 keeps the fixtures and results)
# --first-byte runs only the first-byte table (no oha needed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root="$PWD"

DURATION="${DURATION:-10s}"
ROUNDS="${ROUNDS:-5}"
RATE="${RATE:-2000}"
CONNECTIONS="${CONNECTIONS:-16}"
PROXY_CORE="${PROXY_CORE:-0}"
LOAD_CORE="${LOAD_CORE:-1}"
HOLD="${HOLD:-512}"
CPU_LIMIT="${CPU_LIMIT:-500}"
LOAD=true
[ "${1:-}" = "--first-byte" ] && LOAD=false

source benches/common.sh

# --- what the run needs ---------------------------------------------------------------------
if ! command -v nginx >/dev/null; then
    log "installing nginx"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
fi
if ! command -v openssl >/dev/null; then
    log "installing openssl (nginx-mtls-identity reads the agent's SPIFFE ID with it)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
fi
if "$LOAD" && ! command -v oha >/dev/null; then
    log "installing oha (compiles for a few minutes)"
    cargo install oha --locked
fi
NGINX="$(command -v nginx)"
# httpx for the first-byte table's httpx row: the venv the client tests use (pinned there).
PYTHON="$(eval "$(bash .ci/python-clients --print-env)"; echo "$PORTCULLIS_PYTHON")"
# Portcullis is measured as the image ships it: profile `dist` (fat LTO, one codegen unit;
# see the Dockerfile) with the execution profile (benches/common.sh), which also decide how
# much of the binary is resident (RSS).
profile_state="$(profile_staleness)"
log "execution profile: $profile_state"
log "building portcullis (profile dist, as the image) and the benchmark tool (release)"
# The floor is compiled as Portcullis is (its execution profile is part of pgo.profdata), so
# the two rows differ by what the code does.
[ -n "${SKIP_BUILD:-}" ] || dist_build -p portcullis -p portcullis-benches --bin portcullis \
    --bin portcullis-floor >&2
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --locked -p portcullis-benches --bin portcullis-bench >&2
# PORTCULLIS=/path/to/another/build measures that binary instead (e.g. before a change).
PORTCULLIS="${PORTCULLIS:-$root/target/dist/portcullis}"
TOOL="$root/target/release/portcullis-bench"
FLOOR="$root/target/dist/portcullis-floor"

scratch
# nginx workers run as an unprivileged user when started as root: they must read www/.
chmod 755 "$work"
"$TOOL" fixtures "$work"
mkdir -p "$work/www/bench"
head -c 1024 /dev/zero | tr '\0' x > "$work/www/bench/1k"

# --- nginx: upstream and the mTLS baseline --------------------------------------------------
nginx_conf() { # name, server blocks
    mkdir -p "$work/$1"
    cat > "$work/$1/nginx.conf" <<EOF
daemon off;
master_process on;
worker_processes 1;
pid $work/$1/nginx.pid;
error_log $work/$1/error.log warn;
events { worker_connections 16384; }
http {
    access_log off;
    client_body_temp_path $work/$1; proxy_temp_path $work/$1; fastcgi_temp_path $work/$1;
    uwsgi_temp_path $work/$1; scgi_temp_path $work/$1;
    keepalive_requests 1000000;
    $2
}
EOF
}
nginx_conf upstream "server { listen 127.0.0.1:18080; root $work/www; }"
mtls_server() { # port, upstream port, extra server directives, extra location directives
    cat <<EOF
server {
        listen 127.0.0.1:$1 ssl http2;
        ssl_protocols TLSv1.3;
        ssl_certificate $work/server.pem;
        ssl_certificate_key $work/server-key.pem;
        ssl_client_certificate $work/ca.pem;
        ssl_verify_client on;
        ssl_verify_depth 2;
        ${3:-}
        location / {
            proxy_pass http://backend$2;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            ${4:-}
        }
    }
EOF
}
backend() { # upstream port
    echo "upstream backend$1 { server 127.0.0.1:$1; keepalive 64; }"
}
# 18443: the baseline (no access log, as nginx-mtls has always been measured); 18444: the same
# in front of the SSE upstream (first-byte table). 18445, an nginx of its own (its RSS its
# own): the baseline writing nginx's default access log line per request, a reference point
# beside Portcullis's audit record.
nginx_conf mtls "$(mtls_server 18443 18080) $(mtls_server 18444 18081) $(backend 18080) \
    $(backend 18081)"
nginx_conf mtls-log "$(mtls_server 18445 18080 "access_log $work/mtls-log/access.log;") \
    $(backend 18080)"
# 18446, an nginx of its own: the baseline handing the upstream what Portcullis hands it
# besides the request (the five fields below, as Portcullis sets them: a caller's own
# values replaced) and the caller the request id. nginx has no variable for a certificate's
# URI SAN: the agent's SPIFFE ID is the fixtures' agent's, written in (less work than reading
# it from the certificate); the trace id is the request id, the parent id fixed (nginx makes
# one random id a request).
agent_id="$(openssl x509 -in "$work/agent.pem" -noout -ext subjectAltName |
    grep -o 'spiffe://[^,[:space:]]*')"
nginx_conf mtls-identity "$(mtls_server 18446 18080 'add_header X-Request-Id $request_id always;' \
    "proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header X-Portcullis-Agent $agent_id;
            proxy_set_header X-Request-Id \$request_id;
            proxy_set_header traceparent 00-\$request_id-b7ad6b7169203331-01;") \
    $(backend 18080)"

started=
start() { # core, command... (sets $started to the pid)
    local core="$1"
    shift
    taskset -c "$core" "$@" > "$work/$(basename "$1").$RANDOM.log" 2>&1 &
    started="$!"
    pids+=("$started")
}
# The listeners are bound before the start ends (what loading policies freed is handed back
# last): idle RSS is read once /readyz says so.
wait_ready() { # [admin port, 19901]
    local admin="${1:-19901}"
    for _ in $(seq 1200); do
        local status
        status="$( (exec 3<>"/dev/tcp/127.0.0.1/$admin" &&
            printf 'GET /readyz HTTP/1.0\r\n\r\n' >&3 && read -r _ code _ <&3 &&
            echo "$code") 2>/dev/null || true)"
        [ "$status" = 200 ] && return 0
        sleep 0.05
    done
    log "not ready on $admin"
    return 1
}
# Each proxy starts with its executable out of the page cache, as in a new pod: a file just
# written (a fresh build) is wholly cached, and the kernel then maps up to 64 KiB around every
# page a start touches, so the same binary reads ~1.5 MiB more idle RSS than it does in a pod.
uncache() { # file: written back, then dropped from the page cache (no root needed)
    sync "$1"
    python3 -c 'import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)' "$1"
}
uncache "$NGINX"
start "$LOAD_CORE" "$NGINX" -p "$work/upstream" -c "$work/upstream/nginx.conf"
upstream_master="$started"
start "$LOAD_CORE" "$TOOL" sse-upstream 127.0.0.1:18081 5 10
start "$PROXY_CORE" "$NGINX" -p "$work/mtls" -c "$work/mtls/nginx.conf"
mtls_master="$started"
start "$PROXY_CORE" "$NGINX" -p "$work/mtls-log" -c "$work/mtls-log/nginx.conf"
mtls_log_master="$started"
start "$PROXY_CORE" "$NGINX" -p "$work/mtls-identity" -c "$work/mtls-identity/nginx.conf"
mtls_identity_master="$started"
wait_port 18080
wait_port 18081
wait_port 18443
wait_port 18445
wait_port 18446
sleep 0.2
mtls_worker="$(pgrep -P "$mtls_master" | head -1)"
upstream_worker="$(pgrep -P "$upstream_master" | head -1)"
mtls_log_worker="$(pgrep -P "$mtls_log_master" | head -1)"
mtls_identity_worker="$(pgrep -P "$mtls_identity_master" | head -1)"

# --- measurements ---------------------------------------------------------------------------
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# A core's busy time (user, nice, system, irq, softirq; not idle, iowait or steal), in ticks.
core_ticks() { awk -v cpu="cpu$1" '$1 == cpu { print $2 + $3 + $4 + $7 + $8 }' /proc/stat; }
rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }
TICK="$(getconf CLK_TCK)"

# --- a CPU limit ----------------------------------------------------------------------------
# At a whole core the proxy is not what bounds max rps: oha and the upstream share LOAD_CORE
# and fill it first (the proxies' own core ran 70-85% busy in the unlimited runs, nginx-mtls's
# and Portcullis's alike), so the unlimited column measures the load generator as much as the
# proxy. A sidecar runs under a CPU limit, and there its throughput is the limit over its CPU
# per request: each round also runs every proxy's unlimited load with its process alone in a
# cgroup whose CFS quota is CPU_LIMIT millicores a period of 100 ms (the kubelet's
# cpu.cfs_period_us), set for that run only. cgroup v1's cpu controller (this VM's) or v2's.
CFS_PERIOD_US=100000
cgroup_root=
cgroup_version=
cgroups=()
if "$LOAD" && [ "$CPU_LIMIT" -gt 0 ]; then
    if [ -w /sys/fs/cgroup/cpu ] && [ -f /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]; then
        cgroup_root=/sys/fs/cgroup/cpu cgroup_version=1
    elif grep -qw cpu /sys/fs/cgroup/cgroup.controllers 2>/dev/null &&
        echo +cpu 2>/dev/null > /sys/fs/cgroup/cgroup.subtree_control; then
        cgroup_root=/sys/fs/cgroup cgroup_version=2
    else
        log "no writable cgroup cpu controller: the CPU-limited runs are left out"
    fi
fi
# Puts a path's measured process in a cgroup of its own (made on first use) and sets or
# lifts that cgroup's quota.
cpu_limit() { # name, on | off
    local dir="$cgroup_root/portcullis-bench.$$.$1"
    if [ ! -d "$dir" ]; then
        mkdir "$dir"
        cgroups+=("$dir")
        echo "${pid_of[$1]}" > "$dir/cgroup.procs"
    fi
    local quota=-1 max=max
    if [ "$2" = on ]; then
        quota=$(( CPU_LIMIT * CFS_PERIOD_US / 1000 ))
        max="$quota"
    fi
    if [ "$cgroup_version" = 1 ]; then
        echo "$CFS_PERIOD_US" > "$dir/cpu.cfs_period_us"
        echo "$quota" > "$dir/cpu.cfs_quota_us"
    else
        echo "$max $CFS_PERIOD_US" > "$dir/cpu.max"
    fi
}
# The cgroups go once their processes have (after cleanup stopped them).
remove_cgroups() {
    cleanup
    local dir
    for dir in "${cgroups[@]}"; do
        for _ in $(seq 50); do
            rmdir "$dir" 2>/dev/null && break
            sleep 0.1
        done
    done
}
trap remove_cgroups EXIT

oha_run() { # format (json, csv), out, url, extra oha args...
    local format="$1" out="$2" url="$3"
    shift 3
    taskset -c "$LOAD_CORE" oha --no-tui --output-format "$format" -z "${ROUND_MS}ms" \
        -c "$CONNECTIONS" --worker-threads 1 --cacert "$work/ca.pem" --cert "$work/agent.pem" \
        --key "$work/agent-key.pem" "$@" "$url" > "$out"
}

# The paths, in the order of the table: url, the measured process (or -), idle RSS, and the
# user token for the rows that send one.
order=()
declare -A url_of pid_of idle_of token_of
path() { # name, url, pid or -, [token]
    order+=("$1")
    url_of[$1]="$2"
    pid_of[$1]="$3"
    idle_of[$1]=-
    [ "$3" != - ] && idle_of[$1]="$(rss_kib "$3")"
    token_of[$1]="${4:-}"
}
# One round of one path: its fixed-rate run (every request's latency, csv), then its unlimited
# run with the CPU it took, and what the load core spent on it: the whole core's busy time
# (oha, the upstream, their kernel work) and the upstream nginx's own.
round() { # round, name
    local r="$1" name="$2" args=() cpu=- before=0
    local pid="${pid_of[$name]}"
    [ -n "${token_of[$name]}" ] && args=(-H "x-portcullis-user-token: ${token_of[$name]}")
    oha_run csv "$work/$name.rate.$r.csv" "${url_of[$name]}" -q "$RATE" --latency-correction \
        "${args[@]}"
    [ "$pid" != - ] && before="$(cpu_ticks "$pid")"
    local load_before upstream_before
    load_before="$(core_ticks "$LOAD_CORE")"
    upstream_before="$(cpu_ticks "$upstream_worker")"
    oha_run json "$work/$name.max.$r.json" "${url_of[$name]}" "${args[@]}"
    [ "$pid" != - ] && cpu="$(( $(cpu_ticks "$pid") - before ))"
    local load="$(( $(core_ticks "$LOAD_CORE") - load_before ))"
    local upstream="$(( $(cpu_ticks "$upstream_worker") - upstream_before ))"
    if [ -n "$cgroup_root" ] && [ "$pid" != - ]; then
        cpu_limit "$name" on
        oha_run json "$work/$name.limited.$r.json" "${url_of[$name]}" "${args[@]}"
        cpu_limit "$name" off
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$r" "$cpu" "$TICK" "$load" "$upstream" >> "$rounds"
}
# RSS with HOLD mTLS connections open, after the rounds.
held() { # name
    local pid="${pid_of[$1]}" url="${url_of[$1]}" rss=-
    if [ "$pid" != - ] && [ "$HOLD" -gt 0 ]; then
        local port="${url##*:}"
        port="${port%%/*}"
        coproc HOLDER { taskset -c "$LOAD_CORE" "$TOOL" hold "127.0.0.1:$port" "$work" "$HOLD"; }
        read -r _ready _count <&"${HOLDER[0]}"
        rss="$(rss_kib "$pid")"
        exec {HOLDER[1]}>&-
        wait "$HOLDER_PID" 2>/dev/null || true
    fi
    printf '%s\t%s\t%s\n' "$1" "${idle_of[$1]}" "$rss" >> "$memory"
}

# What listened on a port a proxy is started on would answer in its place.
port_free() { # port
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
        log "port $1 is in use: stop what listens there first"
        exit 1
    fi
}
# Portcullis with the fixtures' config NAME, on its own ports (listen 19450 + INDEX, admin
# 19910 + INDEX), started and ready; its idle RSS read once /readyz says so.
portcullis_on() { # config name, index, [user token its row sends]
    local port=$((19450 + $2)) admin=$((19910 + $2))
    port_free "$port"
    port_free "$admin"
    sed -e "s/^listen: .*/listen: 127.0.0.1:$port/" \
        -e "s/^admin_listen: .*/admin_listen: 127.0.0.1:$admin/" \
        "$work/portcullis-$1.yaml" > "$work/portcullis-$1.load.yaml"
    uncache "$PORTCULLIS"
    start "$PROXY_CORE" "$PORTCULLIS" run --config "$work/portcullis-$1.load.yaml"
    local pid="$started"
    wait_port "$port"
    wait_ready "$admin"
    path "portcullis-$1" "https://127.0.0.1:$port/bench/1k" "$pid" "${3:-}"
}
portcullis() { # config name; sets $pid once it listens (on 19443 / 19901)
    uncache "$PORTCULLIS"
    start "$PROXY_CORE" "$PORTCULLIS" run --config "$work/portcullis-$1.yaml"
    pid="$started"
    wait_port 19443
    wait_port 19901
    wait_ready
}
stop() {
    kill "$1"
    wait "$1" 2>/dev/null || true
}

rounds="$work/rounds.tsv"
memory="$work/memory.tsv"
: > "$rounds"
: > "$memory"
if "$LOAD"; then
    if ! [[ "$DURATION" =~ ^[0-9]+s$ ]] || [ "$ROUNDS" -lt 1 ]; then
        log "DURATION is whole seconds (e.g. 10s) and ROUNDS at least 1"
        exit 64
    fi
    ROUND_MS=$(( ${DURATION%s} * 1000 / ROUNDS ))
    log "starting every path"
    path direct "http://127.0.0.1:18080/bench/1k" -
    path nginx-mtls "https://127.0.0.1:18443/bench/1k" "$mtls_worker"
    path nginx-mtls-log "https://127.0.0.1:18445/bench/1k" "$mtls_log_worker"
    path nginx-mtls-identity "https://127.0.0.1:18446/bench/1k" "$mtls_identity_worker"
    uncache "$FLOOR"
    port_free 19450
    start "$PROXY_CORE" "$FLOOR" 127.0.0.1:19450 127.0.0.1:18080 "$work"
    wait_port 19450
    path floor "https://127.0.0.1:19450/bench/1k" "$started"
    portcullis_on 10 1
    portcullis_on 1000 2
    portcullis_on 10000 3
    token="$(cat "$work/token.txt")"
    portcullis_on token 4 "$token"
    portcullis_on issuers 6 "$token"
    # The same, with the token exchanged for an upstream credential (RFC 8693, cached).
    # (Not a coproc: bash keeps one at a time, and `held` holds connections with one.)
    mkfifo "$work/sts.stdin"
    taskset -c "$LOAD_CORE" "$TOOL" token-service "$work" < "$work/sts.stdin" > "$work/sts.out" &
    sts_pid=$!
    exec {sts_stdin}>"$work/sts.stdin"
    until grep -q ready "$work/sts.out" 2>/dev/null; do sleep 0.1; done
    portcullis_on exchange 5 "$token"
    for r in $(seq "$ROUNDS"); do
        log "round $r of $ROUNDS (${ROUND_MS} ms a run)"
        n="${#order[@]}"
        for i in $(seq 0 $((n - 1))); do
            round "$r" "${order[$(( (i + r - 1) % n ))]}"
        done
    done
    log "holding $HOLD connections to each proxy"
    for name in "${order[@]}"; do held "$name"; done
    for name in "${order[@]}"; do
        case "$name" in floor | portcullis-*) stop "${pid_of[$name]}" ;; esac
    done
    exec {sts_stdin}>&-
    wait "$sts_pid" 2>/dev/null || true
fi

log "first byte"
firstbyte="$work/firstbyte.txt"
# One client for the three paths; they take turns for the first request (see the tool), so
# its ratios hold through the host's slow spells.
portcullis firstbyte
taskset -c "$LOAD_CORE" "$TOOL" firstbyte "$work" direct=http://127.0.0.1:18081 \
    nginx-mtls=https://127.0.0.1:18444 portcullis=https://127.0.0.1:19443 > "$firstbyte"
# A fresh httpx client per request (handshake included), as the OpenAI and MCP SDKs make one.
taskset -c "$LOAD_CORE" "$PYTHON" benches/load/httpx_first.py "$work" \
    direct=http://127.0.0.1:18081 nginx-mtls=https://127.0.0.1:18444 \
    portcullis=https://127.0.0.1:19443 >> "$firstbyte"
stop "$pid"

# --- the tables -----------------------------------------------------------------------------
python3 - "$work" "$rounds" "$memory" "$firstbyte" "$RATE" "$CPU_LIMIT" <<'EOF'
import csv, json, os, statistics, sys
def percentile(ordered, q):
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]
work, rounds, memory, firstbyte, rate, cpu_limit = sys.argv[1:7]
# A fixed-rate run's first WARMUP seconds are left out of its latencies: oha opens its 16
# connections (mTLS handshakes on one thread) while the requests the rate schedules pile up,
# so the first ~50-100 answer late by the set-up (up to ~50 ms, latency correction on); over
# a 2 s run that is more than 1% of the requests, and the p99 would be the set-up's. The
# first-byte table measures a connection's set-up on its own.
WARMUP = 0.25
runs, latencies, order = {}, {}, []
for line in open(rounds):
    name, r, cpu, tick, load, upstream = line.rstrip("\n").split("\t")
    if name not in runs:
        runs[name], latencies[name] = [], []
        order.append(name)
    kept = [row for row in csv.DictReader(open(f"{work}/{name}.rate.{r}.csv"))
            if float(row["request-start"]) >= WARMUP]
    at = sorted(float(row["request-duration"]) * 1e3 for row in kept)
    latencies[name] += at
    mx = json.load(open(f"{work}/{name}.max.{r}.json"))
    total = sum(mx["statusCodeDistribution"].values())
    # The run under the CPU limit, where there was one (its 200s count with the others).
    limited_file = f"{work}/{name}.limited.{r}.json"
    lim = json.load(open(limited_file)) if os.path.exists(limited_file) else None
    lim_codes = lim["statusCodeDistribution"] if lim else {}
    runs[name].append(dict(
        p99=percentile(at, 0.99) if at else None, rps=mx["summary"]["requestsPerSec"],
        limited=lim["summary"]["requestsPerSec"] if lim else None,
        requests=len(kept) + total + sum(lim_codes.values()),
        ok=sum(row["status"] == "200" for row in kept) + mx["statusCodeDistribution"].get("200", 0)
        + lim_codes.get("200", 0),
        cpu=None if cpu == "-" or total == 0 else int(cpu) / int(tick) / total * 1e6,
        # The load core over the unlimited run: how busy (of the run's wall time), and what
        # it and the upstream alone spent a request.
        load_busy=int(load) / int(tick) / mx["summary"]["total"] if mx["summary"]["total"] else None,
        load_cpu=int(load) / int(tick) / total * 1e6 if total else None,
        upstream_cpu=int(upstream) / int(tick) / total * 1e6 if total else None))
mem = {}
for line in open(memory):
    name, idle, held = line.rstrip("\n").split("\t")
    mem[name] = tuple(None if v == "-" else int(v) / 1024 for v in (idle, held))
def median(name, key):
    values = [run[key] for run in runs[name] if run[key] is not None]
    return statistics.median(values) if values else None
# Latency percentiles over every round's requests pooled; max rps and CPU per request (each
# an average over a whole run already) the median of the rounds.
rows = []
for name in order:
    requests = sum(run["requests"] for run in runs[name])
    pooled = sorted(latencies[name])
    rows.append(dict(name=name, p50=percentile(pooled, 0.5), p99=percentile(pooled, 0.99),
                     rps=median(name, "rps"), limited=median(name, "limited"),
                     cpu=median(name, "cpu"),
                     ok=sum(run["ok"] for run in runs[name]) / requests if requests else 0,
                     idle=mem.get(name, (None, None))[0], held=mem.get(name, (None, None))[1]))
bad = [f"{r['name']} ({r['ok']:.1%})" for r in rows if r["ok"] < 0.99]
if bad:
    # A proxy relaying errors measures the wrong thing: refuse to print a table of it.
    sys.exit("responses were not 200 for: " + ", ".join(bad) + f" (kept in {work} with KEEP_WORK=1)")
base = next((r for r in rows if r["name"] == "nginx-mtls"), None)
def ratio(value, of):
    return "" if value is None or not of else f" ({value / of:.2f}x)"
def num(value, fmt):
    return "-" if value is None else format(value, fmt)
def spread(name, key, fmt):
    values = [run[key] for run in runs[name] if run[key] is not None]
    return "-" if not values else f"{min(values):{fmt}}-{max(values):{fmt}}"
if base:
    count = len(runs[base["name"]])
    print(f"\n{count} rounds, each path's runs taking turns with the others': p50 and p99 over the"
          f" rounds' requests (the first {WARMUP} s of each run left out), max rps and CPU per"
          " request the median of the rounds" + (f"; max rps @{cpu_limit}m under a CFS quota of"
          f" {cpu_limit} millicores (limits.cpu: {cpu_limit}m)." if base["limited"] else "."))
    print(f"\n| path | p50 @{rate} rps | p99 @{rate} rps | max rps | max rps @{cpu_limit}m | 200s | CPU per request | RSS idle | RSS, 512 mTLS conns |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['p50']:.3f} ms{ratio(r['p50'], base['p50'])} "
              f"| {r['p99']:.3f} ms{ratio(r['p99'], base['p99'])} "
              f"| {r['rps']:.0f}{ratio(r['rps'], base['rps'])} "
              f"| {num(r['limited'], '.0f')}{ratio(r['limited'], base['limited'])} | {r['ok']:.0%} "
              f"| {num(r['cpu'], '.1f')} µs{ratio(r['cpu'], base['cpu'])} "
              f"| {num(r['idle'], '.1f')} MiB | {num(r['held'], '.1f')} MiB |")
    # A path's CPU per request against nginx-mtls's in the same round: a spell that slows the
    # host for a round slows both, so these move less than the values do.
    def paired(name, key="cpu"):
        ratios = [run[key] / of[key] for run, of in zip(runs[name], runs[base["name"]])
                  if run[key] is not None and of[key]]
        if not ratios:
            return "-"
        return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
    print(f"\n| path, lowest-highest of the {count} rounds | p99 @{rate} rps (ms) | max rps | max rps @{cpu_limit}m | CPU per request (µs) | CPU against nginx-mtls's in the same round, median (lowest-highest) | max rps @{cpu_limit}m against nginx-mtls's in the same round |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {spread(r['name'], 'p99', '.3f')} | {spread(r['name'], 'rps', '.0f')} "
              f"| {spread(r['name'], 'limited', '.0f')} "
              f"| {spread(r['name'], 'cpu', '.1f')} | {paired(r['name'])} "
              f"| {paired(r['name'], 'limited')} |")
    # Unlimited, the load core (oha and the upstream) fills first: what it spends a request
    # bounds max rps, and it differs by what each path hands the upstream and the client.
    print("\n| path, unlimited runs (medians of the rounds) | load core busy | load core CPU per request | against nginx-mtls's in the same round | upstream nginx's CPU per request | against nginx-mtls's in the same round |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        name = r["name"]
        busy, load_cpu, up_cpu = (median(name, k) for k in ("load_busy", "load_cpu", "upstream_cpu"))
        print(f"| {name} | {num(busy and busy * 100, '.0f')}% | {num(load_cpu, '.1f')} µs "
              f"| {paired(name, 'load_cpu')} | {num(up_cpu, '.1f')} µs "
              f"| {paired(name, 'upstream_cpu')} |")
fb = {}
for line in open(firstbyte):
    parts = line.split()
    path, measure = parts[0], " ".join(parts[1:-2])
    fb.setdefault(measure, {})[path] = tuple(float(p.split("=")[1]) for p in parts[-2:])
print("\n| first byte (p50 / p99 ms) | direct | nginx-mtls | portcullis | portcullis vs nginx-mtls (p50) |")
print("|---|---|---|---|---|")
for measure, paths in fb.items():
    cell = lambda p: "-" if p not in paths else f"{paths[p][0]:.3f} / {paths[p][1]:.3f}"
    r = "" if "nginx-mtls" not in paths or "portcullis" not in paths else \
        f"{paths['portcullis'][0] / paths['nginx-mtls'][0]:.2f}x"
    print(f"| {measure} | {cell('direct')} | {cell('nginx-mtls')} | {cell('portcullis')} | {r} |")
EOF
echo
limited="no CPU-limited runs"
[ -n "$cgroup_root" ] && limited="CPU-limited runs at ${CPU_LIMIT}m (cgroup v$cgroup_version CFS quota)"
echo "machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(uname -sr); proxy on core $PROXY_CORE, upstream and oha on core $LOAD_CORE; $DURATION a path in $ROUNDS rounds, $CONNECTIONS connections; $limited"
echo "execution profile (crates/portcullis/pgo.profdata) against this tree's sources: $profile_state"
