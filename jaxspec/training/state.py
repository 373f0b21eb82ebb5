"""Train state, optimizer and resumable orbax checkpoints.

The train state is a plain pytree ``TrainState(step, params, opt_state)`` where
``params`` is the model's pure parameter dict (``nnx.to_pure_dict``); the model's
graph definition stays outside (static in the jitted steps). A checkpoint stores
the whole state plus JSON metadata (data position, seed, config, fingerprints)
under ``RUN_DIR/checkpoints/<step>/`` through an orbax ``CheckpointManager``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import nnx

from jaxspec.config import ModelConfig
from jaxspec.models import Transformer


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr`` at ``total_steps``."""

    lr: float = 3e-3
    total_steps: int = 1000
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0

    def schedule(self) -> optax.Schedule:
        warmup = max(1, min(self.warmup_steps, self.total_steps - 1))
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=self.lr, warmup_steps=warmup,
            decay_steps=max(self.total_steps, warmup + 1), end_value=self.lr * self.min_lr_ratio,
        )


def _decay_mask(params: Any) -> Any:
    # No weight decay on vectors (norm scales, biases): decaying a norm scale towards 0 only hurts.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(cfg.schedule(), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=_decay_mask),
    )


def commit(tree: Any) -> Any:
    """A copy of every array committed to the default device.

    Jitted steps compile per argument placement: freshly created (uncommitted) arrays and
    the committed outputs of a previous step would otherwise cost a second compilation of
    every step. A copy, because steps donate their inputs."""
    return jax.device_put(tree, jax.devices()[0], may_alias=False)


def new_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A freshly initialised model for training, drawn with an "rbg" PRNG key.

    Same initialisers as ``create_model``; the key type differs because initialisation
    compiles a random-normal kernel per parameter shape, and XLA's RngBitGenerator ("rbg")
    compiles in about a third of the time of the default threefry (9 s -> 3.5 s of CPU for
    tiny-moe), which dominates short runs. The draw is as reproducible per seed."""
    return commit(Transformer(cfg, nnx.Rngs(params=jax.random.key(seed, impl="rbg"))))


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict
    opt_state: Any


def init_state(model: Transformer, optim: OptimConfig) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    # float32 master weights whatever the model dtype: the optimizer's small updates need the mantissa.
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    state = TrainState(jnp.zeros((), jnp.int32), params, make_optimizer(optim).init(params))
    return graphdef, commit(state)


def model_from_params(graphdef: nnx.GraphDef, params: dict) -> Transformer:
    """A model object over a committed copy of ``params`` in the model's dtype (for export,
    evaluation or the engine). A copy, because the train step donates the state's buffers."""
    model = nnx.merge(graphdef, params)
    dtype = jnp.dtype(model.cfg.dtype)
    g, s = nnx.split(model)
    return nnx.merge(g, commit(jax.tree.map(lambda p: p.astype(dtype), s)))


class CheckpointError(RuntimeError):
    """A run directory's checkpoint does not fit the run being resumed."""


class RunCheckpointer:
    """Keeps the last ``max_to_keep`` train states of one run directory."""

    def __init__(self, run_dir: str | os.PathLike, max_to_keep: int = 2):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                # Synchronous: the jitted step donates the state's buffers, so a background
                # writer must never be left reading arrays the next step overwrites.
                enable_async_checkpointing=False,
                create=True,
            ),
            item_names=("state", "meta"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, meta: dict) -> None:
        step = int(state.step)
        if self.manager.latest_step() == step:
            return  # already saved (e.g. the final save right after a periodic one)
        tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)), force=True
        )
        self.manager.wait_until_finished()

    def restore(self, like: TrainState) -> tuple[TrainState, dict] | None:
        """The latest state (shaped like ``like``) and its metadata, or None when there is none."""
        step = self.manager.latest_step()
        if step is None:
            return None
        tree = {"step": like.step, "params": like.params, "opt_state": like.opt_state}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
        try:
            out = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
            )
        except ValueError as e:  # orbax reports tree/shape mismatches as ValueError
            raise CheckpointError(f"checkpoint {self.directory / str(step)} does not match this model: {e}") from e
        t = out.state
        return commit(TrainState(t["step"], t["params"], t["opt_state"])), dict(out.meta)

    def close(self) -> None:
        self.manager.close()


def check_resume_compatible(meta: dict, expected: dict) -> None:
    """Refuse to resume a run whose model, data or tokenizer changed under it."""
    for key, want in expected.items():
        got = meta.get(key)
        if got != want:
            raise CheckpointError(
                f"cannot resume: checkpoint {key} is {got!r}, this run has {want!r} "
                "(use a new --run-dir, or the original settings)"
            )
