"""Restarts: after kill -9 (real subprocesses), over unreadable checkpoints, with edited configs."""

import dataclasses
import json
import random
import shutil
import signal
import time

import pytest
from conftest import config_file, jaxlm_cli, snapshot, start_jaxlm, write_corpus

from jaxlm.checkpoint import Checkpointer
from jaxlm.cli import main
from jaxlm.errors import UserError
from jaxlm.metrics import read_metrics
from jaxlm.config import to_dict
from jaxlm.resume import config_changes, dataset_changes
from jaxlm.token_stream import ROW_LAYOUT
from jaxlm.train import train

KILL_RUN = {"train": {"steps": 24, "log_every": 1}, "checkpoint": {"every": 4, "keep": 10}}


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def _wait_for(predicate, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "training ended before the kill point"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.01)


def _steps_logged(run_dir):
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def _saving(run_dir):
    ckpt = run_dir / "checkpoints"
    return ckpt.exists() and any("tmp" in p.name for p in ckpt.iterdir())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, cache_dir):
    tmp = tmp_path_factory.mktemp("reference")
    proc = jaxlm_cli("train", "--config", config_file(tmp, corpus, cache_dir, **KILL_RUN), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return _losses(tmp / "run")


@pytest.mark.parametrize("moment", ["between-steps", "during-save"])
def test_sigkill_then_restart_matches_the_uninterrupted_run_bitwise(moment, reference, tmp_path, corpus, cache_dir):
    cfg = config_file(tmp_path, corpus, cache_dir, **KILL_RUN)
    run = tmp_path / "run"
    proc = start_jaxlm(tmp_path / "killed.log", "train", "--config", cfg, "--no-progress")
    if moment == "during-save":
        _wait_for(lambda: _steps_logged(run) >= 5 and _saving(run), proc)
    else:
        kill_at = random.Random(0).randint(2, 20)
        _wait_for(lambda: _steps_logged(run) >= kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = jaxlm_cli("train", "--config", cfg, "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(run) == reference  # every step, compared as exact floats


def _truncate(directory):
    for path in directory.rglob("*"):
        if path.is_file() and "/d/" in str(path):
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_unreadable_newest_checkpoint_falls_back_with_a_warning(tiny_cfg, capsys):
    train(tiny_cfg, show_progress=False)  # checkpoints at 3 and 6
    _truncate(tiny_cfg.run_dir / "checkpoints" / "6")
    longer = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, steps=9))
    capsys.readouterr()
    train(longer, show_progress=False)
    err = capsys.readouterr().err
    assert "warning: checkpoint 6 is unreadable" in err and "trying the previous one" in err
    assert [p.name.split("-")[0] for p in (tiny_cfg.run_dir / "quarantine").iterdir()] == ["6"]
    assert sorted(_losses(tiny_cfg.run_dir)) == list(range(1, 10))
    assert Checkpointer(tiny_cfg.run_dir / "checkpoints", tiny_cfg.checkpoint).all_steps()[-1] == 9


def test_config_edits_on_resume(tiny_cfg, capsys):
    train(dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, steps=3)), show_progress=False)
    wider = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, d_model=48))
    with pytest.raises(UserError, match=r"model\.d_model: 32 -> 48.*--force-resume"):
        train(wider, show_progress=False)
    workers = dataclasses.replace(tiny_cfg, data=dataclasses.replace(tiny_cfg.data, worker_count=1))
    with pytest.raises(UserError, match=r"data\.worker_count: 0 -> 1"):
        train(workers, show_progress=False)
    reseeded = dataclasses.replace(tiny_cfg, seed=7)
    with pytest.raises(UserError, match=r"seed: 0 -> 7"):
        train(reseeded, show_progress=False)
    capsys.readouterr()
    train(tiny_cfg, show_progress=False)  # steps 3 -> 6: safe
    assert "config change accepted on resume: train.steps: 3 -> 6" in capsys.readouterr().err
    assert sorted(_losses(tiny_cfg.run_dir)) == list(range(1, 7))
    workers = dataclasses.replace(workers, train=dataclasses.replace(tiny_cfg.train, steps=8))
    train(workers, show_progress=False, force_resume=True)  # the old data position cannot apply
    assert "data stream restarts from its beginning (data.worker_count changed)" in capsys.readouterr().err
    assert sorted(_losses(tiny_cfg.run_dir)) == list(range(1, 9))
    assert not (tiny_cfg.run_dir / "quarantine").exists()


def test_a_config_saved_before_a_key_existed_resumes_with_that_keys_default(tiny_cfg):
    saved = to_dict(tiny_cfg)
    del saved["data"]["noise_density"], saved["model"]["architecture"]  # keys added later
    assert config_changes(saved, tiny_cfg) == {}
    assert config_changes(saved, dataclasses.replace(tiny_cfg, data=dataclasses.replace(
        tiny_cfg.data, noise_density=0.3))) == {"data.noise_density": (0.15, 0.3)}


# ---------------------------------------------------------------- what a start may and may not touch


def _trained(tmp_path, corpus, cache_dir, **sections):
    cfg = config_file(tmp_path, corpus, cache_dir, **sections)  # checkpoints at 4 and 8
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    return cfg, tmp_path / "run"


