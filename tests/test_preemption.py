"""SIGTERM/SIGINT on a real `jaxlm train` process."""

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
