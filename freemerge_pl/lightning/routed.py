"""RoutedModel: the merged backbone, its task modules, the heads and the router as one plain ``nn.Module``.

Routed inference (paper Alg. 1) usable from any PyTorch code, without Lightning: the router reads cheap
features of the input (``freemerge_pl.lightning.router``), picks each sample's task, and the backbone runs
once per group of samples routed alike with the group's task modules applied in place and restored (the
weight swap, bit-exact: ``TaskModule.apply_``/``restore_``). ``MergedModule`` wraps it with Lightning's hooks.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from freemerge_pl.adapters.base import ModelAdapter, has_prefix_features
from freemerge_pl.errors import ConfigError, HyperparameterError
from freemerge_pl.io.export import HEADS_FILE, ROUTER_FILE, write_export
from freemerge_pl.lightning.router import (
    BATCH_SIZE,
    POOL_SIZE,
    SEED,
    SPLIT_BLOCK,
    InputPool,
    Router,
    RouterConfig,
    resolve_feature_source,
)
from freemerge_pl.merging import MergeMethod, build_method, merge
from freemerge_pl.merging.engine import check_prefilter
from freemerge_pl.merging.fourier import check_filter_ratio
from freemerge_pl.settings import check_value

StateDict = dict[str, Tensor]


def slot(name: str) -> str:
    """A ModuleDict-safe version of a task name."""
    return name.replace(".", "_")


def labelled_digest(items: Iterable[tuple[str, Tensor]]) -> str:
    """sha256 over each ``(label, tensor)`` in turn: the label's UTF-8 bytes, then the tensor's bytes (the one
    hashing of ``state_digest`` and ``tensor_digest``)."""
    h = hashlib.sha256()
    for label, t in items:
        h.update(label.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def state_digest(module: nn.Module) -> str:
    """sha256 over the names and bytes of a module's state dict (used to prove ranks agree; exports record the
    backbone's)."""
    return labelled_digest(module.state_dict().items())


def tensor_digest(x: Tensor) -> str:
    """sha256 over a tensor's dtype, shape and bytes (the route cache's key for an input batch)."""
    return labelled_digest([(f"{x.dtype}{tuple(x.shape)}", x)])


def checked_method(method: str | MergeMethod, method_args: dict[str, Any] | None,
                    fr_filter_ratio: float) -> MergeMethod:
    """The method's checked configuration; an error names the setting (``model.method_args``, ...)."""
    where = "model.method" if not isinstance(method, str) else f"model.method_args (method {method!r})"
    if method_args is not None and not isinstance(method_args, dict):
        raise ConfigError(f"model.method_args={method_args!r} must be a mapping of hyperparameter → value")
    try:
        config = build_method(method, method_args)
    except ConfigError:
        raise  # an unknown method: the message names it and lists the known ones
    except (TypeError, ValueError) as err:  # HyperparameterError, or a value a range check tripped over
        message = str(err)
        if isinstance(method, str) and message.startswith(f"{method}: "):
            message = message[len(method) + 2:]
        raise HyperparameterError(f"{where}: {message}") from err
    check_value("model.fr_filter_ratio", fr_filter_ratio, float)
    try:
        check_filter_ratio(fr_filter_ratio)
        check_prefilter(config, fr_filter_ratio)
    except HyperparameterError as err:
        raise HyperparameterError(f"model.fr_filter_ratio: {err}") from err
    return config


def checked_router(config: RouterConfig, adapter: ModelAdapter) -> RouterConfig:
    """``model.router`` against the adapter: its feature source can read the adapter's inputs (``input`` on token
    ids is refused) and an adapter asked for a backbone prefix can run one."""
    name = type(adapter).__name__
    source = resolve_feature_source(config, getattr(adapter, "input_kind", "other"), name,
                                    has_prefix_features(adapter))
    if source in ("backbone_prefix", "pretrained_backbone") and not has_prefix_features(adapter):
        raise ConfigError(f"model.router.feature_source={config.feature_source!r} (→ {source!r}) needs "
                          f"{name}.prefix_features, which {name} does not implement; use 'backbone'")
    return config


