"""Choosing the MoE dispatch per token count by measurement.

Which exact dispatch is cheapest depends on the machine and on how many tokens a step
routes: on a CPU, a 1-token decode is bound by reading two experts' weights, a 40-token
verification by the FLOPs of computing each chosen expert over rows that never went to
it. ``measure_dispatch`` times every candidate backend on the model's own expert shapes
(random weights, uniform routing) at each token count a runner compiles, and
``DispatchTable`` carries the winners into the steps as a static, hashable backend.
All candidates are exact and dropless, so the choice changes speed only.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.config import ModelConfig
from jaxspec.models.expert_slices import ExpertSlices
from jaxspec.models.moe_dispatch import SLICE_BACKENDS, choose_backend, grouped_kernel, load_backend, run_backend

# ``expert_rows`` is left out: it is often the fastest to run from 16 routed tokens up, but its
# ``lax.switch`` over row counts compiles in about 5 s per layer and step shape, so a Mixtral-shaped
# server's warm-up (some 40 step shapes of 6 layers) took over ten minutes with it. Named, it still runs.
CPU_CANDIDATES = ("per_expert", "per_expert_static", "expert_chunks", "sorted", "dense")
# The C++ kernel's backend, a candidate where it builds (``moe_cpu``) and the experts are float32.
CPU_KERNEL = "cpu_fused"
# The largest token count measured: beyond it a step keeps the choice at this count (the backends'
# costs grow about linearly there), and measuring larger steps would lengthen start-up for little.
MAX_TUNED_TOKENS = 2048
# Experts smaller than this per layer stay in the CPU's caches whatever the backend, so their steps
# cost overhead only: no measurement tells the backends apart.
MIN_TUNED_EXPERT_BYTES = 1 << 20
# A read this large flushes a CPU's last-level cache (``measure_dispatch``'s ``evict_bytes``).
MAX_EVICT_BYTES = 64 << 20
# Backends within this fraction of the fastest at a count are a tie (``table_from_times``): medians of
# a few reps on a shared machine differ by more than that from one start to the next.
TIE_MARGIN = 0.05


@dataclasses.dataclass(frozen=True)
class DispatchTable:
    """The backend for each measured token count; other counts use the next measured one above,
    else ``fallback``. Hashable: part of a step's static configuration."""

    choices: tuple[tuple[int, str], ...]  # (token count, backend), ascending
    fallback: str = "auto"
    # Measured for expert weights held per expert as well (``ExpertSlices``): the steps then take them so.
    expert_slices: bool = False
    # ``moe_dispatch.dispatch`` passes weights held per expert through: each choice stacks what it needs.
    takes_expert_slices = True

    def backend_for(self, num_tokens: int, top_k: int = 1, kernel: str = "gmm", num_experts: int | None = None) -> str:
        for count, name in self.choices:
            if num_tokens <= count:
                return name
        # Beyond the measured counts, ``auto`` decides as it would untuned: for these experts'
        # format (a quantized grouped matmul validated nowhere keeps ``ragged``) and routed rows.
        return choose_backend(self.fallback, num_tokens, top_k=top_k, kernel=kernel, num_experts=num_experts)

    def backends(self) -> set[str]:
        """Every backend a step may take from this table (``auto`` as it resolves on a CPU)."""
        names = {name for _, name in self.choices} | {self.fallback}
        return names - {"auto"} | ({"per_expert", "expert_chunks", "dense"} if "auto" in names else set())

    def __call__(self, x, expert_ids, weights, w_gate, w_up, w_down) -> jax.Array:
        name = self.backend_for(x.shape[0], top_k=expert_ids.shape[1], kernel=grouped_kernel(w_gate),
                                num_experts=w_gate.shape[0])
        return run_backend(name, x, expert_ids, weights, w_gate, w_up, w_down)


def tuning_counts(max_tokens: int, cap: int = MAX_TUNED_TOKENS) -> list[int]:
    """Powers of two from 1 to the first >= ``max_tokens`` (at most ``cap``): a step of N tokens
    takes the choice of the next measured count up (``DispatchTable.backend_for``)."""
    counts, n = [1], 1
    while n < min(max_tokens, cap):
        n *= 2
        counts.append(n)
    return counts


