"""Collecting the data statistics of the data-dependent methods (``merging/data_dependent.py``) from the
router split: Fisher diagonals and Gram matrices of each fine-tuned model θ_k on task k's inputs, AdaMerging's
coefficients, the multi-task fine-tuned backbone.

``collect_statistics`` is what ``MergedModule.build`` calls when its method needs data; the result is a
``DataStatistics`` that the method reads key by key inside the ordinary merge engine. Every collector is
correct under DDP (``torch.distributed`` initialised, e.g. by Lightning's ``ddp`` strategy): each rank
processes its share of the same samples, sums (and gradients) are all-reduced, and rank 0's result is
broadcast so every rank merges bit-identical weights. The samples used are the first
``batches × batch_size`` of each task's router split, whatever the number of ranks, so one process and N
processes compute the same statistics (up to the summation order). Nothing here reads the test split.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from freemerge_pl.adapters.base import ModelAdapter
from freemerge_pl.errors import ConfigError
from freemerge_pl.merging.engine import TaskVectorInputs, prefilter_transform
from freemerge_pl.merging.method import Context, Scan
from freemerge_pl.merging.methods.data_dependent import (
    AdaMerging,
    DataDependentMethod,
    DataStatistics,
    FisherMerging,
    MultiTaskLearning,
    RegMean,
)
from freemerge_pl.merging.task_vectors import mergeable_keys

StateDict = dict[str, Tensor]

# ---------------------------------------------------------------------------------------- distribution


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside ``torch.distributed``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def reduce_sum_(tensors: Sequence[Tensor]) -> None:
    """All-reduce (sum) ``tensors`` in place across ranks, then take rank 0's copy everywhere (so all ranks
    hold bit-identical values); a no-op in one process."""
    if world()[1] == 1:
        return
    for t in tensors:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        torch.distributed.broadcast(t, src=0)


def broadcast_(tensors: Sequence[Tensor]) -> None:
    """Rank 0's values of ``tensors`` on every rank (a no-op in one process)."""
    if world()[1] > 1:
        for t in tensors:
            torch.distributed.broadcast(t, src=0)


# ---------------------------------------------------------------------------------------- data


def task_datasets(datamodule) -> list[Dataset]:
    """One dataset of ``(x, y, task_id)`` per task: the task's router split (``datamodule.router_dataset()``)."""
    if datamodule is None or not hasattr(datamodule, "router_dataset"):
        raise ConfigError("the data-dependent merge methods collect their statistics from the router split: "
                          "attach a data module with router_dataset() (cli.py test/fit, or build(example, "
                          "datamodule=...))")
    router = datamodule.router_dataset()
    return list(router.datasets) if isinstance(router, ConcatDataset) else [router]


def head_samples(dataset: Dataset, count: int) -> Dataset:
    """The first ``count`` samples of ``dataset`` (all of them when it is smaller)."""
    return Subset(dataset, range(min(count, len(dataset))))


def rank_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    """This rank's share (every world-th sample, from its rank) of ``dataset``, in order."""
    rank, size = world()
    return DataLoader(Subset(dataset, range(rank, len(dataset), size)), batch_size=batch_size, shuffle=False)


def inputs_of(batch) -> tuple[Tensor, Tensor]:
    return batch[0], batch[1]


def task_model(adapter: ModelAdapter, state_dict: StateDict, task: str, device) -> tuple[nn.Module, nn.Module]:
    """θ's backbone and ``task``'s head, frozen, in eval mode, on ``device``."""
    backbone = adapter.build_backbone()
    backbone.load_state_dict(state_dict, strict=True)
    backbone.requires_grad_(False).eval().to(device)
    head = adapter.build_head(task).requires_grad_(False).eval().to(device)
    return backbone, head


def is_regression(head_out: Tensor) -> bool:
    """A one-output head (``[..., 1]``): a regression task."""
    return head_out.dim() == 0 or head_out.shape[-1] == 1


# ---------------------------------------------------------------------------------------- Fisher


def log_likelihood(out: Tensor, label: Tensor, target: str) -> Tensor:
    """log p(ŷ | x) of one sample's head output: ŷ the argmax (``predicted``) or the label; a regression head
    (one output) is a unit-variance Gaussian around its output, always at the label."""
    if is_regression(out):
        return -0.5 * (out.reshape(()) - label.to(out.dtype)) ** 2
    logp = F.log_softmax(out.reshape(-1), dim=-1)
    index = logp.detach().argmax() if target == "predicted" else label.long()
    return logp.gather(0, index.reshape(1))[0]


