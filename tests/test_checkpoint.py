import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, _cli_env, config_file

from jaxlm.checkpoint import Checkpointer, data_loss, first_line, storage_failure
from jaxlm.init_from import params_from as init_params_from
from jaxlm.run import load_run, resolve
from jaxlm.data import open_split, train_pipeline
from jaxlm.errors import UserError
from jaxlm.objectives import clm_example
from jaxlm.state import init_state, make_setup
from jaxlm.tokenizer import ByteTokenizer



def _iterator(cfg):
    return iter(train_pipeline(open_split(cfg.data, "train"), ByteTokenizer(), clm_example,
                               seq_len=cfg.data.seq_len, global_batch=8, seed=0))


def test_round_trip_state_iterator_and_config_onto_another_mesh(tiny_cfg, tmp_path):
    cfg = resolve(tiny_cfg, ByteTokenizer())
    setup = make_setup(cfg)
    state = init_state(setup)
    it = _iterator(cfg)
    next(it), next(it)
    ckpt = Checkpointer(tmp_path / "ckpt", cfg.checkpoint)
    ckpt.save(2, state, it, cfg)
    ckpt.wait()
    expected_batch = next(it)

    small = make_setup(cfg, jax.devices()[:2])  # restore onto 2 devices instead of 8
    fresh_it = _iterator(cfg)
    restored = Checkpointer(tmp_path / "ckpt", cfg.checkpoint).restore(2, small, fresh_it)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding.mesh.size == 2
    np.testing.assert_array_equal(next(fresh_it)["inputs"], expected_batch["inputs"])
    assert ckpt.restore_config_dict(2)["model"]["vocab_size"] == 384  # 260 rounded up to a multiple of 128
    ckpt.close()


def test_load_run_reports_missing_runs_and_steps(tmp_path, tiny_cfg):
    with pytest.raises(UserError, match="holds no checkpoints"):
        load_run(tmp_path / "nothing")
    cfg = resolve(tiny_cfg, ByteTokenizer())
    setup = make_setup(cfg)
    ckpt = Checkpointer(cfg.run_dir / "checkpoints", cfg.checkpoint)
    ckpt.save(1, init_state(setup), _iterator(cfg), cfg)
    ckpt.close()
    with pytest.raises(UserError, match="no checkpoint at step 7"):
        load_run(cfg.run_dir, step=7)
    loaded_cfg, loaded_setup, params, step = load_run(cfg.run_dir, devices=jax.devices()[:1])
    assert step == 1 and loaded_setup.mesh.size == 1
    assert dataclasses.replace(loaded_cfg, mesh=cfg.mesh) == cfg


def _saved_run(cfg):
    """A run directory holding one checkpoint of freshly initialised state (no training)."""
    setup = make_setup(cfg)
    state = init_state(setup)
    ckpt = Checkpointer(cfg.run_dir / "checkpoints", cfg.checkpoint)
    ckpt.save(4, state, _iterator(cfg), cfg)
    ckpt.close()
    return state


