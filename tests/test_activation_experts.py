"""Activation-space experts (``benchmarks/experimental/activation_experts.py``, experimental: the product runs
the weight swap) equal the weight swap they replace: toy MLP, open_clip ViT and BERT, mixed-task batches, top-1
and weighted top-2, the paper's experts and the released code's."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from freemerge_pl.adapters.toy import ToyAdapter, make_toy_models
from freemerge_pl.lightning.module import MergedModule
from freemerge_pl.merging import merge
from freemerge_pl.merging.experts import SparseExpert

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "experimental"))
from activation_experts import ActivationExperts, _csr_rows, correction_kind


def per_sample_reference(backbone: nn.Module, experts, x, ids, weights) -> torch.Tensor:
    """Each sample alone through the backbone with its experts applied in place (the weight swap's meaning)."""
    out = []
    with torch.no_grad():
        for i in range(x.shape[0]):
            ws = [1.0] if ids.shape[1] == 1 else weights[i].tolist()
            for g, w in zip(ids[i].tolist(), ws):
                experts[g].apply_(backbone, float(w))
            out.append(backbone(x[i:i + 1]))
            for g in reversed(ids[i].tolist()):
                experts[g].restore_(backbone)
    return torch.cat(out)


def routing(batch: int, num_tasks: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random distinct top-k task ids per sample (every task used) and renormalised weights."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_tasks, generator=g)[:k] for _ in range(batch)])
    ids[:num_tasks, 0] = torch.arange(num_tasks)
    ids[:num_tasks, 1:] = (ids[:num_tasks, :1] + torch.arange(1, k)) % num_tasks
    weights = torch.rand(batch, k, generator=g) + 0.1
    return ids, weights / weights.sum(1, keepdim=True)


def passes(backbone: nn.Module) -> list[int]:
    calls = [0]
    backbone.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return make_toy_models(tmp_path_factory.mktemp("toy"), num_tasks=3, steps=30)


@pytest.mark.parametrize("method,args", [("free_merging", {"expert_density": 0.1}),
                                         ("free_merging_released", {"expert_density": 0.2,
                                                                    "key_pattern": "fc"})])
@pytest.mark.parametrize("k", [1, 2])
def test_toy_mixed_batches_match_the_weight_swap(toy_root, method, args, k):
    model = MergedModule(ToyAdapter(str(toy_root)), method=method, method_args=args, top_k=k)
    model.build(torch.zeros(1, 16))
    activation = ActivationExperts(model.backbone, list(model.task_modules))
    assert activation.supported, activation.unsupported
    x = torch.randn(11, 16) * 3
    ids, weights = routing(11, 3, k)
    want = per_sample_reference(model.backbone, model.task_modules, x, ids, weights)
    results = {}
    for path, run in (("activation", activation), ("weight_swap", model.model.features)):
        calls = passes(model.backbone)
        results[path] = run(x, ids, weights)
        combos = {(tuple(r), tuple(w) if k > 1 else ()) for r, w in zip(ids.tolist(), weights.tolist())}
        assert calls[0] == (1 if path == "activation" else len(combos)), path
        torch.testing.assert_close(results[path], want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(results["activation"], model.backbone(x))  # the experts change the features


def tiny_vit_merge(method: str, **args):
    from freemerge_pl.zoo.vision.build import build_vit
    from freemerge_pl.zoo.vision.recipe import SIZES

    torch.manual_seed(0)
    config = dict(SIZES["tiny"]["backbone"], layers=1)
    pre = build_vit(config).eval()
    sd = {k: v.clone() for k, v in pre.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    fts = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in sd.items()} for _ in range(3)]
    out = merge(sd, fts, method, **args)
    backbone = build_vit(config).eval()
    backbone.load_state_dict(out.state_dict)
    return backbone, out.task_modules


@pytest.mark.parametrize("method,args", [("free_merging", {"expert_density": 0.05}),
                                         ("free_merging_released", {"expert_density": 0.1})])
@pytest.mark.parametrize("k", [1, 2])
def test_open_clip_vit_mixed_batches_match_the_weight_swap(method, args, k):
    backbone, experts = tiny_vit_merge(method, **args)
    activation = ActivationExperts(backbone, experts)
    assert activation.supported, activation.unsupported
    kinds = {activation.kinds[key][0] for e in experts for key in e.keys}
    expected = {"mha", "linear"} | ({"layernorm", "conv", "vit_embed", "vit_proj"} if method == "free_merging"
                                    else set())
    assert kinds == expected
    x = torch.randn(7, 3, 32, 32)
    ids, weights = routing(7, 3, k, seed=k)
    want = per_sample_reference(backbone, experts, x, ids, weights)
    calls = passes(backbone)
    got = activation(x, ids, weights)
    assert calls[0] == 1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - backbone(x)).abs().max() > 1e-3  # the corrections are not negligible
    assert "forward" not in backbone.transformer.resblocks[0].attn.__dict__  # the attention override is gone


def tiny_bert_merge(method: str, **args):
    """A 1-layer BERT encoder (word, position and token-type embeddings, attention, pooler) under the text
    adapters' ``TextEncoderBackbone``, merged from 3 perturbed copies."""
    from transformers import BertConfig, BertModel

    from freemerge_pl.adapters.hf_text import TextEncoderBackbone

    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=12, type_vocab_size=2)

    def build() -> nn.Module:
        torch.manual_seed(0)
        return TextEncoderBackbone(BertModel(config), "bert", "pooler").eval()

    sd = {k: v.clone() for k, v in build().state_dict().items()}
    g = torch.Generator().manual_seed(2)
    fts = [{k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in sd.items()}
           for _ in range(3)]
    out = merge(sd, fts, method, **args)
    backbone = build()
    backbone.load_state_dict(out.state_dict)
    return backbone, out.task_modules


