"""Memory planning (jaxspec.planning): exact per-device bytes, refusal with numbers, and real AOT
compiles of the sharded engine steps for a TPU v5e 2x4 and an 8x H100 topology (tiny shapes).

The AOT tests need the compiler plugins (``pip install -e ".[test,aot]"``, see pyproject.toml):
without them they fail, by design, rather than skip."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxspec.config import load_config
from jaxspec.engine import ModelRunner
from jaxspec.mesh import load_mesh_config
from jaxspec.models import create_model
from jaxspec.planning import DoesNotFit, check_fits, plan_memory

MOE = dict(num_heads=8, num_kv_heads=8, head_dim=16, vocab_size=264)


def test_plan_bytes_match_a_placed_runner():
    cfg = load_config("tiny-qwen3-moe").replace(**MOE)
    mesh_cfg = load_mesh_config("cpu-8")
    plan = plan_memory(cfg, mesh_cfg, 8, 64, devices=jax.devices(), compile=False)
    from jaxspec.mesh import Placement, build_mesh

    runner = ModelRunner(create_model(cfg), 8, 64,
                         placement=Placement.create(build_mesh(mesh_cfg, jax.devices()), mesh_cfg.rules))
    on_device0 = lambda arrays: sum(  # noqa: E731
        s.data.nbytes for a in arrays for s in a.addressable_shards if s.device == jax.devices()[0])
    assert plan.weights == on_device0(jax.tree.leaves(runner.state))
    assert plan.kv_cache == on_device0([runner.cache.k, runner.cache.v, runner.cache.lengths])
    assert plan.fits and plan.capacity is None  # host memory: unknown, so never refused


def test_refusal_names_the_numbers():
    cfg = load_config("tiny-qwen3-moe").replace(**MOE)
    small = dataclasses.replace(load_mesh_config("cpu-8"), hbm_bytes_per_device=3_000_000)
    with pytest.raises(DoesNotFit, match=r"tiny-qwen3-moe on cpu-8: needs .* per device .*8 slots x 4096 tokens"
                                         r".*at most \d+ slots of 4096 tokens or 8 slots of \d+ tokens"):
        check_fits(cfg, small, 8, 4096, devices=jax.devices(), compile=False)
    plan = check_fits(cfg, small, 1, 64, devices=jax.devices(), compile=False)
    assert plan.fits
    tiny = dataclasses.replace(small, hbm_bytes_per_device=1000)
    with pytest.raises(DoesNotFit, match="weights alone exceed"):
        check_fits(cfg, tiny, 1, 64, devices=jax.devices(), compile=False)


def test_uneven_experts_refused_by_the_plan():
    cfg = load_config("tiny-qwen3-moe").replace(num_experts=5, **MOE)
    with pytest.raises(ValueError, match="5 experts cannot be split evenly over an expert axis of size 2"):
        plan_memory(cfg, load_mesh_config("cpu-8"), 8, 64, devices=jax.devices(), compile=False)


def _require(module: str, install: str) -> None:
    assert importlib.util.find_spec(module) is not None, f"{module} missing: {install} (the AOT tests do not skip)"


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["tpu-v5e-8", "gpu-8xh100"])
def test_sharded_steps_compile_for_real_topologies(mesh):
    if mesh.startswith("tpu"):
        _require("libtpu", 'pip install "jax[tpu]==0.10.2"')
    else:
        _require("jax_cuda12_plugin", "pip install jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2")
        _require("nvidia.cuda_nvcc", "pip install nvidia-cuda-nvcc-cu12")
    # head_dim 64 / d_model 128: XLA:GPU's deviceless dot tiling found no tiles for the
    # [24, 32] x [32, 64] output projection of head_dim 16 (verify step, 2 local heads).
    sizes = dict(MOE, head_dim=64, d_model=128)
    cfg = load_config("tiny-qwen3-moe").replace(dtype="bfloat16", **sizes)
    draft = load_config("tiny-dense").replace(dtype="bfloat16", vocab_size=264, head_dim=64, d_model=128)
    steps = []
    # Serving's precision: conftest's global "highest" asks for fp32 passes on bf16 dots, which
    # neither Mosaic nor the H100 dot emitter take (and no production step uses).
    with jax.default_matmul_precision("default"):
        plan = plan_memory(cfg, load_mesh_config(mesh), 8, 64, draft_cfg=draft, num_speculative_tokens=2,
                           on_step=lambda name, b: steps.append(name))
    assert steps == ["prefill 1x64", "decode 8", "verify 8x3", "draft loop 8x2"]
    assert plan.fits and plan.hbm > 15 * 2**30
    assert all(b > 0 for b in plan.temp_by_step.values()), plan.temp_by_step
    # Experts split 2 ways and their width 4 ways: each device holds an eighth of the expert weights.
    e = cfg.num_experts * 3 * cfg.d_model * cfg.moe_mlp_dim * 2 * cfg.num_layers
    assert plan.weights < e / 8 + (cfg.param_counts()["total"] * 2 - e)
    assert np.isclose(plan.kv_cache, 2 * cfg.num_layers * 8 * 64 * cfg.num_kv_heads * cfg.head_dim * 2 / 4 + 8 * 4)


def test_serving_start_up_refuses_what_cannot_fit(monkeypatch):
    from jaxspec import planning
    from jaxspec.config import ConfigError
    from serving.build import EngineOptions, _check_memory

    model = create_model(load_config("tiny-moe"))
    _check_memory(EngineOptions(model="tiny-moe", slots=4, max_len=64), model)  # CPU: memory unknown, passes
    monkeypatch.setattr(planning, "_device_memory", lambda mesh_cfg, devices: 2 << 20)  # a 2 MiB device
    with pytest.raises(ConfigError, match=r"--slots/--max-len do not fit: .*4 slots x 4096 tokens"):
        _check_memory(EngineOptions(model="tiny-moe", slots=4, max_len=4096), model)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_name", ["tpu-v5e-8", "gpu-8xh100"])
def test_routed_expert_exchange_compiles_to_ragged_all_to_all(mesh_name):
    """exchange="ragged_all_to_all" on a real topology: the accelerator compilers take the
    primitive itself (XLA:CPU, where the tests compute, lacks it and uses the all-gather form)."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxspec.mesh import placement_for_mesh, topology_devices
    from jaxspec.models.moe_dispatch import dispatch
    from jaxspec.models.moe_parallel import moe_backend_for

    if mesh_name.startswith("tpu"):
        _require("libtpu", 'pip install "jax[tpu]==0.10.2"')
    else:
        _require("jax_cuda12_plugin", "pip install jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2")
    cfg = dataclasses.replace(load_mesh_config(mesh_name), moe_exchange="ragged_all_to_all")
    placement = placement_for_mesh(cfg, topology_devices(cfg))
    backend = moe_backend_for(placement)
    assert backend.exchange == "ragged_all_to_all" and backend.ep == 2
    e, d, f, n = 8, 256, 512, 64
    mesh = placement.mesh
    struct = lambda shape, dtype, *spec: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*spec)))  # noqa: E731
    args = (struct((n, d), jnp.bfloat16), struct((n, 2), jnp.int32), struct((n, 2), jnp.float32),
            struct((e, d, f), jnp.bfloat16, "expert", None, "tensor"), struct((e, d, f), jnp.bfloat16, "expert", None, "tensor"),
            struct((e, f, d), jnp.bfloat16, "expert", "tensor", None))
    with jax.default_matmul_precision("default"):
        compiled = jax.jit(lambda *a: dispatch(*a, backend=backend)).lower(*args).compile()
    hlo = compiled.as_text()
    assert hlo.count("ragged-all-to-all") >= 3, "rows out, expert ids out, results back"
    assert compiled.memory_analysis().temp_size_in_bytes > 0


