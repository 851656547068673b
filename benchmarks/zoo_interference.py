"""Table 1 analogue on the offline zoo: the mean variance of frequency-domain amplitude across tasks (semantics
§10) of the task vectors and after each method's transform, the energy below each FR cutoff, and — beside it —
the FR filter-ratio sweep, to see whether the metric predicts which ratio works best.

    python benchmarks/zoo_interference.py [--zoo vision|text] [--size default|tiny] [--skip-accuracy]
                                          [--remeasure]

Writes ``benchmarks/results/zoo_interference{,_text}{,_tiny}.{md,json,png}`` (the png: energy / metric vs
cutoff) and ``zoo_spectra{,_text}{,_tiny}.png`` (Fig. 2a analogue). Accuracies: each method's zoo config at its
default hyperparameters, each dataset's own head (FR has no task modules, so routing plays no part). They are
taken from the zoo table (``zoo_<zoo>.json``: its headline rows and its filter-ratio sweep) when that table was
measured on the same zoo recipe and has them, and measured here otherwise (or with ``--remeasure``); the
markdown says which.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from scipy.stats import spearmanr

from freemerge_pl.io import write_json_atomic, write_text_atomic
from freemerge_pl.jobs.analysis import adapter_inputs, analyze
from freemerge_pl.jobs.analysis.plots import cutoff_figure, save_figure, spectra_figure
from freemerge_pl.progress import progress_iter

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RATIOS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SWEEP = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)  # the zoo table's filter-ratio sweep
LABELS = {"task_arithmetic": "Task Arithmetic", "dare": "DARE", "ties": "TIES", "breadcrumbs": "Breadcrumbs",
          "pcb": "PCB", "fr_merging": "FR-Merging"}
#: each analysed method's headline row in the zoo table
TABLE_LABELS = {"task_arithmetic": "Task Arithmetic", "dare": "DARE (+TA)", "ties": "TIES",
                "breadcrumbs": "Breadcrumbs", "pcb": "PCB", "fr_merging": "FR-Merging (paper)"}


def zoo_adapter(zoo: str, size: str):
    """The zoo's adapter (prepared) and its recipe hash."""
    if zoo == "text":
        from freemerge_pl.adapters.text_zoo import TextZooAdapter

        adapter = TextZooAdapter(size=size)
        adapter.prepare()
        return adapter, adapter.manifest["recipe_hash"]
    from freemerge_pl.adapters.zoo_vit import ZooViTAdapter
    from freemerge_pl.zoo.vision.build import read_manifest

    adapter = ZooViTAdapter(size=size)
    adapter.prepare()
    return adapter, read_manifest(adapter.zoo_root)["recipe_hash"]


