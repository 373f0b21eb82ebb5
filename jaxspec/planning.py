"""Per-device memory plans: weights, KV cache and compiled temporaries, and whether they fit.

``plan_memory`` places a model (and optionally its draft) on a mesh by the mesh
config's rules and counts, per device:

  weights      the local shard of every parameter (exact, from the shardings)
  kv cache     the local shard of the [layers, slots, max_len, kv_heads, head_dim] K and V
  temporaries  from ``compiled.memory_analysis()`` of ahead-of-time compiles of the real
               steps (prefill at the longest bucket, decode, and with a draft the draft loop
               and verification) with abstract weights: the largest temp + non-aliased output

and compares their sum with the device memory less a headroom for the runtime.
Compiling needs no weights and no accelerator: the mesh is built from the target's
topology (``jaxspec.mesh.topology_devices``) when the mesh config has one and the
devices present are not that target.

``check_fits`` raises ``DoesNotFit`` with the numbers when the plan does not fit;
``python -m jaxspec.serve`` calls it at start-up (serving/build.py).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspec.config import ModelConfig
from jaxspec.mesh import (MeshConfig, Placement, build_mesh, check_placement, device_memory_bytes, draft_placement,
                          topology_devices)
from jaxspec.models import KVCache, abstract_model
from jaxspec.models.kv_cache import check_kv_dtype, page_groups, whole_groups

DEFAULT_HEADROOM = 0.08  # device memory kept free for the runtime, fragmentation and collectives' buffers
GiB = float(1 << 30)


def fmt_bytes(b: float) -> str:
    """GiB for model-sized numbers, MiB / KiB for small ones (tests, tiny models)."""
    for unit, size in (("GiB", GiB), ("MiB", float(1 << 20)), ("KiB", 1024.0)):
        if b >= size or unit == "KiB":
            return f"{b / size:.2f} {unit}"
    return f"{b} B"


class DoesNotFit(RuntimeError):
    """The requested model, slots and context do not fit the devices' memory."""

    def __init__(self, plan: "MemoryPlan"):
        self.plan = plan
        super().__init__(plan.refusal())


