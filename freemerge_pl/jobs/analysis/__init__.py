"""Frequency-domain interference analysis of task vectors (paper Sec. 4, Fig. 2a, Table 1; semantics §10):
amplitude spectra, the mean variance of amplitude across tasks, the same after each merging method's
per-task transform, and the energy below each FR cutoff, streamed key by key from the engine's inputs.
Plots (``freemerge_pl.jobs.analysis.plots``) need matplotlib (the ``plots`` extra)."""

from freemerge_pl.jobs.analysis.interference import (
    DEFAULT_METHODS,
    DEFAULT_RATIOS,
    METRIC_DEFINITION,
    InterferenceReport,
    MethodResult,
    analyze,
    contributions,
    interference_metric,
    method_context,
    per_task_transform,
)
from freemerge_pl.jobs.analysis.run import adapter_inputs, analyze_adapter, checkpoint_inputs, write_outputs
from freemerge_pl.jobs.analysis.spectrum import AmplitudeVariance, amplitude, log_power, spectrum

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_RATIOS",
    "METRIC_DEFINITION",
    "AmplitudeVariance",
    "InterferenceReport",
    "MethodResult",
    "adapter_inputs",
    "amplitude",
    "analyze",
    "analyze_adapter",
    "checkpoint_inputs",
    "contributions",
    "interference_metric",
    "log_power",
    "method_context",
    "per_task_transform",
    "spectrum",
    "write_outputs",
]
