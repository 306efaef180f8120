"""Two processes on localhost (gloo CPU collectives, 2 devices each) form one 4-device job."""

import os
import subprocess
import sys

import jax
import numpy as np
import portpicker
from conftest import REPO, config_file, xla_flags

from jaxlm.run import load_run
from jaxlm.metrics import read_metrics

RUN = {"train": {"steps": 6, "log_every": 1, "eval_every": 3}, "checkpoint": {"every": 3}}


def _launch(cfg, processes, devices_each):
    """Starts the job's processes and waits for all of them."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices_each))
    args = [sys.executable, "-m", "jaxlm", "train", "--config", str(cfg), "--no-progress"]
    if processes > 1:
        port = portpicker.pick_unused_port()
        args += ["--coordinator", f"localhost:{port}", "--num-processes", str(processes)]
    procs = [
        subprocess.Popen(args + (["--process-id", str(i)] if processes > 1 else []), env=env,
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(processes)
    ]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError("job hung:\n" + "\n".join(p.communicate()[0][-2000:] for p in procs))
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]


def _metrics(run_dir):
    records = read_metrics(run_dir / "metrics.jsonl")
    return ({r["step"]: r["loss"] for r in records if "loss" in r},
            {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r})


def test_two_processes_match_one_process_and_restore_on_one_device(tmp_path, corpus, cache_dir):
    _launch(config_file(tmp_path / "four", corpus, cache_dir, **RUN), processes=1, devices_each=4)
    _launch(config_file(tmp_path / "two", corpus, cache_dir, **RUN), processes=2, devices_each=2)
    four_losses, four_evals = _metrics(tmp_path / "four" / "run")
    two_losses, two_evals = _metrics(tmp_path / "two" / "run")
    assert sorted(two_losses) == list(range(1, 7)) and sorted(two_evals) == [3, 6]
    np.testing.assert_allclose([two_losses[s] for s in range(1, 7)],
                               [four_losses[s] for s in range(1, 7)], rtol=1e-5)
    _, _, params_two, step = load_run(tmp_path / "two" / "run", devices=jax.devices()[:1])
    _, _, params_four, _ = load_run(tmp_path / "four" / "run", devices=jax.devices()[:1])
    assert step == 6
    for a, b in zip(jax.tree.leaves(params_two), jax.tree.leaves(params_four)):
        assert a.sharding.mesh.size == 1
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
