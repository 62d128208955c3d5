"""Reading a callgrind dump taken with `--dump-instr=yes` (benches/instructions/run.sh with
DUMP_INSTR=1 KEEP_WORK=1), for lines.py and sites.py."""
import argparse
import re
import signal
import subprocess
import sys


def costs(path):
    """Yields (function, address, cost, calls, callee) for each cost line of the dump: the
    function it is in, the instruction's address and its count; for a call's line, the calls
    made there and the function called (its cost is the calls' inclusive cost), else None."""
    names = {}  # callgrind's name compression: "(id) name" the first time, "(id)" after.

    def name(token):
        m = re.match(r"\((\d+)\)(?: (.*))?", token)
        if not m:
            return token
        if m.group(2):
            names[m.group(1)] = m.group(2)
        return names[m.group(1)]

    function = callee = calls = None
    address = 0
    saw_addresses = False
    with open(path, errors="replace") as dump:
        for line in dump:
            line = line.rstrip("\n")
            if line.startswith("fn="):
                function = name(line[3:])
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
                address, saw_addresses = int(position, 16), True
            elif position[0] in "+-":
                step = position[1:]
                step = int(step, 16) if step.startswith("0x") else int(step)
                address += step if position[0] == "+" else -step
            elif position != "*":
                address = int(position)
            cost = int(fields[-1]) if len(fields) > 1 else 0
            yield function, address, cost, calls, callee if calls is not None else None
            calls = None
    if not saw_addresses:
        sys.exit(f"{path} has no instruction addresses: take it with --dump-instr=yes (DUMP_INSTR=1)")


_demangled = {}


def readable(symbol, width):
    """A symbol demangled (c++filt reads Rust's legacy mangling), its hash cut, and shortened
    from the front to `width` characters."""
    if symbol not in _demangled:
        text = subprocess.run(["c++filt"], input=symbol or "?", capture_output=True,
                              text=True).stdout.strip()
        _demangled[symbol] = re.sub(r"::h[0-9a-f]{16}$", "", text or symbol or "?")
    text = _demangled[symbol]
    return text if len(text) <= width else "..." + text[-(width - 3):]


def arguments(option):
    """The scripts' arguments: the dump, the binary it counted, the requests it served, how many
    rows to print, and the script's own `option` (a name to narrow what is shown to)."""
    # Piped into `head`, a script ends quietly when the reader stops reading.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    parser = argparse.ArgumentParser()
    parser.add_argument("dump")
    parser.add_argument("binary")
    parser.add_argument("requests", type=int)
    parser.add_argument(option)
    parser.add_argument("--top", type=int, default=40)
    return parser.parse_args()
