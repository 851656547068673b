"""MergedModule: the merged backbone (frozen), task modules as buffers, heads, and the trainable router."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.nn import functional as F

from freemerge_pl.lightning.activation_experts import EXPERT_PATHS, ActivationExperts, PathChooser, UnsupportedCall
from freemerge_pl.errors import ConfigError, HyperparameterError
from freemerge_pl.merging import MergeMethod, build_method, merge
from freemerge_pl.merging.engine import check_prefilter
from freemerge_pl.merging.fourier import check_filter_ratio
from freemerge_pl.merging.merge import write_export
from freemerge_pl.merging.method import check_fields
from freemerge_pl.lightning.metrics import REGRESSION_METRICS, task_metrics
from freemerge_pl.adapters.base import ModelAdapter, has_prefix_features, implements
from freemerge_pl.lightning.router import (
    Router,
    RouterConfig,
    RoutingConfusionMatrix,
    check_router_config,
    pool_prefix_states,
    resolve_feature_source,
    routing_accuracy_metric,
)

ROUTINGS = ("router", "oracle")
HEAD_SELECTIONS = ("dataset", "routed")


def _synchronize(x: Tensor) -> None:
    """Wait for ``x``'s device (timing a CUDA computation)."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def _slot(name: str) -> str:
    """A ModuleDict-safe version of a task name."""
    return name.replace(".", "_")


