"""The CLI end to end (subprocesses, as a user runs it) and its user-error boundary."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jaxlm.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent


def _config_file(tmp_path, corpus, cache_dir, **sections):
    raw = {
        "name": "cli",
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "max_seq_len": 64},
        "data": {"dataset": "text_files", "paths": [str(corpus / "*.py")], "seq_len": 32,
                 "validation_percent": 20.0, "cache_dir": str(cache_dir)},
        "train": {"run_dir": str(tmp_path / "run"), "steps": 8, "batch_size": 8, "log_every": 4,
                  "eval_every": 0, "eval_batches": 2},
        "checkpoint": {"every": 4},
    }
    for section, values in sections.items():
        raw[section].update(values)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _jaxlm(*args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    return subprocess.run([sys.executable, "-m", "jaxlm", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)


def test_train_eval_generate_through_the_cli(tmp_path, corpus, cache_dir):
    cfg = _config_file(tmp_path, corpus, cache_dir)
    run = tmp_path / "run"
    trained = _jaxlm("train", "--config", cfg, "--no-progress", "--set", "train.steps=6")
    assert trained.returncode == 0, trained.stderr
    assert "steps: 6" in trained.stdout  # resolved config printed at start
    evaluated = _jaxlm("eval", "--run", run)
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["step"] == 6 and result["loss"] > 0 and result["bits_per_byte"] > 0
    assert abs(result["perplexity"] - 2.718281828 ** result["loss"]) < 1e-6 * result["perplexity"]
    generated = _jaxlm("generate", "--run", run, "--prompt", "def ", "--max-new-tokens", "12",
                       "--temperature", "0")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("def ")


def test_user_error_exits_2_with_one_line_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    proc = _jaxlm("train", "--config", bad)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("jaxlm: error: invalid YAML")


@pytest.mark.parametrize("command", ["train", "eval", "generate"])
def test_help_explains_every_flag(command, capsys):
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    for action in subparsers.choices[command]._actions:
        assert action.help, f"{command} {action.option_strings} has no help text"
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "usage: jaxlm " + command in capsys.readouterr().out


def _error_of(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxlm: error: ") and "Traceback" not in err
    return err


def test_each_bad_input_names_its_fix(tmp_path, corpus, cache_dir, capsys):
    cfg = _config_file(tmp_path, corpus, cache_dir)
    cases = {
        "cannot read config file": ["train", "--config", tmp_path / "missing.yaml"],
        "unknown config key 'model.width'": ["train", "--config", cfg, "--set", "model.width=3"],
        "'train.steps' must be int": ["train", "--config", cfg, "--set", "train.steps=many"],
        "no file matches": ["train", "--config", cfg, "--set", f"data.paths=[{tmp_path}/none/*.txt]"],
        "exceeds model.max_seq_len": ["train", "--config", cfg, "--set", "data.seq_len=128"],
        "holds no checkpoints": ["eval", "--run", tmp_path / "never-trained"],
    }
    for message, argv in cases.items():
        assert message in _error_of(capsys, [str(a) for a in argv])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("\n\n")
    err = _error_of(capsys, ["train", "--config", str(cfg), "--set", f"data.paths=[{empty}/*.txt]",
                             "--set", "data.split_paragraphs=true"])
    assert "corpus is empty" in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = _error_of(capsys, ["train", "--config", str(cfg), "--set", f"train.run_dir={blocker}/run"])
    assert "is not writable" in err
