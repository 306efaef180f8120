"""Value checks of a loaded config that its types alone cannot express: lengths that must fit,
keys that must agree (objective, architecture, task data), each a one-line UserError naming the
key and the fix."""

from __future__ import annotations

from typing import Any

from jaxlm.config import (ENCODER_DECODER_OBJECTIVES, OBJECTIVE_ARCHITECTURE, RECORD_OBJECTIVES,
                          Config, ModelConfig, architecture, head_dim, kv_heads,
                          target_length)
from jaxlm.errors import UserError
from jaxlm.ranges import check_config
from jaxlm.span_corruption import row_lengths

TASK_ROLES = ("input", "target", "text", "text_pair", "label")


def validate(cfg: Config) -> None:
    """Every check of this module, in order; the first failure is raised."""
    check_config(cfg)
    _validate_model(cfg.model)
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise UserError(
            f"data.seq_len ({cfg.data.seq_len}) exceeds model.max_seq_len "
            f"({cfg.model.max_seq_len}); lower data.seq_len or raise model.max_seq_len"
        )
    if cfg.train.batch_size % cfg.train.grad_accum_steps:
        raise UserError(
            f"train.batch_size ({cfg.train.batch_size}) must be a positive multiple of "
            f"train.grad_accum_steps ({cfg.train.grad_accum_steps})"
        )
    profile = cfg.train.profile_steps
    if profile and (len(profile) != 2 or profile[0] > profile[1]):  # each >= 1: ranges
        raise UserError(f"train.profile_steps is {list(profile)}; give [first, last] with "
                        "1 <= first <= last, e.g. [10, 12], or [] for no trace")
    _validate_task(cfg)


def _validate_task(cfg: Config) -> None:
    """Checks of the task-data, architecture, head and dropout keys."""
    task_data = cfg.data.dataset in ("jsonl", "csv")
    if cfg.objective in RECORD_OBJECTIVES and not task_data:
        raise UserError(f"objective {cfg.objective} reads labelled records: set data.dataset to "
                        "jsonl or csv and data.paths to the files")
    if task_data and cfg.objective not in RECORD_OBJECTIVES:
        raise UserError(f"data.dataset {cfg.data.dataset} holds task records; use objective "
                        "seq2seq, seq2seq_lm or classify (or text_files for plain text)")
    unknown = sorted(set(cfg.data.fields) - set(TASK_ROLES))
    if unknown:
        raise UserError(f"data.fields has unknown roles {unknown}; roles are {list(TASK_ROLES)}")
    try:
        cfg.data.template.format(input="", text="", text_pair="", target="")
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(f"data.template {cfg.data.template!r} is not a format string of "
                        f"{{input}} / {{text}} ({err!r}); double literal braces as {{{{ }}}}") from None
    fixed = {"clm": True, "seq2seq_lm": True, "mlm": False}.get(cfg.objective)
    if cfg.model.causal is not None and fixed is not None and cfg.model.causal != fixed:
        raise UserError(f"objective {cfg.objective} needs model.causal {fixed} (or null); only "
                        "classify chooses between an encoder and a decoder")
    _validate_architecture(cfg)
    if cfg.data.nsp and cfg.objective != "mlm":
        raise UserError("data.nsp (next-sentence prediction) needs objective mlm")


def _validate_architecture(cfg: Config) -> None:
    """model.architecture against the objective and model.causal."""
    chosen, needed = architecture(cfg), OBJECTIVE_ARCHITECTURE.get(cfg.objective)
    if needed is not None and chosen != needed:
        raise UserError(f"objective {cfg.objective} needs model.architecture {needed} (or null)")
    if chosen == "encoder_decoder" and cfg.objective not in ENCODER_DECODER_OBJECTIVES:
        raise UserError(f"model.architecture encoder_decoder trains with objective span_corruption "
                        f"or seq2seq, not {cfg.objective}")
    causal = cfg.model.causal
    if cfg.model.architecture in ("decoder", "encoder") and causal is not None and causal != (
            chosen == "decoder"):
        raise UserError(f"model.architecture {chosen} and model.causal {causal} disagree; "
                        "set one of them")
    if chosen != "encoder_decoder":
        stray = [k for k in ("model.n_encoder_layers", "model.n_decoder_layers", "data.target_len")
                 if _value(cfg, k) is not None]
        if stray:
            raise UserError(f"{' and '.join(stray)} apply to model.architecture encoder_decoder "
                            f"only; this {chosen} model has one stack: remove them")
        return
    if causal is not None:
        raise UserError("model.causal applies to single stacks; an encoder_decoder has a "
                        "bidirectional encoder and a causal decoder: remove it")
    _validate_target_len(cfg)


def _validate_target_len(cfg: Config) -> None:
    """The decoder length of an encoder-decoder fits the model, and span corruption's targets."""
    minimum = 3 if cfg.objective == "span_corruption" else 2
    if cfg.data.seq_len < minimum:
        raise UserError(f"objective {cfg.objective} needs data.seq_len >= {minimum}, got "
                        f"{cfg.data.seq_len}")
    needed = row_lengths(cfg.data)[1] if cfg.objective == "span_corruption" else 2
    target_len = target_length(cfg)
    if target_len < needed:
        raise UserError(f"data.target_len ({target_len}) is shorter than span corruption's "
                        f"targets at data.seq_len {cfg.data.seq_len} ({needed} tokens); raise it "
                        "or leave it null")
    if target_len > cfg.model.max_seq_len:
        what = ("data.target_len" if cfg.data.target_len
                else "the decoder length span corruption needs")
        raise UserError(f"{what} ({target_len}) exceeds model.max_seq_len "
                        f"({cfg.model.max_seq_len}); raise model.max_seq_len or lower "
                        "data.seq_len / data.noise_density")


def _value(cfg: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _validate_model(model: ModelConfig) -> None:
    """The architecture switches: head layout, RoPE, token types."""
    if model.head_dim is None and model.d_model % model.n_heads:
        raise UserError(
            f"model.d_model ({model.d_model}) must be divisible by model.n_heads "
            f"({model.n_heads}), or set model.head_dim"
        )
    if model.n_heads % kv_heads(model):
        raise UserError(
            f"model.n_heads ({model.n_heads}) must be a multiple of model.n_kv_heads "
            f"({model.n_kv_heads})"
        )
    if model.position_embedding == "rope" and head_dim(model) % 2:
        raise UserError("model.d_model / model.n_heads must be even (RoPE rotates pairs)")
    if model.rope_scaling == "llama3" and model.rope_high_freq_factor <= model.rope_low_freq_factor:
        raise UserError("model.rope_scaling llama3 needs rope_high_freq_factor > rope_low_freq_factor")
