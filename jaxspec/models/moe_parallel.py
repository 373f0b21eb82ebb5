"""Expert-parallel (and expert-width tensor-parallel) MoE dispatch under ``shard_map``.

Layout. Experts are split over the ``expert`` mesh axes (each device holds
E / ep whole experts) and every expert's width F over the ``tensor`` axes (each
device holds F / tp columns of gate/up and rows of down). Tokens stay where the
attention left them: split over the slot (data) axes, replicated over expert and
tensor. Each device

  1. computes, for all of its tokens, the contributions of its local experts
     (assignments to other devices' experts get weight 0), through its own width
     slice: silu(x Wg) * (x Wu) is elementwise in F, so a slice of F gives a slice of
     h, and h_slice @ Wd_slice is that slice's share of the output;
  2. ``psum`` over the expert and tensor axes adds the shares of all experts and all
     width slices: the exact dropless result, replicated as the tokens were.

No weight ever moves: the only collective is one all-reduce of the [N, D]
activations per MoE layer, the same volume as a tensor-parallel dense MLP. A
device whose experts receive no tokens contributes zeros. This needs no capacity,
so a token's output never depends on its batch (speculative verification relies
on that), and no all-to-all, so it runs on every backend. This is ``exchange="psum"``.

``exchange="ragged_all_to_all"`` (routed tokens; pays off for large ep and large
batches such as long prefills, where every device computing every token's share is
wasted work): each device of an expert group takes 1/ep of the group's token rows,
sorts their assignments by expert (so by owning device), and sends each device
exactly the rows routed to its experts with ``jax.lax.ragged_all_to_all``; the
receiver computes them grouped by local expert (``ragged_dot``), sends the results
back the same way, the sender combines them with the router weights, and an
all-gather over the expert axes restores the token layout (a psum over the tensor
axes first adds the width slices). Dropless: the receive buffer holds every
assignment of the group (N * k rows), so nothing is ever dropped whatever the
routing. XLA:CPU has no ``ragged_all_to_all``; on CPU the same exchange runs through
``all_gather`` (``ragged_all_to_all_via_all_gather``, identical semantics), which is
how the tests check it against the single-device result. Token counts that do not
divide by ep use ``psum`` (decode batches are small; the routed path is for prefill).

Local compute (``local``):
  per_expert  local experts in a loop that skips those no token chose (CPU, up to
           ``LOCAL_PER_EXPERT_MAX_TOKENS`` tokens: reads only the chosen experts' weights)
  dense    every local expert computes every token, masked combine (tiny batches, CPU)
  grouped  local assignments sorted by expert, ``jax.lax.ragged_dot`` over the local
           groups; the other devices' assignments sort past the last group and cost
           nothing on accelerators (on CPU ragged_dot is dense per group)
  auto     CPU: per_expert up to LOCAL_PER_EXPERT_MAX_TOKENS tokens, else dense;
           accelerators: dense for <= 4 tokens, else grouped

``ExpertParallel`` is hashable (a static jit argument) and callable with the
dispatch signature, so it can be passed wherever a backend name is accepted
(``moe_backend=``). The registered name ``"expert_parallel"`` does the same with the
mesh set by ``jax.set_mesh`` and the axis names of ``jaxspec.mesh``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec as P

from jaxspec.mesh import MOE_EXCHANGES
from jaxspec.models.moe_dispatch import every_expert, per_expert_f32, register_backend
from jaxspec.models.quant import qragged_dot

# Local experts per device on CPU: per_expert up to this many tokens (it skips unchosen experts).
LOCAL_PER_EXPERT_MAX_TOKENS = 128

LOCAL_MODES = ("auto", "per_expert", "dense", "grouped")
EXCHANGES = MOE_EXCHANGES
DENSE_MAX_TOKENS = 4


class ExpertLayoutError(ValueError):
    """The experts (or their width) do not split evenly over the mesh."""


def _size(mesh: Mesh | AbstractMesh, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _spec(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _weight_spec(w, axes: tuple):
    """The PartitionSpec of an expert weight, per array of a quantized one: an axis of size 1
    (the contracted axis of int8 scales) is replicated, not split."""
    return jax.tree.map(lambda a: P(*(ax if n > 1 else None for ax, n in zip(axes, a.shape))), w)


def _swiglu_dense(x, local_ids, weights, w_gate, w_up, w_down):
    """Every local expert on every token; assignments outside [0, E_loc) one-hot to zero."""
    e_loc = w_gate.shape[0]
    combine = jnp.sum(jax.nn.one_hot(local_ids, e_loc, dtype=jnp.float32) * weights[..., None], axis=1)  # [N, E_loc]
    y = every_expert(x, w_gate, w_up, w_down)  # [E_loc, N, D]
    return jnp.einsum("end,ne->nd", y.astype(jnp.float32), combine)


def _ragged_swiglu(xs, keys, w_gate, w_up, w_down):
    """xs [M, D] already sorted by local expert (rows of no local expert last) -> [M, D] f32
    through ragged_dot; keys [M] is each row's local expert (E_loc for none), in xs's order.
    Rows past the groups come out 0. Quantized experts are never dequantized whole (``qragged_dot``)."""
    sizes = jnp.sum(jax.nn.one_hot(keys, w_gate.shape[0], dtype=jnp.int32), axis=0)  # the sentinel one-hots to zeros
    mm = lambda lhs, w: qragged_dot(lhs, w, sizes, keys)  # noqa: E731
    h = jax.nn.silu(mm(xs, w_gate)) * mm(xs, w_up)
    return mm(h, w_down).astype(jnp.float32)


def _swiglu_grouped(x, local_ids, weights, w_gate, w_up, w_down):
    """Local assignments grouped by expert through ragged_dot; the rest sort last, outside every group."""
    n, k = local_ids.shape
    e_loc = w_gate.shape[0]
    mine = (local_ids >= 0) & (local_ids < e_loc)
    key = jnp.where(mine, local_ids, e_loc).reshape(-1)  # e_loc = "another device's expert"
    order = jnp.argsort(key, stable=True)
    token_of = (order // k).astype(jnp.int32)
    y = _ragged_swiglu(x[token_of], key[order], w_gate, w_up, w_down)
    w = jnp.where(mine, weights, 0.0).reshape(-1)[order].astype(jnp.float32)
    return jnp.zeros((n, x.shape[1]), jnp.float32).at[token_of].add(y * w[:, None])


def _exclusive_cumsum(x: jax.Array, axis: int = 0) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def ragged_all_to_all_via_all_gather(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                     axis_name):
    """``jax.lax.ragged_all_to_all``'s exact semantics through ``all_gather`` (XLA:CPU has no
    ragged all-to-all): rows ``operand[input_offsets[j] : + send_sizes[j]]`` of every device land
    in device j's ``output`` at ``output_offsets[j]``; other rows of ``output`` are kept.
    Moves every device's whole operand, so it is for CPU meshes (tests, virtual devices)."""
    del recv_sizes  # implied by the senders' sizes; kept for the signature
    ops = jax.lax.all_gather(operand, axis_name)  # [G, M, ...]
    src_start = jax.lax.all_gather(input_offsets, axis_name)  # [G(sender), G(dest)]
    dst_start = jax.lax.all_gather(output_offsets, axis_name)
    sizes = jax.lax.all_gather(send_sizes, axis_name)
    me = jax.lax.axis_index(axis_name)
    rows = jnp.arange(output.shape[0], dtype=jnp.int32)
    for sender in range(ops.shape[0]):
        start, size, src = dst_start[sender, me], sizes[sender, me], src_start[sender, me]
        inside = (rows >= start) & (rows < start + size)
        take = ops[sender][jnp.clip(src + rows - start, 0, operand.shape[0] - 1)]
        output = jnp.where(inside.reshape(-1, *[1] * (output.ndim - 1)), take, output)
    return output


