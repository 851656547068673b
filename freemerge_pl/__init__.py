"""freemerge_pl: FREE-Merging (Fourier high-pass merging with lightweight experts) on Lightning."""

from __future__ import annotations

from typing import Any

from freemerge_pl._version import __version__

__all__ = ["__version__", "load_merged"]


def __getattr__(name: str) -> Any:
    """``freemerge_pl.load_merged`` (``freemerge_pl.lightning.loading``), imported on first use so that ``import
    freemerge_pl`` stays light."""
    if name == "load_merged":
        from freemerge_pl.lightning.loading import load_merged

        return load_merged
    raise AttributeError(f"module 'freemerge_pl' has no attribute {name!r}")
