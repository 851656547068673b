"""Pure tensor maths for model merging (no Lightning): task vectors, the FR filter, experts, baselines."""

from freemerge_pl.merging.base import MergeResult, TaskModule
from freemerge_pl.merging.emr import EMRTaskModule, EMRUnified
from freemerge_pl.merging.experts import SparseExpert, extract_experts
from freemerge_pl.merging.fourier import highpass, highpass_mask
from freemerge_pl.merging.fr import energy_lambdas, fr_merge_tensor
from freemerge_pl.merging.merge import MergeOutput, merge, save_merge
from freemerge_pl.merging.method import MergeMethod
from freemerge_pl.merging.registry import build_method, get_method, list_methods, register
from freemerge_pl.merging.task_vectors import apply_delta, task_vectors, validate_checkpoints
from freemerge_pl.merging.twin import LowRankTaskModule

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
    "extract_experts",
    "fr_merge_tensor",
    "get_method",
    "highpass",
    "highpass_mask",
    "list_methods",
    "merge",
    "register",
    "save_merge",
    "task_vectors",
    "validate_checkpoints",
]
