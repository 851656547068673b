"""freemerge_pl: FREE-Merging (Fourier high-pass merging with lightweight experts) on Lightning."""

__version__ = "0.1.0"
