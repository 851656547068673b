"""Frequency-domain task interference (paper Sec. 4, Fig. 2a, Table 1), streamed key by key from the merge
engine's inputs (docs/semantics.md §10).

``analyze(inputs, ...)`` reads one key's task vectors at a time (``MergeInputs.load``: ``CheckpointInputs``
over lazy tensor sources, or in-memory ``TaskVectorInputs``) and computes:

* the **interference metric** (Table 1): per key, the variance across the K tasks of the amplitude
  ``|F(v_k)|`` at each frequency, averaged over the key's frequencies; keys averaged weighted by numel;
* the same metric on the per-task vectors each merging method adds (``contributions``: TA's v_k, DARE's
  dropped-and-rescaled v_k, TIES' trimmed-and-elected v_k, Breadcrumbs' masked v_k, PCB's score-weighted
  v_k, FR's G(v_k)), computed by each method's own code;
* per FR filter ratio r: the share of task-vector energy below the cutoff (what FR removes: the same D0 and
  mask as the filter) and the metric left after the filter;
* the centred log-power spectra of chosen keys and tasks (the Fig. 2a grid).

Only one key's K tensors (and per-frequency running sums) are held at a time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from freemerge_pl.errors import ConfigError
from freemerge_pl.jobs.analysis.spectrum import (
    AmplitudeVariance,
    centred_log_power,
    energy_below,
    removed_masks,
    spectrum,
)
from freemerge_pl.merging.engine import MergeInputs, preflight
from freemerge_pl.merging.fourier import CUTOFF_MODES, check_filter_ratio, highpass, matrix_shape
from freemerge_pl.merging.method import Context, KeyTensors, MergeMethod, Scan
from freemerge_pl.merging.methods.basic import Breadcrumbs, TaskArithmetic, WeightAveraging
from freemerge_pl.merging.methods.fr import FRMerging
from freemerge_pl.merging.methods.pcb import PCB, _tensor_order_statistics, pcb_beta
from freemerge_pl.merging.methods.ties import DARE, TIES
from freemerge_pl.merging.ops import agreement_mask, elect_sign, task_weights
from freemerge_pl.merging.registry import build_method
from freemerge_pl.merging.topk import magnitude_band_mask, magnitude_trim

#: Table 1's methods, in the paper's order
DEFAULT_METHODS: tuple[str, ...] = ("task_arithmetic", "dare", "ties", "breadcrumbs", "pcb", "fr_merging")
DEFAULT_RATIOS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

METRIC_DEFINITION = (
    "mean variance of frequency-domain amplitude across tasks: per key, A_k = |F(v_k)| with F the orthonormal "
    "2-D DFT of the key's matrix view (shape[0], numel/shape[0]); the population variance over the K tasks of "
    "A_k(f) at every frequency f, averaged over the key's frequencies; keys averaged weighted by numel "
    "(= the mean over every frequency bin of every analysed key). Keys of >= 2 dims unless include_1d.")


# ------------------------------------------------------------------------------- per-task vectors of methods


@dataclass(frozen=True)
class PerTaskTransform:
    """How a method's per-task vectors are obtained: ``fn(method, x, stats, ctx) -> [c_1..c_K]``, whether it
    needs the method's statistics pass, and what the vectors are (for the tables)."""

    fn: Callable[[Any, KeyTensors, Any, Context], Iterable[Tensor]]
    statistics: bool
    description: str


def _identity(method, x: KeyTensors, stats, ctx: Context) -> Iterable[Tensor]:
    return x.vectors()


def _ties(method: TIES, x: KeyTensors, thresholds, ctx: Context) -> list[Tensor]:
    stacked = torch.stack(method.trimmed_vectors(x, ctx))
    if method.density < 1:
        stacked = magnitude_trim(stacked, method.density, thresholds)
    weights = task_weights(method.weights, x.num_tasks) if method.sign_election == "weighted" else None
    return list(stacked * agreement_mask(stacked, elect_sign(stacked, weights)))