def fisher_diagonal(backbone: nn.Module, head: nn.Module, dataset: Dataset, method: FisherMerging,
                    device) -> tuple[dict[str, Tensor], int]:
    """Σ over this rank's samples of the per-sample squared gradients of log p(ŷ|x; θ) (float64) and the
    sample count; per-sample gradients with ``torch.func`` (vmap of grad over a functional call, or grad per
    sample when the model cannot be vmapped, as Hugging Face encoders whose mask code branches on data)."""
    params = {n: p.detach() for n, p in backbone.named_parameters()}
    buffers = {n: b for n, b in backbone.named_buffers()}

    def one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = head(functional_call(backbone, (p, buffers), (x.unsqueeze(0),)))
        return log_likelihood(out[0], y, method.fisher_target)

    per_sample = vmap(grad(one), in_dims=(None, 0, 0))
    sums = {n: torch.zeros(p.shape, dtype=torch.float64, device=device) for n, p in params.items()}
    count, vectorised = 0, True
    for batch in rank_loader(dataset, method.batch_size):
        x, y = (t.to(device) for t in inputs_of(batch))
        if vectorised:
            try:
                for n, g in per_sample(params, x, y).items():
                    sums[n] += g.double().square().sum(0)
                count += x.shape[0]
                continue
            except RuntimeError as err:  # data-dependent control flow (e.g. transformers' attention masks)
                if "vmap" not in str(err):
                    raise
                vectorised = False  # the same gradients, one sample at a time, from here on
        for i in range(x.shape[0]):
            for n, g in grad(one)(params, x[i], y[i]).items():
                sums[n] += g.double().square()
        count += x.shape[0]
    return sums, count


def collect_fisher(method: FisherMerging, adapter: ModelAdapter, finetuned: Sequence[StateDict],
                   datasets: Sequence[Dataset], device) -> DataStatistics:
    per_task, samples = [], 0
    for k, task in enumerate(adapter.task_names):
        backbone, head = task_model(adapter, finetuned[k], task, device)
        data = head_samples(datasets[k], method.fisher_batches * method.batch_size)
        sums, count = fisher_diagonal(backbone, head, data, method, device)
        total = torch.tensor([float(count)], dtype=torch.float64, device=device)
        reduce_sum_([*sums.values(), total])
        if float(total) == 0:
            raise ConfigError(f"fisher: task {task!r} has no router-split samples to estimate its Fisher from")
        per_task.append({n: (s / total).float().cpu() for n, s in sums.items()})
        samples += int(total)
    return DataStatistics({"fisher": per_task}, info={"samples": samples})


# ---------------------------------------------------------------------------------------- RegMean Grams


def linear_inputs(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(weight key, module) of every linear map whose input Gram RegMean uses: each ``nn.Linear``
    (``<module>.weight``) and each ``nn.MultiheadAttention``'s packed input projection (``<module>.in_proj_weight``)."""
    out = []
    for name, m in module.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, nn.Linear):
            out.append((prefix + "weight", m))
        elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            out.append((prefix + "in_proj_weight", m))
    return out


class GramHooks:
    """Forward hooks accumulating Σ x xᵀ (float64) and the row count of the inputs of every ``nn.Linear``
    (key ``<module>.weight``) and of every self-attention ``nn.MultiheadAttention``'s packed input projection
    (``<module>.in_proj_weight``) of ``module``; inputs ``[..., d_in]`` count one row per leading index.
    A linear layer whose forward never runs (e.g. called functionally) gets no Gram."""

    def __init__(self, module: nn.Module) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self._handles = []
        for key, m in linear_inputs(module):
            if isinstance(m, nn.MultiheadAttention):
                self._handles.append(m.register_forward_pre_hook(self._attention_hook(key), with_kwargs=True))
            else:
                self._handles.append(m.register_forward_hook(self._linear_hook(key)))

    def add(self, key: str, x: Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).double()
        if key not in self.sums:
            self.sums[key] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
            self.counts[key] = 0
        self.sums[key].addmm_(rows.T, rows)
        self.counts[key] += rows.shape[0]

    def _linear_hook(self, key: str) -> Callable:
        def hook(module, args, output) -> None:
            self.add(key, args[0])
        return hook

    def _attention_hook(self, key: str) -> Callable:
        def hook(module, args, kwargs) -> None:
            names = ("query", "key", "value")
            q, k, v = (args[i] if len(args) > i else kwargs.get(names[i]) for i in range(3))
            if q is k and k is v:  # self-attention: one input through the packed q/k/v projection
                self.add(key, q)
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def gram_sums(backbone: nn.Module, dataset: Dataset, batch_size: int, device) -> tuple[dict[str, Tensor],
                                                                                          dict[str, int]]:
    """This rank's Σ x xᵀ and row counts per linear key over ``dataset`` (``GramHooks``)."""
    hooks = GramHooks(backbone)
    try:
        for batch in rank_loader(dataset, batch_size):
            backbone(inputs_of(batch)[0].to(device))
    finally:
        hooks.remove()
    return hooks.sums, hooks.counts


