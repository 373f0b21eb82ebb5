"""Resolve ``--model NAME_OR_PATH``: a config name, an orbax model directory or a Hugging Face folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from jaxspec import builtin
from jaxspec.checkpoint.orbax_io import is_model_dir, load_model
from jaxspec.config import ConfigError, ModelConfig, load_config
from jaxspec.models import Transformer, create_model
from jaxspec.models.quant import quantize_model
from jaxspec.tokenizer import ByteTokenizer, Tokenizer

if TYPE_CHECKING:
    from jaxspec.mesh import Placement

DEFAULT_MODEL = builtin.BUILTIN  # the shipped, trained MoE code model (jaxspec/builtin.py)


def is_hf_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "config.json").exists() and (
        any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").exists()
    )


def load_any(name_or_path: str | None = None, dtype: str | None = None, seed: int = 0,
             role: str = "target", quantize: str | None = None,
             placement: Placement | None = None) -> tuple[Transformer, Tokenizer]:
    """Load a model and its tokenizer.

    - ``builtin`` / ``builtin-dense``: the shipped MoE / dense model for ``role`` ("target", or
      "draft" where a draft is named);
    - an orbax model directory written by ``jaxspec.checkpoint.save_model`` (quantized ones too);
    - a Hugging Face folder (config.json + safetensors);
    - a config name under configs/models (random weights, byte tokenizer; for tests and benchmarks).

    ``quantize`` ("int8" | "int4"): quantize the weights once loaded (``jaxspec.models.quant``).

    ``placement`` (a mesh and its rules): an orbax model directory is read straight into the
    placement's shardings, each process reading only the shards its own devices hold
    (``orbax_io.read_sharded``); a Hugging Face folder's tensors are read one at a time, whole, and
    each process keeps only its devices' shards; a config name's random weights are created whole
    on every process (the runner then places them).
    """
    model, tokenizer = _load(name_or_path, dtype, seed, role, placement)
    return quantized(model, quantize), tokenizer


def quantized(model: Transformer, mode: str | None) -> Transformer:
    """``model`` quantized as ``mode`` says (None: as it is); a model saved quantized must be asked
    for in its own precision or none."""
    if mode is None or model.cfg.quantization == mode:
        return model
    if model.cfg.quantization is not None:
        raise ConfigError(f"the model was saved quantized ({model.cfg.quantization}): it cannot be loaded as {mode}")
    try:
        return quantize_model(model, mode, model.cfg.quant_group_size)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def model_config(name_or_path: str | None = None, dtype: str | None = None, role: str = "target") -> ModelConfig:
    """The config ``load_any`` would load (before any quantization at load), without reading
    weights: what a placement is chosen from before the weights are read into it."""
    name_or_path = builtin.resolve(name_or_path or DEFAULT_MODEL, role)
    path = Path(name_or_path)
    if path.is_dir():
        if is_model_dir(path):
            cfg = ModelConfig.from_dict(json.loads((path / "config.json").read_text()))
            return cfg.replace(dtype=dtype) if dtype is not None else cfg
        if is_hf_dir(path):
            from jaxspec.checkpoint.hf_config import load_hf_config

            return load_hf_config(path, dtype=dtype)
        raise ConfigError(
            f"{path} is neither a jaxspec model directory (config.json + params/) nor a Hugging Face folder "
            "(config.json + *.safetensors)"
        )
    cfg = load_config(name_or_path)
    return cfg.replace(dtype=dtype) if dtype is not None else cfg


def draft_load_placement(name_or_path: str | None, placement: Placement | None, num_slots: int, max_len: int,
                         dtype: str | None = None, kv_dtype: str | None = None) -> Placement | None:
    """Where a draft model's weights go on the target's ``placement`` (None: one device): what
    ``DraftModelProposer.use_placement`` will choose (``jaxspec.mesh.draft_placement``: replicated
    when the draft with its cache for ``num_slots`` x ``max_len`` is small, else the target's
    rules), decided from the draft's config before its weights are read into it."""
    if placement is None:
        return None
    from jaxspec.mesh import device_memory_bytes, draft_placement
    from jaxspec.models.kv_cache import check_kv_dtype

    return draft_placement(model_config(name_or_path, dtype, role="draft"), placement, num_slots, max_len,
                           device_memory_bytes(placement.mesh.devices.flat[0]), kv_dtype=check_kv_dtype(kv_dtype))


def _load(name_or_path: str | None, dtype: str | None, seed: int, role: str,
          placement: Placement | None = None) -> tuple[Transformer, Tokenizer]:
    name_or_path = builtin.resolve(name_or_path or DEFAULT_MODEL, role)
    path = Path(name_or_path)
    mesh, rules = (placement.mesh, placement.rules) if placement is not None else (None, None)
    if path.is_dir():
        if is_model_dir(path):
            return load_model(path, mesh=mesh, rules=rules, dtype=dtype)
        if is_hf_dir(path):
            from jaxspec.checkpoint.hf_loader import load_hf

            return load_hf(path, dtype=dtype, mesh=mesh, rules=rules)
        raise ConfigError(
            f"{path} is neither a jaxspec model directory (config.json + params/) nor a Hugging Face folder "
            "(config.json + *.safetensors)"
        )
    cfg = load_config(name_or_path)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    tokenizer = ByteTokenizer()
    if cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"config {cfg.name} has vocab_size {cfg.vocab_size} < the byte tokenizer's 259")
    return create_model(cfg, seed), tokenizer


def default_draft(model: str | None, draft: str | None, spec_method: str | None) -> str | None:
    """The draft a CLI uses: the one named, else the built-in draft when the model is a built-in
    target and no speculative method was chosen (so the default serves with speculation).
    A built-in target's draft is its own pair's: ``--model builtin-dense`` (with no --draft or
    ``--draft builtin``) drafts with the dense pair's draft. With ``--spec-method eagle3`` the
    built-in MoE target's default (and ``--draft builtin``) is its shipped EAGLE-3 head."""
    model = model or DEFAULT_MODEL
    if spec_method == "eagle3":  # the built-in MoE target's EAGLE-3 head, unless a head folder is named
        if draft == builtin.BUILTIN or (draft is None and model == builtin.BUILTIN):
            return str(builtin.eagle3_head(model))
        return draft
    if draft:
        return builtin.draft_for(model) if draft == builtin.BUILTIN else draft
    if builtin.is_builtin(model) and spec_method in (None, "draft"):
        return builtin.draft_for(model)
    return None
