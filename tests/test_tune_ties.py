"""Honest tune reports (issue 28 item 5): ties within the tune-val's standard error go to the simpler candidate
and the report says so; ``tune`` writes only into its own ``output_dir``; a task's ``val_args`` is tune-val enough."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from freemerge_pl.errors import ConfigError
from freemerge_pl.jobs.tune import TIE_RULES, choose, tune_markdown
from freemerge_pl.lightning.cli import main
from tests.test_module import config, toy_root, write_config  # noqa: F401  (toy_root: the module's fixture)


def row(params: dict, accuracies: list[float], storage: int) -> dict:
    """A candidate as ``tune`` records it: its per-task accuracies, their mean as the score, its expert bytes."""
    tasks = {f"t{i}": {"accuracy": a} for i, a in enumerate(accuracies)}
    return {"params": params, "score": sum(accuracies) / len(accuracies), "scores": {"tasks": tasks},
            "task_module_bytes": storage}


DEFAULTS = {"filter_ratio": 0.3, "scaling": 1.0, "expert_scale": 1.0, "fr_filter_ratio": 0.0}


def test_ties_within_one_standard_error_go_to_the_smaller_expert():
    rows = [row({"filter_ratio": 0.3, "scaling": 1.0}, [0.82, 0.78], 1000),   # best score, 0.800
            row({"filter_ratio": 0.0, "scaling": 1.0}, [0.80, 0.79], 1000),   # 0.795: tied
            row({"filter_ratio": 0.1, "scaling": 2.0}, [0.81, 0.786], 500),   # 0.798: tied, half the storage
            row({"filter_ratio": 0.0, "scaling": 1.0}, [0.70, 0.70], 0)]      # 0.700: not tied
    n = 1600  # SE = sqrt(0.8·0.2/1600) = 0.01 (by hand): the threshold is 0.79
    best, ties = choose(rows, samples=n, metric="accuracy", defaults=DEFAULTS)
    assert ties["standard_error"] == pytest.approx(math.sqrt(0.8 * 0.2 / n)) == pytest.approx(0.01)
    assert ties["tied_indices"] == [0, 1, 2] and ties["best_index"] == 0
    assert best is rows[2] and ties["chosen_index"] == 2 and ties["rules"] == [TIE_RULES[0]]
    assert "sqrt(0.8000·0.2000/1600)" in ties["how"]
    # a smaller tune-val (larger SE) ties more; a huge one ties only the best
    assert choose(rows, samples=10, defaults=DEFAULTS)[1]["tied_indices"] == [0, 1, 2, 3]
    assert choose(rows, samples=10**7, defaults=DEFAULTS)[0] is rows[0]


def test_then_no_filter_then_the_defaults_then_grid_order():
    same = 800
    rows = [row({"filter_ratio": 0.3, "scaling": 1.0}, [0.80], same),
            row({"filter_ratio": 0.0, "scaling": 2.0}, [0.80], same),
            row({"filter_ratio": 0.0, "scaling": 1.5}, [0.80], same)]
    best, ties = choose(rows, samples=400, defaults=DEFAULTS)
    assert best is rows[1]  # no filter beats the default filter; equal filters: then the grid order
    assert ties["rules"] == [TIE_RULES[1], TIE_RULES[3]]
    rows = [row({"filter_ratio": 0.0, "scaling": 2.0}, [0.80], same),
            row({"filter_ratio": 0.0, "scaling": 1.0}, [0.80], same)]
    best, ties = choose(rows, samples=400, defaults=DEFAULTS)
    assert best is rows[1] and ties["rules"] == [TIE_RULES[2]]  # scaling 1.0 is the method's default
    rows = [row({"fr_filter_ratio": 0.2}, [0.80], 0), row({"fr_filter_ratio": 0.1}, [0.799], 0)]
    assert choose(rows, samples=400, defaults=DEFAULTS)[0] is rows[1]  # the pre-filter counts as a filter


def test_for_the_released_methods_a_larger_filter_ratio_is_less_filtering():
    """The released code's ``filter_ratio`` is the radius of the band its mask keeps (``_filter_mask``: ones
    inside it), so among tied candidates the larger one filters less and is the simpler."""
    from freemerge_pl.merging.methods.released import _filter_mask
    from freemerge_pl.merging.registry import get_method

    assert float(_filter_mask(16, 16, 0.6).sum()) > float(_filter_mask(16, 16, 0.3).sum())  # keeps more
    assert get_method("free_merging_released").cls.filter_ratio_keeps
    assert not get_method("free_merging").cls.filter_ratio_keeps
    rows = [row({"filter_ratio": 0.3}, [0.80], 0), row({"filter_ratio": 0.6}, [0.80], 0)]
    assert choose(rows, samples=400, defaults={}, filter_ratio_keeps=True)[0] is rows[1]
    assert choose(rows, samples=400, defaults={})[0] is rows[0]


def test_without_a_standard_error_only_equal_scores_tie():
    rows = [row({"scaling": 0.3}, [0.8], 0), row({"scaling": 1.0}, [0.8], 0), row({"scaling": 0.5}, [0.79], 0)]
    best, ties = choose(rows, defaults=DEFAULTS)  # tune-val size unknown: SE 0
    assert ties["standard_error"] == 0 and ties["tied_indices"] == [0, 1] and best is rows[1]
    assert "only equal scores tie" in ties["how"]
    best, ties = choose(rows, samples=100, metric="f1", defaults=DEFAULTS)
    assert ties["standard_error"] == 0 and "'f1' is not a share of samples" in ties["how"]


def test_a_normalised_score_scales_the_standard_error():
    rows = [row({"scaling": 0.3}, [0.6, 0.8], 0), row({"scaling": 0.5}, [0.59, 0.79], 0)]
    for r in rows:
        r["score"] = r["score"] / 0.875  # normalised by an individual mean of 0.875
    _, ties = choose(rows, samples=700, normalised=True, defaults=DEFAULTS)
    assert ties["standard_error"] == pytest.approx(math.sqrt(0.7 * 0.3 / 700) / 0.875)


def test_the_markdown_report_marks_the_ties_and_names_the_rule():
    rows = [row({"filter_ratio": 0.3}, [0.80], 900), row({"filter_ratio": 0.3}, [0.799], 300),
            row({"filter_ratio": 0.3}, [0.5], 0)]
    best, ties = choose(rows, samples=400, defaults=DEFAULTS)
    report = {"candidates": rows, "best": best, "ties": ties, "method": "free_merging", "metric": "accuracy",
              "normalised": False, "seconds": 1.0}
    md = tune_markdown(report)
    assert "Ties: 2 candidates score within one standard error of the best (0.8000; SE = sqrt(p(1-p)/n)" in md
    assert "chosen by smaller expert storage" in md
    lines = [ln for ln in md.splitlines() if ln.startswith(("| {", "| **"))]
    assert lines[0].startswith("| {'filter_ratio': 0.3} | 0.8000 | tie | 900 |")
    assert lines[1].startswith("| **{'filter_ratio': 0.3}** (chosen) | 0.7990 | tie | 300 |")
    assert lines[2].startswith("| {'filter_ratio': 0.3} | 0.5000 |  | 0 |")


def tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_tune_writes_only_its_output_dir_with_a_logger_and_results_table(toy_root, tmp_path):  # noqa: F811
    """A prior run's results, config.yaml and logs in the run's directory stay byte-identical, and nothing new
    appears there, though the config has a logger, the ResultsTable callback and checkpointing."""
    run = tmp_path / "run"
    cfg = config(toy_root, run, method="free_merging")
    cfg["trainer"].update({"logger": True, "enable_checkpointing": True})
    cfg["data"]["tune_fraction"] = 0.5
    path = write_config(tmp_path / "cfg.yaml", cfg)
    main(["test", "--config", str(path)])  # the prior run
    before = tree(run)
    assert "results/results.json" in before and any(name.endswith("config.yaml") for name in before)
    out = tmp_path / "tuned"
    cli = main(["tune", "--config", str(path), "--output_dir", str(out),
                "--space", json.dumps({"expert_density": [0.01, 0.2]})])
    assert tree(run) == before
    assert sorted(p.name for p in out.iterdir()) == ["tune_report.json", "tune_report.md", "tuned.yaml"]
    report = json.loads((out / "tune_report.json").read_text())
    assert report["ties"]["tied"] and report["best"]["params"] == report["ties"]["tied"][
        report["ties"]["tied_indices"].index(report["ties"]["chosen_index"])]
    storage = [c["task_module_bytes"] for c in report["candidates"]]
    assert storage[0] < storage[1]  # d = 1 % stores less than d = 20 %
    assert cli.trainer.callbacks and cli.trainer.logger is not None  # put back after tune


def test_val_args_on_every_task_are_tune_val_without_tune_fraction(toy_root, tmp_path):  # noqa: F811
    cfg = config(toy_root, tmp_path / "run", method="task_arithmetic")
    for task in cfg["data"]["tasks"]:
        task["val_args"] = {"split": "test"}  # the toy family's only held-out split stands in for a validation split
    out = tmp_path / "tuned"
    cli = main(["tune", "--config", str(write_config(tmp_path / "cfg.yaml", cfg)), "--output_dir", str(out),
                "--space", json.dumps({"scaling": [0.3, 1.0]})])
    report = json.loads((out / "tune_report.json").read_text())
    assert cli.datamodule.tune_fraction == 0
    assert {v["source"] for v in report["tune_val"].values()} == {"validation split"}
    assert report["tune_samples"] == {t: len(cli.datamodule._test[t]) for t in cli.datamodule.task_names}
    assert yaml.safe_load((out / "tuned.yaml").read_text())["data"].get("tune_fraction", 0) == 0
    del cfg["data"]["tasks"][1]["val_args"]  # one task without: no tune-val, an error naming it
    with pytest.raises(ConfigError, match=r"val_args; missing for \['task1'\]\) or set data.tune_fraction"):
        main(["tune", "--config", str(write_config(tmp_path / "cfg2.yaml", cfg)), "--output_dir", str(out)])
