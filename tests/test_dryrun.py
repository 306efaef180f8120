import dataclasses

import pytest

from jaxlm.config import MeshConfig
from jaxlm.dryrun import dry_run
from jaxlm.errors import UserError
from jaxlm.tokenizer import ByteTokenizer
from jaxlm.run import resolve


def test_dry_run_reports_sharded_memory_without_data(tiny_cfg, capsys, tmp_path):
    # No data is read: the dataset points nowhere.
    cfg = dataclasses.replace(
        tiny_cfg,
        data=dataclasses.replace(tiny_cfg.data, paths=(str(tmp_path / "none/*.txt"),)),
        mesh=MeshConfig(axes={"data": 1, "fsdp": 8, "tensor": 1}),
    )
    fsdp = dry_run(resolve(cfg, ByteTokenizer()))
    replicated = dry_run(resolve(dataclasses.replace(cfg, mesh=MeshConfig()), ByteTokenizer()))
    out = capsys.readouterr().out
    assert "embed.embedding" in out and "P('tensor', 'fsdp')" in out
    assert fsdp["params"] == replicated["params"] > 0
    # Every param except the 8 norm/scale vectors' remainders splits 8 ways under fsdp.
    assert fsdp["params_bytes_per_device"] < replicated["params_bytes_per_device"] / 6
    assert fsdp["optimizer_bytes_per_device"] < replicated["optimizer_bytes_per_device"] / 6
    assert fsdp["compiled_temp_bytes"] > 0


def test_dry_run_of_a_gqa_bert_style_model_on_fsdp_and_tensor(tiny_cfg, capsys):
    model = dataclasses.replace(
        tiny_cfg.model, n_heads=4, n_kv_heads=2, position_embedding="learned", norm="layernorm",
        norm_position="post", final_norm=False, embed_norm=True, bias=True, type_vocab_size=2)
    cfg = dataclasses.replace(tiny_cfg, objective="mlm", model=model,
                              mesh=MeshConfig(axes={"data": 2, "fsdp": 2, "tensor": 2}))
    report = dry_run(resolve(cfg, ByteTokenizer()))
    out = capsys.readouterr().out
    assert "blocks.attn.k.bias" in out and "type_embed.embedding" in out
    assert report["compiled_temp_bytes"] > 0


def test_dry_run_refuses_microbatches_that_do_not_split_into_whole_rows(tiny_cfg):
    # 8 rows on 8 devices are one row per device, which does not split into 2 microbatches.
    cfg = dataclasses.replace(tiny_cfg, mesh=MeshConfig(axes={"data": 8, "fsdp": 1, "tensor": 1}),
                              train=dataclasses.replace(tiny_cfg.train, batch_size=8,
                                                        grad_accum_steps=2))
    with pytest.raises(UserError, match="train.grad_accum_steps \\(2\\)"):
        dry_run(resolve(cfg, ByteTokenizer()))
