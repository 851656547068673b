"""The checkpoint merge job: ``python cli.py merge --config merge.yaml`` for Hugging Face (causal-LM or any
safetensors) directories, streamed tensor by tensor, in the YAML shape mergekit users know::

    base_model: meta-llama/Llama-2-13b-hf          # a local directory (or one .safetensors/.bin file)
    models:
      - model: ./WizardLM-13B                      # or just the path; optional name, parameters.weight
        name: wizard
      - model: ./WizardMath-13B
    merge_method: free_merging                     # any registered method (merging.list_methods())
    parameters: {filter_ratio: 0.3, expert_density: 0.01}   # that method's typed settings
    dtype: bfloat16                                # output dtype (default: the base model's)
    out_shard_size: 5GB
    device: cpu                                    # cuda: each tensor's maths on the GPU
    output_dir: ./merged

Before any heavy work every input is checked (files present and readable, keys, shapes, dtypes,
vocabulary sizes, the method's settings, free disk space), and ``--dry-run`` stops there. The output is
built in a hidden sibling ``.<name>.partial/`` (shards written atomically; a journal records each complete
one) and renamed into place only when complete, after ``merge_info.json`` (every file with its size and
sha256, the config, the method record) is written; rerunning an interrupted job resumes from the last
complete shard (logged: ``resuming: N of M tensors already written``) and produces the same bytes, manifest
included (it records nothing run-dependent). The job holds the output's lock (``freemerge_pl.io.output_lock``)
for its whole run: a second job or export into the same output is refused at once, naming the running
process; a killed job's lock is taken over by the rerun. Pickled ``.bin`` checkpoints (a whole module saved
with ``torch.save``) are read only with ``allow_pickle: true`` (it executes code from the file). Config,
tokenizer and other non-weight files are copied from the base directory. Methods with task modules
(FREE-Merging's experts, EMR, Twin) write them beside the backbone as the export format does
(``task_module_<k>.safetensors``, listed in the manifest's ``task_module_files``);
``freemerge_pl.io.read_export`` / ``load_merged`` read the output back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from freemerge_pl._version import __version__
from freemerge_pl.errors import CheckpointMismatchError, ConfigError, FreeMergeError
from freemerge_pl.io.checkpoints import DEFAULT_SHARD_BYTES, PickledObjectsError, open_checkpoint
from freemerge_pl.io.export import save_task_modules
from freemerge_pl.io.files import (
    MANIFEST_NAME,
    check_output_dir,
    publish_directory,
    staging_dir,
    write_json_atomic,
)
from freemerge_pl.io.lock import output_lock
from freemerge_pl.jobs.stream import output_plan, stream_merge
from freemerge_pl.merging.engine import (
    CheckpointInputs,
    check_prefilter,
    prefilter_transform,
    preflight,
)
from freemerge_pl.merging.registry import build_method
from freemerge_pl.merging.source import TensorInfo, TensorSource
from freemerge_pl.settings import Range, check_fields

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
log = logging.getLogger("freemerge_pl.merge")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"``, ``"500MB"``, ``"2GiB"`` (decimal units, ``i``: binary)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError(f"out_shard_size={value} must be positive")
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ConfigError(f"out_shard_size={value!r} is not a size (e.g. 5GB, 500MB, 2GiB, or bytes)")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), bool(match.group(3))
    size = int(number * (1024 if binary else 1000) ** " KMGT".index(unit or " "))
    if size <= 0:
        raise ConfigError(f"out_shard_size={value!r} must be positive")
    return size


@dataclass
class ModelEntry:
    """One fine-tuned model of a merge job (in YAML a plain path, or a mapping with these fields).

    Args:
        model: the fine-tuned checkpoint: a Hugging Face directory or one .safetensors/.bin file.
        name: the task's name in the outputs (default: the directory or file name).
        parameters: mergekit-style per-model parameters; ``weight``: its weight, for methods that take
            ``weights``.
    """

    model: str
    name: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self, "models[]")
        unknown = sorted(set(self.parameters) - {"weight"})
        if unknown:
            raise ConfigError(f"models[{self.model!r}].parameters: unknown {unknown}; accepted: ['weight']")


@dataclass
class MergeJobConfig:
    """The settings of a checkpoint merge job: the keys of its mergekit-style YAML file.

    Args:
        base_model: the pre-trained checkpoint: a Hugging Face directory or one .safetensors/.bin file.
        models: the fine-tuned checkpoints: paths, or mappings ``{model: path, name: ..., parameters:
            {weight: ...}}``.
        merge_method: a registered method (``freemerge_pl.merging.list_methods()``).
        parameters: the method's hyperparameters (its typed settings, checked before any tensor is read).
        dtype: the output dtype (default: the base model's).
        out_shard_size: the largest output shard, as bytes or a size such as ``5GB``, ``500MB``, ``2GiB``.
        device: where each tensor's maths runs (``cpu``, ``cuda``, ``cuda:1``).
        output_dir: the output directory, published whole when complete (required: here or on the
            command line).
        exclude_keys: regular expressions of keys copied from the base model instead of merged.
        fr_filter_ratio: an FR high-pass applied to every task vector before the method (0 = off).
        seed: the seed of random methods (DARE's drop mask).
        vocab_mismatch: ``error``, or ``truncate_or_pad`` fine-tuned vocabulary-sized tensors to the base's
            rows.
        allow_mixed_dtypes: accept fine-tuned tensors whose dtype differs from the base's.
        check_finite: refuse NaN/Inf in the merged inputs, checked on each tensor as the merge pass reads it
            (the output is published only when complete: a bad tensor ends the job before that).
        copy_files: copy the base directory's config, tokenizer and other non-weight files to the output.
        allow_pickle: read ``.bin``/``.pt`` checkpoints that hold pickled Python objects (a whole module saved
            with ``torch.save(model)``); unpickling executes code from the file: only for files you trust.
        low_memory: give freed memory back to the OS after every tensor: peak RSS 20-30 % lower, CPU time
            1.15-1.5 × (measured on an 84 M-parameter Llama: every large buffer is then a fresh mapping the
            kernel zero-fills). Without it, the buffers of outsized (vocabulary-sized) tensors of 32 MiB or
            more still get their own mappings: on a heap fragmented by the keys before, they set the peak.
        prefetch: read the next tensor's inputs (and check them for NaN/Inf) on a second thread while the current
            one is computed; peak RSS grows by one tensor's inputs. No gain was measurable on a 2-core machine,
            loaded or idle (285 M-parameter Llama, page-cached, 1 thread: task arithmetic 5.8-6.1 s either way,
            TIES 63.8 s off, 65.5 s on; the shard writer already uses the second core); it may help where reads
            are slow or a core is free.
    """

    base_model: str
    models: list[ModelEntry | str]
    merge_method: str = "free_merging"
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    out_shard_size: int | str = DEFAULT_SHARD_BYTES
    device: str = "cpu"
    output_dir: str | None = None
    exclude_keys: list[str] = field(default_factory=list)
    fr_filter_ratio: Annotated[float, Range(0, 1, high_open=True)] = 0.0
    seed: int = 0
    vocab_mismatch: Literal["error", "truncate_or_pad"] = "error"
    allow_mixed_dtypes: bool = False
    check_finite: bool = True
    copy_files: bool = True
    allow_pickle: bool = False
    low_memory: bool = False
    prefetch: bool = False

    def __post_init__(self) -> None:
        self.models = [m if isinstance(m, ModelEntry) else
                       ModelEntry(m) if isinstance(m, str) else self._entry(m) for m in self.models]
        check_fields(self, "merge config")
        if not self.models:
            raise ConfigError("merge config: models is empty; list at least one fine-tuned model")
        self.shard_bytes = parse_size(self.out_shard_size)
        names = self.names
        if len(set(names)) != len(names):
            raise ConfigError(f"merge config: model names must be unique, got {names}; set models[].name")

    @staticmethod
    def _entry(m: Any) -> ModelEntry:
        if not isinstance(m, dict):
            raise ConfigError(f"merge config: models[] entries are paths or {{model: path, ...}}, got {m!r}")
        unknown = sorted(set(m) - {"model", "name", "parameters"})
        if unknown:
            raise ConfigError(f"merge config: models[] entry {m!r} has unknown field(s) {unknown}; "
                              f"accepted: ['model', 'name', 'parameters']")
        return ModelEntry(**m)

    @property
    def names(self) -> list[str]:
        return [m.name or Path(m.model).name for m in self.models]

    def method(self):
        """The checked method configuration (``parameters`` plus per-model ``weight``s as ``weights``)."""
        params = dict(self.parameters)
        weights = [m.parameters.get("weight") for m in self.models]
        if any(w is not None for w in weights):
            if any(w is None for w in weights):
                raise ConfigError("models[].parameters.weight is given for some models only; give all or none")
            if "weights" in params:
                raise ConfigError("weights given both in parameters and as models[].parameters.weight")
            params["weights"] = [float(w) for w in weights]
        try:
            method = build_method(self.merge_method, params)
        except FreeMergeError as err:
            raise type(err)(f"merge config (merge_method: {self.merge_method}, parameters): {err}") from err
        check_prefilter(method, self.fr_filter_ratio)
        prefilter_transform(self.fr_filter_ratio)
        return method

    @classmethod
    def from_yaml(cls, path) -> MergeJobConfig:
        import yaml

        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read merge config {path}: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"merge config {path} must be a mapping with base_model, models, merge_method, ...")
        accepted = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - accepted)
        if unknown:
            raise ConfigError(f"merge config {path}: unknown key(s) {unknown}; accepted: {sorted(accepted)}")
        missing = sorted({"base_model", "models"} - set(raw))
        if missing:
            raise ConfigError(f"merge config {path}: missing {missing}")
        return cls(**raw)

    def record(self) -> dict[str, Any]:
        """The settings that decide the output (``merge_info.json``'s ``config``, the resume fingerprint): not
        where it goes, nor how memory and reads are managed."""
        out = asdict(self)
        out.pop("output_dir", None)
        out.pop("low_memory", None)
        out.pop("prefetch", None)
        return out


# ---------------------------------------------------------------------------------------------- vocabulary


class VocabAlignedSource(TensorSource):
    """A fine-tuned checkpoint whose vocabulary-sized tensors (rows) are cut or padded to the base's rows:
    extra rows (added tokens) are dropped; missing rows take the base's values (a zero task vector)."""

    def __init__(self, source: TensorSource, base: TensorSource, keys: Sequence[str]) -> None:
        self.source, self.base, self.vocab_keys = source, base, set(keys)
        self.name = source.name

    def keys(self) -> list[str]:
        return self.source.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.source

    def info(self, key: str) -> TensorInfo:
        info = self.source.info(key)
        if key in self.vocab_keys:
            return TensorInfo(self.base.info(key).shape, info.dtype, info.file)
        return info

    def get(self, key: str) -> Tensor:
        t = self.source.get(key)
        if key not in self.vocab_keys:
            return t
        rows = self.base.info(key).shape[0]
        if t.shape[0] >= rows:
            return t[:rows].clone()
        return torch.cat([t, self.base.get(key)[t.shape[0]:].to(t.dtype)])


def vocabulary_keys(base: TensorSource, finetuned: Sequence[TensorSource], names: Sequence[str],
                    mode: str) -> list[str]:
    """Keys whose shapes differ from the base's only in the first (vocabulary) dimension; an error naming
    checkpoint, key and sizes unless ``mode`` is ``truncate_or_pad``."""
    found: list[str] = []
    for name, src in zip(names, finetuned):
        for key in base:
            if key not in src:
                continue
            a, b = base.info(key).shape, src.info(key).shape
            if a != b and len(a) == len(b) >= 1 and a[1:] == b[1:]:
                if mode == "error":
                    raise CheckpointMismatchError(
                        f"vocabulary size differs: checkpoint {name!r} ({src.info(key).file}) key {key!r} has "
                        f"{b[0]} rows, the base model {a[0]}; set vocab_mismatch: truncate_or_pad to cut extra "
                        f"rows (added tokens) and fill missing ones from the base")
                found.append(key)
    return sorted(set(found))


# ---------------------------------------------------------------------------------------------- the job


@dataclass
class Prepared:
    config: MergeJobConfig
    method: Any
    base: TensorSource
    finetuned: list[TensorSource]
    inputs: CheckpointInputs
    plan: list[tuple[str, TensorInfo]]
    dtype: torch.dtype | None
    output: Path
    vocab_keys: list[str]
    report: dict[str, Any]


def _open(path: str, role: str, allow_pickle: bool = False) -> TensorSource:
    if not Path(path).exists():
        raise ConfigError(f"{role} {path!r} does not exist")
    try:
        source = open_checkpoint(path, allow_pickle=allow_pickle)
    except PickledObjectsError:
        raise PickledObjectsError(
            f"{role} {path} holds pickled Python objects (e.g. a whole module saved with torch.save(model)), not a "
            f"plain state dict; loading it would execute code from the file. Convert it to a state dict or "
            f"safetensors, or, for files you trust, set allow_pickle: true in the job YAML (--allow_pickle true "
            f"on the command line)") from None
    source.name = f"{role} {path}"
    return source


def _estimate_task_module_bytes(method, plan, inputs: CheckpointInputs) -> int:
    density = getattr(method, "expert_density", None) or 0.0
    if not method.produces_task_modules:
        return 0
    numel = sum(TensorInfo(inputs.shapes[k], torch.float32).numel for k in inputs.keys)
    if density:  # int32 index + value per kept entry, per task
        value_bytes = torch.finfo(next(iter(inputs.dtypes.values()))).bits // 8 if inputs.keys else 4
        return int(density * numel * (4 + value_bytes) * inputs.num_tasks * 1.05) + 1
    return numel * 4  # EMR's τ or Twin's factors: of the order of one fp32 model


def prepare(config: MergeJobConfig, output_dir: str | None = None) -> Prepared:
    """Every check that needs no tensor data: files, keys, shapes, dtypes, vocabulary, method, disk space."""
    out = output_dir or config.output_dir
    if not out:
        raise ConfigError("no output directory: set output_dir in the merge config or pass --output_dir")
    output = Path(out)
    method = config.method()
    _check_device(config.device)
    base = _open(config.base_model, "base_model", config.allow_pickle)
    finetuned = [_open(m.model, f"model {n!r}", config.allow_pickle) for m, n in zip(config.models, config.names)]
    vocab_keys = vocabulary_keys(base, finetuned, config.names, config.vocab_mismatch)
    if vocab_keys:
        finetuned = [VocabAlignedSource(s, base, vocab_keys) for s in finetuned]
    dtype = getattr(torch, config.dtype) if config.dtype else None
    inputs = CheckpointInputs(base, finetuned, names=config.names, exclude_keys=config.exclude_keys,
                              device=config.device, transform=prefilter_transform(config.fr_filter_ratio),
                              strict_dtypes=not config.allow_mixed_dtypes)
    if not inputs.keys:
        raise ConfigError(f"nothing to merge: no floating-point tensor of {config.base_model} is left after "
                          f"exclude_keys={config.exclude_keys}")
    preflight(method, inputs)
    plan = output_plan(inputs, dtype)
    weights = sum(info.nbytes for _, info in plan)
    needed = weights + _estimate_task_module_bytes(method, plan, inputs)
    parent = output.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    partial = _partial_dir(output)
    already = sum(p.stat().st_size for p in partial.glob("model*.safetensors")) if partial.is_dir() else 0
    if needed - already > free:
        raise ConfigError(f"not enough free disk space for the output under {parent}: need about "
                          f"{(needed - already) / 1e9:.2f} GB, {free / 1e9:.2f} GB free")
    report = {"merged_tensors": len(inputs.keys), "passthrough_tensors": len(plan) - len(inputs.keys),
              "models": config.names, "method": method.name, "output_bytes": weights,
              "task_module_bytes_estimate": needed - weights, "free_bytes": free,
              "vocabulary_keys_aligned": vocab_keys, "output_dtype": str(dtype or "base's")}
    return Prepared(config, method, base, finetuned, inputs, plan, dtype, output, vocab_keys, report)


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"device={device!r} is not a torch device: {err}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available on this machine")


def _partial_dir(output: Path) -> Path:
    return staging_dir(output)


def _fingerprint(config: MergeJobConfig, sources: Sequence[TensorSource]) -> str:
    """Digest of the settings and the inputs' files (path, size, mtime): a changed input restarts a resume."""
    files = []
    for src in sources:
        for key in src:
            files.append(src.info(key).file)
    stats = []
    for f in sorted(set(files)):
        st = os.stat(f)
        stats.append((f, st.st_size, st.st_mtime_ns))
    blob = json.dumps({"config": config.record(), "files": stats, "version": __version__},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def copy_support_files(base_dir: Path, target: Path, dtype: torch.dtype | None) -> list[Path]:
    """Copy the base directory's non-weight files (config, tokenizer, generation config, ...) to ``target``;
    ``config.json`` gets the output ``torch_dtype``."""
    copied = []
    if not base_dir.is_dir():
        return copied
    for f in sorted(base_dir.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.suffix in WEIGHT_SUFFIXES or f.name in WEIGHT_INDEXES:
            continue
        if f.name == MANIFEST_NAME:
            continue
        dest = target / f.name
        if f.name == "config.json" and dtype is not None:
            cfg = json.loads(f.read_text())
            cfg["torch_dtype"] = str(dtype).replace("torch.", "")
            write_json_atomic(cfg, dest)
        else:
            shutil.copyfile(f, dest)
        copied.append(dest)
    return copied


def run_merge_job(config: MergeJobConfig, *, output_dir: str | None = None, dry_run: bool = False,
                  overwrite: bool = False, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Check, then (unless ``dry_run``) merge (streaming, resumable), write task modules, support files and the
    manifest, publish. The whole run holds ``output_lock(output)``: a second job (or export) into the same
    output is refused at once with ``OutputLockedError``, the first one's staging directory untouched.
    ``resume=False`` discards the partial output of an interrupted run instead of continuing it."""
    prepared = prepare(config, output_dir)
    if dry_run:
        return {"dry_run": True, **prepared.report}
    with output_lock(prepared.output):
        return _run_locked(prepared, overwrite=overwrite, resume=resume, progress=progress)


def _run_locked(prepared: Prepared, *, overwrite: bool, resume: bool, progress: bool) -> dict[str, Any]:
    config, output = prepared.config, prepared.output
    # a previous export is replaced only when asked (the in-memory export replaces its own)
    check_output_dir(output, overwrite=overwrite, replace_export=False)
    partial = _partial_dir(output)
    if not resume and partial.is_dir():
        shutil.rmtree(partial)
        log.info("resume=False: removed the partial output %s", partial)
    fingerprint = _fingerprint(config, [prepared.base, *prepared.finetuned])
    streamed = stream_merge(prepared.base, prepared.finetuned, prepared.method, partial, names=config.names,
                            exclude_keys=config.exclude_keys, fr_filter_ratio=config.fr_filter_ratio,
                            seed=config.seed, device=config.device, dtype=prepared.dtype,
                            max_shard_bytes=config.shard_bytes, fingerprint=fingerprint,
                            strict_dtypes=not config.allow_mixed_dtypes, check_finite=config.check_finite,
                            low_memory=config.low_memory, prefetch=config.prefetch, progress=progress)
    files = list(streamed.files)
    task_module_files = save_task_modules(streamed.result.task_modules or [], streamed.result.shared_modules,
                                          partial, names=config.names, method=prepared.method.name)
    files += task_module_files
    if config.copy_files:
        files += copy_support_files(Path(config.base_model), partial, prepared.dtype)
    # nothing run-dependent (resumed or not, timings): a resumed job's manifest equals an uninterrupted one's
    record = {
        "config": config.record(), "method": prepared.method.name, "reference": prepared.method.reference,
        "hyperparameters": prepared.method.hyperparameters(), "info": streamed.result.info,
        "package_version": __version__, "task_names": config.names,
        "task_module_files": [p.name for p in task_module_files],
    }
    # files of an interrupted run with other settings are dropped; the manifest is written last, then renamed
    manifest = publish_directory(partial, output, record, files=files, overwrite=overwrite, replace_export=False,
                                 digests=streamed.digests)  # the shards' sha256, computed while writing
    return {"output": str(output), "files": sorted(manifest["files"]), **prepared.report}
