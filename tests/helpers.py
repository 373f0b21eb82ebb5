"""Small shared test helpers."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspec.config import load_config
from jaxspec.models import KVCache, create_model


def scaled_model(name: str, seed: int = 0, scale: float = 4.0, **overrides):
    """A random model whose weights are scaled up so logits are far from uniform
    (more sensitive comparisons than 0.02-std init)."""
    cfg = load_config(name)
    if overrides:
        cfg = cfg.replace(**overrides)
    model = create_model(cfg, seed)
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1000), len(leaves))
    new = []
    for key, v in zip(keys, leaves):
        noise = jax.random.normal(key, v.shape, jnp.float32)
        if bool(jnp.all(v == 1.0)):  # norm scales: around 1
            new.append((1.0 + 0.1 * noise).astype(v.dtype))
        elif bool(jnp.all(v == 0.0)):  # biases: small, non-zero
            new.append((0.05 * noise).astype(v.dtype))
        else:
            new.append((v * scale).astype(v.dtype))
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, new))


@functools.partial(jax.jit, static_argnums=(0,))
def _forward_fresh_cache(graphdef, state, toks):
    model = nnx.merge(graphdef, state)
    cache = KVCache.create(model.cfg, 1, toks.shape[1])
    return model(toks, jnp.zeros((1,), jnp.int32), cache).logits[0]


def full_forward(model, tokens: np.ndarray) -> np.ndarray:
    """Logits [T, V] of one sequence in one (jitted) forward through a fresh cache.

    The sequence is padded to a power-of-two length; causal masking makes the
    padding invisible to the real positions. Models of one architecture share
    the compiled function."""
    graphdef, state = nnx.split(model)
    t = len(tokens)
    padded = np.zeros((1, max(16, 1 << (t - 1).bit_length())), np.int32)
    padded[0, :t] = tokens
    return np.asarray(_forward_fresh_cache(graphdef, state, jnp.asarray(padded)))[:t]


class CompileCounter:
    """Counts XLA compilations from its creation on (jax's backend-compile monitoring event)."""

    def __init__(self):
        from jax._src import dispatch

        self.count = 0
        self._event = dispatch.BACKEND_COMPILE_EVENT
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, duration, **kwargs):
        if event == self._event:
            self.count += 1


def feed_in_blocks(fwd, state, cache: KVCache, seqs, slot_of, plan) -> tuple[list[np.ndarray], KVCache]:
    """Feed two sequences through ``cache`` (rows in slots ``slot_of``) in blocks of ``plan[i]``
    tokens per forward, ``fwd(state, tokens, start, cache, slot_ids, num_valid)`` -> (logits [T, V]
    per sequence, cache): prefill-like blocks and single-token decodes interleaved."""
    pos, got = [0, 0], [[], []]
    for t in plan:
        toks = np.zeros((2, 8), np.int32)
        valid = np.array([min(t, len(s) - p) for s, p in zip(seqs, pos)], np.int32).clip(0)
        for r in range(2):
            toks[r, : valid[r]] = seqs[r][pos[r]: pos[r] + valid[r]]
        out = fwd(state, jnp.asarray(toks), jnp.asarray(pos, jnp.int32), cache, jnp.asarray(slot_of, jnp.int32),
                  jnp.asarray(valid))
        cache = out.cache
        for r in range(2):
            got[r].append(np.asarray(out.logits[r, : valid[r]]))
            pos[r] += int(valid[r])
    return [np.concatenate(g) for g in got], cache


def interpret_for(backend: str) -> bool:
    """Run a Pallas kernel test in the interpreter, unless JAXSPEC_KERNELS_COMPILED=1 and this process's
    accelerator is the kernel's backend (tools/device_check.py: the same tests, compiled on a GPU/TPU)."""
    import os

    if os.environ.get("JAXSPEC_KERNELS_COMPILED") != "1":
        return True
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(jax.default_backend(), jax.default_backend())
    return platform != backend


def xla_flags(device_count: int | None) -> str:
    """This run's ``XLA_FLAGS`` (tests/conftest.py) for a subprocess of ``device_count`` CPU devices
    (``None``: jax's default, one)."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    count = [] if device_count is None else [f"--xla_force_host_platform_device_count={device_count}"]
    return " ".join(kept + count)


def require_cpu_kernel(kernel_module) -> None:
    """Build a ``cpu_kernels`` module's kernel here: skip the test only where this machine has no C++
    compiler to build it with (a failed build fails)."""
    import pytest

    from cpu_kernels import native

    if native.compiler() is None:
        pytest.skip("no C++ compiler here to build the CPU kernel with")
    assert kernel_module.available(), kernel_module.unavailable_reason()


def moe_backend(name: str):
    """The MoE dispatch backend ``name``, its module loaded (the C++ kernel's, ``cpu_fused``, as
    ``require_cpu_kernel``)."""
    from jaxspec.models.moe_dispatch import BACKENDS, load_backend

    if name == "cpu_fused":
        from cpu_kernels import moe_ffn

        require_cpu_kernel(moe_ffn)
    assert load_backend(name), name
    return BACKENDS[name]

