"""freemerge_pl.data."""
