"""Frequency-domain interference analysis (semantics §10): spectra, the metric, the energy below each FR cutoff,
each method's per-task vectors, the plots, the ``analyze`` command and the callback, streaming from sources."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
import yaml

from freemerge_pl.adapters.toy import make_toy_models
from freemerge_pl.errors import ConfigError
from freemerge_pl.jobs.analysis import analyze, contributions, log_power, method_context, spectrum
from freemerge_pl.jobs.analysis.plots import cutoff_figure, save_figure, spectra_figure
from freemerge_pl.jobs.analysis.run import OUTPUT_NAMES
from freemerge_pl.lightning.cli import cli_main
from freemerge_pl.merging import build_method
from freemerge_pl.merging.engine import CheckpointInputs, TaskVectorInputs, merge_task_vectors
from freemerge_pl.merging.fourier import highpass
from freemerge_pl.merging.source import StateDictSource

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHAPES = {"a.weight": (12, 10), "b.weight": (7, 3, 3), "c.weight": (20, 6), "d.bias": (6,)}


def task_vectors(K=3, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(K)]


def wave(shape, a, b):
    """cos(2π(a·i/H + b·j/W)) on an H×W grid."""
    i = torch.arange(shape[0], dtype=torch.float64)[:, None]
    j = torch.arange(shape[1], dtype=torch.float64)[None, :]
    return torch.cos(2 * math.pi * (a * i / shape[0] + b * j / shape[1]))


def numpy_metric(tvs, keys):
    """The metric from its definition, with numpy, on every task vector of every key at once (in memory)."""
    total, count = 0.0, 0
    for key in keys:
        mats = [tv[key].double().numpy().reshape(tv[key].shape[0], -1) for tv in tvs]
        amps = np.stack([np.abs(np.fft.fft2(m, norm="ortho")) for m in mats])
        total += amps.var(axis=0).sum()  # population variance over tasks, summed over frequencies
        count += amps[0].size
    return total / count


# ------------------------------------------------------------------------------------------ spectra


def test_the_spectrum_of_a_2d_sinusoid_peaks_at_its_frequency():
    H, W, a, b = 16, 24, 3, 5
    amp = spectrum(wave((H, W), a, b)).abs()
    top = {tuple(int(i) for i in np.unravel_index(idx, amp.shape)) for idx in amp.flatten().topk(2).indices}
    assert top == {(a, b), (H - a, W - b)}  # the frequency and its conjugate mirror, exact bins
    torch.testing.assert_close(amp[a, b].item(), math.sqrt(H * W) / 2)  # orthonormal DFT of a cosine
    assert float(amp.sum() - amp[a, b] - amp[H - a, W - b]) < 1e-9
    centred = log_power(wave((H, W), a, b), max_side=None)
    peak = {tuple(int(i) for i in np.unravel_index(idx, centred.shape)) for idx in centred.flatten().topk(2).indices}
    assert peak == {(H // 2 + a, W // 2 + b), (H // 2 - a, W // 2 - b)}  # zero frequency at the centre


# ------------------------------------------------------------------------------------------ the metric


def test_the_metric_is_zero_for_identical_task_vectors():
    tv = task_vectors(1)[0]
    report = analyze(TaskVectorInputs([tv, tv, tv]), methods=["task_arithmetic", "fr_merging"])
    assert report.metric == pytest.approx(0.0, abs=1e-12)
    assert all(m.metric == pytest.approx(0.0, abs=1e-12) for m in report.methods)


def test_the_metric_grows_with_dissimilar_low_frequency_content():
    base = torch.randn(16, 16, generator=torch.Generator().manual_seed(1)) * 0.1
    low = wave((16, 16), 1, 0)  # the lowest non-zero frequency
    metrics = []
    for spread in (0.0, 0.5, 1.0, 2.0):
        tvs = [{"w": base + spread * c * low} for c in (-1.0, 0.0, 1.0)]
        metric = analyze(TaskVectorInputs(tvs), methods=[]).metric
        assert metric == pytest.approx(numpy_metric(tvs, ["w"]), rel=1e-6)
        metrics.append(metric)
    assert metrics[0] == pytest.approx(0.0, abs=1e-12)
    assert all(a < b for a, b in itertools.pairwise(metrics))


def test_the_metric_matches_its_definition_computed_in_memory():
    tvs = task_vectors(4)
    report = analyze(TaskVectorInputs(tvs), methods=[])
    keys = [k for k, s in SHAPES.items() if len(s) >= 2]
    assert report.keys == keys
    assert report.metric == pytest.approx(numpy_metric(tvs, keys), rel=1e-6)
    assert report.numel == sum(math.prod(SHAPES[k]) for k in keys)
    with_1d = analyze(TaskVectorInputs(tvs), methods=[], include_1d=True)
    assert with_1d.keys == list(SHAPES)
    assert with_1d.metric == pytest.approx(numpy_metric(tvs, list(SHAPES)), rel=1e-6)


# ------------------------------------------------------------------------------------------ cutoff curve


@pytest.mark.parametrize("cutoff_mode", ["fraction", "radius"])
def test_fr_at_ratio_r_removes_exactly_the_energy_below_the_cutoff(cutoff_mode):
    tvs = [{k: v.double() for k, v in tv.items()} for tv in task_vectors(3, seed=2)]  # float64 end to end
    ratios = [0.1, 0.3, 0.55, 0.8]
    report = analyze(TaskVectorInputs(tvs), methods=[], ratios=ratios, cutoff_mode=cutoff_mode)
    for name, tv in zip(report.tasks, tvs):
        total = sum(float(tv[k].square().sum()) for k in report.keys)
        for i, r in enumerate(ratios):
            # Parseval: ||v||² − ||G(v)||² is the energy of the coefficients G zeroes
            removed = sum(float(tv[k].square().sum())
                          - float(highpass(tv[k], r, cutoff_mode=cutoff_mode).square().sum())
                          for k in report.keys)
            assert report.energy_below_per_task[name][i] == pytest.approx(removed / total, rel=1e-9, abs=1e-12)
    fractions = report.energy_below
    assert all(0 <= a <= b <= 1 for a, b in itertools.pairwise(fractions))


def test_the_metric_after_the_filter_equals_fr_merging_at_that_ratio():
    tvs = task_vectors(3, seed=3)
    ratios = [0.2, 0.5]
    report = analyze(TaskVectorInputs(tvs), ratios=ratios, methods=[build_method("fr_merging", {"filter_ratio": r})
                                                                    for r in ratios])
    for i, fr in enumerate(report.methods):
        assert fr.metric == pytest.approx(report.metric_after_filter[i], rel=1e-5)
        assert fr.metric < report.metric


# ------------------------------------------------------------------------------------------ methods


def _reconstructed(name, method, cs, info):
    """The merged delta from the per-task vectors, by each method's combination rule."""
    stacked = torch.stack([c.float() for c in cs])
    s = getattr(method, "scaling", 1.0)
    if name in ("task_arithmetic", "dare", "breadcrumbs"):
        return s * stacked.sum(0)
    if name == "ties":
        count = (stacked != 0).sum(0)
        return s * torch.where(count > 0, stacked.sum(0) / count.clamp_min(1), torch.zeros_like(stacked[0]))
    if name == "pcb":
        return s * stacked.mean(0)
    if name == "fr_merging":
        lam = torch.tensor(info["lambdas"], dtype=torch.float32).reshape(-1, *([1] * (stacked.dim() - 1)))
        return s * (lam * stacked).sum(0)
    raise AssertionError(name)


