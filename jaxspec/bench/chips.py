"""Chips for the step-time predictor (``jaxspec.bench.predict``): the accelerator table with its
sources, this CPU measured by a probe, and what a compiled CPU step executes (from its HLO).

docs/predict.md explains each number and what it models.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import statistics
import time
from pathlib import Path

from jaxspec.config import ModelConfig

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- chips
@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip as the roofline sees it (per chip, not per host)."""

    name: str
    peak_flops: float  # dense matmul FLOP/s at the default dtype (bf16; f32 for cpu)
    bandwidth: float  # memory bytes/s
    memory_bytes: float
    link_bandwidth: float  # bytes/s one chip can send into a collective (ICI / NVLink); 0 = none
    step_overhead_s: float  # per step: host dispatch of one jitted call + the token transfer back
    op_overhead_s: float  # per kernel executed in the step (launch / scheduling gap)
    collective_latency_s: float = 0.0  # fixed cost of one collective (hops, synchronisation)
    source: str = ""
    move_bandwidth: float = 0.0  # bytes/s of copies and transposes (read + write); 0 = bandwidth
    # Measured matmul FLOP/s by (rows M, inner dim K), ((M, K, rate), ...); empty = peak_flops
    # for every shape. Small matmuls run far below the peak on a CPU (here 8-row ones reached
    # 22-63 GFLOP/s, 128-row ones 70-88).
    matmul_rates: tuple = ()
    # A last-level cache: a step whose bytes fit in half of it (the rest is shared with other
    # work and the step's own copies) streams them at cache_bandwidth. 0 = none modelled.
    cache_bytes: float = 0.0
    cache_bandwidth: float = 0.0

    def stream_bandwidth(self, step_bytes: float) -> float:
        if self.cache_bandwidth and step_bytes <= self.cache_bytes / 2:
            return self.cache_bandwidth
        return self.bandwidth

    def peak_at(self, rows: float, inner: float) -> float:
        """Matmul FLOP/s for M = rows, K = inner: bilinear in log2 M, log2 K over the measured
        grid, clamped to its edges; peak_flops where nothing was measured."""
        if not self.matmul_rates:
            return self.peak_flops
        ms = sorted({m for m, _, _ in self.matmul_rates})
        ks = sorted({k for _, k, _ in self.matmul_rates})
        rate = {(m, k): r for m, k, r in self.matmul_rates}

        def bracket(grid, x):
            x = min(max(x, grid[0]), grid[-1])
            i = max(j for j in range(len(grid)) if grid[j] <= x)
            if i == len(grid) - 1:
                return grid[i], grid[i], 0.0
            lo, hi = grid[i], grid[i + 1]
            return lo, hi, math.log2(x / lo) / math.log2(hi / lo)

        m0, m1, fm = bracket(ms, rows)
        k0, k1, fk = bracket(ks, inner)
        low = rate[m0, k0] * (1 - fk) + rate[m0, k1] * fk
        high = rate[m1, k0] * (1 - fk) + rate[m1, k1] * fk
        return low * (1 - fm) + high * fm


# Public datasheet numbers (dense, no sparsity). The overhead columns of the accelerators are
# ASSUMPTIONS (order of magnitude, not measured here; override with --step-overhead-us /
# --op-overhead-us): a jitted call is dispatched asynchronously but the engine waits for its
# tokens every step (~tens of us of host round trip), and back-to-back kernels leave a gap of
# ~1-2 us on GPUs (launch through command buffers) and well under 1 us on TPUs (one program).
CHIPS: dict[str, Chip] = {
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, ICI 1,600 Gbit/s (the
    # newer page: 400 GB/s bidirectional), i.e. 200 GB/s each way. 16 GiB as configs/meshes state it.
    "tpu-v5e": Chip("tpu-v5e", 197e12, 819e9, 16 * 2**30, 1600e9 / 8, 30e-6, 0.5e-6, 10e-6,
                    "cloud.google.com/tpu/docs/v5e"),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM2e at 2,765 GB/s, ICI 4,800 Gbit/s
    # (newer page: 1,200 GB/s bidirectional), taken as 600 GB/s each way.
    "tpu-v5p": Chip("tpu-v5p", 459e12, 2765e9, 95 * 2**30, 4800e9 / 8, 30e-6, 0.5e-6, 10e-6,
                    "cloud.google.com/tpu/docs/v5p"),
    # nvidia.com H100 datasheet, SXM: 989 TFLOP/s bf16 dense (1,979 with sparsity), 80 GB HBM3 at
    # 3.35 TB/s, NVLink 900 GB/s total (450 GB/s each way: what one all-reduce direction gets).
    "h100": Chip("h100", 989e12, 3.35e12, 80e9, 450e9, 20e-6, 1.5e-6, 10e-6,
                 "nvidia.com/en-us/data-center/h100 (SXM)"),
    # nvidia.com H200 datasheet, SXM: same compute as H100, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s.
    "h200": Chip("h200", 989e12, 4.8e12, 141e9, 450e9, 20e-6, 1.5e-6, 10e-6,
                 "nvidia.com/en-us/data-center/h200"),
}
CHIP_NAMES = sorted(CHIPS) + ["cpu"]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1, "int8": 1}


