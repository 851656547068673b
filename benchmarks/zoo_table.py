"""The method comparison on an offline zoo: every method at its paper defaults, the protocol variants,
the tuned-on-router-split rows, and the filter-ratio / expert-density sweeps.

    python benchmarks/zoo_table.py [--zoo vision|text] [--size default|tiny] [--only NAME ...] [--skip-sweeps]
                                   [--skip-tuned]

Writes ``benchmarks/results/zoo_{vision,text}{,_tiny}.{md,json}``. Every row is built from the zoo's config
``configs/zoo/<method>.yaml`` (vision: the procedural ViT zoo) or ``configs/text/<method>.yaml`` (text: the
all-MiniLM-L6-v2 text zoo) — same zoo, same router split, same router recipe — with the overrides shown;
nothing here is tuned on the test split, and the zoo recipes were fixed before any method was measured.
"Individual" and "Pre-trained" are registry methods run the same way (``configs/<zoo>/individual.yaml``: each
task's own fine-tuned model with its head, ``routing: oracle``; ``pretrained.yaml``: θ_pre with each task's head);
``tests/test_reference_methods.py`` checks them against an independent loop over the checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Trainer

from freemerge_pl.io import write_json_atomic, write_text_atomic
from freemerge_pl.lightning.cli import build_from_config

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
#: per zoo: its config folder, output name, title, what a sample is, and how its default router sees inputs
ZOOS: dict[str, dict[str, str]] = {
    "vision": {"configs": "zoo", "name": "zoo_vision", "title": "Offline zoo", "samples": "img",
               "router": "MLP on the pre-trained backbone's class token and token mean (feature_source auto)"},
    "text": {"configs": "text", "name": "zoo_text", "title": "Text zoo", "samples": "text",
             "router": "MLP on the pre-trained encoder's token mean after 3 layers (feature_source auto)"},
}


#: the reference rows, first in every table: their configs' protocol (``individual``: oracle routing)
REFERENCE_ROWS = [{"label": "Individual", "method": "individual"}, {"label": "Pre-trained", "method": "pretrained"}]


def rows_spec(zoo: str = "vision") -> list[dict[str, Any]]:
    """(label, config method, method_args, model overrides) of every headline row after the reference rows (on
    the text zoo the default router already reads the backbone's features, so that variant is not repeated)."""
    router = {"routing": "router", "head_selection": "dataset"}
    oracle = {"routing": "oracle", "head_selection": "dataset"}
    routed_heads = {"routing": "router", "head_selection": "routed"}
    rows = [
        {"label": "Weight Averaging", "method": "weight_averaging"},
        {"label": "Linear (mergekit)", "method": "linear"},
        {"label": "Task Arithmetic", "method": "task_arithmetic"},
        {"label": "TIES", "method": "ties"},
        {"label": "DARE (+TA)", "method": "dare"},
        {"label": "Breadcrumbs", "method": "breadcrumbs"},
        {"label": "DELLA", "method": "della"},
        {"label": "PCB", "method": "pcb"},
        {"label": "TSV", "method": "tsv"},
        {"label": "FR-Merging (paper)", "method": "fr_merging"},
        {"label": "FR-Merging (released code)", "method": "fr_merging_released"},
        {"label": "EMR (oracle)", "method": "emr", "model": oracle},
        {"label": "EMR (router)", "method": "emr", "model": router},
        {"label": "Twin (router)", "method": "twin", "model": router},
        {"label": "FREE-Merging (router)", "method": "free_merging", "model": router},
        {"label": "FREE-Merging (oracle)", "method": "free_merging", "model": oracle},
        {"label": "FREE-Merging (router, routed heads)", "method": "free_merging", "model": routed_heads},
        {"label": "FREE-Merging (router on the whole merged backbone)", "method": "free_merging",
         "model": {**router, "router": {"feature_source": "backbone", "epochs": 20}}},
        {"label": "FREE-Merging (released code, router)", "method": "free_merging_released", "model": router},
        {"label": "FREE-Merging (released code, oracle)", "method": "free_merging_released", "model": oracle},
        # data-dependent baselines: statistics / training on the router split (configs/zoo/<method>.yaml settings)
        {"label": "Fisher merging", "method": "fisher"},
        {"label": "RegMean", "method": "regmean"},
        {"label": "AdaMerging (layer-wise)", "method": "adamerging"},
        {"label": "AdaMerging++ (layer-wise)", "method": "adamerging_pp"},
        {"label": "MTL (joint fine-tuning on the router split)", "method": "mtl"},
        {"label": "MTL (joint fine-tuning on 50% of the training split, 3 epochs: the upper bound)", "method": "mtl",
         "args": {"data_split": "train", "train_fraction": 0.5, "epochs": 3}},
    ]
    if zoo == "text":
        for r in rows:  # the text configs' training data is the zoo's router split: name the training split
            if r["method"] == "mtl" and r.get("args", {}).get("data_split") == "train":
                r["args"] = {**r["args"], "train_split_args": {"split": "train"}}
    return rows


def sweep_spec() -> list[dict[str, Any]]:
    rows = [{"label": f"FR-Merging r={r:.0%}", "method": "fr_merging", "args": {"filter_ratio": r},
             "sweep": "filter_ratio"} for r in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)]
    rows += [{"label": f"FREE-Merging d={d:.1%} (oracle)", "method": "free_merging",
              "args": {"expert_density": d}, "model": {"routing": "oracle"}, "sweep": "expert_density"}
             for d in (0.001, 0.005, 0.01, 0.02, 0.05, 0.1)]
    return rows


