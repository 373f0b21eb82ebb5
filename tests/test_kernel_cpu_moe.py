"""The CPU MoE kernel (cpu_kernels/moe_ffn.cc) against its jax.numpy reference, and its build.

Outputs are float32 sums of 16-512 products: within rtol 1e-5 / atol 1e-5 of the reference at
HIGHEST precision. A row's result must not depend on the other rows of the call (bitwise), which
the engine's exactness between decode and verification steps relies on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpu_kernels import moe_ffn as kernel_module
from cpu_kernels import native
from cpu_kernels.moe_ffn_reference import moe_ffn_reference
from helpers import require_cpu_kernel

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def _built():
    require_cpu_kernel(kernel_module)


def _problem(n, e, d, f, k, seed=0):
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.normal(size=(n, d)), jnp.float32)
    ids = jnp.asarray(np.stack([r.choice(e, k, replace=False) for _ in range(n)]), jnp.int32)
    w = jnp.asarray(r.random((n, k)), jnp.float32)
    w_gate, w_up = (jnp.asarray(r.normal(size=(e, d, f)) / np.sqrt(d), jnp.float32) for _ in range(2))
    w_down = jnp.asarray(r.normal(size=(e, f, d)) / np.sqrt(f), jnp.float32)
    return x, ids, w, w_gate, w_up, w_down


moe_ffn = jax.jit(kernel_module.moe_ffn)


# Widths that are whole 64-column blocks and ones that end in a partial block (100, 70, 16); row
# counts covering each register-block remainder (1-5) and several blocks (13, 40); top-1 to top-3.
@pytest.mark.parametrize("n,e,d,f,k", [(1, 8, 256, 512, 2), (5, 8, 128, 192, 2), (13, 4, 100, 70, 2),
                                       (40, 8, 64, 128, 2), (3, 3, 16, 16, 3), (7, 6, 192, 384, 1)])
def test_matches_the_reference(n, e, d, f, k):
    args = _problem(n, e, d, f, k, seed=n)
    np.testing.assert_allclose(moe_ffn(*args), moe_ffn_reference(*args), **TOL)


def test_a_row_gets_the_same_bits_alone_as_in_any_batch():
    x, ids, w, *ws = _problem(23, 8, 128, 256, 2, seed=1)
    full = np.asarray(moe_ffn(x, ids, w, *ws))
    for lo, hi in [(0, 1), (4, 5), (3, 9), (10, 23), (22, 23)]:
        np.testing.assert_array_equal(np.asarray(moe_ffn(x[lo:hi], ids[lo:hi], w[lo:hi], *ws)), full[lo:hi])
    # The same rows in another order: each keeps its bits.
    perm = np.random.default_rng(0).permutation(23)
    np.testing.assert_array_equal(np.asarray(moe_ffn(x[perm], ids[perm], w[perm], *ws)), full[perm])


def test_ids_outside_the_experts_add_nothing():
    x, ids, w, *ws = _problem(6, 4, 64, 64, 2, seed=2)
    pad = np.array([False, True, False, False, True, False])
    ids_p = jnp.where(pad[:, None], 4, ids).at[2, 1].set(-1)
    got = np.asarray(moe_ffn(x, ids_p, w, *ws))
    np.testing.assert_array_equal(got[pad], 0.0)
    np.testing.assert_allclose(got, moe_ffn_reference(x, ids_p, w, *ws), **TOL)
    # Row 2 keeps only its first expert's term.
    np.testing.assert_allclose(got[2], moe_ffn_reference(x[2:3], ids[2:3, :1], w[2:3, :1], *ws)[0], **TOL)


def test_experts_no_row_chose_are_never_read():
    x, ids, w, w_gate, w_up, w_down = _problem(5, 8, 64, 128, 2, seed=3)
    ids = ids % 3  # experts 0-2 only (a row may now name one expert twice: both terms count)
    poison = lambda a: a.at[3:].set(jnp.nan)  # noqa: E731
    got = moe_ffn(x, ids, w, poison(w_gate), poison(w_up), poison(w_down))
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, moe_ffn_reference(x, ids, w, w_gate, w_up, w_down), **TOL)


def test_silu_holds_for_large_and_small_activations():
    """The kernel's exp is its own polynomial: gate products far into both tails, and zero."""
    x, ids, w, w_gate, w_up, w_down = _problem(4, 2, 16, 64, 1, seed=4)
    x = x * jnp.asarray([[100.0], [-100.0], [0.0], [1e-3]], jnp.float32)
    got = moe_ffn(x, ids, w, w_gate, w_up, w_down)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, moe_ffn_reference(x, ids, w, w_gate, w_up, w_down), rtol=1e-5, atol=1e-3)


def test_bad_inputs_name_the_problem():
    x, ids, w, w_gate, w_up, w_down = _problem(2, 4, 16, 16, 2)
    with pytest.raises(TypeError, match="float32.*w_up is bfloat16"):
        kernel_module.moe_ffn(x, ids, w, w_gate, w_up.astype(jnp.bfloat16), w_down)
    with pytest.raises(ValueError, match=r"expert weights must be \[E, 16, F\]"):
        kernel_module.moe_ffn(x, ids, w, w_gate, w_up, w_down[:, :8])
    with pytest.raises(ValueError, match=r"must both be \[2, k\]"):
        kernel_module.moe_ffn(x, ids[:, :1], w, w_gate, w_up, w_down)


def test_the_build_is_cached_per_source_and_reports_why_it_cannot_build(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSPEC_NATIVE_CACHE", str(tmp_path))
    first = native.build("moe_ffn")
    assert first.parent == tmp_path and first.exists()
    stamp = first.stat().st_mtime_ns
    assert native.build("moe_ffn") == first and first.stat().st_mtime_ns == stamp  # read back, not rebuilt
    assert not list(tmp_path.glob("*.so.tmp*")) and len(list(tmp_path.iterdir())) == 1
    monkeypatch.setattr(native, "compiler", lambda: None)
    with pytest.raises(native.BuildError, match="no C\\+\\+ compiler"):
        native.build("moe_ffn")
    with pytest.raises(native.BuildError, match="missing"):
        native.build("no_such_kernel")


def test_a_failed_build_says_what_the_compiler_said(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSPEC_NATIVE_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE_DIR", tmp_path)
    with pytest.raises(native.BuildError, match="(?s)failed:.*error"):
        native.build("broken")
    assert not list((tmp_path / "cache").glob("*"))  # no half-written library left behind
