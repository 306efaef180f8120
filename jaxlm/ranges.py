"""Allowed ranges of every numeric config key, in one table, and the check both config and CLI use.

A value out of range (a negative warmup, a NaN learning rate, b2 = 2) would not fail: it would train
something else than asked, silently. So every number is checked when the config is loaded, and the
error names the key, the value and the range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from jaxlm.errors import UserError


@dataclass(frozen=True)
class Range:
    """Where a number may lie: bounds are closed unless marked open; a float must be finite."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        below = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return above and below

    def describe(self, kind: type) -> str:
        """E.g. 'an integer >= 1', 'a finite number in [0, 1)'."""
        noun = "an integer" if kind is int else "a finite number"
        if self.high is None:
            return f"{noun} {'>' if self.open_low else '>='} {self.low}"
        left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
        return f"{noun} in {left}{self.low}, {self.high}{right}"


AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
POSITIVE = Range(0, open_low=True)
FRACTION = Range(0, 1)
BETA = Range(0, 1, open_high=True)  # Adam's moment decay: 1 would never forget
SEED = Range(0, 2**32 - 1)  # seeds go through uint32 (jax keys, grain)

# Every int or float field of the config (dotted key -> allowed range); a test keeps it complete.
CONFIG_RANGES: dict[str, Range] = {
    "seed": SEED,
    "model.vocab_size": AT_LEAST_1,
    "model.d_model": AT_LEAST_1,
    "model.n_layers": AT_LEAST_1,
    "model.n_heads": AT_LEAST_1,
    "model.d_ff": AT_LEAST_1,
    "model.max_seq_len": AT_LEAST_1,
    "model.rope_theta": POSITIVE,
    "model.norm_eps": POSITIVE,
    "model.dropout": Range(0, 1, open_high=True),
    "model.num_labels": Range(2),  # classify: a classifier of one class learns nothing
    "model.rope_scaling_factor": POSITIVE,
    "model.rope_low_freq_factor": POSITIVE,
    "model.rope_high_freq_factor": POSITIVE,
    "model.rope_original_max_seq_len": AT_LEAST_1,
    "model.n_kv_heads": AT_LEAST_1,  # null: n_heads
    "model.head_dim": AT_LEAST_1,  # null: d_model / n_heads
    "model.type_vocab_size": AT_LEAST_0,  # 0: no token types
    "model.n_encoder_layers": AT_LEAST_1,  # null: n_layers
    "model.n_decoder_layers": AT_LEAST_1,  # null: n_layers
    "data.validation_percent": Range(0, 100, open_high=True),  # 100 would leave no training data
    "data.seq_len": AT_LEAST_1,
    "data.mask_rate": Range(0, 1, open_low=True, open_high=True),
    "data.target_len": Range(2),  # a start token and at least one target
    "data.noise_density": Range(0, 1, open_low=True, open_high=True),
    "data.mean_span_length": Range(1),
    "data.worker_count": AT_LEAST_0,
    "data.prefetch_batches": AT_LEAST_0,
    "optimizer.learning_rate": POSITIVE,
    "optimizer.warmup_steps": AT_LEAST_0,
    "optimizer.min_lr_ratio": FRACTION,
    "optimizer.b1": BETA,
    "optimizer.b2": BETA,
    "optimizer.eps": POSITIVE,
    "optimizer.weight_decay": AT_LEAST_0,
    "optimizer.grad_clip": AT_LEAST_0,  # 0 disables clipping
    "train.steps": AT_LEAST_1,
    "train.batch_size": AT_LEAST_1,
    "train.log_every": AT_LEAST_1,
    "train.eval_every": AT_LEAST_0,  # 0 disables periodic eval
    "train.eval_batches": AT_LEAST_1,
    "train.max_consecutive_skips": AT_LEAST_1,
    "train.grad_accum_steps": AT_LEAST_1,
    "train.pseudo_ppl_examples": AT_LEAST_0,
    "train.profile_steps": AT_LEAST_1,  # each of [first, last]
    "mesh.cpu_devices": AT_LEAST_1,
    "checkpoint.every": AT_LEAST_1,
    "checkpoint.keep": AT_LEAST_1,
}


def check(name: str, value: float, allowed: Range) -> None:
    """Raises a one-line UserError naming `name`, `value` and `allowed` when out of range."""
    if value not in allowed:
        raise UserError(f"{name} must be {allowed.describe(type(value))}, got {value}")


def check_config(cfg: Any) -> None:
    """Checks every key of CONFIG_RANGES in a Config (unset optional values are skipped; a tuple's
    every element)."""
    for key, allowed in CONFIG_RANGES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if isinstance(value, tuple):
            for i, element in enumerate(value):
                check(f"config key '{key}[{i}]'", element, allowed)
        elif value is not None:
            check(f"config key '{key}'", value, allowed)
