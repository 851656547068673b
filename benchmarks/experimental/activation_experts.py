"""Activation-space experts: a routed sample's sparse expert as an additive correction of the layers it touches.

A SparseExpert changes weights additively (``W ← W + w·ΔW_k``, ΔW_k sparse; for FREE-Merging ΔW_k is the
paper's expert, for the released code the expert's replacement value minus the shared value, both stored
that way). A layer that is linear in its weights therefore computes, for the rows of a batch routed to k,

    y = W x + b + w·(ΔW_k x + Δb_k)

so a mixed-task batch needs ONE backbone pass plus a sparse product per touched layer over each task's rows,
instead of one backbone pass per task with the weights swapped in and out (``RoutedModel.features``, the
product's one expert path). Experimental: the product does not run it; ``benchmarks/inference_overhead.py``
and ``benchmarks/router_compare.py`` time it against the weight swap. Covered (``correction_kind``):

* ``nn.Linear`` weight/bias (sparse CSR product of the selected rows; batch on dim 0);
* ``nn.MultiheadAttention`` ``in_proj_weight``/``in_proj_bias`` and ``out_proj`` (self-attention, batch
  first, no key padding mask, no attention weights asked for: its forward is run here as in-projection +
  correction, ``scaled_dot_product_attention``, out-projection + correction, because torch's
  ``multi_head_attention_forward`` reads ``in_proj_weight`` directly);
* ``nn.LayerNorm`` weight/bias: ``y + w·(Δγ_k ⊙ x̂ + Δβ_k)`` with x̂ the normalised input;
* ``nn.Conv2d`` weight/bias (``zeros`` padding): the layer's own convolution of the selected rows with ΔW_k;
* ``nn.Embedding`` weight (no ``max_norm``): the rows of ΔW_k the selected ids look up (a sparse row gather);
  ids with batch size 1 broadcast over the batch (e.g. BERT's position ids) give an output expanded to the
  batch, each row with its own correction;
* open_clip ``VisionTransformer`` ``class_embedding``/``positional_embedding`` (added per sample to the
  token sequence before ``patch_dropout``) and ``proj`` (``pooled·Δproj_k`` added to the output; no
  attention pooling, no token output).

Any other key (a parameter a parent's forward reads directly, a task module that is not
a SparseExpert, attention that is not batch-first self-attention) makes ``ActivationExperts.supported``
False (run the weight swap instead).
The results equal the weight-swap path within float32 rounding (tests/test_activation_experts.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class UnsupportedCall(RuntimeError):
    """A covered layer was called in a way the corrections do not handle (raised during the pass; the caller
    falls back to the weight swap)."""


def _vit_class():
    try:
        from open_clip.transformer import VisionTransformer
    except ImportError:  # pragma: no cover - open_clip is a dependency
        return None
    return VisionTransformer


def correction_kind(backbone: nn.Module, key: str) -> tuple[str, str, str] | None:
    """``(kind, module name, parameter name)`` of how the activation path corrects parameter ``key`` of
    ``backbone``, or None when it cannot (kinds: linear, mha, layernorm, conv, embedding, vit_embed, vit_proj)."""
    prefix, _, name = key.rpartition(".")
    try:
        module = backbone.get_submodule(prefix) if prefix else backbone
    except AttributeError:
        return None
    parent_name, _, child = prefix.rpartition(".")
    parent = backbone.get_submodule(parent_name) if prefix else None
    if isinstance(parent, nn.MultiheadAttention) and child == "out_proj" and name in ("weight", "bias"):
        return ("mha", parent_name, f"out_proj.{name}") if _mha_ok(parent) else None
    if isinstance(module, nn.MultiheadAttention) and name in ("in_proj_weight", "in_proj_bias"):
        return ("mha", prefix, name) if _mha_ok(module) else None
    if isinstance(module, nn.Linear) and name in ("weight", "bias"):
        return "linear", prefix, name
    if isinstance(module, nn.LayerNorm) and name in ("weight", "bias"):
        return "layernorm", prefix, name
    if isinstance(module, nn.Conv2d) and name in ("weight", "bias") and module.padding_mode == "zeros":
        return "conv", prefix, name
    if isinstance(module, nn.Embedding) and name == "weight" and module.max_norm is None:
        return "embedding", prefix, name
    vit = _vit_class()
    if vit is not None and isinstance(module, vit):
        if name in ("class_embedding", "positional_embedding"):
            return "vit_embed", prefix, name
        if name == "proj" and getattr(module, "attn_pool", None) is None and not module.output_tokens:
            return "vit_proj", prefix, name
    return None


def _mha_ok(mha: nn.MultiheadAttention) -> bool:
    return (mha.batch_first and mha._qkv_same_embed_dim and mha.bias_k is None and not mha.add_zero_attn
            and mha.in_proj_weight is not None)


@dataclass
class _Delta:
    """One task's change of one layer, ready for the correction: ``weight`` (a sparse CSR matrix for
    products, dense otherwise) and ``bias`` (dense), float32, on the backbone's device; None = unchanged."""

    weight: Tensor | None = None
    bias: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)


