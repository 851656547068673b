"""Adapter for Hugging Face CLIP image encoders fine-tuned per task (FusionBench's layout), zero-shot heads.

FusionBench (Tang et al. 2024) publishes the CLIP ViT task models of the task-arithmetic benchmark as Hugging
Face directories: the pre-trained ``openai/clip-vit-base-patch32`` (a whole ``CLIPModel``: vision tower,
text tower, projections, logit scale) and one ``CLIPVisionModel`` per task,
``tanganke/clip-vit-base-patch32_<dataset>`` (vision tower only: FusionBench fine-tunes the vision tower and
keeps the projections, the text tower and the logit scale frozen). Download them once, e.g.
``huggingface-cli download tanganke/clip-vit-base-patch32_sun397 --local-dir <root>/clip-vit-base-patch32_sun397``;
nothing here touches the network (files are read directly; the tokenizer with ``local_files_only=True``).

Backbone: ``CLIPImageEncoder``, images → L2-normalised image embeddings (vision tower, pooled class token,
``visual_projection``); its state-dict keys are the checkpoints' (``vision_model.encoder.layers.0.self_attn.
q_proj.weight``, ..., ``visual_projection.weight``), so the released code's ``attn|mlp`` key regex applies.
The projection is **excluded from merging** (``exclude_keys``): every task model uses the pre-trained one,
as FusionBench does (a fine-tuned directory that holds a different projection triggers a warning; it is not
used). Excluding it leaves Eq. 3's λ and every other statistic to the tensors that were fine-tuned.

Heads: zero-shot classifiers from the pre-trained text tower, as CLIP (and FusionBench's
``HFCLIPClassifier.set_classification_task``) build them: for each class, the text embeddings of every
prompt template, each L2-normalised, averaged, re-normalised; the head is ``Linear(D, C, bias=False)`` with
weight ``logit_scale.exp() × embeddings``, applied to the backbone's normalised image embeddings. Class
names and templates of the 8/14/20 standard tasks ship with the package (``freemerge_pl.data.tasks``). Heads
are cached on disk (one safetensors file per task, written atomically, with a JSON record of its size and
sha256 checked on every read) under a key made of the sha256 and size of the text tower's weight, config and
tokenizer files and of the class list and templates: a changed model, class list or template recomputes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from freemerge_pl.adapters.base import ModelAdapter, StateDict
from freemerge_pl.adapters.checks import meta_state_spec, task_order
from freemerge_pl.data.tasks import TaskInfo, task_info
from freemerge_pl.errors import CheckpointMismatchError, ConfigError, FreeMergeError
from freemerge_pl.io import (
    INDEX_NAME,
    cached_sha256,
    open_checkpoint,
    save_safetensors_atomic,
    sha256_file,
    verify_manifest,
    write_json_atomic,
)

#: vision-config fields every checkpoint must share with the pre-trained one (the architecture)
VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                 "patch_size", "num_channels", "hidden_act")
#: files of a directory that determine the zero-shot heads besides the weights
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json")
#: model types accepted for the vision checkpoints (``config.json`` ``model_type``)
VISION_MODEL_TYPES = ("clip", "clip_vision_model")
PROJECTION_KEY = "visual_projection.weight"
VISION_PREFIX = "vision_model."
HEAD_CACHE_VERSION = 1


def default_head_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/freemerge_pl/clip_heads`` (``~/.cache/freemerge_pl/clip_heads`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "freemerge_pl" / "clip_heads"


def weight_files(directory: Path, role: str) -> list[Path]:
    """The weight file(s) of a Hugging Face model directory: a safetensors index's shards, ``model.safetensors``
    or ``pytorch_model.bin``; a FreeMergeError naming the directory when it has none."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            shards = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise FreeMergeError(f"{role}: sharded index {index} cannot be read ({err})") from None
        return [directory / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    raise FreeMergeError(f"{role}: {directory} holds no model weights (model.safetensors, {INDEX_NAME} or "
                         f"pytorch_model.bin)")


def read_tensors(directory: Path, role: str, keys: list[str], optional: tuple[str, ...] = (),
                 what: str = "the model", prefixes: tuple[str, ...] = ("",)) -> StateDict:
    """``keys`` (all required) and whichever of ``optional`` exist, read from a model directory's weight files
    one tensor at a time. Each of ``keys`` is stored as ``prefix + key`` with the one of ``prefixes`` that
    matches the most keys (returned without it); a missing key raises CheckpointMismatchError naming the
    directory."""
    sources = [open_checkpoint(f) for f in weight_files(directory, role)]
    try:
        where = {k: s for s in sources for k in s.keys()}  # noqa: SIM118 (a TensorSource, not a dict)
        prefix = max(prefixes, key=lambda p: sum(p + k in where for k in keys))
        missing = [prefix + k for k in keys if prefix + k not in where]
        if missing:
            raise CheckpointMismatchError(
                f"{role}: {directory} lacks {len(missing)} key(s) of {what}: {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}; its first keys: {list(where)[:6]}")
        out = {k: where[prefix + k].get(prefix + k) for k in keys}
        out.update({k: where[k].get(k) for k in optional if k in where})
        return out
    finally:
        for source in sources:
            source.close()


def read_model_config(directory: Path, role: str, accepted: tuple[str, ...]) -> dict[str, Any]:
    """``config.json`` of a model directory, its ``model_type`` checked against ``accepted``."""
    if not directory.is_dir():
        raise FreeMergeError(f"{role}: model directory {directory} does not exist")
    path = directory / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FreeMergeError(f"{role}: {path} does not exist (a Hugging Face model directory has a config.json)"
                             ) from None
    except (OSError, ValueError) as err:
        raise FreeMergeError(f"{role}: {path} cannot be read as JSON ({err})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in accepted:
        arch = raw.get("architectures") if isinstance(raw, dict) else None
        raise CheckpointMismatchError(
            f"{role}: {path} describes model_type {model_type!r} (architectures {arch}), not a CLIP model; "
            f"accepted model types: {list(accepted)} (CLIPModel, CLIPVisionModel)")
    return raw


def vision_config(raw: dict[str, Any]):
    """A ``CLIPVisionConfig`` from a ``clip`` or ``clip_vision_model`` config dict (projection_dim: the
    model's, i.e. the top-level one of a ``CLIPModel``)."""
    from transformers import CLIPConfig, CLIPVisionConfig

    if raw["model_type"] == "clip":
        config = CLIPConfig.from_dict(raw)
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        return vision
    return CLIPVisionConfig.from_dict(raw)


class CLIPImageEncoder(nn.Module):
    """Images ``[B, 3, S, S]`` → L2-normalised CLIP image embeddings ``[B, projection_dim]``.

    Holds ``vision_model`` (``CLIPVisionTransformer``) and ``visual_projection`` under the names a ``CLIPModel``
    uses, so its state dict is the checkpoints' (``vision_model.*``, ``visual_projection.weight``)."""

    def __init__(self, config) -> None:
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        model = CLIPVisionModelWithProjection(config)
        self.vision_model = model.vision_model
        self.visual_projection = model.visual_projection

    def forward(self, pixel_values: Tensor) -> Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return F.normalize(self.visual_projection(pooled), dim=-1)


def _check_template(task: str, template: str) -> None:
    names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    if names != ["c"]:
        raise ConfigError(f"templates[{task!r}]: {template!r} must hold the placeholder {{c}} exactly once "
                          f"(the class name) and no other {{...}} field")


class HFCLIPAdapter(ModelAdapter):
    """CLIP vision towers fine-tuned per task (Hugging Face directories, FusionBench layout), zero-shot heads.

    Args:
        pretrained: directory of the pre-trained ``CLIPModel`` (``openai/clip-vit-base-patch32``), or of a
            ``CLIPVisionModel``/``CLIPVisionModelWithProjection`` when ``text_model`` gives the text tower.
        finetuned: task → directory of its fine-tuned ``CLIPVisionModel``.
        tasks: the task order (default: ``finetuned``'s). Tasks not in ``finetuned`` are found with
            ``checkpoint_pattern`` under ``checkpoint_root``.
        checkpoint_root: the folder ``checkpoint_pattern`` starts from (``{root}``).
        checkpoint_pattern: a task's directory, ``pattern.format(root=checkpoint_root, task=<task name>,
            dataset=<FusionBench dataset name>)``; the default ``{root}/clip-vit-base-patch32_{dataset}`` is
            FusionBench's naming (``{root}/clip-vit-large-patch14_{dataset}`` for ViT-L/14).
        text_model: directory of a ``CLIPModel`` whose text tower, text and visual projection and logit scale
            are used (default: ``pretrained``, which must then be a ``CLIPModel``).
        class_names: per task, class names in label order, overriding the shipped ones
            (``freemerge_pl.data.tasks``); a task not shipped needs them and ``templates``.
        templates: per task, prompt templates (``{c}`` = the class name), overriding the shipped ones.
        head_cache_dir: where zero-shot heads are cached (default ``default_head_cache_dir()``).
        text_batch_size: prompts per text-tower batch when computing heads.
        text_device: device of the text tower while computing heads (``cpu``, ``cuda``, ...).

    Nothing is read in ``__init__``; ``prepare`` checks every directory's config against the pre-trained one
    (architecture, hidden size, image size, ...: errors name the file and the task) and computes the heads.
    """

    exclude_keys: tuple[str, ...] = (r"^visual_projection\.",)
    input_kind = "image"

    def __init__(
        self,
        pretrained: str,
        finetuned: dict[str, str] | None = None,
        tasks: list[str] | None = None,
        checkpoint_root: str | None = None,
        checkpoint_pattern: str = "{root}/clip-vit-base-patch32_{dataset}",
        text_model: str | None = None,
        class_names: dict[str, list[str]] | None = None,
        templates: dict[str, list[str]] | None = None,
        head_cache_dir: str | None = None,
        text_batch_size: int = 256,
        text_device: str = "cpu",
    ) -> None:
        finetuned, order = task_order("HFCLIPAdapter", finetuned, tasks)
        if text_batch_size < 1:
            raise ConfigError(f"HFCLIPAdapter: text_batch_size={text_batch_size} must be ≥ 1")
        class_names, templates = dict(class_names or {}), dict(templates or {})
        for label, table in (("class_names", class_names), ("templates", templates)):
            unknown = [t for t in table if t not in order]
            if unknown:
                raise ConfigError(f"HFCLIPAdapter: {label} names task(s) {unknown} that are not in {order}")
        self.pretrained = str(pretrained)
        self.text_model = str(text_model) if text_model is not None else None
        self.checkpoint_root = checkpoint_root
        self.checkpoint_pattern = checkpoint_pattern
        self.head_cache_dir = Path(head_cache_dir).expanduser() if head_cache_dir else default_head_cache_dir()
        self.text_batch_size = text_batch_size
        self.text_device = text_device
        self.infos = {t: self._task_info(t, class_names.get(t), templates.get(t)) for t in order}
        self.task_dirs = {t: finetuned[t] if t in finetuned else self._pattern_dir(t) for t in order}
        self._vision_config = None
        self._spec: dict[str, tuple[torch.Size, torch.dtype]] | None = None
        self._heads: dict[str, tuple[str, Tensor]] = {}
        self._projection_weight: Tensor | None = None
        self._checked: set[str] = set()

    # ------------------------------------------------------------------ configuration
    @staticmethod
    def _task_info(task: str, names: list[str] | None, prompts: list[str] | None) -> TaskInfo:
        """Shipped metadata for ``task`` with the overrides applied (both needed for an unknown task)."""
        try:
            info = task_info(task)
        except ConfigError:
            if names is None or prompts is None:
                raise ConfigError(f"HFCLIPAdapter: task {task!r} is not among the shipped tasks; give "
                                  f"class_names[{task!r}] and templates[{task!r}]") from None
            info = TaskInfo(name=task, dataset=task, aliases=(), suite=0, classnames=(), templates=())
        names = list(info.classnames if names is None else names)
        prompts = list(info.templates if prompts is None else prompts)
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"HFCLIPAdapter: class_names[{task!r}] must be a non-empty list of distinct names")
        if not prompts:
            raise ConfigError(f"HFCLIPAdapter: templates[{task!r}] is empty")
        for p in prompts:
            _check_template(task, p)
        return TaskInfo(name=task, dataset=info.dataset, aliases=info.aliases, suite=info.suite,
                        classnames=tuple(names), templates=tuple(prompts))

    def _pattern_dir(self, task: str) -> str:
        if self.checkpoint_root is None:
            raise ConfigError(f"HFCLIPAdapter: task {task!r} has no finetuned directory and checkpoint_root is "
                              f"not set (checkpoint_pattern {self.checkpoint_pattern!r} needs it)")
        try:
            return self.checkpoint_pattern.format(root=self.checkpoint_root, task=task,
                                                  dataset=self.infos[task].dataset)
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(f"HFCLIPAdapter: checkpoint_pattern {self.checkpoint_pattern!r} cannot be filled "
                              f"({type(err).__name__}: {err}); its fields are {{root}}, {{task}}, {{dataset}}") from None

    @property
    def task_names(self) -> list[str]:
        return list(self.infos)

    @property
    def text_dir(self) -> Path:
        return Path(self.text_model or self.pretrained)

    def class_names(self, task: str) -> list[str]:
        return list(self._info(task).classnames)

    def templates(self, task: str) -> list[str]:
        return list(self._info(task).templates)

    def _info(self, task: str) -> TaskInfo:
        if task not in self.infos:
            raise ConfigError(f"task {task!r} is not configured; accepted: {self.task_names}")
        return self.infos[task]

    @property
    def preprocessor_config(self) -> str | None:
        """The pre-trained directory's ``preprocessor_config.json`` (image size, mean, std), when it has one."""
        path = Path(self.pretrained) / "preprocessor_config.json"
        return str(path) if path.is_file() else None

    def num_classes(self, task: str) -> int:
        return len(self._info(task).classnames)

    # ------------------------------------------------------------------ files and checks
    def _pretrained_config(self) -> dict[str, Any]:
        return read_model_config(Path(self.pretrained), "pre-trained", VISION_MODEL_TYPES)

    @property
    def vision_config(self):
        """The backbone's ``CLIPVisionConfig`` (the pre-trained one; projection_dim from the text model)."""
        if self._vision_config is None:
            raw = self._pretrained_config()
            config = vision_config(raw)
            if raw["model_type"] != "clip":
                if self.text_model is None:
                    raise ConfigError(f"HFCLIPAdapter: pre-trained {self.pretrained} is a {raw['model_type']} "
                                      f"(vision tower only); set text_model to a CLIPModel directory")
                text = read_model_config(self.text_dir, "text model", ("clip",))
                config.projection_dim = int(text.get("projection_dim", 512))
            self._vision_config = config
        return self._vision_config

    def check_task(self, task: str) -> None:
        """The task's directory exists and its config.json is a CLIP vision model with the pre-trained one's
        architecture (VISION_FIELDS); errors name the file and the task."""
        if task in self._checked:
            return
        role = f"fine-tuned ({task})"
        directory = Path(self.task_dirs[task])
        raw = read_model_config(directory, role, VISION_MODEL_TYPES)
        have, want = vision_config(raw).to_dict(), self.vision_config.to_dict()
        diff = {f: (have.get(f), want.get(f)) for f in VISION_FIELDS if have.get(f) != want.get(f)}
        if diff:
            detail = ", ".join(f"{f}={a!r} (pre-trained: {b!r})" for f, (a, b) in diff.items())
            raise CheckpointMismatchError(f"{role}: {directory / 'config.json'} differs from the pre-trained "
                                          f"{Path(self.pretrained) / 'config.json'} in {detail}")
        weight_files(directory, role)
        self._checked.add(task)

    def prepare(self) -> None:
        """Check every directory (one error listing all missing ones), every config, then compute the heads."""
        missing = [p for p in [self.pretrained, str(self.text_dir), *self.task_dirs.values()]
                   if not Path(p).is_dir()]
        if missing:
            raise FreeMergeError(f"HFCLIPAdapter: {len(dict.fromkeys(missing))} model director(ies) do not "
                                 f"exist: {list(dict.fromkeys(missing))}")
        _ = self.vision_config
        for task in self.task_names:
            self.check_task(task)
        self.head_weights(self.task_names)

    def checkpoint_paths(self) -> list[str]:
        paths: list[str] = []
        for role, d in [("pre-trained", self.pretrained), ("text model", str(self.text_dir)),
                        *((f"fine-tuned ({t})", self.task_dirs[t]) for t in self.task_names)]:
            try:
                paths.extend(str(p) for p in weight_files(Path(d), role))
            except FreeMergeError:
                paths.append(d)
        return list(dict.fromkeys(paths))

    # ------------------------------------------------------------------ backbone
    def build_backbone(self) -> CLIPImageEncoder:
        return CLIPImageEncoder(self.vision_config)

    @property
    def backbone_spec(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """Key → (shape, dtype) of the backbone's state dict (built on the meta device: no memory)."""
        if self._spec is None:
            self._spec = meta_state_spec(self.build_backbone)
        return self._spec

    def _read_vision(self, directory: Path, role: str) -> StateDict:
        """The vision-tower tensors of a directory (shapes checked), plus its projection when it has one. Keys
        are ``vision_model.*`` in CLIPModel files and in CLIPVisionModel files of transformers 4 (FusionBench's);
        transformers 5 saves a CLIPVisionModel without that prefix: both are read."""
        spec = self.backbone_spec
        keys = [k for k in spec if k != PROJECTION_KEY]
        inner = [k[len(VISION_PREFIX):] for k in keys]
        found = read_tensors(directory, role, inner, optional=(PROJECTION_KEY,), what="the CLIP vision tower",
                             prefixes=(VISION_PREFIX, ""))
        sd = {VISION_PREFIX + k if k != PROJECTION_KEY else k: v for k, v in found.items()}
        for key in keys:
            if tuple(sd[key].shape) != tuple(spec[key][0]):
                raise CheckpointMismatchError(f"{role}: {directory} key {key!r} has shape {tuple(sd[key].shape)}, "
                                              f"the pre-trained architecture expects {tuple(spec[key][0])}")
        return sd

    def _projection(self) -> Tensor:
        """θ_pre's ``visual_projection.weight``: from the pre-trained directory, else from ``text_model``."""
        if self._projection_weight is None:
            for role, directory in (("pre-trained", Path(self.pretrained)), ("text model", self.text_dir)):
                found = read_tensors(directory, role, [], optional=(PROJECTION_KEY,))
                if PROJECTION_KEY in found:
                    break
            else:
                raise CheckpointMismatchError(f"neither {self.pretrained} nor {self.text_dir} holds "
                                              f"{PROJECTION_KEY!r} (the CLIP visual projection)")
            weight, shape = found[PROJECTION_KEY], tuple(self.backbone_spec[PROJECTION_KEY][0])
            if tuple(weight.shape) != shape:
                raise CheckpointMismatchError(f"{role}: {directory} {PROJECTION_KEY!r} has shape "
                                              f"{tuple(weight.shape)}, expected {shape} (projection_dim × hidden)")
            self._projection_weight = weight
        return self._projection_weight

    def pretrained_state_dict(self) -> StateDict:
        sd = self._read_vision(Path(self.pretrained), "pre-trained")
        sd[PROJECTION_KEY] = self._projection()
        return {k: sd[k] for k in self.backbone_spec}

    def finetuned_state_dict(self, task: str) -> StateDict:
        """θ_k: the task's vision tower; ``visual_projection`` is θ_pre's (excluded from merging)."""
        self._info(task)
        self.check_task(task)
        role = f"fine-tuned ({task})"
        sd = self._read_vision(Path(self.task_dirs[task]), role)
        projection = self._projection()
        own = sd.pop(PROJECTION_KEY, None)
        if own is not None and not torch.equal(own.to(projection.dtype), projection):
            warnings.warn(f"{role}: {self.task_dirs[task]} holds a visual_projection that differs from the "
                          f"pre-trained one; it is not used (the projection is excluded from merging)", stacklevel=2)
        sd[PROJECTION_KEY] = projection
        return {k: sd[k] for k in self.backbone_spec}

    # ------------------------------------------------------------------ zero-shot heads
    def _head_key(self, task: str) -> tuple[str, dict[str, Any]]:
        """The cache key of a task's head: sha256 over the text model's files (name, size, sha256) and the
        task's class names and templates."""
        directory = self.text_dir
        files = weight_files(directory, "text model") + [directory / "config.json"]
        files += [directory / n for n in TOKENIZER_FILES if (directory / n).is_file()]
        info = self._info(task)
        record = {"version": HEAD_CACHE_VERSION,
                  "files": {f.name: {"bytes": f.stat().st_size, "sha256": cached_sha256(f)} for f in files},
                  "classnames": list(info.classnames), "templates": list(info.templates)}
        blob = json.dumps(record, sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest(), record

    def _cache_names(self, task: str, key: str) -> tuple[str, str]:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in task)
        return f"{safe}-{key[:24]}.safetensors", f"{safe}-{key[:24]}.json"

    def _read_cached(self, task: str, key: str) -> Tensor | None:
        name, record_name = self._cache_names(task, key)
        record_path = self.head_cache_dir / record_name
        if not record_path.is_file():
            return None
        try:
            record = json.loads(record_path.read_text())
            if record.get("key") != key:
                raise FreeMergeError(f"{record_path} records key {str(record.get('key'))[:16]}…, not {key[:16]}…")
            verify_manifest(self.head_cache_dir, {name: record}, remedy="it is recomputed")
            with open_checkpoint(self.head_cache_dir / name) as src:
                weight = src.get("weight")
        except (FreeMergeError, OSError, ValueError) as err:
            warnings.warn(f"zero-shot head cache entry for task {task!r} is unusable ({err}); recomputing it",
                          stacklevel=3)
            return None
        if tuple(weight.shape) != (self.num_classes(task), self.vision_config.projection_dim):
            warnings.warn(f"zero-shot head cache {self.head_cache_dir / name} has shape {tuple(weight.shape)}; "
                          f"recomputing it", stacklevel=3)
            return None
        return weight

    def _write_cached(self, task: str, key: str, record: dict[str, Any], weight: Tensor) -> None:
        name, record_name = self._cache_names(task, key)
        path = save_safetensors_atomic({"weight": weight}, self.head_cache_dir / name,
                                       metadata={"task": task, "key": key})
        write_json_atomic({**record, "key": key, "task": task, "bytes": path.stat().st_size,
                           "sha256": sha256_file(path)}, self.head_cache_dir / record_name)

    def head_weights(self, tasks: list[str]) -> dict[str, Tensor]:
        """Per task, ``logit_scale.exp() ×`` its normalised class embeddings ``[C, D]``: from memory, else from
        the disk cache, else computed (one text-tower load for all missing tasks) and cached."""
        out: dict[str, Tensor] = {}
        missing: dict[str, tuple[str, dict[str, Any]]] = {}
        for task in tasks:
            key, record = self._head_key(task)
            cached = self._heads.get(task)
            weight = cached[1] if cached is not None and cached[0] == key else self._read_cached(task, key)
            if weight is None:
                missing[task] = (key, record)
            else:
                out[task] = weight
                self._heads[task] = (key, weight)
        if missing:
            for task, weight in self.compute_head_weights(list(missing)).items():
                key, record = missing[task]
                self._write_cached(task, key, record, weight)
                self._heads[task] = (key, weight)
                out[task] = weight
        return {t: out[t] for t in tasks}

    def head_weight(self, task: str) -> Tensor:
        return self.head_weights([task])[task]

    def _text_tower(self):
        """(CLIPTextModelWithProjection with the text model's weights, tokenizer, logit scale)."""
        from transformers import AutoTokenizer, CLIPConfig, CLIPTextModelWithProjection

        raw = read_model_config(self.text_dir, "text model", ("clip",))
        config = CLIPConfig.from_dict(raw)
        text_config = config.text_config
        text_config.projection_dim = config.projection_dim
        model = CLIPTextModelWithProjection(text_config)
        sd = read_tensors(self.text_dir, "text model", [*model.state_dict(), "logit_scale"],
                          what="a CLIPModel text tower")
        logit_scale = sd.pop("logit_scale").float()
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as err:
            raise CheckpointMismatchError(f"text model: {self.text_dir} does not fit its config.json: {err}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(self.text_dir), local_files_only=True)
        except (OSError, ValueError) as err:
            raise FreeMergeError(f"text model: no tokenizer could be read from {self.text_dir} ({err})") from None
        return model.float().eval(), tokenizer, logit_scale

    @torch.no_grad()
    def compute_head_weights(self, tasks: list[str]) -> dict[str, Tensor]:
        """Zero-shot head weights of ``tasks`` computed now (no cache): see the module docstring."""
        model, tokenizer, logit_scale = self._text_tower()
        model.to(self.text_device)
        max_length = model.config.max_position_embeddings
        out = {}
        for task in tasks:
            info = self._info(task)
            prompts = [p for c in info.classnames for p in info.prompts(c)]
            chunks = []
            for start in range(0, len(prompts), self.text_batch_size):
                batch = tokenizer(prompts[start:start + self.text_batch_size], padding=True, truncation=True,
                                  max_length=max_length, return_tensors="pt").to(self.text_device)
                embeds = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).text_embeds
                chunks.append(F.normalize(embeds.float(), dim=-1).cpu())
            per_class = torch.cat(chunks).view(info.num_classes, len(info.templates), -1).mean(dim=1)
            out[task] = F.normalize(per_class, dim=-1) * logit_scale.exp()
        return out

    def build_head(self, task: str) -> nn.Linear:
        """``Linear(D, C, bias=False)`` with the zero-shot weight (inputs: the backbone's normalised embeddings)."""
        weight = self.head_weight(task)
        head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        head.weight.data.copy_(weight)
        return head

    def __repr__(self) -> str:
        return f"HFCLIPAdapter(pretrained={self.pretrained!r}, tasks={self.task_names})"


__all__ = ["CLIPImageEncoder", "HFCLIPAdapter", "default_head_cache_dir", "read_model_config", "weight_files"]
