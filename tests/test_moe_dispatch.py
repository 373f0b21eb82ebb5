"""Every single-device MoE dispatch backend computes the same mixture as the dense reference,
including when most experts are chosen by no token (the case ``per_expert`` skips)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import moe_backend
from jaxspec.models.moe_dispatch import BACKENDS, choose_backend, dispatch_dense

E, D, F, K = 8, 16, 24, 2


def _problem(n: int, seed: int, experts: int = E):
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.normal(size=(n, D)), jnp.float32)
    ids = jnp.asarray(np.stack([r.choice(experts, K, replace=False) for _ in range(n)]), jnp.int32)
    w = jnp.asarray(r.dirichlet(np.ones(K), size=n), jnp.float32)
    w_gate, w_up = (jnp.asarray(r.normal(size=(E, D, F)) / 4, jnp.float32) for _ in range(2))
    w_down = jnp.asarray(r.normal(size=(E, F, D)) / 4, jnp.float32)
    return x, ids, w, w_gate, w_up, w_down


@pytest.mark.parametrize("backend", ["per_expert", "per_expert_static", "expert_rows", "expert_chunks", "sorted", "ragged",
                                     "cpu_fused"])
@pytest.mark.parametrize("n,experts", [(1, E), (5, E), (3, 3), (40, E)])
def test_backend_matches_dense(backend, n, experts):
    args = _problem(n, seed=n + experts, experts=experts)
    got = jax.jit(moe_backend(backend))(*args)
    np.testing.assert_allclose(got, dispatch_dense(*args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_expert_chunks_cover_every_row_whatever_the_chunk(chunk):
    """Chunks that run past an expert's rows (into the next expert's, or the zero rows at the end),
    several chunks per expert, and ids outside [0, E) (padding, other devices' experts) that
    count for no expert."""
    from jaxspec.models.moe_dispatch import dispatch_expert_chunks

    x, ids, w, w_gate, w_up, w_down = _problem(40, seed=3, experts=E)
    ids = ids.at[:10, 0].set(0).at[5, 1].set(E).at[7, 0].set(-1)  # expert 0 crowded; two ids for none
    w = jnp.where((ids >= 0) & (ids < E), w, 0.0)
    got = jax.jit(functools.partial(dispatch_expert_chunks, chunk=chunk))(x, ids, w, w_gate, w_up, w_down)
    valid = (ids >= 0) & (ids < E)
    want = dispatch_dense(x, jnp.where(valid, ids, 0), jnp.where(valid, w, 0.0), w_gate, w_up, w_down)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["per_expert", "expert_rows"])
def test_per_expert_gradients_match_dense(backend):
    x, ids, w, *weights = _problem(6, seed=3, experts=4)  # experts 4..7 unchosen: skipped branches
    loss = lambda fn: lambda x, w, *ws: jnp.sum(jnp.sin(fn(x, ids, w, *ws)))  # noqa: E731
    got = jax.grad(loss(BACKENDS[backend]), argnums=(0, 1, 2, 3, 4))(x, w, *weights)
    ref = jax.grad(loss(dispatch_dense), argnums=(0, 1, 2, 3, 4))(x, w, *weights)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(got[2])[4:]).max() == 0.0  # unchosen experts get no gradient


def test_auto_on_cpu_picks_per_expert_for_decode_sizes_and_sorted_for_prefill():
    assert choose_backend("auto", 1, platform="cpu") == "per_expert"
    assert choose_backend("auto", 9, platform="cpu") == "per_expert"
    assert choose_backend("auto", 512, platform="cpu") == "expert_chunks"


def test_auto_on_cpu_computes_every_expert_where_a_step_routes_about_as_many_rows_as_experts():
    from jaxspec.models.moe_dispatch import CPU_DENSE_MAX_ROWS_PER_EXPERT as most

    cpu = dict(platform="cpu", top_k=2, num_experts=8)
    assert choose_backend("auto", 3, **cpu) == "per_expert"  # 6 rows: fewer than the experts
    assert choose_backend("auto", 4, **cpu) == "dense"  # 8 rows: every expert is read anyway
    assert choose_backend("auto", 40, **cpu) == "dense"  # a 5-token verification of 8 rows
    assert choose_backend("auto", most * 4, **cpu) == "dense"
    assert choose_backend("auto", most * 4 + 1, **cpu) == "per_expert"
    assert choose_backend("auto", 512, **cpu) == "expert_chunks"
    # Quantized experts stay on per_expert (dense would dequantize them one expert at a time),
    # and accelerators keep their grouped matmuls.
    assert choose_backend("auto", 8, kernel="gmm_int8", **cpu) == "per_expert"
    assert choose_backend("auto", 8, platform="gpu", top_k=2, num_experts=8) == "ragged"
    from pathlib import Path

    kernels_md = " ".join((Path(__file__).resolve().parents[1] / "docs" / "kernels.md").read_text().split())
    assert most == 12 and "from as many rows as experts up to 12 per expert" in kernels_md


def test_dispatch_table_picks_the_fastest_measured_backend_per_token_count():
    from jaxspec.models.moe_tuning import table_from_times

    table = table_from_times({1: {"per_expert": 2.0, "expert_rows": 3.0}, 8: {"per_expert": 5.0, "expert_rows": 1.0}},
                             fallback="sorted")
    assert table.choices == ((1, "per_expert"), (8, "expert_rows"))
    assert [table.backend_for(n) for n in (1, 2, 8, 9)] == ["per_expert", "expert_rows", "expert_rows", "sorted"]
    args = _problem(5, seed=7, experts=E)
    np.testing.assert_allclose(jax.jit(table)(*args), dispatch_dense(*args), atol=1e-5, rtol=1e-5)
    assert hash(table) == hash(table_from_times({1: {"per_expert": 1.0}, 8: {"expert_rows": 1.0}}, "sorted"))


def test_tuned_table_fallback_keeps_quantized_experts_off_unvalidated_kernels(monkeypatch):
    """Beyond its measured counts a table resolves ``auto`` for the experts' format and routed rows."""
    from jaxspec.models.moe_tuning import DispatchTable

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    table = DispatchTable(((8, "per_expert"),), fallback="auto")
    assert table.backend_for(4096, top_k=2, kernel="gmm") == "pallas"  # validated on gpu, above the crossover
    assert table.backend_for(4096, top_k=2, kernel="gmm_int8") == "ragged"  # not validated on hardware
    assert table.backend_for(4096, top_k=2, kernel="gmm_int4") == "ragged"
    assert table.backend_for(16, top_k=2, kernel="gmm") == "ragged"  # below the measured crossover


@pytest.mark.parametrize("backend", ["dense", "per_expert", "per_expert_static", "expert_rows", "expert_chunks", "sorted",
                                     "cpu_fused"])
def test_every_backend_takes_experts_held_per_expert(backend):
    """Weights held per expert (``ExpertSlices``, as a measured CPU runner holds them) give exactly
    what the stacked weights give: slice backends read the parts, the others the stacked array."""
    from jaxspec.models.expert_slices import ExpertSlices
    from jaxspec.models.moe_dispatch import SLICE_BACKENDS, dispatch, run_backend

    x, ids, w, *weights = _problem(12, seed=5)
    held = [ExpertSlices([a[e] for e in range(E)], a) for a in weights]
    want = jax.jit(moe_backend(backend))(x, ids, w, *weights)
    got = jax.jit(functools.partial(run_backend, backend))(x, ids, w, *held)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(jax.jit(functools.partial(dispatch, backend=backend))(x, ids, w, *held), want)
    assert ("per_expert_static" in SLICE_BACKENDS and "expert_chunks" in SLICE_BACKENDS
            and "dense" not in SLICE_BACKENDS and "sorted" not in SLICE_BACKENDS)


def test_a_slice_backend_reads_the_parts_not_the_stacked_array():
    """Inside a step, ``per_expert_static`` on held weights multiplies by the per-expert arrays: the
    stacked one is never read (given NaNs, the output stays finite), while ``dense`` reads it."""
    from jaxspec.models.expert_slices import ExpertSlices
    from jaxspec.models.moe_dispatch import run_backend

    x, ids, w, *weights = _problem(4, seed=6)
    poisoned = [ExpertSlices([a[e] for e in range(E)], jnp.full_like(a, jnp.nan)) for a in weights]
    ok = jax.jit(functools.partial(run_backend, "per_expert_static"))(x, ids, w, *poisoned)
    np.testing.assert_allclose(ok, dispatch_dense(x, ids, w, *weights), atol=1e-5, rtol=1e-5)
    assert np.isnan(np.asarray(jax.jit(functools.partial(run_backend, "dense"))(x, ids, w, *poisoned))).all()