@dataclasses.dataclass
class MemoryPlan:
    model: str
    mesh: str
    num_devices: int
    slots: int
    max_len: int
    draft: str | None
    weights: int  # bytes per device (the largest over devices)
    kv_cache: int
    draft_weights: int
    draft_kv_cache: int
    temporaries: int  # largest temp + non-aliased outputs over the compiled steps (0: not compiled)
    temp_by_step: dict[str, int]
    capacity: int | None  # usable bytes per device (None: unknown, e.g. host memory)
    hbm: int | None
    kv_bytes_per_token: int  # per device, target + draft, one position of one slot
    page_size: int | None = None  # paged cache: the pool holds num_pages pages of page_size positions
    num_pages: int | None = None
    prefill_chunk: int | None = None  # prompts prefilled in chunks of this many tokens (bounds prefill temporaries)
    # Steps whose compile ran out of device memory: name -> the compiler's words (their bytes are in
    # temp_by_step as the compiler reported them, or the capacity plus one byte when it did not say).
    compile_errors: dict[str, str] = dataclasses.field(default_factory=dict)
    kv_dtype: str = ""  # what the target's cache stores: "int8" or a float dtype
    num_hosts: int = 1  # processes (hosts) the mesh's devices belong to
    moe_exchange: str = "psum"  # expert parallelism's token exchange (MeshConfig.moe_exchange)
    host_axes: tuple[str, ...] = ()  # mesh axes whose devices sit on more than one host
    # ragged-all-to-all ops in each compiled step's HLO (the routed expert exchange; 0 with psum)
    ragged_all_to_all: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.draft_weights + self.draft_kv_cache + self.temporaries

    @property
    def fits(self) -> bool:
        return not self.compile_errors and (self.capacity is None or self.total <= self.capacity)

    @property
    def cache_positions(self) -> int:
        """Positions the KV cache holds (slots x context, or pages x page size)."""
        return self.num_pages * self.page_size if self.page_size else self.slots * self.max_len

    def cache_shape(self) -> str:
        if self.page_size:
            return (f"{self.num_pages} pages x {self.page_size} = {self.cache_positions} positions "
                    f"({self.slots} slots of up to {self.max_len})")
        return f"{self.slots} slots x {self.max_len} tokens"

    def max_tokens(self) -> int | None:
        """Slot-positions (slots x context) the cache could hold beside the rest (temporaries as
        measured at the requested shape, so larger contexts are an estimate)."""
        if self.capacity is None:
            return None
        free = self.capacity - (self.weights + self.draft_weights + self.temporaries)
        return max(0, free // self.kv_bytes_per_token)

    def largest(self) -> tuple[int, int] | None:
        """(slots at the requested context, context at the requested slots) that would fit."""
        tokens = self.max_tokens()
        if tokens is None:
            return None
        return tokens // self.max_len, tokens // self.slots

    def refusal(self) -> str:
        f = fmt_bytes
        head = (f"{self.model}{' + draft ' + self.draft if self.draft else ''} on {self.mesh}: needs "
                f"{f(self.total)} per device (weights {f(self.weights)}, KV cache "
                f"{f(self.kv_cache)} for {self.cache_shape()}")
        if self.draft:
            head += f", draft weights {f(self.draft_weights)} + cache {f(self.draft_kv_cache)}"
        head += f", temporaries {f(self.temporaries)})"
        if self.compile_errors:
            head += "; the compiler ran out of device memory for " + "; ".join(
                f"{name} ({why})" for name, why in self.compile_errors.items())
            if self.prefill_chunk is None and any(n.startswith("prefill") for n in self.compile_errors):
                head += "; chunked prefill (--max-step-tokens) bounds the prefill step's temporaries"
        if self.capacity is None:
            return head + "; device memory unknown"
        head += f", {f(self.capacity)} usable of {f(self.hbm)}"
        largest = self.largest()
        fixed = self.weights + self.draft_weights
        if fixed > self.capacity:
            return head + "; the weights alone exceed a device: use a mesh with more devices or a smaller dtype"
        slots, ctx = largest
        return head + (f"; at most {slots} slots of {self.max_len} tokens or {self.slots} slots of {ctx} tokens "
                       f"would fit (estimate)")

    def table(self) -> str:
        rows = [("weights", self.weights), (f"KV cache ({self.kv_dtype})" if self.kv_dtype else "KV cache", self.kv_cache)]
        if self.draft:
            rows += [("draft weights", self.draft_weights), ("draft KV cache", self.draft_kv_cache)]
        rows += [(f"temporaries ({name})", b) for name, b in self.temp_by_step.items()]
        rows += [("temporaries (peak step)", self.temporaries), ("total", self.total)]
        if self.capacity is not None:
            rows.append((f"usable ({self.hbm / GiB:.2f} GiB less headroom)", self.capacity))
        width = max(len(r[0]) for r in rows)
        hosts = f" on {self.num_hosts} hosts" if self.num_hosts > 1 else ""
        lines = [f"{self.model}{' + ' + self.draft if self.draft else ''} on {self.mesh} ({self.num_devices} devices"
                 f"{hosts}), {self.cache_shape()}, per device:"]
        lines += [f"  {name:<{width}}  {b / GiB:9.3f} GiB"
                  + ("  (compile ran out of memory)" if name.removeprefix("temporaries (").rstrip(")")
                     in self.compile_errors else "") for name, b in rows]
        if self.num_hosts > 1:
            lines.append(f"  mesh axes across hosts: {', '.join(self.host_axes) or 'none'}; MoE exchange "
                         f"{self.moe_exchange}" + ("; ragged-all-to-all ops per step: " + ", ".join(
                             f"{name} {n}" for name, n in self.ragged_all_to_all.items())
                             if self.ragged_all_to_all else ""))
        if self.capacity is not None:
            slots, ctx = self.largest()
            verdict = "yes" if self.fits else "NO"
            if self.page_size:
                lines.append(f"  fits: {verdict}; the cache could hold {self.max_tokens()} positions "
                             f"({self.max_tokens() // self.page_size} pages) beside the rest (estimate)")
            else:
                lines.append(f"  fits: {verdict}; largest: {slots} slots x {self.max_len} "
                             f"or {self.slots} slots x {ctx} tokens (estimate)")
        return "\n".join(lines)


# ------------------------------------------------------------------------ bytes per device
def _local_bytes(shape: Sequence[int], dtype, sharding) -> int:
    return int(np.prod(sharding.shard_shape(tuple(shape)))) * jnp.dtype(dtype).itemsize


def _abstract_state(cfg: ModelConfig, placement: Placement):
    graphdef, state = nnx.split(abstract_model(cfg))
    shardings = placement.state_shardings(state)
    structs = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state, shardings,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
    )
    weights = sum(_local_bytes(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(structs))
    return graphdef, structs, shardings, weights


def _abstract_cache(cfg: ModelConfig, placement: Placement, slots: int, max_len: int,
                    paging: tuple[int, int] | None = None, kv_dtype: str | None = None):
    pages = {}
    if paging is not None:  # split over the data axis as a runner would (``page_groups``), whole groups
        groups = page_groups(placement, slots, paging[1])
        pages = dict(num_pages=whole_groups(paging[0], groups), page_size=paging[1], page_groups=groups)
    abstract = KVCache.abstract(cfg, slots, max_len, kv_dtype=kv_dtype, **pages)
    shardings = placement.cache_shardings(abstract)
    structs = KVCache(*(None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
                        for a, s in zip(abstract, shardings)))
    kv = sum(_local_bytes(a.shape, a.dtype, a.sharding) for a in structs if a is not None)
    return structs, shardings, kv


def _step_bytes(compiled) -> int:
    """Transient bytes of one executable: temporaries plus outputs that do not reuse an input."""
    m = compiled.memory_analysis()
    if m is None:
        return 0
    return int(m.temp_size_in_bytes + max(0, m.output_size_in_bytes - m.alias_size_in_bytes))


def _compile_steps(cfg, placement, graphdef, state, state_sh, cache, cache_sh, slots, max_len,
                   draft=None, k: int = 4, prefill_chunk: int | None = None) -> dict[str, Callable]:
    """The real engine steps, lowered with abstract arguments; returns name -> compile thunk."""
    from jaxspec.engine.steps import (PlacedBackend, StepStatics, _decode_impl, _prefill_at_impl, _prefill_impl,
                                      slots_unsplit)
    from jaxspec.models.moe_parallel import moe_backend_for
    from jaxspec.sampling import BatchSampling

    rep = placement.replicated()
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rep)  # noqa: E731
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=rep)  # noqa: E731
    u32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.uint32, sharding=rep)  # noqa: E731
    bools = lambda b: jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=rep)  # noqa: E731
    sampling = lambda b: BatchSampling(f32(b), i32(b), f32(b), f32(b), u32(b, 2))  # noqa: E731
    statics = StepStatics(PlacedBackend(moe_backend_for(placement), placement))
    identity = not slots_unsplit(cache_sh)  # as ModelRunner steps a slot-split cache: every slot in order
    steps: dict[str, Callable] = {}

    if prefill_chunk is not None and prefill_chunk < max_len:
        # A prompt's last chunk: prefill_chunk tokens attending over the whole context.
        chunk = jax.jit(functools.partial(_prefill_at_impl, graphdef, statics, kv_len=max_len), donate_argnums=(1,),
                        out_shardings=(cache_sh, rep, rep, rep))
        steps[f"prefill chunk 1x{prefill_chunk}"] = lambda: chunk.lower(
            state, cache, i32(1, prefill_chunk), i32(1), i32(1), i32(1), sampling(1)).compile()
    else:
        prefill = jax.jit(functools.partial(_prefill_impl, graphdef, statics), donate_argnums=(1,),
                          out_shardings=(cache_sh, rep, rep, rep))
        steps[f"prefill 1x{max_len}"] = lambda: prefill.lower(state, cache, i32(1, max_len), i32(1), i32(1),
                                                              sampling(1)).compile()
    # The full-batch step over the whole context: the largest decode the engine compiles.
    decode = jax.jit(functools.partial(_decode_impl, graphdef, statics, kv_len=max_len, identity_rows=identity),
                     donate_argnums=(1,), out_shardings=(cache_sh, rep, rep))
    steps[f"decode {slots}"] = lambda: decode.lower(state, cache, i32(slots), i32(slots), i32(slots), i32(slots),
                                                   sampling(slots), i32(slots)).compile()
    if draft is not None:
        from jaxspec.engine.steps import _forward
        from jaxspec.speculative.draft_model import PENDING_BLOCK, _make_loop
        from jaxspec.speculative.step_fns import make_verify

        d_graph, d_state, d_backend, d_cache, d_cache_sh = draft
        verify = jax.jit(make_verify(functools.partial(_forward, graphdef, statics), "xla", max_len, identity),
                         donate_argnums=(1,), out_shardings=(cache_sh, rep, rep, rep))
        steps[f"verify {slots}x{k + 1}"] = lambda: verify.lower(
            state, cache, i32(slots), i32(slots), i32(slots), i32(slots, k), f32(slots, k, cfg.vocab_size), i32(slots),
            sampling(slots), i32(slots), bools(slots)).compile()
        loop = jax.jit(_make_loop(d_graph, d_backend, k, max_len, not slots_unsplit(d_cache_sh)), donate_argnums=(1,),
                       out_shardings=(d_cache_sh, rep, rep))
        steps[f"draft loop {slots}x{k}"] = lambda: loop.lower(
            d_state, d_cache, i32(slots), i32(slots, PENDING_BLOCK), i32(slots), i32(slots), sampling(slots),
            i32(slots)).compile()
    return steps