def test_init_from_loads_exact_params_and_names_the_first_mismatch(tiny_cfg, tmp_path):
    source_cfg = resolve(dataclasses.replace(tiny_cfg, objective="mlm"), ByteTokenizer())
    saved = _saved_run(source_cfg)
    target_cfg = dataclasses.replace(source_cfg, seed=1, train=dataclasses.replace(
        source_cfg.train, run_dir=str(tmp_path / "finetune")))
    target = make_setup(target_cfg, jax.devices()[:2])
    params = init_params_from(f"{source_cfg.run_dir}@4", target)
    for a, b in zip(jax.tree.leaves(saved["params"]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding.mesh.size == 2
    wider = dataclasses.replace(target_cfg, model=dataclasses.replace(target_cfg.model, d_ff=128))
    with pytest.raises(UserError, match="parameter 'blocks.mlp.down.kernel' has shape"):
        init_params_from(str(source_cfg.run_dir), make_setup(wider))
    clm_source = dataclasses.replace(source_cfg, objective="clm", train=dataclasses.replace(
        source_cfg.train, run_dir=str(tmp_path / "clm")))
    _saved_run(clm_source)
    with pytest.raises(UserError, match="'mlm_head.bias' does not exist there.*objective clm"):
        init_params_from(str(clm_source.run_dir), target)
    clm_target = make_setup(dataclasses.replace(target_cfg, objective="clm"), jax.devices()[:2])
    with pytest.raises(UserError, match="that run has parameter 'mlm_head.*this model lacks"):
        init_params_from(str(source_cfg.run_dir), clm_target)
    with pytest.raises(UserError, match="no checkpoint at step 9"):
        init_params_from(f"{source_cfg.run_dir}@9", target)


DISK_FULL = """mount -t tmpfs -o size=3m tmpfs {run} || exit 90
{python} -m jaxlm train --config {cfg} --no-progress --set checkpoint.async_save={async_save} 2>{err}
echo $? > {code}
{python} -m jaxlm eval --run {run} --batches 1 > {evaluated}
"""


@pytest.mark.parametrize("async_save", ["true", "false"])
def test_a_full_disk_stops_the_run_with_one_line_and_keeps_the_last_good_checkpoint(
        async_save, tmp_path, corpus, cache_dir):
    """A 3 MiB tmpfs as run_dir (in a private mount namespace, no root needed) fills up a few
    checkpoints in; the run must stop within a step, and the run stays readable afterwards."""
    cfg = config_file(tmp_path, corpus, cache_dir, train={"steps": 60, "log_every": 100},
                      checkpoint={"every": 2, "keep": 50})
    run, files = tmp_path / "run", {name: tmp_path / name for name in ("err", "code", "evaluated")}
    run.mkdir()
    script = DISK_FULL.format(run=run, python=sys.executable, cfg=cfg, async_save=async_save, **files)
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          env=_cli_env(), cwd=REPO, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    err = files["err"].read_text().strip()
    assert files["code"].read_text().strip() == "1" and len(err.splitlines()) == 1, err
    # Whichever write meets the full disk first stops the run: a checkpoint's or the metrics'.
    assert err.startswith(("jaxlm: stopped: writing checkpoint", "jaxlm: stopped: writing metrics"))
    assert "No space left on device" in err
    evaluated = json.loads(files["evaluated"].read_text())["step"]
    if "; checkpoint " in err:
        assert evaluated == int(err.split("; checkpoint ")[1].split()[0])
    assert evaluated >= 2


def _caused(outer: Exception, inner: Exception) -> Exception:
    outer.__cause__ = inner
    return outer


@pytest.mark.parametrize("err, is_loss", [
    (ValueError("OUT_OF_RANGE: Error reading Byte range [0, 9) of local file"), True),
    (ValueError("DATA_LOSS: Error decoding manifest"), True),
    (_caused(Exception("Encountered error while reading array index"), ValueError("NOT_FOUND: x")), True),
    (json.JSONDecodeError("Unterminated string", "{", 1), True),
    (FileNotFoundError("Metadata file (named _METADATA) does not exist"), True),
    (PermissionError("denied"), False),
    (ValueError("Requested shape: (2, 64) is not compatible with the stored shape: (2, 32)."), False),
    (KeyError("Item 'opt' was not found in the checkpoint"), False),
    (TypeError("a bug"), False),
])
def test_only_lost_or_torn_bytes_count_as_damage(err, is_loss):
    assert (data_loss(err) is not None) == is_loss


@pytest.mark.parametrize("err, line", [
    (ValueError("RESOURCE_EXHAUSTED: Error writing \"a\": Failed to write 7 bytes to file 7: No space left "
                "on device [os_error_code='28']"), "RESOURCE_EXHAUSTED: No space left on device"),
    (ValueError("OUT_OF_RANGE: Error reading \"b\": Requested byte range [0, 9) is not valid for value of "
                "size 4 [tensorstore_spec='{}']"),
     "OUT_OF_RANGE: Requested byte range [0, 9) is not valid for value of size 4"),
    (OSError(28, "No space left on device"), "[Errno 28] No space left on device"),
])
def test_storage_errors_are_described_by_their_innermost_reason(err, line):
    assert storage_failure(err) is err and first_line(err) == line
