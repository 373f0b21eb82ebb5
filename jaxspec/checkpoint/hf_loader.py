"""Hugging Face safetensors checkpoints -> a jaxspec :class:`Transformer` (+ tokenizer).

Tensors are read one at a time from the memory-mapped safetensors files,
converted to the target dtype and layout in host memory and placed straight onto
their target sharding, so peak host memory is about one tensor (one layer's
stacked expert weight for MoE layers, twice while it is stacked). A stacked expert
weight is made only of the experts this process's devices hold: with the experts split
over the hosts of a multi-process job each host reads only its own experts' tensors.
Every other tensor is read whole on every process (its layout conversion needs the
whole tensor), each device keeping its own box. All names, shapes and dtypes are checked
against the config before the first tensor is read, so a bad checkpoint fails
fast and says which tensor is wrong.

Layout conversions (HF ``nn.Linear`` weights are ``[out, in]``):

=================================  =====================  ====================
HF tensor                          HF shape               jaxspec parameter
=================================  =====================  ====================
self_attn.q_proj.weight            [H*Dh, D]              attn.wq [D, H, Dh]
self_attn.k/v_proj.weight          [K*Dh, D]              attn.wk/wv [D, K, Dh]
self_attn.o_proj.weight            [D, H*Dh]              attn.wo [H, Dh, D]
self_attn.q/k/v_proj.bias          [H*Dh] / [K*Dh]        attn.bq/bk/bv [H|K, Dh]
mlp.{gate,up}_proj.weight          [F, D]                 mlp.w_gate/w_up [D, F]
mlp.down_proj.weight               [D, F]                 mlp.w_down [F, D]
experts.{e}.(w1|gate_proj).weight  [F, D] per expert      moe.w_gate [E, D, F]
router (gate.weight)               [E, D]                 moe.router [D, E]
lm_head.weight                     [V, D]                 lm_head [D, V]
=================================  =====================  ====================

HF's rotary embedding uses the same rotate-half convention as
``jaxspec.models.layers.apply_rope``, so q/k need no head-dim permutation.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Callable

import jax
import ml_dtypes  # registers "bfloat16" with numpy, which safetensors' numpy reader needs
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open

from jaxspec.checkpoint.hf_config import architecture_of, load_hf_config, read_json
from jaxspec.checkpoint import orbax_io
from jaxspec.checkpoint.orbax_io import CheckpointError
from jaxspec.config import ModelConfig
from jaxspec.models import Transformer, abstract_model
from jaxspec.sharding import Rules, state_shardings
from jaxspec.tokenizer import SentencePieceTokenizer, Tokenizer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SUPPORTED_SOURCE_DTYPES = ("F32", "F16", "BF16")
_TARGET_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
# Buffers some older exports saved; they are recomputed from the config.
_DERIVED_TENSORS = re.compile(r"\.rotary_emb\.inv_freq$")

ProgressFn = Callable[[int, int, str], None]  # (tensors done, tensors total, name just read)


# ----------------------------------------------------------------------------- files
class SafetensorsFiles:
    """The tensors of an HF folder (``model.safetensors`` or a sharded index), opened lazily."""

    def __init__(self, directory: str | os.PathLike):
        d = Path(directory)
        self.directory = d
        # Only the HF names are read: Mistral repos also ship consolidated*.safetensors in
        # their own naming, which a glob over *.safetensors would wrongly pick up.
        if (d / INDEX_FILE).exists():
            weight_map = read_json(d / INDEX_FILE).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{d / INDEX_FILE} has no weight_map")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (d / f).exists()]
            if missing:
                raise CheckpointError(f"{d / INDEX_FILE} names missing safetensors file(s): {', '.join(missing)}")
        elif (d / SINGLE_FILE).exists():
            files = [SINGLE_FILE]
        else:
            extra = ""
            if list(d.glob("pytorch_model*.bin")):
                extra = " (pytorch_model*.bin checkpoints are not supported: save them with safe_serialization=True)"
            raise CheckpointError(f"no safetensors weights in {d}: expected {SINGLE_FILE} or {INDEX_FILE}{extra}")
        self._handles = {}
        self._where: dict[str, str] = {}
        for f in files:
            handle = safe_open(str(d / f), framework="numpy")
            self._handles[f] = handle
            for name in handle.keys():
                self._where[name] = f

    def __enter__(self) -> "SafetensorsFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        # safe_open handles release their memory map when dropped.
        self._handles.clear()

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handles[self._where[name]].get_slice(name).get_dtype()

    def read(self, name: str) -> np.ndarray:
        return self._handles[self._where[name]].get_tensor(name)


# ------------------------------------------------------------------------------ plan
@dataclasses.dataclass(frozen=True)
class _Source:
    name: str  # HF tensor name
    shape: tuple[int, ...]  # its expected HF shape
    convert: Callable[[np.ndarray], np.ndarray]  # HF layout -> ours (views only; the cast copies)


@dataclasses.dataclass(frozen=True)
class _Target:
    path: tuple[str | int, ...]  # key path in the model's pure parameter dict
    shape: tuple[int, ...]
    sources: tuple[_Source, ...]  # one tensor, or one per expert stacked on axis 0
    stacked: bool = False


def _linear(name: str, ours: tuple[int, ...], hf: tuple[int, int]) -> _Source:
    """An [out, in] HF weight whose transpose, reshaped, is our parameter."""
    return _Source(name, hf, lambda w: w.T.reshape(ours))


def _vector(name: str, ours: tuple[int, ...]) -> _Source:
    return _Source(name, (int(np.prod(ours)),), lambda w: w.reshape(ours))


def _mlp_targets(path: tuple, prefix: str, d: int, f: int, names: tuple[str, str, str]) -> list[_Target]:
    gate, up, down = names
    return [
        _Target((*path, "w_gate"), (d, f), (_linear(f"{prefix}.{gate}.weight", (d, f), (f, d)),)),
        _Target((*path, "w_up"), (d, f), (_linear(f"{prefix}.{up}.weight", (d, f), (f, d)),)),
        _Target((*path, "w_down"), (f, d), (_linear(f"{prefix}.{down}.weight", (f, d), (d, f)),)),
    ]


def _moe_targets(arch: str, cfg: ModelConfig, layer: int, prefix: str) -> list[_Target]:
    d, f, e = cfg.d_model, cfg.moe_mlp_dim, cfg.num_experts
    path = ("layers", layer, "moe")
    if arch == "MixtralForCausalLM":
        block, names = f"{prefix}.block_sparse_moe", ("w1", "w3", "w2")
    else:
        block, names = f"{prefix}.mlp", ("gate_proj", "up_proj", "down_proj")
    targets = [_Target((*path, "router"), (d, e), (_linear(f"{block}.gate.weight", (d, e), (e, d)),))]
    for ours, hf_name, (rows, cols) in zip(("w_gate", "w_up", "w_down"), names, ((f, d), (f, d), (d, f))):
        sources = tuple(
            _linear(f"{block}.experts.{i}.{hf_name}.weight", (cols, rows), (rows, cols)) for i in range(e)
        )
        targets.append(_Target((*path, ours), (e, cols, rows), sources, stacked=True))
    if cfg.shared_expert_mlp_dim:
        targets += _mlp_targets(
            (*path, "shared_expert"), f"{block}.shared_expert", d, cfg.shared_expert_mlp_dim,
            ("gate_proj", "up_proj", "down_proj"),
        )
        targets.append(
            _Target((*path, "shared_gate"), (d, 1), (_linear(f"{block}.shared_expert_gate.weight", (d, 1), (1, d)),))
        )
    return targets


def build_plan(arch: str, cfg: ModelConfig) -> list[_Target]:
    """Every model parameter with the HF tensor(s) it is made from, in load order."""
    d, h, k, dh, v = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    plan = [_Target(("embed",), (v, d), (_Source("model.embed_tokens.weight", (v, d), lambda w: w),))]
    for i in range(cfg.num_layers):
        p, a = f"model.layers.{i}", ("layers", i, "attn")
        plan += [
            _Target(("layers", i, "attn_norm", "scale"), (d,), (_vector(f"{p}.input_layernorm.weight", (d,)),)),
            _Target((*a, "wq"), (d, h, dh), (_linear(f"{p}.self_attn.q_proj.weight", (d, h, dh), (h * dh, d)),)),
            _Target((*a, "wk"), (d, k, dh), (_linear(f"{p}.self_attn.k_proj.weight", (d, k, dh), (k * dh, d)),)),
            _Target((*a, "wv"), (d, k, dh), (_linear(f"{p}.self_attn.v_proj.weight", (d, k, dh), (k * dh, d)),)),
            _Target((*a, "wo"), (h, dh, d), (_linear(f"{p}.self_attn.o_proj.weight", (h, dh, d), (d, h * dh)),)),
        ]
        if cfg.qkv_bias:
            plan += [
                _Target((*a, "bq"), (h, dh), (_vector(f"{p}.self_attn.q_proj.bias", (h, dh)),)),
                _Target((*a, "bk"), (k, dh), (_vector(f"{p}.self_attn.k_proj.bias", (k, dh)),)),
                _Target((*a, "bv"), (k, dh), (_vector(f"{p}.self_attn.v_proj.bias", (k, dh)),)),
            ]
        if cfg.qk_norm:
            plan += [
                _Target((*a, "q_norm", "scale"), (dh,), (_vector(f"{p}.self_attn.q_norm.weight", (dh,)),)),
                _Target((*a, "k_norm", "scale"), (dh,), (_vector(f"{p}.self_attn.k_norm.weight", (dh,)),)),
            ]
        plan.append(
            _Target(("layers", i, "mlp_norm", "scale"), (d,), (_vector(f"{p}.post_attention_layernorm.weight", (d,)),))
        )
        if cfg.layer_is_moe(i):
            plan += _moe_targets(arch, cfg, i, p)
        else:
            plan += _mlp_targets(("layers", i, "mlp"), f"{p}.mlp", d, cfg.mlp_dim, ("gate_proj", "up_proj", "down_proj"))
    plan.append(_Target(("final_norm", "scale"), (d,), (_vector("model.norm.weight", (d,)),)))
    if not cfg.tie_embeddings:
        plan.append(_Target(("lm_head",), (d, v), (_linear("lm_head.weight", (d, v), (v, d)),)))
    return plan


def _leaf_paths(tree: dict, prefix: tuple = ()) -> dict[tuple, object]:
    out: dict[tuple, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaf_paths(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def _set_path(tree: dict, path: tuple, value: object) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _check_checkpoint(plan: list[_Target], files: SafetensorsFiles, cfg: ModelConfig) -> None:
    """Names, shapes and dtypes, before any tensor is read."""
    wanted = {s.name: s for t in plan for s in t.sources}
    missing = [n for n in wanted if n not in files]
    # A tied model's file may still carry lm_head.weight; transformers ignores it as well.
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unexpected = [n for n in files.names if n not in wanted and n not in ignorable and not _DERIVED_TENSORS.search(n)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected tensor(s): {', '.join(sorted(unexpected)[:8])}"
                f"{' ...' if len(unexpected) > 8 else ''}"
            )
        raise CheckpointError(f"checkpoint in {files.directory} does not match its config.json: {'; '.join(parts)}")
    for name, src in wanted.items():
        dtype = files.dtype(name)
        if dtype not in SUPPORTED_SOURCE_DTYPES:
            raise CheckpointError(
                f"tensor {name} has dtype {dtype}, which is not supported (supported: {', '.join(SUPPORTED_SOURCE_DTYPES)})"
            )
        shape = files.shape(name)
        if shape != src.shape:
            raise CheckpointError(
                f"tensor {name} has shape {list(shape)} but config.json implies {list(src.shape)}"
            )


def _target_shardings(abs_state: nnx.State, mesh: Mesh | None, rules: Rules | None) -> dict[tuple, jax.sharding.Sharding]:
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return {p: device for p in _leaf_paths(nnx.to_pure_dict(abs_state))}
    return _leaf_paths(nnx.to_pure_dict(state_shardings(abs_state, mesh, rules or {})))


def _place(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    # make_array_from_callback hands each device only its own shard (and works multi-host).
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _rows_held(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> list[int]:
    """The indices along axis 0 (experts, for a stacked weight) that this process's devices hold."""
    return sorted({r for box in orbax_io.shard_boxes(sharding, shape).values() for r in range(*box[0])})


