"""Adapter for CLIP image encoders fine-tuned the task_vectors way (Ilharco et al. 2023).

The task_vectors release (and FREE-Merging's, EMR-Merging's, AdaMerging's, which reuse it) holds
``<root>/<model>/zeroshot.pt`` (θ_pre), ``<root>/<model>/<Task>/finetuned.pt`` (θ_k) and
``<root>/<model>/head_<Task>.pt`` (the zero-shot classification head of each task: text embeddings
× logit scale, applied to L2-normalised image features). Those files are ``torch.save(module)``
pickles: reading them runs code from the file and needs task_vectors' ``src`` package importable.
Convert them once to plain state dicts (run inside the task_vectors checkout)::

    import glob, torch  # task_vectors' `src` package must be importable (run from its repository root)
    for f in glob.glob("checkpoints/ViT-B-32/**/*.pt", recursive=True):
        torch.save(torch.load(f, weights_only=False).state_dict(), f)  # whole module -> plain state dict

or pass ``allow_pickle: true`` to load the pickles directly (only for files you trust).

The backbone is open_clip's visual tower, built without downloading anything; its ``state_dict()``
keys are the merged keys (``transformer.resblocks.0.attn.in_proj_weight``, ...), so the released
code's ``attn|mlp`` key regex applies unchanged. Checkpoint keys carry a prefix (``model.visual.`` for
task_vectors' ``ImageEncoder``, ``visual.`` for a whole open_clip ``CLIP``), which is stripped; every
other key (the text tower's remnants, ``logit_scale``) is dropped. Nothing is read before first use.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from freemerge_pl.adapters.base import ModelAdapter, OpenCLIPViTSplit, StateDict
from freemerge_pl.adapters.checks import linear_head_tensors
from freemerge_pl.errors import CheckpointMismatchError, ConfigError, FreeMergeError
from freemerge_pl.io import PickledObjectsError, file_signature, load_state_dict, read_pickled_state_dict

#: prefixes tried, in this order, when ``key_prefix`` is None (the best-matching one wins)
AUTO_PREFIXES = ("model.visual.", "visual.", "model.", "")

CONVERSION_SNIPPET = (
    "import glob, torch  # run from the task_vectors repository root (its `src` package must import)\n"
    "for f in glob.glob('checkpoints/{model}/**/*.pt', recursive=True):  # your checkpoint folder\n"
    "    torch.save(torch.load(f, weights_only=False).state_dict(), f)  # module -> plain state dict"
)


class NormalizedLinear(nn.Linear):
    """``Linear(x / ‖x‖)``: task_vectors' ``ClassificationHead(normalize=True)``; state dict ``weight``/``bias``."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x / x.norm(dim=-1, keepdim=True))


def _vision_config(model_name: str, model_config: dict[str, Any] | None, quick_gelu: bool):
    """(embed_dim, CLIPVisionCfg, quick_gelu) from an open_clip model name or an explicit config."""
    import open_clip
    from open_clip.model import CLIPVisionCfg

    if model_config is None:
        config = open_clip.get_model_config(model_name)
        if config is None:
            raise ConfigError(f"open_clip has no model config named {model_name!r}; pass model_config "
                              f"or one of open_clip.list_models() (e.g. 'ViT-B-32', 'ViT-L-14')")
    else:
        config = dict(model_config)
        if "vision_cfg" not in config:  # a flat vision config plus embed_dim (and optionally quick_gelu)
            vision = {k: v for k, v in config.items() if k not in ("embed_dim", "quick_gelu")}
            config = {"embed_dim": config.get("embed_dim"), "vision_cfg": vision,
                      **({"quick_gelu": config["quick_gelu"]} if "quick_gelu" in config else {})}
    vision = dict(config["vision_cfg"])
    if "heads" in vision:  # VisionTransformer's argument; open_clip's config gives head_width instead
        heads = vision.pop("heads")
        if vision.get("width", 0) % heads:
            raise ConfigError(f"model_config: width={vision.get('width')} is not divisible by heads={heads}")
        vision["head_width"] = vision["width"] // heads
    accepted = {f.name for f in dataclasses.fields(CLIPVisionCfg)}
    unknown = sorted(set(vision) - accepted)
    if unknown:
        raise ConfigError(f"model_config: unknown vision config keys {unknown}; accepted: {sorted(accepted)} "
                          f"(plus heads, embed_dim, quick_gelu)")
    if config.get("embed_dim") is None:
        raise ConfigError("model_config needs embed_dim (the output dimension of the visual projection)")
    return int(config["embed_dim"]), CLIPVisionCfg(**vision), bool(config.get("quick_gelu", quick_gelu))


