"""``python -m freemerge_pl.zoo --zoo vision|text [--size S] [--root DIR] [--seed N] [--rebuild]``: build (or
reuse, after checking every file against its manifest) the vision zoo or the text zoo (``freemerge_pl.zoo.cli``;
the same as ``python -m freemerge_pl.zoo.vision`` / ``python -m freemerge_pl.zoo.text``)."""

from __future__ import annotations

import argparse
import importlib

from freemerge_pl.zoo import cli

ZOOS = ("vision", "text")


def main(argv: list[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--zoo", choices=ZOOS, default="vision")
    known, _ = pre.parse_known_args(argv)
    spec = importlib.import_module(f"freemerge_pl.zoo.{known.zoo}").SPEC
    p = cli.parser(spec, prog="python -m freemerge_pl.zoo")
    p.add_argument("--zoo", choices=ZOOS, default="vision", help="which zoo (default: vision)")
    return cli.run(spec, p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
