"""Cost of choosing FR/FREE hyperparameters on the router split, relative to one merge + evaluation.

    python benchmarks/tune_cost.py [--size default|tiny] [--method free_merging]

Measured in one run on the offline zoo: the wall time of a 20-candidate search (4 filter ratios × 5
scalings) with ``FreeMergeTrainer.tune`` divided by the time of one merge + router fit + tune-val
test-split evaluation of the paper defaults (goal ≤ 5), and the test accuracy of the chosen candidate minus the
paper defaults' (both with the router trained on the same router-train half). Writes
``benchmarks/results/tune_cost.{json,md}``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lightning.pytorch import Trainer

from freemerge_pl.io import write_json_atomic, write_text_atomic
from freemerge_pl.lightning.cli import FreeMergeTrainer

RESULTS = Path(__file__).resolve().parent / "results"
SPACE = {"filter_ratio": [0.1, 0.3, 0.5, 0.6], "scaling": [1.0, 1.5, 2.0, 2.5, 3.0]}


def trainer(cls=Trainer):
    return cls(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False)


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from zoo_table import build

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="default")
    parser.add_argument("--method", default="free_merging")
    args = parser.parse_args()

    def fresh(method_args=None):
        module, dm = build(args.size, args.method, method_args)
        dm.tune_fraction = 0.5
        dm._train.clear()
        dm.setup()
        module.reset_router()
        return module, dm

    # one merge + router fit + evaluation (the test split) of the defaults
    start = time.perf_counter()
    module, dm = fresh()
    module.fit_router(dm.router_dataset())
    trainer().test(module, datamodule=dm, verbose=False)
    single = time.perf_counter() - start
    default_test = module.test_results["avg"]["accuracy"]
    trainer().validate(module, datamodule=dm, verbose=False)
    default_val = module.val_results["avg"]["accuracy"]

    module, dm = fresh()
    module.model = None  # tune builds it itself
    start = time.perf_counter()
    report = trainer(FreeMergeTrainer).tune(module, dm, SPACE, output_dir=str(RESULTS / "tune_cost_run"))
    search = time.perf_counter() - start
    best = report["best"]["params"]
    tuned, dm2 = fresh(best)
    tuned.fit_router(dm2.router_dataset())
    trainer().test(tuned, datamodule=dm2, verbose=False)
    tuned_test = tuned.test_results["avg"]["accuracy"]
    out = {"size": args.size, "method": args.method, "space": SPACE, "candidates": len(report["candidates"]),
           "search_seconds": search, "single_seconds": single, "ratio": search / single,
           "best": best, "default_tune_val": default_val, "best_tune_val": report["best"]["score"],
           "default_test": default_test, "tuned_test": tuned_test, "gain_test": tuned_test - default_test,
           "tune_samples": sum(report["tune_samples"].values())}
    md = (f"`{args.method}` on the {args.size} zoo: {out['candidates']} candidates in {search:.1f}s; one merge + "
          f"evaluation {single:.1f}s → ratio **{out['ratio']:.2f}** (goal ≤ 5).\n\n"
          f"Chosen {best} on {out['tune_samples']} tune-val samples: tune-val {100 * out['best_tune_val']:.1f}% "
          f"(defaults {100 * default_val:.1f}%); test {100 * tuned_test:.1f}% vs defaults "
          f"{100 * default_test:.1f}% ({100 * out['gain_test']:+.1f} points).\n")
    write_json_atomic(out, RESULTS / f"tune_cost{'' if args.size == 'default' else '_' + args.size}.json")
    write_text_atomic(md, RESULTS / f"tune_cost{'' if args.size == 'default' else '_' + args.size}.md")
    print(md)


if __name__ == "__main__":
    main()
