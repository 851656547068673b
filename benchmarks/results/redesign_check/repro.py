"""Run zoo headline rows through the CLI (`cli.py test --config configs/zoo/<method>.yaml [overrides]`) in a given
checkout and compare each task's accuracy with benchmarks/results/zoo_vision.json's row of the same label.
usage: python repro.py CHECKOUT OUTJSON [label-substring ...]"""
import json
import pathlib
import subprocess
import sys
import time

ROWS = [
 ("Weight Averaging", "weight_averaging", []),
 ("Task Arithmetic", "task_arithmetic", []),
 ("TIES", "ties", []),
 ("DARE (+TA)", "dare", []),
 ("Breadcrumbs", "breadcrumbs", []),
 ("DELLA", "della", []),
 ("PCB", "pcb", []),
 ("TSV", "tsv", []),
 ("FR-Merging (paper)", "fr_merging", []),
 ("FR-Merging (released code)", "fr_merging_released", []),
 ("EMR (oracle)", "emr", ["--model.routing", "oracle"]),
 ("EMR (router)", "emr", ["--model.routing", "router"]),
 ("Twin (router)", "twin", ["--model.routing", "router"]),
 ("FREE-Merging (router)", "free_merging", ["--model.routing", "router"]),
 ("FREE-Merging (oracle)", "free_merging", ["--model.routing", "oracle"]),
 ("FREE-Merging (router, routed heads)", "free_merging", ["--model.routing", "router", "--model.head_selection", "routed"]),
 ("FREE-Merging (router on the whole merged backbone)", "free_merging", ["--model.routing", "router", "--model.router.feature_source", "backbone"]),
 ("FREE-Merging (released code, router)", "free_merging_released", ["--model.routing", "router"]),
 ("FREE-Merging (released code, oracle)", "free_merging_released", ["--model.routing", "oracle"]),
 ("Fisher merging", "fisher", []),
 ("RegMean", "regmean", []),
 ("MTL (joint fine-tuning on the router split)", "mtl", []),
]
checkout, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
want = sys.argv[3:]
import os

ZOO = os.environ.get("ZOO", "vision")
CONF = {"vision": "zoo", "text": "text"}[ZOO]
if ZOO == "text":
    ROWS = [r for r in ROWS if "whole merged backbone" not in r[0]]
ref = {r["label"]: r for r in json.loads(pathlib.Path(f"/work/main/benchmarks/results/zoo_{ZOO}.json").read_text())["rows"]}
results = json.loads(out.read_text()) if out.exists() else {}
for label, method, extra in ROWS:
    if want and not any(w in label for w in want):
        continue
    root = f"/tmp/repro_runs/{ZOO}{os.environ.get('SIZE', '')}/{checkout.name}/{method}{'_'.join(extra).replace('--model.', '_')}"
    config = f"configs/{CONF}/{method}.yaml"
    if os.environ.get("SIZE"):
        import yaml
        cfg = yaml.safe_load((checkout / config).read_text())
        cfg["model"]["adapter"]["init_args"]["size"] = os.environ["SIZE"]
        for task in cfg["data"]["tasks"]:
            task["dataset_args"]["size"] = os.environ["SIZE"]
        config = f"/tmp/repro_cfg_{checkout.name}_{ZOO}_{method}.yaml"
        pathlib.Path(config).write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, *(["/work/repro/shim.py"] if str(checkout) != "/work/main" else []), "cli.py", "test", "--config", config, *extra,
           "--trainer.default_root_dir", root]
    t = time.time()
    p = subprocess.run(cmd, check=False, cwd=checkout, capture_output=True, text=True)
    files = sorted(pathlib.Path(root).rglob("results.json"), key=lambda f: f.stat().st_mtime)
    if p.returncode or not files:
        print(label, "FAILED", p.returncode, p.stderr[-800:], flush=True)
        results[label] = {"error": p.stderr[-2000:]}
        continue
    res = json.loads(files[-1].read_text())
    tasks = {t_: v["accuracy"] for t_, v in res["tasks"].items()}
    diff = max(abs(tasks[k] - ref[label]["tasks"][k]) for k in tasks) if label in ref else None
    results[label] = {"tasks": tasks, "routing": res.get("avg", {}).get("routing_accuracy"), "max_abs_diff_vs_table": diff,
                      "seconds": time.time() - t}
    print(f"{label}: max |Δ| vs table {diff}  ({time.time() - t:.0f} s)", flush=True)
    out.write_text(json.dumps(results, indent=1, sort_keys=True))
