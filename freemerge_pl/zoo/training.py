"""What both zoo builds train with: derived seeds, AdamW with linear warm-up and cosine decay, seeded epochs of
batches, and a deterministic torch context with the build's thread count."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

#: AdamW's betas in every zoo fine-tune and pre-training (CLIP's)
ADAMW_BETAS = (0.9, 0.98)


def derived_seed(seed: int, *path: int) -> int:
    """A 63-bit seed for the part ``path`` of a build with ``seed`` (numpy ``SeedSequence``)."""
    return int(np.random.SeedSequence([seed, *path]).generate_state(1, dtype=np.uint64)[0] >> 1)


def adamw_cosine(params, cfg: dict[str, Any], steps: int):
    """AdamW (``cfg['lr']``, ``cfg['weight_decay']``, ``ADAMW_BETAS``) and its schedule: a linear warm-up over
    ``cfg['warmup_fraction']`` of ``steps``, then a cosine to 0."""
    opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=ADAMW_BETAS, weight_decay=cfg["weight_decay"])
    warm = max(1, round(cfg["warmup_fraction"] * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def batches(n: int, batch_size: int, epochs: int, seed: int) -> Iterator[torch.Tensor]:
    """Index batches of ``epochs`` seeded permutations of ``range(n)``."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            yield perm[i:i + batch_size]


@contextlib.contextmanager
def deterministic(threads: int):
    """``threads`` intra-op threads, deterministic algorithms and a forked global RNG; all restored after."""
    prev = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(prev[0])
        torch.use_deterministic_algorithms(prev[1], warn_only=prev[2])


__all__ = ["ADAMW_BETAS", "adamw_cosine", "batches", "derived_seed", "deterministic"]
