"""Model adapters: how checkpoints are read and turned into backbone/head modules."""

from freemerge_pl.models.base import ModelAdapter

__all__ = ["ModelAdapter"]
