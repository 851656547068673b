"""freemerge_pl.analysis."""
