"""Planning and compiling for multi-host slices (docs/multihost.md): the memory planner and the
AOT tool take a mesh whose topology spans several hosts, compile one program over all its chips
and report per-chip figures. Needs libtpu (``pip install -e ".[test,aot]"``): without it these
fail, by design, rather than skip."""

from __future__ import annotations

import importlib.util

import jax
import pytest

from jaxspec.config import load_config
from jaxspec.mesh import load_mesh_config, param_bytes, topology_devices
from jaxspec.planning import plan_memory


@pytest.fixture(autouse=True)
def _libtpu():
    assert importlib.util.find_spec("libtpu") is not None, 'libtpu missing: pip install "jax[tpu]==0.10.2"'


@pytest.mark.parametrize("mesh, chips, hosts, across", [
    ("tpu-v5e-16", 16, 4, ("expert", "tensor")),  # v5e 4x4: a 4-chip tensor row spans two 2x2 hosts
    ("tpu-v5p-32", 16, 4, ("expert",)),  # v5p 2x2x4: a host's 2x2 chips are one tensor group
    ("tpu-v5p-16", 8, 2, ("expert",)),
])
def test_multi_host_topologies_describe_every_chip_of_the_slice(mesh, chips, hosts, across):
    from jaxspec.mesh import build_mesh
    from jaxspec.planning import host_axes

    cfg = load_mesh_config(mesh)
    devices = topology_devices(cfg)
    assert len(devices) == cfg.num_devices == chips
    assert sorted({d.process_index for d in devices}) == list(range(hosts))
    assert sum(d.process_index == 0 for d in devices) == 4  # 4 chips per host on both generations
    assert host_axes(build_mesh(cfg, devices)) == across


def test_planner_reports_per_chip_memory_of_mixtral_on_a_v5e_4x4():
    """Mixtral-8x7B's 87 GiB of bfloat16 weights over 16 chips on 4 hosts: experts split 16 ways,
    attention 4 ways, so each chip holds a little more than a sixteenth (it does not fit 8 chips)."""
    cfg = load_config("mixtral-8x7b")
    plan = plan_memory(cfg, load_mesh_config("tpu-v5e-16"), 16, 4096, compile=False)
    assert (plan.num_devices, plan.num_hosts, plan.host_axes) == (16, 4, ("expert", "tensor"))
    total = param_bytes(cfg)
    assert total / 16 < plan.weights < total / 14
    # K and V, 32 layers x 16 slots x 4096 positions x 8 kv heads x 128, bf16, kv heads over 4.
    assert plan.kv_cache == 2 * 32 * 16 * 4096 * 8 * 128 * 2 // 4 + 16 * 4
    assert plan.fits and plan.capacity == int(16 * 2**30 * 0.92)
    assert "(16 devices on 4 hosts)" in plan.table() and "axes across hosts: expert, tensor" in plan.table()


def test_qwen3_235b_config_has_the_published_size():
    cfg = load_config("qwen3-235b-a22b")
    assert round(cfg.param_counts()["total"] / 1e9, 1) == 235.1
    assert round(cfg.param_counts()["active"] / 1e9, 1) == 22.2
    assert cfg.vocab_size == load_config("qwen3-0.6b").vocab_size  # its draft's


@pytest.mark.slow  # building the abstract 94-layer model takes about a minute
def test_qwen3_235b_needs_a_v5p_slice_of_two_hosts():
    """Qwen3-235B-A22B (438 GiB in bfloat16): 8 v5p chips on 2 hosts hold it, 16 v5e chips do
    not (the weights alone are twice a chip)."""
    cfg = load_config("qwen3-235b-a22b")
    v5p = plan_memory(cfg, load_mesh_config("tpu-v5p-16"), 16, 4096, compile=False)
    assert v5p.num_hosts == 2 and v5p.moe_exchange == "ragged_all_to_all"
    assert v5p.fits and 50 * 2**30 < v5p.weights < 60 * 2**30
    v5e = plan_memory(cfg, load_mesh_config("tpu-v5e-16"), 16, 4096, compile=False)
    assert not v5e.fits and "the weights alone exceed a device" in v5e.refusal()


@pytest.mark.slow
def test_a_routed_moe_step_compiles_for_four_hosts_of_a_v5p_2x2x4():
    """The tiny MoE's real engine steps compiled by libtpu for all 16 chips of a 4-host slice;
    experts across hosts exchange their routed tokens with ragged-all-to-all."""
    cfg = load_config("tiny-qwen3-moe").replace(dtype="bfloat16", num_heads=8, num_kv_heads=8, head_dim=64,
                                                 d_model=128, vocab_size=264, moe_mlp_dim=128)
    with jax.default_matmul_precision("default"):  # serving's precision (conftest asks for "highest")
        plan = plan_memory(cfg, load_mesh_config("tpu-v5p-32"), 8, 64, prefill_chunk=32)
    assert (plan.num_devices, plan.num_hosts) == (16, 4)
    assert list(plan.temp_by_step) == ["prefill chunk 1x32", "decode 8"]
    # 32 prompt tokens and 8 decode tokens split over the 4 expert devices: rows out, expert ids
    # out, results back, in each of the 2 layers.
    assert plan.ragged_all_to_all == {"prefill chunk 1x32": 6, "decode 8": 6}
    assert plan.fits and all(b > 0 for b in plan.temp_by_step.values())