def _ragged_all_to_all_ops(compiled) -> int:
    """Routed expert exchanges in a compiled step (instructions, not metadata mentions)."""
    text = compiled.as_text() if hasattr(compiled, "as_text") else None
    return len(re.findall(r"\sragged-all-to-all(?:-start)?\(", text)) if text else 0


def host_axes(mesh) -> tuple[str, ...]:
    """Mesh axes along which devices of different processes (hosts) meet: their collectives
    leave the host (on a TPU slice still over ICI; on GPU hosts over the network)."""
    procs = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)
    return tuple(name for i, name in enumerate(mesh.axis_names)
                 if procs.shape[i] > 1 and not (np.diff(procs, axis=i) == 0).all())


def _device_memory(mesh_cfg: MeshConfig, devices) -> int | None:
    if mesh_cfg.hbm_bytes_per_device:
        return int(mesh_cfg.hbm_bytes_per_device)
    return device_memory_bytes(devices[0])


def plan_memory(
    cfg: ModelConfig,
    mesh_cfg: MeshConfig,
    slots: int,
    max_len: int,
    draft_cfg: ModelConfig | None = None,
    num_speculative_tokens: int = 4,
    devices: Sequence[jax.Device] | None = None,
    compile: bool = True,
    headroom: float = DEFAULT_HEADROOM,
    on_step: Callable[[str, int], None] | None = None,
    paging: tuple[int, int] | None = None,
    prefill_chunk: int | None = None,
    kv_dtype: str | None = None,
    draft_kv_dtype: str | None = None,
) -> MemoryPlan:
    """Per-device memory of serving ``cfg`` (and ``draft_cfg``) with ``slots`` x ``max_len`` on the mesh.

    ``paging``: a paged cache of (num_pages, page_size) with ``slots`` requests at once.
    ``prefill_chunk``: prompts are prefilled in chunks of this many tokens (the engine's
    ``--max-step-tokens``), which bounds the prefill step's temporaries. ``kv_dtype`` /
    ``draft_kv_dtype``: "int8" KV caches (values and their scales are counted). A step whose compile runs
    out of device memory makes the plan a "does not fit" with the compiler's figures.

    ``devices``: the devices to build the mesh from (default: the mesh config's ahead-of-time
    topology when it has one, else ``jax.devices()``). ``compile=False`` skips the temporaries
    (fast: weights and cache only)."""
    if devices is None:
        devices = topology_devices(mesh_cfg) if mesh_cfg.topology else jax.devices()
    mesh = build_mesh(mesh_cfg, devices)
    placement = Placement.create(mesh, mesh_cfg.rules, mesh_cfg.moe_exchange)
    check_placement(cfg, placement)
    hbm = _device_memory(mesh_cfg, devices)
    graphdef, state, state_sh, weights = _abstract_state(cfg, placement)
    kv_dtype, draft_kv_dtype = check_kv_dtype(kv_dtype), check_kv_dtype(draft_kv_dtype)
    cache, cache_sh, kv = _abstract_cache(cfg, placement, slots, max_len, paging, kv_dtype)
    per_token = _abstract_cache(cfg, placement, slots, 1, kv_dtype=kv_dtype)[2] / slots

    draft = None
    d_weights = d_kv = 0
    if draft_cfg is not None:
        from jaxspec.models.moe_parallel import moe_backend_for

        d_place = draft_placement(draft_cfg, placement, slots, max_len, hbm, kv_dtype=draft_kv_dtype)
        check_placement(draft_cfg, d_place)
        d_graph, d_state, _, d_weights = _abstract_state(draft_cfg, d_place)
        d_cache, d_cache_sh, d_kv = _abstract_cache(draft_cfg, d_place, slots, max_len, paging, draft_kv_dtype)
        per_token += _abstract_cache(draft_cfg, d_place, slots, 1, kv_dtype=draft_kv_dtype)[2] / slots
        draft = (d_graph, d_state, moe_backend_for(d_place), d_cache, d_cache_sh)

    temp_by_step: dict[str, int] = {}
    errors: dict[str, str] = {}
    ragged: dict[str, int] = {}
    capacity = None if hbm is None else int(hbm * (1 - headroom))
    if compile:
        steps = _compile_steps(cfg, placement, graphdef, state, state_sh, cache, cache_sh, slots, max_len, draft,
                               num_speculative_tokens, prefill_chunk)
        for name, thunk in steps.items():
            try:
                compiled = thunk()
                temp_by_step[name] = _step_bytes(compiled)
                ragged[name] = _ragged_all_to_all_ops(compiled)
            except Exception as e:  # the compiler's out-of-memory is a verdict, not a crash
                needed, why = _out_of_memory(e)
                if why is None:
                    raise
                errors[name] = why
                temp_by_step[name] = needed if needed is not None else (capacity or 0) + 1
            if on_step is not None:
                on_step(name, temp_by_step[name])
    return MemoryPlan(
        model=cfg.name, mesh=mesh_cfg.name, num_devices=mesh_cfg.num_devices, slots=slots, max_len=max_len,
        draft=draft_cfg.name if draft_cfg else None, weights=weights, kv_cache=kv, draft_weights=d_weights,
        draft_kv_cache=d_kv, temporaries=max(temp_by_step.values(), default=0), temp_by_step=temp_by_step,
        capacity=capacity, hbm=hbm,
        kv_bytes_per_token=max(1, int(np.ceil(per_token))),
        page_size=paging[1] if paging else None, num_pages=paging[0] if paging else None,
        prefill_chunk=prefill_chunk if prefill_chunk is not None and prefill_chunk < max_len else None,
        compile_errors=errors, kv_dtype=cache.kv_dtype,
        num_hosts=len({d.process_index for d in mesh.devices.flat}), moe_exchange=mesh_cfg.moe_exchange,
        host_axes=host_axes(mesh), ragged_all_to_all=ragged,
    )


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _out_of_memory(exc: Exception) -> tuple[int | None, str | None]:
    """(bytes the step needed, a one-line reason) for a compile that ran out of device memory;
    (None, None) for any other failure."""
    text = str(exc)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None, None
    # The two forms TPU compiles report: "Used 104.60G of 15.48G hbm" and "the total memory required
    # for HLO temporaries (104.60G) exceeds available HBM (95.74G)".
    m = (re.search(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?)", text)
         or re.search(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)",
                      text))
    if m:
        used = float(m.group(1)) * _UNITS[m.group(2)]
        return int(used), f"needs {fmt_bytes(used)} of {fmt_bytes(float(m.group(3)) * _UNITS[m.group(4)])}"
    line = next((ln for ln in text.splitlines() if "RESOURCE_EXHAUSTED" in ln or "Ran out" in ln), text)
    return None, line.strip()[:200]


