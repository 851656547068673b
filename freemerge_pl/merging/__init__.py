"""Pure tensor maths for model merging (torch and the base layer only).

Imports run one way: kernels (``topk``, ``fourier``, ``linalg``, ``ops``) → the method contract (``method``) →
the engine over the ``TensorSource`` protocol (``engine``) and the registry → the methods (``methods/``, one
module per family: ``basic``, ``ties``, ``pcb``, ``tsv``, ``fr``, ``released``, ``emr``, ``twin``,
``data_dependent``; imported by name on first use) → ``merge()``.

One way to run a method: a registered, typed ``MergeMethod`` dataclass through ``merge()`` (checkpoints) or
the engine (``engine.merge_task_vectors`` on task vectors; the streaming merge job)."""

from freemerge_pl.merging.base import MergeResult, TaskModule
from freemerge_pl.merging.experts import SparseExpert
from freemerge_pl.merging.fourier import highpass, highpass_mask
from freemerge_pl.merging.merge import MergeOutput, merge
from freemerge_pl.merging.method import MergeMethod
from freemerge_pl.merging.methods.emr import EMRTaskModule, EMRUnified
from freemerge_pl.merging.methods.fr import energy_lambdas, fr_merge_tensor
from freemerge_pl.merging.methods.twin import LowRankTaskModule
from freemerge_pl.merging.registry import build_method, get_method, list_methods, register
from freemerge_pl.merging.task_vectors import apply_delta, task_vectors, validate_checkpoints

__all__ = [
    "EMRTaskModule",
    "EMRUnified",
    "LowRankTaskModule",
    "MergeMethod",
    "MergeOutput",
    "MergeResult",
    "SparseExpert",
    "TaskModule",
    "apply_delta",
    "build_method",
    "energy_lambdas",
    "fr_merge_tensor",
    "get_method",
    "highpass",
    "highpass_mask",
    "list_methods",
    "merge",
    "register",
    "task_vectors",
    "validate_checkpoints",
]