# ----------------------------------------------------------------------------- the CPU probe
def median_seconds(fn, *args, reps: int) -> float:
    """Median wall time of ``fn(*args)`` run to completion, after one compiling/warming call."""
    import jax

    jax.block_until_ready(fn(*args))  # compile and warm
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@functools.lru_cache(maxsize=1)
def probe_cpu(reps: int = 30) -> Chip:
    """This machine's CPU as a Chip, measured once per process (medians; ~10 s).

    * bandwidth: a matrix-vector product [1, 2048] x [2048, 4096] f32 (32 MiB of weights, larger
      than L2): the rate at which a decode step's matmuls actually stream weights here (XLA:CPU
      reaches about a third of a plain ``jnp.sum``'s bandwidth in a matvec);
    * peak: a [32, 1024] x [1024, 1024] f32 matmul: the throughput at the row counts decode and
      verification run (decode-sized matmuls reach well under the large-matmul peak here);
    * matmul rates: [M, K] x [K, 512] for M in 8, 32, 128 and K in 64, 256, 1024 (a generic
      grid, not any model's shapes): the rate falls with the inner dimension;
    * cache bandwidth: eight matrix-vector products over distinct 1 MiB weights (8 MiB: inside
      the last-level cache, whose size is read from sysfs): a small model's weights stay there
      between steps (a dense draft always; an MoE when the same experts are routed again, as in
      --validate's fixed tokens);
    * move bandwidth: jitted transposes of eight [512, 512] f32 arrays (read + write), the rate of
      the copies XLA:CPU inserts (KV-cache transposes for attention, expert weight slices);
    * step overhead: a jitted call of one tiny op, waited for;
    * per-op overhead: the slope of the time of a chain of 1 vs 129 dependent tiny matmuls
      (each an executed op; nothing fuses across a dot).
    None of these runs a jaxspec model, so the validation is not fitted to what it checks.
    """
    import jax
    import jax.numpy as jnp

    key = jax.random.key(0)
    v = jax.random.normal(key, (1, 2048), jnp.float32)
    w = jax.random.normal(key, (2048, 4096), jnp.float32)
    matvec = jax.jit(jnp.matmul)
    tiny_s = median_seconds(jax.jit(lambda x: x + 1.0), jnp.ones((4,), jnp.float32), reps=reps * 4)
    bandwidth = w.nbytes / max(median_seconds(matvec, v, w, reps=reps) - tiny_s, 1e-9)
    a = jax.random.normal(key, (32, 1024), jnp.float32)
    b = jax.random.normal(key, (1024, 1024), jnp.float32)
    peak = 2.0 * 32 * 1024 * 1024 / max(median_seconds(matvec, a, b, reps=reps) - tiny_s, 1e-9)
    # Eight matmuls with distinct weights per call, so the call's own overhead is amortised.
    eight = jax.jit(lambda x, ws: sum(x @ w for w in ws))
    row = jax.random.normal(key, (1, 512), jnp.float32)
    small = [jax.random.normal(jax.random.key(i), (512, 512), jnp.float32) for i in range(8)]
    cache_bw = 8 * small[0].nbytes / max(median_seconds(eight, row, small, reps=reps * 2) - tiny_s, 1e-9)
    rates = []
    for rows in (8, 32, 128):
        for inner in (64, 256, 1024):
            lhs = jax.random.normal(key, (rows, inner), jnp.float32)
            ws = [jax.random.normal(jax.random.key(i), (inner, 512), jnp.float32) for i in range(8)]
            seconds = (median_seconds(eight, lhs, ws, reps=reps) - tiny_s) / 8
            rates.append((rows, inner, 2.0 * rows * inner * 512 / max(seconds, 1e-9)))
    # Eight transposed copies of distinct 1 MiB arrays per call (+ 0: a real copy, not a layout
    # bitcast), sized like the KV and expert-slice copies of small steps.
    transpose = jax.jit(lambda xs: [x.T + 0.0 for x in xs])
    move = 2 * 8 * small[0].nbytes / max(median_seconds(transpose, small, reps=reps * 2) - tiny_s, 1e-9)

    def chain(n):
        def f(x, m):
            for _ in range(n):
                x = jnp.tanh(x @ m)
            return x
        return jax.jit(f)

    x, m = jnp.ones((4, 8), jnp.float32), jnp.full((8, 8), 0.1, jnp.float32)
    short, long_ = median_seconds(chain(1), x, m, reps=reps * 4), median_seconds(chain(129), x, m, reps=reps * 4)
    op_s = max((long_ - short) / 128, 0.0)
    return Chip("cpu", peak, bandwidth, 0.0, 0.0, max(short - op_s, 0.0), op_s, 0.0,
                "measured here: matvec bandwidth, matmul grid, transpose, tiny-op call and chain", move,
                tuple(rates), _last_level_cache_bytes(), cache_bw)


