#!/usr/bin/env python3
"""An interactive SMT-LIB 2 front end over the cvc5 Python bindings (PyPI `cvc5`).

`portcullis analyze` (through cedar-policy-symcc) runs `$CVC5 --lang smt --tlimit=MS` and
talks SMT-LIB over stdin/stdout, one command at a time, waiting for each answer. The PyPI
wheel ships libcvc5 with Python bindings but no executable; this script is that executable.
The Debian package (cvc5 1.0.3) is too old for the SMT-LIB symcc writes (see README).

  --lang smt          accepted (SMT-LIB 2 is the only language here)
  --NAME=VALUE        passed to the solver as an option (e.g. --tlimit=60000)
  --version           prints the library version

Each complete top-level command read from stdin is parsed and run at once and its output
written and flushed, as the cvc5 executable does in interactive mode. `(reset)` starts a
fresh solver with the command-line options. An error is printed as `(error "...")`; a parse
error ends the process, as it does for cvc5.
"""

import sys

import cvc5


def options(argv):
    out = []
    args = iter(argv)
    for arg in args:
        if arg == "--lang":
            next(args, None)
        elif arg.startswith("--lang="):
            pass
        elif arg.startswith("--") and "=" in arg:
            name, value = arg[2:].split("=", 1)
            out.append((name, value))
        elif arg.startswith("--"):
            out.append((arg[2:], "true"))
        else:
            sys.exit(f"cvc5-smt: unexpected argument {arg!r} (commands come on stdin)")
    return out


class Session:
    def __init__(self, opts):
        self.opts = opts
        self.fresh()

    def fresh(self):
        self.solver = cvc5.Solver()
        for name, value in self.opts:
            self.solver.setOption(name, value)
        self.symbols = cvc5.SymbolManager(self.solver)
        self.parser = cvc5.InputParser(self.solver, self.symbols)
        self.parser.setIncrementalStringInput(cvc5.InputLanguage.SMT_LIB_2_6, "stdin")

    def run(self, text):
        """Runs one complete command; returns False when the process should end."""
        head = text.lstrip("( \t\r\n").split(None, 1)[0].rstrip(")") if text.strip("() \t\r\n") else ""
        if head == "reset":
            self.fresh()
            return True
        if head == "exit":
            return False
        try:
            self.parser.appendIncrementalStringInput(text)
            command = self.parser.nextCommand()
        except Exception as error:  # the bindings raise RuntimeError subclasses
            emit(f'(error "Parse Error: {quote(error)}")\n')
            return False
        if command.isNull():
            return True
        try:
            emit(command.invoke(self.solver, self.symbols))
        except Exception as error:
            emit(f'(error "{quote(error)}")\n')
        return True


def quote(error):
    return str(error).replace('"', '""').replace("\n", " ")


def emit(text):
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def commands(stream):
    """Yields each complete top-level S-expression of `stream` as soon as it is read.

    Tracks string literals ("..." with "" as the escape), quoted symbols (|...|) and
    comments (; to the end of the line) so that parentheses inside them do not count.
    """
    depth = 0
    buf = []
    in_string = in_symbol = in_comment = False
    while True:
        line = stream.readline()
        if not line:
            return
        i = 0
        n = len(line)
        while i < n:
            c = line[i]
            if in_comment:
                if c == "\n":
                    in_comment = False
            elif in_string:
                if c == '"':
                    if i + 1 < n and line[i + 1] == '"':
                        buf.append(c)
                        i += 1
                    else:
                        in_string = False
            elif in_symbol:
                if c == "|":
                    in_symbol = False
            elif c == ";":
                in_comment = True
                i += 1
                continue
            elif c == '"':
                in_string = True
            elif c == "|":
                in_symbol = True
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
                if depth == 0:
                    buf.append(c)
                    yield "".join(buf) + "\n"
                    buf = []
                    i += 1
                    continue
            if not in_comment and (depth > 0 or in_string or in_symbol):
                buf.append(c)
            i += 1


def main():
    if "--version" in sys.argv[1:]:
        print(f"cvc5-smt over libcvc5 {cvc5.__version__}")
        return 0
    session = Session(options(sys.argv[1:]))
    for text in commands(sys.stdin):
        if not session.run(text):
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