def _dense(indices: Tensor, values: Tensor, shape: Sequence[int], device) -> Tensor:
    out = torch.zeros(int(torch.tensor(shape).prod()), dtype=torch.float32, device=device)
    out[indices.to(device=device, dtype=torch.long)] = values.to(device=device, dtype=torch.float32)
    return out.reshape(shape)


def _csr(indices: Tensor, values: Tensor, shape: Sequence[int], device) -> Tensor:
    """The sparse [out, in] matrix of flat row-major ``indices`` (sorted or not), int32 CSR indices."""
    rows_n, cols_n = int(shape[0]), int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
    idx = indices.to(device=device, dtype=torch.long)
    vals = values.to(device=device, dtype=torch.float32)
    idx, order = idx.sort()
    vals = vals[order]
    rows, cols = idx // cols_n, idx % cols_n
    crow = torch.zeros(rows_n + 1, dtype=torch.int32, device=device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=rows_n), 0).to(torch.int32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols.to(torch.int32), vals, (rows_n, cols_n), check_invariants=False)


@dataclass
class _Group:
    rows: Tensor  # long [n]: the batch rows routed (also) to this task
    weight: Tensor | None  # float32 [n] routing weights; None = all 1
    span: tuple[int, int] | None = None  # the rows are start:end (top-1: the batch is sorted by task)


def _scaled(c: Tensor, group: _Group) -> Tensor:
    if group.weight is None:
        return c
    return c * group.weight.view(-1, *([1] * (c.dim() - 1))).to(c.dtype)


def _take(x: Tensor, group: _Group) -> Tensor:
    return x[group.span[0]:group.span[1]] if group.span is not None else x.index_select(0, group.rows)


def _add_(output: Tensor, group: _Group, c: Tensor) -> None:
    """``output[rows] += weight·c`` (in place; a slice when the rows are contiguous)."""
    c = _scaled(c, group).to(output.dtype)
    if group.span is not None:
        output[group.span[0]:group.span[1]].add_(c.reshape(output[group.span[0]:group.span[1]].shape))
    else:
        output.index_add_(0, group.rows, c.reshape(-1, *output.shape[1:]))


