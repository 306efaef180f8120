"""Train state on a mesh: abstract shapes, shardings, sharded init and the jitted steps.

The state is a plain pytree `{"params": model state, "opt": optimizer state}` of nnx.States, so
Orbax saves it directly and the jitted step is an ordinary function of (state, batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxlm import sharding
from jaxlm.config import Config
from jaxlm.errors import UserError
from jaxlm.heads import build_model, nsp_loss_scale, objective_sums
from jaxlm.model import Transformer
from jaxlm.objectives import is_causal, mean_loss
from jaxlm.optim import make_optimizer, schedule

State = dict[str, nnx.State]
Batch = dict[str, jax.Array]


def _build(cfg: Config) -> tuple[Transformer, nnx.Optimizer]:
    model = build_model(cfg, is_causal(cfg), nnx.Rngs(cfg.seed))
    optimizer = nnx.Optimizer(model, make_optimizer(cfg.optimizer, cfg.train.steps), wrt=nnx.Param)
    return model, optimizer


@dataclass(frozen=True)
class Setup:
    """Everything the steps and the checkpointer need to know about the state's layout."""

    cfg: Config
    mesh: Mesh
    rules: tuple
    model_def: nnx.GraphDef
    opt_def: nnx.GraphDef
    abstract: State  # ShapeDtypeStructs carrying the logical-axis metadata
    shardings: State
    batch_sharding: NamedSharding
    # Gradients summed on each device and then reduced as one buffer (see _sums_per_device).
    sums_per_device: bool

    def abstract_sharded(self, part: str | None = None) -> Any:
        """Abstract leaves with shardings for this mesh: the target Orbax restores onto."""
        tree = self.abstract if part is None else self.abstract[part]
        shards = self.shardings if part is None else self.shardings[part]
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shards
        )


def make_setup(cfg: Config, devices: list[jax.Device] | None = None) -> Setup:
    mesh = sharding.make_mesh(cfg.mesh, devices)
    rules = sharding.axis_rules(cfg.mesh, mesh)
    model, optimizer = nnx.eval_shape(lambda: _build(cfg))
    model_def, params = nnx.split(model)
    opt_def, opt_state = nnx.split(optimizer)
    abstract = {"params": params, "opt": opt_state}
    sharding.check_divisible(params, mesh, rules)
    shardings = sharding.state_shardings(abstract, mesh, rules)
    return Setup(
        cfg=cfg,
        mesh=mesh,
        rules=rules,
        model_def=model_def,
        opt_def=opt_def,
        abstract=abstract,
        shardings=shardings,
        batch_sharding=sharding.batch_sharding(mesh, rules),
        sums_per_device=_sums_per_device(cfg, mesh, shardings["params"]),
    )


def _sums_per_device(cfg: Config, mesh: Mesh, param_shardings: State) -> bool:
    """Whether the step sums each device's gradients itself and reduces them as one flat buffer:
    on a CPU mesh of several devices with every param replicated (data parallelism), where XLA's
    own all-reduce of the gradients costs ~10 % of a small model's step (sharding.py). Not with
    dropout, whose masks XLA draws for the global batch, the same on any number of devices."""
    return (mesh.size > 1 and mesh.devices.flat[0].platform == "cpu" and cfg.model.dropout == 0
            and all(s.is_fully_replicated for s in jax.tree.leaves(param_shardings)))


def check_batch_size(cfg: Config, setup: Setup) -> None:
    """A clear error where the batch does not split into whole rows per device and microbatch."""
    shards, processes = sharding.batch_shards(setup.batch_sharding), jax.process_count()
    accum = cfg.train.grad_accum_steps
    if cfg.train.batch_size % (shards * accum) or cfg.train.batch_size % processes:
        raise UserError(
            f"train.batch_size ({cfg.train.batch_size}) must be divisible by the {shards} batch "
            f"shards of the mesh times train.grad_accum_steps ({accum}) and by the {processes} "
            "processes; change the batch size, train.grad_accum_steps or the mesh (mesh.axes, "
            "mesh.cpu_devices)"
        )


def init_state(setup: Setup) -> State:
    """Fresh params and optimizer state, created directly in their shards."""

    def init() -> State:
        model, optimizer = _build(setup.cfg)
        return {"params": nnx.state(model), "opt": nnx.state(optimizer)}

    return jax.jit(init, out_shardings=setup.shardings)()


