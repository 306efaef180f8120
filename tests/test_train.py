import dataclasses

import jax
import numpy as np
import pytest

from jaxlm.checkpoint import Checkpointer, load_run
from jaxlm.errors import UserError
from jaxlm.metrics import read_metrics
from jaxlm.state import make_setup
from jaxlm.train import train


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def test_loss_falls_and_run_dir_holds_config_metrics_checkpoints(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, steps=24, eval_every=12))
    result = train(cfg, show_progress=False)
    run_dir = cfg.run_dir
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, 25))
    assert np.mean([losses[s] for s in range(21, 25)]) < np.mean([losses[s] for s in range(1, 5)]) - 1.0
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [12, 24] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert result["loss"] == evals[1]["eval_loss"] and result["bits_per_byte"] > 0
    assert (run_dir / "config.yaml").exists()
    assert Checkpointer(run_dir / "checkpoints", cfg.checkpoint).all_steps() == [12, 15, 18, 21, 24]  # keep=5


def test_stop_and_resume_reproduces_the_uninterrupted_run_bitwise(tiny_cfg, tmp_path):
    whole = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, run_dir=str(tmp_path / "a")))
    split = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, run_dir=str(tmp_path / "b")))
    train(whole, show_progress=False)
    train(split, show_progress=False, stop_at=3)
    assert sorted(_losses(split.run_dir)) == [1, 2, 3]
    train(split, show_progress=False)
    assert _losses(split.run_dir) == _losses(whole.run_dir)  # exact float equality, steps 1..6
    (_, _, params_a, _), (_, _, params_b, _) = load_run(whole.run_dir), load_run(split.run_dir)
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unwritable_run_dir_and_indivisible_batch(tiny_cfg, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, run_dir=str(blocker / "run")))
    with pytest.raises(UserError, match="is not writable"):
        train(cfg, show_progress=False)
    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, batch_size=6))
    with pytest.raises(UserError, match="train.batch_size \\(6\\) must be divisible by the 8"):
        train(cfg, show_progress=False)
