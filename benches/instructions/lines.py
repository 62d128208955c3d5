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
import collections
import re
import subprocess

import callgrind

args = callgrind.arguments("--function")


def inside(fn):
    return args.function is None or (fn is not None and args.function in fn)


own = collections.Counter()  # address -> instructions there
called = collections.Counter()  # address -> inclusive instructions of the calls made there
callees = collections.defaultdict(collections.Counter)
for fn, address, cost, calls, callee in callgrind.costs(args.dump):
    if calls is not None:
        if args.function and inside(fn):
            called[address] += cost
            callees[address][callee] += cost
    elif inside(fn):
        own[address] += cost

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
            also[key][f"calls {callgrind.readable(target, 70)}"] += cost
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
