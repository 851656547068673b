"""Lightning callbacks shipped as ``freemerge_pl.callbacks``."""
