"""Expert-parallel MoE dispatch (jaxspec.models.moe_parallel) equals the single-device dense dispatch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxspec.config import load_config
from jaxspec.mesh import EP_TP_RULES, MeshConfigError, Placement, check_placement
from jaxspec.models.moe_dispatch import dispatch, dispatch_dense
from jaxspec.models.moe_parallel import ExpertLayoutError, ExpertParallel, moe_backend_for

E, D, F, K = 8, 16, 32, 2


def _mesh(data: int, expert: int, tensor: int) -> Mesh:
    devs = np.asarray(jax.devices()[: data * expert * tensor], dtype=object).reshape(data, expert, tensor)
    return Mesh(devs, ("data", "expert", "tensor"))


def _problem(n: int, seed: int = 0, only_experts: tuple[int, ...] | None = None):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, D)), jnp.float32)
    choices = np.arange(E) if only_experts is None else np.asarray(only_experts)
    ids = np.stack([rng.choice(choices, size=K, replace=False) for _ in range(n)]).astype(np.int32)
    w = rng.random((n, K)).astype(np.float32)
    w /= w.sum(-1, keepdims=True)
    weights = [jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32) for s in ((E, D, F), (E, D, F), (E, F, D))]
    return x, jnp.asarray(ids), jnp.asarray(w), weights


def _place(mesh: Mesh, x, ids, w, weights, ep_axes, tp_axes, tok_axes):
    split = tok_axes and x.shape[0] % mesh.shape[tok_axes[0]] == 0  # as the backend does: replicate when indivisible
    tok = NamedSharding(mesh, P(tok_axes[0] if split else None, None))
    ea = ep_axes[0] if ep_axes else None
    ta = tp_axes[0] if tp_axes else None
    w_sh = [NamedSharding(mesh, P(ea, None, ta)), NamedSharding(mesh, P(ea, None, ta)), NamedSharding(mesh, P(ea, ta, None))]
    return (jax.device_put(x, tok), jax.device_put(ids, tok), jax.device_put(w, tok),
            [jax.device_put(a, s) for a, s in zip(weights, w_sh)])


LAYOUTS = [  # (data, expert, tensor), expert axes, tensor axes, token axes
    pytest.param((1, 8, 1), ("expert",), (), (), id="ep8"),
    pytest.param((1, 1, 8), (), ("tensor",), (), id="tp8"),
    pytest.param((1, 2, 4), ("expert",), ("tensor",), (), id="ep2xtp4"),
    pytest.param((2, 4, 1), ("expert",), (), ("data",), id="dp2xep4"),
    pytest.param((2, 2, 2), ("expert",), ("tensor",), ("data",), id="dp2xep2xtp2"),
]


@pytest.mark.parametrize("local", ["per_expert", "dense", "grouped"])
@pytest.mark.parametrize("shape,ep_axes,tp_axes,tok_axes", LAYOUTS)
@pytest.mark.parametrize("n", [1, 16])  # 1: tokens do not split over data, replicated
def test_expert_parallel_equals_single_device(shape, ep_axes, tp_axes, tok_axes, local, n):
    mesh = _mesh(*shape)
    x, ids, w, weights = _problem(n, seed=n)
    want = dispatch_dense(x, ids, w, *weights)
    backend = ExpertParallel(mesh, ep_axes, tp_axes, tok_axes, local)
    px, pids, pw, pweights = _place(mesh, x, ids, w, weights, ep_axes, tp_axes, tok_axes)
    got = jax.jit(lambda *a: dispatch(*a, backend=backend))(px, pids, pw, *pweights)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape,ep_axes,tp_axes,tok_axes", [p for p in LAYOUTS if p.id != "tp8"])
@pytest.mark.parametrize("n", [16, 48, 6])  # 6: not divisible by ep (4 or 8 rows per group): the psum path
def test_routed_exchange_equals_single_device(shape, ep_axes, tp_axes, tok_axes, n):
    """exchange="ragged_all_to_all": each device sends exactly the rows routed to the others'
    experts and gets their results back (on CPU through the all-gather emulation)."""
    mesh = _mesh(*shape)
    x, ids, w, weights = _problem(n, seed=n + 7)
    want = dispatch_dense(x, ids, w, *weights)
    backend = ExpertParallel(mesh, ep_axes, tp_axes, tok_axes, exchange="ragged_all_to_all")
    px, pids, pw, pweights = _place(mesh, x, ids, w, weights, ep_axes, tp_axes, tok_axes)
    fn = jax.jit(lambda *a: dispatch(*a, backend=backend))
    got = fn(px, pids, pw, *pweights)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    rows_per_group = n // (shape[0] if tok_axes and n % shape[0] == 0 else 1)
    routed = rows_per_group % backend.ep == 0
    hlo = fn.lower(px, pids, pw, *pweights).as_text()
    assert ("all_gather" in hlo or "all-gather" in hlo) == routed  # the exchange (emulated on CPU) ran iff it divides


@pytest.mark.parametrize("only", [(0, 1), (6, 7), (3, 4)])
def test_routed_exchange_with_idle_devices(only):
    """All tokens go to one or two devices' experts: the other devices receive nothing, send
    everything, and the result is still exact (no capacity, nothing dropped)."""
    mesh = _mesh(1, 8, 1)
    x, ids, w, weights = _problem(32, seed=11, only_experts=only)
    want = dispatch_dense(x, ids, w, *weights)
    backend = ExpertParallel(mesh, ("expert",), (), (), exchange="ragged_all_to_all")
    px, pids, pw, pweights = _place(mesh, x, ids, w, weights, ("expert",), (), ())
    got = jax.jit(lambda *a: dispatch(*a, backend=backend))(px, pids, pw, *pweights)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_ragged_all_to_all_emulation_matches_the_primitive_contract():
    """Uneven chunks between 4 devices: row r of the result is where the contract puts it."""
    from jaxspec.models.moe_parallel import ragged_all_to_all_via_all_gather
    mesh = Mesh(np.asarray(jax.devices()[:4], dtype=object), ("x",))
    g, m = 4, 6
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 3, size=(g, g)).astype(np.int32)  # sizes[i, j]: rows device i sends to j
    operand = np.arange(g * m, dtype=np.float32).reshape(g, m) + 100  # device i's rows
    in_off = np.cumsum(sizes, axis=1) - sizes
    out_off = np.cumsum(sizes, axis=0) - sizes  # sender i lands after senders < i
    want = np.full((g, m), -1.0, np.float32)
    for i in range(g):
        for j in range(g):
            want[j, out_off[i, j]: out_off[i, j] + sizes[i, j]] = operand[i, in_off[i, j]: in_off[i, j] + sizes[i, j]]

    def body(op, io, ss, oo, rs):
        return ragged_all_to_all_via_all_gather(op[0], jnp.full((m,), -1.0), io[0], ss[0], oo[0], rs[0],
                                                axis_name="x")[None]

    spec = P("x", None)
    got = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec))(
        *[jax.device_put(jnp.asarray(a), NamedSharding(mesh, spec))
          for a in (operand, in_off, sizes, out_off, sizes.T)])
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("local", ["per_expert", "dense", "grouped"])
def test_devices_whose_experts_get_no_tokens(local):
    """Every token routes to experts 0 and 1, held by expert shard 0: the other seven shards
    hold experts that receive nothing and must contribute exactly zero."""
    mesh = _mesh(1, 8, 1)
    x, ids, w, weights = _problem(12, seed=3, only_experts=(0, 1))
    assert set(np.unique(np.asarray(ids))) == {0, 1}
    want = dispatch_dense(x, ids, w, *weights)
    backend = ExpertParallel(mesh, ("expert",), (), (), local)
    px, pids, pw, pweights = _place(mesh, x, ids, w, weights, ("expert",), (), ())
    got = jax.jit(lambda *a: dispatch(*a, backend=backend))(px, pids, pw, *pweights)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    # And the shard of experts 6, 7 alone sums to zero: no token chose them.
    zero = ExpertParallel(mesh, ("expert",), (), (), local)
    ids_far = jnp.full_like(ids, 7).at[:, 1].set(6)
    out = jax.jit(lambda *a: dispatch(*a, backend=zero))(px, jax.device_put(ids_far, pids.sharding), pw, *pweights)
    assert np.abs(np.asarray(out)).max() > 0  # experts 6, 7 do compute for tokens routed to them


def test_uneven_experts_refused_with_the_numbers():
    mesh = Mesh(np.asarray(jax.devices()[:3], dtype=object).reshape(1, 3, 1), ("data", "expert", "tensor"))
    x, ids, w, weights = _problem(4)
    backend = ExpertParallel(mesh, ("expert",), (), ())
    with pytest.raises(ExpertLayoutError, match=r"8 experts .* size 3 .*2\.67"):
        backend(x, ids, w, *weights)
    cfg = load_config("tiny-qwen3-moe").replace(num_experts=6)
    placement = Placement.create(_mesh(1, 4, 2), EP_TP_RULES)
    with pytest.raises(MeshConfigError, match=r"6 experts cannot be split evenly over an expert axis of size 4"):
        check_placement(cfg, placement)
    check_placement(cfg.replace(num_experts=8), placement)  # 8 over 4 is fine


def test_registered_backend_uses_the_ambient_mesh():
    mesh = _mesh(2, 2, 2)
    x, ids, w, weights = _problem(8, seed=5)
    want = dispatch_dense(x, ids, w, *weights)
    with pytest.raises(ValueError, match="needs a mesh"):
        jax.jit(lambda *a: dispatch(*a, backend="expert_parallel"))(x, ids, w, *weights)
    px, pids, pw, pweights = _place(mesh, x, ids, w, weights, ("expert",), ("tensor",), ("data",))
    with jax.set_mesh(mesh):
        got = jax.jit(lambda *a: dispatch(*a, backend="expert_parallel"))(px, pids, pw, *pweights)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_backend_for_placement():
    assert moe_backend_for(Placement.create(_mesh(8, 1, 1), EP_TP_RULES)) is None  # nothing split
    b = moe_backend_for(Placement.create(_mesh(2, 2, 2), EP_TP_RULES))
    assert (b.expert_axes, b.tensor_axes, b.token_axes, b.ep, b.tp) == (("expert",), ("tensor",), ("data",), 2, 2)
    assert hash(b) == hash(moe_backend_for(Placement.create(_mesh(2, 2, 2), EP_TP_RULES)))  # usable as a jit static
