"""Per-task metric collections from names (torchmetrics does the counting)."""

from __future__ import annotations

from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassMatthewsCorrCoef
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from freemerge_pl.errors import ConfigError

REGRESSION_METRICS = ("pearson", "spearman")


def make_metric(name: str, num_classes: int) -> Metric:
    """A metric by name: accuracy, f1 (macro), matthews, pearson, spearman."""
    if name == "accuracy":
        return MulticlassAccuracy(num_classes=num_classes, average="micro")
    if name == "f1":
        return MulticlassF1Score(num_classes=num_classes, average="macro")
    if name == "matthews":
        return MulticlassMatthewsCorrCoef(num_classes=num_classes)
    if name == "pearson":
        return PearsonCorrCoef()
    if name == "spearman":
        return SpearmanCorrCoef()
    raise ConfigError(f"unknown metric {name!r}; accepted: accuracy, f1, matthews, pearson, spearman")


def task_metrics(names: list[str], num_classes: int) -> MetricCollection:
    return MetricCollection({n: make_metric(n, num_classes) for n in names})
