"""freemerge_pl.zoo."""