def make_train_step(setup: Setup) -> Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]:
    """One jitted step: forward, backward, optimizer update; the old state is donated.

    With `train.grad_accum_steps` A > 1 the global batch runs as A microbatches in a `lax.scan`
    inside this one step; gradients of the summed loss add up and are divided by the total weight
    once, so the update equals the single-big-batch one. A non-finite loss or gradient is flagged
    in the metrics; with `train.on_nonfinite: skip` its update is discarded here, on the device,
    so no host round-trip is needed. Where `Setup.sums_per_device`, each device sums the
    gradients of its own rows and one all-reduce of a flat buffer adds them up.
    """
    lr = schedule(setup.cfg.optimizer, setup.cfg.train.steps)
    skip_nonfinite = setup.cfg.train.on_nonfinite == "skip"
    accum = setup.cfg.train.grad_accum_steps

    def train_step(state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        with sharding.activation_sharding(setup.mesh, setup.rules):
            return _step(state, batch)

    def _step(state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        # Leaves captured before the in-place update, to fall back to.
        before = jax.tree.map(lambda x: x, state) if skip_nonfinite else None
        model = nnx.merge(setup.model_def, state["params"])
        optimizer = nnx.merge(setup.opt_def, state["opt"])
        dropout_key = None
        if setup.cfg.model.dropout > 0:  # keyed by (seed, step): a resumed run drops the same
            dropout_key = jax.random.fold_in(jax.random.key(setup.cfg.seed), optimizer.step[...])
        nsp_scale = nsp_loss_scale(batch, setup.cfg)
        if setup.sums_per_device:
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            grads, sums = sharding.summed_over_batch_shards(
                lambda replicated, rows: _summed_grads(
                    nnx.merge(graphdef, replicated[0], rest), rows, accum, setup.cfg,
                    nsp_scale=replicated[1]),
                setup.batch_sharding)((params, nsp_scale), batch)
        else:
            grads, sums = _summed_grads(model, batch, accum, setup.cfg, dropout_key, nsp_scale)
        grads = jax.tree.map(lambda g: g / jnp.maximum(sums["weight_sum"], 1.0), grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(mean_loss(sums)) & jnp.isfinite(grad_norm)
        metrics = {**sums, "grad_norm": grad_norm, "lr": lr(optimizer.step[...]), "nonfinite": ~finite}
        optimizer.update(model, grads)
        after = {"params": nnx.state(model), "opt": nnx.state(optimizer)}
        if skip_nonfinite:
            after = jax.tree.map(lambda new, old: jnp.where(finite, new, old), after, before)
        return after, metrics

    replicated = sharding.replicated(setup.mesh)
    return jax.jit(
        train_step,
        in_shardings=(setup.shardings, setup.batch_sharding),
        out_shardings=(setup.shardings, replicated),
        donate_argnums=0,
    )


def _summed_grads(model: Transformer, batch: Batch, accum: int, cfg: Config,
                  dropout_key: jax.Array | None = None,
                  nsp_scale: jax.Array | None = None) -> tuple[nnx.State, dict]:
    """Gradients of the *summed* weighted loss and the weighted sums, over `accum` microbatches
    (microbatch i drops with `dropout_key` folded with i)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_sum(params: nnx.State, micro: Batch, key: jax.Array | None) -> tuple[jax.Array, dict]:
        objective, sums, _ = objective_sums(nnx.merge(graphdef, params, rest), micro, cfg, key,
                                            nsp_scale)
        return objective, sums

    grad_fn = jax.grad(loss_sum, has_aux=True)
    if accum == 1:
        return grad_fn(params, batch, dropout_key)

    def accumulate(carry: tuple, xs: tuple) -> tuple[tuple, None]:
        micro, index = xs
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
        grads, sums = grad_fn(params, micro, key)
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

    shapes = jax.eval_shape(grad_fn, params, _first(batch, accum), dropout_key)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    xs = (_microbatches(batch, accum), jnp.arange(accum))
    (grads, sums), _ = jax.lax.scan(accumulate, zeros, xs)
    return grads, sums


def _microbatches(batch: Batch, accum: int) -> Batch:
    """B rows -> (accum, B/accum) rows: microbatch i takes rows i, i+accum, ... Each device's
    contiguous block of rows splits into whole microbatch slices, so no data moves."""

    def split(x_BxL: jax.Array) -> jax.Array:
        x_BaxAxL = x_BxL.reshape(x_BxL.shape[0] // accum, accum, *x_BxL.shape[1:])
        x_AxBaxL = x_BaxAxL.swapaxes(0, 1)
        return sharding.constrain(x_AxBaxL, (None, sharding.BATCH) + (None,) * (x_BxL.ndim - 1))

    return jax.tree.map(split, batch)


def _first(batch: Batch, accum: int) -> Batch:
    """Abstract shapes of one microbatch."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((x.shape[0] // accum, *x.shape[1:]), x.dtype), batch
    )


def make_eval_step(setup: Setup) -> Callable[[nnx.State, Batch], dict[str, jax.Array]]:
    """Jitted forward pass returning summed loss/accuracy/weights (and bytes, for bits per byte)."""

    def eval_step(params: nnx.State, batch: Batch, byte_lengths_V: jax.Array) -> dict:
        model = nnx.merge(setup.model_def, params)
        with sharding.activation_sharding(setup.mesh, setup.rules):
            _, sums, logits_BxLxV = objective_sums(model, batch, setup.cfg)
        sums["byte_sum"] = (byte_lengths_V[batch["targets"]] * batch["weights"]).sum()
        # Weighted count of each target id: the majority-token baseline's accuracy.
        sums["target_counts_V"] = jnp.zeros_like(byte_lengths_V, jnp.float32).at[
            batch["targets"]].add(batch["weights"])
        if setup.cfg.objective == "classify":  # rows: true class, columns: predicted
            classes = logits_BxLxV.shape[-1]
            sums["confusion_CxC"] = jnp.zeros((classes, classes), jnp.float32).at[
                batch["targets"], jnp.argmax(logits_BxLxV, axis=-1)].add(batch["weights"])
        return sums

    replicated = sharding.replicated(setup.mesh)
    return jax.jit(
        eval_step,
        in_shardings=(setup.shardings["params"], setup.batch_sharding, replicated),
        out_shardings=replicated,
    )