def _linear_correction(x: Tensor, output: Tensor, group: _Group, weight: Tensor | None,
                       bias: Tensor | None) -> None:
    """``output[rows] += w·(x[rows] ΔWᵀ + Δb)`` with ΔW sparse CSR [out, in]."""
    xs = _take(x, group)
    out_features = output.shape[-1]
    if group.span is not None and group.weight is None and output.dtype == torch.float32 \
            and output.is_contiguous():
        # the rows are a slice of the output: ``out[rows]ᵀ += ΔW x[rows]ᵀ`` in place (no transposed copies of
        # the product; about half the time of product + strided add on the CPU)
        target = output[group.span[0]:group.span[1]].view(-1, out_features)
        if weight is not None:
            target.t().addmm_(weight, xs.reshape(-1, xs.shape[-1]).float().t())
        if bias is not None:
            target.add_(bias)
        return
    if weight is not None:
        c = torch.sparse.mm(weight, xs.reshape(-1, xs.shape[-1]).float().t().contiguous()).t()  # [N, out]
        if bias is not None:
            c = c + bias
    else:
        c = bias.expand(xs[..., :1].numel(), out_features)
    if group.span is not None and group.weight is None:
        output[group.span[0]:group.span[1]].view(-1, out_features).add_(c.to(output.dtype))
    else:
        _add_(output, group, c.reshape(*xs.shape[:-1], out_features))


def routing_key(ids: Tensor, weights: Tensor | None) -> Tensor:
    """Top-1 routing as one key per row: the routed task, or -1 where the router's weight is 0 (no expert)."""
    key = ids[:, 0]
    return key if weights is None else torch.where(weights[:, 0] != 0, key, torch.full_like(key, -1))


