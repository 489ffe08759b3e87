"""``zeroadamw`` command line: ``zeroadamw <command> [options]``.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``; this file only
dispatches (and imports the module when its command is used, so a missing optional dependency of one command
never breaks another).
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "estimate": ("zeroadamw.estimate", "per-rank memory of params / grads / optimizer state for a model x world size"),
    "doctor": ("zeroadamw.doctor", "check a training config for weight-decay / lr / schedule mistakes"),
    "plot": ("zeroadamw.plot", "draw diagnostics curves from a training log to PNG"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zeroadamw", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    loaded = {}
    argv = sys.argv[1:] if argv is None else argv
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # import only the command being run
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as e:
                parser.error(f"command {name!r} is not available: {e}")
            mod.add_arguments(p)
            loaded[name] = mod
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(loaded[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
