"""This project's merge job side by side with mergekit on the same Llama-shaped job (issue 27, item 4).

Builds a Llama-shaped base model and 3 synthetic fine-tunes (bf16, Hugging Face sharded safetensors, two
shards each; θ_pre ~ N(0, 0.02²), θ_k = bf16(θ_pre + N(0, 0.001²)), written tensor by tensor by
``stream_memory.write_models``). The default size is the issue's: 645 M parameters, 1.29 GB a model,
5.16 GB of inputs (``--hidden/--intermediate/--layers/--vocab`` make it smaller). mergekit runs from its own
virtual environment (``--venv``; created with ``pip install mergekit==MERGEKIT_VERSION`` when mergekit is
neither there nor importable here, with ``--system-site-packages`` so that the installed torch is reused
when mergekit's pins accept it; the run is skipped with a one-line reason when the install fails or takes
over ``INSTALL_TIMEOUT`` s).

Every shared method is written as one YAML job per tool (``SHARED``: our method and settings, mergekit's
method and per-model parameters, both computing in float32 and writing bfloat16) and run by each tool in a
child process at one thread (``OMP_NUM_THREADS=MKL_NUM_THREADS=FREEMERGE_THREADS=1``, mergekit ``-j 1``),
inputs page-cached and dirty pages flushed first (``os.sync``: no writeback of the models or of an earlier run's
output overlaps a timed run), order alternating per repeat (ours, theirs / theirs, ours / ...). Per run, measured by a
fresh launcher process around the tool (``LAUNCHER``: the peak RSS is the tool's own, not this script's
inherited across ``execve``): wall, CPU (user + system), minor page faults and peak RSS, input GB/s (the bytes of the checkpoints the job names / wall). Per method: the ratio of median
walls (project / mergekit), of peak RSS, the max |difference| between the two outputs and the convention
that explains it (random methods: the drop masks come from different generators, so only statistics are
compared). Results: ``benchmarks/results/vs_mergekit.{md,json}``; the last line printed is
``project/mergekit wall time, worst shared method: X.XX``. ``--ours-only`` methods (FR, FREE) run on the
same job for this project only, reported as a ratio to our task arithmetic.

    python benchmarks/vs_mergekit.py [--hidden 256 --intermediate 688 --layers 2 --vocab 4096]
        [--methods linear,ties] [--ours-only fr,free] [--repeats 2] [--venv DIR] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stream_memory import llama_config, llama_plan, sequential_read, shard_files, write_models

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
#: how this project's merge job is started (the CLI's subcommand name lives here only)
OUR_COMMAND = (str(REPO / "cli.py"), "merge")
MERGEKIT_VERSION = "0.1.5"
INSTALL_TIMEOUT = 600
DEFAULT_VENV = Path.home() / ".cache" / "freemerge_pl" / f"mergekit-{MERGEKIT_VERSION}-venv"
ISSUE_SIZE = {"hidden": 2048, "intermediate": 5632, "layers": 10, "heads": 32, "kv_heads": 32, "vocab": 32000}
N_FINETUNED = 3
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FREEMERGE_THREADS": "1"}
GB, MiB = 1e9, 1024**2


@dataclass(frozen=True)
class Shared:
    """One merge both tools offer, in each tool's terms, and what explains a difference between them."""

    name: str
    ours: str
    ours_parameters: dict[str, Any]
    theirs: str
    model_parameters: dict[str, Any]  # mergekit's per-model parameters (weight, density, ...)
    theirs_parameters: dict[str, Any] = field(default_factory=dict)  # mergekit's shared parameters
    theirs_reads_base: bool = True
    random: bool = False
    convention: str = ""