def state_digest(module: nn.Module) -> str:
    """sha256 over the names and bytes of a module's state dict (used to prove ranks agree)."""
    h = hashlib.sha256()
    for k, t in module.state_dict().items():
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _checked_method(method: str | MergeMethod, method_args: dict[str, Any] | None,
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
    if isinstance(fr_filter_ratio, bool) or not isinstance(fr_filter_ratio, (int, float)):
        raise HyperparameterError(f"model.fr_filter_ratio={fr_filter_ratio!r} must be a number in [0, 1)")
    try:
        check_filter_ratio(fr_filter_ratio)
        check_prefilter(config, fr_filter_ratio)
    except HyperparameterError as err:
        raise HyperparameterError(f"model.fr_filter_ratio: {err}") from err
    return config


def _checked_router(config: RouterConfig, adapter: ModelAdapter | None = None) -> RouterConfig:
    """``model.router`` checked: field types, choices, sizes and ranges, and (given the adapter) that its feature
    source can read the adapter's inputs (``input`` on token ids is refused) and that an adapter asked for a
    backbone prefix can run one. The split point against the backbone's depth is checked when it is built."""
    check_fields(config, "model.router")
    check_router_config(config)
    if adapter is not None:
        name = type(adapter).__name__
        source = resolve_feature_source(config, getattr(adapter, "input_kind", "other"), name,
                                        has_prefix_features(adapter))
        needs_prefix = source == "backbone_prefix" or (source == "pretrained_backbone" and config.split_block > 0)
        if needs_prefix and not has_prefix_features(adapter):
            raise ConfigError(f"model.router.feature_source={config.feature_source!r} (→ {source!r}, split_block="
                              f"{config.split_block}) needs {name}.prefix_features, which {name} does not "
                              "implement; use 'backbone', or 'pretrained_backbone' with split_block 0")
        if needs_prefix and config.prefix_pool != "class_token" and not implements(adapter, "prefix_states"):
            raise ConfigError(f"model.router.prefix_pool={config.prefix_pool!r} needs {name}.prefix_states (the "
                              f"prefix's token states), which {name} does not implement; use 'class_token'")
        if config.shared_prefix:
            if source != "backbone_prefix":
                raise ConfigError(f"model.router.shared_prefix=true needs the merged backbone's prefix as the "
                                  f"router's features; feature_source {config.feature_source!r} resolves to "
                                  f"{source!r} for {name}")
            missing = [m for m in ("prefix_states", "suffix") if not implements(adapter, m)]
            if missing:
                raise ConfigError(f"model.router.shared_prefix=true needs {name}.{' and .'.join(missing)}, which "
                                  f"{name} does not implement; set shared_prefix false")
    return config


class MergedModule(LightningModule):
    """Builds the merged model in ``setup`` and trains only the router.

    Args:
        adapter: reads θ_pre, θ_1..θ_K and the heads; builds the backbone module.
        method: a registry name (``freemerge_pl.merging.list_methods()``) with ``method_args`` its
            hyperparameters, or a configured method object (``class_path: FREEMerging`` with ``init_args`` in
            YAML; every field typed and checked once, here).
        fr_filter_ratio: FR high-pass applied to every task vector before ``method`` (0 = off).
        routing: ``router`` (learned, Alg. 1) or ``oracle`` (the true task picks the task module).
        head_selection: ``dataset`` (the evaluated dataset's head, the benchmark protocol) or ``routed``
            (the routed task's head, task-agnostic deployment; a sample routed to another task's head
            is counted as a wrong prediction).
        top_k: experts per sample (1 = Alg. 1; >1 combines the top-k with renormalised softmax weights,
            one backbone pass per distinct combination, so it is slower).
        auto_fit_router: when testing with an untrained router, train it first on the router split.
        metric_suffix: appended to metric names (``test/<task>/<metric><suffix>``); None → the protocol,
            e.g. ``[router,dataset]`` unless it is the default pair.
        expert_path: how a batch whose samples route to different experts runs (``activation_experts``):
            ``activation`` one backbone pass with each sample's sparse expert added as a correction of the
            layers it touches; ``weight_swap`` one backbone pass per group of samples with the group's
            experts applied in place and restored; ``auto`` (default) the weight swap for a batch that forms
            one group, and for batches of several groups the faster of the two, timed on the first few such
            batches (``activation_experts.PathChooser``; the choice is said once in the log). A model whose
            experts touch a layer the activation path does not cover uses the weight swap for every batch
            (said once in the log).
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        method: str | MergeMethod = "free_merging",
        method_args: dict[str, Any] | None = None,
        fr_filter_ratio: float = 0.0,
        merge_seed: int = 0,
        routing: str = "router",
        head_selection: str = "dataset",
        top_k: int = 1,
        router: RouterConfig | None = None,
        auto_fit_router: bool = True,
        metric_suffix: str | None = None,
        expert_path: Literal["auto", "activation", "weight_swap"] = "auto",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["adapter"])
        # Every setting is checked here, at construction: before any data set or checkpoint is read.
        self.method_config = _checked_method(method, method_args, fr_filter_ratio)
        if routing not in ROUTINGS:
            raise ConfigError(f"model.routing={routing!r}; accepted: {list(ROUTINGS)}")
        if head_selection not in HEAD_SELECTIONS:
            raise ConfigError(f"model.head_selection={head_selection!r}; accepted: {list(HEAD_SELECTIONS)}")
        self.router_config = _checked_router(router or RouterConfig(), adapter)
        for name, value in (("top_k", top_k), ("merge_seed", merge_seed)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"model.{name}={value!r} must be a whole number")
        if top_k < 1:
            raise ConfigError(f"model.top_k={top_k} must be ≥ 1")
        self.adapter = adapter
        self.method = self.method_config.name
        self.method_args = dict(method_args or {}) if isinstance(method, str) else self.method_config.hyperparameters()
        self.fr_filter_ratio = fr_filter_ratio
        self.merge_seed = merge_seed
        self.routing = routing
        self.head_selection = head_selection
        self.top_k = top_k
        self.auto_fit_router = auto_fit_router
        if expert_path not in EXPERT_PATHS:
            raise ConfigError(f"model.expert_path={expert_path!r}; accepted: {list(EXPERT_PATHS)}")
        self.expert_path = expert_path
        self._activation: tuple[tuple, ActivationExperts] | None = None
        self._path_choosers: dict[int | None, PathChooser] = {}
        default_protocol = (routing, head_selection) == ("router", "dataset")
        self.metric_suffix = metric_suffix if metric_suffix is not None else (
            "" if default_protocol else f"[{routing},{head_selection}]")
        self.task_names: list[str] = []
        self.backbone: nn.Module | None = None
        self.router: Router | None = None
        self._ncm_batches: list[tuple[Tensor, Tensor]] = []  # ncm under fit: the epoch's router features
        self.merge_record: dict[str, Any] = {}
        self.test_results: dict[str, Any] = {}
        self.val_results: dict[str, Any] = {}
        self.backbone_digest = ""

    # ------------------------------------------------------------------ building
    def prepare_data(self) -> None:
        self.adapter.prepare()

    def _check_data(self, datamodule) -> None:
        names = list(self.adapter.task_names)
        data_names = list(getattr(datamodule, "task_names", names))
        if names != data_names:
            raise ConfigError(f"the model adapter has {len(names)} task(s) {names} but the data module has "
                              f"{len(data_names)} {data_names}; they must match in number and order")
        self._data_metrics = {cfg.name: list(cfg.metrics) for cfg in getattr(datamodule, "tasks", [])}
        for task in names:
            expected = datamodule.num_classes(task) if hasattr(datamodule, "num_classes") else None
            have = self.adapter.num_classes(task)
            if expected is not None and expected != have:
                raise ConfigError(f"task {task!r}: the head has {have} classes but the dataset has {expected}")

    def setup(self, stage: str | None = None) -> None:
        if self.backbone is not None:
            return
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            self._check_data(datamodule)
        example = None
        if datamodule is not None and hasattr(datamodule, "router_dataset"):
            example = datamodule.router_dataset()[0][0].unsqueeze(0)
        self.build(example)

    def build(self, example_input: Tensor | None = None, datamodule=None) -> None:
        """Merge the checkpoints and build backbone, task modules, heads and router (deterministic).

        A data-dependent method (Fisher, RegMean, AdaMerging, MTL) first collects its statistics from the router
        split of ``datamodule`` (default: the trainer's) with ``freemerge_pl.lightning.activation_stats``."""
        self.task_names = list(self.adapter.task_names)
        start = time.perf_counter()
        pretrained = self.adapter.pretrained_state_dict()
        finetuned = [self.adapter.finetuned_state_dict(t) for t in self.task_names]
        method = self._method_with_data(pretrained, finetuned, datamodule)
        out = merge(pretrained, finetuned, method, names=self.task_names,
                    exclude_keys=list(self.adapter.exclude_keys), fr_filter_ratio=self.fr_filter_ratio,
                    seed=self.merge_seed, progress=True)
        del finetuned
        backbone = self.adapter.build_backbone()
        backbone.load_state_dict(out.state_dict, strict=True)
        backbone.requires_grad_(False).eval()
        self.backbone = backbone
        self.task_modules = nn.ModuleList(out.task_modules or [])
        self.shared_modules = nn.ModuleDict(out.result.shared_modules)
        self.heads = nn.ModuleDict({_slot(t): self.adapter.build_head(t) for t in self.task_names})
        self.heads.requires_grad_(False).eval()
        self.merge_record = {**out.record, "build_seconds": time.perf_counter() - start,
                             **self._data_statistics_record(method)}
        self.backbone_digest = state_digest(self.backbone)
        self._router_in = self._router_in_features(example_input)
        self.register_buffer("router_trained", torch.zeros((), dtype=torch.bool))
        self.reset_router()
        self._build_metrics()
        rank_zero_info(f"merged {len(self.task_names)} tasks with {self.method} in "
                       f"{self.merge_record['build_seconds']:.1f}s; task modules: {len(self.task_modules)}, "
                       f"{self.task_module_bytes()} bytes")

    def reset_router(self) -> None:
        """A fresh, untrained router; its initial weights depend on ``router.seed`` only."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.router_config.seed)
            self.router = Router(len(self.task_names), self.router_config, self._router_in).to(self.device)
        self.router_trained.fill_(False)

    def _router_in_features(self, example: Tensor | None) -> int:
        if example is None:
            raise ConfigError("the router needs an example input to size its first layer: call "
                              "build(example_input) or attach a data module with router_dataset()")
        with torch.no_grad():
            return int(self._router_features_raw(example).shape[-1])

    def _build_metrics(self) -> None:
        extra = 1 if self.head_selection == "routed" else 0  # a "foreign head" class
        self.task_metric_sets = nn.ModuleDict({
            _slot(t): task_metrics(self._metric_names(t), self.adapter.num_classes(t) + extra)
            for t in self.task_names
        })
        K = len(self.task_names)
        self.routing_accuracy = nn.ModuleDict({_slot(t): routing_accuracy_metric(K) for t in self.task_names})
        self.routing_confusion = RoutingConfusionMatrix(K)

    def _metric_names(self, task: str) -> list[str]:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "tasks"):
            for cfg in dm.tasks:
                if cfg.name == task:
                    return list(cfg.metrics)
        known = getattr(self, "_data_metrics", {}).get(task)  # outside a Trainer: as ``_check_data`` saw them
        if known:
            return known
        return ["pearson_spearman"] if self.adapter.num_classes(task) == 1 else ["accuracy"]

    def task_module_bytes(self) -> int:
        return sum(m.nbytes for m in self.task_modules)

    # ------------------------------------------------------------------ routing and forward
    @property
    def router_feature_source(self) -> str:
        """The feature source in use (``auto`` resolved from the adapter's ``input_kind``; ``auto`` on a built
        backbone no deeper than ``split_block`` reads the whole backbone)."""
        source = resolve_feature_source(self.router_config, getattr(self.adapter, "input_kind", "other"),
                                        type(self.adapter).__name__, has_prefix_features(self.adapter))
        if source == "backbone_prefix" and self.router_config.feature_source == "auto" and self.backbone is not None:
            depth = self.adapter.backbone_depth(self.backbone)
            if depth is not None and self.router_config.split_block >= depth:
                return "backbone"
        return source

    @property
    def router_reads_merged_backbone(self) -> bool:
        """Whether the router's features depend on the merged weights (retrain it after another merge)."""
        return self.router_feature_source in ("backbone", "backbone_prefix")

    def _pretrained_router_backbone(self, device: torch.device) -> nn.Module:
        """θ_pre's backbone for the ``pretrained_backbone`` source: built once from the adapter, frozen, kept out
        of the module tree (not in checkpoints or exports: the adapter reads it again)."""
        backbone = self.__dict__.get("_router_pretrained")
        if backbone is None:
            backbone = self.adapter.build_backbone()
            backbone.load_state_dict(self.adapter.pretrained_state_dict(), strict=True)
            backbone.requires_grad_(False).eval()
            self.__dict__["_router_pretrained"] = backbone
        return backbone.to(device)

    def _router_features_raw(self, x: Tensor) -> Tensor:
        source, split = self.router_feature_source, self.router_config.split_block
        if source == "input":
            from freemerge_pl.lightning.router import InputPool

            return InputPool(self.router_config.pool_size)(x)
        with torch.no_grad():
            if source == "backbone":
                return self.backbone(x).float()
            if source == "backbone_prefix":
                return self._prefix_router_features(self.backbone, x, split)
            pretrained = self._pretrained_router_backbone(x.device)
            if split == 0:
                return pretrained(x).float()
            return self._prefix_router_features(pretrained, x, split)

    def _prefix_router_features(self, backbone: nn.Module, x: Tensor, split: int) -> Tensor:
        """The router's features from ``backbone``'s first ``split`` blocks (``router.prefix_pool``)."""
        if self.router_config.prefix_pool == "class_token":
            return self.adapter.prefix_features(backbone, x, split).float()
        return pool_prefix_states(self.adapter.prefix_states(backbone, x, split), self.router_config.prefix_pool)

    def router_logits(self, x: Tensor) -> Tensor:
        return self.router(self._router_features_raw(x))

    def route(self, x: Tensor, task: int | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Task ids ``[B, k]`` and weights ``[B, k]``: from ``task`` (oracle) when given, else the router."""
        if task is not None:
            ids = torch.as_tensor(task, device=x.device).long().reshape(-1)
            ids = ids.expand(x.shape[0]) if ids.numel() == 1 else ids
            return ids[:, None], torch.ones(x.shape[0], 1, device=x.device)
        return self.router.route(self.router_logits(x), self.top_k)

    @torch.no_grad()
    def features(self, x: Tensor, ids: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
        """Backbone features with each sample's task modules applied: in one pass as activation corrections,
        or grouped with the modules applied in place and restored (``expert_path``)."""
        if ids is None or len(self.task_modules) == 0:
            return self.backbone(x)
        if weights is None:
            weights = torch.ones_like(ids, dtype=torch.float32)
        if ids.shape[1] == 1:  # weight 0 = no expert (the router's confidence fallback), else the expert whole
            key = torch.where(weights[:, 0] == 0, -1, ids[:, 0])
            groups = [(() if g < 0 else (g,), () if g < 0 else (1.0,), (key == g).nonzero().flatten())
                      for g in key.unique().tolist()]
        else:
            combos: dict[tuple, list[int]] = {}
            for i, (row, w) in enumerate(zip(ids.tolist(), weights.tolist())):
                combos.setdefault((tuple(row), tuple(w)), []).append(i)
            groups = [(r, w, torch.tensor(s, device=x.device)) for (r, w), s in combos.items()]
        if self.expert_path == "activation" or (self.expert_path == "auto" and len(groups) > 1):
            activation = self._activation_experts()
            if activation is not None:
                chooser = None
                if self.expert_path == "auto":  # one choice per model part the experts run on (shared prefix)
                    part = self.router_config.split_block if self.shares_prefix else None
                    chooser = self._path_choosers.setdefault(part, PathChooser())
                path = chooser.next() if chooser is not None else "activation"
                timing = chooser is not None and chooser.timing
                if timing:
                    _synchronize(x)
                    start = time.perf_counter()
                try:
                    out = activation(x, ids, weights) if path == "activation" else \
                        self._features_weight_swap(x, groups)
                except UnsupportedCall as err:  # a layer called otherwise than covered: weight swap from now on
                    rank_zero_info(f"activation-space experts: {err}; using the weight swap")
                    self._activation = (self._activation[0], None)
                    return self._features_weight_swap(x, groups)
                if timing:
                    _synchronize(x)
                    chosen = chooser.record(path, time.perf_counter() - start, x.shape[0])
                    if chosen is not None:
                        ms = {p: 1e3 * sum(v) / len(v) for p, v in chooser.seconds_per_sample.items()}
                        rank_zero_info(f"expert_path auto: mixed-task batches use the {chosen.replace('_', ' ')} "
                                       f"(ms per sample: activation {ms['activation']:.3f}, weight swap "
                                       f"{ms['weight_swap']:.3f})")
                return out
        return self._features_weight_swap(x, groups)

    def _activation_experts(self) -> ActivationExperts | None:
        """The activation path for the current backbone and task modules (rebuilt when either is replaced or
        moved); None when an expert touches a key it does not cover."""
        device = next(self.backbone.parameters()).device
        ident = (id(self.backbone), device, tuple(id(m) for m in self.task_modules))
        if self._activation is None or self._activation[0] != ident:
            activation = ActivationExperts(self.backbone, list(self.task_modules))
            if not activation.supported:
                rank_zero_info(f"activation-space experts: not covered {activation.unsupported[:3]}"
                               f"{'...' if len(activation.unsupported) > 3 else ''}; mixed batches use the "
                               f"weight swap")
            self._activation = (ident, activation if activation.supported else None)
            self._path_choosers = {}
        return self._activation[1]

    def _features_weight_swap(self, x: Tensor, groups: list) -> Tensor:
        """One backbone pass per group ``(task ids, weights, rows)`` with its modules applied and restored."""
        out = None
        for task_ids, task_weights, sel in groups:
            applied = []
            try:
                for g, w in zip(task_ids, task_weights):
                    self.task_modules[g].apply_(self.backbone, float(w))
                    applied.append(g)
                f = self.backbone(x if len(groups) == 1 else x[sel])
            finally:
                for g in reversed(applied):
                    self.task_modules[g].restore_(self.backbone)
            if len(groups) == 1:  # the whole batch (e.g. one dataset's batch, oracle): no gather/scatter
                return f
            if out is None:
                out = f.new_empty(x.shape[0], *f.shape[1:])
            out[sel] = f
        return out

    def forward(self, x: Tensor, task: int | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Route, run the backbone with the routed task modules; returns ``(features, routed task ids [B])``."""
        feats, ids, _ = self.routed_features(x, task)
        return feats, ids[:, 0]

    @property
    def shares_prefix(self) -> bool:
        """``router.shared_prefix`` in effect: the router's prefix of the merged backbone is run once and the
        experts apply after it (``auto`` resolved to the whole backbone on a shallow one turns it off)."""
        return self.router_config.shared_prefix and self.router_feature_source == "backbone_prefix"

    @torch.no_grad()
    def routed_features(self, x: Tensor, task: int | Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(features, ids, weights)``: routed (or ``task``: oracle), then the backbone with each sample's task
        modules. With ``shared_prefix`` the first ``split_block`` blocks run once with the merged weights
        alone (the router reads them pooled by ``prefix_pool``, as without sharing) and the rest with the experts."""
        if not self.shares_prefix:
            ids, weights = self.route(x, task)
            return self.features(x, ids, weights), ids, weights
        split = self.router_config.split_block
        states = self.adapter.prefix_states(self.backbone, x, split)
        if task is not None:
            ids, weights = self.route(x, task)
        else:
            ids, weights = self.router.route(self.router(pool_prefix_states(states, self.router_config.prefix_pool)),
                                             self.top_k)
        with self.adapter.suffix(self.backbone, split):
            return self.features(states, ids, weights), ids, weights

    def head_outputs(self, features: Tensor, task: int) -> Tensor:
        out = self.heads[_slot(self.task_names[task])](features)
        return out.squeeze(-1) if out.shape[-1] == 1 else out

    # ------------------------------------------------------------------ training the router
    def router_loss(self, x: Tensor, task_ids: Tensor) -> Tensor:
        return F.cross_entropy(self.router_logits(x), task_ids.long())

    @property
    def automatic_optimization(self) -> bool:
        """Lightning's automatic optimisation trains ``linear``/``mlp`` routers; ``ncm`` is fitted from features."""
        router = getattr(self, "router", None)  # None before setup
        return router is None or router.trainable

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        if value != self.automatic_optimization:
            raise ConfigError("MergedModule chooses its optimisation from the router head (ncm: none)")

    def training_step(self, batch, batch_idx):
        x, _, t = batch
        if not self.router.trainable:  # ncm: collect the epoch's features; fitted in on_train_epoch_end
            with torch.no_grad():
                self._ncm_batches.append((self._router_features_raw(x).float(), torch.as_tensor(t).long()))
            return None
        loss = self.router_loss(x, t)
        self.log("train/router_loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def on_train_epoch_start(self) -> None:
        self._ncm_batches = []

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.router.trainable:
            self.router_trained.fill_(True)

    def on_train_epoch_end(self) -> None:
        """``ncm`` under ``fit``: the task means of the epoch's router features, every rank's gathered (under DDP
        the sampler's padding repeats a few samples), the same on every rank."""
        if self.router.trainable or not self._ncm_batches:
            return
        feats = torch.cat([f for f, _ in self._ncm_batches])
        ids = torch.cat([t for _, t in self._ncm_batches]).to(feats.device)
        self._ncm_batches = []
        if self.trainer.world_size > 1:
            feats = self.all_gather(feats).reshape(-1, feats.shape[-1])
            ids = self.all_gather(ids).reshape(-1)
        self.router.fit_means(feats, ids)
        self.router_trained.fill_(True)

    def configure_optimizers(self):
        cfg = self.router_config
        if not self.router.trainable:  # ncm has no parameters: fitted from the features (on_train_epoch_end)
            return None
        return torch.optim.AdamW(self.router.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    @torch.no_grad()
    def router_features(self, dataset, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """The router's input features ``[N, D]`` and task ids ``[N]`` of a dataset of ``(x, y, task_id)``
        (computed once, in order: the features are frozen, so training the head needs no further pass)."""
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size or self.router_config.batch_size)
        feats, ids = [], []
        for x, _, t in loader:
            feats.append(self._router_features_raw(x.to(self.device)))
            ids.append(torch.as_tensor(t).long().to(self.device))
        return torch.cat(feats), torch.cat(ids)

    def fit_router(self, dataset) -> None:
        """Fit the router on ``dataset`` of ``(x, y, task_id)``: features are computed once; ``ncm`` takes the
        task means, ``linear``/``mlp`` train with a plain, seeded loop over them (every rank trains the same
        router; under DDP rank 0's weights are broadcast to be safe)."""
        self.router.fit(*self.router_features(dataset))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for b in self.router.state_dict().values():
                torch.distributed.broadcast(b.data, src=0)
        self.router_trained.fill_(True)

    def load_merge(self, state_dict: dict[str, Tensor], task_modules=None, shared_modules=None, *,
                   heads: dict[str, Tensor] | None = None, router: dict[str, Tensor] | None = None,
                   router_in_features: int | None = None) -> None:
        """Swap in another merge result (same adapter) without rebuilding: backbone weights are copied in
        place, task modules replaced (used by hyperparameter tuning).

        On a module not built yet (no ``setup``/``build``) it first assembles backbone, heads, a fresh router
        of input width ``router_in_features`` and the metrics from the adapter, without merging
        (``freemerge_pl.load_merged`` loads an export this way). ``heads`` (``<task>.<param>`` tensors, as
        ``export`` writes them) replace the heads' weights; ``router`` (a trained router's state dict) replaces
        the router's and marks it trained."""
        if self.backbone is None:
            if router_in_features is None:
                raise ConfigError("load_merge on a module that is not built needs router_in_features (the "
                                  "router's input width; an export's manifest records it)")
            self.task_names = list(self.adapter.task_names)
            self.backbone = self.adapter.build_backbone().requires_grad_(False).eval()
            self.heads = nn.ModuleDict({_slot(t): self.adapter.build_head(t) for t in self.task_names})
            self.heads.requires_grad_(False).eval()
            self._router_in = int(router_in_features)
            self.register_buffer("router_trained", torch.zeros((), dtype=torch.bool))
            self.reset_router()
            self._build_metrics()
        self.backbone.load_state_dict(state_dict, strict=True)
        self.task_modules = nn.ModuleList(task_modules or []).to(self.device)
        self.shared_modules = nn.ModuleDict(shared_modules or {}).to(self.device)
        if heads is not None:
            used = set()
            for t in self.task_names:
                head = self.heads[_slot(t)]
                wanted = [f"{t}.{n}" for n in head.state_dict()]
                missing = [k for k in wanted if k not in heads]
                if missing:
                    raise ConfigError(f"head weights {missing} are missing (task {t!r})")
                head.load_state_dict({k[len(t) + 1:]: heads[k] for k in wanted}, strict=True)
                used.update(wanted)
            if set(heads) - used:
                raise ConfigError(f"head weights {sorted(set(heads) - used)} belong to no head of the tasks "
                                  f"{self.task_names}")
        if router is not None:
            self.router.load_state_dict(router, strict=True)
            self.router_trained.fill_(True)
        self.backbone_digest = state_digest(self.backbone)

    def load_task_modules(self, directory: str | Path) -> None:
        """Use the task modules an export or a merge job wrote beside its backbone (verified against its
        manifest, one per task, named as this module's tasks) instead of the task modules built in ``setup``."""
        from freemerge_pl.lightning.loading import read_export
        from freemerge_pl.merging.base import resolve_tensor

        export = read_export(directory)
        if not export.task_modules:
            raise ConfigError(f"{directory} holds no task modules: the merge wrote none")
        modules = dict(zip(export.task_names, export.task_modules))
        if list(modules) != self.task_names:
            raise ConfigError(f"{directory}: task modules for {list(modules)}, but this module's tasks are "
                              f"{self.task_names} (same names, same order)")
        for name, module in modules.items():
            for key in module.keys:
                try:
                    resolve_tensor(self.backbone, key)
                except KeyError as err:
                    raise ConfigError(f"{directory}: the expert of task {name!r} changes {key!r}, which the "
                                      f"backbone does not have") from err
        self.task_modules = nn.ModuleList(export.task_modules).to(self.device)
        self.shared_modules = nn.ModuleDict(export.shared_modules).to(self.device)

    # ------------------------------------------------------------------ evaluation
    def _ensure_router(self) -> None:
        if self.routing == "router" and not bool(self.router_trained):
            if not self.auto_fit_router:
                rank_zero_info("warning: testing with an untrained router (auto_fit_router is off)")
            else:
                start = time.perf_counter()
                self.fit_router(self.trainer.datamodule.router_dataset())
                self.merge_record["router_fit_seconds"] = time.perf_counter() - start
                rank_zero_info(f"router trained on the router split in "
                               f"{self.merge_record['router_fit_seconds']:.1f}s")

    def on_test_start(self) -> None:
        self._ensure_router()
        self._check_rank_agreement()

    def _check_rank_agreement(self) -> None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        mine = torch.tensor([int(self.backbone_digest[:15], 16)], dtype=torch.int64, device=self.device)
        everyone = self.all_gather(mine).flatten()
        if not bool((everyone == mine).all()):
            raise RuntimeError(f"the merged backbone differs across ranks: digests {everyone.tolist()}")

    def _eval_step(self, batch, dataloader_idx: int) -> None:
        x, y, t = batch
        task = dataloader_idx
        oracle = t if self.routing == "oracle" else None
        feats, ids, _ = self.routed_features(x, oracle)
        routed = ids[:, 0]
        name = self.task_names[task]
        metrics = self.task_metric_sets[_slot(name)]
        regression = any(m in REGRESSION_METRICS for m in metrics)
        if self.head_selection == "dataset":
            out = self.head_outputs(feats, task)
            preds = out if regression else out.argmax(-1)
        else:
            foreign = self.adapter.num_classes(name)
            preds = torch.full_like(y, foreign, dtype=torch.float32 if regression else torch.long)
            for g in routed.unique().tolist():
                sel = routed == g
                out = self.head_outputs(feats[sel], g)
                if g == task:
                    preds[sel] = out if regression else out.argmax(-1)
        metrics.update(preds, y)
        self.routing_accuracy[_slot(name)].update(routed, t)
        self.routing_confusion.update(routed, t)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch, dataloader_idx)

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch, dataloader_idx)

    def on_validation_start(self) -> None:
        if not self.trainer.sanity_checking and self.trainer.state.fn == "validate":
            self._ensure_router()
        self._check_rank_agreement()

    def _collect(self, stage: str) -> dict[str, Any]:
        """Compute (synchronised) and reset every metric; log ``<stage>/<task>/<metric><suffix>``."""
        results: dict[str, Any] = {"tasks": {}, "avg": {}}
        sums: dict[str, list[float]] = {}
        for name in self.task_names:
            values = {k: float(v) for k, v in self.task_metric_sets[_slot(name)].compute().items()}
            values["routing_accuracy"] = float(self.routing_accuracy[_slot(name)].compute())
            results["tasks"][name] = values
            for k, v in values.items():
                sums.setdefault(k, []).append(v)
        results["avg"] = {k: sum(v) / len(v) for k, v in sums.items()}
        K = len(self.task_names)  # torchmetrics squeezes a 1×1 matrix (one task) to a scalar
        results["routing_confusion"] = self.routing_confusion.compute().reshape(K, K).tolist()
        suffix = self.metric_suffix
        for name, values in results["tasks"].items():
            for k, v in values.items():
                self.log(f"{stage}/{name}/{k}{suffix}", v, add_dataloader_idx=False)
        for k, v in results["avg"].items():
            self.log(f"{stage}/avg/{k}{suffix}", v, add_dataloader_idx=False)
        results["protocol"] = {"routing": self.routing, "head_selection": self.head_selection,
                               "top_k": self.top_k}
        results["method"] = self.method
        results["method_args"] = self.method_args
        results["fr_filter_ratio"] = self.fr_filter_ratio
        results["task_module_bytes"] = self.task_module_bytes()
        results["backbone_bytes"] = sum(p.numel() * p.element_size() for p in self.backbone.parameters())
        results["merge_seconds"] = self.merge_record.get("seconds")
        for m in [*self.task_metric_sets.values(), *self.routing_accuracy.values(), self.routing_confusion]:
            m.reset()
        return results

    def on_test_epoch_end(self) -> None:
        self.test_results = self._collect("test")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            for m in [*self.task_metric_sets.values(), *self.routing_accuracy.values(), self.routing_confusion]:
                m.reset()
            return
        self.val_results = self._collect("val")

    # ------------------------------------------------------------------ export
    def export(self, directory: str | Path, overwrite: bool = False) -> list[Path]:
        """Publish backbone, task modules, heads and, when trained, the router as safetensors plus the manifest
        ``merge_info.json`` (every file with size and sha256, and the module settings ``load_merged`` needs).
        Built beside ``directory`` and renamed into place whole (``write_export``): a previous export there is
        replaced, any other non-empty directory refused unless ``overwrite``. Load it back with
        ``freemerge_pl.load_merged(directory, adapter)``."""
        from dataclasses import asdict

        heads = {f"{t}.{n}": p for t in self.task_names for n, p in self.heads[_slot(t)].state_dict().items()}
        trained = bool(self.router_trained)
        module = {"method_args": self.method_args, "fr_filter_ratio": self.fr_filter_ratio,
                  "merge_seed": self.merge_seed, "routing": self.routing, "head_selection": self.head_selection,
                  "top_k": self.top_k, "router": asdict(self.router_config), "auto_fit_router": self.auto_fit_router,
                  "metric_suffix": self.metric_suffix, "router_in_features": self._router_in,
                  "expert_path": self.expert_path}
        record = {**self.merge_record, "task_names": self.task_names, "backbone_digest": self.backbone_digest,
                  "router_trained": trained, "module": module}
        extra = {"heads.safetensors": heads, **({"router.safetensors": self.router.state_dict()} if trained else {})}
        return write_export(directory, self.backbone.state_dict(), list(self.task_modules),
                            dict(self.shared_modules), record, names=self.task_names, method=self.method,
                            inputs=self.adapter.checkpoint_paths(), extra_files=extra, overwrite=overwrite)

    # ------------------------------------------------------------------ data-dependent methods (build)
    def _method_with_data(self, pretrained: dict[str, Tensor], finetuned: list[dict[str, Tensor]], datamodule):
        """The configured method, bound to its statistics from the router split when it needs data."""
        from freemerge_pl.merging.data_dependent import needs_data

        if not needs_data(self.method_config):
            return self.method_config
        from freemerge_pl.lightning.activation_stats import collect_statistics

        if datamodule is None and self._trainer is not None:
            datamodule = getattr(self._trainer, "datamodule", None)
        device = self._trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        stats = collect_statistics(self.method_config, self.adapter, pretrained, finetuned, datamodule,
                                   exclude_keys=list(self.adapter.exclude_keys),
                                   fr_filter_ratio=self.fr_filter_ratio, device=device)
        rank_zero_info(f"{self.method}: {stats.info['kind']} statistics from {stats.info.get('samples')} router-split "
                       f"samples in {stats.info['seconds']:.1f}s")
        return self.method_config.with_data(stats)

    @staticmethod
    def _data_statistics_record(method: MergeMethod) -> dict[str, Any]:
        """The cost of a data-dependent method's statistics (samples, seconds, steps) for the merge record."""
        data = method.__dict__.get("_data")
        return {"data_statistics": dict(data.info)} if data is not None else {}
