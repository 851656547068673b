"""A tiny, fully offline model family for tests and examples: an MLP backbone on vector inputs.

``make_toy_models(root)`` writes the same layout the zoo uses (``pretrained/``, ``finetuned/<task>/``,
``data/<task>.safetensors``, ``manifest.json``); ``ToyAdapter`` and ``ToyTaskDataset`` read it.
Each task draws inputs from its own Gaussian cluster (so a router can tell tasks apart) and labels them
by a task-specific linear rule; fine-tuning trains the whole backbone and a head per task.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.data import Dataset

from freemerge_pl.adapters.base import ModelAdapter
from freemerge_pl.io import save_safetensors_atomic, write_json_atomic


class ToyBackbone(nn.Module):
    """``Linear → GELU → Linear``: ``[B, in_dim] → [B, feature_dim]``."""

    def __init__(self, in_dim: int = 16, hidden_dim: int = 32, feature_dim: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, feature_dim)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x.float())))


def _task_data(k: int, n: int, in_dim: int, num_classes: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    centre = torch.randn(in_dim, generator=g) * 3.0
    rule = torch.randn(in_dim, num_classes, generator=g)
    x = centre + torch.randn(n, in_dim, generator=g)
    y = ((x - centre) @ rule).argmax(-1)
    return x, y


def make_toy_models(
    root: str | Path,
    num_tasks: int = 3,
    num_classes: int = 3,
    in_dim: int = 16,
    hidden_dim: int = 32,
    feature_dim: int = 16,
    n_train: int = 400,
    n_test: int = 200,
    steps: int = 200,
    lr: float = 0.01,
    seed: int = 0,
) -> Path:
    """Write a pre-trained backbone, ``num_tasks`` fine-tuned backbones + heads, data and a manifest."""
    root = Path(root)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = {"in_dim": in_dim, "hidden_dim": hidden_dim, "feature_dim": feature_dim}
    pre = ToyBackbone(**config)
    save_safetensors_atomic(pre.state_dict(), root / "pretrained" / "model.safetensors")
    write_json_atomic(config, root / "pretrained" / "config.json")
    tasks = []
    for k in range(num_tasks):
        name = f"task{k}"
        x, y = _task_data(k, n_train + n_test, in_dim, num_classes, g)
        save_safetensors_atomic({"train_x": x[:n_train], "train_y": y[:n_train], "test_x": x[n_train:],
                                 "test_y": y[n_train:]}, root / "data" / f"{name}.safetensors")
        model = ToyBackbone(**config)
        model.load_state_dict(pre.state_dict())
        head = nn.Linear(feature_dim, num_classes)
        opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(head(model(x[:n_train])), y[:n_train]).backward()
            opt.step()
        with torch.no_grad():
            acc = float((head(model(x[n_train:])).argmax(-1) == y[n_train:]).float().mean())
        save_safetensors_atomic(model.state_dict(), root / "finetuned" / name / "model.safetensors")
        save_safetensors_atomic(head.state_dict(), root / "finetuned" / name / "head.safetensors")
        tasks.append({"name": name, "num_classes": num_classes, "individual_test_acc": acc})
    write_json_atomic({"kind": "toy", "config": config, "tasks": tasks, "seed": seed}, root / "manifest.json")
    return root


class ToyAdapter(ModelAdapter):
    """Reads a ``make_toy_models`` directory."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)
        self._manifest = None

    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            self._manifest = json.loads((self.root / "manifest.json").read_text())
        return self._manifest

    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.manifest["tasks"]]

    def pretrained_state_dict(self):
        return load_file(str(self.root / "pretrained" / "model.safetensors"))

    def finetuned_state_dict(self, task: str):
        return load_file(str(self.root / "finetuned" / task / "model.safetensors"))

    def build_backbone(self) -> nn.Module:
        return ToyBackbone(**self.manifest["config"])

    def num_classes(self, task: str) -> int:
        return next(t["num_classes"] for t in self.manifest["tasks"] if t["name"] == task)

    def build_head(self, task: str) -> nn.Module:
        head = nn.Linear(self.manifest["config"]["feature_dim"], self.num_classes(task))
        head.load_state_dict(load_file(str(self.root / "finetuned" / task / "head.safetensors")))
        return head

    def checkpoint_paths(self) -> list[str]:
        return [str(self.root / "pretrained" / "model.safetensors")] + [
            str(self.root / "finetuned" / t / "model.safetensors") for t in self.task_names]


class ToyTaskDataset(Dataset):
    """``(x, y)`` pairs of one toy task and split."""

    def __init__(self, root: str, task: str, split: str = "train", num_classes: int | None = None) -> None:
        data = load_file(str(Path(root) / "data" / f"{task}.safetensors"))
        self.x, self.y = data[f"{split}_x"], data[f"{split}_y"]
        manifest = json.loads((Path(root) / "manifest.json").read_text())
        self.num_classes = num_classes or next(t["num_classes"] for t in manifest["tasks"] if t["name"] == task)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])
