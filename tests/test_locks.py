"""One writer per output directory (``freemerge_pl.io.output_lock``), tested with real processes: a second merge
job or export into an output being written is refused at once with one line naming the directory and the
other process (exit status 2), the first run's output is untouched and verifies; a killed run's lock is taken
over. The holders pause mid-write until the test creates a ``go`` file, so a lock that waited instead of
refusing would hang the test (each wait below has a timeout)."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from freemerge_pl.io import (
    OutputLockedError,
    load_state_dict,
    lock_path,
    output_lock,
    read_export,
    staging_dir,
    verify_published,
    write_export,
)
from freemerge_pl.jobs.merge_job import MergeJobConfig, run_merge_job

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX flock")
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

#: a merge job or export that pauses after writing its first file until ``argv[3]`` (the go file) exists
HOLDER = """
import sys, time, pathlib
mode, target, go = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])

def pause():
    print("paused", flush=True)
    deadline = time.time() + 60
    while not go.exists() and time.time() < deadline:
        time.sleep(0.02)

if mode == "job":
    import yaml
    from freemerge_pl import io
    from freemerge_pl.jobs.merge_job import MergeJobConfig, run_merge_job
    real, paused = io.ShardedSafetensorsSink.write, []
    def write(self, key, tensor, state=None):
        real(self, key, tensor, state)
        if self.completed_keys() and not paused:  # the first shard is complete
            paused.append(pause())
    io.ShardedSafetensorsSink.write = write
    run_merge_job(MergeJobConfig(**yaml.safe_load(open(target))), progress=False)
elif mode == "lock":
    from freemerge_pl.io import output_lock
    with output_lock(target):
        pause()
else:
    import torch
    from freemerge_pl.io import export
    real = export.save_state_dict
    def save(*args, **kwargs):
        out = real(*args, **kwargs)
        pause()
        return out
    export.save_state_dict = save
    sd = {"w": torch.full((4, 4), float(mode == "export-a")), "b": torch.arange(4.0)}
    export.write_export(target, sd, [], {}, {"method": mode}, names=None, method=mode)
print("done", flush=True)
"""

#: the second writer: the export API; exits 2 with one ``error:`` line on a package error, as ``cli.py`` does
SECOND_EXPORT = """
import sys, torch
from freemerge_pl.errors import FreeMergeError, one_line
from freemerge_pl.io import write_export
try:
    write_export(sys.argv[1], {"w": torch.zeros(2)}, [], {}, {"method": "second"}, names=None, method="second")
except FreeMergeError as err:
    print(f"error: {one_line(err)}", file=sys.stderr)
    sys.exit(2)
"""


def start_holder(tmp_path, mode, target):
    script = tmp_path / "holder.py"
    script.write_text(textwrap.dedent(HOLDER))
    go = tmp_path / f"go-{mode}"
    proc = subprocess.Popen([sys.executable, str(script), mode, str(target), str(go)], stdout=subprocess.PIPE,
                            text=True, env=ENV, cwd=tmp_path)
    line = proc.stdout.readline().strip()
    if line != "paused":
        proc.kill()
        pytest.fail(f"the holder did not reach its pause (printed {line!r}, status {proc.wait()})")
    return proc, go


def finish(proc, go):
    go.touch()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.strip() == "done", (proc.returncode, out)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def tiny_models(root: Path, k: int = 2) -> list[Path]:
    """A base and ``k`` fine-tuned checkpoints (HF-style directories, one small safetensors file each)."""
    g = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(8, 8, generator=g) for i in range(4)}
    paths = []
    for j in range(k + 1):
        sd = base if j == 0 else {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in base.items()}
        path = root / ("base" if j == 0 else f"ft{j}")
        path.mkdir(parents=True)
        save_file({n: t.contiguous() for n, t in sd.items()}, str(path / "model.safetensors"))
        (path / "config.json").write_text('{"model_type": "tiny"}')
        paths.append(path)
    return paths


def job_config(paths, out) -> dict:
    # 4 tensors of 256 bytes, at most 2 per shard: the holder pauses after the first of 2 shards
    return {"base_model": str(paths[0]), "models": [str(p) for p in paths[1:]], "merge_method": "ties",
            "parameters": {"density": 0.5}, "out_shard_size": 600, "output_dir": str(out)}


def test_a_second_merge_job_into_the_same_output_is_refused_at_once(tmp_path, capsys):
    """Job 1 (a real process) pauses mid-write; job 2 through ``cli_main`` is refused with one line naming the
    output and job 1's pid and command, status 2, while job 1's staging directory stays as it was; job 1 then
    finishes and its output verifies and equals an uninterrupted run's."""
    import yaml

    from freemerge_pl.lightning.cli import cli_main

    paths = tiny_models(tmp_path / "models")
    out = tmp_path / "merged"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(job_config(paths, out)))
    proc, go = start_holder(tmp_path, "job", cfg)
    try:
        before = snapshot(staging_dir(out))
        assert before and not out.exists()
        assert cli_main(["merge", "--config", str(cfg), "--progress", "false"]) == 2
        errors = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in errors if line.startswith("error: ")]
        assert len(errors) == 1, errors
        assert f"{out} is being written by pid {proc.pid} (" in errors[0] and "holder.py job" in errors[0]
        assert re.search(r"since \d\d:\d\d:\d\d", errors[0])
        assert snapshot(staging_dir(out)) == before and not out.exists()  # job 1's partial output untouched
        # the same refusal through the Python API, with --resume false: it must not discard job 1's shards
        with pytest.raises(OutputLockedError, match=f"pid {proc.pid}"):
            run_merge_job(MergeJobConfig(**job_config(paths, out)), resume=False, progress=False)
        assert snapshot(staging_dir(out)) == before
    finally:
        finish(proc, go)
    manifest = verify_published(out)
    reference = run_merge_job(MergeJobConfig(**job_config(paths, tmp_path / "ref")), progress=False)
    assert sorted(manifest["files"]) == [f for f in reference["files"] if f != "merge_info.json"]
    assert snapshot(out) == snapshot(tmp_path / "ref")
    assert not lock_path(out).exists() and not staging_dir(out).exists()


