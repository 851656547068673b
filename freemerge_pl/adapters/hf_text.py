"""Adapter for Hugging Face sequence classifiers fine-tuned from one encoder (RoBERTa, BERT, DeBERTa, ...).

Layout: a pre-trained encoder directory (``AutoModel`` or the hub's masked-LM checkpoint, e.g. ``roberta-base``;
its tokenizer too) and one ``AutoModelForSequenceClassification`` directory per task (``config.json`` +
``model.safetensors``, a sharded safetensors index, or ``pytorch_model.bin``), given as a mapping task → dir
and/or ``checkpoint_root`` + ``pattern`` (``{task}`` replaced by the task name).

Backbone / head split, decided from how transformers builds ``*ForSequenceClassification``: the encoder is
the submodule named ``base_model_prefix`` (``roberta``, ``bert``, ``deberta``, ...); everything else is the
task's head, kept per task and never merged:

* RoBERTa / XLM-R / CamemBERT / ELECTRA: the encoder has no pooler; ``classifier`` (dense → tanh →
  out_proj, on the ``<s>`` token) is the head. Backbone output: the first token's last hidden state.
* DeBERTa (v1/v2/v3), DistilBERT: the task-specific ``pooler`` / ``pre_classifier`` sits beside the
  classifier, outside the encoder, so it belongs to the head. Backbone output: the first token's state.
* BERT: the pooler (dense → tanh on ``[CLS]``) is part of ``bert.`` and of the pre-trained checkpoint, so it
  is merged with the encoder; the head is ``classifier``. Backbone output: the pooler output.

The head runs the library's own ``forward`` of the fine-tuned model with its encoder replaced by a stub that
hands back the backbone's features, so merged backbone + head reproduce ``AutoModelForSequenceClassification``
logits exactly when the backbone holds the fine-tuned encoder. The merged keys are the fine-tuned
checkpoints' own (``roberta.encoder.layer.0.attention.self.query.weight``, ...); the pre-trained
checkpoint's keys are matched with or without the prefix, and its extra keys (a pooler the classifier
model lacks, the masked-LM head) are ignored. ``num_classes`` is ``config.num_labels`` (1: regression,
e.g. STS-B). Inputs are packed token tensors (``freemerge_pl.data.text``) or dicts of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from freemerge_pl.adapters.base import ModelAdapter, StateDict
from freemerge_pl.adapters.checks import meta_state_spec, task_order
from freemerge_pl.data.text import unpack_text_inputs
from freemerge_pl.errors import CheckpointMismatchError, ConfigError, FreeMergeError
from freemerge_pl.io import INDEX_NAME, open_checkpoint

#: model types whose sequence-classification head was checked to take only the first token or the pooler
SUPPORTED_MODEL_TYPES = ("roberta", "xlm-roberta", "camembert", "bert", "deberta", "deberta-v2", "distilbert",
                         "electra")
WEIGHT_FILES = ("model.safetensors", INDEX_NAME, "pytorch_model.bin")


def weights_path(directory: Path) -> Path:
    """What ``open_checkpoint`` reads for a model directory: the directory (safetensors) or its .bin."""
    if (directory / "model.safetensors").is_file() or (directory / INDEX_NAME).is_file():
        return directory
    if (directory / "pytorch_model.bin").is_file():
        return directory / "pytorch_model.bin"
    raise FreeMergeError(f"{directory} holds none of {list(WEIGHT_FILES)} (a save_pretrained model directory)")


def read_config(directory: Path, role: str) -> dict[str, Any]:
    """``config.json`` of a model directory as a dict (an error naming the directory and role otherwise)."""
    path = directory / "config.json"
    if not path.is_file():
        raise FreeMergeError(f"{role}: {directory} has no config.json (expected a save_pretrained directory)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FreeMergeError(f"{role}: {path} cannot be read: {err}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise FreeMergeError(f"{role}: {path} has no model_type")
    return config


def num_labels_of(config: dict[str, Any]) -> int:
    """``config.num_labels`` as transformers derives it (``id2label`` when present, else ``num_labels``, 2)."""
    if config.get("id2label"):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))


class _FeaturesAsEncoderOutput(nn.Module):
    """Stands in for the encoder inside a head: returns the backbone features as the encoder's output."""

    def forward(self, *args: Any, inputs_embeds: Tensor | None = None, **kwargs: Any):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(last_hidden_state=inputs_embeds[:, None, :], pooler_output=inputs_embeds)


