#!/usr/bin/env python3
"""A thread's instructions by function, or the calls made to one, from a callgrind dump taken
with `--dump-instr=yes` (benches/instructions/run.sh with DUMP_INSTR=1 KEEP_WORK=1) of the
binary as built: no line tables needed, so it reads the PGO build that was measured.

    sites.py DUMP BINARY REQUESTS [--callee REGEX] [--top N]

Without --callee: every function's own instructions a request (calls excluded), largest
first, as `callgrind_annotate` would list them (it lists only the total for dumps with
instruction addresses). With --callee: each call site of the functions matching REGEX (say
`memcpy`), by the instructions spent in the callee from there: calls a request, the calling
function, and the size when the call's third argument is a constant (`mov $N,%edx` before
it, as for a move of a value of known size).
"""
import collections
import re
import subprocess

import callgrind

args = callgrind.arguments("--callee")

own = collections.Counter()  # function -> its own instructions
site_cost = collections.Counter()  # call site address -> instructions in the callee
site_calls = collections.Counter()  # call site address -> calls
site_caller = {}
for fn, address, cost, calls, callee in callgrind.costs(args.dump):
    if calls is None:
        own[fn] += cost
    elif args.callee and re.search(args.callee, callee or ""):
        site_cost[address] += cost
        site_calls[address] += calls
        site_caller[address] = fn


def constant_size(address):
    """The constant in %edx/%rdx set in the 96 bytes before the call at `address`, if any."""
    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", f"--start-address={address - 96:#x}",
         f"--stop-address={address:#x}", args.binary],
        capture_output=True, text=True, check=True).stdout
    sizes = re.findall(r"mov\s+\$0x([0-9a-f]+),%[re]dx", listing)
    return int(sizes[-1], 16) if sizes else None


per = args.requests
if args.callee:
    total = sum(site_cost.values())
    print(f"{total / per:,.0f} instructions a request in calls to {args.callee!r}, "
          f"{sum(site_calls.values()) / per:,.1f} calls, by call site:")
    for address, cost in site_cost.most_common(args.top):
        size = constant_size(address)
        size = f"{size:>6} B" if size is not None else "       -"
        print(f"{cost / per:8,.0f} {site_calls[address] / per:6.2f}x {size}  {address:#x}  "
              f"{callgrind.readable(site_caller[address], 100)}")
else:
    print(f"{sum(own.values()) / per:,.0f} instructions a request, the thread's own, by function:")
    for function, cost in own.most_common(args.top):
        print(f"{cost / per:8,.0f}  {callgrind.readable(function, 100)}")
