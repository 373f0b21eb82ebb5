"""Orbax model directories: parameters, config and tokenizer together.

Layout::

    DIR/config.json     ModelConfig as JSON
    DIR/params/         orbax StandardCheckpointer tree of the model's parameters
    DIR/tokenizer.*     the tokenizer's own files (see jaxspec.tokenizer)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from jaxspec.config import ModelConfig
from jaxspec.models import Transformer, abstract_model
from jaxspec.sharding import Rules, state_shardings
from jaxspec.tokenizer import Tokenizer, load_tokenizer


class CheckpointError(RuntimeError):
    """A model directory is missing, incomplete or does not match its config."""


def is_model_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "config.json").exists() and (p / "params").is_dir()


def save_model(directory: str | os.PathLike, model: Transformer, tokenizer: Tokenizer | None = None) -> Path:
    """Write a model (and its tokenizer) to ``directory``; returns the absolute path."""
    d = Path(directory).absolute()
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    _, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(d / "params", params, force=True)
    if tokenizer is not None:
        tokenizer.save(d)
    return d


def load_model(
    directory: str | os.PathLike,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    dtype: str | None = None,
) -> tuple[Transformer, Tokenizer]:
    """Restore a model directory; with ``mesh`` and ``rules`` each array is restored straight
    into its target sharding (no full copy on one device)."""
    d = Path(directory).absolute()
    if not (d / "config.json").exists():
        raise CheckpointError(f"{d} is not a jaxspec model directory: config.json missing")
    if not (d / "params").is_dir():
        raise CheckpointError(f"{d} is not a jaxspec model directory: params/ missing")
    cfg = ModelConfig.from_dict(json.loads((d / "config.json").read_text()))
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    abstract = abstract_model(cfg)
    graphdef, abs_state = nnx.split(abstract)
    if mesh is not None:
        shardings = state_shardings(abs_state, mesh, rules or {})
        target = jax.tree.map(
            lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
            nnx.to_pure_dict(abs_state),
            nnx.to_pure_dict(shardings),
        )
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device), nnx.to_pure_dict(abs_state))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(d / "params", target)
    except ValueError as e:  # orbax reports tree/shape mismatches as ValueError
        raise CheckpointError(f"parameters in {d / 'params'} do not match config.json: {e}") from e
    nnx.replace_by_pure_dict(abs_state, params)
    model = nnx.merge(graphdef, abs_state)
    return model, load_tokenizer(d)
