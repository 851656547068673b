"""Peak memory and input throughput of the streaming merge engine on a ~1.5 B-parameter Llama-shaped model.

Writes a base model and 3 synthetic fine-tunes (bf16, Hugging Face sharded safetensors + index + config.json)
into a temporary directory, generated tensor by tensor with the real Llama key names and shapes (no
``transformers`` model is built; per-tensor seeded generators, so nothing larger than one tensor is ever
held): θ_pre ~ N(0, 0.02²) (norm weights 1), θ_k = bf16(θ_pre + N(0, noise²)). It then times a plain
sequential read of every input shard (64 MiB ``readinto`` chunks), and FREE-Merging through
``stream_merge`` in a child process whose peak RSS (``wait4`` ru_maxrss, and the child's own VmHWM) is
measured alone. Page cache: every input file is read once, untimed, before the timed sequential read, so
both the read and the merge start with warm caches (``--cache cold`` drops the inputs' pages with
``posix_fadvise(DONTNEED)`` before each instead); ``fincore`` residency is recorded before each. The
sequential read is repeated after the merge(s) as a check. ``--trace`` adds a second, instrumented merge
(per-key and per-step time and RSS). The merge children import the package as committed at git HEAD,
frozen at the start (``--code worktree``: the checkout's files), so edits made during a run cannot reach
them. Results go to benchmarks/results/stream_memory.{json,md}.

    python benchmarks/stream_memory.py [--small] [--layers N] [--workdir DIR] [--keep] [--trace]
        [--also-task-arithmetic] [--cache warm|cold] [--code head|worktree] [--threads 2] [--no-save]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import freemerge_pl
from freemerge_pl.io import ShardedSafetensorsSink, write_json_atomic, write_text_atomic
from freemerge_pl.merging.source import TensorInfo, TensorSource

RESULTS = Path(__file__).resolve().parent / "results"
GiB, MiB = 1024**3, 1024**2
CHUNK = 64 * MiB
BASE_STD, NOISE_STD = 0.02, 1e-3

FULL = {"hidden": 2048, "intermediate": 6144, "layers": 28, "heads": 32, "kv_heads": 4, "vocab": 32000}
SMALL = {"hidden": 768, "intermediate": 2048, "layers": 8, "heads": 12, "kv_heads": 4, "vocab": 32000}


# ---------------------------------------------------------------------------------------------- model


def llama_plan(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
               dtype: torch.dtype = torch.bfloat16) -> list[tuple[str, TensorInfo]]:
    """Every tensor of a Llama causal LM (untied lm_head, GQA) in Hugging Face state-dict order."""
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    plan = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        plan += [(p + "self_attn.q_proj.weight", (hidden, hidden)),
                 (p + "self_attn.k_proj.weight", (kv, hidden)),
                 (p + "self_attn.v_proj.weight", (kv, hidden)),
                 (p + "self_attn.o_proj.weight", (hidden, hidden)),
                 (p + "mlp.gate_proj.weight", (intermediate, hidden)),
                 (p + "mlp.up_proj.weight", (intermediate, hidden)),
                 (p + "mlp.down_proj.weight", (hidden, intermediate)),
                 (p + "input_layernorm.weight", (hidden,)),
                 (p + "post_attention_layernorm.weight", (hidden,))]
    plan += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return [(k, TensorInfo(shape, dtype)) for k, shape in plan]


def llama_config(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}


def seeded(model: int, index: int) -> torch.Generator:
    """The generator of tensor ``index`` of model ``model`` (0 = θ_pre, k = fine-tune k's noise)."""
    return torch.Generator().manual_seed(1_000_003 * model + index)


def base_tensor(key: str, info: TensorInfo, index: int) -> torch.Tensor:
    if key.endswith("norm.weight"):
        return torch.ones(info.shape)
    return torch.randn(info.shape, generator=seeded(0, index)).mul_(BASE_STD)


def write_models(root: Path, plan, config: dict, n_finetuned: int, shard_bytes: int) -> list[Path]:
    """θ_pre and ``n_finetuned`` fine-tunes, one tensor at a time into one sink per model (fp32 θ_pre of one
    tensor plus one noise tensor in memory); returns the model directories."""
    dirs = [root / "base"] + [root / f"finetuned_{k}" for k in range(1, n_finetuned + 1)]
    sinks = [ShardedSafetensorsSink(d, plan, max_shard_bytes=shard_bytes, fingerprint="") for d in dirs]
    for index, (key, info) in enumerate(plan):
        base = base_tensor(key, info, index)
        sinks[0].write(key, base.to(info.dtype))
        for k, sink in enumerate(sinks[1:], start=1):
            noise = torch.randn(info.shape, generator=seeded(k, index))
            sink.write(key, noise.mul_(NOISE_STD).add_(base).to(info.dtype))
            del noise
        del base
    for d, sink in zip(dirs, sinks):
        sink.close()
        write_json_atomic(config, d / "config.json")
    return dirs


def shard_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("model*.safetensors"))