def test_moe_exchange_is_a_mesh_setting(tmp_path):
    import json

    from jaxspec.mesh import MeshConfigError, placement_for_mesh
    from jaxspec.models.moe_parallel import moe_backend_for

    data = json.loads((Path(__file__).parents[1] / "configs/meshes/cpu-8.json").read_text())
    path = tmp_path / "cpu-8-routed.json"
    path.write_text(json.dumps({**data, "moe_exchange": "ragged_all_to_all"}))
    cfg = load_mesh_config(path)
    assert moe_backend_for(placement_for_mesh(cfg)).exchange == "ragged_all_to_all"
    assert moe_backend_for(placement_for_mesh(load_mesh_config("cpu-8"))).exchange == "psum"  # the default
    path.write_text(json.dumps({**data, "moe_exchange": "alltoall"}))
    with pytest.raises(MeshConfigError, match="moe_exchange must be one of .*'alltoall'"):
        load_mesh_config(path)


def test_draft_replicated_only_while_it_and_its_cache_are_small():
    """Qwen3-0.6B (1.1 GiB of bf16 weights) with a cache for 8 x 4096 tokens: 1.1 + 3.5 / 2 (slots
    over data 2) = 2.9 GiB per device if replicated. Fine on an 80 GiB device, too much on a 16 GiB
    one (10%) or where the memory is unknown (2 GiB)."""
    from jaxspec.mesh import draft_placement, param_bytes, placement_for_mesh

    placement = placement_for_mesh(load_mesh_config("cpu-8"))
    draft = load_config("qwen3-0.6b")
    assert 1.0 < param_bytes(draft) / 2**30 < 1.2
    replicated = lambda p: p.rules["heads"] is None and p.rules["vocab"] is None  # noqa: E731
    assert replicated(draft_placement(draft, placement))  # weights alone: small
    assert replicated(draft_placement(draft, placement, 8, 4096, hbm_bytes=80 << 30))
    assert draft_placement(draft, placement, 8, 4096, hbm_bytes=16 << 30) is placement
    assert draft_placement(draft, placement, 8, 4096) is placement
    assert replicated(draft_placement(draft, placement, 8, 512, hbm_bytes=16 << 30))  # a short cache fits 10%


