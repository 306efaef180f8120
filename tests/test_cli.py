"""The CLI end to end (subprocesses, as a user runs it) and its user-error boundary."""

import json

import pytest
from conftest import config_file, jaxlm_cli

from jaxlm.cli import build_parser, main


def test_train_eval_generate_through_the_cli(tmp_path, corpus, cache_dir):
    cfg = config_file(tmp_path, corpus, cache_dir)
    run = tmp_path / "run"
    trained = jaxlm_cli("train", "--config", cfg, "--no-progress", "--set", "train.steps=6")
    assert trained.returncode == 0, trained.stderr
    assert "steps: 6" in trained.stdout  # resolved config printed at start
    evaluated = jaxlm_cli("eval", "--run", run)
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["step"] == 6 and result["loss"] > 0 and result["bits_per_byte"] > 0
    assert abs(result["perplexity"] - 2.718281828 ** result["loss"]) < 1e-6 * result["perplexity"]
    generated = jaxlm_cli("generate", "--run", run, "--prompt", "def ", "--max-new-tokens", "12",
                       "--temperature", "0")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("def ")


def test_user_error_exits_2_with_one_line_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    proc = jaxlm_cli("train", "--config", bad)
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
    cfg = config_file(tmp_path, corpus, cache_dir)
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