@pytest.mark.parametrize("name, args", [
    ("task_arithmetic", {}), ("dare", {}), ("ties", {}), ("ties", {"trim_scope": "tensor"}), ("breadcrumbs", {}),
    ("pcb", {}), ("pcb", {"scope": "tensor"}), ("fr_merging", {"filter_ratio": 0.4}),
])
def test_per_task_vectors_are_what_each_method_combines(name, args):
    """Combined by the method's own rule, the analysed per-task vectors give the engine's merged delta."""
    tvs = task_vectors(3, seed=4)
    method = build_method(name, args)
    merged = merge_task_vectors(method, tvs)  # seed 0, as the analysis's default
    inputs = TaskVectorInputs(tvs)
    ctx, stats = method_context(method, inputs)
    for key in inputs.keys:
        cs = list(contributions(method, inputs.load(key), stats, ctx))
        assert len(cs) == 3
        torch.testing.assert_close(_reconstructed(name, method, cs, merged.info), merged.delta[key],
                                   rtol=1e-4, atol=1e-5)


def test_methods_without_per_task_vectors_and_bad_settings_are_named():
    inputs = TaskVectorInputs(task_vectors(2))
    with pytest.raises(ConfigError, match=r"'free_merging'.*does not expose.*accepted: .*'fr_merging'"):
        analyze(inputs, methods=["free_merging"])
    with pytest.raises(ConfigError, match=r"layers='\(' is not a valid regular expression"):
        analyze(inputs, layers="(")
    with pytest.raises(ConfigError, match=r"layers='nothing' selects no merged tensor"):
        analyze(inputs, layers="nothing")
    with pytest.raises(ConfigError, match=r"method_args for \['ties'\]"):
        analyze(inputs, methods=["dare"], method_args={"ties": {"density": 0.5}})
    with pytest.raises(ConfigError, match=r"plot_tasks \['x'\]"):
        analyze(inputs, methods=[], plot_tasks=["x"])


