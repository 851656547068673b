"""``python -m freemerge_pl.zoo.vision --size tiny --root DIR [--rebuild]``: build (or reuse, after checking every
file against the manifest) a zoo and print its summary (``freemerge_pl.zoo.cli``)."""

from __future__ import annotations

from freemerge_pl.zoo import cli
from freemerge_pl.zoo.vision.build import VISION_ZOO, summary


def main(argv: list[str] | None = None) -> int:
    return cli.main(VISION_ZOO, argv)


__all__ = ["main", "summary"]

if __name__ == "__main__":
    raise SystemExit(main())