class SequenceClassificationHead(nn.Module):
    """A fine-tuned ``*ForSequenceClassification`` without its encoder: features ``[B, D]`` → logits ``[B, C]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        setattr(model, model.base_model_prefix, _FeaturesAsEncoderOutput())
        self.model = model

    def forward(self, features: Tensor) -> Tensor:
        return self.model(inputs_embeds=features, return_dict=True).logits


class TextEncoderBackbone(nn.Module):
    """The encoder under its checkpoint prefix: packed tokens ``[B, F, L]`` (or a dict) → features ``[B, D]``.

    ``features``: ``first_token`` (the last hidden state of ``<s>``/``[CLS]``) or ``pooler`` (BERT's pooler)."""

    def __init__(self, encoder: nn.Module, prefix: str, features: str) -> None:
        super().__init__()
        self.prefix, self.features = prefix, features
        self.add_module(prefix, encoder)

    def forward(self, x: Tensor | dict[str, Tensor]) -> Tensor:
        out = getattr(self, self.prefix)(**unpack_text_inputs(x), return_dict=True)
        return out.pooler_output if self.features == "pooler" else out.last_hidden_state[:, 0]

    def token_mean(self, x: Tensor | dict[str, Tensor], n_layers: int | None = None) -> Tensor:
        """The mean over the unmasked tokens ``[B, D]`` of the hidden states after the first ``n_layers`` layers
        (None: the last hidden state): the router's ``pretrained_backbone`` / ``pretrained`` features (measured
        above the first token and the pooler in ``benchmarks/router_compare.py``)."""
        kw = unpack_text_inputs(x)
        encoder = getattr(self, self.prefix)
        if n_layers is None:
            hidden = encoder(**kw, return_dict=True).last_hidden_state
        else:
            states = encoder(**kw, output_hidden_states=True, return_dict=True).hidden_states
            if not 0 <= n_layers < len(states):
                raise ConfigError(f"a prefix of {n_layers} layers is beyond the encoder's depth: "
                                  f"{type(encoder).__name__} has {len(states) - 1} layers")
            hidden = states[n_layers]
        mask = kw.get("attention_mask")
        if mask is None:
            return hidden.mean(1)
        mask = mask.to(hidden.dtype)[..., None]
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


def text_token_mean(adapter: ModelAdapter, backbone: TextEncoderBackbone, x: Tensor) -> Tensor:
    """``pooled_features`` of a token adapter whose backbone is a ``TextEncoderBackbone``: the masked token mean
    of the last hidden state (assign as ``pooled_features = text_token_mean``)."""
    return backbone.token_mean(x)


def text_depth(adapter: ModelAdapter, backbone: TextEncoderBackbone) -> int | None:
    """``backbone_depth`` of such an adapter: the encoder's layer count (its config's ``num_hidden_layers``)."""
    return getattr(getattr(getattr(backbone, backbone.prefix, None), "config", None), "num_hidden_layers", None)


def text_prefix_features(adapter: ModelAdapter, backbone: TextEncoderBackbone, x: Tensor, n_blocks: int) -> Tensor:
    """``prefix_features`` of such an adapter: the masked token mean after the first ``n_blocks`` layers (assign as
    ``prefix_features = text_prefix_features``)."""
    return backbone.token_mean(x, n_blocks)


class HFSequenceClassificationAdapter(ModelAdapter):
    """Sequence classifiers fine-tuned from one encoder: the encoders are merged, each task keeps its head.

    ``pretrained``: the pre-trained encoder directory (also the tokenizer's). ``finetuned``: task → fine-tuned
    ``AutoModelForSequenceClassification`` directory; ``checkpoint_root`` + ``pattern``: the directory of any
    task in ``tasks`` that ``finetuned`` does not list (``<checkpoint_root>/<pattern with {task}>``).
    ``tasks``: the task order (default: ``finetuned``'s). Nothing is read in ``__init__``; ``prepare`` (run
    before any merging) checks every directory, model type, architecture and hidden size, naming the file
    and the task at fault.
    """

    exclude_keys: tuple[str, ...] = ()  # the heads are not part of the backbone's state dict
    input_kind = "tokens"
    pooled_features = text_token_mean
    prefix_features = text_prefix_features
    backbone_depth = text_depth

    def __init__(
        self,
        pretrained: str,
        finetuned: dict[str, str] | None = None,
        tasks: list[str] | None = None,
        checkpoint_root: str | None = None,
        pattern: str = "{task}",
    ) -> None:
        finetuned, tasks = task_order("HFSequenceClassificationAdapter", finetuned, tasks)
        if "{task}" not in pattern:
            raise ConfigError(f"HFSequenceClassificationAdapter: pattern={pattern!r} must contain '{{task}}'")
        unplaced = [t for t in tasks if t not in finetuned]
        if unplaced and checkpoint_root is None:
            raise ConfigError(f"HFSequenceClassificationAdapter: task(s) {unplaced} have no directory: list them "
                              f"in finetuned or set checkpoint_root (+ pattern)")
        self.pretrained = str(pretrained)
        self.checkpoint_root = checkpoint_root
        self.pattern = pattern
        self.finetuned = {t: finetuned.get(t) or str(Path(str(checkpoint_root)) / pattern.format(task=t))
                          for t in tasks}
        self._configs: dict[str, dict[str, Any]] = {}
        self._reference: tuple[str, dict[str, Any]] | None = None
        self._spec: dict[str, tuple[torch.Size, torch.dtype]] | None = None
        self._prepared = False

    # ------------------------------------------------------------------ configs and checks
    @property
    def task_names(self) -> list[str]:
        return list(self.finetuned)

    def _dir(self, task: str) -> Path:
        if task not in self.finetuned:
            raise ConfigError(f"task {task!r} is not configured; accepted: {self.task_names}")
        return Path(self.finetuned[task])

    def task_config(self, task: str) -> dict[str, Any]:
        """The fine-tuned ``config.json`` of ``task``, checked: a sequence classifier of a supported type."""
        if task not in self._configs:
            directory = self._dir(task)
            role = f"fine-tuned ({task})"
            if not directory.is_dir():
                raise FreeMergeError(f"{role}: checkpoint directory {directory} does not exist")
            config = read_config(directory, role)
            archs = config.get("architectures") or []
            if not any(a.endswith("ForSequenceClassification") for a in archs):
                raise CheckpointMismatchError(
                    f"{role}: {directory / 'config.json'} describes {archs or 'no architectures'}, not a "
                    f"*ForSequenceClassification model (AutoModelForSequenceClassification.save_pretrained)")
            if config["model_type"] not in SUPPORTED_MODEL_TYPES:
                raise CheckpointMismatchError(f"{role}: {directory} is model_type {config['model_type']!r}; "
                                              f"supported: {list(SUPPORTED_MODEL_TYPES)}")
            self._configs[task] = config
        return self._configs[task]

    def num_classes(self, task: str) -> int:
        return num_labels_of(self.task_config(task))

    def _reference_config(self) -> tuple[str, dict[str, Any]]:
        """(task, config) that the backbone is built from: the first task's."""
        if self._reference is None:
            task = self.task_names[0]
            self._reference = (task, self.task_config(task))
        return self._reference

    def prepare(self) -> None:
        """Check every directory before any weight is read: configs, architectures, and that every task and the
        pre-trained encoder share model type and encoder shape (one error naming the task and file)."""
        if self._prepared:
            return
        ref_task, ref = self._reference_config()
        shape_keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                      "vocab_size", "max_position_embeddings", "type_vocab_size", "dim", "n_layers")
        pre_dir = Path(self.pretrained)
        if not pre_dir.is_dir():
            raise FreeMergeError(f"pre-trained checkpoint directory {pre_dir} does not exist")
        configs = {"pre-trained": (pre_dir, read_config(pre_dir, "pre-trained"))}
        configs.update({f"fine-tuned ({t})": (self._dir(t), self.task_config(t)) for t in self.task_names})
        for role, (directory, config) in configs.items():
            differ = [(k, config.get(k), ref.get(k)) for k in shape_keys if config.get(k) != ref.get(k)]
            if differ:
                raise CheckpointMismatchError(
                    f"{role}: {directory / 'config.json'} differs from the fine-tuned ({ref_task}) model in "
                    + ", ".join(f"{k}={a!r} (vs {b!r})" for k, a, b in differ)
                    + ": every checkpoint must be the same encoder architecture")
            weights_path(directory)
        self._prepared = True

    # ------------------------------------------------------------------ modules
    def _hf_config(self, task: str):
        from transformers import AutoConfig

        directory = self._dir(task)
        self.task_config(task)
        return AutoConfig.from_pretrained(str(directory), local_files_only=True)

    def _classifier_model(self, task: str) -> nn.Module:
        """A randomly initialised ``AutoModelForSequenceClassification`` of ``task``'s config (eval mode)."""
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_config(self._hf_config(task)).eval()

    def build_backbone(self) -> TextEncoderBackbone:
        """The encoder of the first task's classifier model (randomly initialised; weights loaded afterwards)."""
        model = self._classifier_model(self._reference_config()[0])
        prefix = model.base_model_prefix
        encoder = getattr(model, prefix)
        features = "pooler" if getattr(encoder, "pooler", None) is not None else "first_token"
        return TextEncoderBackbone(encoder, prefix, features).eval()

    @property
    def backbone_spec(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """Key → (shape, dtype) of the backbone's state dict (built on the meta device: no memory)."""
        if self._spec is None:
            self._spec = meta_state_spec(self.build_backbone)
        return self._spec

    @property
    def prefix(self) -> str:
        return next(iter(self.backbone_spec)).split(".", 1)[0]

    def build_head(self, task: str) -> SequenceClassificationHead:
        """``task``'s classifier model minus its encoder, with the fine-tuned head weights loaded (eval mode)."""
        head = SequenceClassificationHead(self._classifier_model(task))
        wanted = head.model.state_dict()
        directory = self._dir(task)
        source = open_checkpoint(weights_path(directory))
        try:
            missing = [k for k in wanted if k not in source]
            if missing:
                raise CheckpointMismatchError(
                    f"fine-tuned ({task}) checkpoint {directory}: head key(s) {missing} are missing (the "
                    f"classifier of a {self.task_config(task)['model_type']} sequence classifier)")
            weights = {k: source.get(k) for k in wanted}
        finally:
            source.close()
        for key, t in weights.items():
            if t.shape != wanted[key].shape:
                raise CheckpointMismatchError(
                    f"fine-tuned ({task}) checkpoint {directory}: head key {key!r} has shape {tuple(t.shape)}, "
                    f"its config.json (num_labels={self.num_classes(task)}) implies {tuple(wanted[key].shape)}")
        head.model.load_state_dict(weights, strict=True)
        return head.requires_grad_(False).eval()

    # ------------------------------------------------------------------ weights
    def _encoder_state_dict(self, directory: Path, role: str) -> StateDict:
        """The backbone's keys from a checkpoint whose encoder keys carry the prefix or none."""
        spec = self.backbone_spec
        prefix = self.prefix + "."
        source = open_checkpoint(weights_path(directory))
        try:
            keys = set(source.keys())
            with_prefix = sum(k in keys for k in spec)
            without = sum(k[len(prefix):] in keys for k in spec)
            name = (lambda k: k) if with_prefix >= without else (lambda k: k[len(prefix):])
            missing = [name(k) for k in spec if name(k) not in keys]
            if missing:
                raise CheckpointMismatchError(
                    f"{role} checkpoint {directory}: {len(missing)} encoder key(s) are missing: {missing[:8]}"
                    f"{' ...' if len(missing) > 8 else ''}; the file's first keys: {sorted(keys)[:6]}")
            out = {}
            for key, (shape, _) in spec.items():
                t = source.get(name(key))
                if t.shape != shape:
                    raise CheckpointMismatchError(
                        f"{role} checkpoint {directory}: key {name(key)!r} has shape {tuple(t.shape)}, the "
                        f"encoder expects {tuple(shape)}")
                out[key] = t
        finally:
            source.close()
        return out

    def pretrained_state_dict(self) -> StateDict:
        self.prepare()
        return self._encoder_state_dict(Path(self.pretrained), "pre-trained")

    def finetuned_state_dict(self, task: str) -> StateDict:
        self.prepare()
        return self._encoder_state_dict(self._dir(task), f"fine-tuned ({task})")

    def checkpoint_paths(self) -> list[str]:
        paths = []
        for directory in [Path(self.pretrained), *map(Path, self.finetuned.values())]:
            try:
                found = weights_path(directory)
            except FreeMergeError:
                continue
            if found.is_dir():
                found = found / ("model.safetensors" if (found / "model.safetensors").is_file() else INDEX_NAME)
            paths.append(str(found))
        return paths

    def tokenizer(self):
        """The pre-trained directory's tokenizer (``AutoTokenizer``, ``local_files_only``)."""
        from freemerge_pl.data.text import load_tokenizer

        return load_tokenizer(self.pretrained)

    def __repr__(self) -> str:
        return f"HFSequenceClassificationAdapter(pretrained={self.pretrained!r}, tasks={self.task_names})"


__all__ = ["SUPPORTED_MODEL_TYPES", "HFSequenceClassificationAdapter", "SequenceClassificationHead",
           "TextEncoderBackbone"]