@pytest.mark.parametrize("method,args", [("free_merging", {"expert_density": 0.05}),
                                         ("free_merging_released", {"expert_density": 0.1,
                                                                    "key_pattern": r"_embeddings\.|dense\."})])
@pytest.mark.parametrize("k", [1, 2])
def test_bert_mixed_batches_match_the_weight_swap(method, args, k):
    """Token ids through nn.Embedding (batched word/token-type ids, and position ids shared by the batch)."""
    backbone, experts = tiny_bert_merge(method, **args)
    activation = ActivationExperts(backbone, experts)
    assert activation.supported, activation.unsupported
    touched = {key for e in experts for key in e.keys if activation.kinds[key][0] == "embedding"}
    assert {"bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight"} <= touched
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(40, (9, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[:3, 7:] = 0  # padding on some rows
    types = (torch.arange(10) >= 5).long().expand(9, 10)
    x = torch.stack([ids, mask, types], 1)
    route, weights = routing(9, 3, k, seed=k + 2)
    want = per_sample_reference(backbone, experts, x, route, weights)
    calls = passes(backbone)
    got = activation(x, route, weights)
    assert calls[0] == 1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - backbone(x)).abs().max() > 1e-3


def test_embedding_rows_of_a_sparse_matrix_are_its_dense_rows():
    dense = torch.zeros(6, 4)
    dense[1, 2], dense[3, 0], dense[3, 3], dense[5, 1] = 1.5, -2.0, 0.25, 4.0
    ids = torch.tensor([[3, 0, 5], [1, 3, 3]])
    torch.testing.assert_close(_csr_rows(dense.to_sparse_csr(), ids), dense[ids])


def test_keys_the_activation_path_does_not_cover_are_reported(toy_root):
    net = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Linear(4, 3), nn.Embedding(10, 4))
    assert correction_kind(net, "0.weight") is None and correction_kind(net, "1.weight")[0] == "linear"
    assert correction_kind(net, "2.weight")[0] == "embedding"
    model = MergedModule(ToyAdapter(str(toy_root)), method="free_merging")
    model.build(torch.zeros(1, 16))
    covered = model.task_modules[0]
    idx, vals = covered.entries("fc1.weight")
    odd = SparseExpert({"fc1.weight": (idx, vals), "step": (torch.tensor([0], dtype=torch.int32),
                                                            torch.tensor([0.0]))}, {"step": []})
    activation = ActivationExperts(model.backbone, [odd, *list(model.task_modules)[1:]])
    assert activation.unsupported == ["step"] and not activation.supported
