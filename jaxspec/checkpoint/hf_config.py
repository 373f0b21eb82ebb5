"""Hugging Face ``config.json`` -> :class:`jaxspec.config.ModelConfig`.

Every HF field that changes the forward math is either mapped onto a ModelConfig
field or refused with an error that names it: a checkpoint that loads must give
the logits transformers gives. Fields that only matter for training (dropout,
aux-loss coefficients, router jitter) or for the HF runtime (use_cache,
output_router_logits) are ignored on purpose.

Field semantics follow transformers 5.x, including the two spellings of RoPE
settings: ``rope_parameters`` (5.x) and ``rope_theta`` + ``rope_scaling`` (4.x).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jaxspec.config import SUPPORTED_ROPE_SCALING, ConfigError, ModelConfig

MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
DENSE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_ARCHITECTURES = MOE_ARCHITECTURES + DENSE_ARCHITECTURES

# Extra keys each supported RoPE scaling kind needs (see jaxspec.models.layers.rope_inv_frequencies).
_ROPE_REQUIRED_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}

_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def architecture_of(hf: dict[str, Any]) -> str:
    """The single supported architecture named by an HF config, or a ConfigError."""
    archs = hf.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    supported = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
    if len(archs) != 1 or not supported:
        named = ", ".join(archs) if archs else f"none (model_type {hf.get('model_type')!r})"
        raise ConfigError(
            f"unsupported architecture: {named}; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return supported[0]


def _get(hf: dict[str, Any], key: str, default: Any = None) -> Any:
    """``hf[key]``, treating an explicit null like an absent key."""
    value = hf.get(key)
    return default if value is None else value


def _require(hf: dict[str, Any], key: str, arch: str) -> Any:
    value = hf.get(key)
    if value is None:
        raise ConfigError(f"{arch} config.json is missing required field {key!r}")
    return value


def _rope(hf: dict[str, Any], arch: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either spelling; unsupported kinds are refused."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params and "rope_type" not in params:
        raise ConfigError(f"{arch}: per-layer-type rope_parameters are not supported")
    if isinstance(params, dict):
        merged = dict(params)
    else:
        merged = dict(hf.get("rope_scaling") or {})
    theta = merged.pop("rope_theta", None)
    if theta is None:
        theta = _get(hf, "rope_theta", 10000.0)
    kind = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    if kind not in SUPPORTED_ROPE_SCALING:
        raise ConfigError(
            f"{arch}: rope_scaling type {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_SCALING)})"
        )
    missing = [k for k in _ROPE_REQUIRED_KEYS[kind] if merged.get(k) is None]
    if missing:
        raise ConfigError(f"{arch}: rope_scaling type {kind!r} needs {', '.join(missing)}")
    # Of the keys left over, only a partial rotary factor would change the math (linear and
    # llama3 scaling have no attention factor in transformers): refuse it.
    partial = merged.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise ConfigError(f"{arch}: partial_rotary_factor={partial} is not supported (only full rotary)")
    if kind == "default":
        return float(theta), None
    if kind == "linear" and float(merged["factor"]) == 1.0:
        return float(theta), None
    merged.pop("partial_rotary_factor", None)
    return float(theta), {"rope_type": kind, **merged}


def _layer_types(hf: dict[str, Any], arch: str, num_layers: int) -> list[str]:
    """Per-layer "full_attention" / "sliding_attention", as transformers 5.x decides them."""
    if arch in ("MistralForCausalLM", "MixtralForCausalLM"):
        # One global window (Mistral 7B v0.1 style) whenever sliding_window is set; these
        # models ignore layer_types.
        sliding = hf.get("sliding_window") is not None
        return ["sliding_attention" if sliding else "full_attention"] * num_layers
    if not hf.get("use_sliding_window", False):
        return ["full_attention"] * num_layers
    if arch == "Qwen3MoeForCausalLM":  # the window applies to every layer (layer_types unused)
        return ["sliding_attention"] * num_layers
    explicit = hf.get("layer_types")
    if explicit is not None:
        if len(explicit) != num_layers:
            raise ConfigError(f"{arch}: layer_types has {len(explicit)} entries for {num_layers} layers")
        unknown = sorted(set(explicit) - {"full_attention", "sliding_attention"})
        if unknown:
            raise ConfigError(f"{arch}: layer_types {', '.join(unknown)} not supported")
        return list(explicit)
    max_window_layers = _get(hf, "max_window_layers", num_layers)
    if arch == "Qwen2MoeForCausalLM":  # even layers below max_window_layers
        return [
            "sliding_attention" if (i + 1) % 2 and i < max_window_layers else "full_attention" for i in range(num_layers)
        ]
    return ["sliding_attention" if i >= max_window_layers else "full_attention" for i in range(num_layers)]


def _sliding_window(hf: dict[str, Any], arch: str, num_layers: int) -> int | None:
    """The model supports one window for all layers (or none): mixed layouts are refused."""
    if arch == "LlamaForCausalLM":
        return None  # Llama has no sliding-window attention; the field (if any) is unused
    types = _layer_types(hf, arch, num_layers)
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not sliding:
        return None
    window = hf.get("sliding_window")
    if not window:
        raise ConfigError(f"{arch}: sliding-window layers {sliding} but sliding_window is {window!r}")
    if len(sliding) != num_layers:
        raise ConfigError(
            f"{arch}: sliding_window={window} applies to layers {sliding} only (use_sliding_window / "
            f"max_window_layers / layer_types); jaxspec supports one sliding window for all layers or none"
        )
    return int(window)


def _dense_layers(hf: dict[str, Any], arch: str, num_layers: int) -> tuple[int, ...]:
    """Qwen-MoE layers that use the dense MLP: mlp_only_layers plus those decoder_sparse_step skips."""
    if arch == "MixtralForCausalLM":
        return ()
    mlp_only = [int(i) for i in (hf.get("mlp_only_layers") or [])]
    out_of_range = [i for i in mlp_only if not 0 <= i < num_layers]
    if out_of_range:
        raise ConfigError(f"{arch}: mlp_only_layers {out_of_range} out of range [0, {num_layers})")
    step = int(_get(hf, "decoder_sparse_step", 1))
    if step <= 0:
        raise ConfigError(f"{arch}: decoder_sparse_step must be >= 1, got {step}")
    return tuple(i for i in range(num_layers) if i in mlp_only or (i + 1) % step != 0)


def _token_ids(hf: dict[str, Any], generation: dict[str, Any] | None) -> tuple[int | None, tuple[int, ...], int]:
    """(bos, eos ids, pad) with generation_config.json taking precedence, as in HF generate()."""
    sources = [generation or {}, hf]

    def first(key: str) -> Any:
        for src in sources:
            if src.get(key) is not None:
                return src[key]
        return None

    bos = first("bos_token_id")
    eos = first("eos_token_id")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [] if eos is None else [eos]))
    pad = first("pad_token_id")
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return (None if bos is None else int(bos)), eos_ids, int(pad)


def _check_unsupported(hf: dict[str, Any], arch: str) -> None:
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):  # transformers maps both names to SiLU
        raise ConfigError(f"{arch}: hidden_act {act!r} is not supported (only 'silu')")
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "unknown")
        raise ConfigError(f"{arch}: quantized checkpoints (quantization_config: {method}) are not supported")
    if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM") and hf.get("attention_bias"):
        # These add a bias to o_proj as well, which the model does not carry.
        raise ConfigError(f"{arch}: attention_bias=true (q/k/v/o projection biases) is not supported")
    if arch == "LlamaForCausalLM" and hf.get("mlp_bias"):
        raise ConfigError(f"{arch}: mlp_bias=true is not supported")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if hf.get(key) is not None:
            raise ConfigError(f"{arch}: {key} is not supported")


def hf_to_model_config(
    hf: dict[str, Any],
    name: str = "hf-model",
    generation_config: dict[str, Any] | None = None,
    dtype: str | None = None,
    max_seq_len: int | None = None,
) -> ModelConfig:
    """Translate a parsed HF ``config.json`` (plus optional ``generation_config.json``).

    ``dtype`` defaults to the checkpoint's own ``dtype`` / ``torch_dtype`` (float32 if
    that is absent or not one the model supports). ``max_seq_len`` defaults to
    ``max_position_embeddings``.
    """
    arch = architecture_of(hf)
    _check_unsupported(hf, arch)
    d_model = int(_require(hf, "hidden_size", arch))
    num_heads = int(_require(hf, "num_attention_heads", arch))
    num_layers = int(_require(hf, "num_hidden_layers", arch))
    num_kv_heads = int(_get(hf, "num_key_value_heads", num_heads))
    if d_model % num_heads and hf.get("head_dim") is None:
        raise ConfigError(f"{arch}: hidden_size {d_model} is not a multiple of num_attention_heads {num_heads}")
    head_dim = int(_get(hf, "head_dim", d_model // num_heads))
    rope_theta, rope_scaling = _rope(hf, arch)

    if arch == "Qwen2ForCausalLM":
        qkv_bias = True  # Qwen2 always carries q/k/v biases
    elif arch == "Qwen2MoeForCausalLM":
        qkv_bias = bool(hf.get("qkv_bias", True))
    else:
        qkv_bias = False

    moe: dict[str, Any] = {}
    mlp_dim = int(_require(hf, "intermediate_size", arch))
    if arch == "MixtralForCausalLM":
        num_experts = int(_get(hf, "num_local_experts", _get(hf, "num_experts", 8)))
        moe = dict(
            num_experts=num_experts,
            num_experts_per_tok=int(_get(hf, "num_experts_per_tok", 2)),
            moe_mlp_dim=mlp_dim,
            router_renormalize=True,  # Mixtral always renormalises its top-k weights
        )
    elif arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        num_experts = int(_get(hf, "num_experts", _get(hf, "num_local_experts", 0)))
        if num_experts > 0:
            moe = dict(
                num_experts=num_experts,
                num_experts_per_tok=int(_require(hf, "num_experts_per_tok", arch)),
                moe_mlp_dim=int(_require(hf, "moe_intermediate_size", arch)),
                router_renormalize=bool(hf.get("norm_topk_prob", False)),
                dense_layers=_dense_layers(hf, arch, num_layers),
            )
            if arch == "Qwen2MoeForCausalLM":
                moe["shared_expert_mlp_dim"] = int(_get(hf, "shared_expert_intermediate_size", 0))
        # num_experts == 0: transformers builds every layer dense.

    if dtype is None:
        dtype = _TORCH_DTYPES.get(str(hf.get("dtype") or hf.get("torch_dtype") or "float32"), "float32")
    bos, eos_ids, pad = _token_ids(hf, generation_config)
    try:
        return ModelConfig(
            name=name,
            vocab_size=int(_require(hf, "vocab_size", arch)),
            d_model=d_model,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            mlp_dim=mlp_dim,
            max_seq_len=int(max_seq_len or _get(hf, "max_position_embeddings", 2048)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            sliding_window=_sliding_window(hf, arch, num_layers),
            bos_id=bos,
            eos_ids=eos_ids,
            pad_id=pad,
            dtype=dtype,
            **moe,
        )
    except ConfigError as e:
        raise ConfigError(f"{arch} config.json does not give a valid model: {e}") from e


def load_hf_config(
    directory: str | os.PathLike, dtype: str | None = None, max_seq_len: int | None = None
) -> ModelConfig:
    """Read ``config.json`` (and ``generation_config.json`` if present) from an HF model folder."""
    d = Path(directory)
    config_path = d / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"Hugging Face config not found: {config_path}")
    hf = read_json(config_path)
    generation = read_json(d / "generation_config.json") if (d / "generation_config.json").exists() else None
    return hf_to_model_config(hf, name=d.absolute().name, generation_config=generation, dtype=dtype, max_seq_len=max_seq_len)
