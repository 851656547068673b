"""Per-task metric collections from names (torchmetrics does the counting), and the GLUE tasks' metrics."""

from __future__ import annotations

from functools import partial

from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassMatthewsCorrCoef,
)
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef
from torchmetrics.wrappers import LambdaInputTransformer

from freemerge_pl.errors import ConfigError

#: metrics that take a regression head's scalar output (the evaluation loop must not argmax for these)
REGRESSION_METRICS = ("pearson", "spearman", "pearson_spearman")
METRIC_NAMES = ("accuracy", "f1", "macro_f1", "matthews", "pearson", "spearman", "pearson_spearman")

#: GLUE's metrics per task (the benchmark's definitions: gluebenchmark.com/tasks). Keys are the task names
#: as the HF ``glue`` dataset spells them; ``glue_metrics`` also accepts "SST-2", "STS-B", "CoLA", ...
GLUE_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "stsb": ("pearson_spearman", "pearson", "spearman"),
    "qqp": ("accuracy", "f1"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
}
#: the one number per task that FREE-Merging's Table 4/15 (and EMR/DARE's GLUE tables) average: Matthews for
#: CoLA, the mean of Pearson and Spearman for STS-B, accuracy for every other task (MRPC/QQP included)
GLUE_PAPER_METRIC: dict[str, str] = {"cola": "matthews", "stsb": "pearson_spearman", "sst2": "accuracy",
                                     "mrpc": "accuracy", "qqp": "accuracy", "mnli": "accuracy",
                                     "qnli": "accuracy", "rte": "accuracy"}


def _is_class(x: Tensor, positive: int) -> Tensor:
    return (x == positive).long()


def positive_class_f1(positive: int = 1) -> Metric:
    """F1 of class ``positive`` (GLUE's MRPC/QQP F1, sklearn's ``f1_score(average="binary")``).

    Predictions of any other class (including the "foreign head" class of ``head_selection: routed``) count
    as negative predictions."""
    return LambdaInputTransformer(BinaryF1Score(), transform_pred=partial(_is_class, positive=positive),
                                  transform_target=partial(_is_class, positive=positive))


def make_metric(name: str, num_classes: int) -> Metric:
    """A metric by name: accuracy; f1 (F1 of class 1: GLUE's MRPC/QQP); macro_f1 (unweighted mean of the
    per-class F1); matthews; pearson, spearman, pearson_spearman (their mean: GLUE's STS-B score) for
    regression heads (one output per sample)."""
    if name in METRIC_NAMES and name not in REGRESSION_METRICS and num_classes < 2:
        raise ConfigError(f"metric {name!r} needs a classification head (≥ 2 classes, got {num_classes}); a "
                          f"regression head (one output) takes {', '.join(REGRESSION_METRICS)}")
    if name == "accuracy":
        return MulticlassAccuracy(num_classes=num_classes, average="micro")
    if name == "f1":
        return positive_class_f1(1)
    if name == "macro_f1":
        return MulticlassF1Score(num_classes=num_classes, average="macro")
    if name == "matthews":
        return MulticlassMatthewsCorrCoef(num_classes=num_classes)
    if name == "pearson":
        return PearsonCorrCoef()
    if name == "spearman":
        return SpearmanCorrCoef()
    if name == "pearson_spearman":
        return (PearsonCorrCoef() + SpearmanCorrCoef()) / 2
    raise ConfigError(f"unknown metric {name!r}; accepted: {', '.join(METRIC_NAMES)}")


def task_metrics(names: list[str], num_classes: int) -> MetricCollection:
    return MetricCollection({n: make_metric(n, num_classes) for n in names})


def glue_task_key(task: str) -> str:
    """``task`` as the HF ``glue`` dataset names it ("SST-2" → "sst2", "STS-B" → "stsb", "CoLA" → "cola")."""
    key = task.lower().replace("-", "").replace("_", "")
    if key not in GLUE_METRICS:
        raise ConfigError(f"{task!r} is not one of the 8 GLUE tasks of FREE-Merging's Table 4; accepted: "
                          f"CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE (any case, with or without '-')")
    return key


def glue_metrics(task: str) -> list[str]:
    """GLUE's metric names for ``task`` (one of the 8 of Table 4), for ``TaskConfig.metrics``."""
    return list(GLUE_METRICS[glue_task_key(task)])


__all__ = ["GLUE_METRICS", "GLUE_PAPER_METRIC", "METRIC_NAMES", "REGRESSION_METRICS", "glue_metrics",
           "glue_task_key", "make_metric", "positive_class_f1", "task_metrics"]
