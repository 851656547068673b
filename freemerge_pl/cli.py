"""LightningCLI entry point: fit / validate / test / predict, plus ``merge`` (build + export, no evaluation)."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from freemerge_pl.data import MultiTaskDataModule
from freemerge_pl.module import MergedModule


class FreeMergeTrainer(Trainer):
    """A Trainer with a ``merge`` entry: build the merged model, train the router, export; no evaluation."""

    def merge(self, model: MergedModule, datamodule: MultiTaskDataModule, output_dir: str = "merged",
              fit_router: bool = True) -> list[Path]:
        """Build backbone + task modules, optionally train the router on the router split, export safetensors."""
        datamodule.prepare_data()
        datamodule.setup("test")
        model.prepare_data()
        model._check_data(datamodule)
        router_data = datamodule.router_dataset()
        model.build(router_data[0][0].unsqueeze(0))
        if fit_router and model.routing == "router":
            model.fit_router(router_data)
        written = model.export(output_dir)
        rank_zero_info(f"wrote {len(written)} files to {output_dir}")
        return written


class FreeMergeCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "merge": {"model", "datamodule"}}


def main(args=None) -> FreeMergeCLI:
    return FreeMergeCLI(MergedModule, MultiTaskDataModule, trainer_class=FreeMergeTrainer,
                        save_config_kwargs={"overwrite": True}, args=args)
