"""`jaxlm import` / `jaxlm export` as a user runs them: every command on an imported run, sharded
files, and bad input (exit 2, one line naming the problem, nothing written to --out)."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hf_models
from jaxlm.cli import main


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """family -> a saved tiny HF model directory."""
    root = tmp_path_factory.mktemp("hf_cli")
    return {f: hf_models.save(hf_models.build(f, seed=1), root / f) for f in hf_models.FAMILIES}


def _error_of(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxlm: error: ") and "Traceback" not in err
    return err


def _copy(src, dst):
    dst.mkdir()
    for item in src.iterdir():
        (dst / item.name).write_bytes(item.read_bytes())
    return dst


def _edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | changes))


def _edit_tensors(directory, edit):
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


BAD_INPUTS = {
    "no config.json": ("gpt2", lambda d: (d / "config.json").unlink(), "config.json"),
    "truncated safetensors": (
        "gpt2", lambda d: os.truncate(d / "model.safetensors", 3000),
        "model.safetensors"),
    "unsupported model_type": ("llama", lambda d: _edit_config(d, model_type="mistral"),
                               "'model_type'"),
    "t5 (relative position bias)": ("llama", lambda d: _edit_config(d, model_type="t5"),
                                    "'t5', an encoder-decoder with relative position bias"),
    "unsupported rope scaling": ("llama", lambda d: _edit_config(
        d, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
        "'rope_parameters'"),
    "unsupported gpt2 option": ("gpt2", lambda d: _edit_config(
        d, scale_attn_by_inverse_layer_idx=True),
                                "'scale_attn_by_inverse_layer_idx'"),
    "missing tensor": ("llama", lambda d: _edit_tensors(d, lambda t: t.pop("model.norm.weight")),
                       "missing model.norm.weight"),
    "unused tensor": ("bert", lambda d: _edit_tensors(
        d, lambda t: t.update({"bert.extra.weight": np.zeros(3, np.float32)})),
        "unused bert.extra.weight"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_hf_input_exits_2_naming_it_and_writes_nothing(case, hf_dir, tmp_path, capsys):
    family, damage, named = BAD_INPUTS[case]
    source = _copy(hf_dir[family], tmp_path / "hf")
    damage(source)
    err = _error_of(capsys, ["import", "--hf", str(source), "--out", str(tmp_path / "run")])
    assert named in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_export_refuses_an_existing_out_and_a_missing_run(hf_dir, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert "holds no checkpoints" in _error_of(
        capsys, ["export", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
    assert "not empty" in _error_of(
        capsys, ["export", "--run", str(tmp_path), "--out", str(tmp_path / "taken")])
    assert not (tmp_path / "out").exists()


def test_sharded_export_loads_in_transformers_and_imports_back(hf_dir, tmp_path, capsys):
    import torch
    import transformers

    run, out, again = tmp_path / "run", tmp_path / "out", tmp_path / "again"
    assert main(["import", "--hf", str(hf_dir["llama"]), "--out", str(run)]) == 0
    assert main(["export", "--run", f"{run}@0", "--out", str(out), "--max-shard-mb", "0"]) == 2
    from jaxlm.hf.exporter import export_run

    export_run(run, 0, out, "float32", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (out / "model.safetensors").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    ids = torch.arange(7, 27)[None]
    reference = hf_models.hf_logits(hf_models.build("llama", seed=1), ids.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(loaded(input_ids=ids).logits.numpy(), reference, atol=1e-5)
    assert main(["import", "--hf", str(out), "--out", str(again)]) == 0


def _data_overrides(corpus, cache_dir):
    return ["--set", "data.dataset=text_files", "--set", f"data.paths=[{corpus}/*.py]",
            "--set", f"data.cache_dir={cache_dir}", "--set", "data.seq_len=32",
            "--set", "data.validation_percent=20"]


@pytest.mark.parametrize("family, command", [
    ("gpt2", "generate"), ("llama", "eval"), ("bert", "fill-mask"), ("llama", "train"),
    ("gpt2", "init_from"),
])
def test_every_command_works_on_an_imported_run(family, command, hf_dir, tmp_path, corpus,
                                                cache_dir, capsys):
    run = tmp_path / "run"
    assert main(["import", "--hf", str(hf_dir[family]), "--out", str(run)]) == 0
    data = _data_overrides(corpus, cache_dir)
    argv = {
        "generate": ["generate", "--run", str(run), "--prompt", "def", "--max-new-tokens", "5"],
        "eval": ["eval", "--run", str(run), "--batches", "1", *data],
        "fill-mask": ["fill-mask", "--run", str(run), "def [MASK](self):"],
        "train": ["train", "--config", str(run / "config.yaml"), "--force-resume", "--no-progress",
                  "--set", "train.steps=2", "--set", "train.batch_size=8", *data],
        "init_from": ["train", "--config", str(run / "config.yaml"), "--no-progress",
                      "--set", f"init_from={run}", "--set", f"train.run_dir={tmp_path / 'ft'}",
                      "--set", "train.steps=1", "--set", "train.batch_size=8", *data],
    }[command]
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr()
    if command == "init_from":
        assert f"initialized params from {run}" in out.out
    elif command == "train":  # resumed from the imported step 0 with a fresh optimizer
        assert "resuming from step 0" in out.out and (run / "checkpoints" / "2").is_dir()
    elif command == "eval":
        assert json.loads(out.out.strip().splitlines()[-1])["step"] == 0
    else:
        assert out.out.strip()



def test_an_interrupted_import_is_one_line_and_writes_nothing(hf_dir, tmp_path, capsys,
                                                             monkeypatch):
    from jaxlm.hf import importer

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(importer, "load_params", interrupted)
    assert main(["import", "--hf", str(hf_dir["gpt2"]), "--out", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err == "jaxlm: interrupted; run the same command again to redo it\n"
    assert not list(tmp_path.iterdir())


def test_a_killed_imports_staging_directory_goes_at_the_next_import(hf_dir, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / f".run.importing-{dead}" / "checkpoints").mkdir(parents=True)
    assert main(["import", "--hf", str(hf_dir["gpt2"]), "--out", str(tmp_path / "run")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
