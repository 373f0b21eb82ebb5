"""Test setup: CPU only, 8 virtual devices for sharding tests (set before jax is imported)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
# The suite compiles thousands of step programs of tiny models and runs each a few times: LLVM's
# optimisation passes were about half of every compile and buy nothing measurable at these sizes.
# Subprocesses inherit the flags (helpers.xla_flags keeps them when it sets a device count).
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_executables():
    """Free each module's compiled executables when it ends: hundreds of modules' worth in one
    process crashed XLA:CPU's compiler (a segfault inside a later compile)."""
    yield
    jax.clear_caches()


@pytest.fixture(autouse=True, scope="session")
def _persistent_compilation_cache():
    """One persistent compilation cache for the whole run: many tests build the same tiny models
    and compile the same step programs, which then load instead of compiling again. A cache hit
    still fires jax's backend-compile event, so ``CompileCounter`` counts it as a compilation.
    ``JAXSPEC_TEST_SESSION_CACHE=0`` turns it off (to time compilations)."""
    if os.environ.get("JAXSPEC_TEST_SESSION_CACHE") == "0":
        yield None
        return
    from serving.testing import persistent_compilation_cache

    with persistent_compilation_cache() as path:
        yield path

