"""Typed run configuration: frozen dataclasses <- YAML (safe_load) <- `--set a.b=c` overrides,
checked by `jaxlm.config_checks`.

Every key is checked against the dataclass field it names, so a typo or a wrongly typed value is a
one-line `UserError` naming the key, never a silent default.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxlm.errors import UserError
from jaxlm.span_corruption import row_lengths


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int | None = None  # None: the tokenizer's, rounded up to a multiple of 128
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 1024
    max_seq_len: int = 1024
    mlp: Literal["swiglu", "gelu", "gelu_tanh"] = "swiglu"
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    # Architecture switches (the defaults are jaxlm's own LLaMA-like block; see configs/base.yaml).
    position_embedding: Literal["rope", "learned"] = "rope"
    rope_scaling: Literal["none", "llama3"] = "none"
    rope_scaling_factor: float = 8.0  # llama3: the next three as in Llama 3.1's rope_scaling
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_position: Literal["pre", "post"] = "pre"
    final_norm: bool = True
    embed_norm: bool = False
    bias: bool = False  # biases on the attention and MLP projections
    n_kv_heads: int | None = None  # None: n_heads (fewer: grouped-query attention)
    head_dim: int | None = None  # None: d_model / n_heads
    type_vocab_size: int = 0  # BERT token types; 0: none
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    attention: Literal["xla", "cudnn", "splash"] = "xla"  # unsupported here -> xla, one warning
    causal: bool | None = None  # None: decoder for clm/seq2seq_lm, encoder for mlm/classify
    # None: from the objective (encoder_decoder for span_corruption and seq2seq, else model.causal)
    architecture: Literal["decoder", "encoder", "encoder_decoder"] | None = None
    n_encoder_layers: int | None = None  # encoder_decoder: None means n_layers
    n_decoder_layers: int | None = None  # encoder_decoder: None means n_layers
    dropout: float = 0.0  # embedding, attention and residual dropout while training
    scan_layers: bool | None = None  # None: unrolled up to UNROLL_MAX_LAYERS layers, else scanned
    num_labels: int | None = None  # classify: None means the number of labels in the data


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "python_stdlib"  # python_stdlib | text_files | jsonl | csv | a TFDS name
    paths: tuple[str, ...] = ()  # text_files: files or globs; jsonl/csv: the (training) records
    validation_paths: tuple[str, ...] = ()  # jsonl/csv: validation records (else a hash split)
    fields: dict[str, str] = field(default_factory=dict)  # jsonl/csv: role -> column name
    template: str = ""  # seq2seq(_lm)/classify: formats the input (text), e.g. "Q: {input}\n"
    nsp: bool = False  # mlm: sentence pairs with the next-sentence-prediction loss
    split_paragraphs: bool = False  # text_files: one document per blank-line-separated paragraph
    validation_percent: float = 5.0  # python_stdlib / text_files: share of documents held out
    text_feature: str = "text"  # TFDS catalog datasets: the feature holding the text
    train_split: str = "train"
    eval_split: str = "validation"
    tokenizer: str = "bytes"
    seq_len: int = 256
    cache_dir: str = "~/.cache/jaxlm"
    mask_rate: float = 0.15  # mlm: share of non-special tokens selected for prediction
    # encoder_decoder: decoder tokens per row (None: seq_len for seq2seq, what span_corruption's
    # targets take at most)
    target_len: int | None = None
    noise_density: float = 0.15  # span_corruption: share of tokens dropped from the input
    mean_span_length: float = 3.0  # span_corruption: mean length of a dropped span
    whole_word_mask: bool = False  # mlm + sentencepiece: select whole words, not single pieces
    worker_count: int = 0  # grain worker processes (0: read in the training process)
    prefetch_batches: int = 2  # batches prepared ahead and placed on device


@dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio at the last step
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    no_decay: tuple[str, ...] = ("scale", "bias", "embedding")  # param names never decayed
    grad_clip: float = 1.0  # global-norm clipping; 0 disables


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = ""  # "" means runs/<name>
    steps: int = 1000
    batch_size: int = 32  # global batch, sequences per step
    log_every: int = 10
    eval_every: int = 200  # 0 disables periodic eval
    eval_batches: int = 16
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient
    max_consecutive_skips: int = 10  # skip: stop anyway after this many non-finite steps in a row
    remat: Literal["none", "full", "dots_saveable"] = "none"  # activation recomputation per layer
    grad_accum_steps: int = 1  # microbatches per step (batch_size must divide by it)
    pseudo_ppl_examples: int = 16  # mlm eval: validation rows scored by pseudo-perplexity
    profile_steps: tuple[int, ...] = ()  # [first, last]: a profiler trace of those steps


def _default_axes() -> dict[str, int]:
    return {"data": -1, "fsdp": 1, "tensor": 1}


def _default_rules() -> dict[str, tuple[str, ...]]:
    return {
        "batch": ("data", "fsdp"),
        "embed": ("fsdp",),
        "mlp": ("tensor",),
        "heads": ("tensor",),
        "kv": (),
        "vocab": ("tensor",),
        "layers": (),
    }


@dataclass(frozen=True)
class MeshConfig:
    axes: dict[str, int] = field(default_factory=_default_axes)  # -1: the remaining devices
    rules: dict[str, tuple[str, ...]] = field(default_factory=_default_rules)  # logical -> mesh
    cpu_devices: int | None = None  # XLA:CPU devices of `jaxlm train`; None: one per core (auto)


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500
    keep: int = 3
    async_save: bool = True


@dataclass(frozen=True)
class Config:
    name: str = "default"
    objective: Literal["clm", "mlm", "seq2seq_lm", "classify", "span_corruption", "seq2seq"] = "clm"
    seed: int = 0
    init_from: str = ""  # RUN_DIR[@STEP] or hf:DIR: start from those params (fresh optimizer)
    init_heads: Literal["strict", "reinit"] = "strict"  # init_from: heads must match | made fresh
    compilation_cache_dir: str = "~/.cache/jaxlm/xla"  # compiled programs kept across runs; "": off
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_dir or f"runs/{self.name}")


# ---------------------------------------------------------------- typed conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Returns `value` as type `tp`, or raises UserError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, key)
    if origin is Literal:
        if value not in args:
            raise UserError(f"config key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}' must be a list, got {value!r}")
        return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' must be a mapping, got {value!r}")
        return {str(k): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise UserError(
            f"config key '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        )
    return value


def from_dict(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """Builds dataclass `cls` from a plain mapping; unknown keys and wrong types are UserErrors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in hints:
            raise UserError(f"unknown config key '{prefix}{key}' (valid keys: {', '.join(fields)})")
    values = {}
    for key, value in raw.items():
        if typing.get_origin(hints[key]) is dict and isinstance(value, dict):
            # Mapping fields (mesh axes, rules) update their defaults rather than replace them.
            value = {**fields[key].default_factory(), **value}
        values[key] = _convert(value, hints[key], f"{prefix}{key}")
    return cls(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain YAML/JSON-ready mapping (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


# ---------------------------------------------------------------- loading


def _field_type(path: list[str]) -> Any:
    """The declared type at a dotted path, or None where the path leaves the dataclasses."""
    tp: Any = Config
    for part in path:
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Applies `a.b=value` to the raw mapping; the value is parsed as YAML (typed)."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"override '{assignment}' must look like section.key=value")
    path = key.split(".")
    if _field_type(path) is str:
        value: Any = text
    else:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise UserError(f"override '{assignment}': value is not valid YAML ({err})") from None
    node = raw
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override '{assignment}': '{part}' is not a section")
        node = child
    node[path[-1]] = value


def read_yaml(path: Path) -> dict[str, Any]:
    """Reads a YAML mapping with safe_load; a missing or malformed file is a UserError."""
    try:
        text = path.read_text()
    except OSError as err:
        raise UserError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        problem = getattr(err, "problem", None) or str(err)
        raise UserError(f"invalid YAML in {path}{line}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a mapping of sections, not {type(raw).__name__}")
    return raw


# The repository's configs/, shipped inside the package (jaxlm/configs links to it), so a name
# like `tiny_clm` works from a wheel install as well as from a checkout.
SHIPPED_CONFIGS = Path(str(importlib.resources.files("jaxlm") / "configs"))


def shipped_config_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def config_path(spec: str) -> Path:
    """The file `--config SPEC` means: a path, or (no '/' and no .yaml) a shipped config's name."""
    if "/" in spec or spec.endswith((".yaml", ".yml")):
        return Path(spec)
    names = shipped_config_names()
    if spec not in names:
        raise UserError(f"--config {spec}: no such shipped config (shipped: {', '.join(names)}); "
                        "give a YAML file's path, e.g. ./my.yaml")
    return SHIPPED_CONFIGS / f"{spec}.yaml"


def load_config(path: Path | None, overrides: list[str] = ()) -> Config:
    """Dataclass defaults <- YAML file <- overrides, validated."""
    raw = read_yaml(path) if path is not None else {}
    for assignment in overrides:
        apply_override(raw, assignment)
    cfg = from_dict(Config, raw)
    from jaxlm.config_checks import validate  # the checks read this module's types

    validate(cfg)
    return cfg


# Objectives that read labelled records (jsonl/csv), and those that train an encoder-decoder.
RECORD_OBJECTIVES = ("seq2seq_lm", "classify", "seq2seq")
ENCODER_DECODER_OBJECTIVES = ("span_corruption", "seq2seq")
# The architecture each objective needs (classify: either single stack).
OBJECTIVE_ARCHITECTURE = {"clm": "decoder", "seq2seq_lm": "decoder", "mlm": "encoder",
                          "span_corruption": "encoder_decoder", "seq2seq": "encoder_decoder"}


def architecture(cfg: Config) -> str:
    """decoder | encoder | encoder_decoder: model.architecture, else what the objective implies
    (a single stack follows model.causal, which defaults to a decoder for clm and seq2seq_lm)."""
    if cfg.model.architecture is not None:
        return cfg.model.architecture
    if cfg.objective in ENCODER_DECODER_OBJECTIVES:
        return "encoder_decoder"
    causal = cfg.model.causal
    if causal is None:
        causal = cfg.objective in ("clm", "seq2seq_lm")
    return "decoder" if causal else "encoder"


def target_length(cfg: Config) -> int:
    """Decoder tokens per row of an encoder-decoder (0 for the single stacks)."""
    if architecture(cfg) != "encoder_decoder":
        return 0
    if cfg.objective != "span_corruption":
        return cfg.data.target_len or cfg.data.seq_len
    return cfg.data.target_len or row_lengths(cfg.data)[1]  # config_checks: long enough


def decoder_layers(model: ModelConfig) -> int:
    return model.n_decoder_layers or model.n_layers


def encoder_layers(model: ModelConfig) -> int:
    return model.n_encoder_layers or model.n_layers


# model.scan_layers null unrolls models this shallow: measured 1.25-1.5x faster steps for 4-layer
# and 1.28x for 8-layer d_model 128 models on CPU, for +0.7 s of compile at 8 layers (scanned:
# flat at ~2.3 s; unrolled 32 layers: 7.1 s); a 25M 8-layer model is within noise either way.
UNROLL_MAX_LAYERS = 8


def scans_layers(model: ModelConfig, n_layers: int | None = None) -> bool:
    """Whether a loop over `n_layers` (default model.n_layers) layers runs as one `lax.scan`
    (else unrolled; the params are the same). train.remat scans regardless (model.scan_blocks)."""
    if model.scan_layers is None:
        return (n_layers or model.n_layers) > UNROLL_MAX_LAYERS
    return model.scan_layers


def kv_heads(model: ModelConfig) -> int:
    return model.n_kv_heads or model.n_heads


def head_dim(model: ModelConfig) -> int:
    return model.head_dim or model.d_model // model.n_heads


def save_yaml(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
