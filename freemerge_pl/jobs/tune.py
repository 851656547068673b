"""Choosing merging hyperparameters on the held-out part of the router split — never the test split.

``CandidateMerger`` builds the merge of each candidate with the same engine as ``merge`` and a memo cache
kept across candidates: for FR-/FREE-Merging the λ statistics are computed once, the λ-combined task
vector of each tensor is transformed once (``fourier.Spectrum``), each ``filter_ratio`` costs one inverse
FFT per tensor and ``scaling`` a multiplication; experts are cut once per (density, scope, scale). Every
candidate's settings are checked before any candidate runs (``check_candidates``). ``tune`` evaluates every
candidate with the MergedModule's own validation loop on the tune-val split (``trainer.validate``,
exact under DDP) and returns every candidate's per-task scores and the chosen one: among the candidates whose
score is within the tune-val's standard error of the best (ties, ``choose``), the simplest (``TIE_RULES``).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from freemerge_pl.errors import ConfigError, FreeMergeError
from freemerge_pl.merging.base import MergeResult, StateDict
from freemerge_pl.merging.engine import check_prefilter, prefilter_transform
from freemerge_pl.merging.merge import merge
from freemerge_pl.merging.registry import get_method
from freemerge_pl.progress import Ticker


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
    """Merges candidates ``{hyperparameter: value}`` on top of ``base_args`` through the engine (``merge``),
    with one memo cache per pre-filter ratio so that work shared by candidates is done once."""

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
        self.finetuned = list(finetuned)
        self.names = names
        self.exclude_keys = exclude_keys
        self.fr_filter_ratio = fr_filter_ratio
        self.seed = seed
        self._caches: dict[float, dict] = {}

    def merge(self, params: dict[str, Any]) -> tuple[StateDict, MergeResult]:
        """The merged backbone state dict and the method's result for one candidate."""
        config, fr_filter_ratio = candidate_config(self.method, self.base_args, self.fr_filter_ratio, params)
        out = merge(self.pretrained, self.finetuned, config, names=self.names, exclude_keys=self.exclude_keys,
                    fr_filter_ratio=fr_filter_ratio, seed=self.seed,
                    cache=self._caches.setdefault(fr_filter_ratio, {}))
        return out.state_dict, out.result


def candidate_config(method: str, base_args: dict[str, Any], fr_filter_ratio: float, params: dict[str, Any]):
    """The checked method configuration of one candidate (``base_args`` updated by ``params``) and its
    pre-filter ratio (``params["fr_filter_ratio"]`` when searched)."""
    args = {**base_args, **params}
    fr_filter_ratio = args.pop("fr_filter_ratio", fr_filter_ratio)
    config = get_method(method).build(args)
    check_prefilter(config, fr_filter_ratio)
    prefilter_transform(fr_filter_ratio)
    return config, fr_filter_ratio


def check_candidates(method: str, base_args: dict[str, Any] | None, fr_filter_ratio: float,
                     candidates: list[dict[str, Any]]) -> None:
    """Build every candidate's configuration up front, so a bad value fails before any work, naming it."""
    for i, params in enumerate(candidates):
        try:
            candidate_config(method, dict(base_args or {}), fr_filter_ratio, params)
        except FreeMergeError as err:
            raise ConfigError(f"tune space (--space): candidate {i + 1}/{len(candidates)} {params}: {err}") from err
        except (TypeError, ValueError) as err:  # a value of the wrong kind that a range check tripped over
            raise ConfigError(f"tune space (--space): candidate {i + 1}/{len(candidates)} {params}: "
                              f"{type(err).__name__}: {err}") from err


#: how a tie is broken: the first rule that tells two tied candidates apart decides (the simpler one wins)
TIE_RULES = ("smaller expert storage", "no filter (the smaller filter_ratio + fr_filter_ratio)",
             "more of the method's default values", "grid order")
#: the hyperparameters that filter the task vectors (0: no filter)
FILTER_KEYS = ("filter_ratio", "fr_filter_ratio")
#: metrics that are a share of samples, whose standard error is sqrt(p(1−p)/n)
PROPORTION_METRICS = ("accuracy", "routing_accuracy")


def standard_error(row: dict[str, Any], metric: str, samples: int | None, normalised: bool) -> tuple[float, str]:
    """The tune-val standard error of ``row``'s score and how it was computed (for the report).

    For an accuracy: SE = sqrt(p(1−p)/n), p = the candidate's mean accuracy over tasks, n = the tune-val samples
    summed over tasks (a normalised score's SE is scaled by score/p). Other metrics, or n unknown: 0 (only equal
    scores tie)."""
    if metric not in PROPORTION_METRICS or not samples:
        why = f"metric {metric!r} is not a share of samples" if samples else "the tune-val size is unknown"
        return 0.0, f"no standard error ({why}): only equal scores tie"
    values = [v[metric] for v in row["scores"]["tasks"].values()]
    p = min(1.0, max(0.0, sum(values) / len(values)))
    se = math.sqrt(p * (1 - p) / samples)
    scaled = se * row["score"] / p if normalised and p > 0 else se
    how = f"SE = sqrt(p(1-p)/n) = sqrt({p:.4f}·{1 - p:.4f}/{samples}) = {se:.4f}"
    return scaled, how + (f" (×score/p = {scaled:.4f}: normalised)" if normalised and p > 0 else "")


