"""init_from across objectives: `init_heads: reinit` loads the backbone of an MLM run into a
classifier bit for bit, creates the head fresh and reports it; `strict` refuses."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from conftest import tiny_config

from jaxlm.checkpoint import shapes
from jaxlm.config import DataConfig
from jaxlm.errors import UserError
from jaxlm.init_from import params_from
from jaxlm.run import load_run, open_run
from jaxlm.state import init_state
from jaxlm.train import train


@pytest.fixture(scope="module")
def mlm_run(corpus, cache_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("mlm") / "run"
    cfg = dataclasses.replace(tiny_config(corpus, cache_dir, run, steps=2), objective="mlm")
    train(cfg, show_progress=False)
    return run


def _classify_cfg(tmp_path, cache_dir, mlm_run, corpus, init_heads):
    records = tmp_path / "c.jsonl"
    records.write_text("".join(json.dumps({"text": f"line {i}", "label": i % 3}) + "\n" for i in range(30)))
    base = tiny_config(corpus, cache_dir, tmp_path / "run")
    data = DataConfig(dataset="jsonl", paths=(str(records),), seq_len=32, cache_dir=str(cache_dir))
    return dataclasses.replace(base, objective="classify", data=data, init_from=f"{mlm_run}@2",
                               init_heads=init_heads)


def _flat(params):
    return {name: np.asarray(leaf) for name, leaf in zip(
        shapes(params), jax.tree_util.tree_leaves(params))}


def test_reinit_loads_the_backbone_bitwise_and_creates_a_fresh_head(tmp_path, cache_dir, mlm_run,
                                                                   corpus, capsys):
    cfg = _classify_cfg(tmp_path, cache_dir, mlm_run, corpus, "reinit")
    _, _, setup = open_run(cfg)
    fresh = init_state(setup)["params"]
    expected_head = {k: v for k, v in _flat(fresh).items() if k.startswith("task_head")}
    params = _flat(params_from(cfg.init_from, setup, fresh))
    source = _flat(load_run(mlm_run, 2)[2])
    backbone = [k for k in source if not k.startswith("mlm_head")]
    assert backbone and all(np.array_equal(params[k], source[k]) for k in backbone)
    assert set(params) == set(backbone) | set(expected_head)
    assert all(np.array_equal(params[k], v) for k, v in expected_head.items())
    out = capsys.readouterr().out
    assert f"loaded {len(backbone)} backbone parameters: " in out and "embed.embedding" in out
    assert "created task_head.out.bias, task_head.out.kernel, task_head.pooler.dense.bias" in out
    assert "dropped mlm_head.bias, mlm_head.dense.bias, mlm_head.dense.kernel, mlm_head.norm.scale" in out


def test_strict_refuses_and_names_the_first_differing_parameter(tmp_path, cache_dir, mlm_run, corpus):
    cfg = _classify_cfg(tmp_path, cache_dir, mlm_run, corpus, "strict")
    _, _, setup = open_run(cfg)
    with pytest.raises(UserError, match=r"that run has parameter 'mlm_head.bias' this model lacks.*"
                                        r"init_heads=reinit"):
        params_from(cfg.init_from, setup, init_state(setup)["params"])


def test_reinit_still_names_a_backbone_shape_mismatch(tmp_path, cache_dir, mlm_run, corpus):
    cfg = _classify_cfg(tmp_path, cache_dir, mlm_run, corpus, "reinit")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_ff=128))
    _, _, setup = open_run(cfg)
    with pytest.raises(UserError, match=r"parameter 'blocks.mlp.down.kernel' has shape"):
        params_from(cfg.init_from, setup, init_state(setup)["params"])


@pytest.mark.parametrize("init_heads", ["strict", "reinit"])
def test_an_encoder_decoder_from_an_encoder_run_names_the_architectures(
        tmp_path, cache_dir, mlm_run, corpus, init_heads):
    cfg = dataclasses.replace(tiny_config(corpus, cache_dir, tmp_path / "run"),
                              objective="span_corruption", init_from=str(mlm_run),
                              init_heads=init_heads)
    _, _, setup = open_run(cfg)
    with pytest.raises(UserError, match="holds a model of architecture encoder, this run's is "
                                        "encoder_decoder"):
        params_from(cfg.init_from, setup)


@pytest.fixture(scope="module")
def hf_bert_dir(tmp_path_factory):
    import hf_models

    return hf_models.save(hf_models.build("bert"), tmp_path_factory.mktemp("hf") / "bert")


def _hf_classify_cfg(tmp_path, cache_dir, corpus, hf_dir, init_heads):
    from jaxlm.hf.importer import hf_model_config, read_hf_config

    _, model, _ = hf_model_config(read_hf_config(hf_dir), None)
    cfg = _classify_cfg(tmp_path, cache_dir, hf_dir, corpus, init_heads)
    return dataclasses.replace(cfg, model=dataclasses.replace(model, dropout=0.1),
                               init_from=f"hf:{hf_dir}")


def test_reinit_from_hf_loads_the_bert_backbone_and_creates_the_classifier(
        tmp_path, cache_dir, corpus, hf_bert_dir, capsys):
    from jaxlm.hf.importer import import_hf

    cfg = _hf_classify_cfg(tmp_path, cache_dir, corpus, hf_bert_dir, "reinit")
    _, _, setup = open_run(cfg)
    params = _flat(params_from(cfg.init_from, setup, init_state(setup)["params"]))
    import_hf(hf_bert_dir, tmp_path / "imported")
    source = _flat(load_run(tmp_path / "imported", 0)[2])
    backbone = [k for k in source if not k.startswith("mlm_head")]
    assert backbone and all(np.array_equal(params[k], source[k]) for k in backbone)
    assert {k for k in params if k not in backbone} == {k for k in params if k.startswith("task_head")}
    out = capsys.readouterr().out
    assert "dropped mlm_head.bias" in out and "created task_head.out.bias" in out


def test_strict_from_hf_refuses_a_model_without_that_head(tmp_path, cache_dir, corpus, hf_bert_dir):
    cfg = _hf_classify_cfg(tmp_path, cache_dir, corpus, hf_bert_dir, "strict")
    _, _, setup = open_run(cfg)
    with pytest.raises(UserError, match="bert checkpoint has no classify head; set init_heads=reinit"):
        params_from(cfg.init_from, setup)