# ---------------------------------------------------------------------------------------------- reading


def sequential_read(files: list[Path]) -> tuple[int, float]:
    """Bytes and seconds of reading every file in turn in 64 MiB ``readinto`` chunks (one reused buffer)."""
    buf = memoryview(bytearray(CHUNK))
    total = 0
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total, time.perf_counter() - start


def drop_cache(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(files: list[Path]) -> float | None:
    """Share of the files' bytes in the page cache (util-linux ``fincore``), None when unavailable."""
    if shutil.which("fincore") is None:
        return None
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE",
                              *map(str, files)], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    res = size = 0
    for line in out.split("\n"):
        if line.strip():
            r, s = line.split()
            res, size = res + int(r), size + int(s)
    return res / size if size else None


def prepare_cache(files: list[Path], mode: str) -> float | None:
    """Warm: read every file once (untimed); cold: drop its pages. Returns the resident share after."""
    if mode == "warm":
        sequential_read(files)
    else:
        drop_cache(files)
    return resident_fraction(files)


# ---------------------------------------------------------------------------------------------- child


def status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def key_kind(key: str) -> str:
    return re.sub(r"^model\.layers\.\d+\.", "layers.*.", key)


OTHER = "other (not in a traced step: expert entries read back and stored, output casts, bookkeeping)"