def simplicity(row: dict[str, Any], order: int, defaults: dict[str, Any], filter_ratio_keeps: bool = False) -> tuple:
    """The sort key of ``TIE_RULES``: expert bytes, filter amount, settings off their default, order
    (``filter_ratio_keeps``: the method's ``filter_ratio`` sizes what its filter keeps, so a larger one filters
    less: the released-code methods)."""
    params = row["params"]
    filtering = sum(float(params.get(k, 0.0)) * (-1 if k == "filter_ratio" and filter_ratio_keeps else 1)
                    for k in FILTER_KEYS)
    off_default = sum(1 for k, v in params.items() if k not in defaults or v != defaults[k])
    return (row.get("task_module_bytes", 0), filtering, off_default, order)


def choose(rows: list[dict[str, Any]], *, samples: int | None = None, metric: str = "accuracy",
           normalised: bool = False, defaults: dict[str, Any] | None = None,
           filter_ratio_keeps: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """The chosen candidate and the tie record: candidates whose score is ≥ best − SE (``standard_error`` of the
    best) tie; among them the simplest by ``TIE_RULES`` is chosen. The record lists the tied candidates, the SE
    and how it was computed, and the rules that chose (``[]``: no tie)."""
    top = max(range(len(rows)), key=lambda i: rows[i]["score"])  # max keeps the first of equal scores
    se, how = standard_error(rows[top], metric, samples, normalised)
    threshold = rows[top]["score"] - se
    tied = [i for i, r in enumerate(rows) if r["score"] >= threshold]
    keys = {i: simplicity(rows[i], i, dict(defaults or {}), filter_ratio_keeps) for i in tied}
    chosen = min(tied, key=keys.__getitem__)
    deciding = {next(j for j, (a, b) in enumerate(zip(keys[chosen], keys[i])) if a != b)
                for i in tied if i != chosen}
    record = {"standard_error": se, "how": how, "threshold": threshold, "best_score": rows[top]["score"],
              "best_index": top, "tied_indices": tied, "tied": [rows[i]["params"] for i in tied],
              "chosen_index": chosen, "rules": [TIE_RULES[j] for j in sorted(deciding)]}
    return rows[chosen], record


def tune(
    candidates: list[dict[str, Any]],
    merger: CandidateMerger,
    evaluate: Callable[[StateDict, MergeResult], dict[str, Any]],
    objective: Callable[[dict[str, Any]], float],
    progress: bool = True,
    **tie_args: Any,
) -> dict[str, Any]:
    """Evaluate every candidate; returns ``{"candidates": [...], "best": {...}, "ties": {...}}``: ``best`` is
    ``choose``'s (``tie_args``: its ``samples``, ``metric``, ``normalised``, ``defaults``; without ``samples``
    only equal scores tie). Each row records its expert storage
    (``task_module_bytes``).

    ``progress``: one log line per candidate (``tune: i/N, elapsed, eta · params → score``). A candidate
    that fails raises a ``ConfigError`` naming it (the settings were checked up front by
    ``check_candidates``; what remains are checks that need the checkpoints' keys, shapes or task count)."""
    rows: list[dict[str, Any]] = []
    ticker = Ticker("tune candidates", len(candidates), interval=0) if progress else None
    for params in candidates:
        start = time.perf_counter()
        try:
            state_dict, result = merger.merge(params)
        except FreeMergeError as err:
            raise ConfigError(f"tune candidate {len(rows) + 1}/{len(candidates)} {params}: {err}") from err
        merge_seconds = time.perf_counter() - start
        scores = evaluate(state_dict, result)
        storage = sum(int(m.nbytes) for m in (result.task_modules or []))
        rows.append({"params": params, "score": objective(scores), "scores": scores, "task_module_bytes": storage,
                     "merge_seconds": merge_seconds, "seconds": time.perf_counter() - start})
        if ticker is not None:
            ticker.update(len(rows), f"{params} → {rows[-1]['score']:.4f}")
    best, ties = choose(rows, **tie_args)
    return {"candidates": rows, "best": best, "ties": ties}


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


def tune_val_record(datamodule) -> dict[str, dict[str, Any]]:
    """Per task, where the tune-val data came from and how many samples it holds, for the tune report:
    ``{"source": "validation split" | "held-out router split" | "router split", "samples": n}`` (``router
    split`` means data the fine-tuned models trained on: scores there overrate settings that recall memorised
    data; a ``held-out router split`` was never fine-tuned on)."""
    sources = datamodule.tune_val_sources
    return {t: {"source": sources[t], "samples": len(datamodule.tune_indices[t])} for t in sources}


#: the default search space per method (used when ``--space`` is not given)
DEFAULT_SPACES: dict[str, dict[str, list[Any]]] = {
    "task_arithmetic": {"scaling": [0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0]},
    "ties": {"density": [0.1, 0.2, 0.3], "scaling": [0.5, 0.7, 1.0]},
    "dare": {"drop_rate": [0.5, 0.7, 0.9], "scaling": [0.2, 0.3, 0.5]},
    "fr_merging": {"filter_ratio": [0.1, 0.3, 0.5, 0.6], "scaling": [1.0, 1.5, 2.0, 2.5, 3.0]},
    "free_merging": {"filter_ratio": [0.1, 0.3, 0.5, 0.6], "scaling": [1.0, 1.5, 2.0, 2.5, 3.0],
                     "expert_scale": [1.0, 2.0]},
}


def check_tune_settings(model, datamodule, space: dict[str, list[Any]] | None, metric: str, search: str,
                        n_trials: int) -> dict[str, list[Any]]:
    """The search space (given or the method's default) after checking every ``tune`` setting that needs
    no data: tune-val split, metric, search, trials, optuna installed."""
    if not datamodule.tune_val_enabled:
        raise ConfigError(f"tune needs a tune-val split: give every task a validation split (data.tasks[*].val_args; "
                          f"missing for {[t.name for t in datamodule.tasks if t.val_args is None]}) or set "
                          f"data.tune_fraction > 0 (e.g. 0.5)")
    space = space or DEFAULT_SPACES.get(model.method)
    if not space:
        raise ConfigError(f"no default tune space for method {model.method!r}: pass --space "
                          f"(known defaults: {sorted(DEFAULT_SPACES)})")
    if search not in ("grid", "optuna"):
        raise ConfigError(f"--search={search!r}; accepted: grid, optuna")
    lacking = [t.name for t in datamodule.tasks if metric not in (*t.metrics, "routing_accuracy")]
    if lacking:
        raise ConfigError(f"--metric={metric!r} is not among the metrics of task(s) {lacking} "
                          f"(data.tasks[*].metrics); accepted: the metrics every task lists, or routing_accuracy")
    if search == "optuna":
        if n_trials < 1:
            raise ConfigError(f"--n_trials={n_trials} must be ≥ 1")
        try:
            import optuna  # noqa: F401
        except ImportError as err:
            raise ConfigError("--search=optuna needs optuna: pip install -e '.[tune]'") from err
    return space


def optuna_search(space, n_trials, merger, evaluate, objective, seed, progress: bool = True,
                  **tie_args: Any) -> dict[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the trial lines below say the same, once
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    rows = []
    ticker = Ticker("tune (optuna)", n_trials, interval=0, log=None if progress else lambda line: None)

    def propose(trial) -> float:
        params = {k: trial.suggest_categorical(k, list(v)) for k, v in space.items()}
        row = tune([params], merger, evaluate, objective, progress=False)["best"]
        rows.append(row)
        ticker.update(len(rows), f"{params} → {row['score']:.4f}", what="tune (optuna): trial")
        return row["score"]

    study.optimize(propose, n_trials=n_trials)
    best, ties = choose(rows, **tie_args)  # "grid order" is the order the trials ran
    return {"candidates": rows, "best": best, "ties": ties}


def tune_markdown(report: dict[str, Any]) -> str:
    """Every candidate's per-task scores as a Markdown table, best score first; tied candidates are marked, the
    chosen one in bold, and a line says how ties were found and which rule chose."""
    order = sorted(range(len(report["candidates"])), key=lambda i: -report["candidates"][i]["score"])
    rows = report["candidates"]
    tasks = list(rows[0]["scores"]["tasks"])
    metric = report["metric"]
    ties = report.get("ties") or {}
    tied, chosen = set(ties.get("tied_indices", [])), ties.get("chosen_index")
    kinds = sorted({v["source"] for v in report.get("tune_val", {}).values()})
    header = (f"method `{report['method']}` · objective: mean {metric}"
              f"{' (normalised)' if report['normalised'] else ''} on tune-val"
              f"{' (' + ', '.join(kinds) + ')' if kinds else ''} · {report['seconds']:.1f}s")
    lines = [header, ""]
    if ties:
        if len(tied) > 1:
            lines.append(f"Ties: {len(tied)} candidates score within one standard error of the best "
                         f"({ties['best_score']:.4f}; {ties['how']}), marked *tie*; the simplest was chosen by "
                         f"{', then '.join(ties['rules'])} (rules in order: {'; '.join(TIE_RULES)}).")
        else:
            lines.append(f"No tie: no other candidate scores within one standard error of the best ({ties['how']}).")
        lines.append("")
    lines += ["| params | score | tie | expert bytes / all tasks | " + " | ".join(tasks) + " |",
              "|---" * (len(tasks) + 4) + "|"]
    for i in order:
        r = rows[i]
        cells = " | ".join(f"{r['scores']['tasks'][t][metric]:.4f}" for t in tasks)
        params = f"**{r['params']}** (chosen)" if i == chosen else str(r["params"])
        mark = "tie" if i in tied and len(tied) > 1 else ""
        lines.append(f"| {params} | {r['score']:.4f} | {mark} | {r.get('task_module_bytes', 0)} | {cells} |")
    return "\n".join(lines) + "\n"