SHARED = [
    Shared("linear", "linear", {"weights": [1.0] * N_FINETUNED}, "linear", {"weight": 1.0},
           theirs_reads_base=False,
           convention="the same rule: Σ w_k θ_k / Σ w_k in float32 (addcmul_ in model order, one division), "
                      "from the fine-tuned models only, rounded to bfloat16 once (our weight_averaging, "
                      "θ_pre + the mean task vector, differs from it by ≤ 1 bf16 ulp and reads θ_pre too)"),
    Shared("task_arithmetic", "task_arithmetic", {"scaling": 0.3}, "task_arithmetic", {"weight": 0.3},
           convention="rounding only: mergekit scales each task vector by its weight before summing, we "
                      "scale the sum by λ; both in float32, rounded to bfloat16 (≤ 1 bf16 ulp)"),
    Shared("ties", "ties", {"density": 0.2, "trim_scope": "tensor", "trim_ties": "exact_count", "scaling": 1.0},
           "ties", {"weight": 1.0, "density": 0.2},
           convention="the same trim (trim_ties: exact_count keeps mergekit's max(1, int(d·N)) entries, tied "
                      "ones chosen by the same argsort; our default keep_all keeps every entry tied with the "
                      "k-th largest |v|, and bf16 task vectors tie by the thousands), elect and disjoint "
                      "mean: rounding only"),
    Shared("dare_ties", "dare",
           {"drop_rate": 0.8, "merge": "ties", "ties_density": 1.0, "trim_scope": "tensor", "scaling": 1.0},
           "dare_ties", {"weight": 1.0, "density": 0.2},
           {"normalize": True}, random=True,
           convention="random: the drop masks come from different generators (mergekit: torch's global "
                      "Bernoulli; ours: a per-key seeded generator), and mergekit rescales survivors to the "
                      "task vector's L1 norm where we divide by 1 − p, so entries differ; only statistics "
                      "compare. mergekit's normalize: true is set to match our disjoint mean"),
    Shared("breadcrumbs", "breadcrumbs", {"drop_top": 0.01, "drop_bottom": 0.9, "scaling": 0.3},
           "breadcrumbs",
           {"weight": 0.3, "density": 0.09, "gamma": 0.01},
           convention="the band's edges: we drop ⌊0.9·n⌋ smallest and ⌊0.01·n⌋ largest |v|, mergekit keeps "
                      "int(0.09·n) from rank n − int(0.09·n) − int(0.01·n); tied magnitudes at an edge are "
                      "split by different sorts"),
    Shared("della", "della", {"drop_rate": 0.7, "epsilon": 0.2, "scaling": 1.0}, "della",
           {"weight": 1.0, "density": 0.3, "epsilon": 0.1}, random=True,
           convention="random: different generators; mergekit's epsilon is half our window ε, and it "
                      "rescales survivors to the L1 norm where we divide by 1 − p_i; only statistics "
                      "compare"),
]
BY_NAME = {m.name: m for m in SHARED}
#: methods only this project offers, timed on the same job (ours only) against our task arithmetic: issue 27's
#: targets are FR ≤ 2 × and FREE ≤ 3 × task arithmetic; each at its defaults
OURS_ONLY = {"fr": ("fr_merging", {}, 2.0), "free": ("free_merging", {}, 3.0)}


# ---------------------------------------------------------------------------------------------- configs


def our_job(method: Shared | str, base: Path, finetuned: list[Path], out: Path, shard_bytes: int,
            parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    """This project's job YAML (``cli.py merge --config``) for ``method`` (a shared one, or a method name and
    its ``parameters``)."""
    name, params = (method.ours, method.ours_parameters) if isinstance(method, Shared) else (method, parameters)
    return {"base_model": str(base), "models": [{"model": str(p), "name": p.name} for p in finetuned],
            "merge_method": name, "parameters": dict(params or {}), "dtype": "bfloat16",
            "out_shard_size": shard_bytes, "output_dir": str(out), "seed": 0}


def mergekit_job(method: Shared, base: Path, finetuned: list[Path]) -> dict[str, Any]:
    """mergekit's YAML (``mergekit-yaml``) for ``method``: float32 maths, bfloat16 output."""
    job: dict[str, Any] = {"models": [{"model": str(p), "parameters": dict(method.model_parameters)}
                                      for p in finetuned],
                           "merge_method": method.theirs, "dtype": "float32", "out_dtype": "bfloat16"}
    if method.theirs_reads_base:
        job["base_model"] = str(base)
    if method.theirs_parameters:
        job["parameters"] = dict(method.theirs_parameters)
    return job


# ---------------------------------------------------------------------------------------------- mergekit


def find_mergekit(venv: Path, install: bool = True) -> tuple[list[str] | None, str]:
    """The ``mergekit-yaml`` command and where it came from, or None and why it is unavailable."""
    script = venv / "bin" / "mergekit-yaml"
    if script.exists():
        return [str(script)], f"venv {venv}"
    here = shutil.which("mergekit-yaml")
    if here:
        return [here], "importable here"
    if not install:
        return None, f"mergekit is not installed in {venv} nor here (install disabled)"
    print(f"installing mergekit=={MERGEKIT_VERSION} into {venv} (its own virtual environment) ...",
          flush=True)
    start = time.perf_counter()
    log = venv.parent / f"{venv.name}.install.log"
    venv.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log, "w") as out:
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True,
                           stdout=out, stderr=subprocess.STDOUT, timeout=INSTALL_TIMEOUT)
            left = max(1.0, INSTALL_TIMEOUT - (time.perf_counter() - start))
            subprocess.run([str(venv / "bin" / "pip"), "install", f"mergekit=={MERGEKIT_VERSION}"],
                           check=True, stdout=out, stderr=subprocess.STDOUT, timeout=left)
    except subprocess.TimeoutExpired:
        shutil.rmtree(venv, ignore_errors=True)
        return None, f"installing mergekit took over {INSTALL_TIMEOUT} s (log: {log})"
    except (OSError, subprocess.CalledProcessError) as err:
        shutil.rmtree(venv, ignore_errors=True)
        return None, f"mergekit could not be installed ({err}; log: {log})"
    if not script.exists():
        return None, f"the mergekit install in {venv} has no bin/mergekit-yaml (log: {log})"
    return [str(script)], f"venv {venv}, installed in {time.perf_counter() - start:.0f} s"