def _dare(method: DARE, x: KeyTensors, stats, ctx: Context) -> list[Tensor]:
    if method.merge == "ties":
        return _ties(method._ties, x, stats, ctx)
    return method.dropped(x, ctx)


def _breadcrumbs(method: Breadcrumbs, x: KeyTensors, stats, ctx: Context) -> Iterable[Tensor]:
    return (torch.where(magnitude_band_mask(v, method.drop_top, method.drop_bottom), v, torch.zeros_like(v))
            for v in x.vectors())


def _pcb(method: PCB, x: KeyTensors, stats, ctx: Context) -> list[Tensor]:
    if method.formulation != "paper":
        raise ConfigError(f"method pcb: per-task vectors are defined for formulation='paper' only, got "
                          f"{method.formulation!r}")
    K = x.num_tasks
    flat = x.stacked().reshape(K, -1)
    if stats is None:  # scope="tensor": the method's own per-tensor statistics
        stats = method._statistics(lambda fn: fn(flat), _tensor_order_statistics(flat), K)
    beta = pcb_beta(flat, stats)
    beta = torch.where(beta >= stats.thresholds.to(beta)[:, None], beta, torch.zeros_like(beta))
    total = beta.sum(0)
    weights = torch.where(total > 0, K * beta / torch.where(total > 0, total, torch.ones_like(total)),
                          torch.zeros_like(beta))
    return list((weights * flat).reshape(K, *x.shape))


def _fr(method: FRMerging, x: KeyTensors, stats, ctx: Context) -> Iterable[Tensor]:
    return (highpass(v, method.filter_ratio, cutoff_mode=method.cutoff_mode, filter_1d=method.filter_1d)
            for v in x.vectors())


#: exact classes only: a subclass (FREE-Merging adds experts) may add vectors its parent does not
TRANSFORMS: dict[type, PerTaskTransform] = {
    WeightAveraging: PerTaskTransform(_identity, False, "v_k (the method adds Σ v_k / K)"),
    TaskArithmetic: PerTaskTransform(_identity, False, "v_k (the method adds λ·Σ v_k)"),
    DARE: PerTaskTransform(_dare, True, "dropped and rescaled v_k (DARE.dropped, the merge's seed; "
                                        "merge='ties': then trimmed and elected as TIES)"),
    TIES: PerTaskTransform(_ties, True, "trimmed v_k restricted to the entries agreeing with the elected sign "
                                        "(the method adds their sum / count)"),
    Breadcrumbs: PerTaskTransform(_breadcrumbs, False, "v_k with the top β and bottom γ magnitudes zeroed"),
    PCB: PerTaskTransform(_pcb, True, "K·β̂_k / Σ_j β̂_j ⊙ v_k: the score-weighted vectors whose mean is "
                                      "PCB's merged τ_m (formulation='paper')"),
    FRMerging: PerTaskTransform(_fr, False, "G(v_k): the high-pass-filtered task vector "
                                            "(the method adds s·Σ λ_k G(v_k))"),
}


def per_task_transform(method: MergeMethod) -> PerTaskTransform:
    """The method's per-task transform; a clear error for methods that expose only their merged delta."""
    transform = TRANSFORMS.get(type(method))
    if transform is None:
        accepted = sorted(m.name for m in TRANSFORMS)
        raise ConfigError(f"method {method.name!r}: the interference analysis needs the per-task vectors the "
                          f"method adds, which it does not expose; accepted: {accepted}")
    return transform


def method_context(method: MergeMethod, inputs: MergeInputs, seed: int = 0) -> tuple[Context, Any]:
    """The run's context and statistics as ``engine.execute`` builds them (same seeded generator, the
    statistics pass over every merged key), so per-task vectors match the real merge."""
    generator = None
    if method.random:
        generator = torch.Generator(device=getattr(inputs, "device", None) or "cpu").manual_seed(seed)
    ctx = preflight(method, inputs, generator=generator)
    stats = None
    if per_task_transform(method).statistics:
        stats = method.statistics(Scan(inputs.keys, inputs.load, ctx))
    return ctx, stats