# ------------------------------------------------------------------------------------------ streaming


class RecordingSource(StateDictSource):
    def __init__(self, state_dict, name, log):
        super().__init__(state_dict, name)
        self.log = log

    def get(self, key):
        self.log.append(key)
        return super().get(key)


def test_streaming_from_sources_equals_the_in_memory_computation():
    K = 3
    tvs = task_vectors(K, seed=5)
    pre = {k: torch.randn(s, generator=torch.Generator().manual_seed(9)) for k, s in SHAPES.items()}
    finetuned = [{k: pre[k] + tv[k] for k in SHAPES} for tv in tvs]
    log: list[str] = []
    inputs = CheckpointInputs(RecordingSource(pre, "pre", log),
                              [RecordingSource(sd, f"t{i}", log) for i, sd in enumerate(finetuned)])
    methods = ["task_arithmetic", "breadcrumbs", "fr_merging"]
    streamed = analyze(inputs, methods=methods, ratios=[0.3])
    in_memory = analyze(TaskVectorInputs(tvs), methods=methods, ratios=[0.3])
    vectors = [{k: finetuned[i][k] - pre[k] for k in SHAPES} for i in range(K)]
    assert streamed.metric == pytest.approx(numpy_metric(vectors, streamed.keys), rel=1e-6)
    assert streamed.metric == pytest.approx(in_memory.metric, rel=1e-5)
    assert streamed.energy_below == pytest.approx(in_memory.energy_below, rel=1e-5)
    for a, b in zip(streamed.methods, in_memory.methods):
        assert a.metric == pytest.approx(b.metric, rel=1e-5)
    # key by key: every read of one key is done before the next key is read (per pass), θ_pre + K reads
    runs = [1]
    for prev, key in itertools.pairwise(log):
        runs[-1:] = [runs[-1] + 1] if key == prev else [runs[-1], 1]
    assert max(runs) <= K + 1
    assert streamed.tasks == ["t0", "t1", "t2"]


# ------------------------------------------------------------------------------------------ plots


def test_figures_have_labelled_axes_and_are_valid_pngs(tmp_path):
    report = analyze(TaskVectorInputs(task_vectors(3)), methods=[], plot_layers=2, plot_tasks=["task0", "task2"])
    assert list(report.spectra) == ["a.weight", "c.weight"]  # evenly spaced: first and last ≥2-D key
    fig = spectra_figure(report)
    grid = fig.axes[:4]  # 2 keys × 2 tasks (colour bars follow)
    assert [ax.get_title() for ax in grid[:2]] == ["task0", "task2"]
    assert all("column frequency" == ax.get_xlabel() for ax in grid[2:])
    assert all(ax.get_ylabel().endswith("row frequency") for ax in (grid[0], grid[2]))
    assert grid[2].get_ylabel().startswith("c.weight")
    cut = cutoff_figure(report)
    ax = cut.axes[0]
    assert "filter ratio" in ax.get_xlabel() and ax.get_ylabel()
    assert len(ax.get_lines()) == 2 + 3  # energy, metric, one grey line per task
    for f, name in ((fig, "s.png"), (cut, "c.png")):
        path = save_figure(f, tmp_path / name)
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "s.png"]  # no temp file left


