"""Choosing merging hyperparameters on the held-out part of the router split — never the test split.

``CandidateMerger`` builds the merge of each candidate while reusing work: the task vectors are computed
once; for FR-/FREE-Merging (paper semantics) the λ-combined task vector of each tensor is transformed
once (``fourier.Spectrum``), each ``filter_ratio`` costs one inverse FFT per tensor and ``scaling`` is a
multiplication; experts are extracted once per (density, scope, scale). ``tune`` evaluates every
candidate with the MergedModule's own validation loop on the tune-val split (``trainer.validate``,
exact under DDP) and returns every candidate's per-task scores and the best one.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from freemerge_pl.errors import ConfigError
from freemerge_pl.merging.base import MergeResult, StateDict
from freemerge_pl.merging.experts import extract_experts
from freemerge_pl.merging.fourier import Spectrum
from freemerge_pl.merging.fr import energy_lambdas, fr_combine
from freemerge_pl.merging.merge import _cast_expert_values, prefilter, run_method
from freemerge_pl.merging.registry import get_method
from freemerge_pl.merging.task_vectors import apply_delta, task_vectors

FR_METHODS = ("fr_merging", "free_merging")


def grid_candidates(space: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the listed values (in the order the keys are given)."""
    if not space:
        return [{}]
    for k, values in space.items():
        if not isinstance(values, (list, tuple)) or len(values) == 0:
            raise ConfigError(f"tune space {k!r} must be a non-empty list of values, got {values!r}")
    keys = list(space)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(space[k] for k in keys))]


class CandidateMerger:
    """Merges candidates ``{hyperparameter: value}`` on top of ``base_args`` with shared work."""

    def __init__(
        self,
        pretrained: StateDict,
        finetuned: Sequence[StateDict],
        method: str,
        base_args: dict[str, Any] | None = None,
        *,
        names: Sequence[str] | None = None,
        exclude_keys: Sequence[str] | None = None,
        fr_filter_ratio: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.spec = get_method(method)
        self.method = method
        self.base_args = dict(base_args or {})
        self.pretrained = pretrained
        self.fr_filter_ratio = fr_filter_ratio
        self.seed = seed
        self.raw = task_vectors(pretrained, finetuned, names, exclude_keys)
        self.keys = list(self.raw[0])
        self._prefiltered: dict[float, list[StateDict]] = {}
        self._lambdas: dict[str, Any] = {}
        self._spectra: dict[tuple, Spectrum] = {}
        self._filtered: dict[tuple, Tensor] = {}
        self._experts: dict[tuple, tuple] = {}

    def _tvs(self, fr_filter_ratio: float) -> list[StateDict]:
        if fr_filter_ratio not in self._prefiltered:
            self._prefiltered[fr_filter_ratio] = prefilter(self.raw, fr_filter_ratio)
        return self._prefiltered[fr_filter_ratio]

    def _fast_path(self, args: dict[str, Any], fr_filter_ratio: float) -> bool:
        return (self.method in FR_METHODS and args.get("semantics", "paper") == "paper"
                and fr_filter_ratio == 0)

    def merge(self, params: dict[str, Any]) -> tuple[StateDict, MergeResult]:
        """The merged backbone state dict and the method's result for one candidate."""
        args = {**self.base_args, **params}
        fr_filter_ratio = args.pop("fr_filter_ratio", self.fr_filter_ratio)
        self.spec.validate(args)
        if self._fast_path(args, fr_filter_ratio):
            result = self._fr(args)
        else:
            result = run_method(self.method, self._tvs(fr_filter_ratio), self.pretrained, seed=self.seed, **args)
        return apply_delta(self.pretrained, result.delta), result

    def _fr(self, args: dict[str, Any]) -> MergeResult:
        full = {**self.spec.hyperparameters, **args}
        ratio = 0.3 if full["filter_ratio"] is None else full["filter_ratio"]
        scaling = 1.0 if full["scaling"] is None else full["scaling"]
        scope = full["lambda_scope"]
        if scope not in self._lambdas:
            self._lambdas[scope] = energy_lambdas(self.raw, self.keys, scope)
        lambdas = self._lambdas[scope]
        delta = {}
        for key in self.keys:
            cache_key = (scope, full["cutoff_mode"], full["filter_1d"], key)
            if cache_key not in self._spectra:
                lam = lambdas[key] if isinstance(lambdas, dict) else lambdas
                combined = fr_combine([tv[key] for tv in self.raw], lam)
                self._spectra[cache_key] = Spectrum(combined, cutoff_mode=full["cutoff_mode"],
                                                    filter_1d=full["filter_1d"])
            if (cache_key, ratio) not in self._filtered:
                self._filtered[cache_key, ratio] = self._spectra[cache_key].highpass(ratio)
            delta[key] = scaling * self._filtered[cache_key, ratio]
        info: dict[str, Any] = {}
        if self.method == "fr_merging":
            return MergeResult(delta, info=info)
        expert_key = (scope, full["expert_density"], full["expert_scope"], full["expert_scale"],
                      full["expert_dtype"])
        if expert_key not in self._experts:
            experts, mu = extract_experts(
                self.raw, lambdas, expert_density=full["expert_density"], expert_scope=full["expert_scope"],
                expert_scale=full["expert_scale"], value_dtype=getattr(torch, full["expert_dtype"] or "float32"),
                keys=self.keys)
            if full["expert_dtype"] is None:
                _cast_expert_values(experts, self.pretrained)
            self._experts[expert_key] = (experts, mu)
        experts, _ = self._experts[expert_key]
        return MergeResult(delta, experts, info=info)


def tune(
    candidates: list[dict[str, Any]],
    merger: CandidateMerger,
    evaluate: Callable[[StateDict, MergeResult], dict[str, Any]],
    objective: Callable[[dict[str, Any]], float],
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate every candidate; returns ``{"candidates": [...], "best": {...}}`` (ties: the first)."""
    from tqdm.auto import tqdm

    rows = []
    for params in tqdm(candidates, desc="tune", disable=not progress):
        start = time.perf_counter()
        state_dict, result = merger.merge(params)
        merge_seconds = time.perf_counter() - start
        scores = evaluate(state_dict, result)
        rows.append({"params": params, "score": objective(scores), "scores": scores,
                     "merge_seconds": merge_seconds, "seconds": time.perf_counter() - start})
    best = max(rows, key=lambda r: r["score"])  # max keeps the first of equal scores
    return {"candidates": rows, "best": best}


def mean_objective(metric: str = "accuracy", individual: dict[str, float] | None = None
                   ) -> Callable[[dict[str, Any]], float]:
    """Mean over tasks of ``metric`` (divided per task by ``individual[task]`` when given: normalised)."""

    def score(results: dict[str, Any]) -> float:
        values = []
        for task, row in results["tasks"].items():
            v = row[metric]
            values.append(v / individual[task] if individual else v)
        return float(sum(values) / len(values))

    return score