def contributions(method: MergeMethod, x: KeyTensors, stats: Any, ctx: Context) -> Iterable[Tensor]:
    """The per-task vectors ``c_1..c_K`` that ``method`` combines for one key (``per_task_transform``), in
    task order; lazily (one at a time) where the method treats tasks independently."""
    return per_task_transform(method).fn(method, x, stats, ctx)


# ------------------------------------------------------------------------------- the report


@dataclass
class MethodResult:
    name: str
    hyperparameters: dict[str, Any]
    per_task_vectors: str
    metric: float
    change: float  # relative to the task vectors' metric (= task arithmetic's), e.g. −0.24 for −24%
    per_key: dict[str, float] = field(default_factory=dict)


@dataclass
class InterferenceReport:
    """Everything ``analyze`` measured (``to_json``/``to_markdown``; ``spectra`` feed the plots only)."""

    tasks: list[str]
    keys: list[str]
    numel: int
    cutoff_mode: str
    metric: float
    per_key: dict[str, float]
    methods: list[MethodResult]
    ratios: list[float]
    energy_below: list[float]
    energy_below_per_task: dict[str, list[float]]
    metric_after_filter: list[float]
    spectra: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    spectra_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    definition: str = METRIC_DEFINITION

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("spectra")
        out.pop("spectra_shapes")
        out["methods"] = [asdict(m) for m in self.methods]
        out["spectra_keys"] = list(self.spectra)
        return out

    def to_markdown(self, title: str = "Frequency-domain task interference") -> str:
        lines = [f"## {title}", "",
                 (f"{len(self.tasks)} tasks ({', '.join(self.tasks)}); {len(self.keys)} tensors, "
                  f"{self.numel:,} entries; cutoff_mode `{self.cutoff_mode}`."), "",
                 f"Metric: {self.definition}", "",
                 "### Mean variance of frequency-domain amplitude after each method's transform (Table 1)", "",
                 ("Each method at its default hyperparameters unless listed; *change* is relative to the task "
                  "vectors (= task arithmetic, whose per-task vectors are the v_k)."), "",
                 "| method | per-task vectors compared | mean variance of amplitude | change |", "|---|---|---|---|",
                 f"| task vectors | v_k | {self.metric:.4g} | |"]
        for m in self.methods:
            lines.append(f"| {m.name} {_short(m.name, m.hyperparameters)} | {m.per_task_vectors} | {m.metric:.4g} | "
                         f"{100 * m.change:+.1f}% |")
        lines += ["", "### Energy below the cutoff and the metric after the FR filter, per filter ratio", "",
                  ("r: the FR `filter_ratio` (share of the spectrum removed, lowest frequencies first); *energy "
                   "below*: share of Σ_k ||v_k||² in the removed coefficients (what FR-Merging at r removes); "
                   "*metric after filter*: the metric of G_r(v_k) (frequencies below the cutoff have zero "
                   "amplitude)."), "",
                  "| r | energy below cutoff | metric after filter | change |", "|---|---|---|---|"]
        for r, e, m in zip(self.ratios, self.energy_below, self.metric_after_filter):
            change = (m - self.metric) / self.metric if self.metric > 0 else 0.0
            lines.append(f"| {r:g} | {100 * e:.1f}% | {m:.4g} | {100 * change:+.1f}% |")
        return "\n".join(lines) + "\n"


def _short(name: str, params: dict[str, Any]) -> str:
    """``params`` that differ from the method's registered defaults, as ``(k=v, ...)``; '' when none do."""
    from freemerge_pl.merging.registry import get_method

    try:
        defaults = get_method(name).hyperparameters
    except ConfigError:
        defaults = {}
    shown = {k: v for k, v in params.items() if k not in defaults or defaults[k] != v}
    return "(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")" if shown else ""