def measure_dispatch(cfg: ModelConfig, token_counts: Sequence[int], candidates: Sequence[str] = CPU_CANDIDATES,
                     reps: int = 7, seed: int = 0, evict_bytes: int = 0,
                     expert_slices: bool = False) -> dict[int, dict[str, float]]:
    """Median seconds of one MoE layer's dispatch for each token count and candidate.

    ``evict_bytes``: read a buffer this large before every timed call. Inside a forward, the rest
    of the model streams through the caches between two calls of one layer's dispatch, so its
    weights are read cold; timed back to back they would stay cached, which favours backends that
    read every expert (``dense`` wins a 1-token step alone and loses it inside the model).
    ``expert_slices``: weights held per expert as well (``ExpertSlices``), as a runner that splits
    them passes them."""
    rng = np.random.default_rng(seed)
    e, d, f = cfg.num_experts, cfg.d_model, cfg.moe_mlp_dim
    dt = jnp.dtype(cfg.dtype)
    w_gate, w_up = (jnp.asarray(rng.normal(size=(e, d, f)) * 0.02, dt) for _ in range(2))
    w_down = jnp.asarray(rng.normal(size=(e, f, d)) * 0.02, dt)
    if expert_slices:
        w_gate, w_up, w_down = (ExpertSlices([w[i] for i in range(e)], w) for w in (w_gate, w_up, w_down))
    evict = None
    if evict_bytes > 0:
        flush = jnp.ones((evict_bytes // 4,), jnp.float32)
        total = jax.jit(jnp.sum)
        evict = lambda: total(flush).block_until_ready()  # noqa: E731
    times: dict[int, dict[str, float]] = {}
    for n in sorted(set(int(t) for t in token_counts)):
        x = jnp.asarray(rng.normal(size=(n, d)), dt)
        ids = jnp.asarray(np.stack([rng.choice(e, cfg.num_experts_per_tok, replace=False) for _ in range(n)]),
                          jnp.int32)
        w = jnp.full((n, cfg.num_experts_per_tok), 1.0 / cfg.num_experts_per_tok, jnp.float32)
        times[n] = {}
        for name in candidates:
            fn = jax.jit(functools.partial(run_backend, name))
            fn(x, ids, w, w_gate, w_up, w_down).block_until_ready()
            samples = []
            for _ in range(reps):
                if evict is not None:
                    evict()
                t = time.perf_counter()
                fn(x, ids, w, w_gate, w_up, w_down).block_until_ready()
                samples.append(time.perf_counter() - t)
            times[n][name] = statistics.median(samples)
    return times


def table_from_times(times: dict[int, dict[str, float]], fallback: str = "auto",
                     tie: float = TIE_MARGIN) -> DispatchTable:
    """The fastest backend per count, where a tie (within ``tie`` of the fastest) goes to the
    previous count's choice, else to the first tied backend in the row's order (candidate order).
    Timing noise then neither flips a count's choice between starts nor alternates backends
    between neighbouring counts, each of which is a step shape of its own to compile and cache."""
    choices, previous = [], None
    for n, row in sorted(times.items()):
        best = min(row.values())
        tied = [name for name, t in row.items() if t <= best * (1.0 + tie)]
        choice = previous if previous in tied else tied[0]
        choices.append((n, choice))
        previous = choice
    return DispatchTable(tuple(choices), fallback)


def tune_dispatch(cfg: ModelConfig, token_counts: Sequence[int], candidates: Sequence[str] = CPU_CANDIDATES,
                  reps: int = 7, evict_bytes: int = 0, extend_last: bool = False,
                  store: str | os.PathLike | None = None, expert_slices: bool = False) -> DispatchTable:
    """The measured-fastest backend per token count; beyond the largest, ``auto`` (or with
    ``extend_last`` the largest count's winner). ``store``: a directory where the table is kept per
    machine, jax version and expert shape, so a restart reads it instead of measuring again."""
    key = machine_key({"experts": [cfg.num_experts, cfg.d_model, cfg.moe_mlp_dim], "top_k": cfg.num_experts_per_tok,
                       "dtype": str(jnp.dtype(cfg.dtype)), "counts": sorted(token_counts),
                       "candidates": list(candidates), "evict_bytes": evict_bytes, "extend_last": extend_last,
                       "expert_slices": expert_slices})
    times = stored_times(store, "moe-dispatch", key, lambda: measure_dispatch(
        cfg, token_counts, candidates, reps, evict_bytes=evict_bytes, expert_slices=expert_slices))
    return dataclasses.replace(_table(times, extend_last), expert_slices=expert_slices)


Times = dict[int, dict[str, float]]

# Steps that route up to this many tokens (decode, verification) take their backend from timing the
# model's whole forward: timed alone, one layer's dispatch ranked them otherwise than the model's
# steps did. Prefill-sized steps keep the per-layer times: a forward per count and backend would
# take minutes to compile there.
IN_MODEL_MAX_TOKENS = 64
# The candidates timed in the forward (experts held per expert and stacked, ``ExpertSlices``).
IN_MODEL_CANDIDATES = ("per_expert_static", "expert_chunks", "dense")


def with_kernel(cfg: ModelConfig, candidates: Sequence[str]) -> tuple[str, ...]:
    """``candidates`` and, where it can run for these experts, the C++ kernel's backend, first: a tie
    goes to it (``table_from_times``), which keeps the experts stacked (fewer arguments per step)."""
    ok = jnp.dtype(cfg.dtype) == jnp.float32 and cfg.quantization is None and load_backend(CPU_KERNEL)
    return (CPU_KERNEL, *candidates) if ok else tuple(candidates)


def uses_expert_slices(table: DispatchTable) -> bool:
    """Whether a step may take a backend that reads experts held per expert (``SLICE_BACKENDS``)."""
    return bool(table.backends() & SLICE_BACKENDS)


def measure_in_model(seconds: Callable[[str, int], float], token_counts: Sequence[int],
                     candidates: Sequence[str] = IN_MODEL_CANDIDATES, rounds: int = 3) -> Times:
    """Per count and candidate, the median over ``rounds`` of ``seconds(backend, count)`` (a forward
    routing ``count`` tokens, timed by the caller), candidates taken in turns within each round so a
    machine that speeds up or slows down meanwhile favours none."""
    samples: dict[int, dict[str, list[float]]] = {n: {name: [] for name in candidates} for n in token_counts}
    for _ in range(rounds):
        for n in token_counts:
            for name in candidates:
                samples[n][name].append(seconds(name, n))
    return {n: {name: statistics.median(v) for name, v in row.items()} for n, row in samples.items()}


def with_choices_from(table: DispatchTable, times: Times) -> DispatchTable:
    """``table`` with the counts in ``times`` chosen from those times (``table_from_times``'s rules)."""
    inside = dict(table_from_times(times).choices)
    return dataclasses.replace(table, choices=tuple((n, inside.get(n, name)) for n, name in table.choices))


def stored_times(store: str | os.PathLike | None, prefix: str, key: dict, measure: Callable[[], Times]) -> Times:
    """``measure()``, kept in ``store`` (a directory, or None: not kept) under a digest of ``key``, so
    a restart with the same key reads the times instead of measuring again. The times are kept, not
    the choices: the rule that picks from them may change."""
    path = None
    if store is not None:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(store) / f"{prefix}-{digest}.json"
        try:
            saved = json.loads(path.read_text())["times"]
            times = {int(n): {str(b): float(t) for b, t in row.items()} for n, row in saved.items()}
            if not times or not all(times.values()):
                raise ValueError("empty table")
            return times
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # not measured yet here (or unreadable): measure
    times = measure()
    if path is not None:
        try:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"times": times}))
            tmp.replace(path)  # whole or not at all, for a concurrent reader
        except OSError:
            pass  # a read-only cache directory: measure again next time
    return times