TUNED = [("Task Arithmetic", "task_arithmetic"), ("TIES", "ties"), ("FR-Merging (paper)", "fr_merging"),
         ("FREE-Merging (router)", "free_merging"), ("EMR (router)", "emr")]


def build(size: str, method: str, args: dict | None = None, model: dict | None = None, zoo: str = "vision"):
    """The merged module and data of the zoo's ``configs/<zoo folder>/<method>.yaml`` with the zoo size and
    overrides applied."""
    cfg = yaml.safe_load((REPO / "configs" / ZOOS[zoo]["configs"] / f"{method}.yaml").read_text())
    cfg["model"]["adapter"]["init_args"]["size"] = size
    for task in cfg["data"]["tasks"]:
        task["dataset_args"]["size"] = size
    cfg["model"]["method_args"] = {**cfg["model"].get("method_args", {}), **(args or {})}
    cfg["model"].update(model or {})
    cfg["trainer"].update({"accelerator": "cpu", "logger": False, "callbacks": []})
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(cfg, f)
    try:
        return build_from_config(["--config", f.name])
    finally:
        os.unlink(f.name)


def evaluate(module, dm) -> dict[str, Any]:
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)
    n_images = sum(len(dm._test[t]) for t in dm.task_names)
    if module.routing == "router" and not bool(module.router_trained):  # keep router training out of img/s
        fit_start = time.perf_counter()
        module.fit_router(dm.router_dataset())
        module.merge_record["router_fit_seconds"] = time.perf_counter() - fit_start
    start = time.perf_counter()
    trainer.test(module, datamodule=dm, verbose=False)
    seconds = time.perf_counter() - start
    res = module.test_results
    routed = bool(module.task_modules) and module.routing == "router"  # oracle: the true task, nothing to score
    confusion = res.get("routing_confusion") if routed else None
    return {"tasks": {t: v["accuracy"] for t, v in res["tasks"].items()},
            # routing only matters where a router picks among task modules: the mean over tasks of each task's
            # share routed to itself (MergedModule's ``routing_accuracy``) and the share of all samples (pooled)
            "routing_accuracy": res["avg"]["routing_accuracy"] if routed else None,
            "routing_accuracy_pooled": (sum(confusion[i][i] for i in range(len(confusion)))
                                        / max(1, sum(map(sum, confusion)))) if confusion else None,
            "task_module_bytes_per_task": res["task_module_bytes"] / max(1, len(res["tasks"]))
            if module.task_modules else 0,
            "storage_kind": storage_kind(module.task_modules),
            "backbone_bytes": res["backbone_bytes"], "merge_seconds": module.merge_record.get("seconds"),
            "router_fit_seconds": module.merge_record.get("router_fit_seconds"),
            "data_statistics": module.merge_record.get("data_statistics"),
            "images_per_s": n_images / seconds}


