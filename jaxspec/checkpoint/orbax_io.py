"""Orbax model directories: parameters, config and tokenizer together.

Layout::

    DIR/config.json     ModelConfig as JSON
    DIR/params/         orbax StandardCheckpointer tree of the model's parameters
    DIR/tokenizer.*     the tokenizer's own files (see jaxspec.tokenizer)

Loading onto one device (no mesh) reads the arrays with tensorstore directly, the way orbax does
(a ``cast`` to the requested dtype over each zarr array in the checkpoint's OCDBT store): orbax
itself then need not be imported (about 0.15 s of a one-shot CLI's start, and as much again for
its restore machinery). Anything laid out otherwise, and every load onto a mesh, goes through orbax.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
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
    import orbax.checkpoint as ocp

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
    params = read_local(d / "params", target) if mesh is None else None
    if params is None:
        params = _orbax_restore(d, target)
    nnx.replace_by_pure_dict(abs_state, params)
    model = nnx.merge(graphdef, abs_state)
    return model, load_tokenizer(d)


def _orbax_restore(d: Path, target):
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(d / "params", target)
    except ValueError as e:  # orbax reports tree/shape mismatches as ValueError
        raise CheckpointError(f"parameters in {d / 'params'} do not match config.json: {e}") from e


def _flat(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    out = {}
    for key, value in tree.items():
        path = (*prefix, str(key))
        out.update(_flat(value, path) if isinstance(value, dict) else {path: value})
    return out


def read_local(params_dir: Path, target: dict) -> dict | None:
    """``target``'s arrays (a pure dict of ShapeDtypeStructs on one device) read from an orbax
    StandardCheckpointer directory with tensorstore, as orbax reads them; None where the directory
    is not laid out as this expects (an OCDBT store of zarr arrays, one per ``.``-joined tree path,
    each of the target's shape) or anything fails: orbax then reads it (and reports what is wrong)."""
    try:
        import tensorstore as ts

        meta = json.loads((params_dir / "_METADATA").read_text())["tree_metadata"]
        saved = {tuple(k["key"] for k in m["key_metadata"]): m["value_metadata"] for m in meta.values()}
        wanted = _flat(target)
        if set(saved) != set(wanted) or not (params_dir / "manifest.ocdbt").exists():
            return None
        if any(m.get("value_type") != "jax.Array" or m.get("skip_deserialize") for m in saved.values()):
            return None
        base = {"driver": "ocdbt", "base": f"file://{params_dir.absolute()}/"}
        context = ts.Context()
        opened = {
            path: ts.open({"driver": "cast", "dtype": np.dtype(want.dtype).name,
                           "base": {"driver": "zarr", "kvstore": {**base, "path": ".".join(path) + "/"}}},
                          open=True, read=True, context=context)
            for path, want in wanted.items()
        }
        stores = {path: future.result() for path, future in opened.items()}
        if any(tuple(stores[path].shape) != tuple(want.shape) for path, want in wanted.items()):
            return None
        reads = {path: store.read() for path, store in stores.items()}
        host = {path: future.result() for path, future in reads.items()}
    except Exception:  # noqa: BLE001  any other layout or failure: orbax's reader decides
        return None
    arrays = jax.device_put([host[path] for path in wanted], [want.sharding for want in wanted.values()])
    flat = dict(zip(wanted, arrays))

    def rebuild(tree: dict, prefix: tuple[str, ...] = ()) -> dict:
        return {key: rebuild(value, (*prefix, str(key))) if isinstance(value, dict) else flat[(*prefix, str(key))]
                for key, value in tree.items()}

    return rebuild(target)
