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
on that), and no all-to-all, so it runs on every backend including CPU, where
``ragged_all_to_all`` is not implemented. (Exchanging only routed tokens with
``ragged_all_to_all`` saves compute when ep is large; with ep <= 8 and decode
batches of a few hundred tokens the replicated tokens are cheap.)

Local compute (``local``):
  per_expert  local experts in a loop that skips those no token chose (CPU, up to
           ``CPU_PER_EXPERT_MAX_TOKENS`` tokens: reads only the chosen experts' weights)
  dense    every local expert computes every token, masked combine (tiny batches, CPU)
  grouped  local assignments sorted by expert, ``jax.lax.ragged_dot`` over the local
           groups; the other devices' assignments sort past the last group and cost
           nothing on accelerators (on CPU ragged_dot is dense per group)
  auto     CPU: per_expert up to CPU_PER_EXPERT_MAX_TOKENS tokens, else dense;
           accelerators: dense for <= 4 tokens, else grouped

``ExpertParallel`` is hashable (a static jit argument) and callable with the
dispatch signature, so it can be passed wherever a backend name is accepted
(``moe_backend=``). The registered name ``"expert_parallel"`` does the same with the
mesh set by ``jax.set_mesh`` and the axis names of ``jaxspec.mesh``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec as P

from jaxspec.models.moe_dispatch import CPU_PER_EXPERT_MAX_TOKENS, per_expert_f32, register_backend

LOCAL_MODES = ("auto", "per_expert", "dense", "grouped")
DENSE_MAX_TOKENS = 4


class ExpertLayoutError(ValueError):
    """The experts (or their width) do not split evenly over the mesh."""


def _size(mesh: Mesh | AbstractMesh, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _spec(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _swiglu_dense(x, local_ids, weights, w_gate, w_up, w_down):
    """Every local expert on every token; assignments outside [0, E_loc) one-hot to zero."""
    e_loc = w_gate.shape[0]
    combine = jnp.sum(jax.nn.one_hot(local_ids, e_loc, dtype=jnp.float32) * weights[..., None], axis=1)  # [N, E_loc]
    h = jax.nn.silu(jnp.einsum("nd,edf->enf", x, w_gate)) * jnp.einsum("nd,edf->enf", x, w_up)
    y = jnp.einsum("enf,efd->end", h, w_down)
    return jnp.einsum("end,ne->nd", y.astype(jnp.float32), combine)


def _swiglu_grouped(x, local_ids, weights, w_gate, w_up, w_down):
    """Local assignments grouped by expert through ragged_dot; the rest sort last, outside every group."""
    n, k = local_ids.shape
    e_loc = w_gate.shape[0]
    mine = (local_ids >= 0) & (local_ids < e_loc)
    key = jnp.where(mine, local_ids, e_loc).reshape(-1)  # e_loc = "another device's expert"
    order = jnp.argsort(key, stable=True)
    token_of = (order // k).astype(jnp.int32)
    sizes = jnp.sum(jax.nn.one_hot(key, e_loc, dtype=jnp.int32), axis=0)  # the sentinel one-hots to zeros
    xs = x[token_of]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w_gate, sizes)) * jax.lax.ragged_dot(xs, w_up, sizes)
    y = jax.lax.ragged_dot(h, w_down, sizes).astype(jnp.float32)  # rows past the groups: 0
    w = jnp.where(mine, weights, 0.0).reshape(-1)[order].astype(jnp.float32)
    return jnp.zeros((n, x.shape[1]), jnp.float32).at[token_of].add(y * w[:, None])


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """Dropless MoE dispatch over a mesh: experts split over ``expert_axes``, expert width over
    ``tensor_axes``, tokens split over ``token_axes`` (when they divide) and replicated otherwise."""

    mesh: Mesh | AbstractMesh
    expert_axes: tuple[str, ...] = ("expert",)
    tensor_axes: tuple[str, ...] = ()
    token_axes: tuple[str, ...] = ()
    local: str = "auto"

    def __post_init__(self) -> None:
        if self.local not in LOCAL_MODES:
            raise ValueError(f"local MoE mode must be one of {LOCAL_MODES}, got {self.local!r}")
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

    def _local_mode(self, num_tokens: int) -> str:
        if self.local != "auto":
            return self.local
        # An AbstractMesh (from jax.set_mesh) has no devices: the default backend is the target then.
        platform = self.mesh.devices.flat[0].platform if isinstance(self.mesh, Mesh) else jax.default_backend()
        if platform == "cpu":
            return "per_expert" if num_tokens <= CPU_PER_EXPERT_MAX_TOKENS else "dense"
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

        ea, ta, ka = _spec(self.expert_axes), _spec(self.tensor_axes), _spec(tok)
        return jax.shard_map(
            shard, mesh=self.mesh,
            in_specs=(P(ka, None), P(ka, None), P(ka, None), P(ea, None, ta), P(ea, None, ta), P(ea, ta, None)),
            out_specs=P(ka, None),
            # per_expert's lax.cond keeps a zero accumulator in one branch and adds a
            # device-varying share in the other; varying-axis tracking would reject that.
            check_vma=False,
        )(x, expert_ids, weights, w_gate, w_up, w_down)


def moe_backend_for(placement, local: str = "auto") -> ExpertParallel | None:
    """The dispatch for a ``jaxspec.mesh.Placement``: ``ExpertParallel`` when experts or their
    width are split, else None (the model's own backend; nothing to exchange)."""
    expert_axes = placement.mesh_axes("expert")
    tensor_axes = placement.mesh_axes("moe_mlp")
    if _size(placement.mesh, expert_axes) * _size(placement.mesh, tensor_axes) == 1:
        return None
    return ExpertParallel(placement.mesh, expert_axes, tensor_axes, placement.mesh_axes("slots"), local)


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
