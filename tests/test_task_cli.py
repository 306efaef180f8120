"""Fine-tuning tasks through the CLI: classify (train, eval, predict), seq2seq_lm (eval's exact
match, generate --input-file) and their bad input."""

import json
import random

import pytest
import yaml

from jaxlm.cli import main
from jaxlm.metrics import read_metrics

MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "max_seq_len": 64}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def separable(n, seed):
    """Random letters, then a marker word that decides the label."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["spam", "ham"])
        noise = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 8)))
        rows.append({"body": f"{noise} {'zzz' if label == 'spam' else 'qqq'}", "tag": label})
    return rows


def task_config(tmp_path, cache_dir, objective, data, **train):
    raw = {"name": "task", "objective": objective, "model": MODEL,
           "data": {"dataset": "jsonl", "seq_len": 32, "cache_dir": str(cache_dir), **data},
           "train": {"run_dir": str(tmp_path / "run"), "steps": 30, "batch_size": 8, "log_every": 10,
                     "eval_every": 0, "eval_batches": 4, **train},
           "optimizer": {"learning_rate": 3e-3, "warmup_steps": 5}, "checkpoint": {"every": 100}}
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _json_lines(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.strip().splitlines() if line.startswith("{")]


def test_classify_learns_a_separable_task_and_predict_agrees_with_eval(tmp_path, cache_dir, capsys):
    train, held_out = write_jsonl(tmp_path / "t.jsonl", separable(200, 0)), write_jsonl(
        tmp_path / "v.jsonl", separable(40, 1))
    cfg = task_config(tmp_path, cache_dir, "classify", {
        "paths": [str(train)], "validation_paths": [str(held_out)],
        "fields": {"text": "body", "label": "tag"}})
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval_accuracy" in r]
    assert evals[-1]["eval_accuracy"] >= 0.95 and evals[-1]["eval_macro_f1"] >= 0.95
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "run")]) == 0
    result = _json_lines(capsys)[-1]
    assert set(result["per_class"]) == {"ham", "spam"} and "bits_per_byte" not in result
    assert sum(c["true"] for c in result["per_class"].values()) == 40
    assert main(["predict", "--run", str(tmp_path / "run"), "--input-file", str(held_out)]) == 0
    rows = _json_lines(capsys)
    assert len(rows) == 40 and all(0.5 <= r["probability"] <= 1 for r in rows)
    agree = sum(r["label"] == r["true_label"] for r in rows) / len(rows)
    assert agree == result["accuracy"]


def test_seq2seq_eval_reports_exact_match_and_generate_writes_a_line_per_record(
        tmp_path, cache_dir, capsys):
    rows = [{"q": w, "a": w[::-1]} for w in ("abc", "hello", "jax", "flax", "grain", "orbax") * 6]
    data = write_jsonl(tmp_path / "r.jsonl", rows)
    cfg = task_config(tmp_path, cache_dir, "seq2seq_lm", {
        "paths": [str(data)], "validation_percent": 20.0, "fields": {"input": "q", "target": "a"},
        "template": "reverse {input}:"}, steps=6)
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "run"), "--batches", "1"]) == 0
    result = _json_lines(capsys)[-1]
    assert 0 <= result["exact_match"] <= 1 and result["exact_match_examples"] >= 1
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"q": "one"}, {"q": "two"}, {"q": "three"}])
    assert main(["generate", "--run", str(tmp_path / "run"), "--input-file", str(inputs),
                 "--temperature", "0", "--max-new-tokens", "5"]) == 0
    lines = _json_lines(capsys)
    assert [line["input"] for line in lines] == ["one", "two", "three"]
    assert all(len(line["text"].encode()) <= 5 * 3 for line in lines)



@pytest.mark.parametrize("lines, extra, message", [
    (['{"body": "a", "tag": "x"}', "{oops"], {}, "d.jsonl line 2: not JSON"),
    (['{"body": "a", "tag": "x"}', '{"body": "b"}'], {}, "d.jsonl line 2: no field 'tag'"),
    (['{"body": "a", "tag": "x"}', '{"body": "b", "tag": "x"}'], {}, "at least two labels"),
    (['{"body": "a", "tag": "x"}', '{"body": "b", "tag": "y"}'], {"v": ['{"body": "c", "tag": "z"}']},
     "v.jsonl line 1: label 'z' does not occur in the training data"),
])
def test_bad_task_records_exit_2_with_file_and_line(tmp_path, cache_dir, capsys, lines, extra, message):
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    data = {"paths": [str(tmp_path / "d.jsonl")], "fields": {"text": "body", "label": "tag"},
            "validation_percent": 0.0}
    for name, content in extra.items():
        (tmp_path / f"{name}.jsonl").write_text("\n".join(content) + "\n")
        data["validation_paths"] = [str(tmp_path / f"{name}.jsonl")]
    cfg = task_config(tmp_path, cache_dir, "classify", data)
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


@pytest.fixture(scope="module")
def reverse_run(tmp_path_factory, cache_dir):
    """An encoder-decoder trained to reverse words of 3-6 letters (CI-sized: ~20 s on 2 cores)."""
    tmp_path = tmp_path_factory.mktemp("encdec")
    rng = random.Random(0)
    words = sorted({"".join(rng.choices("abcdefgh", k=rng.randint(3, 6))) for _ in range(3000)})
    data = write_jsonl(tmp_path / "reverse.jsonl", [{"input": w, "target": w[::-1]} for w in words])
    cfg = task_config(tmp_path, cache_dir, "seq2seq", {"paths": [str(data)], "seq_len": 16},
                      steps=300, batch_size=16)
    raw = yaml.safe_load(cfg.read_text())
    raw["model"] = {**MODEL, "d_model": 64, "d_ff": 256}
    raw["optimizer"]["warmup_steps"] = 30
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    return tmp_path / "run"


def test_an_encoder_decoder_learns_to_reverse_words(reverse_run, capsys):
    capsys.readouterr()
    assert main(["eval", "--run", str(reverse_run)]) == 0
    result = _json_lines(capsys)[-1]
    assert result["exact_match"] >= 0.9 and result["exact_match_examples"] >= 100
    assert result["chrf"] >= 90 and 0 <= result["bleu"] <= 100


def test_an_encoder_decoder_run_generates_from_prompts_and_input_files(reverse_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["generate", "--run", str(reverse_run), "--prompt", "abcd", "--prompt", "hgfe"]) == 0
    assert [row["text"] for row in _json_lines(capsys)] == ["dcba", "efgh"]
    assert main(["generate", "--run", str(reverse_run), "--prompt", "abcd"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "dcba"  # the output, no prompt
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"input": "cab"}, {"input": "bbad"}])
    assert main(["generate", "--run", str(reverse_run), "--input-file", str(inputs)]) == 0
    assert [row["text"] for row in _json_lines(capsys)] == ["bac", "dabb"]


def test_an_encoder_decoder_run_is_not_exported_to_hugging_face(reverse_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["export", "--run", str(reverse_run), "--out", str(tmp_path / "hf")]) == 2
    assert "needs relative position bias" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