# ---------------------------------------------------------------------------------------------- runs


#: the small process each tool run is started from: it runs the tool as its child and writes the child's own
#: rusage (``RUSAGE_CHILDREN``) as JSON. Linux keeps the RSS high-water mark across ``fork`` + ``execve``, so a
#: tool started straight from this script (which grows as it compares outputs) reported this script's RSS
#: as its peak; started from a fresh interpreter that imported nothing big, its peak RSS is its own.
LAUNCHER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.call(sys.argv[2:])
wall = time.perf_counter() - start
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
    json.dump({"wall_s": wall, "user_s": ru.ru_utime, "sys_s": ru.ru_stime, "maxrss_kib": ru.ru_maxrss,
               "minor_faults": ru.ru_minflt, "exit": code}, f)
"""


def run_child(cmd: list[str], log: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd`` from a fresh launcher process (``LAUNCHER``); wall, CPU (user + system), peak RSS and minor
    page faults of ``cmd`` alone, from its own rusage."""
    usage = log.with_suffix(".rusage.json")
    usage.unlink(missing_ok=True)
    with open(log, "w") as out:
        subprocess.run([sys.executable, "-S", "-c", LAUNCHER, str(usage), *cmd], stdout=out,
                       stderr=subprocess.STDOUT, env=env, cwd=str(REPO), check=False)
    if not usage.exists():
        return {"wall_s": float("nan"), "cpu_s": float("nan"), "user_s": float("nan"), "sys_s": float("nan"),
                "peak_rss_mib": float("nan"), "minor_faults": 0, "exit": -1}
    r = json.loads(usage.read_text())
    return {"wall_s": r["wall_s"], "cpu_s": r["user_s"] + r["sys_s"], "user_s": r["user_s"], "sys_s": r["sys_s"],
            "peak_rss_mib": r["maxrss_kib"] / 1024, "minor_faults": r["minor_faults"], "exit": r["exit"]}


def alternating(repeats: int) -> list[tuple[int, str]]:
    """(repeat, tool) in run order: ours, theirs, theirs, ours, ours, theirs, ..."""
    order = []
    for r in range(repeats):
        order += [(r, t) for t in (("ours", "mergekit") if r % 2 == 0 else ("mergekit", "ours"))]
    return order