class RoutedModel(nn.Module):
    """Backbone (frozen, merged weights), task modules (one per task), heads and router.

    Args:
        adapter: builds the backbone and heads and reads the router's prefix features.
        task_names: the tasks, in the order of ``task_modules`` and the router's outputs.
        backbone: the merged backbone (its weights are used as they are).
        task_modules: one per task (may be empty: then nothing is routed, ``routes`` is false, and no router is
            built, trained or run: every sample runs the merged backbone and is scored with its dataset's
            head, whatever the routing and head-selection settings).
        shared_modules: modules the task modules share (kept with them).
        router_config: the router's settings.
        router_in_features: the router's input width; None → measured on ``example_input`` when a router is
            built (only with task modules).
        example_input: one input batch, to size the router's first layer.
        top_k: experts per sample (1 = Alg. 1; >1 combines the top-k with renormalised softmax weights).
        split_block: leading blocks the prefix sources read (not a setting: ``SPLIT_BLOCK`` everywhere in the
            product; a benchmark's variant may pass another, 0 = the whole pre-trained backbone).
    """

    def __init__(self, adapter: ModelAdapter, task_names: list[str], backbone: nn.Module,
                 task_modules: list[nn.Module] | None = None, shared_modules: dict[str, nn.Module] | None = None,
                 router_config: RouterConfig | None = None, router_in_features: int | None = None,
                 example_input: Tensor | None = None, top_k: int = 1, split_block: int = SPLIT_BLOCK) -> None:
        super().__init__()
        self.__dict__["adapter"] = adapter  # not a submodule
        self.task_names = list(task_names)
        self.router_config = router_config or RouterConfig()
        self.top_k, self.split_block = top_k, split_block
        self.backbone = backbone.requires_grad_(False).eval()
        self.task_modules = nn.ModuleList(task_modules or [])
        self.shared_modules = nn.ModuleDict(shared_modules or {})
        self.heads = nn.ModuleDict({slot(t): adapter.build_head(t) for t in self.task_names})
        self.heads.requires_grad_(False).eval()
        self.register_buffer("router_trained", torch.zeros((), dtype=torch.bool))
        self.__dict__["_example_input"] = example_input  # sizes a router built later (not a buffer)
        self.router_in_features = None if router_in_features is None else int(router_in_features)
        self.router: Router | None = None
        #: reuse each input batch's router logits while the router and its features are unchanged (only for a
        #: feature source that does not read the merged weights: then another merge candidate routes alike)
        self.cache_routes = False
        self.__dict__["_route_cache"] = {}
        self.__dict__["_router_digest"] = None  # (digest, the state's tensors, their versions): ``router_digest``
        self.reset_router()

    # ------------------------------------------------------------------ the router
    @property
    def routes(self) -> bool:
        """Whether samples are routed: only with task modules. Without any there is nothing to route: no router
        is built, trained or run, and every sample runs the merged backbone with its dataset's head."""
        return len(self.task_modules) > 0

    def reset_router(self) -> None:
        """A fresh, untrained router (None without task modules); its initial weights depend on ``SEED`` only."""
        self.router_trained.fill_(False)
        self.clear_route_cache()
        if not self.routes:
            self.router = None
            return
        device = self.router_trained.device
        if self.router_in_features is None:
            example = self.__dict__.get("_example_input")
            if example is None:
                raise ConfigError("the router needs an example input or its input width to size its first layer: "
                                  "call build(example_input), attach a data module with router_dataset(), or "
                                  "pass router_in_features (an export's manifest records it)")
            with torch.no_grad():
                self.router_in_features = int(self.router_input(example.to(device)).shape[-1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            self.router = Router(len(self.task_names), self.router_config, self.router_in_features).to(device)

    @property
    def feature_source(self) -> str:
        """The feature source in use (``auto`` resolved from the adapter's ``input_kind``; ``auto`` on a
        backbone no deeper than ``split_block`` reads the whole pre-trained backbone: the same features)."""
        adapter = self.adapter
        source = resolve_feature_source(self.router_config, getattr(adapter, "input_kind", "other"),
                                        type(adapter).__name__, has_prefix_features(adapter))
        if source == "pretrained_backbone" and self.router_config.feature_source == "auto":
            depth = adapter.backbone_depth(self.backbone)
            if depth is not None and self.split_block >= depth:
                return "pretrained"
        return source

    @property
    def reads_merged_backbone(self) -> bool:
        """Whether the router's features depend on the merged weights (retrain it after another merge)."""
        return self.feature_source in ("backbone", "backbone_prefix")

    def _pretrained_backbone(self, device: torch.device) -> nn.Module:
        """θ_pre's backbone for the ``pretrained``/``pretrained_backbone`` sources: built once from the adapter, frozen, kept out
        of the module tree (not in checkpoints or exports: the adapter reads it again)."""
        backbone = self.__dict__.get("_pretrained")
        if backbone is None:
            backbone = self.adapter.build_backbone()
            backbone.load_state_dict(self.adapter.pretrained_state_dict(), strict=True)
            self.__dict__["_pretrained"] = backbone.requires_grad_(False).eval()
        return backbone.to(device)

    @torch.no_grad()
    def router_input(self, x: Tensor) -> Tensor:
        """The router's input features ``[B, D]`` of a batch (``feature_source``)."""
        source = self.feature_source
        if source == "input":
            return InputPool(POOL_SIZE)(x)
        if source == "backbone":
            return self.backbone(x).float()
        if source == "pretrained":
            return self.adapter.pooled_features(self._pretrained_backbone(x.device), x).float()
        backbone = self.backbone if source == "backbone_prefix" else self._pretrained_backbone(x.device)
        if self.split_block == 0:  # a benchmark's variant: the whole (pre-trained) backbone
            return backbone(x).float()
        return self.adapter.prefix_features(backbone, x, self.split_block).float()

    @torch.no_grad()
    def router_features(self, dataset, batch_size: int = BATCH_SIZE) -> tuple[Tensor, Tensor]:
        """The router's input features ``[N, D]`` and task ids ``[N]`` of a dataset of ``(x, y, task_id)``
        (computed once, in order: the features are frozen, so training the head needs no further pass)."""
        device = self.router_trained.device
        feats, ids = [], []
        for x, _, t in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
            feats.append(self.router_input(x.to(device)))
            ids.append(torch.as_tensor(t).long().to(device))
        return torch.cat(feats), torch.cat(ids)

    def fit_router(self, dataset, optimizer=None) -> None:
        """Train the router on ``dataset`` of ``(x, y, task_id)`` with ``Router.fit``, the one training loop
        (every rank trains the same router; under DDP rank 0's weights are broadcast to be safe). Without task
        modules there is no router: nothing is trained."""
        if not self.routes:
            return
        self.clear_route_cache()
        self.router.fit(*self.router_features(dataset), optimizer=optimizer)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for b in self.router.state_dict().values():
                torch.distributed.broadcast(b.data, src=0)
        self.router_trained.fill_(True)

    def clear_route_cache(self) -> None:
        """Forget every cached route and the router's digest (a router fitted, reset or loaded)."""
        self.__dict__["_route_cache"].clear()
        self.__dict__["_router_digest"] = None

    def router_digest(self) -> str:
        """``state_digest`` of the router, computed once per fit/reset/load and kept while every tensor of its
        state is the same object at the same version: a change in place (an optimiser step, ``load_state_dict``,
        ``p.add_``) bumps a tensor's version and the digest is computed again; a change through ``p.data``
        bypasses the version (call ``clear_route_cache`` after one)."""
        tensors = tuple(self.router.state_dict(keep_vars=True).values())
        versions = tuple(t._version for t in tensors)
        held = self.__dict__.get("_router_digest")
        if held is None or held[2] != versions or any(a is not b for a, b in zip(held[1], tensors)):
            held = (state_digest(self.router), tensors, versions)
            self.__dict__["_router_digest"] = held
        return held[0]

    def router_logits(self, x: Tensor) -> Tensor:
        """The router's task logits ``[B, K]``. With ``cache_routes`` and a feature source that does not read the
        merged weights (``reads_merged_backbone`` false), a batch seen before under the same router is not run
        again: its logits are kept under the sha256 of the input's bytes, the feature source and the router's
        digest (``router_digest``: hashed once per fit/reset/load, not per batch; ``tune`` scores every candidate
        on the same tune-val batches with one router)."""
        if not (self.cache_routes and isinstance(x, Tensor) and not self.reads_merged_backbone):
            return self.router(self.router_input(x))
        key = (tensor_digest(x), self.feature_source, self.split_block, self.router_digest())
        cache = self.__dict__["_route_cache"]
        if key not in cache:
            cache[key] = self.router(self.router_input(x)).detach()
        return cache[key].clone()

    def route(self, x: Tensor, task: int | Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """Task ids ``[B, k]`` and weights ``[B, k]``: from ``task`` (oracle) when given, else the router; without
        task modules (no router) and no ``task``: ``(None, None)``."""
        if task is None and not self.routes:
            return None, None
        if task is not None:
            ids = torch.as_tensor(task, device=x.device).long().reshape(-1)
            ids = ids.expand(x.shape[0]) if ids.numel() == 1 else ids
            return ids[:, None], torch.ones(x.shape[0], 1, device=x.device)
        return Router.route(self.router_logits(x), self.top_k)

    # ------------------------------------------------------------------ experts
    @torch.no_grad()
    def features(self, x: Tensor, ids: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
        """Backbone features with each sample's task modules: one backbone pass per group of samples routed
        alike, the group's modules applied in place (``weights``: their scales; default 1) and restored."""
        if ids is None or len(self.task_modules) == 0:
            return self.backbone(x)
        if weights is None:
            weights = torch.ones_like(ids, dtype=torch.float32)
        combos: dict[tuple, list[int]] = {}
        for i, (row, w) in enumerate(zip(ids.tolist(), weights.tolist())):
            combos.setdefault((tuple(row), tuple(w)), []).append(i)
        out = None
        for (task_ids, task_weights), rows in combos.items():
            applied = []
            try:
                for g, w in zip(task_ids, task_weights):
                    self.task_modules[g].apply_(self.backbone, float(w))
                    applied.append(g)
                f = self.backbone(x if len(combos) == 1 else x[torch.tensor(rows, device=x.device)])
            finally:
                for g in reversed(applied):
                    self.task_modules[g].restore_(self.backbone)
            if len(combos) == 1:  # the whole batch (e.g. one dataset's batch, oracle): no gather/scatter
                return f
            if out is None:
                out = f.new_empty(x.shape[0], *f.shape[1:])
            out[torch.tensor(rows, device=x.device)] = f
        return out

    @torch.no_grad()
    def routed_features(self, x: Tensor, task: int | Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(features, ids, weights)``: routed (or ``task``: oracle), then the backbone with the task modules."""
        ids, weights = self.route(x, task)
        return self.features(x, ids, weights), ids, weights

    def head_outputs(self, features: Tensor, task: int) -> Tensor:
        out = self.heads[slot(self.task_names[task])](features)
        return out.squeeze(-1) if out.shape[-1] == 1 else out

    def forward(self, x: Tensor, task: int | Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Route, run the backbone with the routed task modules; returns ``(features, routed task ids [B])``
        (without task modules: the merged backbone's features, and ``task`` as ids; None when not given)."""
        feats, ids, _ = self.routed_features(x, task)
        return feats, None if ids is None else ids[:, 0]

    @torch.no_grad()
    def predict(self, x: Tensor, task: int | Tensor | None = None) -> dict[str, Tensor]:
        """Per sample: the routed task, the routed task's head's class prediction and its softmax confidence
        (regression heads: the value, confidence NaN). Without task modules nothing is routed: ``task`` (the
        samples' dataset) picks the head, and is required."""
        if task is None and not self.routes:
            raise ConfigError("this merge has no task modules, so no router picks a sample's task: pass the task "
                              "(predict(x, task)); every sample runs the merged backbone with that task's head")
        feats, ids, _ = self.routed_features(x, None if self.routes else task)
        task = ids[:, 0]
        pred = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        conf = torch.full_like(pred, float("nan"))
        for g in task.unique().tolist():
            sel = task == g
            out = self.head_outputs(feats[sel], g).float()
            if out.dim() == 1:
                pred[sel] = out
            else:
                p = out.softmax(-1)
                conf[sel], pred[sel] = p.max(-1)[0], p.argmax(-1).float()
        return {"task": task, "prediction": pred, "confidence": conf}

    # ------------------------------------------------------------------ weights
    def task_module_bytes(self) -> int:
        return sum(m.nbytes for m in self.task_modules)

    def load_weights(self, state_dict: dict[str, Tensor], task_modules=None, shared_modules=None, *,
                     heads: dict[str, Tensor] | None = None, router: dict[str, Tensor] | None = None) -> None:
        """Swap in another merge result: backbone weights copied in place, task modules replaced; ``heads``
        (``<task>.<param>`` tensors) replace the heads' weights, ``router`` (a trained router's state dict) the
        router's (marked trained). Task modules arriving on a model without a router build a fresh one; without
        task modules the router (if any) is kept, unused, and ``router`` weights are ignored (nothing to route)."""
        self.backbone.load_state_dict(state_dict, strict=True)
        self.set_task_modules(task_modules, shared_modules)
        if heads is not None:
            used: set[str] = set()
            for t in self.task_names:
                head = self.heads[slot(t)]
                wanted = [f"{t}.{n}" for n in head.state_dict()]
                missing = [k for k in wanted if k not in heads]
                if missing:
                    raise ConfigError(f"head weights {missing} are missing (task {t!r})")
                head.load_state_dict({k[len(t) + 1:]: heads[k] for k in wanted}, strict=True)
                used.update(wanted)
            if set(heads) - used:
                raise ConfigError(f"head weights {sorted(set(heads) - used)} belong to no head of the tasks "
                                  f"{self.task_names}")
        if router is not None and self.router is not None:
            self.clear_route_cache()
            self.router.load_state_dict(router, strict=True)
            self.router_trained.fill_(True)

    def set_task_modules(self, task_modules=None, shared_modules=None) -> None:
        """Replace the task modules and shared modules; task modules arriving on a model without a router build a
        fresh (untrained) one."""
        device = self.router_trained.device
        self.task_modules = nn.ModuleList(task_modules or []).to(device)
        self.shared_modules = nn.ModuleDict(shared_modules or {}).to(device)
        if self.routes and self.router is None:
            self.reset_router()

    def head_state(self) -> dict[str, Tensor]:
        """The heads' weights as ``<task>.<param>`` tensors (the export's ``heads.safetensors``)."""
        return {f"{t}.{n}": p for t in self.task_names for n, p in self.heads[slot(t)].state_dict().items()}

    def export(self, directory, record: dict[str, Any], *, method: str, inputs=(), overwrite: bool = False
               ) -> list[Path]:
        """Publish backbone, task modules, heads and, when trained, the router with ``write_export`` (the one
        export writer: every file with size and sha256 in ``merge_info.json``, which also holds ``record``, the
        task names and whether the router is trained); returns the published files."""
        trained = bool(self.router_trained)
        record = {**record, "task_names": self.task_names, "router_trained": trained}
        extra = {HEADS_FILE: self.head_state(), **({ROUTER_FILE: self.router.state_dict()} if trained else {})}
        return write_export(directory, self.backbone.state_dict(), list(self.task_modules), dict(self.shared_modules),
                            record, names=self.task_names, method=method, inputs=inputs, extra_files=extra,
                            overwrite=overwrite)


def merge_routed(adapter: ModelAdapter, method_for: Callable[[StateDict, list[StateDict]], MergeMethod], *,
                 router: RouterConfig, fr_filter_ratio: float = 0.0, seed: int = 0,
                 example_input: Tensor | None = None, top_k: int = 1) -> tuple[RoutedModel, dict[str, Any]]:
    """Merge the adapter's checkpoints with ``method_for(pretrained, finetuned)`` (the configured method, bound to
    data statistics where it needs them) and assemble the routed model; returns it and the merge record."""
    names = list(adapter.task_names)
    start = time.perf_counter()
    pretrained = adapter.pretrained_state_dict()
    finetuned = [adapter.finetuned_state_dict(t) for t in names]
    method = method_for(pretrained, finetuned)
    out = merge(pretrained, finetuned, method, names=names, exclude_keys=list(adapter.exclude_keys),
                fr_filter_ratio=fr_filter_ratio, seed=seed, progress=True)
    del finetuned
    backbone = adapter.build_backbone()
    backbone.load_state_dict(out.state_dict, strict=True)
    model = RoutedModel(adapter, names, backbone, out.task_modules, out.result.shared_modules, router,
                        example_input=example_input, top_k=top_k)
    data = method.__dict__.get("_data")  # a data-dependent method's statistics: their cost
    record = {**out.record, "build_seconds": time.perf_counter() - start,
              **({"data_statistics": dict(data.info)} if data is not None else {})}
    return model, record