def _grouped_rows(rows, local_ids, w_gate, w_up, w_down):
    """rows [M, D] each for local expert local_ids[m] (== E_loc: an empty buffer row) -> [M, D] f32."""
    order = jnp.argsort(local_ids, stable=True)  # the sentinel sorts past every group
    y = _ragged_swiglu(rows[order], local_ids[order], w_gate, w_up, w_down)
    return jnp.zeros_like(y).at[order].set(y)


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """Dropless MoE dispatch over a mesh: experts split over ``expert_axes``, expert width over
    ``tensor_axes``, tokens split over ``token_axes`` (when they divide) and replicated otherwise."""

    exchanges_tokens: ClassVar[bool] = True  # padding tokens keep their routing (see moe.MoEBlock)
    mesh: Mesh | AbstractMesh
    expert_axes: tuple[str, ...] = ("expert",)
    tensor_axes: tuple[str, ...] = ()
    token_axes: tuple[str, ...] = ()
    local: str = "auto"
    exchange: str = "psum"

    def __post_init__(self) -> None:
        if self.local not in LOCAL_MODES:
            raise ValueError(f"local MoE mode must be one of {LOCAL_MODES}, got {self.local!r}")
        if self.exchange not in EXCHANGES:
            raise ValueError(f"MoE token exchange must be one of {EXCHANGES}, got {self.exchange!r}")
        for axis in (*self.expert_axes, *self.tensor_axes, *self.token_axes):
            if axis not in self.mesh.shape:
                raise ValueError(f"mesh axis {axis!r} not in the mesh {dict(self.mesh.shape)}")

    @property
    def ep(self) -> int:
        return _size(self.mesh, self.expert_axes)

    @property
    def tp(self) -> int:
        return _size(self.mesh, self.tensor_axes)

    def check(self, num_experts: int, width: int) -> None:
        if num_experts % self.ep:
            raise ExpertLayoutError(
                f"{num_experts} experts cannot be split evenly over expert axes {self.expert_axes} of size {self.ep} "
                f"({num_experts} / {self.ep} = {num_experts / self.ep:.2f} experts per device)"
            )
        if width % self.tp:
            raise ExpertLayoutError(
                f"expert width {width} cannot be split evenly over tensor axes {self.tensor_axes} of size {self.tp}"
            )

    @property
    def platform(self) -> str:
        # An AbstractMesh (from jax.set_mesh) has no devices: the default backend is the target then.
        return self.mesh.devices.flat[0].platform if isinstance(self.mesh, Mesh) else jax.default_backend()

    def _local_mode(self, num_tokens: int) -> str:
        if self.local != "auto":
            return self.local
        if self.platform == "cpu":
            return "per_expert" if num_tokens <= LOCAL_PER_EXPERT_MAX_TOKENS else "dense"
        return "dense" if num_tokens <= DENSE_MAX_TOKENS else "grouped"

    def __call__(self, x, expert_ids, weights, w_gate, w_up, w_down) -> jax.Array:
        """x [N, D], expert_ids/weights [N, k], w_gate/w_up [E, D, F], w_down [E, F, D] (global shapes) -> [N, D]."""
        num_experts, _, width = w_gate.shape
        self.check(num_experts, width)
        e_loc = num_experts // self.ep
        n = x.shape[0]
        tok = self.token_axes if self.token_axes and n % _size(self.mesh, self.token_axes) == 0 else ()
        local_fn = {"per_expert": per_expert_f32, "dense": _swiglu_dense, "grouped": _swiglu_grouped}[self._local_mode(n)]
        reduce_axes = (*self.expert_axes, *self.tensor_axes)

        def shard(x, expert_ids, weights, w_gate, w_up, w_down):
            offset = jax.lax.axis_index(self.expert_axes) * e_loc if self.expert_axes else 0
            partial = local_fn(x, expert_ids - offset, weights, w_gate, w_up, w_down)
            # Summed in float32: every device's share is added exactly as the dense backend's
            # single float32 combine would, then cast once.
            total = jax.lax.psum(partial, reduce_axes) if reduce_axes else partial
            return total.astype(x.dtype)

        n_shard = n // (_size(self.mesh, tok) if tok else 1)
        if self.exchange == "ragged_all_to_all" and self.expert_axes and n_shard % self.ep == 0:
            shard = self._routed_shard(e_loc)

        ea, ta, ka = _spec(self.expert_axes), _spec(self.tensor_axes), _spec(tok)
        return jax.shard_map(
            shard, mesh=self.mesh,
            in_specs=(P(ka, None), P(ka, None), P(ka, None),
                      _weight_spec(w_gate, (ea, None, ta)), _weight_spec(w_up, (ea, None, ta)),
                      _weight_spec(w_down, (ea, ta, None))),
            out_specs=P(ka, None),
            # per_expert's lax.cond keeps a zero accumulator in one branch and adds a
            # device-varying share in the other; varying-axis tracking would reject that.
            check_vma=False,
        )(x, expert_ids, weights, w_gate, w_up, w_down)


    def _routed_shard(self, e_loc: int):
        """The per-device body of ``exchange="ragged_all_to_all"`` (module docstring)."""
        ep, axes = self.ep, self.expert_axes
        exchange = (jax.lax.ragged_all_to_all if self.platform != "cpu" else ragged_all_to_all_via_all_gather)

        def shard(x, expert_ids, weights, w_gate, w_up, w_down):
            n, k = expert_ids.shape
            n_loc, me = n // ep, jax.lax.axis_index(axes)
            take = lambda a: jax.lax.dynamic_slice_in_dim(a, me * n_loc, n_loc)  # noqa: E731  my 1/ep of the rows
            xs, ids, w = take(x), take(expert_ids), take(weights)
            flat = ids.reshape(-1)  # [A], A = n_loc * k
            order = jnp.argsort(flat, stable=True)  # by global expert = by owning device, then local expert
            send = xs[order // k]  # [A, D]
            send_sizes = jnp.sum(jax.nn.one_hot(flat // e_loc, ep, dtype=jnp.int32), axis=0)  # [ep]
            sizes = jax.lax.all_gather(send_sizes, axes)  # [ep(sender), ep(dest)]
            recv_sizes = sizes[:, me]
            # Senders' chunks land one after another in sender order at each destination.
            out_offsets = _exclusive_cumsum(sizes, axis=0)[me]
            in_offsets = _exclusive_cumsum(send_sizes)
            cap = ep * flat.shape[0]  # every assignment of the group could route here: dropless
            go = dict(axis_name=axes)
            rows = exchange(send, jnp.zeros((cap, x.shape[1]), x.dtype), in_offsets, send_sizes, out_offsets,
                            recv_sizes, **go)
            local_ids = exchange((flat[order] % e_loc).astype(jnp.int32), jnp.full((cap,), e_loc, jnp.int32),
                                 in_offsets, send_sizes, out_offsets, recv_sizes, **go)
            y = _grouped_rows(rows, local_ids, w_gate, w_up, w_down)  # [cap, D] f32 (this width slice's share)
            # Back to the senders: my received chunk from device j returns to where j's rows came from.
            back = exchange(y, jnp.zeros((flat.shape[0], x.shape[1]), jnp.float32), _exclusive_cumsum(recv_sizes),
                            recv_sizes, _exclusive_cumsum(sizes, axis=1)[:, me], send_sizes, **go)
            per_assignment = jnp.zeros_like(back).at[order].set(back).reshape(n_loc, k, -1)
            out = jnp.sum(per_assignment * w[..., None].astype(jnp.float32), axis=1)  # [n_loc, D] f32
            if self.tensor_axes:
                out = jax.lax.psum(out, self.tensor_axes)
            return jax.lax.all_gather(out, axes, tiled=True).astype(x.dtype)  # [n, D], as the tokens came

        return shard


def moe_backend_for(placement, local: str = "auto") -> ExpertParallel | None:
    """The dispatch for a ``jaxspec.mesh.Placement``: ``ExpertParallel`` when experts or their
    width are split, else None (the model's own backend; nothing to exchange)."""
    expert_axes = placement.mesh_axes("expert")
    tensor_axes = placement.mesh_axes("moe_mlp")
    if _size(placement.mesh, expert_axes) * _size(placement.mesh, tensor_axes) == 1:
        return None
    return ExpertParallel(placement.mesh, expert_axes, tensor_axes, placement.mesh_axes("slots"), local,
                          placement.moe_exchange)


def dispatch_expert_parallel(x, expert_ids, weights, w_gate, w_up, w_down) -> jax.Array:
    """Registered as ``"expert_parallel"``: ExpertParallel over the mesh of ``jax.set_mesh``,
    with the (data, expert, tensor) axis names of ``jaxspec.mesh`` (those present)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise ValueError(
            "the expert_parallel MoE backend needs a mesh: run under jax.set_mesh(mesh), or pass "
            "moe_backend=ExpertParallel(mesh, ...) (see jaxspec.models.moe_parallel.moe_backend_for)"
        )
    present = lambda name: (name,) if name in mesh.shape else ()  # noqa: E731
    return ExpertParallel(mesh, present("expert"), present("tensor"), present("data"))(
        x, expert_ids, weights, w_gate, w_up, w_down
    )


register_backend("expert_parallel", dispatch_expert_parallel)
