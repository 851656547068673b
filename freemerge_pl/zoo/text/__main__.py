"""``python -m freemerge_pl.zoo.text --size tiny --root DIR [--rebuild]``: build (or reuse, after checking every
file against the manifest) a text zoo and print its summary (``freemerge_pl.zoo.cli``)."""

from __future__ import annotations

from freemerge_pl.zoo import cli
from freemerge_pl.zoo.text.build import TEXT_ZOO, summary


def main(argv: list[str] | None = None) -> int:
    return cli.main(TEXT_ZOO, argv)


__all__ = ["main", "summary"]

if __name__ == "__main__":
    raise SystemExit(main())