class ActivationExperts:
    """The activation path of one backbone and its task modules (SparseExperts): ``supported`` says whether
    every key of every expert is covered (``unsupported`` lists the others), ``__call__(x, ids, weights)``
    runs one corrected backbone pass. Per-task correction tensors are built on first use and kept (float32,
    CSR for products: about 8 bytes an entry on the device)."""

    def __init__(self, backbone: nn.Module, task_modules: Sequence[nn.Module]) -> None:
        from freemerge_pl.merging.experts import SparseExpert

        self.backbone = backbone
        self.task_modules = list(task_modules)
        self.kinds: dict[str, tuple[str, str, str]] = {}
        self.unsupported: list[str] = []
        for k, module in enumerate(self.task_modules):
            if not isinstance(module, SparseExpert):
                self.unsupported.append(f"task module {k} ({type(module).__name__})")
                continue
            for key in module.keys:
                kind = correction_kind(backbone, key)
                if kind is None:
                    self.unsupported.append(key)
                else:
                    self.kinds[key] = kind
        mhas = [m for m in backbone.modules() if isinstance(m, nn.MultiheadAttention)]
        if any(not _mha_ok(m) for m in mhas) and any(k[0] in ("linear", "layernorm") for k in self.kinds.values()):
            self.unsupported.append("attention that is not batch-first (the batch is not dim 0 everywhere)")
        self._deltas: dict[tuple[int, str], _Delta] = {}
        self._module_kind = {name: kind for kind, name, _ in self.kinds.values()}
        self._touched = [sorted({self.kinds[k][1] for k in getattr(m, "keys", []) if k in self.kinds})
                         for m in self.task_modules]

    @property
    def supported(self) -> bool:
        return not self.unsupported

    # ------------------------------------------------------------------ correction tensors
    def _delta(self, task: int, module_name: str) -> _Delta:
        cached = self._deltas.get((task, module_name))
        if cached is not None:
            return cached
        expert = self.task_modules[task]
        device = next(self.backbone.parameters()).device
        delta = _Delta()
        for key in expert.keys:
            kind, name, param = self.kinds[key]
            if name != module_name:
                continue
            indices, values = expert.entries(key)
            target = self.backbone.get_parameter(key)
            shape = list(target.shape)
            if kind == "embedding":
                delta.weight = _csr(indices, values, shape, device)
            elif kind in ("linear", "mha") and param.endswith("weight"):
                csr = _csr(indices, values, shape, device)
                delta.extra[param] = csr
                if param in ("weight",):
                    delta.weight = csr
            elif kind in ("linear", "mha") and param.endswith("bias"):
                delta.extra[param] = _dense(indices, values, shape, device)
                if param == "bias":
                    delta.bias = delta.extra[param]
            elif kind in ("layernorm", "conv"):
                setattr(delta, param, _dense(indices, values, shape, device))
            else:  # vit_embed, vit_proj
                delta.extra[param] = _dense(indices, values, shape, device)
        self._deltas[(task, module_name)] = delta
        return delta

    # ------------------------------------------------------------------ the pass
    @staticmethod
    def groups(ids: Tensor, weights: Tensor | None) -> dict[int, _Group]:
        """Task → the rows routed to it and their weights (top-1: weight 1, as the weight-swap path, and a row
        of weight 0 — the router's fallback — gets no expert; the rows of a task as a span of the batch sorted
        by ``routing_key``)."""
        out = {}
        if ids.shape[1] == 1:
            tasks, counts = torch.unique_consecutive(routing_key(ids, weights).sort().values, return_counts=True)
            start = 0
            for g, n in zip(tasks.tolist(), counts.tolist()):
                if g >= 0:
                    out[int(g)] = _Group(torch.arange(start, start + n, device=ids.device), None, (start, start + n))
                start += n
            return out
        for g in ids.unique().tolist():
            hit = ids == g
            w = (weights.float() * hit).sum(1) if weights is not None else None
            rows = (hit.any(1) & (w != 0) if w is not None else hit.any(1)).nonzero().flatten()
            out[int(g)] = _Group(rows, w[rows] if w is not None else None)
        return out

    @torch.no_grad()
    def __call__(self, x: Tensor, ids: Tensor, weights: Tensor | None = None) -> Tensor:
        """The backbone's output for ``x`` with each sample's experts (``ids`` [B, k], ``weights`` [B, k])
        applied as activation corrections; raises ``UnsupportedCall`` when a layer is called otherwise."""
        order = None
        if ids.shape[1] == 1:  # sort the batch by task: each task's rows are a slice (no gather/scatter per layer)
            order = routing_key(ids, weights).argsort(stable=True)
            x = x.index_select(0, order)
        groups = self.groups(ids, weights)
        by_module: dict[str, tuple[str, list[tuple[_Group, _Delta]]]] = {}
        for g, grp in groups.items():
            for name in self._touched[g]:
                by_module.setdefault(name, (self._module_kind[name], []))[1].append((grp, self._delta(g, name)))
        handles = []
        late = []
        try:
            for name, (kind, parts) in by_module.items():
                module = self.backbone.get_submodule(name) if name else self.backbone
                if kind == "linear":
                    handles.append(module.register_forward_hook(_linear_hook(parts, x.shape[0])))
                elif kind == "layernorm":
                    handles.append(module.register_forward_hook(_layernorm_hook(parts, x.shape[0])))
                elif kind == "conv":
                    handles.append(module.register_forward_hook(_conv_hook(parts, x.shape[0])))
                elif kind == "embedding":
                    handles.append(module.register_forward_hook(_embedding_hook(parts, x.shape[0])))
                elif kind == "mha":
                    module.forward = _mha_forward(module, parts)
                    handles.append(_Restore(module))
                else:  # the open_clip VisionTransformer's own parameters
                    late.append((module, parts))
            for module, parts in late:
                handles += _vit_hooks(module, parts, x.shape[0])
            result = self.backbone(x)
            if order is None:
                return result
            out = torch.empty_like(result)
            out[order] = result
            return out
        finally:
            for h in reversed(handles):
                h.remove()


