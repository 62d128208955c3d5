#!/usr/bin/env python3
"""Where a thread's instructions go, by source line: a callgrind dump taken with
`--dump-instr=yes` (benches/instructions/run.sh with DUMP_INSTR=1 KEEP_WORK=1) of a binary
with line tables (see run.sh's header), each instruction's count put on its source line with
`addr2line -i`.

    lines.py DUMP BINARY REQUESTS [--function SUBSTR] [--top N]

Without --function: the thread's own instructions (calls excluded), each put on the innermost
inlined frame that is this repository's code (what of ours caused it, library code inlined
into it included), largest first. With --function: that function's instructions and the
calls it makes, by its own source line (the outermost frame), with the innermost frames and
the callees that line's count came from.
"""
import argparse
import collections
import re
import subprocess
import sys

parser = argparse.ArgumentParser()
parser.add_argument("dump")
parser.add_argument("binary")
parser.add_argument("requests", type=int)
parser.add_argument("--function")
parser.add_argument("--top", type=int, default=40)
args = parser.parse_args()

# callgrind's name compression: "(id) name" the first time, "(id)" after.
names = {}


def name(token):
    m = re.match(r"\((\d+)\)(?: (.*))?", token)
    if not m:
        return token
    if m.group(2):
        names[m.group(1)] = m.group(2)
    return names[m.group(1)]


def inside(fn):
    return args.function is None or (fn is not None and args.function in fn)


own = collections.Counter()  # address -> instructions there
called = collections.Counter()  # address -> inclusive instructions of the calls made there
callees = collections.defaultdict(collections.Counter)
fn = callee = None
pending_call = False
address = 0
saw_addresses = False
with open(args.dump, errors="replace") as dump:
    for line in dump:
        line = line.rstrip("\n")
        if line.startswith("fn="):
            fn, callee = name(line[3:]), None
            continue
        if line.startswith("cfn="):
            callee = name(line[4:])
            continue
        if line.startswith("calls="):
            pending_call = True
            continue
        if not line or line[0] not in "0123456789+-*":
            continue
        fields = line.split()
        position = fields[0]
        if position.startswith("0x"):
            address, saw_addresses = int(position, 16), True
        elif position[0] in "+-":
            step = position[1:]
            step = int(step, 16) if step.startswith("0x") else int(step)
            address += step if position[0] == "+" else -step
        elif position != "*":
            address = int(position)
        cost = int(fields[-1]) if len(fields) > 1 else 0
        if pending_call:
            pending_call = False
            if args.function and inside(fn):
                called[address] += cost
                callees[address][callee] += cost
        elif inside(fn):
            own[address] += cost
if not saw_addresses:
    sys.exit(f"{args.dump} has no instruction addresses: take it with --dump-instr=yes (DUMP_INSTR=1)")

addresses = sorted(set(own) | set(called))
frames = collections.defaultdict(list)  # address -> [(file:line)], innermost first
current = None
output = subprocess.run(
    ["addr2line", "-a", "-i", "-e", args.binary] + [hex(a) for a in addresses],
    capture_output=True, text=True, check=True).stdout
for line in output.splitlines():
    if line.startswith("0x"):
        current = int(line, 16)
    elif current is not None:
        frames[current].append(re.sub(r" \(discriminator \d+\)", "", line))


def short(location):
    if ours(location):
        return location.split("/crates/", 1)[1]
    return re.sub(r"^.*/(library/|src/|registry/src/[^/]+/)", "", location)


def ours(location):
    return "/crates/" in location and "/registry/" not in location and "/rustc/" not in location


demangled = {}


def readable(symbol):
    """A callee's name demangled (c++filt reads Rust's legacy mangling), hash and path cut."""
    if symbol not in demangled:
        text = subprocess.run(["c++filt"], input=symbol, capture_output=True, text=True).stdout
        text = re.sub(r"::h[0-9a-f]{16}$", "", text.strip() or symbol)
        demangled[symbol] = text if len(text) <= 70 else "..." + text[-67:]
    return demangled[symbol]


per = args.requests
rows = collections.Counter()
also = collections.defaultdict(collections.Counter)
for address in addresses:
    stack = frames.get(address) or ["??:0"]
    if args.function:
        key = short(stack[-1])
        rows[key] += own[address] + called[address]
        also[key][f"inlined {short(stack[0])}"] += own[address]
        for target, cost in callees[address].items():
            also[key][f"calls {readable(target or '?')}"] += cost
    else:
        mine = [frame for frame in stack if ours(frame)]
        key = short(mine[0]) if mine else f"(not ours) {short(stack[-1]).split(':')[0]}"
        rows[key] += own[address]
        also[key][short(stack[0])] += own[address]

total = sum(own.values()) + sum(called.values())
scope = f"in functions matching {args.function!r}, calls included" if args.function else "the thread's own"
print(f"{total / per:,.0f} instructions a request {scope}")


def table(title, keys):
    print(f"\n{title}")
    for key, cost in keys[:args.top]:
        detail = ", ".join(f"{what} {count / per:,.0f}"
                           for what, count in also[key].most_common(3) if count)
        print(f"{cost / per:8,.0f}  {key}\n          {detail}")


ranked = rows.most_common()
if args.function:
    table("by the function's own source line (calls included):", ranked)
else:
    mine = [(k, c) for k, c in ranked if not k.startswith("(not ours)")]
    table(f"this repository's lines, library code inlined into them included "
          f"({sum(c for _, c in mine) / per:,.0f}):", mine)
    table("the rest, by the file of the function it ran in:",
          [(k, c) for k, c in ranked if k.startswith("(not ours)")])