class Tracer:
    """Per key and per step: wall time and RSS high-water mark (sampled every ~2 ms by a thread).

    A key becomes current when θ_pre's tensor for it is read (the first read of every key in every pass);
    a pass starts when the first key is read again. Steps are the wrapped engine functions (``traced``),
    timed exclusively (a nested step's time is not counted in its caller's); the rest is ``OTHER``."""

    def __init__(self, first_key: str, interval: float = 0.002) -> None:
        self.first_key = first_key
        self.interval = interval
        self.passes = 0
        self.current: tuple[int, str] | None = None
        self.switched = self.step_switched = time.perf_counter()
        self.per_key: dict[tuple[int, str], dict] = {}
        self.stack: list[str] = []
        self.steps: dict[str, dict] = {}
        self.read_bytes = self.write_bytes = 0
        self.peak = (rss_bytes(), "before the first key", OTHER)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _step(self, name: str) -> dict:
        return self.steps.setdefault(name, {"seconds": 0.0, "calls": 0, "peak_rss": 0})

    def _sample(self) -> None:
        while not self._stop.is_set():
            r = rss_bytes()
            with self.lock:
                if self.current is not None:
                    entry = self.per_key[self.current]
                    entry["peak_rss"] = max(entry["peak_rss"], r)
                step = self._step(self.stack[-1] if self.stack else OTHER)
                step["peak_rss"] = max(step["peak_rss"], r)
                if r > self.peak[0]:
                    self.peak = (r, self.current, self.stack[-1] if self.stack else OTHER)
            self._stop.wait(self.interval)

    def _account_step(self, now: float) -> None:
        self._step(self.stack[-1] if self.stack else OTHER)["seconds"] += now - self.step_switched
        self.step_switched = now

    def push(self, name: str) -> None:
        now = time.perf_counter()
        with self.lock:
            self._account_step(now)
            self.stack.append(name)
            self._step(name)["calls"] += 1

    def pop(self) -> None:
        now = time.perf_counter()
        with self.lock:
            self._account_step(now)
            self.stack.pop()

    def traced(self, fn, name: str):
        def wrapper(*args, **kwargs):
            self.push(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.pop()
        return wrapper

    def _close_current(self, now: float) -> None:
        if self.current is not None:
            self.per_key[self.current]["seconds"] += now - self.switched

    def enter(self, key: str) -> None:
        now = time.perf_counter()
        r = rss_bytes()
        with self.lock:
            if key == self.first_key:
                self.passes += 1
            self._close_current(now)
            self.current = (self.passes, key)
            self.switched = now
            self.per_key.setdefault(self.current, {"seconds": 0.0, "rss_start": r, "peak_rss": r})

    def finish(self) -> None:
        now = time.perf_counter()
        with self.lock:
            self._close_current(now)
            self._account_step(now)
            self.current = None
        self._stop.set()
        self._thread.join()

    def summary(self, shapes: dict[str, tuple[int, ...]]) -> dict:
        passes: dict[int, dict] = {}
        kinds: dict[str, dict] = {}
        for (p, key), e in self.per_key.items():
            ps = passes.setdefault(p, {"seconds": 0.0, "peak_rss_gib": 0.0, "keys": 0})
            ps["seconds"] += e["seconds"]
            ps["peak_rss_gib"] = max(ps["peak_rss_gib"], e["peak_rss"] / GiB)
            ps["keys"] += 1
            fresh = {"seconds": 0.0, "peak_rss_gib": 0.0, "count": 0, "numel": math.prod(shapes[key])}
            kk = kinds.setdefault(f"pass {p}: {key_kind(key)}", fresh)
            kk["seconds"] += e["seconds"]
            kk["peak_rss_gib"] = max(kk["peak_rss_gib"], e["peak_rss"] / GiB)
            kk["count"] += 1
        top = sorted(self.per_key.items(), key=lambda kv: -kv[1]["peak_rss"])[:8]
        last_pass = max(passes) if passes else 0
        starts = [(key, e["rss_start"]) for (p, key), e in self.per_key.items() if p == last_pass]
        steps = {name: {"seconds": v["seconds"], "calls": v["calls"], "peak_rss_gib": v["peak_rss"] / GiB}
                 for name, v in sorted(self.steps.items(), key=lambda kv: -kv[1]["seconds"])}
        peak_key = list(self.peak[1]) if isinstance(self.peak[1], tuple) else self.peak[1]
        return {
            "passes": {str(p): v for p, v in sorted(passes.items())},
            "steps": steps,
            "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1]["seconds"])),
            "top_keys_by_peak_rss": [{"pass": p, "key": k, "peak_rss_gib": e["peak_rss"] / GiB,
                                      "rss_at_key_start_gib": e["rss_start"] / GiB, "seconds": e["seconds"]}
                                     for (p, k), e in top],
            "peak_rss_gib": self.peak[0] / GiB,
            "peak_at": {"key": peak_key, "step": self.peak[2]},
            "merge_pass_rss_at_first_key_gib": starts[0][1] / GiB if starts else None,
            "merge_pass_rss_at_last_key_gib": starts[-1][1] / GiB if starts else None,
            "read_bytes": self.read_bytes, "write_bytes": self.write_bytes,
        }


class TracedSource(TensorSource):
    """A source that reports its reads to a ``Tracer`` (θ_pre's reads also switch the current key)."""

    def __init__(self, inner: TensorSource, tracer: Tracer, is_base: bool) -> None:
        self.inner, self.tracer, self.is_base, self.name = inner, tracer, is_base, inner.name
        self._get = tracer.traced(inner.get, "read (file → tensor)")

    def keys(self):
        return self.inner.keys()

    def __contains__(self, key) -> bool:
        return key in self.inner

    def info(self, key):
        return self.inner.info(key)

    def get(self, key):
        if self.is_base:
            self.tracer.enter(key)
        out = self._get(key)
        self.tracer.read_bytes += out.numel() * out.element_size()
        return out


#: engine steps the tracer times, where they exist in the running engine: (module, attribute, label); a
#: function is wrapped wherever the package holds it (also where another module imported it by name)
TRACED_STEPS = [
    ("freemerge_pl.merging.method", "KeyTensors.vector", "task vector θ_k − θ_pre (+ θ_pre → fp32)"),
    ("freemerge_pl.merging.engine", "all_finite", "finite check"),
    ("torch", "isfinite", "finite check (torch.isfinite)"),
    ("freemerge_pl.merging.method", "KeyTensors.weighted_sum", "Σ_k w_k v_k, block by block (+ θ_k − θ_pre)"),
    ("freemerge_pl.merging.topk", "chunked_abs_sum", "Σ|v| (λ)"),
    ("freemerge_pl.merging.topk", "sampled_cut", "expert cut (k-th largest |v| and its indices; its Σ|v| apart)"),
    ("freemerge_pl.merging.topk", "topk_cut", "expert cut, histogram (when the sample misjudges)"),
    ("freemerge_pl.merging.topk", "selection_entries", "expert cut (indices ≥ threshold)"),
    ("freemerge_pl.merging.fourier", "Spectrum.highpass", "FFT high-pass"),
    ("freemerge_pl.merging.engine", "apply_key", "θ_pre + delta → out dtype"),
    ("freemerge_pl.merging.engine", "add_pretrained_", "θ_pre + delta (in place)"),
]


def instrument(tracer: Tracer, stream_module) -> list[str]:
    """Wrap the engine's per-tensor steps (``TRACED_STEPS``) in this child process; returns those found."""
    import importlib

    found = []
    for module_name, attr, label in TRACED_STEPS:
        module = importlib.import_module(module_name)
        owner_name, _, name = attr.rpartition(".")
        owner = getattr(module, owner_name, None) if owner_name else module
        fn = getattr(owner, name, None) if owner is not None else None
        if fn is None:
            continue
        wrapped = tracer.traced(fn, label)
        if owner_name:  # a method: patch the class
            setattr(owner, name, wrapped)
        else:  # a function: patch every package module (and torch) holding this very object
            holders = [m for n, m in list(sys.modules.items()) if n.startswith("freemerge_pl") and m]
            for holder in [*holders, module]:
                for key, value in list(vars(holder).items()):
                    if value is fn:
                        setattr(holder, key, wrapped)
        found.append(label)
    base_sink = stream_module.ShardedSafetensorsSink
    write = tracer.traced(base_sink.write, "sink write (incl. fsync)")

    class TimedSink(base_sink):
        def write(self, key, tensor, state=None):
            write(self, key, tensor, state)
            tracer.write_bytes += tensor.numel() * tensor.element_size()

    stream_module.ShardedSafetensorsSink = TimedSink
    return [*found, "sink write (incl. fsync)", "read (file → tensor)"]


def child_main(spec_path: str) -> None:
    """One merge, alone in this process; results as JSON at ``spec["result"]``."""
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    from freemerge_pl.io import open_checkpoint
    from freemerge_pl.jobs import stream as stream_module
    from freemerge_pl.merging import build_method

    rss_ready = status_kib("VmRSS")
    method = build_method(spec["method"])
    tracer = None
    if spec["trace"]:
        tracer = Tracer(first_key=open_checkpoint(spec["base"]).keys()[0])
        traced_steps = instrument(tracer, stream_module)

    start = time.perf_counter()
    base = open_checkpoint(spec["base"])
    fts = [open_checkpoint(d) for d in spec["finetuned"]]
    if tracer is not None:
        base = TracedSource(base, tracer, True)
        fts = [TracedSource(s, tracer, False) for s in fts]
    result = stream_module.stream_merge(base, fts, method, spec["out"], dtype=torch.bfloat16,
                                        max_shard_bytes=spec["max_shard_bytes"], progress=spec["progress"])
    seconds = time.perf_counter() - start
    if tracer is not None:
        tracer.finish()
    experts = result.result.task_modules or []
    expert_bytes = [sum(b.numel() * b.element_size() for b in e.buffers()) for e in experts]
    out = {
        "seconds": seconds,
        "vm_hwm_kib": status_kib("VmHWM"),
        "rss_after_imports_kib": rss_ready,
        "files": [str(f) for f in result.files],
        "output_bytes": sum(Path(f).stat().st_size for f in result.files),
        "experts": len(experts),
        "expert_nnz_per_task": [int(e.nnz) for e in experts],
        "expert_bytes_per_task": expert_bytes,
        "torch_threads": torch.get_num_threads(),
        "package_sources_sha256": package_sources_sha256(),
    }
    if tracer is not None:
        shapes = {k: tuple(base.info(k).shape) for k in base}
        out["trace"] = {**tracer.summary(shapes), "traced_steps": traced_steps}
    write_json_atomic(out, spec["result"])


def run_child(spec: dict, workdir: Path, tag: str) -> dict:
    """Run one merge in a fresh interpreter; its ru_maxrss comes from ``wait4`` (that child alone)."""
    spec = {**spec, "result": str(workdir / f"{tag}.result.json")}
    spec_path = workdir / f"{tag}.spec.json"
    write_json_atomic(spec, spec_path)
    sys.stdout.flush()
    start = time.perf_counter()
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)]
    path = os.pathsep.join(filter(None, [spec["code"], os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}  # the frozen engine (``snapshot_code``) comes first
    pid = os.posix_spawn(sys.executable, argv, env)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"the {tag} child process failed with exit code {code}")
    out = json.loads(Path(spec["result"]).read_text())
    out.update({"ru_maxrss_kib": usage.ru_maxrss, "process_seconds": wall,
                "child_cpu_seconds": usage.ru_utime + usage.ru_stime})
    return out


# ---------------------------------------------------------------------------------------------- main


def package_sources_sha256(root: Path | None = None) -> str:
    """sha256 over the package's .py files (names and bytes; default: the imported package's): which engine
    code a process ran."""
    import hashlib

    root = root or Path(freemerge_pl.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def snapshot_code(dest: Path, mode: str) -> dict:
    """Freeze the engine the merge children import: ``head``, the package as committed at git HEAD
    (``git archive``), or ``worktree``, the checkout's files now; edits made during the run cannot reach
    them."""
    import io
    import tarfile

    repo = Path(freemerge_pl.__file__).resolve().parent.parent
    state = git_state()
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if mode == "head" and state["commit"]:
        data = subprocess.run(["git", "archive", "--format=tar", state["commit"], "freemerge_pl"], cwd=repo,
                              capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(dest, filter="data")
        source = f"git commit {state['commit'][:10]} (committed files only)"
    else:
        shutil.copytree(repo / "freemerge_pl", dest / "freemerge_pl",
                        ignore=shutil.ignore_patterns("__pycache__"))
        dirty = " plus uncommitted package changes" if state["package_uncommitted_changes"] else ""
        source = f"working tree at commit {(state['commit'] or 'unknown')[:10]}{dirty}"
    return {**state, "mode": mode, "source": source,
            "package_sources_sha256": package_sources_sha256(dest / "freemerge_pl")}


def git_state() -> dict:
    """The checkout's commit and whether the package has uncommitted changes (read-only git queries)."""
    root = Path(freemerge_pl.__file__).resolve().parent.parent

    def git(*argv):
        try:
            return subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None

    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", "freemerge_pl")
    return {"commit": head.strip() if head else None,
            "package_uncommitted_changes": None if status is None else bool(status.strip())}


def machine() -> dict:
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "memory_bytes": mem, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "package_version": freemerge_pl.__version__, "load_average_1min": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--small", action="store_true", help="~100 M parameters (8 layers, hidden 768)")
    parser.add_argument("--workdir", type=Path, default=None, help="for the models (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (models and outputs)")
    parser.add_argument("--also-task-arithmetic", action="store_true", help="also stream task arithmetic")
    parser.add_argument("--trace", action="store_true", help="add an instrumented FREE-Merging run")
    parser.add_argument("--cache", choices=["warm", "cold"], default="warm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--code", choices=["head", "worktree"], default="head",
                        help="engine the merges run: the package at git HEAD, or the checkout's files now")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--shard-mib", type=int, default=None,
                        help="input and output shard size (default 2048, 64 with --small)")
    parser.add_argument("--no-save", action="store_true", help="do not write the results files")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child_main(args.child)
        return

    torch.set_num_threads(args.threads)
    shape = dict(SMALL if args.small else FULL)
    if args.layers is not None:
        shape["layers"] = args.layers
    shard_bytes = (args.shard_mib or (64 if args.small else 2048)) * MiB
    plan = llama_plan(**shape)
    n_params = sum(info.numel for _, info in plan)
    largest_key, largest = max(plan, key=lambda kv: kv[1].numel)
    print(f"Llama-shaped model {shape}: {n_params:,} parameters in {len(plan)} tensors; largest "
          f"{largest_key} {list(largest.shape)} = {largest.numel * 4 / MiB:.0f} MiB in fp32", flush=True)

    created = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="stream_memory_")) if created else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args, shape, plan, n_params, largest_key, largest, shard_bytes, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir / "models", ignore_errors=True)
            shutil.rmtree(workdir / "outputs", ignore_errors=True)
            shutil.rmtree(workdir / "code", ignore_errors=True)
            if created:
                shutil.rmtree(workdir, ignore_errors=True)
    report(args, result)