def measure(zoo: str, size: str, method: str, args: dict[str, Any] | None = None) -> float:
    """Mean test accuracy over the zoo's tasks of ``method`` (zoo_table's build and evaluation)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from zoo_table import build, evaluate

    module, dm = build(size, method, args, model={"routing": "oracle"}, zoo=zoo)
    tasks = evaluate(module, dm)["tasks"]
    return sum(tasks.values()) / len(tasks)


def published(zoo: str, size: str) -> dict[str, Any]:
    """The zoo table's (``zoo_<zoo>{,_tiny}.json``) filter-ratio sweep (ratio → avg accuracy), its headline rows of
    the analysed methods (name → avg) and its zoo recipe hash."""
    path = RESULTS / f"zoo_{zoo}{'' if size == 'default' else '_' + size}.json"
    if not path.is_file():
        return {}
    record = json.loads(path.read_text())
    rows = {r["label"]: r["avg"] for r in record.get("sweeps", []) if r.get("sweep") == "filter_ratio"}
    headline = {r["label"]: r["avg"] for r in record.get("rows", [])}
    return {"file": path.name, "recipe_hash": record.get("zoo_recipe_hash"),
            "avg": {r: rows[f"FR-Merging r={r:.0%}"] for r in SWEEP if f"FR-Merging r={r:.0%}" in rows},
            "methods": {name: headline[label] for name, label in TABLE_LABELS.items() if label in headline}}


def suggested_ratio(report, ratios) -> tuple[float, list[float]]:
    """The ratio (among ``ratios``) whose filter removes the largest share of interference beyond the share of
    energy it removes: argmax_r [(1 − metric_after(r)/metric) − energy_below(r)]."""
    margin = []
    for r in ratios:
        i = report.ratios.index(r)
        margin.append((1 - report.metric_after_filter[i] / report.metric) - report.energy_below[i])
    return ratios[max(range(len(ratios)), key=margin.__getitem__)], margin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", default="vision", choices=["vision", "text"])
    parser.add_argument("--size", default="default", choices=["default", "tiny"])
    parser.add_argument("--skip-accuracy", action="store_true", help="the metric only, no merge evaluated")
    parser.add_argument("--remeasure", action="store_true",
                        help="measure every accuracy here even where the zoo table has it for this zoo recipe")
    args = parser.parse_args()
    suffix = ("" if args.zoo == "vision" else f"_{args.zoo}") + ("" if args.size == "default" else f"_{args.size}")
    start = time.perf_counter()
    adapter, recipe_hash = zoo_adapter(args.zoo, args.size)
    report = analyze(adapter_inputs(adapter), ratios=RATIOS, plot_layers=4,
                     progress=lambda keys, desc: progress_iter(keys, desc, unit="tensor"))
    analysis_seconds = time.perf_counter() - start

    table = published(args.zoo, args.size)
    same = table.get("recipe_hash") == recipe_hash
    reuse = same and not args.remeasure
    accuracy: dict[str, float] = {}
    sweep: dict[float, float] = {}
    source = ({"methods": "not measured (--skip-accuracy)", "sweep": "not measured (--skip-accuracy)"}
              if args.skip_accuracy else {"methods": "measured here", "sweep": "measured here"})
    if not args.skip_accuracy:
        for m in report.methods:
            if reuse and m.name in table["methods"]:
                accuracy[m.name] = table["methods"][m.name]
                source["methods"] = f"{table['file']} (same zoo recipe)"
            else:
                accuracy[m.name] = measure(args.zoo, args.size, m.name)
        for r in SWEEP:
            if reuse and r in table["avg"]:
                sweep[r] = table["avg"][r]
                source["sweep"] = f"{table['file']}'s sweep (same zoo recipe)"
            else:
                sweep[r] = (accuracy["fr_merging"] if r == 0.3
                            else measure(args.zoo, args.size, "fr_merging", {"filter_ratio": r}))
    suggested, margin = suggested_ratio(report, list(SWEEP))

    findings: dict[str, Any] = {"suggested_ratio": suggested}
    if sweep:
        after = [report.metric_after_filter[report.ratios.index(r)] for r in SWEEP]
        findings["best_measured_ratio"] = max(sweep, key=sweep.get)
        findings["spearman_metric_after_filter_vs_fr_accuracy"] = float(spearmanr(after, list(sweep.values()))[0])
        names = [m.name for m in report.methods]
        findings["spearman_method_metric_vs_accuracy"] = float(
            spearmanr([m.metric for m in report.methods], [accuracy[n] for n in names])[0])
    pub = {} if reuse else table.get("avg", {})  # the table's sweep, shown beside a sweep measured here
    if pub:
        findings["best_published_ratio"] = max(pub, key=pub.get)

    title = f"Offline {args.zoo} zoo ({args.size}): frequency-domain interference (Table 1 analogue)"
    md = [f"## {title}", "",
          (f"zoo recipe hash `{recipe_hash[:12]}`, {len(report.tasks)} tasks, {len(report.keys)} tensors of "
           f"≥ 2 dims ({report.numel:,} entries); analysis {analysis_seconds:.0f} s, "
           f"{time.perf_counter() - start:.0f} s in all. Accuracies of the methods: {source['methods']}; of the "
           f"filter-ratio sweep: {source['sweep']}. Metric: {report.definition}"), "",
          "| method | per-task vectors compared | mean variance of amplitude | change | avg acc. (this zoo) |",
          "|---|---|---|---|---|",
          f"| task vectors | v_k | {report.metric:.4g} | | |"]
    for m in report.methods:
        acc = f"{100 * accuracy[m.name]:.1f}" if m.name in accuracy else ""
        md.append(f"| {LABELS.get(m.name, m.name)} | {m.per_task_vectors} | {m.metric:.4g} | {100 * m.change:+.1f}% "
                  f"| {acc} |")
    pub_head = (f"FR acc. ({table['file']}, recipe `{str(table['recipe_hash'])[:12]}`"
                f"{'' if same else ', another zoo recipe'})") if pub else "FR acc. (zoo table)"
    md += ["", "### Cutoff: energy below it, interference left after the filter, and FR-Merging's accuracy", "",
           ("*margin*: interference removed − energy removed (the analysis's suggestion is its maximum over "
            "the sweep's ratios)."), "",
           f"| r | energy below cutoff | metric after filter | change | margin | FR acc. (this zoo) | {pub_head} |",
           "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(report.ratios):
        m_after = report.metric_after_filter[i]
        marg = f"{100 * margin[SWEEP.index(r)]:+.1f}%" if r in SWEEP else ""
        acc = f"{100 * sweep[r]:.1f}" if r in sweep else ""
        p = f"{100 * pub[r]:.1f}" if r in pub else ""
        md.append(f"| {r:g} | {100 * report.energy_below[i]:.1f}% | {m_after:.4g} | "
                  f"{100 * (m_after / report.metric - 1):+.1f}% | {marg} | {acc} | {p} |")
    md += ["", "### Findings (computed from the numbers above)", ""]
    md.append(f"- Suggested ratio (largest margin): r = {suggested:g}.")
    if "best_measured_ratio" in findings:
        md.append(f"- Best FR ratio measured on this zoo: r = {findings['best_measured_ratio']:g} "
                  f"({100 * sweep[findings['best_measured_ratio']]:.1f}%); Spearman ρ between the metric after "
                  f"the filter and FR accuracy over the sweep: {findings['spearman_metric_after_filter_vs_fr_accuracy']:+.2f}"
                  f" (the paper's claim predicts ρ < 0); across the six methods, ρ(metric, accuracy) = "
                  f"{findings['spearman_method_metric_vs_accuracy']:+.2f}.")
    if "best_published_ratio" in findings:
        md.append(f"- Best ratio in {table['file']}: r = {findings['best_published_ratio']:g}"
                  f"{'' if same else ' (measured on another zoo recipe)'}.")
    md += ["", f"![spectra](zoo_spectra{suffix}.png)", "", f"![cutoff](zoo_interference{suffix}.png)", ""]

    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic({**report.to_json(), "size": args.size, "zoo_recipe_hash": recipe_hash,
                       "accuracy": accuracy, "fr_sweep_accuracy": {str(r): a for r, a in sweep.items()},
                       "accuracy_source": source, "zoo": args.zoo,
                       "published_sweep": {**table, "avg": {str(r): a for r, a in table.get("avg", {}).items()}},
                       "margin": dict(zip(map(str, SWEEP), margin)), "findings": findings,
                       "seconds": time.perf_counter() - start}, RESULTS / f"zoo_interference{suffix}.json")
    write_text_atomic("\n".join(md), RESULTS / f"zoo_interference{suffix}.md")
    save_figure(spectra_figure(report), RESULTS / f"zoo_spectra{suffix}.png")
    save_figure(cutoff_figure(report), RESULTS / f"zoo_interference{suffix}.png")
    print("\n".join(md))


if __name__ == "__main__":
    main()
