"""SIGTERM/SIGINT on a real `jaxlm train` process."""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, config_file, jaxlm_cli, start_jaxlm

from jaxlm.checkpoint import Checkpointer
from jaxlm.config import CheckpointConfig
from jaxlm.metrics import read_metrics

LONG_RUN = {"train": {"steps": 100000, "log_every": 1}, "checkpoint": {"every": 100000}}


def _started(run_dir, proc, steps=3, timeout=120.0):
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while not (path.exists() and path.read_text().count("\n") >= steps):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)


def test_sigterm_checkpoints_the_current_step_and_exits_0(tmp_path, corpus, cache_dir):
    cfg = config_file(tmp_path, corpus, cache_dir, **LONG_RUN)
    run = tmp_path / "run"
    proc = start_jaxlm(tmp_path / "log", "train", "--config", cfg, "--no-progress")
    _started(run, proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, (tmp_path / "log").read_text()
    assert time.monotonic() - sent < 15
    saved = Checkpointer(run / "checkpoints", CheckpointConfig()).all_steps()
    logged = [r["step"] for r in read_metrics(run / "metrics.jsonl")]
    assert saved == [logged[-1]] and logged == list(range(1, logged[-1] + 1))
    resumed = jaxlm_cli("train", "--config", cfg, "--no-progress", "--set", f"train.steps={saved[0] + 2}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {saved[0]}" in resumed.stdout
    logged = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert logged == list(range(1, saved[0] + 3))


ABORT_SCRIPT = """
import os, signal, time
from jaxlm.preemption import StopRequest
with StopRequest() as stop:
    stop.setup_done()
    os.kill(os.getpid(), signal.{sig})
    assert stop.requested
    print("first signal noted", flush=True)
    os.kill(os.getpid(), signal.{sig})
    time.sleep(30)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_second_signal_aborts_at_once(sig):
    proc = subprocess.run([sys.executable, "-c", ABORT_SCRIPT.format(sig=sig)], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert "first signal noted" in proc.stdout
    assert proc.returncode == -getattr(signal, sig)


def test_a_signal_during_setup_stops_at_once_with_one_line():
    from jaxlm.errors import TrainingStopped
    from jaxlm.preemption import StopRequest

    with pytest.raises(TrainingStopped, match="SIGTERM during setup: stopped before the first step"):
        with StopRequest():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)


def test_a_setup_signal_whose_exception_library_code_swallowed_still_stops_before_training():
    from jaxlm.errors import TrainingStopped
    from jaxlm.preemption import StopRequest

    with StopRequest() as stop:
        try:  # what tfds does around its logger calls
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Exception:
            pass
        with pytest.raises(TrainingStopped, match="SIGTERM during setup"):
            stop.setup_done()


def test_sigterm_during_setup_of_a_real_run_exits_with_one_line(tmp_path, corpus):
    cfg = config_file(tmp_path, corpus, tmp_path / "fresh_cache")  # a dataset build to interrupt
    proc = start_jaxlm(tmp_path / "log", "train", "--config", cfg, "--no-progress")
    log = tmp_path / "log"
    deadline = time.monotonic() + 60
    while "name: cli" not in log.read_text():  # the config is printed when setup begins
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 1
    assert log.read_text().strip().splitlines()[-1].startswith("jaxlm: stopped: SIGTERM during setup")
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())


def test_sigterm_during_eval_saves_the_step_it_arrived_at(tiny_cfg, monkeypatch):
    from jaxlm.evaluate import Evaluator
    from jaxlm.train import train

    evaluate = Evaluator.__call__

    def signalled_eval(self, params, batches):
        os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(self, params, batches)

    monkeypatch.setattr(Evaluator, "__call__", signalled_eval)
    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, steps=20, eval_every=4),
                              checkpoint=dataclasses.replace(tiny_cfg.checkpoint, every=100))
    train(cfg, show_progress=False)
    assert Checkpointer(cfg.run_dir / "checkpoints", cfg.checkpoint).all_steps() == [4]
    assert max(r["step"] for r in read_metrics(cfg.run_dir / "metrics.jsonl")) == 4
