"""Routers compared on a zoo (issue 28 item 1): routing accuracy and how much of the experts' gain they keep.

    python benchmarks/router_compare.py --zoo vision|text [--blend 'source|head|epochs' [--settings S ...]
                                                                        [--modes M ...]]

For each method setting (FREE defaults, EMR defaults, FREE at the zoo table's tuned values) the merge is built
once and every evaluation sample is scored under every routing choice: the merged backbone alone and each task's
expert (``ok[n, 0]``: backbone, ``ok[n, 1 + k]``: expert k, each with the sample's own head, top-1 weight swap:
the product's path). A router's routed accuracy is then a lookup, so each feature source's features are computed
once per split (cached in ``/tmp/router_compare_<zoo>.pt``) and every head is fitted on them in a second.
Gain kept = (routed − backbone alone) / (oracle − backbone alone), accuracies averaged over tasks; routing
accuracy is the mean over tasks. Levers: feature source (the pre-trained model, candidate-independent: first
blocks or the whole; class token, token mean or both; each merge's own backbone), head, epochs, a fallback to
the merged backbone below a softmax weight and, with ``--blend``, Alg. 1's weights used as weights (run exactly;
results accumulate in ``router_compare_blend{,_text}.json``, which the next run without ``--blend`` tabulates).
Choose on val (tune-val), report test. The headline: the default router (``RouterConfig()``, ``auto``) beside a
logistic-regression probe on the pre-trained model's mean-pooled tokens, trained on the same router split (the
default must not be below it), and the gain it keeps. Writes ``benchmarks/results/router_compare{,_text}.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_table import build

from freemerge_pl.data.text import unpack_text_inputs
from freemerge_pl.io import write_json_atomic, write_text_atomic
from freemerge_pl.lightning.router import SEED, Router, RouterConfig

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {
    "vision": {"FREE defaults": ("free_merging", {}), "EMR defaults": ("emr", {}),
               "FREE tuned": ("free_merging", {"filter_ratio": 0.1, "scaling": 1.0, "expert_scale": 2.0})},
    "text": {"FREE defaults": ("free_merging", {}), "EMR defaults": ("emr", {}),
             "FREE tuned": ("free_merging", {"filter_ratio": 0.1, "scaling": 1.5, "expert_scale": 1.0})},
}


def stacked(dataset, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xs, ys, ts = [], [], []
    for x, y, t in torch.utils.data.DataLoader(dataset, batch_size=batch):
        xs.append(x)
        ys.append(y)
        ts.append(torch.as_tensor(t).long())
    return torch.cat(xs), torch.cat(ys), torch.cat(ts)


def splits(zoo: str):
    """router_tune (router split less tune-val), val (tune-val), router (the zoo config's whole router split), test;
    the task names and the FREE-defaults module the data module came with."""
    module, dm = build("default", "free_merging", zoo=zoo)
    dm.tune_fraction = 0.5
    dm._train.clear()
    dm.setup()
    out = {"router_tune": stacked(dm.router_dataset()),
           "val": stacked(torch.utils.data.ConcatDataset([dm.tune_dataset(t) for t in dm.task_names]))}
    dm.tune_fraction = 0.0
    dm._train.clear()
    dm._val.clear()
    dm.setup()
    out["router"] = stacked(dm.router_dataset())
    out["test"] = stacked(torch.utils.data.ConcatDataset([loader.dataset for loader in dm.test_dataloader()]))
    return out, dm.task_names, module


@torch.no_grad()
def vision_features(backbone, x: torch.Tensor) -> dict[str, torch.Tensor]:
    blocks = backbone.transformer.resblocks
    h = backbone._embeds(x)
    batch_first = getattr(backbone.transformer, "batch_first", True)
    if not batch_first:
        h = h.transpose(0, 1)
    out = {}
    for i, block in enumerate(blocks, 1):
        h = block(h) if batch_first else block(h.transpose(0, 1)).transpose(0, 1)
        if i in (1, 2, 3, len(blocks)):
            tag = str(i) if i < len(blocks) else "L"
            out[f"cls[{tag}]"] = h[:, 0].float()
            out[f"mean[{tag}]"] = h[:, 1:].mean(1).float()
            out[f"cls+mean[{tag}]"] = torch.cat([h[:, 0], h[:, 1:].mean(1)], -1).float()
    out["output"] = backbone(x).float()
    return out


@torch.no_grad()
def text_features(backbone, x: torch.Tensor) -> dict[str, torch.Tensor]:
    encoder = getattr(backbone, backbone.prefix)
    kw = unpack_text_inputs(x)
    res = encoder(**kw, output_hidden_states=True, return_dict=True)
    mask = kw.get("attention_mask", torch.ones(kw["input_ids"].shape)).float()[..., None]
    hs = res.hidden_states
    out = {"output": backbone(x).float()}
    for tag, h in (("3", hs[3]), ("L", hs[-1])):
        out[f"cls[{tag}]"] = h[:, 0].float()
        out[f"mean[{tag}]"] = ((h * mask).sum(1) / mask.sum(1)).float()
        out[f"cls+mean[{tag}]"] = torch.cat([out[f"cls[{tag}]"], out[f"mean[{tag}]"]], -1)
    return out


def features(fn, backbone, x: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
    parts: dict[str, list] = {}
    for s in range(0, len(x), batch):
        for k, v in fn(backbone, x[s:s + batch]).items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in parts.items()}


@torch.no_grad()
def correctness(model, data, batch: int = 256) -> torch.Tensor:
    """``ok[n, 0]``: the merged backbone alone is right on sample n; ``ok[n, 1 + k]``: with task k's expert."""
    x, y, t = data
    K = len(model.task_names)
    ok = torch.zeros(len(y), K + 1, dtype=torch.bool)
    for s in range(0, len(y), batch):
        xb, yb, tb = x[s:s + batch], y[s:s + batch], t[s:s + batch]
        for e in range(K + 1):
            ids = None if e == 0 else torch.full((len(xb), 1), e - 1)
            feats = model.features(xb, ids)
            for task in tb.unique().tolist():
                sel = tb == task
                ok[s:s + batch][sel, e] = model.head_outputs(feats[sel], task).argmax(-1) == yb[sel]
    return ok


def fit_head(train_feats, train_ids, K: int, head: str, epochs: int, lr: float = 1e-3) -> Router:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        router = Router(K, RouterConfig(head=head, epochs=epochs, lr=lr), train_feats.shape[-1])
    return router.fit(train_feats, train_ids)


def task_mean(values: torch.Tensor, t: torch.Tensor, K: int) -> float:
    return float(torch.stack([values[t == k].float().mean() for k in range(K)]).mean())


def score(logits: torch.Tensor, t: torch.Tensor, oks: dict[str, torch.Tensor], K: int,
          threshold: float = 0.0) -> dict:
    probs = logits.softmax(-1)
    conf, routed = probs.max(-1)
    col = torch.where(conf >= threshold, routed + 1, torch.zeros_like(routed))
    out = {"routing": task_mean(routed == t, t, K), "kept": {}, "routed": {}}
    for name, ok in oks.items():
        ar = torch.arange(len(t))
        base, oracle, got = (task_mean(ok[ar, c], t, K) for c in (torch.zeros_like(t), t + 1, col))
        out["routed"][name] = got
        out["kept"][name] = (got - base) / (oracle - base) if oracle != base else float("nan")
    return out


def collect(zoo: str, cache: Path):
    """Every split's task ids, every feature source's features, every setting's ``ok`` matrices and baselines
    (cached in ``cache``: the head fits and the table are then seconds)."""
    if cache.exists():
        return torch.load(cache)
    start = time.perf_counter()
    data, names, first = splits(zoo)
    fn = vision_features if zoo == "vision" else text_features
    feats: dict[str, dict[str, torch.Tensor]] = {}  # source → split → tensor
    oks: dict[str, dict[str, torch.Tensor]] = {"val": {}, "test": {}}
    baselines: dict[str, dict] = {}
    K = len(names)
    for n, (label, (method, margs)) in enumerate(SETTINGS[zoo].items()):
        module = first if n == 0 else build("default", method, margs, zoo=zoo)[0]
        model = module.model
        if n == 0:
            pre = module.adapter.build_backbone()
            pre.load_state_dict(module.adapter.pretrained_state_dict())
            pre.eval()
            for split, (x, _, _) in data.items():
                for k, v in features(fn, pre, x).items():
                    feats.setdefault(f"pretrained {k}", {})[split] = v
        for split, (x, _, _) in data.items():
            for k, v in features(fn, model.backbone, x).items():
                if k in ("output", "cls[3]", "mean[3]"):
                    feats.setdefault(f"merged({label}) {k}", {})[split] = v
        for split in ("val", "test"):
            oks[split][label] = correctness(model, data[split])
            t = data[split][2]
            baselines.setdefault(label, {})[split] = {
                "backbone": task_mean(oks[split][label][:, 0], t, K),
                "oracle": task_mean(oks[split][label][torch.arange(len(t)), t + 1], t, K)}
        print(f"{label}: {baselines[label]} {time.perf_counter() - start:.0f}s", flush=True)
    out = {"ids": {k: v[2] for k, v in data.items()}, "names": names, "feats": feats, "oks": oks,
           "baselines": baselines, "seconds": time.perf_counter() - start}
    torch.save(out, cache)
    return out


HEADS = [("linear", 20), ("mlp", 20), ("linear", 100), ("mlp", 100)]


def fitted(c, source: str, head: str, epochs: int, zoo: str) -> tuple[Router, Router]:
    """The head fitted on router_tune (scored on val) and on the whole router split (scored on test)."""
    K = len(c["names"])
    r1 = fit_head(c["feats"][source]["router_tune"], c["ids"]["router_tune"], K, head, epochs)
    r2 = r1 if zoo == "vision" else fit_head(c["feats"][source]["router"], c["ids"]["router"], K, head, epochs)
    return r1, r2


MODES = ("top-1", "top-1 × its weight", "top-2 blend", "top-1 if weight ≥ 0.5, else top-2 blend")


def routes(logits: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids ``[N, k]`` and their scales ``[N, k]`` under one use of the router's softmax weights (Alg. 1)."""
    p = logits.softmax(-1)
    w1, i1 = p.max(-1, keepdim=True)
    v2, i2 = logits.topk(2, -1)
    w2 = v2.softmax(-1)  # renormalised over the top two (Router.route with top_k 2)
    if mode == "top-1":
        return i1, torch.ones_like(w1)
    if mode == "top-1 × its weight":
        return i1, w1
    if mode == "top-2 blend":
        return i2, w2
    sure = w1[:, 0] >= 0.5
    ids = torch.where(sure[:, None], torch.stack([i1[:, 0], i1[:, 0]], -1), i2)
    return ids, torch.where(sure[:, None], torch.tensor([1.0, 0.0]), w2)


def memoised(model) -> None:
    """Each task module's per-key data (a sparse expert's decoded indices, a dense module's change) computed once
    and kept, so that the one-pass-per-sample blends pay for the backbone, not for decoding: ``apply_`` and
    ``restore_`` are the product's, on the same tensors (checked bit for bit in ``blend``)."""
    from freemerge_pl.merging.base import DenseDeltaTaskModule
    from freemerge_pl.merging.experts import SparseExpert

    def once(f):
        kept: dict = {}

        def per_key(key, *rest):
            if key not in kept:
                kept[key] = f(key, *rest)
            return kept[key]
        return per_key

    for m in model.task_modules:
        for name, cls in (("entries", SparseExpert), ("change", DenseDeltaTaskModule)):
            if isinstance(m, cls) and name not in m.__dict__:
                m.__dict__[name] = once(getattr(m, name))


@torch.no_grad()
def routed_accuracy(model, data, ids: torch.Tensor, weights: torch.Tensor, batch: int = 256) -> float:
    """Task-mean accuracy with each sample's experts ``ids`` at scales ``weights`` (the product's weight swap):
    samples with the same experts and scales share backbone passes over the whole split (continuous weights:
    about one pass a sample)."""
    x, y, t = data
    ok = torch.zeros(len(y), dtype=torch.bool)
    groups: dict[tuple, list[int]] = {}
    for n, (i, w) in enumerate(zip(ids.tolist(), weights.tolist())):
        groups.setdefault((tuple(i), tuple(w)), []).append(n)
    for rows in groups.values():
        for s in range(0, len(rows), batch):
            r = torch.tensor(rows[s:s + batch])
            feats = model.features(x[r], ids[r], weights[r])
            tb, yb = t[r], y[r]
            for task in tb.unique().tolist():
                sel = tb == task
                ok[r[sel]] = model.head_outputs(feats[sel], task).argmax(-1) == yb[sel]
    return task_mean(ok, t, int(t.max()) + 1)


def blend(zoo: str, c, source: str, head: str, epochs: int, settings: list[str], modes: list[str],
          save=lambda out: None) -> dict:
    """Each of ``modes`` run exactly (the weight swap with scaled experts) for each of ``settings``; ``top-1`` is
    the cached lookup (the same weight swap, scored once in ``collect``); ``save(results so far)`` after each."""
    data, _, first = splits(zoo)
    r1, r2 = fitted(c, source, head, epochs, zoo)
    with torch.no_grad():
        logits = {"val": r1(c["feats"][source]["val"]), "test": r2(c["feats"][source]["test"])}
    K = len(c["names"])
    out: dict = {}
    for n, (label, (method, margs)) in enumerate(SETTINGS[zoo].items()):
        if label not in settings:
            continue
        model = (first if n == 0 else build("default", method, margs, zoo=zoo)[0]).model
        x0, probe = data["test"][0][:8], torch.arange(8)[:, None] % K
        plain = model.features(x0, torch.cat([probe, (probe + 1) % K], 1), torch.full((8, 2), 0.5))
        memoised(model)
        fast = model.features(x0, torch.cat([probe, (probe + 1) % K], 1), torch.full((8, 2), 0.5))
        assert torch.equal(plain, fast), "memoised task modules changed the features"
        for split in ("val", "test"):
            base = c["baselines"][label][split]
            for mode in modes:
                start = time.perf_counter()
                if mode == "top-1":
                    acc = score(logits[split], c["ids"][split], {label: c["oks"][split][label]}, K)["routed"][label]
                else:
                    acc = routed_accuracy(model, data[split], *routes(logits[split], mode))
                kept = (acc - base["backbone"]) / (base["oracle"] - base["backbone"])
                top = logits[split].softmax(-1).max(-1)[0]
                out.setdefault(label, {}).setdefault(split, {})[mode] = {
                    "routed": acc, "kept": kept, "oracle": base["oracle"], "backbone": base["backbone"],
                    "unsure_share": float((top < 0.5).float().mean()), "top_weight_median": float(top.median())}
                print(f"{label:14s} {split:4s} {mode:40s} routed {acc:.4f} kept {kept:.2f} "
                      f"({time.perf_counter() - start:.0f}s)", flush=True)
                save(out)
    return out


def valid(source: str, settings: list[str]) -> list[str]:
    """The settings a source's gain kept is meaningful for: a merged backbone's features route only its own merge."""
    return [k for k in settings if not source.startswith("merged(") or source.startswith(f"merged({k})")]


def mean_kept(r: dict, split: str, settings: list[str], scores: dict | None = None) -> float:
    own = valid(r["source"], settings)
    sc = (scores or r)[split]["kept"]
    return sum(sc[k] for k in own) / len(own)


def markdown(report: dict, blend_report: dict | None = None) -> str:
    """The levers table (choose on val, report test) and, when run, the Alg. 1 weight modes."""
    settings = list(report["baselines"])
    b = report["baselines"]
    lines = [f"# Router levers on the {report['zoo']} zoo: routing accuracy and gain kept", "",
             ("Gain kept = (routed − merged backbone alone) / (oracle − merged backbone alone), each the mean over "
              "tasks of the task's accuracy with its own head; routing accuracy: mean over tasks. val = tune-val "
              "(router fitted on the router split less tune-val where tune-val comes out of it), test = the zoo "
              f"config's router split → test split. Sizes: {report['sizes']}."), "",
             "| setting | val backbone | val oracle | test backbone | test oracle |", "|---|---|---|---|---|"]
    for k in settings:
        lines.append(f"| {k} | {100 * b[k]['val']['backbone']:.1f} | {100 * b[k]['val']['oracle']:.1f} | "
                     f"{100 * b[k]['test']['backbone']:.1f} | {100 * b[k]['test']['oracle']:.1f} |")
    head = ["source", "head", "epochs", "val routing", *(f"val kept {k}" for k in settings), "test routing",
            *(f"test kept {k}" for k in settings)]
    lines += ["", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in report["rows"]:
        own = valid(r["source"], settings)
        lines.append("| " + " | ".join([r["source"], r["head"], str(r["epochs"]), f"{100 * r['val']['routing']:.1f}",
                                          *(f"{100 * r['val']['kept'][k]:.0f} %" if k in own else "–"
                                            for k in settings),
                                          f"{100 * r['test']['routing']:.1f}",
                                          *(f"{100 * r['test']['kept'][k]:.0f} %" if k in own else "–"
                                            for k in settings)]) + " |")
    lines += ["", ("Linear probe (logistic regression, standardised features) on pre-trained sources, same router "
                   "split, routing accuracy (mean over tasks):"), "", "| source | val | test |", "|---|---|---|"]
    for source, p in report["probes"].items():
        lines.append(f"| {source} | {100 * p['val']:.1f} | {100 * p['test']:.1f} |")
    lines += ["", ("Fallback to the merged backbone below a softmax weight (gain kept, mean of the settings; rows: "
                   "the best val row per source):"), "", "| source + head | threshold | val kept | test kept |",
              "|---|---|---|---|"]
    best_by_source: dict[str, dict] = {}
    for r in report["rows"]:
        mean_val = mean_kept(r, "val", settings)
        if r["source"] not in best_by_source or mean_val > best_by_source[r["source"]]["_v"]:
            best_by_source[r["source"]] = {**r, "_v": mean_val}
    for source, r in best_by_source.items():
        for th in ("0", *r["fallback"]):
            sc = None if th == "0" else r["fallback"][th]
            lines.append(f"| {source} {r['head']} {r['epochs']} | {th} | "
                         f"{100 * mean_kept(r, 'val', settings, sc):.0f} % | "
                         f"{100 * mean_kept(r, 'test', settings, sc):.0f} % |")
    if blend_report:
        lines += ["", (f"Alg. 1's router weights used as weights, run exactly (the product's weight swap with each "
                       f"expert scaled by its weight; `top-1` is the product's default), default router "
                       f"({blend_report['router']}): gain kept, and routed − oracle on test. Weights: `top-1 × its "
                       f"weight` scales the top expert by its softmax probability; `top-2 blend` applies the two "
                       f"most likely experts with their softmax weights renormalised over the two (`top_k: 2`); the "
                       f"last applies the top expert alone when its probability is ≥ 0.5, else the top-2 blend."), "",
                  "| setting | mode | val kept | test kept | test routed | test routed − oracle |",
                  "|---|---|---|---|---|---|"]
        sure = next((by_split["test"][m] for by_split in blend_report["modes"].values() for m in MODES
                     if "unsure_share" in by_split.get("test", {}).get(m, {})), None)
        if sure:
            lines[-4] += (f" On test the router's top probability has median {sure['top_weight_median']:.3f}; "
                          f"{100 * sure['unsure_share']:.1f} % of samples are below 0.5.")
        modes = blend_report["modes"]
        changes = [100 * (by["test"][m]["routed"] - by["test"]["top-1"]["routed"]) for by in modes.values()
                   for m in MODES[1:] if m in by.get("test", {}) and "top-1" in by["test"]]
        if changes:
            lines[-4] += (f" Against top-1 the other modes change test routed accuracy by {min(changes):+.2f} to "
                          f"{max(changes):+.2f} points ({report['sizes']['test']} test samples); a mode a setting "
                          f"lacks was not run.")
        for k in [k for k in settings if k in modes] + [k for k in modes if k not in settings]:
            by_split = modes[k]
            for mode in [m for m in MODES if m in by_split.get("test", {})]:
                val, test = by_split.get("val", {}).get(mode), by_split["test"][mode]
                val_kept = f"{100 * val['kept']:.0f} %" if val else "–"
                lines.append(f"| {k} | {mode} | {val_kept} | "
                             f"{100 * test['kept']:.0f} % | {100 * test['routed']:.1f} | "
                             f"{100 * (test['routed'] - test['oracle']):+.2f} |")
    return "\n".join(lines) + "\n"


#: the product's routers in the study's feature names: ``auto`` resolved for the zoo's adapter, and the router
#: ``auto`` picked before (issue 28) for comparison
DEFAULT_SOURCE = {"vision": "pretrained cls+mean[L]", "text": "pretrained mean[3]"}
AUTO_RESOLVED = {"vision": "pretrained", "text": "pretrained_backbone"}  # ``auto`` for ZooViT / TextZoo adapters
OLD_SOURCE = {"vision": "cls[3]", "text": "output"}  # of each setting's own merged backbone
PROBE_SOURCE = "pretrained mean[L]"  # the mean-pooled pre-trained features


def headline(c, zoo: str) -> dict:
    """The default router (``RouterConfig()`` on the zoo's adapter: mlp, 20 epochs) against the mean-pool probe
    and the router it replaces: routing accuracy (mean over tasks and pooled), gain kept, routed − oracle."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    K, ids, oks = len(c["names"]), c["ids"], c["oks"]
    config = RouterConfig()
    out: dict = {"default_source": DEFAULT_SOURCE[zoo], "head": config.head, "epochs": config.epochs}
    fs = c["feats"][PROBE_SOURCE]
    sc = StandardScaler().fit(fs["router"].numpy())
    clf = LogisticRegression(max_iter=2000).fit(sc.transform(fs["router"].numpy()), ids["router"].numpy())
    pred = torch.as_tensor(clf.predict(sc.transform(fs["test"].numpy())))
    out["probe_test_routing"] = task_mean(pred == ids["test"], ids["test"], K)
    t = ids["test"]
    for name, source_of in (("default", lambda k: DEFAULT_SOURCE[zoo]),
                            ("old", lambda k: f"merged({k}) {OLD_SOURCE[zoo]}")):
        rows = {}
        for k in c["baselines"]:
            _, router = fitted(c, source_of(k), config.head, config.epochs, zoo)
            with torch.no_grad():
                logits = router(c["feats"][source_of(k)]["test"])
            res = score(logits, t, {k: oks["test"][k]}, K)
            b = c["baselines"][k]["test"]
            rows[k] = {"routing": res["routing"], "routing_pooled": float((logits.argmax(-1) == t).float().mean()),
                       "routed": res["routed"][k], "kept": res["kept"][k], "oracle": b["oracle"],
                       "backbone": b["backbone"], "routed_minus_oracle": res["routed"][k] - b["oracle"]}
        out[name] = rows
    return out


def headline_markdown(h: dict, zoo: str) -> str:
    d, o = h["default"], h["old"]
    first = next(iter(d))
    tuned = "FREE tuned"
    lines = [f"## Default router on the {zoo} zoo (test split)", "",
             (f"routed − oracle (tuned FREE): {100 * d[tuned]['routed_minus_oracle']:+.2f} points; gain kept: "
              f"{100 * d[tuned]['kept']:.0f} %; default router {100 * d[first]['routing']:.1f} % vs mean-pool probe "
              f"{100 * h['probe_test_routing']:.1f} %"), "",
             (f"Default router: `feature_source: auto` → `{AUTO_RESOLVED[zoo]}` ({h['default_source']}), "
              f"{h['head']} head, "
              f"{h['epochs']} epochs, fitted on the zoo config's router split; probe: logistic regression on the "
              f"pre-trained model's mean-pooled tokens ({PROBE_SOURCE}), same split. Routing accuracy: mean over "
              f"tasks, pooled beside it. The router it replaces read each merge's own backbone "
              f"({OLD_SOURCE[zoo]})."), "",
             ("| setting | router | routing (mean over tasks) | routing (pooled) | routed | oracle | backbone alone | "
              "gain kept | routed − oracle |"), "|---|---|---|---|---|---|---|---|---|"]
    for k in d:
        for name, rows in (("default (pretrained)", d), ("before (merged backbone)", o)):
            r = rows[k]
            lines.append(f"| {k} | {name} | {100 * r['routing']:.1f} | {100 * r['routing_pooled']:.1f} | "
                         f"{100 * r['routed']:.1f} | {100 * r['oracle']:.1f} | {100 * r['backbone']:.1f} | "
                         f"{100 * r['kept']:.0f} % | {100 * r['routed_minus_oracle']:+.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=("vision", "text"), default="vision")
    parser.add_argument("--cache", default=None, help="features and ok matrices (default /tmp/router_compare_<zoo>.pt)")
    parser.add_argument("--blend", default=None, help="'source|head|epochs': run MODES exactly for that router")
    parser.add_argument("--settings", nargs="*", default=None, help="with --blend: these settings only")
    parser.add_argument("--modes", nargs="*", default=None, choices=MODES, help="with --blend: these modes only")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the heads are tiny: one thread is faster on a loaded machine
    c = collect(args.zoo, Path(args.cache or f"/tmp/router_compare_{args.zoo}.pt"))
    suffix = "" if args.zoo == "vision" else "_text"
    if args.blend:
        source, head, epochs = args.blend.split("|")
        settings = args.settings or list(SETTINGS[args.zoo])
        path = RESULTS / f"router_compare_blend{suffix}.json"
        held = json.loads(path.read_text()) if path.exists() else {}
        earlier = held.get("modes", {}) if held.get("router") == args.blend else {}

        def save(out: dict) -> None:  # several runs (a setting or mode each) add up
            merged = json.loads(json.dumps(earlier))
            for label, by_split in out.items():
                for split, by_mode in by_split.items():
                    merged.setdefault(label, {}).setdefault(split, {}).update(by_mode)
            write_json_atomic({"router": args.blend, "modes": merged}, path)

        blend(args.zoo, c, source, head, int(epochs), settings, args.modes or list(MODES), save)
        return
    K, ids, oks = len(c["names"]), c["ids"], c["oks"]
    rows = []
    for source in c["feats"]:
        for head, epochs in HEADS:
            row = {"source": source, "head": head, "epochs": epochs}
            r1, r2 = fitted(c, source, head, epochs, args.zoo)
            with torch.no_grad():
                lv, lt = r1(c["feats"][source]["val"]), r2(c["feats"][source]["test"])
            row["val"], row["test"] = score(lv, ids["val"], oks["val"], K), score(lt, ids["test"], oks["test"], K)
            row["fallback"] = {str(th): {"val": score(lv, ids["val"], oks["val"], K, th),
                                         "test": score(lt, ids["test"], oks["test"], K, th)}
                               for th in (0.3, 0.5, 0.7)}
            rows.append(row)
            print(f"{source:34s} {head:6s} {epochs:3d} | val routing {row['val']['routing']:.3f} kept "
                  + " ".join(f"{v:.2f}" for v in row["val"]["kept"].values())
                  + f" | test routing {row['test']['routing']:.3f} kept "
                  + " ".join(f"{v:.2f}" for v in row["test"]["kept"].values()), flush=True)
    # a linear probe (logistic regression to convergence) on each pre-trained source
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    probes = {}
    for source in [s for s in c["feats"] if s.startswith("pretrained ")]:
        fs = c["feats"][source]
        out = {}
        for train, ev in (("router_tune", "val"), ("router", "test")):
            sc = StandardScaler().fit(fs[train].numpy())
            clf = LogisticRegression(max_iter=2000).fit(sc.transform(fs[train].numpy()), ids[train].numpy())
            pred = torch.as_tensor(clf.predict(sc.transform(fs[ev].numpy())))
            out[ev] = task_mean(pred == ids[ev], ids[ev], K)
        probes[source] = out
        print(f"probe {source}: val {out['val']:.3f} test {out['test']:.3f}", flush=True)
    head = headline(c, args.zoo)
    report = {"zoo": args.zoo, "task_names": c["names"], "sizes": {k: len(v) for k, v in ids.items()},
              "headline": head, "baselines": c["baselines"], "rows": rows, "probes": probes}
    write_json_atomic(report, RESULTS / f"router_compare{suffix}.json")
    blend_path = RESULTS / f"router_compare_blend{suffix}.json"
    blend_report = json.loads(blend_path.read_text()) if blend_path.exists() else None
    write_text_atomic(headline_markdown(head, args.zoo) + "\n" + markdown(report, blend_report),
                      RESULTS / f"router_compare{suffix}.md")
    print(headline_markdown(head, args.zoo))


if __name__ == "__main__":
    main()