def check_fits(cfg: ModelConfig, mesh_cfg: MeshConfig, slots: int, max_len: int, **kwargs) -> MemoryPlan:
    """``plan_memory``, raising ``DoesNotFit`` (message with the numbers and what would fit) when
    the plan exceeds the usable device memory. Unknown device memory (CPU) passes."""
    plan = plan_memory(cfg, mesh_cfg, slots, max_len, **kwargs)
    if not plan.fits:
        raise DoesNotFit(plan)
    return plan


def check_fits_on_device(cfg: ModelConfig, slots: int, max_len: int, draft_cfg: ModelConfig | None = None,
                         device: jax.Device | None = None, headroom: float = DEFAULT_HEADROOM,
                         kv_dtype: str | None = None) -> MemoryPlan:
    """``check_fits`` for serving on one local device (what ``python -m jaxspec.serve`` does):
    weights and cache only, so start-up pays no extra compile (temporaries show at warm-up).
    Device memory comes from ``memory_stats()``; a device without it (CPU) passes."""
    from jaxspec.mesh import REPLICATED_RULES

    device = device or jax.devices()[0]
    platform = "gpu" if device.platform in ("cuda", "rocm", "gpu") else device.platform
    local = MeshConfig(name=f"one {device.device_kind}", platform=platform if platform in ("cpu", "tpu", "gpu") else "cpu",
                       axes={"data": 1, "expert": 1, "tensor": 1}, rules=dict(REPLICATED_RULES))
    return check_fits(cfg, local, slots, max_len, draft_cfg=draft_cfg, devices=[device], compile=False,
                      headroom=headroom, kv_dtype=kv_dtype)