class OutputTensors(Mapping):
    """The tensors of a merged model directory's weight shards (task-module sidecars excluded), each read
    from its file when asked for, so that comparing two 645 M-parameter outputs holds one tensor of each."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        self.files: dict[str, Path] = {}
        for path in sorted(directory.glob("*.safetensors")):
            if not path.name.startswith("task_module_"):
                with safe_open(str(path), "pt") as f:
                    self.files.update(dict.fromkeys(f.keys(), path))

    def __getitem__(self, key: str) -> Any:
        from safetensors import safe_open

        with safe_open(str(self.files[key]), "pt") as f:
            return f.get_tensor(key)

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def mergekit_rule(method: Shared, base, finetuned: list) -> Any:
    """mergekit 0.1.5's result for one tensor under a deterministic ``method``, recomputed here with torch
    from its formulas (``linear``: Σ w θ_k / Σ w; task arithmetic, TIES, breadcrumbs: the generalized task
    arithmetic of ``merge_methods/generalized_task_arithmetic.py`` with ``sparsify.magnitude`` (exactly
    max(1, int(d·N)) by argsort) or ``magnitude_outliers``); None for a random method."""
    import torch

    if method.random:
        return None
    p = method.model_parameters
    weight = p["weight"]
    if method.theirs == "linear":  # merge_methods/linear.py: zeros, addcmul_ per model, one division
        result = torch.zeros(base.shape, dtype=torch.float32)
        for t in finetuned:
            result.addcmul_(t.float(), torch.tensor(float(weight)))
        return result.div_(torch.tensor(float(weight) * len(finetuned))).to(base.dtype)
    pre = base.float()
    deltas = torch.stack([t.float() - pre for t in finetuned])
    n = pre.numel()
    if method.theirs in ("ties", "breadcrumbs") and p.get("density", 1.0) < 1:
        keep = max(1, int(p["density"] * n)) if method.theirs == "ties" else int(p["density"] * n)
        for row in deltas:
            order = torch.argsort(row.abs().reshape(-1), descending=method.theirs == "ties")
            if method.theirs == "ties":
                chosen = order[:keep]
            else:
                bottom = max(0, n - keep - int(p["gamma"] * n))
                chosen = order[bottom:bottom + keep]
            mask = torch.zeros(n)
            mask[chosen] = 1
            row.mul_(mask.reshape(row.shape))
    weights = torch.full((len(finetuned),) + (1,) * pre.dim(), float(weight))
    deltas.mul_(weights)
    if method.theirs == "ties":
        agree = deltas.sign() == (deltas.sum(0) >= 0).float() * 2 - 1
        mixed = (deltas * agree).sum(0)
        divisor = (weights * agree).sum(0)
        divisor[divisor == 0] = 1
        mixed /= divisor
    else:
        mixed = deltas.sum(0)
    return (pre + mixed).to(base.dtype)


def threshold_ties(base, finetuned: list, density: float) -> int:
    """Entries of all task vectors tied with the k-th largest |v| (k = int(d·N)) beyond the k kept: the
    entries our TIES keeps (every tie at the threshold) and mergekit's does not."""
    import torch

    extra = 0
    for t in finetuned:
        mags = (t.float() - base.float()).abs().reshape(-1)
        k = max(1, int(density * mags.numel()))
        threshold = torch.topk(mags, k).values[-1]
        extra += int((mags >= threshold).sum()) - k
    return extra


def check_rule(method: Shared, theirs: dict[str, Any], base: dict[str, Any], finetuned: list[dict]) -> dict:
    """How far mergekit's output is from its rule recomputed here (0: the rule explains it whole) and, for
    TIES, how many threshold ties our rule keeps on top of mergekit's count."""
    out: dict[str, Any] = {}
    worst = 0.0
    for key in sorted(base):
        want = mergekit_rule(method, base[key], [f[key] for f in finetuned])
        if want is None:
            return out
        worst = max(worst, float((want.float() - theirs[key].float()).abs().max()))
    out["mergekit_rule_recomputed_max_diff"] = worst
    if method.theirs == "ties":
        out["threshold_ties_kept_only_by_ours"] = sum(
            threshold_ties(base[key], [f[key] for f in finetuned], method.model_parameters["density"])
            for key in base)
    return out


