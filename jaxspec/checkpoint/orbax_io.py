"""Orbax model directories: parameters, config and tokenizer together.

Layout::

    DIR/config.json     ModelConfig as JSON
    DIR/params/         orbax StandardCheckpointer tree of the model's parameters
    DIR/tokenizer.*     the tokenizer's own files (see jaxspec.tokenizer)

Loading reads the arrays with tensorstore directly, the way orbax does (a ``cast`` to the
requested dtype over each zarr array in the checkpoint's OCDBT store), and reads only what this
process's devices hold: onto one device, every array whole; onto a mesh (``mesh`` and ``rules``),
each array's boxes that this process's addressable devices hold under its target
``NamedSharding``, each distinct box once (``read_sharded``). In a multi-process job every host
thus reads its own shards and never the whole model, with no collective or barrier while loading.
orbax itself need not be imported (about 0.15 s of a one-shot CLI's start, and as much again for
its restore machinery); a directory laid out otherwise goes through orbax's restore, which also
restores into the target shardings.
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
    into its target sharding, each process reading only its own devices' shards (no full copy on
    any host or device)."""
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
    params = read_sharded(d / "params", target)
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


def _box(index: tuple, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """A device's index (a tuple of slices) as hashable (start, stop) pairs, one per dimension."""
    return tuple(sl.indices(n)[:2] for sl, n in zip(index, shape))


def shard_boxes(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> dict:
    """This process's devices -> the box of ``shape`` each holds under ``sharding``."""
    return {dev: _box(index, shape) for dev, index in sharding.addressable_devices_indices_map(shape).items()}


def read_box(store, box: tuple[tuple[int, int], ...], path: tuple[str, ...] = ()):
    """Start reading one box of the open tensorstore array of tree path ``path`` (a future of a
    numpy array)."""
    return store[tuple(slice(a, b) for a, b in box)].read() if box else store.read()


# Host memory for boxes read but not yet placed: reads beyond it wait for earlier arrays to be
# placed (one array's boxes are always in flight together, however large).
READ_WINDOW_BYTES = 1 << 30


def read_sharded(params_dir: Path, target: dict) -> dict | None:
    """``target``'s arrays (a pure dict of ShapeDtypeStructs with shardings: one device, or
    NamedShardings over a mesh, possibly spanning several processes) read from an orbax
    StandardCheckpointer directory with tensorstore, as orbax reads them, each process reading
    only the boxes its addressable devices hold, each distinct box once. Reads are in flight
    together up to ``READ_WINDOW_BYTES`` of host memory, and each array is placed on its devices
    as soon as its boxes are in. None where the directory is not laid out as this expects (an
    OCDBT store of zarr arrays, one per ``.``-joined tree path, each of the target's shape) or a
    read fails: orbax then reads it (and reports what is wrong)."""
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
    except Exception:  # noqa: BLE001  any other layout or failure: orbax's reader decides
        return None

    flat: dict = {}
    pending: list = []  # (path, {box: read future}, bytes), oldest first
    in_flight = 0

    def place_oldest() -> None:
        nonlocal in_flight
        path, futures, nbytes = pending.pop(0)
        host = {box: future.result() for box, future in futures.items()}
        shape = tuple(wanted[path].shape)
        flat[path] = jax.make_array_from_callback(shape, wanted[path].sharding,
                                                  lambda index: host[_box(index, shape)])
        in_flight -= nbytes

    try:
        for path, want in wanted.items():
            shape = tuple(want.shape)
            boxes = list(dict.fromkeys(shard_boxes(want.sharding, shape).values()))
            nbytes = sum(int(np.prod([b - a for a, b in box])) for box in boxes) * np.dtype(want.dtype).itemsize
            while pending and in_flight + nbytes > READ_WINDOW_BYTES:
                place_oldest()
            pending.append((path, {box: read_box(stores[path], box, path) for box in boxes}, nbytes))
            in_flight += nbytes
        while pending:
            place_oldest()
    except Exception as e:  # noqa: BLE001  a failed read: orbax's reader decides
        if not _is_read_error(e):
            raise
        return None

    def rebuild(tree: dict, prefix: tuple[str, ...] = ()) -> dict:
        return {key: rebuild(value, (*prefix, str(key))) if isinstance(value, dict) else flat[(*prefix, str(key))]
                for key, value in tree.items()}

    return rebuild(target)


def _is_read_error(e: Exception) -> bool:
    """A tensorstore read's failure (as opposed to placing the arrays read)."""
    return type(e).__module__.startswith("tensorstore") or isinstance(e, (OSError, ValueError))


read_local = read_sharded  # the one-device case's former name
