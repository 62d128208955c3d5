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
import argparse
import collections
import re
import subprocess

parser = argparse.ArgumentParser()
parser.add_argument("dump")
parser.add_argument("binary")
parser.add_argument("requests", type=int)
parser.add_argument("--callee")
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


own = collections.Counter()  # function -> its own instructions
site_cost = collections.Counter()  # call site address -> instructions in the callee
site_calls = collections.Counter()  # call site address -> calls
site_caller = {}
fn = callee = None
calls = None
address = 0
with open(args.dump, errors="replace") as dump:
    for line in dump:
        line = line.rstrip("\n")
        if line.startswith("fn="):
            fn = name(line[3:])
            continue
        if line.startswith("cfn="):
            callee = name(line[4:])
            continue
        if line.startswith("calls="):
            calls = int(line[6:].split()[0])
            continue
        if not line or line[0] not in "0123456789+-*":
            continue
        fields = line.split()
        position = fields[0]
        if position.startswith("0x"):
            address = int(position, 16)
        elif position[0] in "+-":
            step = position[1:]
            step = int(step, 16) if step.startswith("0x") else int(step)
            address += step if position[0] == "+" else -step
        elif position != "*":
            address = int(position)
        cost = int(fields[-1]) if len(fields) > 1 else 0
        if calls is not None:
            if args.callee and re.search(args.callee, callee or ""):
                site_cost[address] += cost
                site_calls[address] += calls
                site_caller[address] = fn
            calls = None
        else:
            own[fn] += cost

demangled = {}


def readable(symbol):
    """Demangled (c++filt reads Rust's legacy mangling), hash cut, long names shortened."""
    if symbol not in demangled:
        text = subprocess.run(["c++filt"], input=symbol or "?", capture_output=True,
                              text=True).stdout.strip()
        text = re.sub(r"::h[0-9a-f]{16}$", "", text or symbol or "?")
        demangled[symbol] = text if len(text) <= 100 else "..." + text[-97:]
    return demangled[symbol]


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
              f"{readable(site_caller[address])}")
else:
    print(f"{sum(own.values()) / per:,.0f} instructions a request, the thread's own, by function:")
    for function, cost in own.most_common(args.top):
        print(f"{cost / per:8,.0f}  {readable(function)}")
