"""``python cli.py <subcommand> --help``: fit | validate | test | predict | tune | export (Lightning, a run YAML),
merge (a mergekit-style checkpoint job YAML, ``--dry-run``), analyze; one parser (``freemerge_pl.lightning.cli``).

``merge`` is dispatched before that parser is built: a checkpoint merge job imports neither Lightning nor the
adapters (``freemerge_pl.jobs.merge_cli``), so it starts in about the time torch takes to import."""

import sys

from freemerge_pl.jobs.program import run_program


def entry(argv: list[str]) -> None:
    if argv[:1] == ["merge"]:
        from freemerge_pl.jobs.merge_cli import main as merge_main

        merge_main(argv[1:])
    else:
        from freemerge_pl.lightning.cli import main

        main(argv)


if __name__ == "__main__":
    sys.exit(run_program(sys.argv[1:], entry))
