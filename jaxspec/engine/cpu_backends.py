"""Which C++ CPU kernels (``cpu_kernels``) can serve a runner's steps, and what a backend's "auto"
means for it: the attention backend "cpu" (``slot_attention``) and the matmul backend "cpu"
(``dense_matmul`` and ``moe_ffn``, through ``jaxspec.models.dense_cpu``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxspec.mesh import Placement
from jaxspec.models.kv_cache import check_kv_dtype


def cpu_attention_unfit(cfg, placement: Placement | None = None, page_size: int | None = None,
                        kv_dtype: str | None = None) -> str | None:
    """Why the C++ attention kernel (``cpu_kernels.slot_attention``, attention backend "cpu") cannot
    serve a runner's steps, or None when it can: a single-device CPU runner of a float32 model over a
    float32 slot cache, where the kernel builds."""
    if placement is not None or jax.default_backend() != "cpu":
        return "it runs on a single CPU device only"
    if page_size is not None or check_kv_dtype(kv_dtype) is not None:
        return "it reads a float32 slot cache (not a paged or int8 one)"
    if jnp.dtype(cfg.dtype) != jnp.float32:
        return f"it takes float32 models, not {cfg.dtype}"
    try:
        from cpu_kernels.slot_attention import MAX_GROUP, unavailable_reason
    except ImportError as e:  # an install without the package
        return f"cpu_kernels cannot be imported: {e}"
    if cfg.num_heads // cfg.num_kv_heads > MAX_GROUP:
        return f"{cfg.num_heads // cfg.num_kv_heads} query heads per kv head exceed its {MAX_GROUP}"
    return unavailable_reason()


def cpu_matmul_unfit(cfg, placement: Placement | None = None) -> str | None:
    """Why the C++ dense products (``dense_cpu``, matmul backend "cpu") cannot serve a runner's
    steps, or None when they can: a single-device CPU runner of a float32, unquantized model, where
    the kernels build."""
    if placement is not None or jax.default_backend() != "cpu":
        return "they run on a single CPU device only"
    if jnp.dtype(cfg.dtype) != jnp.float32 or cfg.quantization is not None:
        return f"they take float32 weights, not {cfg.quantization or cfg.dtype}"
    try:
        from cpu_kernels import dense_matmul, moe_ffn
    except ImportError as e:  # an install without the package
        return f"cpu_kernels cannot be imported: {e}"
    return dense_matmul.unavailable_reason() or moe_ffn.unavailable_reason()


def auto_matmul(cfg, placement: Placement | None = None) -> str:
    """The matmul backend "auto" means for such a runner: "cpu" where the C++ products can serve it
    (``cpu_matmul_unfit``), else "xla"."""
    return "xla" if cpu_matmul_unfit(cfg, placement) else "cpu"


def auto_attention(cfg, placement: Placement | None = None, page_size: int | None = None,
                   kv_dtype: str | None = None) -> str:
    """The attention backend "auto" means for such a runner: "cpu" where the C++ kernel can serve
    it (``cpu_attention_unfit``), else "xla"."""
    return "xla" if cpu_attention_unfit(cfg, placement, page_size, kv_dtype) else "cpu"


def require_fit(backend: str, reason: str | None) -> None:
    """ValueError naming the backend and why it cannot serve the runner, when ``reason`` says so."""
    if reason is not None:
        raise ValueError(f"the cpu {backend} backend cannot serve this runner: {reason}")