def compare(ours: dict[str, Any], theirs: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Max |difference| (float32) between two outputs (also in bf16 ulps at the entry's scale, the largest of
    |θ_pre|, |ours|, |mergekit|), the share of entries that differ and, per tool, the share of entries changed
    from θ_pre and the std of (merged − θ_pre): the statistics random methods share."""
    import torch

    if set(ours) != set(theirs):
        return {"error": f"different keys: only ours {sorted(set(ours) - set(theirs))[:3]}, "
                         f"only mergekit {sorted(set(theirs) - set(ours))[:3]}"}
    max_diff, differ, total, ulps = 0.0, 0, 0, 0.0
    changed = {"ours": 0, "mergekit": 0}
    sq = {"ours": 0.0, "mergekit": 0.0}
    for key in sorted(ours):
        a, b, p = ours[key].float(), theirs[key].float(), base[key].float()
        diff = (a - b).abs()
        max_diff = max(max_diff, float(diff.max()))
        differ += int((diff > 0).sum())
        total += diff.numel()
        scale = torch.maximum(torch.maximum(a.abs(), b.abs()), p.abs()).clamp_min(1e-30)
        # bf16's spacing at the entry's scale: 2^(e − 8) for scale = m·2^e, m in [0.5, 1)
        ulp = torch.ldexp(torch.ones_like(scale), torch.frexp(scale).exponent - 8)
        ulps = max(ulps, float((diff / ulp).max()))
        for tool, t in (("ours", a), ("mergekit", b)):
            changed[tool] += int((t != p).sum())
            sq[tool] += float((t - p).double().pow(2).sum())
    return {"max_abs_diff": max_diff, "max_diff_bf16_ulps": ulps, "differing_fraction": differ / total,
            "changed_fraction": {k: v / total for k, v in changed.items()},
            "delta_std": {k: (v / total) ** 0.5 for k, v in sq.items()}}


def summarise(method: Shared, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The method's median wall and peak RSS per tool and their ratios (project / mergekit)."""
    med = {tool: {k: statistics.median(r[k] for r in runs if r["tool"] == tool)
                  for k in ("wall_s", "cpu_s", "peak_rss_mib")} for tool in ("ours", "mergekit")}
    return {"method": method.name, "median": med,
            "wall_ratio": med["ours"]["wall_s"] / med["mergekit"]["wall_s"],
            "cpu_ratio": med["ours"]["cpu_s"] / med["mergekit"]["cpu_s"],
            "rss_ratio": med["ours"]["peak_rss_mib"] / med["mergekit"]["peak_rss_mib"]}


def worst_line(summaries: list[dict[str, Any]]) -> str:
    worst = max((s["wall_ratio"] for s in summaries), default=None)
    return ("project/mergekit wall time, worst shared method: "
            + (f"{worst:.2f}" if worst is not None else "n/a (no method ran with both tools)"))


# ---------------------------------------------------------------------------------------------- report


def markdown(result: dict[str, Any]) -> str:
    size, machine = result["size"], result["machine"]
    lines = [f"# {result['title']}", "", result["scope"], "",
             (f"Model: Llama-shaped, hidden {size['hidden']}, intermediate {size['intermediate']}, "
             f"{size['layers']} layers, vocab {size['vocab']}: {size['parameters'] / 1e6:.1f} M parameters, "
             f"{size['model_bytes'] / GB:.3f} GB a model (bf16, 2 shards), base + {N_FINETUNED} fine-tunes. "
             f"Both tools at 1 thread, inputs page-cached, dirty pages flushed before each run, "
             f"{result['repeats']} repeat(s), order alternating."),
             (f"Machine: {machine['cpu']}, {machine['nproc']} CPUs, load average {machine['load_start']} "
              "at the "
             f"start and {machine['load_end']} at the end (shared machine: only the ratios mean anything). "
             f"mergekit {MERGEKIT_VERSION} ({result['mergekit']}); project {result['project_version']}."), ""]
    lines += [("Each tool run is started from a fresh, small launcher process and measured from its own rusage "
              "(`RUSAGE_CHILDREN` of the launcher): the peak RSS is the run's own, not inherited from this "
              "script."), ""]
    lines += [("| method | tool | repeat | wall s | CPU s | system s | minor faults | peak RSS MiB | input GB/s | "
              "exit |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['method']} | {r['tool']} | {r['repeat']} | {r['wall_s']:.2f} | "
                     f"{r['cpu_s']:.2f} | {r.get('sys_s', float('nan')):.2f} | {r.get('minor_faults', 0)} | "
                     f"{r['peak_rss_mib']:.0f} | {r['input_gb_s']:.3g} | {r['exit']} |")
    lines += ["", ("| method | project / mergekit wall | CPU | peak RSS project / mergekit MiB | "
                   "max abs diff | differing entries | changed from θ_pre (ours / mergekit) | "
                   "std(θ − θ_pre) (ours / mergekit) |"),
              "|---|---|---|---|---|---|---|---|"]
    for s in result["methods"]:
        c = s.get("comparison", {})
        med = s["median"]
        if "max_abs_diff" in c:
            cells = (f"{c['max_abs_diff']:.3g} ({c['max_diff_bf16_ulps']:.2f} bf16 ulp at the entry's "
                     "scale) | "
                     f"{100 * c['differing_fraction']:.3f} % | "
                     f"{100 * c['changed_fraction']['ours']:.2f} / "
                     f"{100 * c['changed_fraction']['mergekit']:.2f} % | "
                     f"{c['delta_std']['ours']:.3g} / {c['delta_std']['mergekit']:.3g}")
        else:
            cells = f"{c.get('error', 'not compared')} | | |"
        lines.append(f"| {s['method']} | {s['wall_ratio']:.2f} | {s['cpu_ratio']:.2f} | "
                     f"{med['ours']['peak_rss_mib']:.0f} / "
                     f"{med['mergekit']['peak_rss_mib']:.0f} | {cells} |")
    if result.get("ours_only"):
        lines += ["", ("Methods only this project offers, on the same job (ours only; issue 27's targets: FR ≤ 2 ×, "
                  "FREE ≤ 3 × our task arithmetic):"), "",
                  "| method | median wall s | our task arithmetic s | ratio | target |", "|---|---|---|---|---|"]
        for r in result["ours_only"]:
            ratio = r["ratio_to_task_arithmetic"]
            lines.append(f"| {r['method']} (`{r['ours']}`) | {_fmt(r['median_wall_s'])} | "
                         f"{_fmt(r['task_arithmetic_wall_s'])} | {_fmt(ratio)} | ≤ {r['target_ratio']:.0f} |")
    lines += ["", "Which convention explains each difference:", ""]
    lines += [f"- **{s['method']}**: {BY_NAME[s['method']].convention}{evidence(s.get('comparison', {}))}"
              for s in result["methods"]]
    lines += ["", "Jobs (ours: `cli.py merge --config`; mergekit: `mergekit-yaml`):", "", "```json",
              json.dumps(result["jobs"], indent=1), "```", "", result["last_line"], ""]
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def evidence(c: dict[str, Any]) -> str:
    """What the comparison shows for a method's convention line."""
    said = []
    if "mergekit_rule_recomputed_max_diff" in c:
        said.append("mergekit's rule recomputed here from the inputs differs from mergekit's output by at "
                    "most "
                    f"{c['mergekit_rule_recomputed_max_diff']:.3g}")
    if "threshold_ties_kept_only_by_ours" in c:
        said.append(f"{c['threshold_ties_kept_only_by_ours']} task-vector entries tie with their tensor's "
                    f"threshold beyond mergekit's count (kept by our default trim_ties=keep_all only)")
    return f". Measured: {'; '.join(said)}." if said else ""


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, value in ISSUE_SIZE.items():
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=int, default=value)
    p.add_argument("--methods", default=",".join(m.name for m in SHARED),
                   help=f"comma-separated, of {[m.name for m in SHARED]}")
    p.add_argument("--ours-only", default=",".join(OURS_ONLY),
                   help=f"comma-separated methods timed for ours only, as a ratio to our task arithmetic, of "
                        f"{sorted(OURS_ONLY)} ('' for none)")
    p.add_argument("--repeats", type=int, default=2, help="runs per tool and method, order alternating")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="mergekit's own virtual environment")
    p.add_argument("--no-install", action="store_true", help="skip mergekit when it is not installed")
    p.add_argument("--workdir", type=Path, help="where models and outputs go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--out", type=Path, default=RESULTS / "vs_mergekit", help="results stem (.md, .json)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.methods.split(",")) - set(BY_NAME))
    if unknown:
        p.error(f"--methods: unknown {unknown}; accepted: {sorted(BY_NAME)}")
    unknown = sorted(set(filter(None, args.ours_only.split(","))) - set(OURS_ONLY))
    if unknown:
        p.error(f"--ours-only: unknown {unknown}; accepted: {sorted(OURS_ONLY)}")
    if args.repeats < 1:
        p.error("--repeats must be ≥ 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = [round(x, 2) for x in os.getloadavg()]
    size = {k: getattr(args, k) for k in ISSUE_SIZE}
    plan = llama_plan(**size)
    params = sum(int(_numel(info.shape)) for _, info in plan)
    model_bytes = 2 * params
    command, origin = find_mergekit(args.venv, install=not args.no_install)
    if command is None:
        print(f"mergekit skipped: {origin}", flush=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vs_mergekit_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"writing base + {N_FINETUNED} fine-tunes ({params / 1e6:.1f} M parameters each) to {work}",
              flush=True)
        shard_bytes = model_bytes // 2 + 4096  # two shards a model, for the inputs and both outputs
        dirs = write_models(work / "models", plan, llama_config(**size), N_FINETUNED, shard_bytes)
        base, finetuned = dirs[0], dirs[1:]
        files = {d: shard_files(d) for d in dirs}
        nbytes = {d: sum(f.stat().st_size for f in fs) for d, fs in files.items()}
        base_tensors = OutputTensors(base)
        env = {**os.environ, **ONE_THREAD}
        runs, summaries, jobs, finetuned_tensors = [], [], {}, []
        def publish(ours_only: list[dict[str, Any]], done: bool) -> str:
            """Write the results so far (after every method, so an interrupted run leaves what it measured)."""
            last = worst_line(summaries)
            full = size == ISSUE_SIZE
            scope = ("The issue's size (645 M parameters)." if full else
                     f"A reduced size ({params / 1e6:.0f} M parameters), not the issue's measurement (645 M "
                     "parameters, 5.16 GB of inputs); at small sizes start-up dominates every wall time.")
            if not done:
                scope += " PARTIAL: the run was still going when this was written; methods missing."
            result = {
                "title": "project merge job vs mergekit" + ("" if full else " (reduced size)"), "scope": scope,
                "size": {**size, "parameters": params, "model_bytes": model_bytes}, "repeats": args.repeats,
                "machine": {"nproc": os.cpu_count(), "cpu": _cpu_name(), "platform": platform.platform(),
                            "python": platform.python_version(), "load_start": load_start,
                            "load_end": [round(x, 2) for x in os.getloadavg()]},
                "mergekit": origin if command is not None else f"skipped: {origin}",
                "project_version": _project_version(), "threads": ONE_THREAD, "runs": runs,
                "methods": summaries, "ours_only": ours_only, "jobs": jobs, "last_line": last}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
            if command is not None:
                args.out.with_suffix(".md").write_text(markdown(result))
            return last

        for name in args.methods.split(","):
            method = BY_NAME[name]
            mine, theirs = work / "out" / f"{name}_ours", work / "out" / f"{name}_mergekit"
            ours_yaml = _dump(our_job(method, base, finetuned, mine, shard_bytes), work / f"{name}_ours.yaml")
            mk_job = mergekit_job(method, base, finetuned)
            mk_yaml = _dump(mk_job, work / f"{name}_mergekit.yaml")
            jobs[name] = json.loads(json.dumps({"ours": our_job(method, base, finetuned, mine, shard_bytes),
                                                "mergekit": mk_job}).replace(str(work), "WORK"))
            cmds = {"ours": [sys.executable, *OUR_COMMAND, "--config", str(ours_yaml), "--overwrite", "true",
                             "--progress", "false"]}
            if command is not None:
                cmds["mergekit"] = [*command, str(mk_yaml), str(theirs), "--lazy-unpickle", "--allow-crimes",
                                    "--out-shard-size", str(params // 2 + 1), "-j", "1", "--random-seed", "0",
                                    "--quiet", "--no-copy-tokenizer"]
            read = {"ours": [base, *finetuned], "mergekit": [base, *finetuned] if method.theirs_reads_base
                    else finetuned}
            method_runs = []
            for repeat, tool in alternating(args.repeats):
                if tool not in cmds:
                    continue
                out = mine if tool == "ours" else theirs
                shutil.rmtree(out, ignore_errors=True)
                os.sync()  # no writeback of the models or of an earlier run's output overlaps this run
                sequential_read([f for d in read[tool] for f in files[d]])  # inputs page-cached
                run = run_child(cmds[tool], work / f"{name}_{tool}_{repeat}.log", env)
                in_bytes = sum(nbytes[d] for d in read[tool])
                run.update(method=name, tool=tool, repeat=repeat, input_bytes=in_bytes,
                           input_gb_s=in_bytes / GB / run["wall_s"])
                print(f"{name:16s} {tool:8s} #{repeat}: wall {run['wall_s']:.2f} s, "
                      f"CPU {run['cpu_s']:.2f} s, "
                      f"peak RSS {run['peak_rss_mib']:.0f} MiB, exit {run['exit']}", flush=True)
                if run["exit"] != 0:
                    print(f"  failed; log tail:\n{_tail(work / f'{name}_{tool}_{repeat}.log')}", flush=True)
                method_runs.append(run)
            runs += method_runs
            tools = {r["tool"] for r in method_runs}
            if tools == {"ours", "mergekit"} and all(r["exit"] == 0 for r in method_runs):
                summary = summarise(method, method_runs)
                theirs_tensors = OutputTensors(theirs)
                summary["comparison"] = compare(OutputTensors(mine), theirs_tensors, base_tensors)
                if not method.random:
                    finetuned_tensors = finetuned_tensors or [OutputTensors(d) for d in finetuned]
                    summary["comparison"].update(check_rule(method, theirs_tensors, base_tensors,
                                                            finetuned_tensors))
                summary["random"] = method.random
                summary["convention"] = method.convention
                summaries.append(summary)
            publish([], done=False)
        last = publish(ours_only_rows(args, runs, jobs, work, base, finetuned, files, nbytes, shard_bytes, env),
                       done=True)
        print(f"wrote {args.out.with_suffix('.json')}" + ("" if command is None else " and .md"), flush=True)
        print(last if command is not None else f"mergekit skipped: {origin}", flush=True)
        return 0
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def ours_only_rows(args, runs: list[dict[str, Any]], jobs: dict[str, Any], work: Path, base: Path,
                   finetuned: list[Path], files: dict, nbytes: dict, shard_bytes: int,
                   env: dict[str, str]) -> list[dict[str, Any]]:
    """Time the ``--ours-only`` methods (and our task arithmetic, when the shared runs had none) on the same
    job, order alternating per repeat; per method the median wall and its ratio to our task arithmetic's."""
    names = [m for m in args.ours_only.split(",") if m]
    if not names:
        return []
    have_ta = any(r["method"] == "task_arithmetic" and r["tool"] == "ours" and r["exit"] == 0 for r in runs)
    order = ([] if have_ta else ["task_arithmetic"]) + names
    for repeat in range(args.repeats):
        for name in (order if repeat % 2 == 0 else order[::-1]):
            method, params = (BY_NAME[name].ours, BY_NAME[name].ours_parameters) if name in BY_NAME else \
                OURS_ONLY[name][:2]
            out = work / "out" / f"{name}_ours"
            job = our_job(method, base, finetuned, out, shard_bytes, params)
            jobs.setdefault(name, {"ours": json.loads(json.dumps(job).replace(str(work), "WORK"))})
            yaml_path = _dump(job, work / f"{name}_ours.yaml")
            shutil.rmtree(out, ignore_errors=True)
            sequential_read([f for d in [base, *finetuned] for f in files[d]])
            log = work / f"{name}_ours_{repeat}.log"
            run = run_child([sys.executable, *OUR_COMMAND, "--config", str(yaml_path), "--overwrite", "true",
                             "--progress", "false"], log, env)
            in_bytes = sum(nbytes[d] for d in [base, *finetuned])
            run.update(method=name, tool="ours", repeat=repeat, input_bytes=in_bytes,
                       input_gb_s=in_bytes / GB / run["wall_s"])
            print(f"{name:16s} ours     #{repeat}: wall {run['wall_s']:.2f} s, CPU {run['cpu_s']:.2f} s, "
                  f"peak RSS {run['peak_rss_mib']:.0f} MiB, exit {run['exit']}", flush=True)
            if run["exit"] != 0:
                print(f"  failed; log tail:\n{_tail(log)}", flush=True)
            runs.append(run)

    def median_wall(name: str) -> float | None:
        walls = [r["wall_s"] for r in runs if r["method"] == name and r["tool"] == "ours" and r["exit"] == 0]
        return statistics.median(walls) if walls else None

    ta = median_wall("task_arithmetic")
    rows = []
    for name in names:
        wall = median_wall(name)
        rows.append({"method": name, "ours": OURS_ONLY[name][0], "median_wall_s": wall,
                     "task_arithmetic_wall_s": ta, "target_ratio": OURS_ONLY[name][2],
                     "ratio_to_task_arithmetic": wall / ta if wall is not None and ta else None})
    return rows


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _dump(job: dict[str, Any], path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _project_version() -> str:
    try:
        from freemerge_pl._version import __version__
    except ImportError:
        return "unknown"
    return __version__


if __name__ == "__main__":
    sys.exit(main())
