"""The run directory: one job at a time, history kept aside, read-only loading with fallback."""

import dataclasses
import json

import pytest
from conftest import config_file, snapshot, start_jaxlm

from jaxlm.errors import UserError
from jaxlm.metrics import read_metrics
from jaxlm.run import RunDir, RunLock, load_run
from jaxlm.train import train


def test_a_second_lock_on_a_run_is_refused_naming_the_holder(tmp_path):
    run = RunDir(tmp_path)
    with RunLock(run):
        with pytest.raises(UserError, match=r"in use by pid \d+ on host .*choose another train.run_dir"):
            with RunLock(run):
                pass
    with RunLock(run):  # released at exit: free again
        pass


def test_a_stale_lock_file_is_taken_over(tmp_path):
    run = RunDir(tmp_path)
    run.lock.write_text(json.dumps({"host": "gone", "pid": 999999, "since": "yesterday"}))
    with RunLock(run):
        assert json.loads(run.lock.read_text())["host"] != "gone"


def test_two_jobs_started_on_one_run_directory_exactly_one_trains(tmp_path, corpus, cache_dir):
    cfg = config_file(tmp_path, corpus, cache_dir, train={"steps": 30, "log_every": 1})
    procs = [start_jaxlm(tmp_path / f"log{i}", "train", "--config", cfg, "--no-progress") for i in range(2)]
    codes = sorted(p.wait(timeout=300) for p in procs)
    logs = [(tmp_path / f"log{i}").read_text() for i in range(2)]
    assert codes == [0, 2], logs
    refused = next(log for log, p in zip(logs, procs) if p.returncode == 2)
    assert refused.strip().splitlines()[-1].startswith("jaxlm: error: run directory")
    assert "is in use by pid" in refused
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 31))


def test_history_is_set_aside_under_a_timestamp(tmp_path):
    run = RunDir(tmp_path)
    run.metrics.write_text('{"step": 1}\n')
    (run.tensorboard / "x").mkdir(parents=True)
    messages = []
    run.set_history_aside(messages.append)
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept[0].startswith("metrics.") and kept[0].endswith(".jsonl") and kept[1].startswith("tensorboard.")
    assert (tmp_path / kept[0]).read_text() == '{"step": 1}\n'
    assert "earlier history is kept as" in messages[0]


def _truncate_arrays(step_dir):
    for path in step_dir.rglob("*"):
        if path.is_file() and "/d/" in str(path):
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_reading_a_run_falls_back_past_an_unreadable_checkpoint_and_moves_nothing(tiny_cfg):
    train(tiny_cfg, show_progress=False)  # checkpoints 3 and 6
    _truncate_arrays(tiny_cfg.run_dir / "checkpoints" / "6")
    before = snapshot(tiny_cfg.run_dir)
    warnings = []
    _, _, _, step = load_run(tiny_cfg.run_dir, log=warnings.append)
    assert step == 3 and "checkpoint 6 is unreadable" in warnings[0]
    assert snapshot(tiny_cfg.run_dir) == before
    with pytest.raises(UserError, match="checkpoint 6 .* is unreadable .*choose another --step"):
        load_run(tiny_cfg.run_dir, step=6)


def test_a_write_probe_failure_names_the_run_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="is not writable"):
        RunDir(blocker / "run").prepare()


def test_config_is_written_whole(tiny_cfg):
    run = RunDir(tiny_cfg.run_dir)
    run.prepare()
    run.write_config(dataclasses.replace(tiny_cfg, name="x"))
    assert "name: x" in run.config.read_text()
    assert [p.name for p in tiny_cfg.run_dir.iterdir()] == ["config.yaml"]  # no temporary left
