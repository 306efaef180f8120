"""`jaxlm inspect RUN`: one screen about a finished, a resumed and a checkpoint-less run."""

import shutil

import pytest
from conftest import snapshot

from jaxlm.cli import main


def _report(capsys, *argv) -> dict[str, str]:
    capsys.readouterr()
    assert main(["inspect", *map(str, argv)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return {line[:12].strip(): line[13:] for line in lines}


@pytest.mark.parametrize("name", ["finished", "resumed"])
def test_a_run_is_described_on_one_screen(name, finished_runs, capsys):
    report = _report(capsys, finished_runs[name])
    assert len(report) == 11
    assert report["model"].startswith("2 layers, d_model 32, 2 heads, d_ff 64") and "32,928 params" in report["model"]
    assert report["objective"] == "clm" and report["tokenizer"].startswith("bytes")
    assert report["mesh"] == "trained on data=8 x fsdp=1 x tensor=1"
    assert report["checkpoints"].startswith("3 (") and ", 6 (" in report["checkpoints"]
    assert report["last train"].startswith("step 6: loss ")
    assert report["last eval"].startswith("step 6: loss ")
    assert report["tokens seen"].startswith("1,536 at checkpoint 6")
    assert "wall time" in report
    assert report["resume"].startswith("yes, from step 6 with")


@pytest.mark.parametrize("change, why", [
    ("model.d_model=48", "model.d_model: 32 -> 48"),
    ("optimizer.grad_clip=0", "has no optimizer state"),
])
def test_a_config_that_would_not_resume_is_named(change, why, finished_runs, capsys):
    report = _report(capsys, finished_runs["finished"], "--set", change)
    assert report["resume"].startswith("no: ") and why in report["resume"]


def test_a_safe_change_resumes_and_is_listed(finished_runs, capsys):
    report = _report(capsys, finished_runs["finished"], "--set", "train.steps=9")
    assert report["resume"].endswith("(accepted: train.steps: 6 -> 9)")


def test_a_directory_without_checkpoints_is_a_one_line_error(tmp_path, capsys):
    capsys.readouterr()
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"jaxlm: error: {tmp_path} holds no checkpoints; pass the run_dir of a `jaxlm train` run"


def test_a_damaged_newest_checkpoint_is_reported_and_left_in_place(finished_runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_runs["finished"], run)
    for path in (run / "checkpoints" / "6" / "params").rglob("*"):
        if path.is_file() and "/d/" in str(path):
            path.write_bytes(path.read_bytes()[:10])
    before = snapshot(run)
    report = _report(capsys, run)
    assert "unreadable: 6 (OUT_OF_RANGE" in report["checkpoints"]
    assert report["tokens seen"].startswith("768 at checkpoint 3")
    assert report["resume"].startswith("yes, from step 3 with")
    assert snapshot(run) == before
