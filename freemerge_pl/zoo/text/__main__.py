"""``python -m freemerge_pl.zoo.text --size tiny --root DIR [--rebuild]``: build (or reuse, after checking every
file against the manifest) a text zoo and print its summary; ``--rebuild`` builds it again even when current."""

from __future__ import annotations

import argparse
import logging

from freemerge_pl.zoo.text.build import ensure_text_zoo, verify_text_zoo
from freemerge_pl.zoo.text.recipe import SIZES


def summary(manifest: dict) -> str:
    env = manifest["recipe"]["environment"]
    lines = [(f"text zoo {manifest['size']} seed {manifest['seed']}  recipe {manifest['recipe_hash'][:12]}  "
             f"built in {manifest['build']['seconds']:.1f} s on {env['threads']} threads (torch {env['torch']}, "
             f"{env['cpu_capability']})"),
             f"encoder {manifest['encoder']['kind']}",
             f"{'task':<17} {'classes':>7} {'train':>6} {'router':>6} {'test':>5} {'finetuned':>9}"]
    for t in manifest["tasks"]:
        lines.append(f"{t['name']:<17} {t['num_classes']:>7} {t['n_train']:>6} {t['n_router']:>6} {t['n_test']:>5} "
                     f"{100 * t['individual_test_acc']:>8.1f}%")
    n = len(manifest["tasks"])
    lines.append(f"{'average':<17} {'':>7} {'':>6} {'':>6} {'':>5} "
                 f"{100 * sum(t['individual_test_acc'] for t in manifest['tasks']) / n:>8.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m freemerge_pl.zoo.text", description=__doc__)
    p.add_argument("--size", default="default", choices=sorted(SIZES))
    p.add_argument("--root", default=None, help="text zoo directory (default: $FREEMERGE_TEXT_ZOO_ROOT/<size>-seed"
                                                "<seed> or ~/.cache/freemerge_pl/textzoo/<size>-seed<seed>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rebuild", action="store_true", help="build it again even if it is current")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    root = ensure_text_zoo(args.root, args.size, args.seed, rebuild=args.rebuild)
    print(root)
    print(summary(verify_text_zoo(root, names=[])))


if __name__ == "__main__":
    main()