def _last_level_cache_bytes() -> float:
    """Size of this CPU's largest cache from sysfs (Linux), 0 where unknown."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1024, "M": 1024 ** 2}.get(text[-1:], 1)
        sizes.append(float(text.rstrip("KM")) * scale)
    return max(sizes, default=0.0)


# ----------------------------------------------------------------------------- HLO op counts (CPU)
_FREE_OPS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all"}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\w+)\[([\d,]*)\]\S* ([a-z][a-z\-]*)\(|"
                    r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*? ([a-z][a-z\-]*)\(")
_ITEMSIZE = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}
# Fusions XLA names after a root that only moves data: a transpose or a (layout-changing) copy,
# or a contiguous dynamic slice.
_MOVES = ("copy", "transpose")
_SLICES = ("dynamic-slice",)


@dataclasses.dataclass(frozen=True)
class HloCounts:
    """What a compiled step executes beyond the roofline's weights and KV, each as (at expert share
    0, slope per unit of expert share): kernels, and bytes of data-movement ops (transposes of the
    KV cache, copies of expert weight slices) counted as written and read back once."""

    ops: tuple[float, float]
    moved_bytes: tuple[float, float]  # transposes and copies
    sliced_bytes: tuple[float, float] = (0.0, 0.0)  # contiguous slices
    call_s: float | None = None  # measured dispatch of a no-op call with the step's arguments

    def at(self, share: float) -> tuple[float, float, float]:
        return tuple(a + b * share for a, b in (self.ops, self.moved_bytes, self.sliced_bytes))


def count_hlo_ops(hlo_text: str) -> HloCounts:
    """Kernels and data-movement bytes of a compiled step (``HloCounts``).

    Walks the entry computation: fusions, dots, copies... count 1 each; a while loop with a known
    trip count counts its body and condition that many times; a conditional counts branch 0
    (``lax.cond``'s false branch: the expert was not chosen) with weight 1 - s and the others with
    s shared equally, where s is the share of experts a step wakes (the only conditionals in
    jaxspec's steps are the MoE dispatch's expert skips). No-ops (parameters, tuples, bitcasts)
    are free. A copy / transpose / dynamic-slice op or fusion adds 2 x its output bytes (written,
    then read by its consumer instead of the original)."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if line.endswith("{") and not line.startswith(" "):
            current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None:
            comps[current].append(line)

    def add(acc, n, sub):
        return tuple(a + n * b for a, b in zip(acc, sub))

    @functools.lru_cache(maxsize=None)
    def walk(name: str) -> tuple[float, ...]:
        acc = (0.0,) * 6  # ops, moved bytes, sliced bytes: each (value, slope in the expert share)
        for line in comps.get(name, ()):
            m = _INSTR.match(line)
            if not m:
                continue
            iname, dtype, dims, op = (m.group(1), m.group(2), m.group(3), m.group(4)) if m.group(1) else \
                (m.group(5), None, None, m.group(6))
            if op in _FREE_OPS:
                continue
            moved = sliced = 0.0
            root = op if op != "fusion" else iname.split("_")[0]
            if dtype in _ITEMSIZE and root in _MOVES + _SLICES:
                nbytes = 2.0 * _ITEMSIZE[dtype] * math.prod(int(x) for x in dims.split(",") if x)
                moved, sliced = (0.0, nbytes) if root in _SLICES else (nbytes, 0.0)
            acc = add(acc, 1, (1.0, 0.0, moved, 0.0, sliced, 0.0))
            if op == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                n = int(trips.group(1)) if trips else 1
                for key in ("body", "condition"):
                    sub = re.search(key + r"=%?([\w.\-]+)", line)
                    if sub:
                        acc = add(acc, n, walk(sub.group(1)))
            elif op == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", line)
                names = [b.strip().lstrip("%") for b in branches.group(1).split(",")] if branches else []
                if len(names) >= 2:
                    off = walk(names[0])
                    on = [sum(x) / (len(names) - 1) for x in zip(*(walk(b) for b in names[1:]))]
                    # base: the off branch; slope: (on - off) per unit of share.
                    acc = add(acc, 1, (off[0], on[0] - off[0], off[2], on[2] - off[2], off[4], on[4] - off[4]))
            elif op == "call":
                sub = re.search(r"to_apply=%?([\w.\-]+)", line)
                if sub:
                    acc = add(acc, 1, walk(sub.group(1)))
        return acc

    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    ops, ops_s, moved, moved_s, sliced, sliced_s = walk(entry)
    return HloCounts((ops, ops_s), (moved, moved_s), (sliced, sliced_s))


def step_hlo(cfg: ModelConfig, rows: int, tokens: int, context: int, max_len: int) -> str:
    """Optimised HLO of the engine-like forward (tools/roofline.py's jitted step), abstract weights."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxspec.models import KVCache
    from jaxspec.models.transformer import abstract_model

    roofline = roofline_tool()
    graphdef, state = nnx.split(abstract_model(cfg))
    cache = jax.eval_shape(lambda: KVCache.create(cfg, rows, max_len))
    toks = jax.ShapeDtypeStruct((rows, tokens), jnp.int32)
    start = jax.ShapeDtypeStruct((rows,), jnp.int32)
    return roofline._forward_for(graphdef, context).lower(state, cache, toks, start).compile().as_text()


def cpu_hlo_counter(cfg: ModelConfig, cache_len: int | None = None):
    """f(rows, tokens, context) -> HloCounts of ``cfg``'s step compiled for this CPU (cached);
    the cache holds ``cache_len`` positions per row (default: the context)."""

    @functools.lru_cache(maxsize=None)
    def counts(rows: int, tokens: int, context: int) -> HloCounts:
        max_len = max(cache_len or context, context, tokens)
        hlo = count_hlo_ops(step_hlo(cfg, rows, tokens, context, max_len))
        return dataclasses.replace(hlo, call_s=call_overhead_s(cfg, rows, tokens, context, max_len))

    return counts


def call_overhead_s(cfg: ModelConfig, rows: int, tokens: int, context: int, max_len: int,
                    reps: int = 40, max_bytes: float = 2**30) -> float | None:
    """Host cost of one step call here, without the step: a jitted no-op with the forward's exact
    arguments (static graphdef, parameter state, donated cache, tokens, start) called and waited
    for. It grows with the number of parameter leaves and the cache. None for models too large to
    hold zeros of here (the chip's tiny-call overhead is used instead)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxspec.models import KVCache
    from jaxspec.models.transformer import abstract_model

    itemsize = DTYPE_BYTES[cfg.dtype]
    cache_bytes = 2 * cfg.num_layers * rows * max_len * cfg.num_kv_heads * cfg.head_dim * itemsize
    if cfg.param_counts()["total"] * itemsize + cache_bytes > max_bytes:
        return None
    graphdef, abstract = nnx.split(abstract_model(cfg))
    state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)
    cache = KVCache.create(cfg, rows, max_len)
    toks, start = jnp.zeros((rows, tokens), jnp.int32), jnp.zeros((rows,), jnp.int32)
    noop = jax.jit(lambda graphdef, kv_len, state, cache, tokens, start: (tokens + 1, cache),
                   static_argnums=(0, 1), donate_argnums=(3,))
    times = []
    for i in range(reps + 5):  # 5 warm-up calls (compile)
        t = time.perf_counter()
        out, cache = noop(graphdef, context, state, cache, toks, start)
        jax.block_until_ready((out, cache))
        if i >= 5:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


@functools.lru_cache(maxsize=1)
def roofline_tool():
    """tools/roofline.py (its jitted forward, model builders and timing), imported from the checkout."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("jaxspec_tools_roofline", REPO / "tools" / "roofline.py")
    if spec is None or not (REPO / "tools" / "roofline.py").exists():
        raise RuntimeError("tools/roofline.py not found: --validate and CPU op counts need a source checkout")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def describe_chip(chip: Chip) -> str:
    move = f" (copies {chip.move_bandwidth / 1e9:.3g} GB/s)" if chip.move_bandwidth else ""
    if chip.cache_bandwidth:
        move += f", {chip.cache_bandwidth / 1e9:.3g} GB/s within {chip.cache_bytes / 2**20:.0f} MiB of cache"
    return (f"# chip {chip.name}: {chip.peak_flops / 1e12:.3g} TFLOP/s, {chip.bandwidth / 1e9:.4g} GB/s{move}, "
            f"step overhead "
            f"{chip.step_overhead_s * 1e6:.1f} us + {chip.op_overhead_s * 1e6:.2f} us per kernel ({chip.source})")