def collect_grams(method: RegMean, adapter: ModelAdapter, finetuned: Sequence[StateDict],
                  datasets: Sequence[Dataset], device) -> DataStatistics:
    probe = adapter.build_backbone()
    shapes = {n: p.shape for n, p in probe.named_parameters()}
    keys = [key for key, _ in linear_inputs(probe)]  # the same keys on every rank, whatever ran locally
    per_task, samples = [], 0
    for k, task in enumerate(adapter.task_names):
        backbone, _ = task_model(adapter, finetuned[k], task, device)
        data = head_samples(datasets[k], method.gram_batches * method.batch_size)
        sums, counts = gram_sums(backbone, data, method.batch_size, device)
        full = {key: sums.get(key, torch.zeros(shapes[key][1], shapes[key][1], dtype=torch.float64,
                                                device=device)) for key in keys}
        count = torch.tensor([float(counts.get(key, 0)) for key in keys], dtype=torch.float64, device=device)
        reduce_sum_([*full.values(), count])
        per_task.append({key: (full[key] / count[i]).float().cpu() for i, key in enumerate(keys)
                         if float(count[i]) > 0})
        samples += len(data)
    return DataStatistics({"gram": per_task}, info={"samples": samples})


# ---------------------------------------------------------------------------------------- AdaMerging


def prepared_task_vectors(method: AdaMerging, pretrained: StateDict, finetuned: Sequence[StateDict],
                          keys: Sequence[str], fr_filter_ratio: float, device) -> dict[str, Tensor]:
    """Key → ``[K, *shape]`` task vectors the coefficients multiply, computed by the method's own
    ``vector_statistics`` / ``prepared_vectors`` over the engine's inputs (so the merge later sees the same)."""
    vectors = [{key: sd[key].float() - pretrained[key].float() for key in keys} for sd in finetuned]
    inputs = TaskVectorInputs(vectors, transform=prefilter_transform(fr_filter_ratio))
    stats = method.vector_statistics(Scan(inputs.keys, inputs.load, Context(inputs.num_tasks, inputs.keys)))
    return {key: method.prepared_vectors(inputs.load(key), stats).to(device) for key in keys}


