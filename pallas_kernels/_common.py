"""Helpers shared by the kernels: backend resolution and integer arithmetic on static shapes."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

Backend = Literal["auto", "tpu", "gpu"]

# Accelerators with a Pallas lowering. "cuda" and "rocm" are what jax.default_backend() reports on GPUs.
_TPU_PLATFORMS = ("tpu",)
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def resolve_backend(backend: str, interpret: bool) -> Literal["tpu", "gpu"]:
    """Map ``backend`` to the kernel variant to build ("tpu" = Mosaic, "gpu" = Triton).

    ``auto`` follows the default JAX platform. On CPU no kernel can be compiled, so
    ``auto`` needs ``interpret=True`` and then runs the TPU variant in the Pallas
    interpreter; an ahead-of-time lowering for an accelerator from a CPU host must
    name the variant explicitly, because the default platform there is still CPU.
    """
    if backend in ("tpu", "mosaic"):
        return "tpu"
    if backend in ("gpu", "triton", "cuda"):
        return "gpu"
    if backend != "auto":
        raise ValueError(f"unknown Pallas backend {backend!r}; expected 'auto', 'tpu' or 'gpu'")
    platform = jax.default_backend()
    if platform in _TPU_PLATFORMS:
        return "tpu"
    if platform in _GPU_PLATFORMS:
        return "gpu"
    if not interpret:
        raise ValueError(
            f"Pallas kernels cannot be compiled for the {platform!r} platform: pass interpret=True to run them "
            "in the Pallas interpreter, or backend='tpu'/'gpu' to lower ahead of time for an accelerator"
        )
    return "tpu"


def default_interpret() -> bool:
    """True where no accelerator can run a compiled kernel (the CPU), so callers fall back to the interpreter."""
    return jax.default_backend() not in _TPU_PLATFORMS + _GPU_PLATFORMS


def matmul_precision(dtype) -> lax.Precision:
    """Explicit precision for in-kernel matmuls of ``dtype`` operands.

    float32 gets true float32 products (no bf16 passes / TF32), matching the jnp
    references. Everything else gets DEFAULT, stated explicitly: with precision=None
    a process-wide ``jax_default_matmul_precision="highest"`` (as the test suite sets)
    would ask Mosaic for fp32 contraction of bf16 operands, which it refuses.
    """
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT
