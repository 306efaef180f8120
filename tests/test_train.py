import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlm.checkpoint import Checkpointer
from jaxlm.run import load_run
from jaxlm.errors import TrainingStopped, UserError
from jaxlm.metrics import read_metrics
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
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    rates = [r for r in read_metrics(run_dir / "metrics.jsonl") if "tokens_per_s" in r]
    assert len(rates) >= 24 // cfg.train.log_every
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in rates)
    assert Checkpointer(run_dir / "checkpoints", cfg.checkpoint).all_steps() == [12, 15, 18, 21, 24]  # keep=5


@pytest.mark.parametrize("objective", ["clm", "span_corruption"])
def test_stop_and_resume_reproduces_the_uninterrupted_run_bitwise(tiny_cfg, tmp_path, objective):
    tiny_cfg = dataclasses.replace(tiny_cfg, objective=objective)
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
    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, grad_accum_steps=2))
    with pytest.raises(UserError, match="8 batch shards of the mesh times train.grad_accum_steps"):
        train(cfg, show_progress=False)


def _diverging(tiny_cfg, **train_kw):
    """Warmup of one step, then a learning rate that overflows the params to inf/NaN."""
    return dataclasses.replace(
        tiny_cfg,
        optimizer=dataclasses.replace(tiny_cfg.optimizer, learning_rate=1e30, warmup_steps=1),
        train=dataclasses.replace(tiny_cfg.train, steps=10, log_every=1, **train_kw),
        checkpoint=dataclasses.replace(tiny_cfg.checkpoint, every=1, keep=20),
    )


def _first_nonfinite(run_dir):
    return min(r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("nonfinite"))


def test_nonfinite_stop_names_the_step_and_saves_nothing_after_it(tiny_cfg):
    cfg = _diverging(tiny_cfg, on_nonfinite="stop")
    with pytest.raises(TrainingStopped) as stopped:
        train(cfg, show_progress=False)
    bad = _first_nonfinite(cfg.run_dir)
    assert f"at step {bad};" in str(stopped.value)
    assert f"last good checkpoint: step {bad - 1}" in str(stopped.value)
    assert max(Checkpointer(cfg.run_dir / "checkpoints", cfg.checkpoint).all_steps()) == bad - 1


def test_nonfinite_skip_keeps_the_params_of_the_last_good_step(tiny_cfg):
    cfg = _diverging(tiny_cfg, on_nonfinite="skip", max_consecutive_skips=3)
    with pytest.raises(TrainingStopped, match="3 non-finite steps in a row"):
        train(cfg, show_progress=False)
    bad = _first_nonfinite(cfg.run_dir)
    good = load_run(cfg.run_dir, step=bad - 1)[2]
    for step in (bad, bad + 1):
        skipped = load_run(cfg.run_dir, step=step)[2]
        for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(skipped)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("objective", ["clm", "span_corruption"])
def test_save_on_one_mesh_resume_on_another_and_evaluate_anywhere(tiny_cfg, objective):
    def on_mesh(axes, steps):
        return dataclasses.replace(
            tiny_cfg,
            objective=objective,
            model=dataclasses.replace(tiny_cfg.model, n_heads=2, d_ff=64),
            mesh=dataclasses.replace(tiny_cfg.mesh, axes=dict(zip(("data", "fsdp", "tensor"), axes))),
            train=dataclasses.replace(tiny_cfg.train, steps=steps),
        )

    train(on_mesh((2, 2, 2), 3), show_progress=False)
    train(on_mesh((4, 1, 1), 6), show_progress=False, devices=jax.devices()[:4])
    assert sorted(_losses(tiny_cfg.run_dir)) == list(range(1, 7))
    from jaxlm.data import open_split
    from jaxlm.evaluate import Evaluator
    from jaxlm.tokenizer import ByteTokenizer

    results = []
    for devices in (jax.devices(), jax.devices()[:1]):
        cfg, setup, params, _ = load_run(tiny_cfg.run_dir, devices=devices)
        evaluator = Evaluator(setup, open_split(cfg.data, "validation", objective), ByteTokenizer())
        results.append(evaluator(params))
    assert results[0]["tokens"] == results[1]["tokens"]
    np.testing.assert_allclose(results[0]["loss"], results[1]["loss"], rtol=1e-5)


@pytest.mark.parametrize("objective, style", [("clm", "gpt2"), ("mlm", "bert")])
def test_train_and_eval_with_an_hf_tokenizer(tiny_cfg, objective, style, request):
    from jaxlm.data import open_split
    from jaxlm.evaluate import Evaluator
    from jaxlm.tokenizer import load_tokenizer

    spec = f"hf:{request.getfixturevalue(f'hf_{style}')}"
    cfg = dataclasses.replace(tiny_cfg, objective=objective,
                              data=dataclasses.replace(tiny_cfg.data, tokenizer=spec))
    final = train(cfg, show_progress=False)
    assert np.isfinite(final["loss"]) and final["bits_per_byte"] > 0
    run_cfg, setup, params, step = load_run(cfg.run_dir)
    tokenizer = load_tokenizer(run_cfg.data.tokenizer)
    copy = cfg.run_dir / "tokenizer.json"  # the run reads its own copy from now on
    assert step == cfg.train.steps and run_cfg.data.tokenizer == f"hf:{copy}"
    assert copy.read_bytes() == Path(spec[len("hf:"):]).read_bytes()
    assert run_cfg.model.vocab_size == -(-tokenizer.vocab_size // 128) * 128
    evaluator = Evaluator(setup, open_split(run_cfg.data, "validation"), tokenizer)
    result = evaluator(params, max_batches=2)
    assert result["loss"] == pytest.approx(final["loss"], rel=1e-5) and result["tokens"] > 0
    if objective == "mlm":
        pseudo = evaluator.pseudo_perplexity(params, rows=2)
        assert pseudo["pseudo_perplexity_tokens"] > 0 and np.isfinite(pseudo["pseudo_perplexity"])


def test_profile_steps_write_a_trace_and_change_nothing_else(tiny_cfg, tmp_path):
    def run(name, profile):
        train_cfg = dataclasses.replace(tiny_cfg.train, run_dir=str(tmp_path / name), log_every=1,
                                        profile_steps=profile)
        cfg = dataclasses.replace(tiny_cfg, train=train_cfg)
        train(cfg, show_progress=False)
        return cfg.run_dir

    profiled, plain = run("profiled", (2, 3)), run("plain", ())
    assert list((profiled / "profile").rglob("*.xplane.pb"))
    assert not (plain / "profile").exists()
    losses = lambda d: [r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r]
    assert losses(profiled) == losses(plain)


@pytest.mark.parametrize("steps, message", [
    ([3], r"train.profile_steps is \[3\]; give \[first, last\]"),
    ([4, 2], r"train.profile_steps is \[4, 2\]; give \[first, last\]"),
    ([0, 2], r"'train.profile_steps\[0\]' must be an integer >= 1, got 0"),
])
def test_profile_steps_outside_first_last_order_is_one_line(tiny_cfg, steps, message):
    from jaxlm.config_checks import validate

    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, profile_steps=tuple(steps)))
    with pytest.raises(UserError, match=message):
        validate(cfg)
