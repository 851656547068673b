"""Multi-task data: the data module, task configs and the router split."""

from freemerge_pl.data.datamodule import MultiTaskDataModule, TaskConfig, router_split

__all__ = ["MultiTaskDataModule", "TaskConfig", "router_split"]
