"""The zoo cache is verified before use, keyed by the build's thread count, and its build reports progress.

A "micro" recipe (two tasks, a few dozen images, one thread) keeps each build under ~2 s.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

import freemerge_pl.io as fio
from freemerge_pl.adapters.zoo_vit import ZooViTAdapter
from freemerge_pl.errors import FreeMergeError
from freemerge_pl.zoo import cache as zoo_cache
from freemerge_pl.zoo.progress import BuildProgress, load_note
from freemerge_pl.zoo.vision import (
    ZooTaskDataset,
    ensure_zoo,
    load_task_data,
    read_manifest,
    recipe,
    recipe_hash,
    verify_zoo,
    zoo_recipe,
)
from freemerge_pl.zoo.vision import __main__ as zoo_main
from freemerge_pl.zoo.vision import build as zoo_build

SEED = 5
TASKS = ["digits", "signs"]


@pytest.fixture(scope="module", autouse=True)
def micro_recipe():
    """The ``tiny`` size shrunk to two tasks and a few dozen images, built with one thread."""
    tiny = recipe.SIZES["tiny"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(tiny, "data", {"n_train": 24, "n_router": 4, "n_test": 16})
        mp.setitem(tiny, "pretrain", {**tiny["pretrain"], "n_images": 64, "batch_size": 32})
        mp.setitem(tiny, "probe", {**tiny["probe"], "max_iter": 10})
        mp.setitem(tiny, "finetune", {**tiny["finetune"], "batch_size": 16})
        mp.setattr(recipe, "available_tasks", lambda: list(TASKS))
        mp.setenv("FREEMERGE_ZOO_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def micro_zoo(tmp_path_factory) -> Path:
    return ensure_zoo(tmp_path_factory.mktemp("zoo") / "micro", size="tiny", seed=SEED)


@pytest.fixture
def copy(micro_zoo, tmp_path) -> Path:
    """A fresh copy of the micro zoo (new paths: nothing of it is verified in this process yet)."""
    return Path(shutil.copytree(micro_zoo, tmp_path / "copy"))


def _zero_region(path: Path, nbytes: int = 2048) -> None:
    """Overwrite ``nbytes`` in the middle of the file's data with zeros; the size stays the same."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\0" * min(nbytes, size // 4))
    assert path.stat().st_size == size


# ----------------------------------------------------------------------------------------------- verification
def test_zeroed_region_is_named_before_any_evaluation(copy):
    victim = copy / "finetuned" / "digits" / "model.safetensors"
    ensure_zoo(copy, size="tiny", seed=SEED)  # intact: accepted
    time.sleep(0.05)  # the change must be seen by its timestamps, as a later edit would be
    _zero_region(victim)
    for use in (lambda: ensure_zoo(copy, size="tiny", seed=SEED),
                lambda: ZooViTAdapter(root=str(copy), size="tiny", seed=SEED).finetuned_state_dict("digits"),
                lambda: ZooTaskDataset(str(copy), "digits", "test", "tiny", SEED).images):
        with pytest.raises(FreeMergeError, match=rf"{victim}.*sha256.*--rebuild"):
            use()


def test_damaged_data_file_is_named_when_loaded(copy):
    data = copy / "data" / "signs.safetensors"
    assert set(load_task_data(copy, "signs")) == {f"{s}_{v}" for s in ("train", "router", "val", "test") for v in "xy"}
    time.sleep(0.05)
    _zero_region(data, 256)
    with pytest.raises(FreeMergeError, match=rf"{data}.*damaged"):
        load_task_data(copy, "signs")


def test_truncated_file_is_named(copy):
    head = copy / "finetuned" / "signs" / "head.safetensors"
    size = head.stat().st_size
    os.truncate(head, size - 10)
    with pytest.raises(FreeMergeError, match=rf"{head} is damaged or truncated: {size - 10} bytes, its manifest "
                                             rf"records {size}.*python -m freemerge_pl.zoo.vision .*--rebuild"):
        ensure_zoo(copy, size="tiny", seed=SEED)
    with pytest.raises(FreeMergeError, match=rf"{head}.*truncated"):  # the reader alone names it too
        fio.load_state_dict(head)


