"""MergedModule: Lightning's hooks around a ``RoutedModel`` (merge in ``setup``, train the router, score tasks)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from freemerge_pl.adapters.base import ModelAdapter
from freemerge_pl.lightning.activation_stats import with_statistics
from freemerge_pl.lightning.datamodule import check_data
from freemerge_pl.lightning.metrics import REGRESSION_METRICS, task_metrics
from freemerge_pl.lightning.routed import (
    RoutedModel,
    checked_method,
    checked_router,
    merge_routed,
    slot,
    state_digest,
)
from freemerge_pl.lightning.router import RouterConfig, RoutingConfusionMatrix, routing_accuracy_metric
from freemerge_pl.merging import MergeMethod
from freemerge_pl.settings import Range, check_value

__all__ = ["MergedModule", "state_digest"]

TopK = Annotated[int, Range(1, integer=True)]


class MergedModule(LightningModule):
    """Builds the merged model (a ``RoutedModel``) in ``setup``, trains only its router, scores every task.

    Args:
        adapter: reads θ_pre, θ_1..θ_K and the heads; builds the backbone module.
        method: a registry name (``freemerge_pl.merging.list_methods()``) with ``method_args`` its
            hyperparameters, or a configured method object (``class_path: FREEMerging`` with ``init_args`` in
            YAML; every field typed and checked once, here).
        method_args: the hyperparameters of a method given by name.
        fr_filter_ratio: FR high-pass applied to every task vector before ``method`` (0 = off).
        merge_seed: seeds a method's random choices (e.g. DARE's drops).
        routing: ``router`` (learned, Alg. 1) or ``oracle`` (the true task picks the task module). A method
            without task modules (task arithmetic, TIES, ...) routes nothing: no router is built, trained or run,
            no routing accuracy is reported, and every sample uses the merged backbone with its dataset's head.
        head_selection: ``dataset`` (the evaluated dataset's head, the benchmark protocol) or ``routed``
            (the routed task's head, task-agnostic deployment; a sample routed to another task's head
            is counted as a wrong prediction). Without task modules: the dataset's head (nothing is routed).
        top_k: experts per sample (1 = Alg. 1; >1 combines the top-k with renormalised softmax weights,
            one backbone pass per distinct combination, so it is slower).
        router: the router's settings (``RouterConfig``). ``fit`` trains it once on the router split and
            stops; ``test`` of a module whose router is untrained trains it the same way first.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        method: str | MergeMethod = "free_merging",
        method_args: dict[str, Any] | None = None,
        fr_filter_ratio: float = 0.0,
        merge_seed: int = 0,
        routing: Literal["router", "oracle"] = "router",
        head_selection: Literal["dataset", "routed"] = "dataset",
        top_k: TopK = 1,
        router: RouterConfig | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["adapter"])
        # Every setting is checked here, at construction: before any data set or checkpoint is read.
        for name, value, annotation in (("routing", routing, Literal["router", "oracle"]),
                                        ("head_selection", head_selection, Literal["dataset", "routed"]),
                                        ("top_k", top_k, TopK), ("merge_seed", merge_seed, int)):
            check_value(f"model.{name}", value, annotation)
        self.method_config = checked_method(method, method_args, fr_filter_ratio)
        self.router_config = checked_router(router or RouterConfig(), adapter)
        self.adapter = adapter
        self.method = self.method_config.name
        self.method_args = dict(method_args or {}) if isinstance(method, str) else self.method_config.hyperparameters()
        self.fr_filter_ratio, self.merge_seed, self.top_k = fr_filter_ratio, merge_seed, top_k
        self.routing, self.head_selection = routing, head_selection
        default_protocol = (routing, head_selection) == ("router", "dataset")
        self.metric_suffix = "" if default_protocol else f"[{routing},{head_selection}]"
        self.automatic_optimization = False  # the router trains in its own loop (``Router.fit``)
        self.model: RoutedModel | None = None
        self.merge_record: dict[str, Any] = {}
        self.test_results: dict[str, Any] = {}
        self.val_results: dict[str, Any] = {}
        self.backbone_digest = ""

    # The routed model's parts and methods, for callers that use them through the Lightning module.
    task_names = property(lambda self: self.model.task_names if self.model is not None else [])
    backbone = property(lambda self: self.model.backbone if self.model is not None else None)
    router_reads_merged_backbone = property(lambda self: self.model.reads_merged_backbone)
    (task_modules, heads, router, router_trained, fit_router, reset_router, features, router_logits,
     head_outputs) = (property(lambda self, n=n: getattr(self.model, n)) for n in (
        "task_modules", "heads", "router", "router_trained", "fit_router", "reset_router", "features",
        "router_logits", "head_outputs"))

    def forward(self, x, task=None):
        return self.model(x, task)  # routed features and routed task ids (``RoutedModel.forward``)

    # ------------------------------------------------------------------ building
    def prepare_data(self) -> None:
        self.adapter.prepare()

    def _check_data(self, datamodule) -> None:
        self._data_metrics = check_data(datamodule, self.adapter)

    def setup(self, stage: str | None = None) -> None:
        if self.model is not None:
            return
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        example = None
        if datamodule is not None:
            self._check_data(datamodule)
            if hasattr(datamodule, "router_dataset"):
                example = datamodule.router_dataset()[0][0].unsqueeze(0)
        self.build(example)

    def build(self, example_input=None, datamodule=None) -> None:
        """Merge the checkpoints and build the routed model: backbone, task modules, heads, router.

        A data-dependent method (Fisher, RegMean, AdaMerging, MTL) first collects its statistics from the router
        split of ``datamodule`` (default: the trainer's) with ``freemerge_pl.lightning.activation_stats``."""
        self.model, self.merge_record = merge_routed(
            self.adapter, lambda pre, fts: with_statistics(self.method_config, self.adapter, pre, fts, datamodule,
                                                           self.fr_filter_ratio, self._trainer),
            router=self.router_config, fr_filter_ratio=self.fr_filter_ratio, seed=self.merge_seed,
            example_input=example_input, top_k=self.top_k)
        self.backbone_digest = state_digest(self.backbone)
        self._build_metrics()
        rank_zero_info(f"merged {len(self.task_names)} tasks with {self.method} in {self.merge_record['build_seconds']:.1f}"
                       f"s; task modules: {len(self.task_modules)}, {self.model.task_module_bytes()} bytes")

    def _build_metrics(self) -> None:
        extra = 1 if self.head_selection == "routed" else 0  # a "foreign head" class
        known = getattr(self, "_data_metrics", {})
        self.task_metric_sets = nn.ModuleDict({
            slot(t): task_metrics(known.get(t) or (["pearson_spearman"] if self.adapter.num_classes(t) == 1
                                                   else ["accuracy"]), self.adapter.num_classes(t) + extra)
            for t in self.task_names})
        K = len(self.task_names)
        self.routing_accuracy = nn.ModuleDict({slot(t): routing_accuracy_metric(K) for t in self.task_names})
        self.routing_confusion = RoutingConfusionMatrix(K)

    def load_merge(self, state_dict, task_modules=None, shared_modules=None, *, heads=None, router=None,
                   router_in_features: int | None = None) -> None:
        """Swap in another merge result (same adapter) without merging (``RoutedModel.load_weights``; used by
        tuning and ``load_merged``). A module not built yet is first assembled from the adapter with a fresh
        router of input width ``router_in_features`` (an export's manifest records it)."""
        if self.model is None:
            self.model = RoutedModel(self.adapter, list(self.adapter.task_names), self.adapter.build_backbone(),
                                     router_config=self.router_config, router_in_features=router_in_features,
                                     top_k=self.top_k).to(self.device)
            self._build_metrics()
        self.model.load_weights(state_dict, task_modules, shared_modules, heads=heads, router=router)
        self.backbone_digest = state_digest(self.backbone)

    def load_task_modules(self, directory: str | Path) -> None:
        """Use the task modules an export or a merge job wrote beside its backbone instead of those built in
        ``setup`` (verified against its manifest: ``freemerge_pl.io.export.read_task_modules``)."""
        from freemerge_pl.io.export import read_task_modules

        modules, shared = read_task_modules(directory, self.task_names, self.backbone)
        self.model.set_task_modules(modules, shared)

    # ------------------------------------------------------------------ training the router (fit)
    def configure_optimizers(self):
        return self.router.optimizer() if self.model.routes else None  # no task modules: nothing to train

    def on_train_batch_start(self, batch, batch_idx):
        if bool(self.router_trained) or not self.model.routes:  # trained (this run, a checkpoint) or no router
            self.trainer.should_stop = True
            return -1  # the rest of the epoch is skipped; ``fit`` ends after it
        return None

    def _train_router(self, optimizer=None) -> None:
        """The router's one training loop (``Router.fit`` on the router split): ``fit``'s first step runs it with
        Lightning's wrapper of the same optimiser (it counts the steps, so ``fit`` checkpoints the router), and
        ``test``/``validate`` run it first on an untrained router: the same router either way."""
        start, dm = time.perf_counter(), self.trainer.datamodule  # no data module: the train loader's data set
        data = dm.router_dataset() if hasattr(dm, "router_dataset") else self.trainer.train_dataloader.dataset
        self.fit_router(data, optimizer)
        self.merge_record["router_fit_seconds"] = time.perf_counter() - start
        rank_zero_info(f"router trained on the router split in {self.merge_record['router_fit_seconds']:.1f}s")

    def training_step(self, batch, batch_idx):
        self._train_router(self.optimizers())
        self.trainer.should_stop = True

    # ------------------------------------------------------------------ evaluation
    def _ensure_router(self) -> None:
        if self.routing == "router" and self.model.routes and not bool(self.router_trained):
            self._train_router()

    def on_test_start(self) -> None:
        self._ensure_router()
        self._check_rank_agreement()

    #: validation (tune-val, scored once per ``tune`` candidate) reuses each batch's route while the router and
    #: its candidate-independent features are unchanged (``RoutedModel.cache_routes``); False: route afresh
    cache_val_routes: bool = True

    def on_validation_start(self) -> None:
        if not self.trainer.sanity_checking and self.trainer.state.fn == "validate":
            self._ensure_router()
        self._check_rank_agreement()
        self.model.cache_routes = self.cache_val_routes

    def on_validation_end(self) -> None:
        self.model.cache_routes = False

    def _check_rank_agreement(self) -> None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        mine = torch.tensor([int(self.backbone_digest[:15], 16)], dtype=torch.int64, device=self.device)
        everyone = self.all_gather(mine).flatten()
        if not bool((everyone == mine).all()):
            raise RuntimeError(f"the merged backbone differs across ranks: digests {everyone.tolist()}")

    def _eval_step(self, batch, dataloader_idx: int) -> None:
        x, y, t = batch
        task, routes = dataloader_idx, self.model.routes  # no task modules: the true task picks the head
        feats, ids, _ = self.model.routed_features(x, t if self.routing == "oracle" or not routes else None)
        routed = ids[:, 0]
        name = self.task_names[task]
        metrics = self.task_metric_sets[slot(name)]
        regression = any(m in REGRESSION_METRICS for m in metrics)
        if self.head_selection == "dataset":
            out = self.model.head_outputs(feats, task)
            preds = out if regression else out.argmax(-1)
        else:
            foreign = self.adapter.num_classes(name)
            preds = torch.full_like(y, foreign, dtype=torch.float32 if regression else torch.long)
            if bool((routed == task).any()):
                out = self.model.head_outputs(feats[routed == task], task)
                preds[routed == task] = out if regression else out.argmax(-1)
        metrics.update(preds, y)
        if routes:
            self.routing_accuracy[slot(name)].update(routed, t)
            self.routing_confusion.update(routed, t)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch, dataloader_idx)

    validation_step = test_step

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """Per sample: routed task, class prediction and confidence (``RoutedModel.predict``; without task
        modules the batch's task picks the head)."""
        x, t = (batch[0], batch[2] if len(batch) > 2 else None) if isinstance(batch, (tuple, list)) else (batch, None)
        return self.model.predict(x, t)

    def _reset_metrics(self) -> None:
        for m in [*self.task_metric_sets.values(), *self.routing_accuracy.values(), self.routing_confusion]:
            m.reset()

    def _collect(self, stage: str) -> dict[str, Any]:
        """Compute (synchronised) and reset every metric; log ``<stage>/<task>/<metric><suffix>``. Without task
        modules: no ``routing_accuracy``, ``routing_confusion`` None, protocol ``routing`` None (nothing routed)."""
        results: dict[str, Any] = {"tasks": {}, "avg": {}}
        routes, sums = self.model.routes, {}  # sums: metric → the tasks' values
        for name in self.task_names:
            values = {k: float(v) for k, v in self.task_metric_sets[slot(name)].compute().items()}
            if routes:
                values["routing_accuracy"] = float(self.routing_accuracy[slot(name)].compute())
            results["tasks"][name] = values
            for k, v in values.items():
                sums.setdefault(k, []).append(v)
        results["avg"] = {k: sum(v) / len(v) for k, v in sums.items()}
        K = len(self.task_names)  # torchmetrics squeezes a 1×1 matrix (one task) to a scalar
        results["routing_confusion"] = self.routing_confusion.compute().reshape(K, K).tolist() if routes else None
        for name, values in [*results["tasks"].items(), ("avg", results["avg"])]:
            for k, v in values.items():
                self.log(f"{stage}/{name}/{k}{self.metric_suffix}", v, add_dataloader_idx=False)
        results.update(protocol={"routing": self.routing if routes else None, "head_selection":
                                 self.head_selection if routes else "dataset", "top_k": self.top_k},
                       method=self.method, method_args=self.method_args, fr_filter_ratio=self.fr_filter_ratio,
                       task_module_bytes=self.model.task_module_bytes(),
                       backbone_bytes=sum(p.numel() * p.element_size() for p in self.backbone.parameters()),
                       merge_seconds=self.merge_record.get("seconds"))
        self._reset_metrics()
        return results

    def on_test_epoch_end(self) -> None:
        self.test_results = self._collect("test")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return self._reset_metrics()
        self.val_results = self._collect("val")

    # ------------------------------------------------------------------ export
    def export(self, directory: str | Path, overwrite: bool = False) -> list[Path]:
        """Publish backbone, task modules, heads and, when trained, the router as safetensors plus the manifest
        ``merge_info.json`` with the module settings and the adapter (class path, init args) ``load_merged`` needs
        (``RoutedModel.export``: built beside ``directory``, renamed into place whole); ``load_merged(directory)``."""
        module = {"method_args": self.method_args, "fr_filter_ratio": self.fr_filter_ratio, "top_k": self.top_k,
                  "merge_seed": self.merge_seed, "routing": self.routing, "head_selection": self.head_selection,
                  # the source resolved (not ``auto``): the exported router's weights belong to it
                  "router": {**asdict(self.router_config), "feature_source": self.model.feature_source},
                  "router_in_features": self.model.router_in_features,
                  "adapter": self.adapter.adapter_record()}
        record = {**self.merge_record, "backbone_digest": self.backbone_digest, "module": module}
        return self.model.export(directory, record, method=self.method, inputs=self.adapter.checkpoint_paths(),
                                 overwrite=overwrite)
