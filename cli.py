"""``python cli.py fit|validate|test|tune|merge --config configs/....yaml`` (``--help`` lists them)."""

import sys

from freemerge_pl.lightning.cli import cli_main

if __name__ == "__main__":
    sys.exit(cli_main())