def _place_stacked(rows: dict[int, np.ndarray], shape: tuple[int, ...], sharding: jax.sharding.Sharding) -> jax.Array:
    """A stacked weight from the rows (experts) this process read: each device's box stacked
    from its own rows only."""
    def shard(index: tuple) -> np.ndarray:
        rest = tuple(index[1:])
        return np.stack([rows[r][rest] for r in range(*index[0].indices(shape[0]))])

    return jax.make_array_from_callback(shape, sharding, shard)


def load_hf_weights(
    directory: str | os.PathLike,
    cfg: ModelConfig,
    architecture: str,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    progress: ProgressFn | None = None,
) -> Transformer:
    """Build the model of ``cfg`` from the safetensors of an HF folder."""
    np_dtype = _TARGET_DTYPES[cfg.dtype]
    graphdef, abs_state = nnx.split(abstract_model(cfg))
    expected = _leaf_paths(nnx.to_pure_dict(abs_state))
    shardings = _target_shardings(abs_state, mesh, rules)
    plan = build_plan(architecture, cfg)
    planned = {t.path: t for t in plan}
    if set(planned) != set(expected):  # the model and this mapping drifted apart
        diff = sorted(map(str, set(planned) ^ set(expected)))
        raise CheckpointError(f"internal: HF mapping does not cover the model's parameters exactly: {', '.join(diff)}")
    for path, target in planned.items():
        assert tuple(expected[path].shape) == target.shape, (path, expected[path].shape, target.shape)

    # A stacked (per-expert) weight: only the experts this process's devices hold are read, so
    # with the experts split over hosts each host reads its own experts' tensors. Other tensors
    # are read whole (one at a time) and each device keeps its box.
    held = {t.path: _rows_held(shardings[t.path], t.shape) for t in plan if t.stacked}
    total = sum(len(held[t.path]) if t.stacked else 1 for t in plan)
    done = 0
    params: dict = {}
    with SafetensorsFiles(directory) as files:
        _check_checkpoint(plan, files, cfg)
        for target in plan:
            if target.stacked:
                rows = {}
                for e in held[target.path]:
                    src = target.sources[e]
                    rows[e] = np.ascontiguousarray(src.convert(files.read(src.name)), dtype=np_dtype)
                    done += 1
                    if progress:
                        progress(done, total, src.name)
                _set_path(params, target.path, _place_stacked(rows, target.shape, shardings[target.path]))
                del rows
            else:
                src = target.sources[0]
                host = np.ascontiguousarray(src.convert(files.read(src.name)), dtype=np_dtype)
                done += 1
                if progress:
                    progress(done, total, src.name)
                _set_path(params, target.path, _place(host, shardings[target.path]))
                del host
    nnx.replace_by_pure_dict(abs_state, params)
    return nnx.merge(graphdef, abs_state)