def test_paged_plan_counts_pages_and_matches_a_placed_paged_runner():
    cfg = load_config("tiny-qwen3-moe").replace(**MOE)
    mesh_cfg = load_mesh_config("cpu-8")
    plan = plan_memory(cfg, mesh_cfg, 16, 64, devices=jax.devices(), compile=False, paging=(24, 8))
    from jaxspec.mesh import Placement, build_mesh

    runner = ModelRunner(create_model(cfg), 16, 64, page_size=8, num_pages=24,
                         placement=Placement.create(build_mesh(mesh_cfg, jax.devices()), mesh_cfg.rules))
    on_device0 = lambda arrays: sum(  # noqa: E731
        s.data.nbytes for a in arrays for s in a.addressable_shards if s.device == jax.devices()[0])
    c = runner.cache
    assert plan.kv_cache == on_device0([a for a in c if a is not None])
    assert plan.cache_positions == 24 * 8
    assert "24 pages x 8 = 192 positions (16 slots of up to 64)" in plan.table()


def test_compiler_out_of_memory_is_a_does_not_fit_verdict(monkeypatch):
    from jaxspec import planning

    message = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
               "Used 104.60G of 15.48G hbm. Exceeded hbm capacity by 89.12G.")

    def steps(*args, **kwargs):
        def boom():
            raise RuntimeError(message)
        return {"prefill 1x64": boom, "decode 8": lambda: None}

    monkeypatch.setattr(planning, "_compile_steps", steps)
    monkeypatch.setattr(planning, "_step_bytes", lambda compiled: 1000)
    cfg = load_config("tiny-qwen3-moe").replace(**MOE)
    big = dataclasses.replace(load_mesh_config("cpu-8"), hbm_bytes_per_device=16 * 2**30)
    plan = plan_memory(cfg, big, 8, 64, devices=jax.devices())
    assert not plan.fits
    assert plan.temp_by_step["prefill 1x64"] == int(104.60 * 2**30)
    with pytest.raises(DoesNotFit, match=r"ran out of device memory for prefill 1x64 \(needs 104.60 GiB of 15.48 GiB\)"
                                         r".*chunked prefill \(--max-step-tokens\) bounds"):
        check_fits(cfg, big, 8, 64, devices=jax.devices())
    from jaxspec.planning import _out_of_memory

    other = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
             "(104.60G) exceeds available HBM (95.74G).")
    assert _out_of_memory(RuntimeError(other)) == (int(104.60 * 2**30), "needs 104.60 GiB of 95.74 GiB")
    # Any other compile failure is still an error, not a verdict.
    monkeypatch.setattr(planning, "_compile_steps", lambda *a, **k: {"decode 8": lambda: 1 / 0})
    with pytest.raises(ZeroDivisionError):
        plan_memory(cfg, big, 8, 64, devices=jax.devices())


def test_chunked_prefill_plans_the_chunk_step():
    cfg = load_config("tiny-qwen3-moe").replace(**MOE)
    steps = []
    plan = plan_memory(cfg, load_mesh_config("cpu-8"), 8, 64, devices=jax.devices(), prefill_chunk=16,
                       on_step=lambda name, b: steps.append(name))
    assert steps == ["prefill chunk 1x16", "decode 8"]
    assert plan.prefill_chunk == 16 and plan.fits
