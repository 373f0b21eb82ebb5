"""Process-wide cache of jitted step functions.

A ``jax.jit`` wrapper created per runner instance compiles again for every new
runner, even for the same model structure and shapes. Keying the wrappers on
the static description (model graphdef, backend, proposal length, ...) lets
every runner of the same structure share one compiled executable per shape —
warm-up pays once per process, and tests that build many runners stay fast.
"""

from __future__ import annotations

from typing import Callable, Hashable

import jax

_CACHE: dict[Hashable, Callable] = {}


def cached_jit(key: Hashable, make: Callable[[], Callable], **jit_kwargs) -> Callable:
    """The jitted ``make()`` for ``key``, built on first use. ``key`` must capture
    everything ``make`` closes over (graphdefs are hashable by structure)."""
    fn = _CACHE.get(key)
    if fn is None:
        fn = _CACHE[key] = jax.jit(make(), **jit_kwargs)
    return fn
