"""Cost-free baselines: hand-worked examples, naive float64 loop references on random tensors, properties,
and one registry-wide contract run through ``merge``."""

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from freemerge_pl.errors import ConfigError, FreeMergeError, HyperparameterError
from freemerge_pl.merging import get_method, list_methods, merge
from freemerge_pl.merging.engine import merge_task_vectors
from freemerge_pl.merging.merge import prefilter
from freemerge_pl.merging.methods.basic import Breadcrumbs, TaskArithmetic, WeightAveraging
from freemerge_pl.merging.methods.emr import EMR, EMRTaskModule
from freemerge_pl.merging.methods.pcb import PCB
from freemerge_pl.merging.methods.ties import DARE, DELLA, TIES
from freemerge_pl.merging.methods.tsv import TSV
from freemerge_pl.merging.methods.twin import LowRankTaskModule, Twin
from freemerge_pl.merging.ops import magprune_drop_probabilities, packbits, unpackbits

F64 = torch.float64


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def close(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual.double(), torch.as_tensor(expected, dtype=F64), rtol=rtol, atol=atol)


def random_tvs(K=3, shapes=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"w": (5, 4), "b": (6,)}
    return [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(K)]


# ---------------------------------------------------------------- naive float64 loop references

def flat64(tv):
    return {k: v.double().reshape(-1).tolist() for k, v in tv.items()}


def kth_largest(values, density):
    mags = sorted((abs(x) for x in values), reverse=True)
    return mags[max(1, math.ceil(density * len(mags) - 1e-9)) - 1]


def ref_elect_merge(columns, weights, convention):
    """TIES elect + disjoint merge of one entry's K values, by plain loops."""
    total = sum(columns) if convention == "unweighted" else sum(w * x for w, x in zip(weights, columns))
    sign = 1.0 if total >= 0 else -1.0
    agree = [k for k, x in enumerate(columns) if x * sign > 0]
    num = sum(weights[k] * columns[k] for k in agree)
    den = len(agree) if convention == "unweighted" else sum(weights[k] for k in agree)
    return num / den if den else 0.0


def ref_ties(tvs, density, scope, convention="unweighted", weights=None, scaling=1.0):
    K, keys = len(tvs), list(tvs[0])
    w = weights or [1.0] * K
    flats = [flat64(tv) for tv in tvs]
    trimmed = []
    for f in flats:
        if scope == "model":
            thr = kth_largest([x for key in keys for x in f[key]], density)
            thrs = {key: thr for key in keys}
        else:
            thrs = {key: kth_largest(f[key], density) for key in keys}
        trimmed.append({key: [x if abs(x) >= thrs[key] else 0.0 for x in f[key]] for key in keys})
    out = {}
    for key in keys:
        vals = [scaling * ref_elect_merge([tr[key][i] for tr in trimmed], w, convention)
                for i in range(len(flats[0][key]))]
        out[key] = torch.tensor(vals, dtype=F64).reshape(tvs[0][key].shape)
    return out


