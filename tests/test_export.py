"""Every kind of task module (sparse experts, EMR masks, Twin factors) and shared module is written to disk."""

import json

import pytest
import torch
from safetensors.torch import load_file

from freemerge_pl.merging import merge, save_merge


@pytest.mark.parametrize("method", ["free_merging", "emr", "twin"])
def test_save_merge_writes_every_task_module(tmp_path, method):
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(8, 6, generator=g), "b": torch.randn(6, generator=g)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    out = merge(pre, fts, method)
    save_merge(out, tmp_path)
    info = json.loads((tmp_path / "merge_info.json").read_text())
    assert info["task_module_files"][:3] == [f"task_module_{k:02d}.safetensors" for k in range(3)]
    for k, module in enumerate(out.task_modules):
        saved = load_file(str(tmp_path / f"task_module_{k:02d}.safetensors"))
        assert saved and all(torch.equal(t, t) for t in saved.values())
        expected = module.to_state_dict() if hasattr(module, "to_state_dict") else {
            n: t for n, t in module.state_dict().items() if isinstance(t, torch.Tensor)}
        assert set(saved) == set(expected)
        for n, t in expected.items():
            assert torch.equal(saved[n], t)
    for name, module in out.result.shared_modules.items():
        saved = load_file(str(tmp_path / f"shared_{name}.safetensors"))
        for n, t in module.state_dict().items():
            if isinstance(t, torch.Tensor):
                assert torch.equal(saved[n], t)
    if method == "emr":
        assert (tmp_path / "shared_emr_unified.safetensors").exists()