def cycle(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


def entropy_sum(logits: Tensor) -> Tensor:
    """Σ over samples of the Shannon entropy of softmax(logits)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum()


class CoefficientModel(nn.Module):
    """θ_pre + Σ_k clamp(λ, 0, 1)_{k,l} v_{k,l} as a functional call of a frozen backbone; λ is the only
    parameter (``[K]`` task-wise or ``[L, K]`` layer-wise, one row per merged key)."""

    def __init__(self, backbone: nn.Module, pretrained: StateDict, vectors: dict[str, Tensor],
                 granularity: str, init: float) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.keys = list(vectors)
        self._pretrained = {k: pretrained[k].float().to(vectors[k].device) for k in self.keys}
        self._vectors = vectors
        K = next(iter(vectors.values())).shape[0] if vectors else 0
        shape = (K,) if granularity == "task" else (len(self.keys), K)
        self.coefficients = nn.Parameter(torch.full(shape, float(init)))

    def lambdas(self, i: int) -> Tensor:
        lam = self.coefficients if self.coefficients.dim() == 1 else self.coefficients[i]
        return lam.clamp(0.0, 1.0)

    def merged(self) -> dict[str, Tensor]:
        out = {}
        for i, key in enumerate(self.keys):
            v = self._vectors[key]
            lam = self.lambdas(i).reshape(-1, *([1] * (v.dim() - 1)))
            out[key] = self._pretrained[key] + (lam * v).sum(0)
        return out

    def forward(self, x: Tensor) -> Tensor:
        return functional_call(self.backbone, self.merged(), (x,), strict=False)

    def per_key(self) -> dict[str, Tensor]:
        """Key → the learned ``[K]`` coefficients (clamped, detached)."""
        return {key: self.lambdas(i).detach().cpu().clone() for i, key in enumerate(self.keys)}


def train_coefficients(model: CoefficientModel, heads: Sequence[nn.Module], datasets: Sequence[Dataset],
                       method: AdaMerging, device) -> dict[str, Any]:
    """Adam on the coefficients only, minimising Σ_k mean entropy of head k on one batch of task k's inputs
    per step (each rank runs its share of every batch; gradients summed across ranks)."""
    rank, size = world()
    g = torch.Generator().manual_seed(method.seed)
    loaders = [cycle(DataLoader(d, batch_size=method.batch_size, shuffle=True, generator=g)) for d in datasets]
    opt = torch.optim.Adam([model.coefficients], lr=method.lr)
    skipped: set[int] = set()
    samples = 0
    for _ in range(method.steps):
        opt.zero_grad()
        loss = model.coefficients.sum() * 0.0
        batches = [inputs_of(next(loader))[0] for loader in loaders]
        samples += sum(x.shape[0] for x in batches)
        used = [k for k, x in enumerate(batches) if k not in skipped and x[rank::size].shape[0]]
        mine = [batches[k][rank::size] for k in used]
        # one pass of the merged backbone over every task's batch (one per task when input shapes differ)
        chunks = [mine] if len({tuple(x.shape[1:]) for x in mine}) <= 1 else [[x] for x in mine]
        feats = [f for c in chunks if c for f in model(torch.cat(c).to(device)).split([x.shape[0] for x in c])]
        for k, f in zip(used, feats):
            out = heads[k](f)
            if is_regression(out):
                skipped.add(k)
                continue
            loss = loss + entropy_sum(out) / batches[k].shape[0]
        loss.backward()
        reduce_sum_([model.coefficients.grad])
        opt.step()
    broadcast_([model.coefficients.data])
    return {"steps": method.steps, "samples": sum(len(d) for d in datasets), "sample_passes": samples,
            "regression_tasks_skipped": sorted(skipped)}


def collect_coefficients(method: AdaMerging, adapter: ModelAdapter, pretrained: StateDict,
                         finetuned: Sequence[StateDict], datasets: Sequence[Dataset], device, *,
                         exclude_keys: Sequence[str] = (), fr_filter_ratio: float = 0.0) -> DataStatistics:
    keys = mergeable_keys(pretrained, list(exclude_keys))
    vectors = prepared_task_vectors(method, pretrained, finetuned, keys, fr_filter_ratio, device)
    backbone = adapter.build_backbone()
    backbone.load_state_dict(pretrained, strict=True)
    backbone.eval().to(device)
    model = CoefficientModel(backbone, pretrained, vectors, method.granularity, method.init).to(device)
    heads = [adapter.build_head(t).requires_grad_(False).eval().to(device) for t in adapter.task_names]
    with torch.inference_mode(False), torch.enable_grad():
        info = train_coefficients(model, heads, datasets, method, device)
    return DataStatistics(shared={"coefficients": model.per_key()}, info=info)


# ---------------------------------------------------------------------------------------- MTL


def mtl_datasets(method: MultiTaskLearning, datamodule, datasets: Sequence[Dataset]) -> list[Dataset]:
    """The labelled data MTL trains on: the router split, or a seeded ``train_fraction`` of each training split
    (``train_split_args`` in place of the data module's ``train_args`` when given)."""
    if method.data_split == "router":
        return list(datasets)
    from freemerge_pl.lightning.datamodule import TaskIdDataset, import_class, router_split

    out = []
    split_args = method.train_split_args
    for i, task in enumerate(datamodule.tasks):
        ds = import_class(task.dataset)(**{**task.dataset_args, **(task.train_args if split_args is None
                                                                     else split_args)})
        indices = router_split(len(ds), method.train_fraction, method.seed, i, 1)
        out.append(TaskIdDataset(Subset(ds, indices), i))
    return out


def task_loss(out: Tensor, y: Tensor) -> Tensor:
    """Summed cross-entropy (classification heads) or squared error (one-output regression heads)."""
    if is_regression(out):
        return F.mse_loss(out.reshape(-1), y.to(out.dtype).reshape(-1), reduction="sum")
    return F.cross_entropy(out, y.long(), reduction="sum")


def train_multitask(backbone: nn.Module, heads: Sequence[nn.Module], datasets: Sequence[Dataset],
                    method: MultiTaskLearning, device) -> dict[str, Any]:
    """Joint fine-tuning: AdamW over every floating parameter of the backbone, shuffled mixed batches, each
    sample through its task's (frozen) head; each rank runs its share of every batch, gradients summed."""
    rank, size = world()
    params = [p for p in backbone.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=method.lr, weight_decay=method.weight_decay)
    g = torch.Generator().manual_seed(method.seed)
    loader = DataLoader(ConcatDataset(datasets), batch_size=method.batch_size, shuffle=True, generator=g)
    samples = steps = 0
    backbone.train()
    for _ in range(method.epochs):
        for x, y, t in loader:
            samples += x.shape[0]
            steps += 1
            opt.zero_grad()
            loss = params[0].sum() * 0.0
            xs, ys, ts = x[rank::size].to(device), y[rank::size].to(device), torch.as_tensor(t)[rank::size]
            if xs.shape[0]:
                feats = backbone(xs)
                for k in ts.unique().tolist():
                    sel = (ts == k).to(device)
                    loss = loss + task_loss(heads[k](feats[sel]), ys[sel])
            (loss / x.shape[0]).backward()
            reduce_sum_([p.grad for p in params if p.grad is not None])
            opt.step()
    backbone.eval()
    broadcast_([p.data for p in params])
    return {"epochs": method.epochs, "steps": steps, "samples": sum(len(d) for d in datasets),
            "sample_passes": samples}


def collect_multitask(method: MultiTaskLearning, adapter: ModelAdapter, pretrained: StateDict, datamodule,
                      datasets: Sequence[Dataset], device, *, exclude_keys: Sequence[str] = ()) -> DataStatistics:
    backbone = adapter.build_backbone()
    backbone.load_state_dict(pretrained, strict=True)
    backbone.to(device)
    heads = [adapter.build_head(t).requires_grad_(False).eval().to(device) for t in adapter.task_names]
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(method.seed)
        info = train_multitask(backbone, heads, mtl_datasets(method, datamodule, datasets), method, device)
    trained = backbone.state_dict()
    delta = {k: (trained[k].detach().float().cpu() - pretrained[k].float())
             for k in mergeable_keys(pretrained, list(exclude_keys))}
    return DataStatistics(shared={"delta": delta}, info=info)


# ---------------------------------------------------------------------------------------- entry point


def collect_statistics(method: DataDependentMethod, adapter: ModelAdapter, pretrained: StateDict,
                       finetuned: Sequence[StateDict], datamodule, *, exclude_keys: Sequence[str] = (),
                       fr_filter_ratio: float = 0.0, device: str | torch.device = "cpu") -> DataStatistics:
    """``method``'s statistics from ``datamodule``'s router split (see the module docstring); ``info`` records
    the samples used, the seconds taken and, for the trained methods, the optimisation steps."""
    start = time.perf_counter()
    datasets = task_datasets(datamodule)
    if len(datasets) != len(adapter.task_names):
        raise ConfigError(f"the router split has {len(datasets)} task(s), the adapter {len(adapter.task_names)}")
    device = torch.device(device)
    if isinstance(method, FisherMerging):
        stats = collect_fisher(method, adapter, finetuned, datasets, device)
    elif isinstance(method, RegMean):
        stats = collect_grams(method, adapter, finetuned, datasets, device)
    elif isinstance(method, AdaMerging):
        stats = collect_coefficients(method, adapter, pretrained, finetuned, datasets, device,
                                     exclude_keys=exclude_keys, fr_filter_ratio=fr_filter_ratio)
    elif isinstance(method, MultiTaskLearning):
        stats = collect_multitask(method, adapter, pretrained, datamodule, datasets, device,
                                  exclude_keys=exclude_keys)
    else:
        raise ConfigError(f"no statistics collector for method {method.name!r} ({type(method).__name__})")
    stats.info = {"kind": method.statistic, **stats.info, "seconds": time.perf_counter() - start,
                  "world_size": world()[1]}
    return stats


def with_statistics(method, adapter: ModelAdapter, pretrained: StateDict, finetuned: Sequence[StateDict],
                    datamodule=None, fr_filter_ratio: float = 0.0, trainer=None):
    """``method``, bound to its statistics from the router split of ``datamodule`` (default: ``trainer``'s, on
    its device) when it needs data (``needs_data``); else ``method`` itself."""
    from lightning.pytorch.utilities import rank_zero_info

    from freemerge_pl.merging.methods.data_dependent import needs_data

    if not needs_data(method):
        return method
    if datamodule is None and trainer is not None:
        datamodule = getattr(trainer, "datamodule", None)
    device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
    stats = collect_statistics(method, adapter, pretrained, finetuned, datamodule,
                               exclude_keys=list(adapter.exclude_keys), fr_filter_ratio=fr_filter_ratio, device=device)
    rank_zero_info(f"{method.name}: {stats.info['kind']} statistics from {stats.info.get('samples')} router-split "
                   f"samples in {stats.info['seconds']:.1f}s")
    return method.with_data(stats)