def _table(times: dict[int, dict[str, float]], extend_last: bool) -> DispatchTable:
    table = table_from_times(times)
    if extend_last and table.choices:
        table = dataclasses.replace(table, fallback=table.choices[-1][1])
    return table


def worth_measuring(cfg: ModelConfig) -> bool:
    """Whether ``measured`` dispatch measures for this model here: float MoE experts of at least
    ``MIN_TUNED_EXPERT_BYTES`` a layer, on a CPU (accelerators choose by validated kernels)."""
    expert_bytes = 3 * cfg.num_experts * cfg.d_model * cfg.moe_mlp_dim * jnp.dtype(cfg.dtype).itemsize
    return (cfg.is_moe and cfg.quantization is None and expert_bytes >= MIN_TUNED_EXPERT_BYTES
            and jax.default_backend() == "cpu")


def measured_table(cfg: ModelConfig, max_tokens: int, model_bytes: int, reps: int = 5,
                   store: str | os.PathLike | None = None, expert_slices: bool = False) -> DispatchTable:
    """The table for steps of up to ``max_tokens`` routed tokens of a model of ``model_bytes``
    (what streams through the caches between two calls of one layer), the winner at the largest
    measured count beyond it. ``expert_slices``: measured with the weights held per expert."""
    return tune_dispatch(cfg, tuning_counts(max_tokens), with_kernel(cfg, CPU_CANDIDATES), reps=reps,
                         evict_bytes=min(model_bytes, MAX_EVICT_BYTES), extend_last=True, store=store,
                         expert_slices=expert_slices)


def machine_key(key: dict) -> dict:
    """``key`` with what any measurement here also depends on: the machine and the jax version."""
    return {"machine": _machine(), "jax": jax.__version__, **key}


def _machine() -> str:
    """What a measurement depends on besides the shapes: the processor and how many cores jax may use."""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} x{os.cpu_count()} {jax.devices()[0].device_kind}"
