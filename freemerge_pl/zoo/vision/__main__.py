"""``python -m freemerge_pl.zoo.vision --size tiny --root DIR [--rebuild]``: build (or reuse, after checking every file
against the manifest) a zoo and print its summary; ``--rebuild`` builds it again even when it is current."""

from __future__ import annotations

import argparse

from freemerge_pl.progress import setup_logging
from freemerge_pl.zoo.vision.build import ensure_zoo, read_manifest
from freemerge_pl.zoo.vision.recipe import SIZES


def summary(manifest: dict) -> str:
    env = manifest["recipe"]["environment"]
    head = (f"zoo {manifest['size']} seed {manifest['seed']}  recipe {manifest['recipe_hash'][:12]}  "
            f"built in {manifest['build']['seconds']:.1f} s on {env['threads']} threads "
            f"(torch {env['torch']}, {env['cpu_capability']})")
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
    p = argparse.ArgumentParser(prog="python -m freemerge_pl.zoo.vision", description=__doc__)
    p.add_argument("--size", default="default", choices=sorted(SIZES))
    p.add_argument("--root", default=None, help="zoo directory (default: $FREEMERGE_ZOO_ROOT/<size>-seed<seed> "
                                                "or ~/.cache/freemerge_pl/zoo/<size>-seed<seed>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rebuild", action="store_true", help="build the zoo again even if it is current (e.g. after "
                                                          "a file was reported damaged)")
    args = p.parse_args(argv)
    setup_logging()  # the build's progress lines (freemerge_pl.zoo.vision, INFO) to stderr
    root = ensure_zoo(args.root, args.size, args.seed, rebuild=args.rebuild)
    print(root)
    print(summary(read_manifest(root)))


if __name__ == "__main__":
    main()