def ref_dare_ta(tvs, drop_rate, rescale, scaling, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in tvs[0]:
        total = [0.0] * tvs[0][key].numel()
        for tv in tvs:
            draws = torch.rand(tv[key].shape, generator=g).reshape(-1).tolist()
            for i, x in enumerate(tv[key].double().reshape(-1).tolist()):
                if draws[i] >= drop_rate:
                    total[i] += x / (1 - drop_rate) if rescale else x
        out[key] = torch.tensor([scaling * x for x in total], dtype=F64).reshape(tvs[0][key].shape)
    return out


def ref_breadcrumbs(tvs, drop_top, drop_bottom, scaling):
    out = {}
    for key in tvs[0]:
        total = [0.0] * tvs[0][key].numel()
        for tv in tvs:
            vals = tv[key].double().reshape(-1).tolist()
            n = len(vals)
            order = sorted(range(n), key=lambda i: abs(vals[i]))
            for i in order[int(drop_bottom * n + 1e-9):n - int(drop_top * n + 1e-9)]:
                total[i] += vals[i]
        out[key] = torch.tensor([scaling * x for x in total], dtype=F64).reshape(tvs[0][key].shape)
    return out


def ref_della(tvs, drop_rate, epsilon, scaling, seed):
    g = torch.Generator().manual_seed(seed)
    K = len(tvs)
    out = {}
    for key in tvs[0]:
        shape = tvs[0][key].shape
        rows = shape[0] if len(shape) >= 2 else 1
        pruned = []
        for tv in tvs:
            draws = torch.rand(shape, generator=g).reshape(-1).tolist()
            vals = tv[key].double().reshape(-1).tolist()
            cols = len(vals) // rows
            kept = [0.0] * len(vals)
            for r in range(rows):
                row = list(range(r * cols, (r + 1) * cols))
                for rank, i in enumerate(sorted(row, key=lambda i: abs(vals[i]))):
                    p = drop_rate + epsilon / 2 - epsilon * rank / (cols - 1)
                    if draws[i] >= p:
                        kept[i] = vals[i] / (1 - p)
            pruned.append(kept)
        vals = [scaling * ref_elect_merge([pruned[k][i] for k in range(K)], [1.0] * K, "unweighted")
                for i in range(len(pruned[0]))]
        out[key] = torch.tensor(vals, dtype=F64).reshape(shape)
    return out


def minmax(xs):
    lo, hi = min(xs), max(xs)
    return [(x - lo) / (hi - lo) if hi > lo else 0.0 for x in xs]


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [x / sum(e) for x in e]


def ref_pcb_paper(rows, density):
    """PCB Eq. 2-6 on K lists of D floats."""
    K, D = len(rows), len(rows[0])
    betas = []
    for i in range(K):
        intra = softmax([K * x for x in minmax([v * v for v in rows[i]])])
        inter = [0.0] * D
        for j in range(K):
            s = softmax(minmax([a * b for a, b in zip(rows[i], rows[j])]))
            inter = [a + b for a, b in zip(inter, s)]
        beta = [a * b for a, b in zip(intra, inter)]
        thr = sorted(beta, reverse=True)[math.ceil(density * D - 1e-9) - 1]
        betas.append([b if b >= thr else 0.0 for b in beta])
    out = []
    for d in range(D):
        den = sum(betas[i][d] for i in range(K))
        out.append(sum(betas[i][d] * rows[i][d] for i in range(K)) / den if den > 0 else 0.0)
    return out


def ref_pcb_released(rows, density, clamp_ratio=1e-4):
    """A transcription of ``PCB_merge`` in the authors' pcb-merging.py, by loops."""
    K, D = len(rows), len(rows[0])
    clamped, scales = [], []
    for i in range(K):
        mags = [abs(x) for x in rows[i]]
        s = sorted(mags)
        lo, hi = s[int(D * clamp_ratio)], s[int(D * (1 - clamp_ratio) - 1)]
        cm = [min(max(x, lo), hi) for x in mags]
        clamped.append([math.copysign(c, x) if x != 0 else 0.0 for c, x in zip(cm, rows[i])])
        intra = [math.exp(K * x * x) for x in minmax(cm)]
        col_sums = [sum(rows[j][d] for j in range(K)) for d in range(D)]
        score = [a * math.tanh(x * c) for a, x, c in zip(intra, rows[i], col_sums)]
        floor = sorted(score)[int(D * (1 - density))]
        scales.append(minmax([max(x, floor) for x in score]))
    return [sum(clamped[i][d] * scales[i][d] for i in range(K))
            / max(sum(scales[i][d] for i in range(K)), 1e-12) for d in range(D)]


def ref_tsv(mats, rank):
    us, ss, vs = [], [], []
    for m in mats:
        u, s, vh = np.linalg.svd(np.asarray(m, dtype=np.float64), full_matrices=False)
        us.append(u[:, :rank])
        ss.append(s[:rank])
        vs.append(vh[:rank])
    u, s, v = np.concatenate(us, 1), np.concatenate(ss), np.concatenate(vs, 0)
    pu, _, qu = np.linalg.svd(u, full_matrices=False)
    pv, _, qv = np.linalg.svd(v, full_matrices=False)
    return (pu @ qu) @ np.diag(s) @ (pv @ qv)


def ref_emr(tvs):
    keys, K = list(tvs[0]), len(tvs)
    flats = [flat64(tv) for tv in tvs]
    tau, masks = {}, {key: [] for key in keys}
    for key in keys:
        n = len(flats[0][key])
        flag = []
        for i in range(n):
            s = sum(f[key][i] for f in flats)
            flag.append((s > 0) - (s < 0))
        for f in flats:
            masks[key].append([f[key][i] * flag[i] > 0 for i in range(n)])
        tau[key] = [flag[i] * max([abs(f[key][i]) if masks[key][k][i] else 0.0 for k, f in enumerate(flats)])
                    for i in range(n)]
    rescalers = []
    for k in range(K):
        num = sum(sum(abs(x) for x in flats[k][key]) / len(flats[k][key]) for key in keys)
        den = sum(sum(abs(tau[key][i]) for i in range(len(tau[key])) if masks[key][k][i]) / len(tau[key])
                  for key in keys)
        rescalers.append(num / den if den else 0.0)
    return tau, masks, rescalers


# ---------------------------------------------------------------- weight averaging / task arithmetic

def test_weight_averaging_and_task_arithmetic_hand_worked():
    tvs = [{"a": t(1.0, 2.0)}, {"a": t(3.0, -2.0)}]
    close(merge_task_vectors(WeightAveraging(), tvs).delta["a"], [2.0, 0.0])  # ((1+3)/2, (2-2)/2)
    close(merge_task_vectors(TaskArithmetic(scaling=0.5), tvs).delta["a"], [2.0, 0.0])  # 0.5·(4, 0)
    close(merge_task_vectors(TaskArithmetic(), tvs).delta["a"], [1.2, 0.0])  # default λ = 0.3: 0.3·(4, 0)


def test_weight_averaging_equals_task_arithmetic_with_one_over_k():
    tvs = random_tvs(K=4)
    wa = merge_task_vectors(WeightAveraging(), tvs).delta
    ta = merge_task_vectors(TaskArithmetic(scaling=0.25), tvs).delta
    for key in wa:
        torch.testing.assert_close(wa[key], ta[key], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- TIES

def test_ties_hand_worked_both_sign_conventions():
    # density 0.5 of 4 entries keeps 2 per task: v1 → [4, 0, 2, 0]; v2 → [-3, -6, 0, 0].
    tvs = [{"a": t(4.0, -1.0, 2.0, 0.5)}, {"a": t(-3.0, -6.0, 1.0, 0.2)}]
    # Paper (w = 1): Σ = [1, -6, 2, 0] → signs [+, -, +, +]; agreeing means: [4/1, -6/1, 2/1, 0].
    close(merge_task_vectors(TIES(density=0.5), tvs).delta["a"], [4.0, -6.0, 2.0, 0.0])
    # Unweighted election, w = (1, 3): same signs; numerator weighted, divided by the count:
    # [1·4/1, 3·(-6)/1, 1·2/1, 0].
    close(merge_task_vectors(TIES(density=0.5, weights=[1.0, 3.0]), tvs).delta["a"], [4.0, -18.0, 2.0, 0.0])
    # Weighted election (mergekit), w = (1, 3): Σ w v = [4-9, -18, 2, 0] → signs [-, -, +, +];
    # [3·(-3)/3, 3·(-6)/3, 1·2/1, 0].
    close(merge_task_vectors(TIES(density=0.5, weights=[1.0, 3.0], sign_election="weighted"), tvs).delta["a"],
          [-3.0, -6.0, 2.0, 0.0])
    # Scaling λ multiplies the merged vector.
    close(merge_task_vectors(TIES(density=0.5, scaling=0.5), tvs).delta["a"], [2.0, -3.0, 1.0, 0.0])


def test_ties_hand_worked_trim_scopes():
    # One task: the merge is the trimmed vector itself. Model scope keeps the top 3 of 6 magnitudes
    # {4, 1, 2, 0.5, 0.3, 0.1} (threshold 1); tensor scope keeps the top 2 of a and the top 1 of b.
    tvs = [{"a": t(4.0, -1.0, 2.0, 0.5), "b": t(0.3, 0.1)}]
    model = merge_task_vectors(TIES(density=0.5, trim_scope="model"), tvs).delta
    close(model["a"], [4.0, -1.0, 2.0, 0.0])
    close(model["b"], [0.0, 0.0])
    tensor = merge_task_vectors(TIES(density=0.5, trim_scope="tensor"), tvs).delta
    close(tensor["a"], [4.0, 0.0, 2.0, 0.0])
    close(tensor["b"], [0.3, 0.0])


@pytest.mark.parametrize("scope", ["model", "tensor"])
@pytest.mark.parametrize("convention", ["unweighted", "weighted"])
def test_ties_matches_loop_reference(scope, convention):
    tvs = random_tvs(K=4, shapes={"w": (6, 5), "b": (7,), "s": ()}, seed=3)
    weights = [0.5, 1.0, 2.0, 1.5]
    method = TIES(density=0.3, trim_scope=scope, sign_election=convention, weights=weights, scaling=0.7)
    got = merge_task_vectors(method, tvs).delta
    want = ref_ties(tvs, 0.3, scope, convention, weights, 0.7)
    for key in want:
        close(got[key], want[key])


def test_ties_density_one_all_agreeing_is_the_mean():
    tvs = [{k: v.abs() for k, v in tv.items()} for tv in random_tvs(K=3)]
    got = merge_task_vectors(TIES(density=1.0), tvs).delta
    mean = merge_task_vectors(WeightAveraging(), tvs).delta
    for key in mean:
        torch.testing.assert_close(got[key], mean[key], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- DARE

def test_dare_reproducible_under_seed():
    pre = {"w": torch.zeros(8, 8)}
    fts = [{"w": torch.randn(8, 8)} for _ in range(3)]
    a = merge(pre, fts, "dare", seed=5).state_dict["w"]
    b = merge(pre, fts, "dare", seed=5).state_dict["w"]
    c = merge(pre, fts, "dare", seed=6).state_dict["w"]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dare_rescale_on_and_off():
    # All-ones task vector, p = 0.5: survivors are 1/(1-0.5) = 2 when rescaled, 1 otherwise; the same
    # draws (same generator seed) drop the same entries.
    tvs = [{"a": torch.ones(400)}]
    on = merge_task_vectors(DARE(drop_rate=0.5, scaling=1.0), tvs,
                            generator=torch.Generator().manual_seed(1)).delta["a"]
    off = merge_task_vectors(DARE(drop_rate=0.5, rescale=False, scaling=1.0), tvs,
                             generator=torch.Generator().manual_seed(1)).delta["a"]
    assert set(on.unique().tolist()) == {0.0, 2.0}
    assert set(off.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(on, 2 * off)
    assert 120 < int((on == 0).sum()) < 280


def test_dare_zero_drop_is_task_arithmetic_and_ties():
    tvs = random_tvs()
    ta = merge_task_vectors(TaskArithmetic(scaling=0.3), tvs).delta
    got = merge_task_vectors(DARE(drop_rate=0.0), tvs).delta
    for key in ta:
        torch.testing.assert_close(got[key], ta[key])
    got_ties = merge_task_vectors(DARE(drop_rate=0.0, merge="ties", ties_density=0.4, trim_scope="tensor",
                                       scaling=1.0), tvs).delta
    want = merge_task_vectors(TIES(density=0.4, trim_scope="tensor"), tvs).delta
    for key in want:
        torch.testing.assert_close(got_ties[key], want[key])


@pytest.mark.parametrize("rescale", [True, False])
def test_dare_matches_loop_reference(rescale):
    tvs = random_tvs(K=3, shapes={"w": (4, 6), "b": (5,)}, seed=7)
    got = merge_task_vectors(DARE(drop_rate=0.6, rescale=rescale, scaling=0.4), tvs,
                             generator=torch.Generator().manual_seed(11))
    want = ref_dare_ta(tvs, 0.6, rescale, 0.4, seed=11)
    for key in want:
        close(got.delta[key], want[key])


def test_dare_ties_uses_ties_conventions():
    # p = 0: DARE+TIES is TIES on the raw vectors, both sign conventions.
    tvs = [{"a": t(4.0, -1.0, 2.0, 0.5)}, {"a": t(-3.0, -6.0, 1.0, 0.2)}]
    method = DARE(drop_rate=0.0, merge="ties", ties_density=0.5, weights=[1.0, 3.0], sign_election="weighted",
                  scaling=1.0)
    got = merge_task_vectors(method, tvs).delta["a"]
    close(got, [-3.0, -6.0, 2.0, 0.0])  # as in test_ties_hand_worked_both_sign_conventions


# ---------------------------------------------------------------- Breadcrumbs

def test_breadcrumbs_hand_worked():
    # n = 10, β = 0.1 drops the 1 largest |v|, γ = 0.5 drops the 5 smallest; the middle 4 stay.
    v1 = t(0.5, -0.9, 0.1, 0.7, -0.3, 0.2, 1.0, -0.4, 0.8, 0.6)  # keeps -0.9, 0.7, 0.8, 0.6
    v2 = t(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # keeps 0.6, 0.7, 0.8, 0.9
    method = Breadcrumbs(drop_top=0.1, drop_bottom=0.5, scaling=0.5)
    got = merge_task_vectors(method, [{"a": v1}, {"a": v2}]).delta["a"]
    # 0.5 · [0, -0.9, 0, 0.7, 0, 0.6, 0.7, 0.8, 0.8+0.9, 0.6]
    close(got, [0.0, -0.45, 0.0, 0.35, 0.0, 0.3, 0.35, 0.4, 0.85, 0.3])


def test_breadcrumbs_matches_loop_reference():
    tvs = random_tvs(K=3, shapes={"w": (10, 20), "b": (30,)}, seed=2)
    got = merge_task_vectors(Breadcrumbs(drop_top=0.05, drop_bottom=0.6, scaling=0.3), tvs).delta
    want = ref_breadcrumbs(tvs, 0.05, 0.6, 0.3)
    for key in want:
        close(got[key], want[key])


# ---------------------------------------------------------------- DELLA

def test_della_drop_probabilities_hand_worked():
    # p = 0.5, ε = 0.2: p_i runs from 0.6 (smallest |v| of the row) to 0.4 (largest).
    v = t(0.1, -0.5, 0.3)  # ranks 0, 2, 1 → fractions 0, 1, 0.5
    close(magprune_drop_probabilities(v, 0.5, 0.2), [0.6, 0.4, 0.5])
    m = torch.tensor([[0.1, -0.5, 0.3], [3.0, 2.0, 1.0]])  # rows ranked separately
    close(magprune_drop_probabilities(m, 0.5, 0.2), [[0.6, 0.4, 0.5], [0.4, 0.5, 0.6]])


def test_della_without_drop_is_elect_and_disjoint_mean():
    # p = ε = 0 keeps everything: Σ = [4, -1] → signs [+, -]; means [(1+3)/2, -2/1].
    tvs = [{"a": t(1.0, -2.0)}, {"a": t(3.0, 1.0)}]
    close(merge_task_vectors(DELLA(drop_rate=0.0, epsilon=0.0, scaling=1.0), tvs).delta["a"], [2.0, -2.0])


def test_della_matches_loop_reference_and_seed():
    tvs = random_tvs(K=3, shapes={"w": (4, 7), "b": (9,)}, seed=4)
    def run(seed):
        return merge_task_vectors(DELLA(drop_rate=0.5, epsilon=0.3, scaling=0.9), tvs,
                                  generator=torch.Generator().manual_seed(seed)).delta

    got = run(3)
    want = ref_della(tvs, 0.5, 0.3, 0.9, seed=3)
    for key in want:
        close(got[key], want[key])
    again, other = run(3), run(4)
    assert torch.equal(got["w"], again["w"]) and not torch.equal(got["w"], other["w"])


def test_della_magprune_is_unbiased():
    from freemerge_pl.merging.ops import magprune

    v = torch.linspace(-1, 1, 20)
    g = torch.Generator().manual_seed(0)
    mean = torch.stack([magprune(v, 0.5, 0.4, g) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, v, atol=0.1, rtol=0)


# ---------------------------------------------------------------- PCB

def test_pcb_hand_worked():
    # K = 2 (N = 2), D = 2: τ1 = [2, 0], τ2 = [1, 1].
    e = math.e
    # Task 1: Norm(τ1²) = [1, 0] → intra = softmax([2, 0]); Norm(τ1τ1) = Norm(τ1τ2) = [1, 0]
    # → inter = 2·softmax([1, 0]).
    b1 = [e**2 / (e**2 + 1) * 2 * e / (e + 1), 1 / (e**2 + 1) * 2 / (e + 1)]
    # Task 2: Norm(τ2²) is constant → 0 → intra = [1/2, 1/2]; inter = softmax([1, 0]) + [1/2, 1/2].
    b2 = [0.5 * (e / (e + 1) + 0.5), 0.5 * (1 / (e + 1) + 0.5)]
    tvs = [{"a": t(2.0, 0.0)}, {"a": t(1.0, 1.0)}]
    # r = 1 keeps all: τ_m = (β1 τ1 + β2 τ2) / (β1 + β2); task 1's zero still weighs in the mean.
    want = [(2 * b1[0] + b2[0]) / (b1[0] + b2[0]), b2[1] / (b1[1] + b2[1])]
    close(merge_task_vectors(PCB(density=1.0), tvs).delta["a"], want)
    # r = 0.5 keeps each task's larger β (entry 0 for both): entry 1 has Σβ̂ = 0 → 0.
    close(merge_task_vectors(PCB(density=0.5, scaling=2.0), tvs).delta["a"], [2 * want[0], 0.0])


@pytest.mark.parametrize("scope", ["model", "tensor"])
def test_pcb_matches_loop_reference(scope):
    tvs = random_tvs(K=3, shapes={"w": (3, 4), "b": (5,)}, seed=5)
    keys = list(tvs[0])
    got = merge_task_vectors(PCB(density=0.4, scope=scope, scaling=1.5), tvs).delta
    if scope == "model":
        rows = [[x for key in keys for x in flat64(tv)[key]] for tv in tvs]
        merged, start = ref_pcb_paper(rows, 0.4), 0
        for key in keys:
            n = tvs[0][key].numel()
            close(got[key].reshape(-1), [1.5 * x for x in merged[start:start + n]], rtol=1e-4)
            start += n
    else:
        for key in keys:
            want = ref_pcb_paper([flat64(tv)[key] for tv in tvs], 0.4)
            close(got[key].reshape(-1), [1.5 * x for x in want], rtol=1e-4)


def test_pcb_released_code_matches_transcription():
    tvs = random_tvs(K=4, shapes={"w": (6, 5), "b": (8,)}, seed=6)
    got = merge_task_vectors(PCB(density=0.3, formulation="released_code"), tvs).delta
    rows = [[x for key in tvs[0] for x in flat64(tv)[key]] for tv in tvs]
    want = ref_pcb_released(rows, 0.3)
    close(torch.cat([got[key].reshape(-1) for key in tvs[0]]), want, rtol=1e-4)


# ---------------------------------------------------------------- TSV

def test_tsv_hand_worked():
    # K = 2, 2×2 → rank ⌊2/2⌋ = 1 per task. v1 = 2·e1e1ᵀ (σ = 2, u = e1); v2 = [[1,1],[1,1]] (σ = 2,
    # u = (1,1)/√2). U = [e1, u] (not orthogonal); its polar factor W is orthogonal and V⊥ = Wᵀ (the
    # matrices are symmetric), so Δ_m = W·diag(2, 2)·Wᵀ = 2·I (task arithmetic would give [[3,1],[1,1]]).
    tvs = [{"w": torch.tensor([[2.0, 0.0], [0.0, 0.0]]), "b": t(1.0, 3.0)},
           {"w": torch.tensor([[1.0, 1.0], [1.0, 1.0]]), "b": t(3.0, 5.0)}]
    got = merge_task_vectors(TSV(), tvs).delta
    close(got["w"], [[2.0, 0.0], [0.0, 2.0]], atol=1e-5)
    close(got["b"], [2.0, 4.0])  # 1-D tensors are averaged
    # Orthogonal task bases pass unchanged: diag(3, 1) and diag(0, 2) → diag(3, 2), times α.
    tvs = [{"w": torch.diag(t(3.0, 1.0))}, {"w": torch.diag(t(0.0, 2.0))}]
    close(merge_task_vectors(TSV(scaling=0.5), tvs).delta["w"], [[1.5, 0.0], [0.0, 1.0]], atol=1e-6)


def test_tsv_matches_numpy_reference():
    tvs = random_tvs(K=3, shapes={"w": (9, 7), "c": (4, 3, 2), "b": (5,)}, seed=8)
    got = merge_task_vectors(TSV(), tvs).delta
    close(got["w"], ref_tsv([tv["w"].double().numpy() for tv in tvs], rank=7 // 3), rtol=1e-4, atol=1e-5)
    close(got["c"], torch.stack([tv["c"] for tv in tvs]).double().mean(0))  # not 2-D: averaged
    full = merge_task_vectors(TSV(rank_fraction=0.5), tvs).delta  # ⌊0.5·7⌋ = 3 per task
    close(full["w"], ref_tsv([tv["w"].double().numpy() for tv in tvs], rank=3), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- EMR

def emr_example():
    return [{"a": t(2.0, -1.0, 0.5), "b": t(1.0)}, {"a": t(1.0, 3.0, -0.5), "b": t(-2.0)}]


def test_emr_hand_worked():
    result = merge_task_vectors(EMR(), emr_example())
    # a: Σ = [3, 2, 0] → flag [1, 1, 0]; M1 = [1, 0, 0], M2 = [1, 1, 0]; τ_a = [max(2, 1), 3, 0].
    # b: Σ = -1 → flag -1; M1 = [0], M2 = [1]; τ_b = [-2].
    close(result.delta["a"], [2.0, 3.0, 0.0])
    close(result.delta["b"], [-2.0])
    m1, m2 = result.task_modules
    assert m1.mask("a").tolist() == [True, False, False] and m2.mask("a").tolist() == [True, True, False]
    assert m1.mask("b").tolist() == [False] and m2.mask("b").tolist() == [True]
    # λ1 = (3.5/3 + 1) / (2/3 + 0) = 3.25; λ2 = (4.5/3 + 2) / (5/3 + 2) = 10.5/11.
    close(torch.stack([m1.rescaler, m2.rescaler]), [3.25, 10.5 / 11])
    # Task models with θ_pre = 0: backbone τ_uni, module k → λ_k M_k ⊙ τ_uni.
    backbone = {k: v.clone() for k, v in result.delta.items()}
    m1.apply_(backbone)
    close(backbone["a"], [6.5, 0.0, 0.0])
    close(backbone["b"], [0.0])
    m1.restore_(backbone)
    m2.apply_(backbone)
    close(backbone["a"], [10.5 / 11 * 2, 10.5 / 11 * 3, 0.0])
    close(backbone["b"], [-2 * 10.5 / 11])


def test_emr_matches_loop_reference():
    tvs = random_tvs(K=4, shapes={"w": (5, 6), "b": (7,)}, seed=9)
    result = merge_task_vectors(EMR(), tvs)
    tau, masks, rescalers = ref_emr(tvs)
    for key in tau:
        close(result.delta[key].reshape(-1), tau[key])
        for k, module in enumerate(result.task_modules):
            assert module.mask(key).reshape(-1).tolist() == masks[key][k]
    close(torch.stack([m.rescaler for m in result.task_modules]), rescalers)


def test_emr_apply_restore_bit_exact_and_task_model_formula():
    pre = {"w": torch.randn(6, 5), "b": torch.randn(5), "n": torch.arange(3)}
    fts = [{"w": pre["w"] + 0.1 * torch.randn(6, 5), "b": pre["b"] + 0.1 * torch.randn(5), "n": pre["n"]}
           for _ in range(3)]
    out = merge(pre, fts, "emr")
    unified = out.result.shared_modules["emr_unified"]
    backbone = {k: v.clone() for k, v in out.state_dict.items()}
    model = torch.nn.Module()
    for k in ("w", "b"):
        model.register_parameter(k, torch.nn.Parameter(backbone[k].clone(), requires_grad=False))
    original = {k: p.detach().clone() for k, p in model.named_parameters()}
    for module in out.task_modules:
        module.apply_(model)
        for key in ("w", "b"):
            want = pre[key] + module.rescaler * module.mask(key) * unified.tensor(key)
            torch.testing.assert_close(getattr(model, key).data, want, rtol=1e-5, atol=1e-6)
        module.restore_(model)
        for key, value in original.items():
            assert torch.equal(getattr(model, key).data, value)
    # Nested application on a state dict restores in LIFO order, bit-exactly.
    a, b = out.task_modules[:2]
    a.apply_(backbone, 0.5)
    b.apply_(backbone)
    b.restore_(backbone)
    a.restore_(backbone)
    assert all(torch.equal(backbone[k], out.state_dict[k]) for k in backbone)


def test_emr_storage_is_bit_packed_and_shares_tau():
    result = merge_task_vectors(EMR(), random_tvs(K=2, shapes={"w": (5, 3), "b": (4,)}))
    module = result.task_modules[0]
    # 15 mask bits → 2 bytes, 4 bits → 1 byte, plus the fp32 rescaler.
    assert module.nbytes == 2 + 1 + 4
    assert module.mask_0.dtype == torch.uint8
    state = module.state_dict()
    assert not any("tau" in k for k in state)
    assert {k for k in state if not k.endswith("_extra_state")} == {"mask_0", "mask_1", "rescaler"}
    assert module.unified is result.shared_modules["emr_unified"]
    fresh = EMRTaskModule({k: module.mask(k) for k in module.keys}, 0.0).bind(module.unified)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.rescaler, module.rescaler)
    with pytest.raises(RuntimeError, match="bind"):
        EMRTaskModule({"w": torch.ones(2, dtype=torch.bool)}).apply_({"w": torch.zeros(2)})


def test_packbits_matches_numpy():
    mask = torch.rand(37) > 0.5
    packed = packbits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == 5
    assert packed.tolist() == np.packbits(mask.numpy()).tolist()
    assert torch.equal(unpackbits(packed, 37), mask)


# ---------------------------------------------------------------- Twin

def test_twin_hand_worked():
    tvs = [{"w": torch.tensor([[4.0, 0.0], [0.0, 0.0]]), "b": t(1.0, 1.0)},
           {"w": torch.tensor([[0.0, 0.0], [0.0, 2.0]]), "b": t(3.0, -1.0)}]
    result = merge_task_vectors(Twin(scaling=0.5, rank_fraction=0.5), tvs)
    # Shared: 0.5·Σ v = diag(2, 1) and bias [2, 0]. Twins: diag(2, -1) → rank ⌈0.5·2⌉ = 1: diag(2, 0);
    # diag(-2, 1) → diag(-2, 0). Biases are stored dense: [-1, 1] and [1, -1].
    close(result.delta["w"], [[2.0, 0.0], [0.0, 1.0]])
    close(result.delta["b"], [2.0, 0.0])
    m1, m2 = result.task_modules
    assert isinstance(m1, LowRankTaskModule) and m1.rank("w") == 1 and m1.rank("b") == 0
    close(m1.delta("w"), [[2.0, 0.0], [0.0, 0.0]], atol=1e-6)
    close(m2.delta("w"), [[-2.0, 0.0], [0.0, 0.0]], atol=1e-6)
    backbone = {k: v.clone() for k, v in result.delta.items()}
    m1.apply_(backbone)
    close(backbone["w"], [[4.0, 0.0], [0.0, 1.0]], atol=1e-6)  # task model 1 with θ_pre = 0
    close(backbone["b"], [1.0, 1.0])
    m1.restore_(backbone)
    assert torch.equal(backbone["w"], result.delta["w"])
    # Storage: U·S [2, 1] + Vᵀ [1, 2] + dense bias [2], fp32.
    assert m1.nbytes == (2 + 2 + 2) * 4


def test_twin_full_rank_reconstructs_finetuned_models():
    pre = {"w": torch.randn(6, 4), "c": torch.randn(3, 2, 2, 2), "b": torch.randn(4)}
    fts = [{k: v + torch.randn_like(v) for k, v in pre.items()} for _ in range(3)]
    out = merge(pre, fts, "twin", rank_fraction=1.0)
    backbone = {k: v.clone() for k, v in out.state_dict.items()}
    for ft, module in zip(fts, out.task_modules):
        module.apply_(backbone)
        for key in pre:
            torch.testing.assert_close(backbone[key], ft[key], rtol=1e-5, atol=1e-5)
        module.restore_(backbone)
    assert all(torch.equal(backbone[k], out.state_dict[k]) for k in backbone)


def test_twin_low_rank_matches_numpy_truncation():
    tvs = random_tvs(K=2, shapes={"w": (8, 10)}, seed=10)
    result = merge_task_vectors(Twin(scaling=0.3, rank_fraction=0.2), tvs)  # r = ⌈0.2·8⌉ = 2
    shared = 0.3 * (tvs[0]["w"] + tvs[1]["w"]).double().numpy()
    u, s, vh = np.linalg.svd(tvs[0]["w"].double().numpy() - shared)
    want = (u[:, :2] * s[:2]) @ vh[:2]
    assert result.task_modules[0].rank("w") == 2
    close(result.task_modules[0].delta("w"), want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- composition and bad input

def test_methods_compose_with_the_fr_prefilter():
    pre = {"w": torch.randn(8, 6), "b": torch.randn(6)}
    fts = [{k: v + torch.randn_like(v) for k, v in pre.items()} for _ in range(3)]
    out = merge(pre, fts, "ties", fr_filter_ratio=0.3, density=0.5)
    tvs = prefilter([{k: ft[k] - pre[k] for k in pre} for ft in fts], 0.3)
    want = merge_task_vectors(TIES(density=0.5), tvs).delta
    for key, value in pre.items():
        torch.testing.assert_close(out.state_dict[key], value + want[key], rtol=1e-5, atol=1e-5)


RANGE = HyperparameterError  # a value outside its accepted range
CHOICE = ConfigError  # a value that is not one of the choices


@pytest.mark.parametrize("call, error, match", [
    (lambda tvs: merge_task_vectors(TIES(density=0.0), tvs), RANGE,
     r"ties\.density=0\.0 is outside its accepted range \(0, 1\]"),
    (lambda tvs: merge_task_vectors(TIES(trim_scope="layer"), tvs), CHOICE,
     r"ties\.trim_scope='layer'; accepted: \['model', 'tensor'\]"),
    (lambda tvs: merge_task_vectors(TIES(sign_election="mass"), tvs), CHOICE, r"ties\.sign_election='mass'"),
    (lambda tvs: merge_task_vectors(TIES(weights=[1.0]), tvs), RANGE, "weights has 1 entries for 2"),
    (lambda tvs: merge_task_vectors(DARE(drop_rate=1.0), tvs), RANGE,
     r"dare\.drop_rate=1\.0 is outside its accepted range \[0, 1\)"),
    (lambda tvs: merge_task_vectors(DARE(merge="fisher"), tvs), CHOICE, r"dare\.merge='fisher'"),
    (lambda tvs: merge_task_vectors(Breadcrumbs(drop_top=0.2, drop_bottom=0.8), tvs), RANGE,
     r"breadcrumbs\.drop_top \+ drop_bottom=1\.0 is outside its accepted range \[0, 1\)"),
    (lambda tvs: merge_task_vectors(DELLA(drop_rate=0.05, epsilon=0.2), tvs), RANGE,
     r"della\.drop_rate - epsilon/2=-0\.05.* is outside its accepted range \[0, 1\)"),
    (lambda tvs: merge_task_vectors(PCB(formulation="code"), tvs), CHOICE, r"pcb\.formulation='code'"),
    (lambda tvs: merge_task_vectors(TSV(rank_fraction=1.5), tvs), RANGE, r"tsv\.rank_fraction=1\.5"),
    (lambda tvs: merge_task_vectors(Twin(rank_fraction=0.0), tvs), RANGE, r"twin\.rank_fraction=0\.0"),
])
def test_bad_hyperparameters_name_the_culprit(call, error, match):
    with pytest.raises(error, match=match):
        call(random_tvs(K=2))


@pytest.mark.parametrize("name", ["weight_averaging", "ties", "pcb", "tsv", "emr", "twin", "breadcrumbs"])
def test_empty_task_vector_list_is_an_error(name):
    with pytest.raises(FreeMergeError, match="no task vectors"):
        merge_task_vectors(get_method(name).build({}), [])


# ---------------------------------------------------------------- registry contract

def tiny_models(K=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {
        "blocks.0.attn.weight": torch.randn(8, 6, generator=g),
        "blocks.0.attn.bias": torch.randn(8, generator=g),
        "patch.weight": torch.randn(4, 3, 2, 2, generator=g),
        "logit_scale": torch.randn((), generator=g),
        "position_ids": torch.arange(5),
    }
    fts = [{k: (v + 0.1 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone()
            for k, v in pre.items()} for _ in range(K)]

    def cast(sd):
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}

    return cast(pre), [cast(ft) for ft in fts]


TASK_VECTOR_METHODS = [name for name in list_methods() if not get_method(name).needs]


@pytest.mark.parametrize("name", TASK_VECTOR_METHODS)
def test_contract_shapes_dtypes_and_determinism(name):
    pre, fts = tiny_models(dtype=torch.bfloat16)
    out = merge(pre, fts, name, seed=3)
    assert set(out.state_dict) == set(pre)
    for key, value in pre.items():
        assert out.state_dict[key].shape == value.shape and out.state_dict[key].dtype == value.dtype, key
        assert bool(torch.isfinite(out.state_dict[key].float()).all()), key
    assert torch.equal(out.state_dict["position_ids"], pre["position_ids"])
    again = merge(pre, fts, name, seed=3)
    assert all(torch.equal(out.state_dict[k], again.state_dict[k]) for k in pre)


@pytest.mark.parametrize("name", TASK_VECTOR_METHODS)
def test_contract_unknown_hyperparameter_is_named(name):
    pre, fts = tiny_models(K=2)
    with pytest.raises(HyperparameterError, match="not_a_knob"):
        merge(pre, fts, name, not_a_knob=1.0)


@pytest.mark.parametrize("name", [n for n in TASK_VECTOR_METHODS if get_method(n).produces_task_modules])
def test_contract_task_modules_apply_and_restore_bit_exact(name):
    pre, fts = tiny_models(K=3)
    # the released code's per-row top-int(d·W) keeps nothing of rows under 1/d entries: use d = 0.5 there
    args = {"expert_density": 0.5} if name == "free_merging_released" else {}
    out = merge(pre, fts, name, **args)
    assert out.task_modules is not None and len(out.task_modules) == 3
    backbone = {k: v.clone() for k, v in out.state_dict.items()}
    for module in out.task_modules:
        module.apply_(backbone)
        assert any(not torch.equal(backbone[k], out.state_dict[k]) for k in module.keys)
        module.restore_(backbone)
        assert all(torch.equal(backbone[k], out.state_dict[k]) for k in backbone)


def test_breadcrumbs_band_equals_the_stable_sort_definition_with_ties():
    from freemerge_pl.merging.topk import magnitude_band_mask

    g = torch.Generator().manual_seed(4)
    for shape, top, bottom in [((40,), 0.1, 0.5), ((7, 9), 0.05, 0.9), ((50,), 0.3, 0.3), ((6, 5), 0.0, 0.4),
                               ((33,), 0.2, 0.0)]:
        v = torch.randint(-3, 4, shape, generator=g).float()  # many ties, both signs
        flat = v.reshape(-1)
        n = flat.numel()
        order = torch.sort(flat.abs(), stable=True).indices
        want = torch.zeros(n, dtype=torch.bool)
        want[order[math.floor(bottom * n + 1e-9):n - math.floor(top * n + 1e-9)]] = True
        assert torch.equal(magnitude_band_mask(v, top, bottom), want.reshape(shape)), (shape, top, bottom)


# ---------------------------------------------------------------- trim_ties: mergekit's exact count

MERGEKIT_PYTHON = Path.home() / ".cache/freemerge_pl/mergekit-0.1.5-venv/bin/python"


def bf16_like_tvs(K=3, shapes=None, seed=0):
    """Task vectors rounded to bf16 (2-3 significant digits): thousands of entries tie at any threshold."""
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"w": (64, 96), "b": (200,)}
    return [{k: (1e-3 * torch.randn(s, generator=g)).bfloat16().float() for k, s in shapes.items()}
            for _ in range(K)]


def mergekit_rule(v: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit 0.1.5 ``sparsify.magnitude`` re-stated: keep the first max(1, int(d·N)) entries of
    ``torch.argsort(|v|, descending=True)`` on the flattened tensor."""
    keep = max(1, int(density * v.numel()))
    mask = torch.zeros(v.numel(), dtype=v.dtype)
    mask[torch.argsort(v.abs().reshape(-1).float(), descending=True)[:keep]] = 1
    return v * mask.reshape(v.shape)


@pytest.mark.parametrize("density", [0.2, 0.37])
def test_ties_exact_count_keeps_mergekits_entries_under_heavy_ties(density):
    tvs = bf16_like_tvs()
    # One task: the merge is that task's trimmed vector, entry for entry.
    exact = merge_task_vectors(TIES(density=density, trim_scope="tensor", trim_ties="exact_count"), tvs[:1]).delta
    keep_all = merge_task_vectors(TIES(density=density, trim_scope="tensor"), tvs[:1]).delta
    for key, v in tvs[0].items():
        want = mergekit_rule(v, density)
        assert torch.equal(exact[key] != 0, want != 0) and torch.equal(exact[key], want)
        assert int((exact[key] != 0).sum()) == max(1, int(density * v.numel()))
        assert int((keep_all[key] != 0).sum()) >= int((exact[key] != 0).sum())
    # the default keeps every tie at the threshold: more entries where the cut falls inside a tie group
    assert int((keep_all["w"] != 0).sum()) > int((exact["w"] != 0).sum())
    # Several tasks: TIES with exact_count = untrimmed TIES on mergekit-trimmed task vectors.
    trimmed = [{k: mergekit_rule(v, density) for k, v in tv.items()} for tv in tvs]
    for convention in ("unweighted", "weighted"):
        kw = {"trim_scope": "tensor", "sign_election": convention, "weights": [1.0, 0.5, 2.0]}
        got = merge_task_vectors(TIES(density=density, trim_ties="exact_count", **kw), tvs).delta
        want = merge_task_vectors(TIES(density=1.0, **kw), trimmed).delta
        for key in got:
            assert torch.equal(got[key], want[key])
    # DARE-TIES without a drop trims the same way
    dare = merge_task_vectors(DARE(drop_rate=0.0, merge="ties", ties_density=density, trim_scope="tensor",
                                   trim_ties="exact_count", scaling=1.0), tvs).delta
    ties = merge_task_vectors(TIES(density=density, trim_scope="tensor", trim_ties="exact_count"), tvs).delta
    assert all(torch.equal(dare[k], ties[k]) for k in ties)


@pytest.mark.skipif(not MERGEKIT_PYTHON.exists(), reason="mergekit 0.1.5 virtual environment not installed")
def test_ties_exact_count_equals_mergekit_itself(tmp_path):
    tvs = bf16_like_tvs(K=2, shapes={"w": (128, 300), "b": (5000,)}, seed=4)
    torch.save(tvs, tmp_path / "in.pt")
    script = ("import sys, torch; from mergekit.sparsify import magnitude; tvs = torch.load(sys.argv[1]); "
              "torch.save([{k: magnitude(v, density=0.2) for k, v in tv.items()} for tv in tvs], sys.argv[2])")
    subprocess.run([str(MERGEKIT_PYTHON), "-c", script, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   check=True, timeout=300)
    theirs = torch.load(tmp_path / "out.pt")
    for k, tv in enumerate(tvs):
        ours = merge_task_vectors(TIES(density=0.2, trim_scope="tensor", trim_ties="exact_count"), [tv]).delta
        for key in tv:
            assert torch.equal(ours[key], theirs[k][key])


def test_trim_ties_exact_count_needs_tensor_scope():
    with pytest.raises(HyperparameterError, match=r"ties\.trim_ties='exact_count' needs trim_scope='tensor'"):
        TIES(trim_ties="exact_count")
    with pytest.raises(HyperparameterError, match=r"dare\.trim_ties='exact_count' needs trim_scope='tensor'"):
        DARE(merge="ties", ties_density=0.5, trim_ties="exact_count")
    with pytest.raises(FreeMergeError, match=r"ties\.trim_ties='all'; accepted: \['keep_all', 'exact_count'\]"):
        TIES(trim_scope="tensor", trim_ties="all")