def load_hf_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """``tokenizer.json`` (HF's canonical fast tokenizer) if present, else ``tokenizer.model``."""
    d = Path(directory)
    if (d / "tokenizer.json").exists():
        from jaxspec.hf_tokenizer import HFTokenizer

        return HFTokenizer(d)
    if (d / "tokenizer.model").exists():
        return SentencePieceTokenizer(d / "tokenizer.model")
    raise CheckpointError(f"no tokenizer in {d}: expected tokenizer.json or tokenizer.model")


def load_hf(
    path: str | os.PathLike,
    dtype: str | None = None,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    *,
    max_seq_len: int | None = None,
    progress: ProgressFn | None = None,
) -> tuple[Transformer, Tokenizer]:
    """Load a Hugging Face model folder (config.json, safetensors, tokenizer).

    ``dtype`` defaults to the checkpoint's dtype; ``max_seq_len`` (the default KV
    cache length) to ``max_position_embeddings``. With ``mesh`` every parameter is
    placed on its sharding from ``jaxspec.sharding.state_shardings`` under ``rules``.
    """
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"Hugging Face model folder not found: {d}")
    if not (d / "config.json").exists():
        raise CheckpointError(f"Hugging Face config not found: {d / 'config.json'}")
    if dtype is not None:
        dtype = np.dtype(dtype).name
        if dtype not in _TARGET_DTYPES:
            raise CheckpointError(f"dtype {dtype!r} not supported (supported: {', '.join(_TARGET_DTYPES)})")
    architecture = architecture_of(read_json(d / "config.json"))
    cfg = load_hf_config(d, dtype=dtype, max_seq_len=max_seq_len)
    tokenizer = load_hf_tokenizer(d)
    # The tokenizer decides what encode() prepends and what stops generation.
    cfg = cfg.replace(bos_id=tokenizer.bos_id, eos_ids=tokenizer.eos_ids or cfg.eos_ids)
    model = load_hf_weights(d, cfg, architecture, mesh=mesh, rules=rules, progress=progress)
    return model, tokenizer

