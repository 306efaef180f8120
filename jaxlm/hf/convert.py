"""What the three family tables share: a Rule ties jaxlm params to Hugging Face tensors, with the
transform each way; the registry finds a family by HF model_type or by a jaxlm config.

Block params are stacked on a leading layers axis in jaxlm and stored per layer in HF, so a rule
whose params live under `blocks.` names HF tensors with `{i}` and is applied once per layer.
Shape legend: D d_model, H heads, K head dim, V vocab.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from jaxlm.config import ENCODER_DECODER_OBJECTIVES, ModelConfig
from jaxlm.errors import UserError
from jaxlm.storage import pid_alive

Arrays = tuple[np.ndarray, ...]
# Params with a vocabulary axis (and which one): padded rows beyond the tokenizer are dropped.
VOCAB_AXIS = {"embed.embedding": 0, "lm_head.kernel": 1, "mlm_head.bias": 0}


@dataclass(frozen=True)
class Transform:
    """HF tensors -> jaxlm arrays (one layer's), and back; both exact (reshapes, transposes)."""

    to_jax: Callable[..., Arrays]
    to_hf: Callable[..., Arrays]


@dataclass(frozen=True)
class Rule:
    params: tuple[str, ...]  # dotted jaxlm param paths
    hf: tuple[str, ...]  # HF tensor names; "{i}" is the layer index for block params
    transform: Transform

    @property
    def layered(self) -> bool:
        return self.params[0].startswith("blocks.")

    def hf_names(self, layer: int | None) -> tuple[str, ...]:
        return tuple(name.format(i=layer) for name in self.hf)


def rule(params: str | tuple[str, ...], hf: str | tuple[str, ...], transform: Transform) -> Rule:
    as_tuple = lambda x: (x,) if isinstance(x, str) else tuple(x)
    return Rule(as_tuple(params), as_tuple(hf), transform)


SAME = Transform(lambda w: (w,), lambda w: (w,))
# torch.nn.Linear stores (out, in); jaxlm kernels are (in, out).
LINEAR = Transform(lambda w: (w.T,), lambda k: (k.T,))


def heads_in(heads: int, head_dim: int) -> Transform:
    """Linear (H*K, D) <-> Einsum kernel (D, H, K): the q/k/v projections."""
    return Transform(
        lambda w: (w.T.reshape(w.shape[1], heads, head_dim),),
        lambda k_DxHxK: (k_DxHxK.reshape(k_DxHxK.shape[0], -1).T,),
    )


def heads_out(heads: int, head_dim: int) -> Transform:
    """Linear (D, H*K) <-> Einsum kernel (H, K, D): the output projection."""
    return Transform(
        lambda w: (w.T.reshape(heads, head_dim, w.shape[0]),),
        lambda k_HxKxD: (k_HxKxD.reshape(-1, k_HxKxD.shape[-1]).T,),
    )


def head_bias(heads: int, head_dim: int) -> Transform:
    """Bias (H*K,) <-> (H, K)."""
    return Transform(lambda b: (b.reshape(heads, head_dim),), lambda b_HxK: (b_HxK.reshape(-1),))


@dataclass(frozen=True)
class Family:
    """One HF model family: its config translation both ways and its name table."""

    model_type: str
    base_prefix: str  # the base model's prefix, absent from checkpoints saved as the base model
    config_from_hf: Callable[[dict[str, Any], str], dict[str, Any]]  # (HF config, objective)
    config_to_hf: Callable[[ModelConfig, str], dict[str, Any]]
    table: Callable[[ModelConfig, str], list[Rule]]
    requirements: Callable[[ModelConfig], dict[str, tuple]]  # jaxlm key -> values HF can express
    ignored: tuple[str, ...] = ()  # regexes of HF tensors with no jaxlm counterpart (buffers...)
    objectives: tuple[str, ...] = ("clm",)


# Hugging Face encoder-decoders and what jaxlm would need to import them.
ENCODER_DECODER_TYPES = {"t5": "relative position bias", "mt5": "relative position bias",
                         "umt5": "relative position bias"}


def family_for_hf(hf_config: dict[str, Any]) -> Family:
    from jaxlm.hf import FAMILIES

    model_type = hf_config.get("model_type")
    for family in FAMILIES:
        if family.model_type == model_type:
            return family
    names = ", ".join(f.model_type for f in FAMILIES)
    if model_type in ENCODER_DECODER_TYPES:
        raise UserError(f"HF config key 'model_type' is {model_type!r}, an encoder-decoder with "
                        f"{ENCODER_DECODER_TYPES[model_type]}, which jaxlm's encoder-decoder "
                        f"(RoPE or learned positions) lacks; jaxlm imports {names}")
    raise UserError(f"HF config key 'model_type' is {model_type!r}; jaxlm imports {names}")


def family_for_run(model: ModelConfig, objective: str) -> Family:
    """The HF family that can express this jaxlm model, or a UserError naming the jaxlm key."""
    from jaxlm.hf import FAMILIES

    if objective in ENCODER_DECODER_OBJECTIVES:
        raise UserError(f"a {objective} run is an encoder-decoder; Hugging Face's (T5) needs "
                        "relative position bias, which jaxlm's lacks: export decoder or encoder "
                        "runs")
    by_type = {f.model_type: f for f in FAMILIES}
    family = by_type["bert" if objective == "mlm" else
                     "llama" if model.position_embedding == "rope" else "gpt2"]
    if objective not in family.objectives:
        raise UserError(f"Hugging Face {family.model_type} has no objective {objective}")
    for key, allowed in family.requirements(model).items():
        value = getattr(model, key)
        if value not in allowed:
            raise UserError(
                f"Hugging Face {family.model_type} cannot express model.{key}={value!r} "
                f"(it needs {' or '.join(map(repr, allowed))})"
            )
    return family


def hf_value(hf_config: dict[str, Any], key: str, allowed: tuple, default: Any = None) -> Any:
    """A HF config value jaxlm must understand: one of `allowed`, or a UserError naming it."""
    value = hf_config.get(key, default)
    if value not in allowed:
        raise UserError(
            f"HF config key '{key}' = {value!r} is not supported by jaxlm "
            f"(supported: {', '.join(map(repr, allowed))})"
        )
    return value


def hf_required(hf_config: dict[str, Any], *keys: str) -> list[Any]:
    missing = [k for k in keys if hf_config.get(k) is None]
    if missing:
        raise UserError(f"HF config.json lacks key '{missing[0]}'")
    return [hf_config[k] for k in keys]


def expand(rules: list[Rule], n_layers: int) -> Iterator[tuple[Rule, int | None]]:
    """Each rule with each layer index it applies to (None for params outside the blocks)."""
    for r in rules:
        for layer in (range(n_layers) if r.layered else (None,)):
            yield r, layer


def check_names(family: Family, rules: list[Rule], n_layers: int, available: set[str]) -> None:
    """Every tensor the table needs is there and every tensor there is used (or a known extra)."""
    needed = {name for r, layer in expand(rules, n_layers) for name in r.hf_names(layer)}
    ignored = [re.compile(pattern) for pattern in family.ignored]
    unused = sorted(n for n in available - needed if not any(p.search(n) for p in ignored))
    missing = sorted(needed - available)
    if missing or unused:
        listed = "; ".join(_listed(label, names) for label, names in
                           (("missing", missing), ("unused", unused)) if names)
        raise UserError(f"the checkpoint does not match its {family.model_type} config: {listed}")


def _listed(label: str, names: list[str]) -> str:
    more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
    return f"{label} {', '.join(names[:5])}{more}"


@contextlib.contextmanager
def staged_output(out: Path, verb: str) -> Iterator[Path]:
    """A hidden directory beside `out` to write into, renamed to `out` only when the block
    succeeds: nothing half-written ever appears at `out`, and a non-empty `out` is refused."""
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty; choose a new directory")
    parent = out.absolute().parent
    for stale in parent.glob(f".{out.name}.{verb}-*"):  # left by a killed or interrupted run
        if not pid_alive(stale.name.rpartition("-")[2]):
            shutil.rmtree(stale, ignore_errors=True)
    staging = parent / f".{out.name}.{verb}-{os.getpid()}"
    try:
        staging.mkdir(parents=True)
        yield staging
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
