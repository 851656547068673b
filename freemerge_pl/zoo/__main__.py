"""``python -m freemerge_pl.zoo --size tiny --root DIR``: build (or reuse) a zoo and print its summary."""

from __future__ import annotations

import argparse
import logging

from freemerge_pl.zoo.build import ensure_zoo, read_manifest
from freemerge_pl.zoo.recipe import SIZES


def summary(manifest: dict) -> str:
    head = (f"zoo {manifest['size']} seed {manifest['seed']}  recipe {manifest['recipe_hash'][:12]}  "
            f"built in {manifest['build']['seconds']:.1f} s on {manifest['build']['threads']} threads")
    lines = [head,
             f"backbone {manifest['backbone']['class']} {manifest['backbone']['config']}",
             f"{'task':<12} {'classes':>7} {'train':>6} {'test':>5} {'probe':>7} {'finetuned':>9}"]
    for t in manifest["tasks"]:
        lines.append(f"{t['name']:<12} {t['num_classes']:>7} {t['n_train']:>6} {t['n_test']:>5} "
                     f"{100 * t['pretrained_probe_acc']:>6.1f}% {100 * t['individual_test_acc']:>8.1f}%")
    n = len(manifest["tasks"])
    lines.append(f"{'average':<12} {'':>7} {'':>6} {'':>5} "
                 f"{100 * sum(t['pretrained_probe_acc'] for t in manifest['tasks']) / n:>6.1f}% "
                 f"{100 * sum(t['individual_test_acc'] for t in manifest['tasks']) / n:>8.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m freemerge_pl.zoo", description=__doc__)
    p.add_argument("--size", default="default", choices=sorted(SIZES))
    p.add_argument("--root", default=None, help="zoo directory (default: $FREEMERGE_ZOO_ROOT/<size>-seed<seed> "
                                                "or ~/.cache/freemerge_pl/zoo/<size>-seed<seed>)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = ensure_zoo(args.root, args.size, args.seed)
    print(root)
    print(summary(read_manifest(root)))


if __name__ == "__main__":
    main()
