from pathlib import Path

import dataclasses
import typing

import pytest

from jaxlm.config import Config, architecture, config_path, load_config, save_yaml, shipped_config_names
from jaxlm.errors import UserError
from jaxlm.ranges import CONFIG_RANGES

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_base_yaml_documents_exactly_the_defaults():
    assert load_config(CONFIGS / "base.yaml") == Config()


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_loads(name):
    load_config(CONFIGS / name)


def test_overrides_are_parsed_with_types():
    cfg = load_config(
        CONFIGS / "tiny_clm.yaml",
        [
            "model.n_layers=3",
            "optimizer.learning_rate=1e-4",
            "optimizer.warmup_steps=7",
            "model.tie_embeddings=false",
            "name=123",
            "data.paths=[a.txt, 'b/*.txt']",
            "mesh.axes.data=2",
            "mesh.axes.fsdp=4",
            "model.vocab_size=512",
        ],
    )
    assert cfg.model.n_layers == 3 and cfg.optimizer.learning_rate == 1e-4
    assert cfg.optimizer.warmup_steps == 7 and cfg.model.tie_embeddings is False
    assert cfg.name == "123"  # a str field keeps the literal text
    assert cfg.data.paths == ("a.txt", "b/*.txt")
    assert cfg.mesh.axes == {"data": 2, "fsdp": 4, "tensor": 1}
    assert cfg.model.vocab_size == 512


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["optimizer.learning_rate=1"]).optimizer.learning_rate == 1.0
    with pytest.raises(UserError, match="'model.d_model' must be int"):
        load_config(None, ["model.d_model=1.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_layer=3", "unknown config key 'model.n_layer'"),
        ("modle.n_layers=3", "unknown config key 'modle'"),
        ("model.n_layers=three", "'model.n_layers' must be int"),
        ("model.tie_embeddings=1", "'model.tie_embeddings' must be bool"),
        ("model.mlp=relu", "'model.mlp' must be one of"),
        ("objective=bert", "'objective' must be one of"),
        ("data.seq_len=4096", "exceeds model.max_seq_len"),
        ("model.n_heads=3", "divisible by model.n_heads"),
        ("train.steps=0", "'train.steps' must be an integer >= 1, got 0"),
        ("model", "must look like section.key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: [1, 2\n")
    with pytest.raises(UserError, match="invalid YAML .* line"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(bad)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "tiny_clm.yaml", ["data.paths=[x]"])
    save_yaml(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def _numeric_keys(cls: type = Config, prefix: str = "") -> set[str]:
    """Dotted keys of every int/float field (optional ones included) of the config dataclasses;
    mesh.axes sizes are sharding.make_mesh's to check (it alone knows mesh axes)."""
    keys = set()
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys |= _numeric_keys(tp, f"{prefix}{name}.")
        elif typing.get_origin(tp) is not dict and {int, float} & set(typing.get_args(tp) or (tp,)):
            keys.add(f"{prefix}{name}")
    return keys


def test_every_numeric_key_has_a_range():
    assert set(CONFIG_RANGES) == _numeric_keys()


@pytest.mark.parametrize(
    "override",
    [
        "optimizer.warmup_steps=0",
        "optimizer.grad_clip=0",
        "optimizer.weight_decay=0",
        "optimizer.min_lr_ratio=0",
        "optimizer.min_lr_ratio=1",
        "optimizer.b1=0",
        "train.eval_every=0",
        "train.pseudo_ppl_examples=0",
        "data.validation_percent=0",
        "data.worker_count=0",
        "data.prefetch_batches=0",
        "seed=4294967295",
    ],
)
def test_values_on_the_edge_of_their_range_are_accepted(override):
    load_config(None, [override])


def test_shipped_configs_are_the_repository_configs():
    assert shipped_config_names() == sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert config_path("tiny_clm").read_bytes() == (CONFIGS / "tiny_clm.yaml").read_bytes()


@pytest.mark.parametrize("spec", ["configs/tiny_clm.yaml", "tiny_clm.yaml", "./tiny_clm", "x.yml"])
def test_a_path_stays_a_path(spec):
    assert config_path(spec) == Path(spec)


def test_unknown_config_name_lists_the_shipped_ones():
    with pytest.raises(UserError, match="no such shipped config .*shipped: base, .*tiny_clm"):
        config_path("tiny_gpt")


@pytest.mark.parametrize("overrides, message", [
    (["objective=span_corruption", "model.architecture=decoder"],
     "objective span_corruption needs model.architecture encoder_decoder"),
    (["objective=mlm", "model.architecture=decoder"], "objective mlm needs model.architecture encoder"),
    (["model.architecture=encoder_decoder"], "objective clm needs model.architecture decoder"),
    (["objective=classify", "data.dataset=jsonl", "data.paths=[x]",
      "model.architecture=encoder_decoder"],
     "encoder_decoder trains with objective span_corruption or seq2seq, not classify"),
    (["objective=classify", "data.dataset=jsonl", "data.paths=[x]", "model.architecture=encoder",
      "model.causal=true"], "model.architecture encoder and model.causal True disagree"),
    (["objective=span_corruption", "data.target_len=2048"], "data.target_len \\(2048\\) exceeds"),
    (["objective=seq2seq"], "objective seq2seq reads labelled records"),
])
def test_architectures_that_do_not_fit_the_objective_are_one_line_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides, expected", [
    ([], "decoder"),
    (["objective=mlm"], "encoder"),
    (["objective=span_corruption"], "encoder_decoder"),
    (["objective=classify", "data.dataset=jsonl", "data.paths=[x]"], "encoder"),
    (["objective=classify", "data.dataset=jsonl", "data.paths=[x]", "model.architecture=decoder"],
     "decoder"),
])
def test_the_architecture_follows_the_objective_unless_set(overrides, expected):
    assert architecture(load_config(None, overrides)) == expected


@pytest.mark.parametrize("overrides, message", [
    (["objective=span_corruption", "data.seq_len=2"], "span_corruption needs data.seq_len >= 3"),
    (["objective=span_corruption", "data.seq_len=512", "model.max_seq_len=512",
      "data.noise_density=0.8"], "the decoder length span corruption needs \\(\\d+\\) exceeds"),
    (["objective=span_corruption", "data.seq_len=64", "data.target_len=10"],
     "data.target_len \\(10\\) is shorter than span corruption's targets"),
    (["model.n_encoder_layers=2"], "model.n_encoder_layers apply to model.architecture "
                                   "encoder_decoder only"),
    (["objective=span_corruption", "model.causal=true"], "model.causal applies to single stacks"),
])
def test_encoder_decoder_lengths_and_stray_keys_are_one_line_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)