def test_sha256_once_per_process_and_again_after_a_change(copy, monkeypatch):
    """The size is compared on every use, the sha256 only on first use and after the file changed."""
    hashed = []
    real = fio.sha256_file
    monkeypatch.setattr(fio.files, "sha256_file", lambda p, *a, **k: hashed.append(Path(p).name) or real(p, *a, **k))
    manifest = read_manifest(copy)
    verify_zoo(copy)
    assert sorted(hashed) == sorted(Path(f).name for f in manifest["files"])
    hashed.clear()
    verify_zoo(copy)
    assert hashed == []
    config = copy / "pretrained" / "config.json"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, new mtime: hashed again
    verify_zoo(copy)
    assert hashed == ["config.json"]
    with open(config, "ab") as f:  # a resized file fails on the size alone
        f.write(b" ")
    hashed.clear()
    with pytest.raises(FreeMergeError, match=rf"{config} is damaged or truncated"):
        verify_zoo(copy)
    assert hashed == []


def test_manifest_records_size_and_sha256_of_every_file(micro_zoo):
    manifest = read_manifest(micro_zoo)
    files = {p.relative_to(micro_zoo).as_posix() for p in micro_zoo.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == files
    for rel, record in manifest["files"].items():
        raw = (micro_zoo / rel).read_bytes()
        assert record == {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}, rel


def test_rebuild_command_repairs_a_damaged_zoo(copy, micro_zoo, capsys):
    victim = copy / "pretrained" / "model.safetensors"
    _zero_region(victim)
    zoo_main.main(["--size", "tiny", "--seed", str(SEED), "--root", str(copy), "--rebuild"])
    assert str(copy) in capsys.readouterr().out
    assert victim.read_bytes() == (micro_zoo / "pretrained" / "model.safetensors").read_bytes()  # same bits
    verify_zoo(copy)


# ----------------------------------------------------------------------------------------------- cache key
def test_cache_key_includes_the_build_thread_count(micro_zoo, monkeypatch):
    one, two = zoo_recipe("tiny", threads=1), zoo_recipe("tiny", threads=2)
    assert one["environment"]["threads"] == 1 and two["environment"]["threads"] == 2
    assert recipe_hash(one, SEED) != recipe_hash(two, SEED)
    manifest = read_manifest(micro_zoo)
    assert manifest["recipe"]["environment"] == zoo_recipe("tiny")["environment"]
    assert manifest["recipe"]["environment"]["threads"] == manifest["build"]["threads"] == 1  # the count it used
    assert manifest["recipe"]["environment"]["torch"] == ".".join(torch.__version__.split(".")[:2])

    reasons = []
    monkeypatch.setattr(zoo_cache, "build_zoo", lambda spec, dest, size, seed, reason=None: reasons.append(reason))
    ensure_zoo(micro_zoo, size="tiny", seed=SEED)
    assert reasons == []  # same thread count: the cache is used
    monkeypatch.setenv("FREEMERGE_ZOO_THREADS", "2")
    ensure_zoo(micro_zoo, size="tiny", seed=SEED)
    assert len(reasons) == 1 and "environment.threads: 1 -> 2" in reasons[0]


def test_bad_thread_count_is_named(monkeypatch):
    monkeypatch.setenv("FREEMERGE_ZOO_THREADS", "two")
    with pytest.raises(FreeMergeError, match="FREEMERGE_ZOO_THREADS='two'"):
        zoo_recipe("tiny")


# ----------------------------------------------------------------------------------------------- progress
def test_build_logs_progress_lines_on_a_non_terminal_stream(tmp_path, caplog, monkeypatch):
    interval = 0.1
    monkeypatch.setenv("FREEMERGE_PROGRESS_SECONDS", str(interval))
    stream = io.StringIO()  # not a terminal
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("freemerge_pl.zoo.vision")
    logger.addHandler(handler)
    logger.addHandler(caplog.handler)  # directly: cli's logging set-up may stop freemerge_pl.* propagating
    dest = tmp_path / "zoo"
    finetune = zoo_build.finetune

    def slow_finetune(*args, **kwargs):  # a stage longer than the interval, however fast the machine
        time.sleep(4 * interval)
        return finetune(*args, **kwargs)

    monkeypatch.setattr(zoo_build, "finetune", slow_finetune)
    try:
        with caplog.at_level(logging.INFO, logger="freemerge_pl.zoo.vision"):
            ensure_zoo(dest, size="tiny", seed=SEED)
    finally:
        logger.removeHandler(handler)
        logger.removeHandler(caplog.handler)
    records = [r for r in caplog.records if r.name == "freemerge_pl.zoo.vision"]
    lines = [r.getMessage() for r in records]
    assert "built once" in lines[0] and str(dest) in lines[0] and "expect ~" in lines[0] and "1 thread" in lines[0]
    stages = [line for line in lines if line.startswith("zoo build: ")]
    for part in ("generating the data of task 1/2", "pre-training", "linear probe of task 1/2",
                 "fine-tuning task 1/2", "fine-tuning task 2/2", "evaluating fine-tuned task 2/2"):
        assert any(part in line for line in stages), part
    assert all("elapsed" in line and "eta" in line for line in stages)
    assert any(r.threadName == "zoo-build-progress" for r in records)  # periodic lines while a stage runs
    gaps = [b.created - a.created for a, b in itertools.pairwise(records)]
    assert max(gaps) < 10 * interval + 1.0, max(gaps)  # a line at least every interval (plus scheduling slack)
    assert "zoo build: pre-training" in stream.getvalue() and "\r" not in stream.getvalue()
    assert read_manifest(dest)["build"]["seconds_by_kind"]["train"] > 0


def test_progress_estimates_from_prior_then_measured_rates():
    now = [0.0]
    progress = BuildProgress({"data": 10, "train": 100}, {"data": 0.5, "train": 0.1},
                             logging.getLogger("test"), interval_s=30, clock=lambda: now[0])
    assert progress.estimate_total_s() == pytest.approx(10 * 0.5 + 100 * 0.1)
    progress.stage("data", "data", 10)
    now[0] = 2.0
    progress.advance(10)  # 10 images in 2 s: 0.2 s each (measured; the prior said 0.5)
    progress.stage("train", "train", 100)
    # train not measured yet: its prior times the slowdown measured so far (data ran at 0.2 / 0.5 of its prior)
    assert progress.remaining_s() == pytest.approx(100 * 0.1 * (0.2 / 0.5))
    now[0] = 6.0
    progress.advance(50)  # 50 samples in 4 s: 0.08 s each
    assert progress.remaining_s() == pytest.approx(50 * 0.08)
    assert progress.status() == "zoo build: train 50/100 samples, elapsed 6s, eta 4s (whole build)"
    progress.finish()
    assert progress.seconds_by_kind() == {"data": 2.0, "scenes": 0.0, "train": 4.0, "infer": 0.0}


def test_progress_lines_say_when_the_machine_is_loaded(monkeypatch):
    assert load_note(2, load=1.5) == ""
    assert load_note(2, load=6.25) == " (machine loaded: load average 6.2 on 2 build threads; it will run slower)"
    monkeypatch.setattr(os, "getloadavg", lambda: (12.0, 9.0, 6.0))
    progress = BuildProgress({"train": 10}, {"train": 1.0}, logging.getLogger("test"), interval_s=30,
                             clock=lambda: 0.0, name="text zoo", threads=2)
    progress.stage("train", "train", 10)
    assert progress.status() == ("text zoo build: train 0/10 samples, elapsed 0s, eta 10s (whole build) (machine "
                                 "loaded: load average 12.0 on 2 build threads; it will run slower)")
    progress.finish()


def test_one_command_builds_either_zoo(micro_zoo, capsys):
    from freemerge_pl.zoo.__main__ import main

    assert main(["--zoo", "vision", "--size", "tiny", "--seed", str(SEED), "--root", str(micro_zoo)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{micro_zoo}\nzoo tiny seed {SEED}") and "digits" in out and "signs" in out
