"""``zeroadamw`` command line: ``zeroadamw <command> [options]``.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``; this file only
dispatches (and imports the module when its command is used, so a missing optional dependency of one command
never breaks another). Help texts may be written in reStructuredText (module docstrings are); ``--help`` prints them
as plain text (:func:`plain_text`). Output into a closed pipe (``zeroadamw doctor F | head``) ends the command
quietly with exit status 141, as for a process killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

COMMANDS = {
    "estimate": ("zeroadamw.estimate", "per-rank memory of params / grads / optimizer state for a model x world size"),
    "doctor": ("zeroadamw.doctor", "check a training config for weight-decay / lr / schedule mistakes"),
    "plot": ("zeroadamw.plot", "draw diagnostics curves from a training log to PNG"),
}

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for `yes | head`

_RST = [
    (re.compile(r"^[ \t]*\.\.[ \t]+[\w:-]+::.*\n?", re.M), ""),  # directives (.. code-block:: python)
    (re.compile(r"^[ \t]*::[ \t]*\n?", re.M), ""),  # a bare literal-block marker line
    (re.compile(r"[ \t]+::[ \t]*$", re.M), ""),  # "text ::" -> "text"
    (re.compile(r"::[ \t]*$", re.M), ":"),  # "text::" -> "text:"
    # :role:`~pkg.mod.Name` -> Name, :role:`Title <target>` -> Title, :role:`text` -> text
    (re.compile(r":(?:[\w.+-]+:)+`~(?:[^`<>]*\.)?([^`.<>]+)`"), r"\1"),
    (re.compile(r":(?:[\w.+-]+:)+`([^`<]*?)\s*<[^`>]*>`"), r"\1"),
    (re.compile(r":(?:[\w.+-]+:)+`([^`]*)`"), r"\1"),
    (re.compile(r"``(.+?)``", re.S), r"\1"),  # inline literals
    (re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?"), r"\1"),  # `text <url>`_
    (re.compile(r"`([^`]+)`__?"), r"\1"),  # `reference`_
    (re.compile(r"(?<![\w`])`([^`\s](?:[^`]*[^`\s])?)`(?![\w`])"), r"\1"),  # `default role`
    (re.compile(r"\*\*([^*\s](?:[^*]*[^*\s])?)\*\*"), r"\1"),  # **strong**
    (re.compile(r"(?<![\w*\\])\*([^*\s](?:[^*]*[^*\s])?)\*(?![\w*])"), r"\1"),  # *emphasis*
]


def plain_text(text: str | None) -> str | None:
    """Strip reStructuredText inline markup and directives from a help text: ``x`` / `x` / **x** / *x* -> x,
    :func:`name` -> name, :class:`~a.b.C` -> C, `text <url>`_ -> text, trailing ``::`` -> ``:``."""
    if not text:
        return text
    for pattern, repl in _RST:
        text = pattern.sub(repl, text)
    return text


def _plain_help(parser: argparse.ArgumentParser) -> None:
    """Make every text ``parser --help`` prints plain (description, epilog, argument and sub-command help)."""
    parser.description = plain_text(parser.description)
    parser.epilog = plain_text(parser.epilog)
    for action in parser._actions:  # argparse keeps no public list of them
        if isinstance(action.help, str) and action.help != argparse.SUPPRESS:
            action.help = plain_text(action.help)
        for choice in getattr(action, "_choices_actions", ()):  # the sub-command list of `zeroadamw --help`
            if isinstance(choice.help, str):
                choice.help = plain_text(choice.help)


def _dispatch(argv: list[str] | None) -> int:
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
        _plain_help(p)
    _plain_help(parser)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(loaded[args.command].run(args) or 0)


def main(argv: list[str] | None = None) -> int:
    """``zeroadamw`` (the console script): returns the command's exit status."""
    try:
        try:
            rc = _dispatch(argv)
        except SystemExit:  # --help, a usage error: what argparse printed may still sit in the buffer
            sys.stdout.flush()
            raise
        sys.stdout.flush()  # a closed pipe shows up here, inside the handler, not at interpreter exit
        return rc
    except BrokenPipeError:
        # The reader went away (`| head`). Python's recipe ("Note on SIGPIPE", signal module docs): point stdout at
        # devnull so the interpreter's final flush of the unwritten rest does not raise again, and exit non-zero.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (AttributeError, OSError, ValueError):  # stdout is not a real file (e.g. captured): nothing to do
            pass
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