def storage_kind(task_modules) -> str | None:
    """What a task's extra storage holds, read from the task modules themselves (None without any)."""
    if not task_modules:
        return None
    from freemerge_pl.merging.experts import SparseExpert

    module = task_modules[0]
    if isinstance(module, SparseExpert):
        dtypes = {str(module.entries(k)[1].dtype).removeprefix("torch.") for k in module.keys}
        short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}
        values = "/".join(sorted(short.get(d, d) for d in dtypes))
        compact = any(module.index_code(k) != "flat" for k in module.keys)
        return f"{values} values + {'compact' if compact else 'int32'} indices"
    return {"EMRTaskModule": "bit-packed masks + rescaler", "LowRankTaskModule": "low-rank factors",
            "FinetunedWeights": "the whole fine-tuned model"}.get(type(module).__name__, type(module).__name__)


def row(label: str, tasks: dict[str, float], individual: dict[str, float] | None, **extra) -> dict[str, Any]:
    avg = sum(tasks.values()) / len(tasks)
    norm = (sum(tasks[t] / individual[t] for t in tasks) / len(tasks)) if individual else None
    return {"label": label, "tasks": tasks, "avg": avg, "normalised_avg": norm, **extra}


def merge_cell(r: dict[str, Any]) -> str:
    """Merge seconds; for a data-dependent method also its statistics / training time and samples."""
    data = r.get("data_statistics")
    if not data:
        return f"{r['merge_seconds']:.2f}"
    return f"{r['merge_seconds'] + data.get('seconds', 0.0):.1f} (data: {data.get('samples', '?')} samples)"


