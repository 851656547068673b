"""freemerge_pl: FREE-Merging (Fourier high-pass merging with lightweight experts) on Lightning."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_merged"]


def __getattr__(name: str) -> Any:
    """``freemerge_pl.load_merged`` (``freemerge_pl.loading``), imported on first use so that ``import
    freemerge_pl`` stays light."""
    if name == "load_merged":
        from freemerge_pl.loading import load_merged

        return load_merged
    raise AttributeError(f"module 'freemerge_pl' has no attribute {name!r}")