class _Restore:
    """Removes an instance-level ``forward`` override (the class's forward is used again)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


def _check_batch(t: Tensor, batch: int, what: str) -> None:
    if t.dim() == 0 or t.shape[0] != batch:
        raise UnsupportedCall(f"{what} got a tensor of shape {tuple(t.shape)}, not batch-first with {batch} rows")


def _linear_hook(parts, batch: int):
    def hook(module: nn.Linear, inputs, output: Tensor) -> Tensor:
        _check_batch(output, batch, "a Linear layer")
        for group, delta in parts:
            _linear_correction(inputs[0], output, group, delta.weight, delta.bias)
        return output

    return hook


def _row_deltas(parts, batch: int, param: str, size: Sequence[int], device) -> Tensor | None:
    """Top-1 span groups: ``[batch, 1, ..., *size]`` with each row's task's dense ``param`` change (0 for rows
    without an expert), or None when no group changes ``param``."""
    if all(getattr(d, param) is None for _, d in parts):
        return None
    rows = torch.zeros(batch, *size, dtype=torch.float32, device=device)
    for group, delta in parts:
        if getattr(delta, param) is not None:
            rows[group.span[0]:group.span[1]] = getattr(delta, param)
    return rows


def _layernorm_hook(parts, batch: int):
    spans = all(g.span is not None and g.weight is None for g, _ in parts)
    per_row = {}

    def hook(module: nn.LayerNorm, inputs, output: Tensor) -> Tensor:
        x = inputs[0]
        _check_batch(output, batch, "a LayerNorm")
        if spans and output.dtype == torch.float32:  # top-1: every row's change at once (one extra layer norm)
            if not per_row:
                shape = module.normalized_shape
                per_row.update({p: _row_deltas(parts, batch, p, shape, x.device) for p in ("weight", "bias")})
            lead = (batch,) + (1,) * (x.dim() - 1 - len(module.normalized_shape)) + tuple(module.normalized_shape)
            if per_row["weight"] is not None:
                normed = F.layer_norm(x.float(), module.normalized_shape, None, None, module.eps)
                output.addcmul_(normed, per_row["weight"].view(lead))
            if per_row["bias"] is not None:
                output.add_(per_row["bias"].view(lead))
            return output
        for group, delta in parts:
            xs = _take(x, group).float()
            if delta.weight is not None:
                c = F.layer_norm(xs, module.normalized_shape, None, None, module.eps) * delta.weight
                c = c + delta.bias if delta.bias is not None else c
            else:
                c = delta.bias.expand(xs.shape)
            _add_(output, group, c)
        return output

    return hook


def _conv_hook(parts, batch: int):
    def hook(module: nn.Conv2d, inputs, output: Tensor) -> Tensor:
        x = inputs[0]
        _check_batch(output, batch, "a Conv2d")
        for group, delta in parts:
            xs = _take(x, group).float()
            weight = delta.weight if delta.weight is not None else xs.new_zeros(module.weight.shape)
            _add_(output, group, module._conv_forward(xs, weight, delta.bias))
        return output

    return hook


def _csr_rows(matrix: Tensor, ids: Tensor) -> Tensor:
    """Rows ``ids`` (any shape) of a sparse CSR matrix ``[V, D]``, dense: ``[*ids.shape, D]``."""
    crow, col, val = matrix.crow_indices().long(), matrix.col_indices().long(), matrix.values()
    flat = ids.reshape(-1).long()
    starts, counts = crow[flat], crow[flat + 1] - crow[flat]
    out = val.new_zeros(flat.numel(), matrix.shape[1])
    total = int(counts.sum())
    if total:
        token = torch.repeat_interleave(torch.arange(flat.numel(), device=flat.device), counts)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        entry = torch.arange(total, device=flat.device) - first + torch.repeat_interleave(starts, counts)
        out[token, col[entry]] = val[entry]
    return out.reshape(*ids.shape, matrix.shape[1])


def _embedding_hook(parts, batch: int):
    def hook(module: nn.Embedding, inputs, output: Tensor) -> Tensor:
        ids = inputs[0]
        if ids.dim() > 0 and ids.shape[0] == 1 and batch > 1:  # shared ids (position ids): expand to the batch
            output = output.expand(batch, *output.shape[1:]).clone()
            for group, delta in parts:
                c = _csr_rows(delta.weight, ids[0])
                _add_(output, group, c.expand(group.rows.numel(), *c.shape))
            return output
        _check_batch(output, batch, "an Embedding")
        for group, delta in parts:
            _add_(output, group, _csr_rows(delta.weight, _take(ids, group)))
        return output

    return hook


def _corrected_linear(x: Tensor, weight: Tensor, bias: Tensor | None, parts, wkey: str, bkey: str) -> Tensor:
    y = F.linear(x, weight, bias)
    for group, delta in parts:
        w, b = delta.extra.get(wkey), delta.extra.get(bkey)
        if w is not None or b is not None:
            _linear_correction(x, y, group, w, b)
    return y


def _mha_forward(mha: nn.MultiheadAttention, parts):
    """Batch-first self-attention with the in/out projections corrected per routed row."""

    def forward(query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        if not (query is key and key is value) or key_padding_mask is not None or need_weights \
                or query.dim() != 3 or (mha.training and mha.dropout > 0):
            raise UnsupportedCall("MultiheadAttention called other than as batch-first self-attention "
                                  "without key padding mask or attention weights")
        batch, length, embed = query.shape
        heads = mha.num_heads
        qkv = _corrected_linear(query, mha.in_proj_weight, mha.in_proj_bias, parts, "in_proj_weight",
                                "in_proj_bias")
        q, k, v = (t.reshape(batch, length, heads, embed // heads).transpose(1, 2) for t in qkv.chunk(3, -1))
        mask = attn_mask
        if mask is not None:
            if mask.dtype == torch.bool:
                mask = ~mask  # MHA: True = masked out; scaled_dot_product_attention: True = attend
            if mask.dim() == 3:
                mask = mask.reshape(batch, heads, length, length)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
        o = o.transpose(1, 2).reshape(batch, length, embed)
        out = _corrected_linear(o, mha.out_proj.weight, mha.out_proj.bias, parts, "out_proj.weight",
                                "out_proj.bias")
        return out, None

    return forward


def _vit_hooks(vit: nn.Module, parts, batch: int) -> list:
    """open_clip VisionTransformer: embeddings added before ``patch_dropout``; ``proj`` on the pooled output."""
    handles = []
    embed = [(g, d) for g, d in parts if "class_embedding" in d.extra or "positional_embedding" in d.extra]
    proj = [(g, d) for g, d in parts if "proj" in d.extra]
    if embed:
        def pre_hook(module, args):
            (x,) = args
            _check_batch(x, batch, "the ViT token sequence")
            for group, delta in embed:
                c = torch.zeros(x.shape[1:], dtype=torch.float32, device=x.device)
                if "positional_embedding" in delta.extra:
                    c = c + delta.extra["positional_embedding"]
                if "class_embedding" in delta.extra:
                    c[0] += delta.extra["class_embedding"]
                _add_(x, group, c.expand(group.rows.numel(), *c.shape))
            return (x,)

        handles.append(vit.patch_dropout.register_forward_pre_hook(pre_hook))
    if proj:
        captured: dict[str, Tensor] = {}

        def capture(module, inputs, output):  # registered after the LayerNorm correction: sees its result
            captured["ln_post"] = output

        def proj_hook(module, inputs, output: Tensor) -> Tensor:
            if "ln_post" not in captured:
                raise UnsupportedCall("the ViT's ln_post did not run")
            pooled = captured["ln_post"] if module.final_ln_after_pool else module._global_pool(
                captured["ln_post"])[0]
            _check_batch(output, batch, "the ViT output")
            for group, delta in proj:
                _add_(output, group, _take(pooled, group).float() @ delta.extra["proj"])
            return output

        handles.append(vit.ln_post.register_forward_hook(capture))
        handles.append(vit.register_forward_hook(proj_hook))
    return handles


__all__ = ["ActivationExperts", "UnsupportedCall", "correction_kind"]