def run(args, shape, plan, n_params, largest_key, largest, shard_bytes, workdir: Path) -> dict:
    code = snapshot_code(workdir / "code", args.code)
    print(f"merge children import the engine from {code['source']}", flush=True)
    start = time.perf_counter()
    dirs = write_models(workdir / "models", plan, llama_config(**shape), args.tasks, shard_bytes)
    gen_seconds = time.perf_counter() - start
    files = [f for d in dirs for f in shard_files(d)]
    input_bytes = sum(f.stat().st_size for f in files)
    print(f"wrote {len(dirs)} models ({len(shard_files(dirs[0]))} shards each), {input_bytes / GiB:.2f} GiB, "
          f"in {gen_seconds:.1f} s", flush=True)

    resident = {"sequential_read": prepare_cache(files, args.cache)}
    read_bytes, read_seconds = sequential_read(files)
    assert read_bytes == input_bytes
    print(f"sequential read: {read_seconds:.2f} s, {input_bytes / read_seconds / GiB:.2f} GiB/s", flush=True)

    spec = {"code": str(workdir / "code"), "base": str(dirs[0]), "finetuned": [str(d) for d in dirs[1:]],
            "threads": args.threads,
            "max_shard_bytes": shard_bytes, "progress": True, "trace": False}
    methods = ["free_merging"] + (["task_arithmetic"] if args.also_task_arithmetic else [])
    runs = {}
    for name in methods + (["free_merging_traced"] if args.trace else []):
        method = name.removesuffix("_traced")
        out_dir = workdir / "outputs" / name
        resident[name] = prepare_cache(files, args.cache)
        child = {**spec, "method": method, "out": str(out_dir), "trace": name.endswith("_traced")}
        runs[name] = run_child(child, workdir, name)
        r = runs[name]
        print(f"{name}: {r['seconds']:.1f} s, peak RSS {r['ru_maxrss_kib'] / 2**20:.2f} GiB", flush=True)
        if not args.keep:
            shutil.rmtree(out_dir, ignore_errors=True)  # its pages would compete with the inputs' pages

    resident["sequential_read_after"] = prepare_cache(files, args.cache)
    _, read_after = sequential_read(files)
    for r in runs.values():
        r["input_throughput_bytes_per_s"] = input_bytes / r["seconds"]
        r["ratio_to_sequential_read"] = read_seconds / r["seconds"]
        r["ratio_to_sequential_read_after"] = read_after / r["seconds"]
        r["peak_rss_gib"] = r["ru_maxrss_kib"] / 2**20
    cache_note = ("warm for both: every input file was read once, untimed, right before the timed sequential "
                  "read and again right before each merge" if args.cache == "warm" else
                  "cold for both: the input files' pages were dropped (posix_fadvise DONTNEED) right before "
                  "the timed sequential read and before each merge (the host may still cache them)")
    return {
        "model": {"architecture": "Llama-shaped (LlamaForCausalLM keys, untied lm_head, GQA)", **shape,
                  "head_dim": shape["hidden"] // shape["heads"], "dtype": "bfloat16"},
        "small": args.small,
        "parameters": n_params,
        "tensors": len(plan),
        "largest_tensor": {"key": largest_key, "shape": list(largest.shape), "fp32_bytes": largest.numel * 4},
        "finetuned_models": args.tasks,
        "synthetic": f"θ_pre ~ N(0, {BASE_STD}²) (norms 1), θ_k = bf16(θ_pre + N(0, {NOISE_STD}²)), "
                     f"per-tensor seeded generators",
        "shards_per_model": len(shard_files(dirs[0])),
        "shard_bytes_max": shard_bytes,
        "model_bytes": input_bytes // len(dirs),
        "input_bytes": input_bytes,
        "generation_seconds": gen_seconds,
        "cache": args.cache,
        "cache_note": cache_note,
        "resident_fraction_before": resident,
        "sequential_read_seconds": read_seconds,
        "sequential_read_bytes_per_s": input_bytes / read_seconds,
        "sequential_read_after_seconds": read_after,
        "read_chunk_bytes": CHUNK,
        "merge_settings": {"dtype": "bfloat16", "max_shard_bytes": shard_bytes, "method_args": "defaults",
                           "expert_density": 0.01},
        "runs": runs,
        "goals": {"peak_rss_gib_max": 1.5, "throughput_ratio_min": 0.5},
        "torch_threads": args.threads,
        "machine": machine(),
        "code": {**code, "same_sources_in_every_child": all(
            r["package_sources_sha256"] == code["package_sources_sha256"] for r in runs.values())},
    }


def run_rows(name: str, r: dict) -> list[tuple[str, str]]:
    label = name.replace("_", " ")
    wall = (f"{r['seconds']:.1f} s (child process {r['process_seconds']:.1f} s, "
            f"CPU {r['child_cpu_seconds']:.0f} s)")
    ratio = (f"{r['ratio_to_sequential_read']:.3f} ({r['ratio_to_sequential_read_after']:.3f} against the "
             f"repeated read)")
    rss = (f"{r['peak_rss_gib']:.2f} GiB (VmHWM {r['vm_hwm_kib'] / 2**20:.2f} GiB; "
           f"{r['rss_after_imports_kib'] / 2**20:.2f} GiB after imports)")
    rows = [(f"{label}: wall (stream_merge call)", wall),
            (f"{label}: input throughput", f"{r['input_throughput_bytes_per_s'] / GiB:.3f} GiB/s"),
            (f"{label}: input throughput / sequential read", ratio),
            (f"{label}: peak RSS (child)", rss),
            (f"{label}: output", f"{r['output_bytes'] / GiB:.2f} GiB in {len(r['files'])} file(s)")]
    if r["experts"]:
        experts = (f"{r['experts']} × {r['expert_nnz_per_task'][0]:,} entries, "
                   f"{r['expert_bytes_per_task'][0] / MiB:.0f} MiB each")
        rows.append((f"{label}: experts", experts))
    return rows


def report(args, res: dict) -> None:
    m, runs, mach = res["model"], res["runs"], res["machine"]
    free = runs["free_merging"]
    big = res["largest_tensor"]
    n = res["parameters"]
    read = f"{res['sequential_read_seconds']:.2f} s, {res['sequential_read_bytes_per_s'] / GiB:.2f} GiB/s"
    rows = [
        ("parameters", f"{n:,} ({n / 1e9:.3f} B) in {res['tensors']} tensors"),
        ("one model (bf16)", f"{res['model_bytes'] / GiB:.2f} GiB in {res['shards_per_model']} shard(s)"),
        (f"input: θ_pre + {res['finetuned_models']} fine-tunes", f"{res['input_bytes'] / GiB:.2f} GiB"),
        ("largest tensor", f"{big['key']} {big['shape']}: {big['fp32_bytes'] / MiB:.0f} MiB in fp32"),
        ("sequential read (64 MiB readinto)", read),
        ("sequential read, repeated after the merges", f"{res['sequential_read_after_seconds']:.2f} s"),
    ]
    for name, r in runs.items():
        rows += run_rows(name, r)
    rss_ok, ratio_ok = free["peak_rss_gib"] <= 1.5, free["ratio_to_sequential_read"] >= 0.5
    rows += [("goal: peak RSS ≤ 1.5 GiB", "met" if rss_ok else "**missed**"),
             ("goal: throughput ratio ≥ 0.5", "met" if ratio_ok else "**missed**")]
    resident = ", ".join(f"{k} {v:.0%}" for k, v in res["resident_fraction_before"].items() if v is not None)
    setup = (f"Llama-shaped model (hidden {m['hidden']}, intermediate {m['intermediate']}, "
             f"{m['layers']} layers, {m['heads']} heads / {m['kv_heads']} KV heads, vocab {m['vocab']}, "
             f"untied lm_head), bf16; "
             f"{res['synthetic']}. FREE-Merging (registry defaults, expert_density 0.01) via stream_merge, "
             f"bf16 output, shards ≤ {res['shard_bytes_max'] / MiB:.0f} MiB, in a child process. "
             f"{mach['cpu']} ({mach['cpu_count']} cores, {res['torch_threads']} torch threads, "
             f"{(mach['memory_bytes'] or 0) / GiB:.0f} GiB RAM, "
             f"load average {mach['load_average_1min']:.1f}), "
             f"torch {mach['torch']}. Page cache {res['cache_note']}; resident share of the inputs before "
             f"each measurement (fincore): {resident or 'n/a'}. Throughput = input bytes (4 models) / wall "
             f"time of the stream_merge call (header parsing included, interpreter start and imports not).")
    code = res["code"]
    setup += (f" Engine the merges ran: {code['source']}, frozen at the start; "
              + ("every merge child ran these sources." if code["same_sources_in_every_child"] else
                 "**the merge children ran different sources**."))
    title = "# Streaming merge memory and throughput" + (" (--small)" if res["small"] else "")
    table = [f"| {a} | {b} |" for a, b in rows]
    lines = [title, "", setup, "", "| measure | value |", "|---|---|", *table, ""]
    traced = runs.get("free_merging_traced", {}).get("trace")
    if traced:
        lines += trace_lines(traced)
    lines += [f"peak RSS GiB: {free['peak_rss_gib']:.2f}",
              f"input throughput / sequential read: {free['ratio_to_sequential_read']:.2f}"]
    markdown = "\n".join(lines) + "\n"
    if not args.no_save:
        write_json_atomic(res, RESULTS / "stream_memory.json")
        write_text_atomic(markdown, RESULTS / "stream_memory.md")
    print(markdown, end="")


def trace_lines(t: dict) -> list[str]:
    at = t["peak_at"]
    intro = (f"Same merge with the engine's steps wrapped (timed exclusively: a nested step's time is not in "
             f"its caller's) and RSS sampled every ~2 ms; peak {t['peak_rss_gib']:.2f} GiB at key "
             f"{at['key']}, step {at['step']!r}. Read {t['read_bytes'] / GiB:.1f} GiB, wrote "
             f"{t['write_bytes'] / GiB:.1f} GiB. RSS at the start of the merge pass's first key "
             f"{t['merge_pass_rss_at_first_key_gib']:.2f} GiB, of its last key "
             f"{t['merge_pass_rss_at_last_key_gib']:.2f} GiB (expert entries, allocator retention).")
    total = sum(v["seconds"] for v in t["steps"].values()) or 1.0
    by_time = sorted(t["steps"].items(), key=lambda kv: -kv[1]["seconds"])
    steps = [f"| {name} | {v['calls'] or '—'} | {v['seconds']:.1f} | {v['seconds'] / total:.0%} | "
             f"{v['peak_rss_gib']:.2f} GiB |" for name, v in by_time]
    passes = [f"| {p} | {v['keys']} | {v['seconds']:.1f} | {v['peak_rss_gib']:.2f} GiB |"
              for p, v in t["passes"].items()]
    kinds = [f"| {k} | {v['count']} | {v['numel']:,} | {v['seconds']:.1f} | "
             f"{v['seconds'] / (v['count'] * v['numel']) * 1e9:.0f} | {v['peak_rss_gib']:.2f} GiB |"
             for k, v in sorted(t["kinds"].items()) if v["numel"] >= 1 << 16]
    top = [f"| {e['pass']} | {e['key']} | {e['peak_rss_gib']:.2f} GiB | "
           f"{e['rss_at_key_start_gib']:.2f} GiB | {e['seconds']:.2f} |" for e in t["top_keys_by_peak_rss"]]
    return ["## Instrumented FREE-Merging run (--trace)", "", intro, "",
            "| step | calls | seconds | share | peak RSS during it |", "|---|---|---|---|---|", *steps, "",
            "| pass | keys | seconds | peak RSS |", "|---|---|---|---|", *passes, "",
            "| pass: tensor kind (≥ 65 536 elements) | count | numel each | seconds | ns per element |"
            + " peak RSS |",
            "|---|---|---|---|---|---|", *kinds, "",
            "| pass | key (top by peak RSS) | peak RSS | RSS at key start | seconds |",
            "|---|---|---|---|---|", *top, ""]


if __name__ == "__main__":
    main()