# ------------------------------------------------------------------------------- the analysis


def select_keys(inputs: MergeInputs, layers: str | None = None, include_1d: bool = False) -> list[str]:
    """The merged keys analysed: ≥2-D (1-D too with ``include_1d``), non-empty, matching ``layers``
    (a regex, ``re.search``)."""
    try:
        pattern = re.compile(layers) if layers else None
    except re.error as err:
        raise ConfigError(f"layers={layers!r} is not a valid regular expression: {err}") from None
    keys = [k for k in inputs.keys if math.prod(inputs.shapes[k]) > 0
            and (len(inputs.shapes[k]) >= 2 or include_1d) and (pattern is None or pattern.search(k))]
    if not keys:
        dims = "" if include_1d else " of ≥ 2 dims"
        raise ConfigError(f"layers={layers!r} selects no merged tensor{dims}; keys: {inputs.keys[:8]}"
                          f"{'...' if len(inputs.keys) > 8 else ''}")
    return keys


def spread(items: Sequence[str], count: int) -> list[str]:
    """``count`` items evenly spaced over ``items`` (first and last included), in order."""
    if count >= len(items):
        return list(items)
    if count <= 1:
        return list(items[:count])
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def _check(ratios: Sequence[float], cutoff_mode: str) -> None:
    if cutoff_mode not in CUTOFF_MODES:
        raise ConfigError(f"cutoff_mode={cutoff_mode!r}; accepted: {list(CUTOFF_MODES)}")
    for r in ratios:
        check_filter_ratio(r)


def _methods(methods: Sequence[str | MergeMethod], method_args: dict[str, dict[str, Any]] | None) -> list[MergeMethod]:
    method_args = dict(method_args or {})
    names = {m for m in methods if isinstance(m, str)}
    unknown = sorted(set(method_args) - names)
    if unknown:
        raise ConfigError(f"method_args for {unknown}, which are not among the methods {sorted(names)}")
    built = [build_method(m, method_args.get(m) if isinstance(m, str) else None) for m in methods]
    for m in built:
        per_task_transform(m)  # every method is checked before anything is read
    return built


