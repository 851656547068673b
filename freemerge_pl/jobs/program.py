"""The program around ``cli.py``'s subcommands, without Lightning: the program options (``--debug``,
``--threads N``, anywhere on the line), logging, a package error as one line with exit status 2, Ctrl-C as
one line with exit status 130, and help text without reST markup.

``cli.py`` dispatches ``merge`` here (``freemerge_pl.jobs.merge_cli.main``) before anything imports Lightning,
torchmetrics, transformers or the adapters: a checkpoint merge job needs none of them, and they cost seconds
of start-up. Every other subcommand goes through the one Lightning parser (``freemerge_pl.lightning.cli``),
which runs the same program (``run_program``) and tidies its help the same way (``tidy_help``).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from freemerge_pl.errors import ConfigError, FreeMergeError, one_line
from freemerge_pl.progress import apply_threads, setup_logging, silence_known_noise

_ROLE = re.compile(r":(?:class|func|meth|attr|mod|obj|paramref|data|exc):`(~?)([^`]+)`")


def program_options(argv: list[str]) -> tuple[list[str], bool, int | None]:
    """``argv`` without the program options ``--debug`` and ``--threads N`` (anywhere), and their values."""
    rest: list[str] = []
    debug, threads = False, None
    it = iter(range(len(argv)))
    for i in it:
        a = argv[i]
        if a == "--debug":
            debug = True
        elif a == "--threads" or a.startswith("--threads="):
            raw = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            if "=" not in a:
                next(it, None)
            try:
                threads = int(raw)
            except ValueError:
                raise ConfigError(f"--threads {raw!r}: accepted: a whole number ≥ 1") from None
        else:
            rest.append(a)
    return rest, debug, threads


def run_program(argv: list[str], entry: Callable[[list[str]], Any]) -> int:
    """Logging, thread count, then ``entry(argv)`` (program options removed); a package error prints one line
    naming the setting, file or key at fault and returns 2 (``--debug`` / ``FREEMERGE_DEBUG=1``: with
    traceback); Ctrl-C prints one line and returns 130 (the shell's status for SIGINT)."""
    debug = os.environ.get("FREEMERGE_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
    setup_logging()
    silence_known_noise()
    try:
        argv, debug_flag, threads = program_options(list(argv))
        debug = debug or debug_flag
        apply_threads(threads)
        entry(argv)
    except FreeMergeError as err:
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (--debug shows the traceback)"
        print(f"error: {one_line(err)}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _restore_sigint()
        print("interrupted (Ctrl-C); a merge job resumes when rerun", file=sys.stderr)
        return 130
    return 0


def _restore_sigint() -> None:
    """Lightning ignores SIGINT while it shuts down; a Python caller gets Ctrl-C back."""
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:  # not the main thread
        pass


# ---------------------------------------------------------------------------------------------- help text


def plain_text(text: str) -> str:
    """Help text without reST markup: roles (``:class:`x``` → x), literals (````x```` → x), one line."""
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    return " ".join(text.replace("``", "").split())


def first_sentence(text: str) -> str:
    """The first sentence of a docstring (its first paragraph up to the first '. '), without markup."""
    paragraph = plain_text((text or "").strip().split("\n\n")[0])
    match = re.search(r"\.(\s|$)", paragraph)
    return paragraph[:match.start()] if match else paragraph


def tidy_help(parser: argparse.ArgumentParser, docs: Mapping[str, str | None],
              titles: Mapping[str, str] | None = None) -> None:
    """Readable ``--help``: a group's title is ``titles[key]``, else the first sentence of its docstring
    (``docs``: group key → docstring; jsonargparse would cut the docstring's first line), and descriptions
    carry no reST markup."""
    titles = titles or {}
    for key, group in getattr(parser, "groups", {}).items():
        if key in titles:
            group.title = titles[key]
        elif docs.get(key):
            group.title = first_sentence(docs[key])
    parser.description = plain_text(parser.description) if parser.description else parser.description
    subcommands = getattr(parser, "_subcommands_action", None)
    for choice in getattr(subcommands, "_choices_actions", []):
        choice.help = plain_text(choice.help or "")
    for action in parser._actions:
        if isinstance(action.help, str) and action.help != argparse.SUPPRESS:
            action.help = plain_text(action.help)
