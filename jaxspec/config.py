"""Model configuration: one dataclass that describes every supported decoder.

Configs live as editable JSON files under ``configs/models/`` and are loaded by
name (``load_config("tiny-moe")``) or by path.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

# Package data (jaxspec/configs; in the repository a link to configs/ at the root, so both paths
# work); JAXSPEC_CONFIG_DIR overrides it.
_REPO_CONFIG_DIR = Path(__file__).resolve().parent / "configs"

SUPPORTED_ROPE_SCALING = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """A model configuration is invalid or cannot be found."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and switches of a decoder-only transformer (dense, MoE or mixed).

    Covers Llama / Mistral / Qwen2 / Qwen3 (dense) and Mixtral / Qwen2-MoE /
    Qwen3-MoE (sparse). ``head_dim`` is explicit: it is not always d_model / heads.
    """

    name: str
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int  # intermediate size of dense (non-MoE) layers
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    # None or {"type": "linear"|"llama3", ...}; other types are refused at load time.
    rope_scaling: dict[str, Any] | None = None
    rms_eps: float = 1e-6
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 / Qwen2-MoE carry q/k/v biases
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: int | None = None
    # --- mixture of experts (num_experts == 0 means fully dense) ---
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_mlp_dim: int = 0
    router_renormalize: bool = True  # Mixtral / Qwen3-MoE: renormalise the top-k weights
    shared_expert_mlp_dim: int = 0  # Qwen2-MoE shared expert (sigmoid-gated); 0 = none
    dense_layers: tuple[int, ...] = ()  # layer indices that use a dense MLP in a MoE model
    moe_backend: str = "auto"  # see jaxspec.models.moe.BACKENDS
    # --- tokenizer-level ids the model needs to know ---
    bos_id: int | None = 1
    eos_ids: tuple[int, ...] = (2,)
    pad_id: int = 0
    dtype: str = "float32"  # parameter and activation dtype
    # Weight-only quantization of the projections (jaxspec.models.quant): None, "int8" or "int4";
    # int4 groups up to quant_group_size entries per scale.
    quantization: str | None = None
    quant_group_size: int = 128

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        object.__setattr__(self, "eos_ids", tuple(self.eos_ids))
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        positive = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "max_seq_len")
        for field in positive:
            if getattr(self, field) <= 0:
                raise ConfigError(f"{self.name}: {field} must be > 0, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{self.name}: num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{self.name}: head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(
                    f"{self.name}: num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                    f"got {self.num_experts_per_tok}"
                )
            if self.moe_mlp_dim <= 0:
                raise ConfigError(f"{self.name}: moe_mlp_dim must be > 0 for an MoE model")
        if any(not 0 <= i < self.num_layers for i in self.dense_layers):
            raise ConfigError(f"{self.name}: dense_layers {self.dense_layers} out of range [0, {self.num_layers})")
        if self.mlp_dim <= 0 and (not self.num_experts or self.dense_layers):
            raise ConfigError(f"{self.name}: mlp_dim must be > 0 when the model has dense layers")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in SUPPORTED_ROPE_SCALING:
                raise ConfigError(
                    f"{self.name}: rope_scaling type {kind!r} is not supported "
                    f"(supported: {', '.join(SUPPORTED_ROPE_SCALING)})"
                )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"{self.name}: dtype {self.dtype!r} not supported (float32, bfloat16, float16)")
        if self.quantization not in (None, "int8", "int4"):
            raise ConfigError(f"{self.name}: quantization {self.quantization!r} not supported (int8, int4 or null)")
        if self.quant_group_size < 2 or self.quant_group_size % 2:
            raise ConfigError(f"{self.name}: quant_group_size must be even and >= 2, got {self.quant_group_size}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"{self.name}: sliding_window must be > 0 or null")

    # --------------------------------------------------------------- derived
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layer_is_moe(self, layer: int) -> bool:
        return self.is_moe and layer not in self.dense_layers

    @property
    def num_query_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def param_counts(self) -> dict[str, int]:
        """Total and active (per token) parameter counts."""
        attn = self.d_model * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        total = active = 0
        for layer in range(self.num_layers):
            total += attn
            active += attn
            if self.layer_is_moe(layer):
                expert = 3 * self.d_model * self.moe_mlp_dim
                shared = 3 * self.d_model * self.shared_expert_mlp_dim
                router = self.d_model * self.num_experts
                total += self.num_experts * expert + shared + router
                active += self.num_experts_per_tok * expert + shared + router
            else:
                total += 3 * self.d_model * self.mlp_dim
                active += 3 * self.d_model * self.mlp_dim
        embed = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        return {"total": total + embed, "active": active + embed}

    # ------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dense_layers"] = list(self.dense_layers)
        d["eos_ids"] = list(self.eos_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def config_dir() -> Path:
    return Path(os.environ.get("JAXSPEC_CONFIG_DIR", _REPO_CONFIG_DIR))


def available_configs() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "models").glob("*.json"))


def load_config(name_or_path: str | os.PathLike) -> ModelConfig:
    """Load a model config by name (``configs/models/NAME.json``) or from a JSON file path."""
    path = Path(name_or_path)
    if not path.suffix == ".json" or not path.exists():
        candidate = config_dir() / "models" / f"{name_or_path}.json"
        if not candidate.exists():
            raise ConfigError(
                f"unknown model config {str(name_or_path)!r}; available: {', '.join(available_configs()) or 'none'}"
            )
        path = candidate
    with open(path) as f:
        data = json.load(f)
    data.setdefault("name", path.stem)
    return ModelConfig.from_dict(data)
