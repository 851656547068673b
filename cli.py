"""``python cli.py <subcommand> --help``: fit | validate | test | predict | tune | export (Lightning, a run YAML),
merge (a mergekit-style checkpoint job YAML, ``--dry-run``), analyze; one parser (``freemerge_pl.lightning.cli``)."""

import sys

from freemerge_pl.lightning.cli import cli_main

if __name__ == "__main__":
    sys.exit(cli_main())