def test_a_second_export_process_is_refused_and_the_first_export_survives(tmp_path):
    """Two real processes export into one directory (``write_export``, the writer of ``save_merge`` and
    ``MergedModule.export``): the second exits 2 with one line naming the directory and the first process;
    the first's export is published whole and reads back with its own tensors."""
    out = tmp_path / "export"
    proc, go = start_holder(tmp_path, "export-a", out)
    try:
        script = tmp_path / "second.py"
        script.write_text(textwrap.dedent(SECOND_EXPORT))
        second = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, env=ENV,
                                timeout=120, check=False)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {out} is being written by pid {proc.pid} ")
        assert "holder.py export-a" in lines[0]
    finally:
        finish(proc, go)
    export = read_export(out)  # verifies every file against the manifest
    assert export.manifest["method"] == "export-a"
    assert torch.equal(export.state_dict["w"], torch.ones(4, 4))
    assert torch.equal(export.state_dict["b"], torch.arange(4.0))


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, caplog):
    """While its holder lives, the lock (and the ``export`` command) refuses naming it; once the holder is SIGKILLed (its lock file, with
    its pid, left behind) the next writer takes the lock over, says so in the log, and publishes."""
    out = tmp_path / "out"
    proc, _go = start_holder(tmp_path, "lock", out)
    record = json.loads(lock_path(out).read_text())
    assert record["pid"] == proc.pid and "holder.py lock" in record["command"]
    with pytest.raises(OutputLockedError) as err, output_lock(out):
        pass
    message = str(err.value)
    assert message.startswith(f"{out} is being written by pid {proc.pid} (") and "\n" not in message
    assert time.strftime("%H:%M:%S", time.localtime(record["started"])) in message
    # the ``export`` command takes the lock before its merge: refused before it touches the model or data
    from freemerge_pl.lightning.trainer import FreeMergeTrainer

    trainer = FreeMergeTrainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(OutputLockedError, match=f"pid {proc.pid}"):
        trainer.export(model=object(), datamodule=object(), output_dir=str(out))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert json.loads(lock_path(out).read_text())["pid"] == proc.pid  # stale: nobody holds its flock
    with caplog.at_level("WARNING", logger="freemerge_pl"):
        write_export(out, {"w": torch.ones(3)}, [], {}, {"method": "after"}, names=None, method="after")
    assert any("took over" in r.getMessage() and f"pid {proc.pid}" in r.getMessage() for r in caplog.records)
    assert torch.equal(load_state_dict(out)["w"], torch.ones(3)) and not lock_path(out).exists()


def test_the_lock_is_reentrant_within_a_process_and_removed_on_release(tmp_path, monkeypatch):
    """A writer called inside a run that holds the lock (the ``export`` command around ``MergedModule.export``)
    does not refuse itself, however the directory is spelled; the lock file is gone after the run."""
    monkeypatch.chdir(tmp_path)
    with output_lock(tmp_path / "sub" / ".." / "out") as path:
        assert path == tmp_path / ".out.lock" and json.loads(path.read_text())["pid"] == os.getpid()
        write_export("out", {"w": torch.zeros(2)}, [], {}, {"method": "nested"}, names=None, method="nested")
        assert path.exists()
    assert not path.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert read_export(tmp_path / "out").manifest["method"] == "nested"
