"""Cost of a routed tune against the same tune with ``routing: oracle`` (issue 28 item 2; goal ≤ 1.5).

    python benchmarks/tune_cost.py [--zoo vision|text] [--size default] [--method free_merging]
                                   [--router '{"feature_source": "backbone"}'] [--space '{"scaling": [1, 2]}']

One run each, back to back, on the same zoo, data and search space (default: the method's ``DEFAULT_SPACES``):
``FreeMergeTrainer.tune`` with ``model.routing: oracle`` (the true task picks the expert: no router at all),
then with ``routing: router`` and the configured router (default: the product default). A router whose
features do not depend on the candidate is trained once and each tune-val batch is routed once
(``RoutedModel.cache_routes``); one that reads the merged backbone is retrained per candidate. Prints and
writes ``benchmarks/results/tune_cost{_<zoo>}.{json,md}`` with the ratio and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_table import build

from freemerge_pl.io import write_json_atomic, write_text_atomic
from freemerge_pl.lightning.cli import DEFAULT_SPACES, FreeMergeTrainer

RESULTS = Path(__file__).resolve().parent / "results"


def timed_tune(zoo: str, size: str, method: str, model: dict, out: Path, space: dict) -> tuple[float, dict]:
    module, dm = build(size, method, model=model, zoo=zoo)
    dm.tune_fraction = 0.5
    dm._train.clear()
    dm.setup()
    module.model = None  # tune builds it itself
    trainer = FreeMergeTrainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                               enable_model_summary=False, enable_checkpointing=False)
    start = time.perf_counter()
    report = trainer.tune(module, dm, space, output_dir=str(out))
    return time.perf_counter() - start, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", choices=("vision", "text"), default="vision")
    parser.add_argument("--size", default="default")
    parser.add_argument("--method", default="free_merging")
    parser.add_argument("--router", default="{}", help="model.router settings of the routed tune (JSON)")
    parser.add_argument("--space", default=None, help="the search space (JSON; default: DEFAULT_SPACES[method])")
    args = parser.parse_args()
    router = json.loads(args.router)
    space = json.loads(args.space) if args.space else DEFAULT_SPACES[args.method]
    load_before = os.getloadavg()
    runs = {}
    for name, model in (("oracle", {"routing": "oracle"}),
                        ("router", {"routing": "router", **({"router": router} if router else {})})):
        seconds, report = timed_tune(args.zoo, args.size, args.method, model, RESULTS / "tune_cost_run" / name,
                                     space)
        merging = sum(c["merge_seconds"] for c in report["candidates"])
        scoring = sum(c["seconds"] - c["merge_seconds"] for c in report["candidates"])
        runs[name] = {"seconds": seconds, "best": report["best"]["params"], "best_score": report["best"]["score"],
                      "candidates": len(report["candidates"]), "merge_seconds": merging,
                      "score_seconds": scoring, "other_seconds": seconds - merging - scoring,
                      "score_seconds_per_candidate": [c["seconds"] - c["merge_seconds"] for c in report["candidates"]]}
        print(f"{name}: {seconds:.1f}s (merges {merging:.1f}s, scoring {scoring:.1f}s, the rest "
              f"{seconds - merging - scoring:.1f}s), best {runs[name]['best']} → {runs[name]['best_score']:.4f}",
              flush=True)
    load_after = os.getloadavg()
    ratio = runs["router"]["seconds"] / runs["oracle"]["seconds"]
    out = {"zoo": args.zoo, "size": args.size, "method": args.method, "router": router or "product default",
           "space": space, "runs": runs, "ratio": ratio, "torch_threads": torch.get_num_threads(),
           "load_average_before": load_before, "load_average_after": load_after}
    md = (f"`{args.method}` on the {args.zoo} zoo ({args.size}), {runs['oracle']['candidates']} candidates "
          f"({'`DEFAULT_SPACES`' if space == DEFAULT_SPACES[args.method] else space}), one run each: routed tune {runs['router']['seconds']:.1f}s / oracle tune "
          f"{runs['oracle']['seconds']:.1f}s = **{ratio:.2f}** (goal ≤ 1.5); router "
          f"{router or 'product default'}; load average (1/5/15 min) before "
          f"{' '.join(f'{v:.2f}' for v in load_before)}, after {' '.join(f'{v:.2f}' for v in load_after)} "
          f"({os.cpu_count()} cores, {torch.get_num_threads()} torch threads). Time split (merges / scoring "
          f"tune-val / the rest: building, router training): routed {runs['router']['merge_seconds']:.0f} / "
          f"{runs['router']['score_seconds']:.0f} / {runs['router']['other_seconds']:.0f}s, oracle "
          f"{runs['oracle']['merge_seconds']:.0f} / {runs['oracle']['score_seconds']:.0f} / "
          f"{runs['oracle']['other_seconds']:.0f}s.\n\nChosen: routed {runs['router']['best']} "
          f"({100 * runs['router']['best_score']:.1f}% tune-val), oracle {runs['oracle']['best']} ({100 * runs['oracle']['best_score']:.1f}%).\n")
    suffix = "" if args.zoo == "vision" else "_text"
    write_json_atomic(out, RESULTS / f"tune_cost{suffix}.json")
    write_text_atomic(md, RESULTS / f"tune_cost{suffix}.md")
    print(md)


if __name__ == "__main__":
    main()
