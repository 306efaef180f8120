"""Hugging Face import/export against real transformers models (CPU torch, tiny, built here)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

import hf_models
from conftest import tiny_config
from jaxlm.checkpoint import Checkpointer
from jaxlm.run import load_run
from jaxlm.config import Config, DataConfig, MeshConfig, ModelConfig, OptimizerConfig, TrainConfig
from jaxlm.generate import banned_tokens, make_sampler, sample_ids
from jaxlm.hf.convert import family_for_run
from jaxlm.hf.exporter import export_run
from jaxlm.hf.importer import hf_model_config, import_hf, load_params, read_hf_config
from jaxlm.state import init_state, make_setup, make_train_step
from jaxlm.tokenizer import BOS_ID, ByteTokenizer
from jaxlm.train import train

IDS_BxL = np.random.default_rng(0).integers(7, hf_models.VOCAB, (2, 20)).astype(np.int32)
AUTO = {"clm": "AutoModelForCausalLM", "mlm": "AutoModelForMaskedLM"}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """family -> (torch model, saved directory)."""
    root = tmp_path_factory.mktemp("hf")
    return {f: (m, hf_models.save(m, root / f)) for f in hf_models.FAMILIES
            for m in [hf_models.build(f)]}


def _jaxlm_logits(directory, devices, mesh=None):
    family, model, objective = hf_model_config(read_hf_config(directory), None)
    cfg = Config(objective=objective, model=model, mesh=mesh or MeshConfig())
    setup = make_setup(cfg, devices)
    params = load_params(directory, family, objective, setup)
    return setup, params


def _forward(setup, params, ids_BxL, segment_ids_BxL=None):
    positions_BxL = jnp.broadcast_to(jnp.arange(ids_BxL.shape[1]), ids_BxL.shape)
    segments = jnp.ones_like(ids_BxL) if segment_ids_BxL is None else segment_ids_BxL
    model = nnx.merge(setup.model_def, params)
    return np.asarray(model(jnp.asarray(ids_BxL), segments, positions_BxL))


def _close(ours, theirs, atol=1e-4):
    assert np.abs(ours - theirs).max() <= atol
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_imported_logits_match_transformers(family, hf_dirs):
    model, directory = hf_dirs[family]
    setup, params = _jaxlm_logits(directory, jax.devices()[:1])
    _close(_forward(setup, params, IDS_BxL), hf_models.hf_logits(model, IDS_BxL))


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_imported_logits_match_on_a_padded_batch_of_two_lengths(family, hf_dirs):
    model, directory = hf_dirs[family]
    mask_BxL = np.ones_like(IDS_BxL)
    mask_BxL[1, 12:] = 0  # row 1 has 12 real tokens, then right padding
    setup, params = _jaxlm_logits(directory, jax.devices()[:1])
    ours = _forward(setup, params, IDS_BxL, jnp.asarray(mask_BxL))
    theirs = hf_models.hf_logits(model, IDS_BxL, mask_BxL)
    real = mask_BxL.astype(bool)
    _close(ours[real], theirs[real])


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_import_onto_an_8_device_fsdp_mesh_matches_one_device(family, hf_dirs):
    _, directory = hf_dirs[family]
    one = _forward(*_jaxlm_logits(directory, jax.devices()[:1]), IDS_BxL)
    fsdp = MeshConfig(axes={"data": 1, "fsdp": 8, "tensor": 1})
    setup, params = _jaxlm_logits(directory, None, fsdp)
    kernel = params["blocks"]["attn"]["q"]["kernel"][...]
    assert kernel.sharding.shard_shape(kernel.shape)[1] == kernel.shape[1] // 8
    np.testing.assert_allclose(_forward(setup, params, IDS_BxL), one, atol=1e-5)


@pytest.fixture(scope="module")
def imported(hf_dirs, tmp_path_factory):
    """family -> run directory written by import_hf."""
    root = tmp_path_factory.mktemp("imported")
    return {f: import_hf(d, root / f).run_dir for f, (_, d) in hf_dirs.items()}


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_import_then_export_is_bit_identical_with_hf_keys(family, hf_dirs, imported, tmp_path):
    model, directory = hf_dirs[family]
    out = export_run(imported[family], None, tmp_path / "out", "float32", 2**30)
    tied = set(model.all_tied_weights_keys)
    with safe_open(directory / "model.safetensors", "np") as a, \
            safe_open(out / "model.safetensors", "np") as b:
        assert set(b.keys()) == set(a.keys()) == set(model.state_dict()) - tied
        for name in a.keys():
            np.testing.assert_array_equal(b.get_tensor(name), a.get_tensor(name))


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_bfloat16_export_loads_and_matches_float32(family, hf_dirs, imported, tmp_path):
    import torch
    import transformers

    model, _ = hf_dirs[family]
    out = export_run(imported[family], None, tmp_path / "bf16", "bfloat16", 2**30)
    cls = getattr(transformers, AUTO[hf_models.OBJECTIVES[family]])
    loaded = cls.from_pretrained(out, attn_implementation="eager")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        ours = loaded.float()(input_ids=torch.as_tensor(IDS_BxL)).logits.numpy()
    np.testing.assert_allclose(ours, hf_models.hf_logits(model, IDS_BxL), atol=0.05)


# ------------------------------------------------------------ jaxlm runs exported

RUN_SWITCHES = {
    "gpt2": dict(position_embedding="learned", norm="layernorm", bias=True, mlp="gelu_tanh"),
    "llama": dict(n_kv_heads=1, tie_embeddings=False, rope_theta=20000.0),
    "bert": dict(position_embedding="learned", norm="layernorm", norm_position="post",
                 final_norm=False, embed_norm=True, bias=True, mlp="gelu", type_vocab_size=2),
}


def _train_steps(cfg, steps=3):
    """A run directory holding a tiny jaxlm model after a few steps on random text (the real data
    pipeline is tested elsewhere; here only the weights matter)."""
    setup = make_setup(cfg, jax.devices()[:1])
    state, step = init_state(setup), make_train_step(setup)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        ids_BxL = rng.integers(7, ByteTokenizer.vocab_size, (8, 33)).astype(np.int32)
        batch = {"inputs": ids_BxL[:, :-1], "targets": ids_BxL[:, 1:],
                 "segment_ids": np.ones((8, 32), np.int32),
                 "positions": np.broadcast_to(np.arange(32, dtype=np.int32), (8, 32)),
                 "weights": np.ones((8, 32), np.float32)}
        state, _ = step(state, batch)
    checkpointer = Checkpointer(cfg.run_dir / "checkpoints", cfg.checkpoint)
    checkpointer.save(steps, {"params": state["params"]}, None, cfg)
    checkpointer.close()
    return cfg.run_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """family -> run directory of a tiny jaxlm model (vocab padded to 384 from the tokenizer)."""
    runs = {}
    for family, switches in RUN_SWITCHES.items():
        model = ModelConfig(vocab_size=384, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                            max_seq_len=64, **switches)
        run_dir = tmp_path_factory.mktemp(family) / "run"
        cfg = Config(objective=hf_models.OBJECTIVES[family], model=model,
                     data=DataConfig(seq_len=32),
                     optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=1),
                     train=TrainConfig(run_dir=str(run_dir)))
        runs[family] = _train_steps(cfg)
    return runs


def _greedy_jaxlm(setup, params, context, new_tokens):
    banned_V = banned_tokens(setup.cfg.model.vocab_size, ByteTokenizer())
    sampler = make_sampler(setup, banned_V, temperature=0.0, top_k=0, top_p=1.0)
    return sample_ids(sampler, params, [context], max_new_tokens=new_tokens, seed=0,
                      eos_id=ByteTokenizer.eos_id)[0], banned_V


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_exported_run_loads_in_transformers_with_the_same_logits_and_greedy_text(
        family, trained, tmp_path):
    import torch
    import transformers

    out = export_run(trained[family], None, tmp_path / "hf", "float32", 2**30)
    objective = hf_models.OBJECTIVES[family]
    loaded, info = getattr(transformers, AUTO[objective]).from_pretrained(
        out, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.config.vocab_size == ByteTokenizer.vocab_size  # padded rows dropped
    _, setup, params, _ = load_run(trained[family], devices=jax.devices()[:1])
    ours = _forward(setup, params, IDS_BxL % ByteTokenizer.vocab_size)
    theirs = hf_models.hf_logits(loaded.eval(), IDS_BxL % ByteTokenizer.vocab_size)
    _close(ours[..., : ByteTokenizer.vocab_size], theirs)
    if objective == "clm":
        context = [BOS_ID, *ByteTokenizer().encode("def f(x):").tolist()]
        new, banned_V = _greedy_jaxlm(setup, params, context, 20)
        with torch.no_grad():
            generated = loaded.generate(
                torch.as_tensor([context]), max_new_tokens=20, do_sample=False,
                suppress_tokens=np.flatnonzero(banned_V[: ByteTokenizer.vocab_size]).tolist())
        theirs_new = generated[0, len(context):].tolist()
        assert len(new) == 20 and new == theirs_new  # no EOS: all 20 tokens compared


@pytest.mark.parametrize("switches, key", [
    (dict(norm="layernorm", bias=True), "model.norm"),  # RoPE in a GPT-2 layout
    (dict(mlp="gelu"), "model.mlp"),
    (dict(position_embedding="learned", norm="layernorm", bias=True, mlp="gelu",
          norm_position="post"), "model.norm_position"),
])
def test_a_run_hf_cannot_express_is_refused_naming_the_key(switches, key, tiny_cfg):
    from jaxlm.errors import UserError

    with pytest.raises(UserError, match=key):
        family_for_run(dataclasses.replace(tiny_cfg.model, **switches), "clm")


def test_fine_tuning_from_hf_lowers_the_loss(hf_dirs, corpus, cache_dir, tmp_path):
    _, directory = hf_dirs["llama"]
    _, model, _ = hf_model_config(read_hf_config(directory), None)
    cfg = tiny_config(corpus, cache_dir, tmp_path / "run", steps=8, log_every=1)
    cfg = dataclasses.replace(cfg, model=model, init_from=f"hf:{directory}")
    train(cfg, show_progress=False)
    losses = [json.loads(line)["loss"] for line in (cfg.run_dir / "metrics.jsonl").open()
              if '"loss"' in line]
    assert losses[-1] < losses[0]


def test_import_copies_the_tokenizer_and_points_the_run_at_it(hf_dirs, tmp_path):
    from tokenizers import Tokenizer, models

    _, directory = hf_dirs["gpt2"]
    source = tmp_path / "hf"
    source.mkdir()
    for item in directory.iterdir():
        (source / item.name).write_bytes(item.read_bytes())
    vocab = {f"t{i}": i for i in range(hf_models.VOCAB)}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(source / "tokenizer.json"))
    cfg = import_hf(source, tmp_path / "run")
    assert cfg.data.tokenizer == f"hf:{tmp_path / 'run' / 'tokenizer.json'}"
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("config, hf_config", [
    ("gpt2_124m.yaml", lambda tf: tf.GPT2Config()),
    ("bert_base.yaml", lambda tf: tf.BertConfig()),
    ("llama_1b.yaml", lambda tf: tf.LlamaConfig(  # Llama-3.2-1B's published config.json
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        rope_theta=500000.0)),
])
def test_exact_configs_are_what_import_makes_of_the_hf_configs(config, hf_config):
    import transformers

    from conftest import REPO
    from jaxlm.config import load_config

    _, model, _ = hf_model_config(hf_config(transformers).to_dict(), None)
    assert model == load_config(REPO / "configs" / config).model
