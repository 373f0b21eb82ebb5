"""Full ahead-of-time compiles of the Pallas kernels for TPU v5e (Mosaic) and H100 (Triton + ptxas) on a CPU host.

Lowering (tested in the other test_kernel_* files) stops at MLIR; these tests run
the real compilers, which reject illegal block shapes and resource overflows (see
/work/shared/AOT.md). They need the compiler plugins, which are not project
dependencies, and skip without them:

* TPU: ``pip install "jax[tpu]==<jax version>"`` (libtpu)
* GPU: ``pip install jax-cuda12-plugin==<v> jax-cuda12-pjrt==<v> nvidia-cuda-nvcc-cu12 absl-py``

Shapes are real model sizes (Mixtral-8x7B / Qwen3-30B-A3B experts, a Qwen-sized
vocabulary, an 8k cache); only abstract arrays are used, so no memory is needed.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

pytestmark = pytest.mark.slow

# GpuTargetConfigProto (text format) of an H100 SXM 80 GB, as in /work/shared/AOT.md.
H100_TARGET = (
    "gpu_device_info { threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152 "
    "shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128 "
    "block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 "
    "l2_cache_size: 52428800 clock_rate_ghz: 1.98 device_memory_size: 84942979072 shared_memory_per_block_optin: 232448 "
    "cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536 } "
    'platform_name: "CUDA" dnn_version_info { major: 9 minor: 8 } device_description_str: "NVIDIA H100 80GB HBM3"'
)


def _nvcc_bin() -> Path | None:
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(root) / "cuda_nvcc" / "bin"
        if (candidate / "ptxas").exists():
            return candidate
    return None


@pytest.fixture(scope="module")
def tpu_device():
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail('libtpu not installed: pip install -e ".[test]" brings it (jax[tpu])')
    # Compiling needs no TPU, but libtpu takes a machine-wide lock file unless told otherwise, and other
    # test processes on this host may hold it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(
        platform="tpu", topology_name="v5e:1x1", chip_config_name="default", chips_per_host_bounds=(1, 1, 1),
        num_slices=1,
    )
    return topo.devices[0]


@pytest.fixture(scope="module")
def gpu_device():
    if importlib.util.find_spec("jax_cuda12_plugin") is None or _nvcc_bin() is None:
        pytest.fail('jax-cuda12-plugin / nvidia-cuda-nvcc-cu12 not installed: pip install -e ".[test]" brings them')
    # ptxas and libdevice from the pip wheel, ahead of any system CUDA of another major version
    # (for this module only).
    saved_path = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{_nvcc_bin()}{os.pathsep}{saved_path}"
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=H100_TARGET)
    yield topo.devices[0]
    os.environ["PATH"] = saved_path


def _structs(device, *specs):
    from jax.sharding import SingleDeviceSharding

    sharding = SingleDeviceSharding(device)
    return [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for shape, dtype in specs]


def _compile(fn, device, *specs):
    compiled = jax.jit(fn).trace(*_structs(device, *specs)).lower().compile()
    stats = compiled.memory_analysis()
    assert stats is not None and stats.argument_size_in_bytes > 0
    return compiled


def _gmm_grad(backend):
    from pallas_kernels.gmm import gmm

    def loss(lhs, rhs, sizes):
        return jnp.sum(gmm(lhs, rhs, sizes, backend=backend, preferred_element_type=jnp.float32))

    return jax.grad(loss, argnums=(0, 1))


def _moe_layer(backend):
    from jaxspec.models.moe_pallas import dispatch_pallas

    return functools.partial(dispatch_pallas, backend=backend, interpret=False)


@pytest.mark.parametrize("variant", ["tpu", "gpu"])
def test_kernels_compile_for_real_shapes(variant, request):
    from pallas_kernels.rejection_sampling import rejection_sample
    from pallas_kernels.verify_attention import verify_attention

    device = request.getfixturevalue(f"{variant}_device")
    bf16, f32, i32 = jnp.bfloat16, jnp.float32, jnp.int32
    # Mixtral-8x7B expert FFN, 256 decode tokens x top-2: forward + backward (gmm, transposed gmm, tgmm).
    _compile(_gmm_grad(variant), device, ((512, 4096), bf16), ((8, 4096, 14336), bf16), ((8,), i32))
    # Qwen3-30B-A3B MoE layer (128 experts, top-8) for 64 tokens: sort + three grouped matmuls.
    _compile(
        _moe_layer(variant), device, ((64, 2048), bf16), ((64, 8), i32), ((64, 8), f32), ((128, 2048, 768), bf16),
        ((128, 2048, 768), bf16), ((128, 768, 2048), bf16),
    )
    # Verification of 4 drafts for 16 slots over a 151936-token vocabulary.
    b, k, v = 16, 4, 151936
    _compile(
        functools.partial(rejection_sample, backend=variant), device, ((b, k + 1, v), f32), ((b, k, v), f32),
        ((b, k), i32), ((b,), i32), ((b, k), f32), ((b, k + 1, v), f32),
    )
    # Verification attention: 16 slots x 5 tokens, 32 query / 8 kv heads, 8k-token bf16 cache.
    _compile(
        functools.partial(verify_attention, backend=variant), device, ((16, 5, 32, 128), bf16),
        ((16, 8192, 8, 128), bf16), ((16, 8192, 8, 128), bf16), ((16, 5), i32),
    )


@pytest.mark.parametrize("variant", ["tpu", "gpu"])
def test_int8_grouped_matmul_compiles_for_real_shapes(variant, request):
    """gmm_int8 on Mixtral-8x7B's expert up and down projections, and the ``pallas`` MoE layer of
    Qwen3-30B-A3B with int8 experts (three gmm_int8 calls)."""
    from jaxspec.models.moe_pallas import dispatch_pallas
    from jaxspec.models.quant import QArray
    from pallas_kernels.gmm_int8 import gmm_int8

    device = request.getfixturevalue(f"{variant}_device")
    bf16, i8, f32, i32 = jnp.bfloat16, jnp.int8, jnp.float32, jnp.int32
    fn = functools.partial(gmm_int8, backend=variant, interpret=False)
    _compile(fn, device, ((512, 4096), bf16), ((8, 4096, 14336), i8), ((8, 1, 14336), f32), ((8,), i32))
    _compile(fn, device, ((512, 14336), bf16), ((8, 14336, 4096), i8), ((8, 1, 4096), f32), ((8,), i32))

    def layer(x, ids, w, gq, gs, uq, us, dq, ds):
        return dispatch_pallas(x, ids, w, QArray(gq, gs, 8), QArray(uq, us, 8), QArray(dq, ds, 8), backend=variant,
                               interpret=False)

    e, d, f = 128, 2048, 768
    _compile(layer, device, ((64, d), bf16), ((64, 8), i32), ((64, 8), f32), ((e, d, f), i8), ((e, 1, f), f32),
             ((e, d, f), i8), ((e, 1, f), f32), ((e, f, d), i8), ((e, 1, d), f32))


def test_mosaic_rejects_illegal_block_at_compile(tpu_device):
    """Past our validation, the TPU toolchain refuses a (128, 100) lhs block."""
    from pallas_kernels import gmm as gmm_mod

    cfg = gmm_mod._Config(tiling=None, backend="tpu", interpret=False, out_dtype=None, transpose_rhs=False)

    def call(lhs, rhs):
        starts = jnp.asarray([0, 64, 128, 192], jnp.int32)
        return gmm_mod._gmm_tpu(lhs, rhs, starts, starts + 64, cfg, (128, 100, 128), jnp.bfloat16)

    with pytest.raises(Exception, match="divisible by 8 and 128"):
        _compile(call, tpu_device, ((256, 1000), jnp.bfloat16), ((4, 1000, 256), jnp.bfloat16))


def test_triton_rejects_shared_memory_overflow(gpu_device):
    """A legal-looking but huge GPU tiling is refused by the real compiler (shared memory), not silently built."""
    from pallas_kernels.gmm import gmm

    fn = functools.partial(gmm, backend="gpu", tiling=(512, 512, 512))
    with pytest.raises(Exception, match="(?i)shared memory|RESOURCE_EXHAUSTED|out of resource"):
        _compile(fn, gpu_device, ((1024, 4096), jnp.bfloat16), ((8, 4096, 4096), jnp.bfloat16), ((8,), jnp.int32))
