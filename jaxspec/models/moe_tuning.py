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
import statistics
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.config import ModelConfig
from jaxspec.models.moe_dispatch import BACKENDS, choose_backend, grouped_kernel

CPU_CANDIDATES = ("per_expert", "per_expert_static", "expert_rows", "sorted", "dense")


@dataclasses.dataclass(frozen=True)
class DispatchTable:
    """The backend for each measured token count; other counts use the next measured one above,
    else ``fallback``. Hashable: part of a step's static configuration."""

    choices: tuple[tuple[int, str], ...]  # (token count, backend), ascending
    fallback: str = "auto"

    def backend_for(self, num_tokens: int, top_k: int = 1, kernel: str = "gmm", num_experts: int | None = None) -> str:
        for count, name in self.choices:
            if num_tokens <= count:
                return name
        # Beyond the measured counts, ``auto`` decides as it would untuned: for these experts'
        # format (a quantized grouped matmul validated nowhere keeps ``ragged``) and routed rows.
        return choose_backend(self.fallback, num_tokens, top_k=top_k, kernel=kernel, num_experts=num_experts)

    def __call__(self, x, expert_ids, weights, w_gate, w_up, w_down) -> jax.Array:
        name = self.backend_for(x.shape[0], top_k=expert_ids.shape[1], kernel=grouped_kernel(w_gate),
                                num_experts=w_gate.shape[0])
        return BACKENDS[name](x, expert_ids, weights, w_gate, w_up, w_down)


def measure_dispatch(cfg: ModelConfig, token_counts: Sequence[int], candidates: Sequence[str] = CPU_CANDIDATES,
                     reps: int = 7, seed: int = 0) -> dict[int, dict[str, float]]:
    """Median seconds of one MoE layer's dispatch for each token count and candidate."""
    rng = np.random.default_rng(seed)
    e, d, f = cfg.num_experts, cfg.d_model, cfg.moe_mlp_dim
    dt = jnp.dtype(cfg.dtype)
    w_gate, w_up = (jnp.asarray(rng.normal(size=(e, d, f)) * 0.02, dt) for _ in range(2))
    w_down = jnp.asarray(rng.normal(size=(e, f, d)) * 0.02, dt)
    times: dict[int, dict[str, float]] = {}
    for n in sorted(set(int(t) for t in token_counts)):
        x = jnp.asarray(rng.normal(size=(n, d)), dt)
        ids = jnp.asarray(np.stack([rng.choice(e, cfg.num_experts_per_tok, replace=False) for _ in range(n)]),
                          jnp.int32)
        w = jnp.full((n, cfg.num_experts_per_tok), 1.0 / cfg.num_experts_per_tok, jnp.float32)
        times[n] = {}
        for name in candidates:
            fn = jax.jit(BACKENDS[name])
            fn(x, ids, w, w_gate, w_up, w_down).block_until_ready()
            samples = []
            for _ in range(reps):
                t = time.perf_counter()
                fn(x, ids, w, w_gate, w_up, w_down).block_until_ready()
                samples.append(time.perf_counter() - t)
            times[n][name] = statistics.median(samples)
    return times


def table_from_times(times: dict[int, dict[str, float]], fallback: str = "auto") -> DispatchTable:
    return DispatchTable(tuple((n, min(row, key=row.get)) for n, row in sorted(times.items())), fallback)


def tune_dispatch(cfg: ModelConfig, token_counts: Sequence[int], candidates: Sequence[str] = CPU_CANDIDATES,
                  reps: int = 7) -> DispatchTable:
    """The measured-fastest backend per token count (``auto`` beyond the largest)."""
    return table_from_times(measure_dispatch(cfg, token_counts, candidates, reps))