def _one_line_error(capsys, argv, code=2):
    capsys.readouterr()
    assert main([str(a) for a in argv]) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("change", ["model.d_model=64", "model.n_layers=3", "model.tie_embeddings=false",
                                    "optimizer.grad_clip=0"])
def test_a_readable_checkpoint_that_does_not_fit_stops_the_start_and_touches_nothing(
        change, tmp_path, corpus, cache_dir, capsys):
    cfg, run = _trained(tmp_path, corpus, cache_dir)
    before = snapshot(run)
    err = _one_line_error(capsys, ["train", "--config", cfg, "--no-progress", "--force-resume",
                                   "--set", change, "--set", "train.steps=12"])
    assert err.startswith("jaxlm: error: checkpoint 8 has ")
    assert snapshot(run) == before  # nothing quarantined, metrics and config untouched


def test_a_missing_item_is_another_layout_not_damage(tmp_path, corpus, cache_dir, capsys):
    cfg, run = _trained(tmp_path, corpus, cache_dir)
    shutil.rmtree(run / "checkpoints" / "8" / "opt")
    before = snapshot(run)
    err = _one_line_error(capsys, ["train", "--config", cfg, "--set", "train.steps=12"])
    assert "checkpoint 8" in err and "has no 'opt' item" in err
    assert snapshot(run) == before


@pytest.mark.parametrize("loss", ["checkpoints deleted", "every checkpoint unreadable"])
def test_a_start_that_restores_nothing_keeps_the_earlier_history(loss, tmp_path, corpus, cache_dir, capsys):
    cfg, run = _trained(tmp_path, corpus, cache_dir)
    history = (run / "metrics.jsonl").read_text()
    if loss == "checkpoints deleted":
        shutil.rmtree(run / "checkpoints")
    else:
        for step_dir in (run / "checkpoints").iterdir():
            _truncate(step_dir)
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--no-progress", "--set", "train.steps=2"]) == 0
    assert "the earlier history is kept as metrics." in capsys.readouterr().err
    (kept,) = run.glob("metrics.*.jsonl")
    assert kept.read_text() == history
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2]
    assert len(list(run.glob("tensorboard.*"))) == 1


@pytest.mark.parametrize("edit", ["add", "remove", "modify"])
def test_a_changed_corpus_is_refused_naming_the_change(edit, tmp_path, cache_dir, capsys):
    corpus = write_corpus(tmp_path / "own_corpus")
    cfg, run = _trained(tmp_path, corpus, cache_dir)
    if edit == "add":
        (corpus / "extra.py").write_text("def extra():\n    return 1\n")
    elif edit == "remove":
        (corpus / "mod0.py").unlink()
    else:
        (corpus / "mod1.py").write_text("changed = True\n")
    before = snapshot(run)
    err = _one_line_error(capsys, ["train", "--config", cfg, "--set", "train.steps=12"])
    expected = {"add": "1 file added", "remove": "1 file removed", "modify": "1 file modified"}[edit]
    assert f"the corpus changed since checkpoint 8 was written ({expected})" in err and "--force-resume" in err
    assert snapshot(run) == before
    assert main(["train", "--config", str(cfg), "--no-progress", "--force-resume", "--set", "train.steps=10"]) == 0
    assert f"data stream restarts from its beginning (corpus: {expected} changed)" in capsys.readouterr().err
    assert sorted(_losses(run)) == list(range(1, 11))


@pytest.mark.parametrize("argv", [["--set", "train.steps=8"], ["--set", "train.steps=5"], ["--stop-at", "6"]])
def test_a_run_already_at_its_end_does_nothing(argv, tmp_path, corpus, cache_dir, capsys):
    cfg, run = _trained(tmp_path, corpus, cache_dir)
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--no-progress", *argv]) == 0
    out = capsys.readouterr().out
    assert "already at step 8" in out and "nothing to do" in out
    assert snapshot(run) == before


@pytest.mark.parametrize("saved_stream, named", [
    (None, "one stream per batch row"),  # the per-row streams wrote no "stream"
    ("token-stream-1", "token-stream-1"),  # consecutive stream rows per batch
])
def test_a_checkpoint_of_an_earlier_pipeline_names_the_change(saved_stream, named):
    saved = {"dataset": "python_stdlib", "files": {"a.py": "1"}}
    saved = saved if saved_stream is None else {**saved, "stream": saved_stream}
    now = {**saved, "stream": ROW_LAYOUT}
    assert dataset_changes(saved, now) == f"data pipeline {named} -> {ROW_LAYOUT}"


def test_a_checkpoint_of_the_old_pipeline_is_refused_then_restarts_its_data_when_forced(tiny_cfg,
                                                                                         capsys):
    train(tiny_cfg, show_progress=False)  # checkpoints at 3 and 6
    for step in (3, 6):  # as the per-row-stream pipeline wrote them: no "stream" in the manifest
        manifest = tiny_cfg.run_dir / "checkpoints" / str(step) / "dataset" / "metadata"
        manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items()
                                        if k != "stream"}))
    longer = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, steps=8))
    with pytest.raises(UserError, match="written by another data pipeline one stream per batch"):
        train(longer, show_progress=False)
    capsys.readouterr()
    train(longer, show_progress=False, force_resume=True)
    assert "the data stream restarts from its beginning" in capsys.readouterr().err
