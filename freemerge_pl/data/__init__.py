"""Datasets: image folders, text tasks (JSONL/CSV) and the bundled task metadata. The Lightning data module
that combines them is ``freemerge_pl.lightning.datamodule.MultiTaskDataModule``."""