def markdown(rows: list[dict], tasks: list[str], title: str, tuning: bool = False, samples: str = "img") -> str:
    head = ["method", *tasks, "avg", "norm. avg", "extra storage / task", "merge s", f"{samples}/s",
            "routing acc (mean over tasks; pooled)"]
    if tuning:
        head += ["tuning s", "tune-val images"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        storage = r.get("task_module_bytes_per_task") or 0
        pct = 100 * storage / r["backbone_bytes"] if r.get("backbone_bytes") else 0
        merged = r.get("merge_seconds") is not None  # rows of tables written before the reference methods
        kind = f"; {r['storage_kind']}" if r.get("storage_kind") else ""
        routing = ""
        if r.get("routing_accuracy") is not None:
            pooled = r.get("routing_accuracy_pooled")
            routing = f"{100 * r['routing_accuracy']:.1f}" + (f"; {100 * pooled:.1f}" if pooled is not None else "")
        cells = [r["label"], *(f"{100 * r['tasks'][t]:.1f}" for t in tasks), f"**{100 * r['avg']:.1f}**",
                 f"{100 * r['normalised_avg']:.1f}" if r.get("normalised_avg") is not None else "",
                 (f"{storage / 1024:.0f} KiB ({pct:.2f}%{kind})" if storage else "0") if merged else "",
                 merge_cell(r) if merged else "",
                 f"{r['images_per_s']:.0f}" if r.get("images_per_s") else "",
                 routing]
        if tuning:
            cells += [f"{r['tuning_seconds']:.1f}", str(r["tuning_samples"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_tuned(size: str, label: str, method: str, individual, zoo: str = "vision") -> dict[str, Any]:
    from freemerge_pl.lightning.cli import DEFAULT_SPACES, FreeMergeTrainer

    def built(args=None, model=None):
        m, d = build(size, method, args=args, model=model, zoo=zoo)
        d.tune_fraction = 0.5
        d._train.clear()
        d.setup()
        return m, d

    start = time.perf_counter()
    extra: dict[str, Any] = {"tuning_seconds": 0.0, "tuning_samples": 0, "tuned_params": {},
                             "tune_val_source": "", "base_label": label}
    if method in DEFAULT_SPACES:
        module, dm = built()
        trainer = FreeMergeTrainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                   enable_model_summary=False, enable_checkpointing=False)
        module.model = None  # tune builds it itself
        out = RESULTS / "tune" / (f"{size}-{method}" if zoo == "vision" else f"{zoo}-{size}-{method}")
        report = trainer.tune(module, dm, DEFAULT_SPACES[method], output_dir=str(out))
        best = report["best"]["params"]  # the simplest of the candidates tied within the tune-val's SE
        source = " / ".join(sorted({v["source"] for v in report["tune_val"].values()}))
        extra.update(tuning_seconds=time.perf_counter() - start, tuning_samples=sum(report["tune_samples"].values()),
                     tuned_params=best, tune_val_source=source,
                     tune_ties={k: report["ties"][k] for k in ("tied", "standard_error", "how", "rules")})
        title = f"{label} (tuned on the {source}: {best})"
    else:  # EMR: tuning-free (no hyperparameter): its tuned rows are its default rows
        best, title = {}, f"{label} (tuning-free: its defaults)"
    tuned, dm2 = built(best)
    tuned.reset_router()
    ev = evaluate(tuned, dm2)
    rows = [row(title, ev["tasks"], individual, **{k: v for k, v in ev.items() if k != "tasks"}, **extra)]
    if tuned.task_modules:  # the same merge with the true task's module (oracle) and with none (backbone alone)
        base = label.replace(" (router)", "")
        for what, model in (("oracle", {"routing": "oracle"}), ("backbone alone, no task module", None)):
            other, dm3 = built(best, model)
            if model is None:
                other.build(dm3.router_dataset()[0][0].unsqueeze(0))
                other.model.set_task_modules(None)
            ev = evaluate(other, dm3)
            rows.append(row(title.replace(label, f"{base} ({what})"), ev["tasks"], individual,
                            **{k: v for k, v in ev.items() if k != "tasks"},
                            **{**extra, "base_label": f"{base} ({what})"}))
    return rows


def routed_summary(tuned_rows: list[dict[str, Any]], zoo: str) -> str | None:
    """The issue-28 line: routed − oracle and the share of the oracle's gain over its own backbone that routing
    keeps (tuned FREE), with the default router's routing accuracy beside the mean-pool probe's
    (``benchmarks/router_compare.py``'s results, same router split)."""
    by = {r.get("base_label"): r for r in tuned_rows}
    routed, oracle = by.get("FREE-Merging (router)"), by.get("FREE-Merging (oracle)")
    alone = by.get("FREE-Merging (backbone alone, no task module)")
    if not (routed and oracle and alone):
        return None
    gain = oracle["avg"] - alone["avg"]
    kept = (routed["avg"] - alone["avg"]) / gain if gain else float("nan")
    line = (f"routed − oracle (tuned FREE): {100 * (routed['avg'] - oracle['avg']):.2f} points; gain kept: "
            f"{100 * kept:.0f} %")
    compare = RESULTS / f"router_compare{'' if zoo == 'vision' else '_' + zoo}.json"
    if compare.exists():
        data = json.loads(compare.read_text())
        probe = data.get("probes", {}).get("pretrained mean[L]", {}).get("test")
        line += (f"; default router {100 * routed['routing_accuracy']:.1f} % vs mean-pool probe "
                 f"{100 * probe:.1f} %" if probe is not None else "")
    return line


def _row_key(r: dict[str, Any]) -> str:
    """What identifies a row across merged tables: its label (a tuned row: its method's label, whatever was
    chosen and wherever tune-val came from)."""
    return r.get("base_label") or r["label"].split(" (tuned on")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", default="vision", choices=sorted(ZOOS), help="which zoo's configs and table")
    parser.add_argument("--size", default="default")
    parser.add_argument("--only", nargs="*", default=None, help="labels (substring match) to run")
    parser.add_argument("--skip-sweeps", action="store_true")
    parser.add_argument("--skip-tuned", action="store_true")
    parser.add_argument("--skip-main", action="store_true", help="only Individual/Pre-trained + what is not skipped")
    parser.add_argument("--merge-json", nargs="*", default=[],
                        help="earlier JSON outputs whose rows/tuned/sweeps are merged into this table")
    parser.add_argument("--name", default=None, help="output name (default zoo_<zoo>[_<size>])")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()

    zoo = ZOOS[args.zoo]
    base, dm = build(args.size, "individual", zoo=args.zoo)  # the Individual row: configs/<zoo>/individual.yaml
    router_per_task = len(dm.router_indices[dm.task_names[0]])
    adapter = base.adapter
    tasks = base.task_names
    first = evaluate(base, dm)
    individual = first["tasks"]
    rows = [row("Individual", individual, individual, **{k: v for k, v in first.items() if k != "tasks"},
                method="individual", method_args={}, model={})]
    del base
    specs = [] if args.skip_main else rows_spec(args.zoo)
    if args.only:
        specs = [s for s in specs if any(o in s["label"] for o in args.only)]
    failed: list[dict[str, str]] = []

    def attempt(label: str, out: list, fn) -> None:
        """``out.append(fn())``; a row that fails is recorded (label and one-line error) and the run goes on."""
        try:
            got = fn()
            out.extend(got if isinstance(got, list) else [got])
        except Exception as err:  # noqa: BLE001 - a benchmark row's failure is reported, not fatal
            failed.append({"label": label, "error": f"{type(err).__name__}: {str(err).splitlines()[0]}"})
            print(f"{label}: FAILED ({failed[-1]['error']})", flush=True)
            return
        print(f"{out[-1]['label']}: avg {100 * out[-1]['avg']:.1f}", flush=True)

    def measured(spec, **extra):
        """The row of one spec: its config built with the spec's overrides, evaluated on the test split."""
        module, dm = build(args.size, spec["method"], spec.get("args"), spec.get("model"), zoo=args.zoo)
        ev = evaluate(module, dm)
        return row(spec["label"], ev["tasks"], individual, **{k: v for k, v in ev.items() if k != "tasks"}, **extra)

    for spec in REFERENCE_ROWS[1:] + specs:
        attempt(spec["label"], rows, lambda spec=spec: measured(
            spec, method=spec["method"], method_args=spec.get("args", {}), model=spec.get("model", {})))
    tuned_rows = []
    if not args.skip_tuned:
        for label, method in TUNED:
            attempt(label, tuned_rows,
                    lambda label=label, method=method: run_tuned(args.size, label, method, individual, zoo=args.zoo))
    sweep_rows = []
    if not args.skip_sweeps:
        for spec in sweep_spec():
            attempt(spec["label"], sweep_rows, lambda spec=spec: measured(spec, sweep=spec["sweep"]))
    manifest = adapter.manifest
    seconds = time.perf_counter() - start
    total_seconds, runs, complete = seconds, 1, True
    for path in args.merge_json:  # rows measured here win; an earlier table of another zoo recipe is refused
        earlier = json.loads(Path(path).read_text())
        if earlier.get("zoo_recipe_hash") != manifest.get("recipe_hash"):
            raise SystemExit(f"{path} was measured on zoo recipe {str(earlier.get('zoo_recipe_hash'))[:12]}, this "
                             f"zoo is {str(manifest.get('recipe_hash'))[:12]}: its rows cannot be merged")
        for mine, theirs in ((rows, earlier["rows"]), (tuned_rows, earlier["tuned"]),
                             (sweep_rows, earlier["sweeps"])):
            mine += [r for r in theirs if _row_key(r) not in {_row_key(x) for x in mine}]
        total_seconds += earlier.get("seconds", 0.0)
        runs += earlier.get("runs", 1)
        # tables written before totals were kept hold only their last run's seconds
        complete = complete and "runs" in earlier and earlier.get("seconds_complete", True)
    order = [s["label"] for s in REFERENCE_ROWS + rows_spec(args.zoo)]
    rows.sort(key=lambda r: order.index(r["label"]) if r["label"] in order else len(order))  # stable
    name = args.name or (zoo["name"] if args.size == "default" else f"{zoo['name']}_{args.size}")
    report = {"zoo": args.zoo, "size": args.size, "zoo_recipe_hash": manifest.get("recipe_hash"), "tasks": tasks,
              "rows": rows, "tuned": tuned_rows, "sweeps": sweep_rows, "failed": failed,
              "seconds": total_seconds, "runs": runs, "seconds_complete": complete, "last_run_seconds": seconds,
              "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    unit = zoo["samples"]
    if args.zoo == "vision":
        router_split = f"1% of each task's training data ({router_per_task} images per task)"
    else:
        sizes = sorted({len(dm.router_indices[t]) for t in tasks})
        router_split = (f"held out of fine-tuning ({'–'.join(map(str, sizes[::max(1, len(sizes) - 1)]))} texts "
                        f"per task, the same count of each class)")
    title = zoo["title"] + (f", {manifest['encoder']['kind']}" if "encoder" in manifest else "")
    md = [f"## {title} ({args.size}): {len(tasks)} tasks, accuracy (%) on each task's test split",
          "", (f"zoo recipe hash `{str(manifest.get('recipe_hash'))[:12]}`, CPU, "
               + (f"{seconds:.0f} s in all." if runs == 1 else
                  f"{report['seconds']:.0f} s in all over {runs} runs merged (`--merge-json`; this one {seconds:.0f} s)."
                  if complete else
                  f"this run {seconds:.0f} s; the other rows merged from earlier runs (`--merge-json`), whose times "
                  "were not all recorded.")),
          (f"Heads: each dataset's own head unless a row says *routed heads*. Router: {zoo['router']} (unless a "
           f"row says otherwise) trained on the router split, {router_split}. *routing acc* is the mean over tasks "
           f"of each task's share of test {unit}s routed to itself, then (after ';') the share of all test "
           f"{unit}s routed to their own task (pooled); shown where a router picks among task modules. Extra "
           "storage per task is what a task adds to the one merged backbone, with what it holds (sparse experts: "
           "a value and a compact index code per entry; Individual: the whole fine-tuned model)."), "",
          markdown(rows, tasks, "Paper-default hyperparameters", samples=unit)]
    if tuned_rows:
        sources = sorted({r.get("tune_val_source") or "router split" for r in tuned_rows if r.get("tuned_params")})
        md.append(markdown(tuned_rows, tasks, f"Tuned on the {' / '.join(sources)} (never the test split)",
                           tuning=True, samples=unit))
        md.append("Tuned rows: tune-val is data no fine-tuned model trained on — each task's validation split "
                  "(held out before fine-tuning; the router trains on the whole router split) or, where a task has "
                  "none, a held-out half of the router split (the router trains on the other half); each candidate "
                  "is scored by mean accuracy on tune-val (`cli.DEFAULT_SPACES`); candidates within the tune-val's "
                  "standard error of the best (sqrt(p(1−p)/n), n its samples) tie, and the simplest is chosen "
                  "(smaller expert storage, then no filter, then the method's defaults, then grid order; the JSON's "
                  "`tune_ties` lists the tied set and the rule); the chosen values are then evaluated once on the "
                  "test split. *tuning s* is the whole search.\n")
        summary = routed_summary(tuned_rows, args.zoo)
        if summary:
            md.append(summary + "\n")
    if sweep_rows:
        md.append(markdown(sweep_rows, tasks, "Sweeps: filter ratio (Table 14 analogue) and expert density",
                           samples=unit))
    if failed:
        md += ["### Rows that failed", "", *(f"- {f['label']}: `{f['error']}`" for f in failed), ""]
    write_json_atomic(report, RESULTS / f"{name}.json")
    write_text_atomic("\n".join(md), RESULTS / f"{name}.md")
    print("\n".join(md))


if __name__ == "__main__":
    main()