# ------------------------------------------------------------------------------------------ CLI, callback


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return make_toy_models(tmp_path_factory.mktemp("toy_analysis"), steps=20)


def _check_outputs(out, tasks):
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_NAMES)
    for name in ("spectra.png", "cutoff.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
    record = json.loads((out / "interference.json").read_text())
    assert record["tasks"] == tasks
    assert "| fr_merging" in (out / "interference.md").read_text()
    return record


def test_cli_analyze_on_a_toy_config_and_on_a_merge_job_config(toy_root, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"adapter": {"class_path": "freemerge_pl.adapters.toy.ToyAdapter",
                                                         "init_args": {"root": str(toy_root)}}}}))
    out = tmp_path / "out"
    assert cli_main(["analyze", "--config", str(cfg), "--output_dir", str(out), "--tasks", "task0", "task2",
                     "--ratios", "0", "0.3", "--layers", "weight", "--method_args", "{dare: {drop_rate: 0.5}}"]) == 0
    record = _check_outputs(out, ["task0", "task2"])
    assert [m["name"] for m in record["methods"]] == ["task_arithmetic", "dare", "ties", "breadcrumbs", "pcb",
                                                      "fr_merging"]
    assert record["methods"][1]["hyperparameters"]["drop_rate"] == 0.5
    assert record["ratios"] == [0.0, 0.3] and record["keys"] == ["fc1.weight", "fc2.weight"]
    # the same checkpoints as files, read tensor by tensor: the same numbers
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"base_model": str(toy_root / "pretrained" / "model.safetensors"),
                                   "models": [{"model": str(toy_root / "finetuned" / t / "model.safetensors"),
                                               "name": t} for t in ("task0", "task2")]}))
    out2 = tmp_path / "out2"
    assert cli_main(["analyze", "--config", str(job), "--output_dir", str(out2), "--ratios", "0", "0.3",
                     "--method_args", "{dare: {drop_rate: 0.5}}"]) == 0
    again = _check_outputs(out2, ["task0", "task2"])
    assert again["metric"] == pytest.approx(record["metric"], rel=1e-6)
    assert [m["metric"] for m in again["methods"]] == pytest.approx([m["metric"] for m in record["methods"]],
                                                                    rel=1e-5)


def test_cli_analyze_names_a_bad_config(toy_root, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"adapter": {"class_path": "freemerge_pl.adapters.toy.ToyAdapter",
                                                         "init_args": {"root": str(toy_root)}}}}))
    assert cli_main(["analyze", "--config", str(cfg), "--output_dir", str(tmp_path / "o"), "--tasks", "task9"]) == 2
    assert "task9" in capsys.readouterr().err
    cfg.write_text(yaml.safe_dump({"trainer": {}}))
    assert cli_main(["analyze", "--config", str(cfg), "--output_dir", str(tmp_path / "o")]) == 2
    assert "no model.adapter" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_callback_writes_the_outputs_at_setup(toy_root, tmp_path):
    from freemerge_pl.callbacks import SpectrumAnalysis
    from lightning.pytorch import Trainer

    from freemerge_pl.adapters.toy import ToyAdapter
    from freemerge_pl.lightning.module import MergedModule

    callback = SpectrumAnalysis(methods=["task_arithmetic", "fr_merging"], ratios=[0.0, 0.3])
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[callback])
    module = MergedModule(ToyAdapter(str(toy_root)), method="task_arithmetic")
    callback.setup(trainer, module, "test")
    record = _check_outputs(tmp_path / "interference", ["task0", "task1", "task2"])
    assert record["metric"] == pytest.approx(callback.report.metric)
    assert record["methods"][0]["metric"] == pytest.approx(record["metric"], rel=1e-6)  # TA adds the v_k