def analyze(
    inputs: MergeInputs,
    *,
    names: Sequence[str] | None = None,
    methods: Sequence[str | MergeMethod] = DEFAULT_METHODS,
    method_args: dict[str, dict[str, Any]] | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    layers: str | None = None,
    include_1d: bool = False,
    cutoff_mode: str = "fraction",
    plot_tasks: Sequence[str] | None = None,
    plot_layers: int = 4,
    seed: int = 0,
    progress: Callable[[Sequence[str], str], Any] | None = None,
) -> InterferenceReport:
    """The interference analysis of ``inputs`` (see the module docstring), key by key.

    ``names``: the tasks' names (default ``inputs.names`` or ``task{k}``); ``methods`` (registry names or
    configured ``MergeMethod``s) with ``method_args`` (name → hyperparameters); ``ratios``: FR filter ratios of
    the cutoff curve; ``layers``: regex of keys to analyse; ``plot_tasks`` (default all) × ``plot_layers``
    keys (evenly spaced among the ≥2-D analysed keys) get a display spectrum; ``seed``: random methods' seed
    (the merge's default 0 gives the merge's draws when every key is analysed).
    """
    _check(ratios, cutoff_mode)
    configured = _methods(methods, method_args)
    names = list(names if names is not None else getattr(inputs, "names", None)
                 or [f"task{k}" for k in range(inputs.num_tasks)])
    if len(names) != inputs.num_tasks:
        raise ConfigError(f"{len(names)} task names for {inputs.num_tasks} task vectors")
    plot_tasks = list(plot_tasks) if plot_tasks is not None else names
    unknown = sorted(set(plot_tasks) - set(names))
    if unknown:
        raise ConfigError(f"plot_tasks {unknown} are not among the tasks {names}")
    keys = select_keys(inputs, layers, include_1d)
    shown = set(spread([k for k in keys if len(inputs.shapes[k]) >= 2], plot_layers))
    show = progress or (lambda items, desc: items)

    K, R = inputs.num_tasks, len(ratios)
    energy = torch.zeros(K, dtype=torch.float64)
    low = torch.zeros(K, R, dtype=torch.float64)
    kept_variance = torch.zeros(R, dtype=torch.float64)
    total_variance, numel = 0.0, 0
    per_key: dict[str, float] = {}
    spectra: dict[str, dict[str, Tensor]] = {}
    spectra_shapes: dict[str, tuple[int, ...]] = {}
    for key in show(keys, "spectra"):
        x = inputs.load(key)
        masks = removed_masks(matrix_shape(x.shape), ratios, cutoff_mode)
        acc = AmplitudeVariance()
        for k in range(K):
            amp = spectrum(x.vector(k)).abs()
            acc.add(amp)
            power = amp.double().square_()
            energy[k] += float(power.sum())
            low[k] += torch.tensor(energy_below(power, masks), dtype=torch.float64)
            if key in shown and names[k] in plot_tasks:
                spectra.setdefault(key, {})[names[k]] = centred_log_power(power)
                spectra_shapes[key] = matrix_shape(x.shape)
            del amp, power
        variance = acc.variance()
        per_key[key] = float(variance.mean())
        total_variance += float(variance.sum())
        numel += variance.numel()
        for i, m in enumerate(masks):
            kept_variance[i] += float(variance[~m.to(variance.device)].sum())
        del x, acc, variance
    metric = total_variance / numel
    safe_energy = torch.where(energy > 0, energy, torch.ones_like(energy))
    per_task = (low / safe_energy[:, None]).tolist()
    overall = (low.sum(0) / energy.sum()).tolist() if float(energy.sum()) > 0 else [0.0] * R

    results = [method_result(m, inputs, keys, metric, seed=seed, progress=progress) for m in configured]
    return InterferenceReport(
        tasks=names, keys=keys, numel=numel, cutoff_mode=cutoff_mode, metric=metric, per_key=per_key,
        methods=results, ratios=[float(r) for r in ratios], energy_below=overall,
        energy_below_per_task=dict(zip(names, per_task)),
        metric_after_filter=(kept_variance / numel).tolist(), spectra=spectra,
        spectra_shapes=spectra_shapes)


def interference_metric(method: MergeMethod, inputs: MergeInputs, keys: Sequence[str], *, seed: int = 0,
                        progress: Callable[[Sequence[str], str], Any] | None = None) -> tuple[float, dict[str, float]]:
    """The metric of ``method``'s per-task vectors over ``keys``: (numel-weighted mean, per key)."""
    ctx, stats = method_context(method, inputs, seed)
    show = progress or (lambda items, desc: items)
    total, numel, per_key = 0.0, 0, {}
    for key in show(list(keys), f"interference after {method.name}"):
        x = inputs.load(key)
        acc = AmplitudeVariance()
        for c in contributions(method, x, stats, ctx):
            acc.add(spectrum(c).abs())
        variance = acc.variance()
        per_key[key] = float(variance.mean())
        total += float(variance.sum())
        numel += variance.numel()
        del x, acc, variance
    return total / numel, per_key


def method_result(method: MergeMethod, inputs: MergeInputs, keys: Sequence[str], reference: float, *,
                  seed: int = 0, progress=None) -> MethodResult:
    metric, per_key = interference_metric(method, inputs, keys, seed=seed, progress=progress)
    change = (metric - reference) / reference if reference > 0 else 0.0
    return MethodResult(method.name, method.hyperparameters(), per_task_transform(method).description, metric,
                        change, per_key)