class OpenCLIPAdapter(OpenCLIPViTSplit, ModelAdapter):
    """CLIP image encoders fine-tuned the task_vectors way: θ_pre, one θ_k per task, one head per task.

    ``model_name``: an open_clip architecture (``ViT-B-32``, ``ViT-L-14``); built with no download.
    ``pretrained``: θ_pre (``zeroshot.pt``); ``finetuned``: task → θ_k (``<Task>/finetuned.pt``), in task
    order; ``heads``: task → head file (a state dict with ``weight`` [C, D] and optional ``bias`` [C]).
    Files are ``.safetensors``, a directory (``model.safetensors`` or a sharded index) or torch state
    dicts. ``key_prefix``: the prefix stripped from checkpoint keys (None: the best match among
    ``model.visual.``, ``visual.``, ``model.``, none). ``model_config``: an explicit open_clip config
    (``{embed_dim, vision_cfg}`` as in open_clip's JSON, or a flat ``CLIPVisionCfg`` dict plus
    ``embed_dim``; ``heads`` is accepted for ``head_width``); ``model_name`` is then only a label.
    ``quick_gelu`` (default true): OpenAI's CLIP weights, which task_vectors fine-tuned, use QuickGELU
    (open_clip's ``openai`` pretrained tags are QuickGELU models); set false for LAION/DataComp-trained towers.
    ``normalize_head_input`` (default true): heads see L2-normalised features, as task_vectors'
    ``ClassificationHead(normalize=True)``. ``allow_pickle`` (default false): load ``torch.save(module)``
    files with ``torch.load(weights_only=False)``, which EXECUTES CODE FROM THE FILE; only for trusted
    files. Without it such a file raises an error with this conversion snippet (task_vectors checkout)::

        import glob, torch  # run from the task_vectors repository root (its `src` package must import)
        for f in glob.glob('checkpoints/ViT-B-32/**/*.pt', recursive=True):
            torch.save(torch.load(f, weights_only=False).state_dict(), f)  # module -> plain state dict

    Nothing is read in ``__init__``; ``prepare`` checks that every file exists.
    """

    exclude_keys: tuple[str, ...] = ()
    input_kind = "image"

    def __init__(
        self,
        pretrained: str,
        finetuned: dict[str, str],
        heads: dict[str, str],
        model_name: str = "ViT-B-32",
        key_prefix: str | None = None,
        model_config: dict[str, Any] | None = None,
        quick_gelu: bool = True,
        normalize_head_input: bool = True,
        allow_pickle: bool = False,
    ) -> None:
        if not finetuned:
            raise ConfigError("OpenCLIPAdapter needs at least one fine-tuned checkpoint (finetuned: {task: path})")
        if set(heads) != set(finetuned):
            raise ConfigError(f"OpenCLIPAdapter: heads are given for tasks {sorted(heads)} but finetuned "
                              f"checkpoints for {sorted(finetuned)}; every task needs both")
        self.model_name = model_name
        self.pretrained = str(pretrained)
        self.finetuned = {str(k): str(v) for k, v in finetuned.items()}
        self.heads = {str(k): str(v) for k, v in heads.items()}
        self.key_prefix = key_prefix
        self.model_config = dict(model_config) if model_config is not None else None
        self.quick_gelu = quick_gelu
        self.normalize_head_input = normalize_head_input
        self.allow_pickle = allow_pickle
        self._embed_dim, self._vision_cfg, self._quick_gelu = _vision_config(model_name, self.model_config,
                                                                             quick_gelu)
        self._spec: dict[str, tuple[torch.Size, torch.dtype]] | None = None
        self._head_cache: dict[str, tuple[tuple, StateDict]] = {}

    # ------------------------------------------------------------------ modules
    def build_backbone(self) -> nn.Module:
        """open_clip's visual tower (``VisionTransformer`` for ViTs), randomly initialised: images → [B, embed_dim]."""
        from open_clip.model import _build_vision_tower

        return _build_vision_tower(self._embed_dim, self._vision_cfg, quick_gelu=self._quick_gelu)

    @property
    def backbone_spec(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """Key → (shape, dtype) of the backbone's state dict (built once on the meta device: no memory)."""
        if self._spec is None:
            with torch.device("meta"):
                tower = self.build_backbone()
            self._spec = {k: (v.shape, v.dtype) for k, v in tower.state_dict().items()}
        return self._spec

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    # ------------------------------------------------------------------ files
    @property
    def task_names(self) -> list[str]:
        return list(self.finetuned)

    def checkpoint_paths(self) -> list[str]:
        return [self.pretrained, *self.finetuned.values(), *(self.heads[t] for t in self.task_names)]

    def prepare(self) -> None:
        """Check that every checkpoint and head file exists (one error listing all missing ones)."""
        missing = [p for p in self.checkpoint_paths() if not Path(p).exists()]
        if missing:
            raise FreeMergeError(f"OpenCLIPAdapter: {len(missing)} file(s) do not exist: {missing}")

    def _read(self, path: str, role: str) -> StateDict:
        """A state dict from ``path`` (safetensors, directory, torch state dict; pickled modules if allowed).
        A damaged or truncated file raises ``FreeMergeError`` naming it."""
        p = Path(path)
        if not p.exists():
            raise FreeMergeError(f"{role} checkpoint {path} does not exist")
        try:
            return load_state_dict(p)
        except PickledObjectsError:
            if not self.allow_pickle:
                raise FreeMergeError(
                    f"{role} checkpoint {path} holds pickled Python objects (task_vectors saves whole modules "
                    f"with torch.save(model)), not a state dict; loading it would execute code from the file. "
                    f"Convert it once to a plain state dict:\n{CONVERSION_SNIPPET.format(model=self.model_name)}\n"
                    f"or, for files you trust, set allow_pickle: true") from None
        return self._read_pickle(p, role)

    def _read_pickle(self, path: Path, role: str) -> StateDict:
        return read_pickled_state_dict(path, role)  # executes code from the file: opted in (allow_pickle)

    def _detect_prefix(self, sd: StateDict) -> str:
        spec = self.backbone_spec
        counts = [(sum(prefix + k in sd for k in spec), -i, prefix) for i, prefix in enumerate(AUTO_PREFIXES)]
        return max(counts)[2]

    def _backbone_state_dict(self, path: str, role: str) -> StateDict:
        sd = self._read(path, role)
        prefix = self._detect_prefix(sd) if self.key_prefix is None else self.key_prefix
        spec = self.backbone_spec
        missing = [k for k in spec if prefix + k not in sd]
        if missing:
            sample = list(sd)[:8]
            raise CheckpointMismatchError(
                f"{role} checkpoint {path}: {len(missing)} key(s) of the {self.model_name} visual tower are "
                f"missing under prefix {prefix!r}: {missing[:10]}{' ...' if len(missing) > 10 else ''}; "
                f"the file's first keys: {sample} (set key_prefix, or check model_name/model_config)")
        out = {}
        for key, (shape, _) in spec.items():
            t = sd[prefix + key]
            if t.shape != shape:
                raise CheckpointMismatchError(
                    f"{role} checkpoint {path}: key {prefix + key!r} has shape {tuple(t.shape)}, the "
                    f"{self.model_name} visual tower expects {tuple(shape)} (check model_name/model_config)")
            out[key] = t
        extra = []
        if prefix in ("model.visual.", "visual."):  # keys of the visual tower the built one lacks
            extra = [k for k in sd if k.startswith(prefix) and k[len(prefix):] not in spec]
        if extra:
            warnings.warn(f"{role} checkpoint {path}: {len(extra)} key(s) under {prefix!r} are not in the "
                          f"{self.model_name} visual tower and are ignored: {extra[:5]}", stacklevel=3)
        return out

    def pretrained_state_dict(self) -> StateDict:
        return self._backbone_state_dict(self.pretrained, "pre-trained")

    def finetuned_state_dict(self, task: str) -> StateDict:
        return self._backbone_state_dict(self._path(self.finetuned, task), f"fine-tuned ({task})")

    def _path(self, table: dict[str, str], task: str) -> str:
        if task not in table:
            raise ConfigError(f"task {task!r} is not configured; accepted: {self.task_names}")
        return table[task]

    # ------------------------------------------------------------------ heads
    def head_state_dict(self, task: str) -> StateDict:
        """The task's head as ``{weight: [C, D], bias: [C]}`` (bias zeros when the file has none).

        Read once and kept in memory; read again when the file changed since (size, mtime, inode: a replaced
        or rewritten head file is never served from the cache)."""
        path = self._path(self.heads, task)
        try:
            stamp = file_signature(path)
        except FileNotFoundError:
            self._head_cache.pop(task, None)
            raise FreeMergeError(f"head ({task}) checkpoint {path} does not exist") from None
        cached = self._head_cache.get(task)
        if cached is None or cached[0] != stamp:
            sd = self._read(path, f"head ({task})")
            head = linear_head_tensors(sd, self._embed_dim, f"head ({task}) file {path}",
                                       f"the {self.model_name} image embedding size")
            self._head_cache[task] = (stamp, head)
        return self._head_cache[task][1]

    def build_head(self, task: str) -> nn.Linear:
        sd = self.head_state_dict(task)
        c, d = sd["weight"].shape
        head = (NormalizedLinear if self.normalize_head_input else nn.Linear)(d, c)
        head.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        return head

    def num_classes(self, task: str) -> int:
        return int(self.head_state_dict(task)["weight"].shape[0])

    def __repr__(self) -> str:
        return (f"OpenCLIPAdapter(model_name={self.model_name!r}, pretrained={self.pretrained!r}, "
                f"tasks={self.task_names})")


__all__ = ["AUTO_PREFIXES", "CONVERSION_SNIPPET", "NormalizedLinear", "OpenCLIPAdapter"]
