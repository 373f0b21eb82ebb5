"""Test setup: CPU only, 8 virtual devices for sharding tests (set before jax is imported)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_executables():
    """Free each module's compiled executables when it ends: hundreds of modules' worth in one
    process crashed XLA:CPU's compiler (a segfault inside a later compile)."""
    yield
    jax.clear_caches()
