"""Paged attention kernel (pallas_kernels/paged_attention.py) vs its reference and cached_attention.

Interpret mode on CPU. Page tables and query positions are runtime values, so one
compile per (shape, variant) covers many layouts: every row at a different length
(the first T tokens, page and block boundaries +-1, the full kv_len), a padding row
(positions -1), a partly padded prefill chunk, shuffled pages drawn from a shared pool,
pages allocated ahead of the row's position, and unallocated entries holding the
sentinel P or -1. float32 within 1e-5 (online softmax over blocks vs one softmax),
bfloat16 within 2e-2. The heavy ahead-of-time compiles at Mixtral / Qwen3 sizes are
marked slow (they need libtpu and the jax-cuda12 plugin, see test_kernel_aot.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.models.layers import cached_attention
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.paged_attention_reference import gather_pages, paged_attention_reference, sees_a_key
from helpers import interpret_for
from test_kernel_aot import _compile, gpu_device, tpu_device  # noqa: F401  (the AOT fixtures: libtpu, H100 target)

# As in test_kernel_attention: interpreted kernels compile to large XLA:CPU programs, optimisation buys nothing.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


@functools.lru_cache(maxsize=None)
def kernel(backend: str, kv_len: int, window: int | None, block_kv: int | None, block_rows: int | None):
    return jit(functools.partial(
        paged_attention, kv_len=kv_len, sliding_window=window, backend=backend, block_kv=block_kv,
        block_rows=block_rows, interpret=interpret_for(backend),
    ))


@functools.lru_cache(maxsize=None)
def reference(kv_len: int, window: int | None):
    return jit(functools.partial(paged_attention_reference, kv_len=kv_len, sliding_window=window))


_cached_attention = jit(cached_attention, static_argnums=4)
_gather = jit(gather_pages, static_argnums=2)


def pool(num_pages, page_size, kvh, dh, dtype, rng):
    k = jnp.asarray(rng.standard_normal((num_pages, page_size, kvh, dh)), dtype)
    v = jnp.asarray(rng.standard_normal((num_pages, page_size, kvh, dh)), dtype)
    return k, v


def layout(lengths, t, n_pages, page_size, num_pages, rng, *, ahead=1, chunk=None):
    """Page table and positions for rows whose caches hold ``lengths`` keys after this step.

    Pages come from a shuffled pool (rows interleaved); each row also holds up to ``ahead``
    pages allocated past its last position; other entries are the sentinel ``num_pages`` or -1.
    Length 0 is a padding row (positions -1). ``chunk``: only the first ``chunk`` of the T
    queries are real, the rest are padding (-1).
    """
    b = len(lengths)
    perm = iter(rng.permutation(num_pages))
    table = rng.choice([num_pages, -1], size=(b, n_pages)).astype(np.int32)
    pos = np.full((b, t), -1, np.int32)
    for row, length in enumerate(lengths):
        real = t if chunk is None else chunk
        if length:
            pos[row, :real] = length - real + np.arange(real)
        allocated = min(n_pages, -(-length // page_size) + (ahead if length else 0))
        for j in range(allocated):
            table[row, j] = next(perm)
    return jnp.asarray(table), jnp.asarray(pos)


def lengths_to_test(kv_len, t, page_size, block_kv):
    block_kv = block_kv or kv_len
    cands = {t, t + 1, page_size - 1, page_size, page_size + 1, block_kv - 1, block_kv + t, kv_len - 1, kv_len}
    return sorted(c for c in cands if t <= c <= kv_len)


def layouts(b, kv_len, t, n_pages, page_size, num_pages, block_kv, seed):
    """Each interesting length visits each row; then a padding row and a partly padded chunk."""
    rng = np.random.default_rng(seed)
    lens = lengths_to_test(kv_len, t, page_size, block_kv)
    for shift in range(len(lens)):
        yield layout([lens[(shift + i) % len(lens)] for i in range(b)], t, n_pages, page_size, num_pages, rng)
    mixed = [0] + [lens[(i * 3) % len(lens)] for i in range(1, b)]
    yield layout(mixed, t, n_pages, page_size, num_pages, rng, ahead=2)
    if t > 2:
        yield layout(mixed, t, n_pages, page_size, num_pages, rng, chunk=t // 2 + 1)


def tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)


def as_f32(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32))


CASES = [
    # backend, B, T, H, KVH, Dh, page_size, n_pages, kv_len, block_kv, block_rows, window, dtype
    ("tpu", 3, 1, 4, 4, 32, 16, 6, 96, 32, None, None, jnp.float32),  # decode, no grouping (G = 1)
    ("tpu", 3, 5, 8, 2, 64, 16, 6, 80, 32, None, None, jnp.float32),  # verification, G = 4, table wider than kv_len
    ("tpu", 3, 16, 8, 2, 64, 16, 6, 96, 48, 16, 20, jnp.float32),  # prefill chunk: 4 row tiles, sliding window
    ("tpu", 3, 5, 8, 2, 64, 16, 6, 96, 32, None, None, jnp.bfloat16),
    ("gpu", 3, 1, 4, 4, 32, 16, 6, 96, 32, None, None, jnp.float32),
    ("gpu", 3, 5, 8, 2, 64, 16, 6, 80, 32, None, 9, jnp.float32),
    ("gpu", 3, 16, 8, 2, 64, 16, 6, 96, 48, 16, None, jnp.bfloat16),
]


def _case_id(case):
    backend, b, t, h, kvh, dh, ps, npg, kv_len, bkv, brows, window, dtype = case
    return f"{backend}-T{t}-G{h // kvh}-w{window}-{jnp.dtype(dtype).name}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_reference_and_cached_attention(case):
    backend, b, t, h, kvh, dh, ps, npg, kv_len, block_kv, block_rows, window, dtype = case
    rng = np.random.default_rng(dh + t)
    num_pages = b * npg + 1  # a spare page: the sentinel clamps onto a page nobody owns
    k_pages, v_pages = pool(num_pages, ps, kvh, dh, dtype, rng)
    q = jnp.asarray(rng.standard_normal((b, t, h, dh)), dtype)
    f = kernel(backend, kv_len, window, block_kv, block_rows)
    # block_kv=48 is three pages per block: the last block of kv_len=96 is whole, of 80 it is partial.
    for table, pos in layouts(b, kv_len, t, npg, ps, num_pages, block_kv, seed=t):
        out = f(q, k_pages, v_pages, table, pos)
        assert out.dtype == dtype and out.shape == q.shape
        want = reference(kv_len, window)(q, k_pages, v_pages, table, pos)
        msg = f"positions={np.asarray(pos).tolist()}"
        np.testing.assert_allclose(as_f32(out), as_f32(want), **tolerance(dtype), err_msg=msg)
        # The reference is cached_attention on the gathered K/V wherever a query sees a key, zeros elsewhere.
        seen = np.asarray(sees_a_key(pos, kv_len, window))
        k, v = _gather(k_pages, table, kv_len), _gather(v_pages, table, kv_len)
        contiguous = as_f32(_cached_attention(q, k, v, pos, window))
        np.testing.assert_allclose(as_f32(want)[seen], contiguous[seen], rtol=1e-6, atol=1e-6, err_msg=msg)
        assert np.all(as_f32(out)[~seen] == 0), msg


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_page_table_decides_where_keys_live(backend):
    """Swapping a row's first page with its last, partly visible one (attention is invariant to the order of
    fully visible keys, not to which keys the mask hides) changes that row's result, and only it; permuting
    the pool together with the table changes nothing."""
    b, t, h, kvh, dh, ps, npg, kv_len = 2, 5, 8, 2, 32, 16, 4, 64
    rng = np.random.default_rng(7)
    num_pages = b * npg + 1
    k_pages, v_pages = pool(num_pages, ps, kvh, dh, jnp.float32, rng)
    q = jnp.asarray(rng.standard_normal((b, t, h, dh)), jnp.float32)
    table, pos = layout([60, 45], t, npg, ps, num_pages, rng)
    f = kernel(backend, kv_len, None, 32, None)
    out = np.asarray(f(q, k_pages, v_pages, table, pos))

    swapped = table.at[0, 0].set(table[0, 3]).at[0, 3].set(table[0, 0])  # row 0: positions 55..59
    out_swapped = np.asarray(f(q, k_pages, v_pages, swapped, pos))
    assert np.max(np.abs(out_swapped[0] - out[0])) > 1e-2
    np.testing.assert_array_equal(out_swapped[1], out[1])
    np.testing.assert_allclose(
        out_swapped, np.asarray(reference(kv_len, None)(q, k_pages, v_pages, swapped, pos)), rtol=1e-5, atol=1e-5
    )

    perm = rng.permutation(num_pages)  # page p moves to slot perm[p]
    inverse = np.argsort(perm)
    moved = jnp.asarray(np.where((table >= 0) & (table < num_pages), perm[np.clip(table, 0, num_pages - 1)], table))
    out_moved = np.asarray(f(q, k_pages[inverse], v_pages[inverse], moved, pos))
    np.testing.assert_allclose(out_moved, out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,window", [("tpu", None), ("tpu", 20), ("gpu", None), ("gpu", 20)])
def test_hidden_pages_are_never_read(backend, window):
    """NaN in every page no query can see (allocated ahead, before the window, unallocated, the spare page
    the sentinel clamps onto) cannot reach the output: those pages were never read (0 * NaN = NaN)."""
    b, t, h, kvh, dh, ps, npg, kv_len = 3, 5, 8, 2, 32, 16, 8, 128
    rng = np.random.default_rng(11)
    num_pages = b * npg + 1
    k_pages, v_pages = pool(num_pages, ps, kvh, dh, jnp.float32, rng)
    q = jnp.asarray(rng.standard_normal((b, t, h, dh)), jnp.float32)
    table, pos = layout([0, 40, 84], t, npg, ps, num_pages, rng, ahead=3)  # window 20: row 2 sees from page 3
    want = np.asarray(reference(kv_len, window)(q, k_pages, v_pages, table, pos))
    visible = set()
    for row in range(b):
        p = np.asarray(pos[row])
        if p.max() < 0:
            continue
        first = 0 if window is None else max(0, p.min() - window + 1)
        visible |= {int(table[row, j]) for j in range(first // ps, p.max() // ps + 1)}
    hidden = np.array(sorted(set(range(num_pages)) - visible))
    assert len(hidden) > num_pages // 2
    k_bad, v_bad = k_pages.at[hidden].set(jnp.nan), v_pages.at[hidden].set(jnp.nan)
    # block_kv=32 (two pages): blocks straddle the visible range's ends, so partial blocks are exercised.
    out = np.asarray(kernel(backend, kv_len, window, 32, None)(q, k_bad, v_bad, table, pos))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    assert np.all(out[0] == 0)  # the padding row


def test_defaults_on_cpu_and_validation():
    b, t, h, kvh, dh, ps, npg, kv_len = 2, 5, 4, 2, 24, 16, 4, 64
    rng = np.random.default_rng(3)
    k_pages, v_pages = pool(b * npg + 1, ps, kvh, dh, jnp.float32, rng)
    q = jnp.asarray(rng.standard_normal((b, t, h, dh)), jnp.float32)
    table, pos = layout([64, 9], t, npg, ps, b * npg + 1, rng)
    # backend=None and interpret=None: the TPU variant in the interpreter on a CPU; default blocks.
    out = jit(functools.partial(paged_attention, kv_len=kv_len))(q, k_pages, v_pages, table, pos)
    want = reference(kv_len, None)(q, k_pages, v_pages, table, pos)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)

    args = (q, k_pages, v_pages, table, pos)
    with pytest.raises(ValueError, match="kv_len=40 must be a positive multiple of page_size=16"):
        paged_attention(*args, kv_len=40)
    with pytest.raises(ValueError, match="kv_len=80"):
        paged_attention(*args, kv_len=80)  # more than the table's 4 pages
    with pytest.raises(ValueError, match="block_kv=24"):
        paged_attention(*args, kv_len=kv_len, block_kv=24, backend="tpu")
    with pytest.raises(ValueError, match="illegal TPU block_rows=4"):
        paged_attention(*args, kv_len=kv_len, block_rows=4, backend="tpu")
    with pytest.raises(ValueError, match="illegal GPU block_rows=24"):
        paged_attention(*args, kv_len=kv_len, block_rows=24, backend="gpu")
    with pytest.raises(ValueError, match="GPU page_size=8"):
        paged_attention(q, k_pages[:, :8], v_pages[:, :8], table, pos, kv_len=32, backend="gpu")
    with pytest.raises(ValueError, match="q_positions"):
        paged_attention(q, k_pages, v_pages, table, pos[:, :2], kv_len=kv_len)
    with pytest.raises(ValueError, match="page_table"):
        paged_attention(q, k_pages, v_pages, table[:1], pos, kv_len=kv_len)
    with pytest.raises(ValueError, match="kv_len"):
        paged_attention_reference(q, k_pages, v_pages, table, pos, 40)


def test_tpu_splits_batches_whose_table_exceeds_smem(monkeypatch):
    """Past TPU_MAX_TABLE_ENTRIES table entries the TPU variant runs the batch in several calls."""
    import pallas_kernels.paged_attention as module

    b, t, h, kvh, dh, ps, npg, kv_len = 5, 5, 8, 2, 32, 16, 4, 64
    rng = np.random.default_rng(5)
    k_pages, v_pages = pool(b * npg + 1, ps, kvh, dh, jnp.float32, rng)
    q = jnp.asarray(rng.standard_normal((b, t, h, dh)), jnp.float32)
    table, pos = layout([64, 0, 17, 40, 5], t, npg, ps, b * npg + 1, rng)
    monkeypatch.setattr(module, "TPU_MAX_TABLE_ENTRIES", 2 * npg)  # 2 rows per call: 3 calls
    fn = functools.partial(paged_attention, kv_len=kv_len, backend="tpu", block_kv=32, interpret=True)
    assert str(jax.make_jaxpr(fn)(q, k_pages, v_pages, table, pos)).count("pallas_call") == 3
    out = jit(fn)(q, k_pages, v_pages, table, pos)
    want = reference(kv_len, None)(q, k_pages, v_pages, table, pos)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_self_check_passes_and_catches_a_wrong_kernel():
    from jaxspec import kernels

    ok = kernels.check_paged_attention(8, 2, 32, [2], [1, 5], 64, page_size=16, interpret=True)
    assert ok.ok, ok.detail

    def ignores_table(q, k_pages, v_pages, page_table, q_positions, kv_len, sliding_window=None, **kw):
        contiguous = jnp.broadcast_to(jnp.arange(page_table.shape[1], dtype=jnp.int32), page_table.shape)
        return paged_attention(q, k_pages, v_pages, contiguous, q_positions, kv_len, sliding_window, **kw)

    bad = kernels.check_paged_attention(8, 2, 32, [2], [5], 64, page_size=16, interpret=True, impl=ignores_table)
    assert bad.kernel == "paged_attention" and not bad.ok and "relative error" in bad.detail


def _mixtral_step(t, dtype, page_size=16, pages_per_row=64, rows=8, kv_heads=8, pool_rows=None):
    """Arguments of one layer's paged attention: 32 query heads, head_dim 128, a pool of ``pool_rows`` rows' pages."""
    num_pages = (pool_rows or rows) * pages_per_row
    pages = ((num_pages, page_size, kv_heads, 128), dtype)
    return [((rows, t, 32, 128), dtype), pages, pages, ((rows, pages_per_row), jnp.int32), ((rows, t), jnp.int32)]


@pytest.mark.parametrize("backend,platform,marker", [("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", "triton")])
@pytest.mark.parametrize("t,window,dtype", [(5, None, jnp.bfloat16), (16, 4096, jnp.float32)])
def test_lowers_for_accelerators(backend, platform, marker, t, window, dtype):
    args = [jax.ShapeDtypeStruct(shape, dt) for shape, dt in _mixtral_step(t, dtype)]
    fn = functools.partial(paged_attention, kv_len=1024, sliding_window=window, backend=backend, interpret=False)
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))
    assert marker in lowered.as_text()


# Mixtral-8x7B (8 kv heads) and Qwen3-30B-A3B (4 kv heads): 32 query heads, head_dim 128, batch 8, 64 pages per row.
AOT_CASES = [
    # model kv heads, T, page_size, window, dtype
    (8, 1, 16, None, jnp.bfloat16),
    (8, 5, 16, None, jnp.bfloat16),
    (4, 1, 16, None, jnp.bfloat16),
    (4, 5, 16, None, jnp.bfloat16),
    (8, 16, 16, 512, jnp.bfloat16),  # a prefill chunk with a sliding window
    (4, 128, 16, None, jnp.bfloat16),  # a longer chunk: 1024 query rows, several row tiles
    (4, 5, 64, None, jnp.bfloat16),  # larger pages
    (8, 5, 16, None, jnp.float32),
]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tpu", "gpu"])
def test_compiles_for_real_shapes(variant, request, capsys):
    """Full compiles (Mosaic for TPU v5e, Triton + ptxas for H100). The pool is read in place: the same step
    over a pool 4x larger needs exactly the same temporaries (a relayout copy of the pool would grow), and on
    TPU none at all (no gathered K/V either). The GPU variant's temporaries are q and the output, transposed
    and padded to power-of-two rows."""
    device = request.getfixturevalue(f"{variant}_device")
    lines = []
    for kv_heads, t, page_size, window, dtype in AOT_CASES:
        pages_per_row = 1024 // page_size
        fn = functools.partial(paged_attention, kv_len=1024, sliding_window=window, backend=variant, interpret=False)
        stats, bigger = (
            _compile(fn, device, *_mixtral_step(t, dtype, page_size, pages_per_row, kv_heads=kv_heads,
                                                pool_rows=pool_rows)).memory_analysis()
            for pool_rows in (8, 32)
        )
        pool_bytes = 8 * 1024 * kv_heads * 128 * jnp.dtype(dtype).itemsize
        assert stats.argument_size_in_bytes >= 2 * pool_bytes
        assert bigger.argument_size_in_bytes >= 8 * pool_bytes
        assert bigger.temp_size_in_bytes == stats.temp_size_in_bytes, (kv_heads, t, page_size)
        assert variant == "gpu" or stats.temp_size_in_bytes == 0, (kv_heads, t, page_size)
        lines.append(
            f"{variant} KVH={kv_heads} T={t} page={page_size} window={window} {jnp.dtype(dtype).name}: "
            f"args {stats.argument_size_in_bytes / 2**20:.1f} MiB, out {stats.output_size_in_bytes / 2**10:.0f} KiB, "
            f"temp {stats.temp_size_in_bytes / 2**10:.0f} KiB"
        )
    with capsys.disabled():
        print("\n" + "\n".join(lines))
