"""``python -m freemerge_pl.zoo.vision`` / ``python -m freemerge_pl.zoo.text`` (or ``python -m freemerge_pl.zoo
--zoo vision|text``): build (or reuse, after checking every file against the manifest) a zoo and print its
summary; ``--rebuild`` builds it again even when it is current. Ctrl-C stops the build with one line (exit
130); the stages it finished are kept and the same command resumes from them."""

from __future__ import annotations

import argparse
import sys

from freemerge_pl.errors import FreeMergeError
from freemerge_pl.io import staging_dir
from freemerge_pl.progress import setup_logging
from freemerge_pl.zoo.cache import ensure, read_manifest
from freemerge_pl.zoo.spec import ZooSpec


def parser(spec: ZooSpec, prog: str | None = None) -> argparse.ArgumentParser:
    description = (f"Build the {spec.name} (or reuse it, after checking every file against its manifest) and print "
                   f"its summary. Ctrl-C stops a build with one line (exit 130); the stages it finished are kept "
                   f"and the same command resumes from them.")
    p = argparse.ArgumentParser(prog=prog or f"python -m {spec.module}", description=description)
    p.add_argument("--size", default="default", choices=sorted(spec.sizes), help="the recipe's size (default: default)")
    p.add_argument("--root", default=None, help=f"{spec.name} directory (default: ${spec.root_env}/<size>-seed<seed> "
                                                f"or ~/.cache/freemerge_pl/{spec.cache_dir}/<size>-seed<seed>)")
    p.add_argument("--seed", type=int, default=0, help="the build's seed (default: 0)")
    p.add_argument("--rebuild", action="store_true", help=f"build the {spec.name} again even if it is current "
                                                          f"(e.g. after a file was reported damaged)")
    return p


def run(spec: ZooSpec, args: argparse.Namespace) -> int:
    """Build or check the zoo of ``args``; print its root and summary. Returns the exit status."""
    setup_logging()  # the build's progress lines (the spec's logger, INFO) to stderr
    try:
        root = ensure(spec, args.root, args.size, args.seed, rebuild=args.rebuild)
    except KeyboardInterrupt:
        where = staging_dir(spec.resolve_root(args.root, args.size, args.seed))
        print(f"interrupted: the {spec.name} build's finished stages are kept in {where}; run the same command "
              f"again to resume", file=sys.stderr)
        return 130
    except FreeMergeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(root)
    print(spec.summary(read_manifest(root, spec)))
    return 0


def main(spec: ZooSpec, argv: list[str] | None = None) -> int:
    return run(spec, parser(spec).parse_args(argv))


__all__ = ["main", "parser", "run"]
