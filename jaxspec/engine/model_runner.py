"""The device side of plain generation: parameters, the slot cache and the jitted steps.

``ModelRunner`` owns one model's parameters and its KV cache. Prefill lengths and
row counts, decode row counts and attention spans are bucketed, so after
``warmup()`` no new request shape causes a compilation. The cache is donated to
every step (updated in place).

On a mesh (``placement=``, see ``jaxspec.mesh``) the parameters and the cache are
placed by the logical-axis rules, MoE layers dispatch through
``moe_parallel.ExpertParallel`` when experts or their width are split, and the
steps (``jaxspec.engine.steps``) are compiled with explicit in/out shardings: the cache
comes back with the sharding it went in with, so nothing is resharded between decode steps.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspec.engine.cpu_backends import cpu_attention_unfit, cpu_matmul_unfit, require_fit
from jaxspec.engine.mixed_step import forward_mixed, mixed_step
from jaxspec.engine.slots import SlotTable
from jaxspec.engine.step import DecodePlan, QueuedStep, StepResult
from jaxspec.engine.steps import (PlacedBackend, SpanSteps, StepStatics, _forward, params_tree, placed_steps,
                                  slots_unsplit, unplaced_steps)
from jaxspec.mesh import Placement, check_placement
from jaxspec.models.dense_cpu import check_matmul_backend
from jaxspec.models.layers import check_attention_backend
from jaxspec.models import KVCache, Transformer
from jaxspec.models.kv_cache import check_kv_dtype, page_groups, set_table_row
from jaxspec.models.expert_slices import available_memory, expert_bytes, split_experts
from jaxspec.models.moe_parallel import moe_backend_for
from jaxspec.models.transformer import check_aux_layers
from jaxspec.sampling import BatchSampling, pad_sampling, take_sampling

MIN_PREFILL_BUCKET = 16
FINE_PREFILL_FROM = 128  # below it a step's fixed cost outweighs padding
MIXED_PREFILL = ("auto", "on", "off")
MIN_KV_BUCKET = 128


def prefill_buckets(max_len: int, min_bucket: int = MIN_PREFILL_BUCKET, fine_from: int = FINE_PREFILL_FROM) -> list[int]:
    """Powers of two from ``min_bucket`` and, from ``fine_from`` on, 1.5x each of them too, capped
    by (and ending at) ``max_len``. A prompt's padding is then at most 1.5x its length where prefill
    compute dominates (a 140-token prompt prefills 192 positions, not 256; 2,100 tokens 3,072, not
    4,096), for two more compilations per doubling."""
    buckets, b = [], min_bucket
    while b < max_len:
        buckets.append(b)
        if b >= fine_from and b + b // 2 < max_len:
            buckets.append(b + b // 2)
        b *= 2
    buckets.append(max_len)
    return buckets


def batch_buckets(num_slots: int) -> list[int]:
    """Compiled row counts of a decode step: powers of two below ``num_slots``, then ``num_slots``
    (like CUDA-graph batch sizes: a step runs the smallest that holds its active rows)."""
    out, b = [], 1
    while b < num_slots:
        out.append(b)
        b *= 2
    return out + [num_slots]


def kv_buckets(max_len: int, min_bucket: int = MIN_KV_BUCKET, factor: int = 2) -> list[int]:
    """Compiled attention spans: ``min_bucket`` times powers of ``factor``, ending at ``max_len``."""
    out, b = [], min(min_bucket, max_len)
    while b < max_len:
        out.append(b)
        b *= factor
    return out + [max_len]


def bucket_up(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n."""
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass(frozen=True)
class DecodeHandle:
    """A dispatched decode step: its tokens and expert load still on the device."""

    rows: np.ndarray  # [n] the slots it stepped
    where: np.ndarray  # [n] the batch row of each
    tokens: jax.Array  # [B] one token per batch row; [B, steps] for a call of several steps
    load: jax.Array
    num_valid: jax.Array  # [B] its inputs kept on the device for a chained step
    sampling: BatchSampling
    last: jax.Array  # [B] the tokens a chained step feeds (the last step's)
    steps: int = 1


def scatter_rows(x, where: np.ndarray, rows: int, value) -> np.ndarray:
    """x [n] placed at row indices ``where`` of a [rows, ...] array filled with ``value``."""
    x = np.asarray(x)
    out = np.full((rows, *x.shape[1:]), value, x.dtype)
    out[where] = x
    return out


def scatter_sampling(sampling: BatchSampling, where: np.ndarray, rows: int) -> BatchSampling:
    """Settings [n] placed at row indices ``where`` of [rows] settings (the others greedy)."""
    fills = (0.0, 0, 1.0, 0.0, 0)
    return BatchSampling(*(scatter_rows(x, where, rows, f) for x, f in zip(sampling, fills)))


def pad_rows(x: np.ndarray, rows: int, value) -> np.ndarray:
    """x [n, ...] padded to [rows, ...] with ``value``."""
    x = np.asarray(x)
    if len(x) == rows:
        return x
    return np.concatenate([x, np.full((rows - len(x), *x.shape[1:]), value, x.dtype)])


class ModelRunner:
    """Jitted prefill / decode over a slot cache for one model.

    Steps run over the rows that hold a request, padded to the smallest compiled batch
    bucket (``batch_buckets``), and attend over the smallest compiled span (``kv_buckets``)
    that holds those rows' contexts: an idle slot costs nothing, and attention reads what
    exists rather than the cache's capacity. Padding rows write nothing (slot id S) and
    route to no expert. The host keeps each slot's length (``host_lengths``), so building a
    step needs no device read."""

    def __init__(
        self,
        model: Transformer,
        num_slots: int,
        max_len: int | None = None,
        moe_backend: str | None = None,
        cache_sharding: KVCache | None = None,
        placement: Placement | None = None,
        attention_backend: str = "xla",
        min_kv_bucket: int = MIN_KV_BUCKET,
        max_prefill_rows: int = 4,
        page_size: int | None = None,
        num_pages: int | None = None,
        prefill_chunk: int | None = None,
        kv_dtype: str | None = None,
        mixed_prefill: str = "auto",
        decode_steps: int = 1,
        matmul_backend: str = "xla",
    ):
        """``placement``: run on a mesh (parameters moved to their shardings if they are not
        there yet; ``moe_backend`` then names the per-device expert computation's backend only
        where experts are not split). ``cache_sharding`` alone places just the cache.
        ``max_prefill_rows``: most prompts one prefill call takes (a compiled bucket each).
        ``page_size``: a paged cache of ``num_pages`` pages (see kv_cache); the engine hands out
        pages (``assign_pages``) before a slot is prefilled. ``prefill_chunk``: prompts longer than
        this are prefilled in pieces of at most this many tokens (one per engine step).
        ``kv_dtype``: "int8" stores keys and values in int8 with per-head-per-token scales (see
        kv_cache); None or "auto": the model's dtype. ``mixed_prefill`` (with ``prefill_chunk``):
        "on" runs a full chunk and a decode step as one call (``mixed_step``), "off" as two,
        "auto" mixes on accelerators only (see ``mixed_step`` for why not on a CPU).
        ``decode_steps``: the most plain decode steps one call may run (``dispatch_decode``'s
        ``steps``), each compiled beside the single step; 1 on a mesh (``max_decode_steps``).
        ``matmul_backend``: ``dense_cpu.MATMUL_BACKENDS``, the dense projections' ("cpu": the C++
        products of few rows, where ``cpu_backends.cpu_matmul_unfit`` finds nothing against them)."""
        if decode_steps < 1:
            raise ValueError(f"decode_steps must be >= 1, got {decode_steps}")
        self.decode_steps = decode_steps
        self.cfg = model.cfg
        self.num_slots = num_slots
        self.max_len = max_len or self.cfg.max_seq_len
        if self.max_len > self.cfg.max_seq_len:
            raise ValueError(f"max_len {self.max_len} exceeds the model's max_seq_len {self.cfg.max_seq_len}")
        check_attention_backend(attention_backend)
        check_matmul_backend(matmul_backend)
        self.kv_dtype = check_kv_dtype(kv_dtype)
        self.moe_backend = moe_backend
        self.placement = placement
        self.graphdef, state = nnx.split(model)
        # Placed below (on a mesh); what every step takes, as a nested dict (``params_tree``).
        self.state = params_tree(state)
        self.state_sharding = None
        if placement is not None:
            check_placement(self.cfg, placement)
            self.moe_backend = PlacedBackend(moe_backend_for(placement) or moe_backend, placement)
        self.statics = StepStatics(self.moe_backend, attention_backend, matmul_backend=matmul_backend)
        self._steps = unplaced_steps(self.graphdef, self.statics)
        groups = page_groups(placement, num_slots, page_size)
        if attention_backend == "cpu":
            require_fit("attention", cpu_attention_unfit(self.cfg, placement, page_size, self.kv_dtype))
        if matmul_backend == "cpu":
            require_fit("matmul", cpu_matmul_unfit(self.cfg, placement))
        if groups > 1 and attention_backend == "pallas":
            raise ValueError(f"the pallas attention backend reads whole pages; pages split {groups} ways over the "
                             "mesh's data axis need the xla backend")
        if placement is not None:
            self.state_sharding = state_sharding = params_tree(placement.state_shardings(state))
            self.state = jax.device_put(self.state, state_sharding)
            abstract = KVCache.abstract(self.cfg, num_slots, self.max_len, num_pages=num_pages, page_size=page_size,
                                        kv_dtype=self.kv_dtype, page_groups=groups)
            cache_sharding = placement.cache_shardings(abstract)
        self.cache_sharding = cache_sharding
        if placement is not None:
            # Everything the cache's shardings depend on (the statics join it in ``_placed``).
            self._cache_key = (num_slots, self.max_len, num_pages, page_size, self.kv_dtype, groups)
            self._steps = self._placed()
        # (pages, positions per page, page groups: a slot's pages all come from group slot // (S / groups))
        self.paging = (num_pages, page_size, groups) if page_size is not None else None
        create = functools.partial(KVCache.create, self.cfg, num_slots, self.max_len, num_pages=num_pages,
                                   page_size=page_size, kv_dtype=self.kv_dtype, page_groups=groups)
        if cache_sharding is None:
            # Committed to a device like every later (jit-output) cache, so the first and
            # later steps see the same argument placement and share one compilation.
            self.cache = jax.device_put(create(), jax.devices()[0])
        else:  # created in place, shard by shard (never whole on one device)
            self.cache = jax.jit(create, out_shardings=cache_sharding)()
        # The host's copy of the page table [S, n] (paged caches): edited by assign_pages.
        self.page_table = None if page_size is None else np.full((num_slots, self.max_len // page_size), num_pages,
                                                                    np.int32)
        self.buckets = prefill_buckets(self.max_len)
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk if prefill_chunk is not None and prefill_chunk < self.max_len else None
        if mixed_prefill not in MIXED_PREFILL:
            raise ValueError(f"mixed_prefill must be one of {', '.join(MIXED_PREFILL)}, got {mixed_prefill!r}")
        self.mixed_prefill = mixed_prefill == "on" or (mixed_prefill == "auto" and jax.default_backend() != "cpu")
        # Active rows are packed into batch buckets unless the cache's slots are split over
        # devices (then a step covers every slot in order; idle rows still route to no expert).
        self.compact_rows = cache_sharding is None or slots_unsplit(cache_sharding)
        self.batch_buckets = batch_buckets(num_slots) if self.compact_rows else [num_slots]
        self.prefill_row_buckets = batch_buckets(max(1, min(max_prefill_rows, num_slots)))
        self.kv_buckets = kv_buckets(self.max_len, min_kv_bucket)
        self.host_lengths = np.zeros(num_slots, np.int32)
        # Tokens routed to each expert [L, E], summed on the host: the step's outputs are
        # ready together, and a device add would cost one more dispatch per step.
        self.expert_load = np.zeros((self.cfg.num_layers, max(self.cfg.num_experts, 1)), np.int64)
        # With ``capture_hidden``: the last prefill/decode step's aux hidden states [rows, T, F] (device).
        self.captured = None

    # ----------------------------------------------------------------- helpers
    def _placed(self) -> tuple[Callable, SpanSteps, SpanSteps]:
        key = (self.graphdef, self.statics, *self._cache_key)
        return placed_steps(self.graphdef, self.statics, self.state_sharding, self.cache_sharding, key)

    def model(self, state=None) -> Transformer:
        return nnx.merge(self.graphdef, self.state if state is None else state)

    def bucket_for(self, length: int) -> int:
        if length > self.max_len:
            raise ValueError(f"length {length} exceeds the cache length {self.max_len}")
        return bucket_up(length, self.buckets)

    def kv_bucket_for(self, positions: int) -> int:
        """The compiled attention span holding ``positions`` cache positions."""
        return bucket_up(min(int(positions), self.max_len), self.kv_buckets)

    def forward_fn(self) -> Callable:
        """A pure function (state, tokens, start, cache, slot_ids, num_valid, kv_len=None) -> ForwardOutput,
        for other runners (speculative verification) to jit with their own steps."""
        return functools.partial(_forward, self.graphdef, self.statics)

    def tune_moe_dispatch(self, tokens_per_row: Sequence[int] = (1,), reps: int = 5):
        """Measure the exact MoE dispatch backends (one layer's, weights read cold as inside a
        forward) at powers of two up to the most tokens a step of this runner routes: decode rows,
        with ``tokens_per_row`` = (1, k+1, ...) verification rows, and prefill calls. Adopt the
        fastest per count (``moe_tuning.DispatchTable``). Single-device CPU runners of float MoE
        models whose experts do not fit the caches; call before the first step. Returns the table,
        or None where there is nothing to measure. The table is kept in the persistent compilation
        cache's directory (when one is set), per machine, jax version and expert shape.

        The candidates include the C++ kernel (``cpu_fused``) where it builds. Where a chosen
        backend reads experts one at a time, the runner holds its expert weights one array per
        expert beside the stacked ones (``models.expert_slices``; not where the copies would take
        over half the host's free memory): XLA:CPU copies a slice of a stacked [E, D, F] array
        before multiplying by it. Steps routing up to ``IN_MODEL_MAX_TOKENS`` tokens are measured as whole forwards of this
        runner (random tokens), the rest one layer at a time."""
        from jaxspec.models.moe_tuning import (IN_MODEL_CANDIDATES, IN_MODEL_MAX_TOKENS, machine_key,
                                               measure_in_model, measured_table, stored_times, tuning_counts,
                                               uses_expert_slices, with_choices_from, with_kernel, worth_measuring)

        if self.placement is not None or self.moe_backend not in (None, "auto") or not worth_measuring(self.cfg):
            return None
        decode = max(self.batch_buckets) * max(tokens_per_row)
        prefill = max(self.prefill_row_buckets) * self.bucket_for(self.prefill_chunk or self.max_len)
        model_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.state))
        # Kept beside the persistent compilation cache, when there is one: a restart measures nothing.
        store = jax.config.jax_compilation_cache_dir or None
        # The per-expert copies double the experts' memory: only where that leaves the host room.
        table = measured_table(self.cfg, max(decode, prefill), model_bytes, reps, store=store,
                               expert_slices=expert_bytes(self.state) <= available_memory() // 2)
        stacked = self.state
        split = split_experts(stacked) if table.expert_slices else None
        if self.paging is None:  # (a paged cache would need pages assigned to time a forward)
            counts = tuning_counts(min(decode, IN_MODEL_MAX_TOKENS))
            candidates = with_kernel(self.cfg, IN_MODEL_CANDIDATES)
            key = machine_key({"config": self.cfg.to_dict(), "rows": max(self.batch_buckets), "max_len": self.max_len,
                               "kv_dtype": str(self.kv_dtype), "counts": counts, "candidates": list(candidates),
                               "attention": self.statics.attention_backend, "expert_slices": table.expert_slices})
            seconds = self._forward_seconds(stacked, split)
            times = stored_times(store, "moe-forward", key, lambda: measure_in_model(seconds, counts, candidates))
            table = with_choices_from(table, times)
        # Held per expert only if some chosen backend reads them so: each extra leaf costs every call.
        held = split is not None and uses_expert_slices(table)
        self.state = split if held else stacked
        table = dataclasses.replace(table, expert_slices=held)
        self.moe_backend = table
        self.statics = self.statics._replace(moe_backend=table)
        self._steps = unplaced_steps(self.graphdef, self.statics)
        return table

    def _forward_seconds(self, stacked, split=None, reps: int = 3) -> Callable[[str, int], float]:
        """A timer for ``tune_moe_dispatch``: (backend, tokens) -> median seconds of this runner's
        forward routing that many tokens (over as many rows as a step has, at most), attending over
        up to 256 positions; the cache it returns is dropped. A backend that reads experts held per
        expert is timed on ``split`` (when given), every other on ``stacked``."""
        from jaxspec.models.moe_dispatch import SLICE_BACKENDS

        fns: dict[str, Callable] = {}
        kv = self.kv_bucket_for(min(self.max_len, 256))

        def seconds(backend: str, tokens: int) -> float:
            if backend not in fns:
                statics = StepStatics(backend, self.statics.attention_backend, matmul_backend=self.statics.matmul_backend)
                fns[backend] = jax.jit(functools.partial(_forward, self.graphdef, statics), static_argnames=("kv_len",))
            state = split if split is not None and backend in SLICE_BACKENDS else stacked
            rows = min(tokens, max(self.batch_buckets))
            t = -(-tokens // rows)
            # Random tokens: rows of one token would all route to the same two experts.
            ids = np.random.default_rng(tokens).integers(0, self.cfg.vocab_size, (rows, t), dtype=np.int32)
            args = (state, ids, np.full(rows, max(kv - t, 0), np.int32), self.cache,
                    np.arange(rows, dtype=np.int32), np.full(rows, t, np.int32))
            jax.block_until_ready(fns[backend](*args, kv_len=kv))  # compiles on the first call
            samples = []
            for _ in range(reps):
                start = time.perf_counter()
                jax.block_until_ready(fns[backend](*args, kv_len=kv))
                samples.append(time.perf_counter() - start)
            return float(np.median(samples))

        return seconds

    def set_backends(self, *, moe: str | None = None, attention: str | None = None, matmul: str | None = None) -> None:
        """Use these MoE dispatch / attention / matmul backends in every step (single-device runners;
        call before the first step: the kernel self-test's fallback)."""
        if self.placement is not None:
            raise NotImplementedError("changing the backends of a runner on a mesh")
        if attention is not None:
            check_attention_backend(attention)
            if attention == "cpu":
                page_size = self.paging[1] if self.paging else None
                require_fit("attention", cpu_attention_unfit(self.cfg, self.placement, page_size, self.kv_dtype))
        if matmul is not None and check_matmul_backend(matmul) == "cpu":
            require_fit("matmul", cpu_matmul_unfit(self.cfg, self.placement))
        self.moe_backend = moe if moe is not None else self.moe_backend
        self.statics = self.statics._replace(moe_backend=self.moe_backend,
                                             attention_backend=attention or self.statics.attention_backend,
                                             matmul_backend=matmul or self.statics.matmul_backend)
        self._steps = unplaced_steps(self.graphdef, self.statics)

    def capture_hidden(self, layers: Sequence[int]) -> None:
        """Make every step also return the hidden states entering ``layers`` (see the forward contract),
        kept in ``captured`` after prefill and decode (verification steps built from ``forward_fn``
        return them too). Call before the first step. On a mesh the features come back replicated,
        like the logits."""
        layers = tuple(int(i) for i in layers)
        check_aux_layers(layers, self.cfg.num_layers)
        self.statics = self.statics._replace(aux_layers=layers)
        self._steps = unplaced_steps(self.graphdef, self.statics) if self.placement is None else self._placed()

    # -------------------------------------------------------------- host API
    def prefill(self, slot: int, prompt_ids: list[int], slots: SlotTable) -> int:
        """Write a prompt into ``slot``'s cache and sample the first output token."""
        return self.prefill_many([slot], [prompt_ids], slots.sampling(np.array([slot])))[0]

    def assign_pages(self, slot: int, pages: Sequence[int]) -> None:
        """Paged cache: ``slot`` holds its positions in ``pages`` from now on (none: released)."""
        if self.page_table is None:
            raise RuntimeError("assign_pages on a runner with a slot cache")
        self.cache = set_table_row(self.cache, self.page_table, slot, pages,
                                   self.cache_sharding.page_table if self.cache_sharding is not None else None)

    def prefill_many(self, slots: Sequence[int], prompts: Sequence[Sequence[int]], sampling: BatchSampling,
                     starts: Sequence[int] | None = None) -> list[int]:
        """Prefill several prompts in one call (rows padded to a compiled count, tokens to the longest
        prompt's bucket); returns each one's first token. ``sampling``: host settings, one row each.
        ``starts``: tokens of each prompt already in its cache (a shared prefix): only the rest runs."""
        n = len(slots)
        if not 0 < n <= self.prefill_row_buckets[-1]:
            raise ValueError(f"prefill takes 1..{self.prefill_row_buckets[-1]} prompts, got {n}")
        starts = np.zeros(n, np.int32) if starts is None else np.asarray(starts, np.int32)
        offset = bool(starts.any())
        rows = bucket_up(n, self.prefill_row_buckets)
        t = self.bucket_for(max(len(p) - s for p, s in zip(prompts, starts)))
        tokens = np.full((rows, t), self.cfg.pad_id, np.int32)
        for i, (p, s) in enumerate(zip(prompts, starts)):
            tokens[i, : len(p) - s] = p[s:]
        slot_ids = pad_rows(np.asarray(slots, np.int32), rows, self.num_slots)
        num_valid = pad_rows(np.array([len(p) - s for p, s in zip(prompts, starts)], np.int32), rows, 0)
        if offset:
            # One span (the whole context) keeps the compiled shapes to rows x length buckets.
            kv_len = self.max_len
            self.cache, token, _, load, *aux = self._steps[2](
                self.state, self.cache, tokens, pad_rows(starts, rows, 0), slot_ids, num_valid,
                pad_sampling(sampling, rows), kv_len=kv_len)
        else:
            self.cache, token, _, load, *aux = self._steps[0](
                self.state, self.cache, tokens, slot_ids, num_valid, pad_sampling(sampling, rows))
        self.captured = aux[0] if aux else None
        self.host_lengths[np.asarray(slots)] = num_valid[:n] + starts
        self.add_expert_load(load)
        return [int(x) for x in np.asarray(token)[:n]]

    def decode(self, slots: SlotTable) -> np.ndarray:
        """One decode step over the active slots; returns the sampled token per slot [S] (inactive: ignore)."""
        return self.decode_tokens(slots.last_token, slots.active, slots.sampling(), slots.num_generated)

    def decode_tokens(self, last_tokens: np.ndarray, active: np.ndarray, sampling: BatchSampling,
                      out_positions: np.ndarray) -> np.ndarray:
        """``decode`` with its inputs given [S] each: feeds last_tokens at each slot's cache length."""
        rows = np.flatnonzero(active)
        out = np.zeros(self.num_slots, np.int32)
        if rows.size:
            out[rows] = self.decode_rows(rows, np.asarray(last_tokens)[rows], take_sampling(sampling, rows),
                                         np.asarray(out_positions)[rows])
        return out

    def row_layout(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slot id of each batch row [B], row index of each given slot [n]) for a step over ``slots``:
        packed into a batch bucket (padding rows: slot id S), or every slot in order when rows are
        not packed."""
        n = len(slots)
        if self.compact_rows:
            b = bucket_up(n, self.batch_buckets)
            return pad_rows(np.asarray(slots, np.int32), b, self.num_slots), np.arange(n)
        return np.arange(self.num_slots, dtype=np.int32), np.asarray(slots)

    def row_starts(self, row_slots: np.ndarray, where: np.ndarray, start: np.ndarray) -> np.ndarray:
        """Start position of every batch row: ``start`` for the stepped slots, the slot's own length
        for the others (their writes land past it: stale, never read; padding rows write nothing)."""
        out = self.host_lengths[np.minimum(row_slots, self.num_slots - 1)].copy()
        out[where] = start
        return out

    def decode_rows(self, rows: np.ndarray, last_tokens: np.ndarray, sampling: BatchSampling,
                    out_positions: np.ndarray) -> np.ndarray:
        """One token for each slot in ``rows`` [n] (inputs one per row) -> tokens [n]."""
        return self.collect_decode(self.dispatch_decode(rows, last_tokens, sampling, out_positions))

    @property
    def max_decode_steps(self) -> int:
        """The most decode steps one call runs: ``decode_steps`` where steps chain on one device and
        return no hidden features, else 1."""
        return self.decode_steps if self.can_chain and not self.statics.aux_layers else 1

    @property
    def can_chain(self) -> bool:
        """Whether a decode step can take the previous one's tokens where they are (on the device):
        single-device runners, whose step outputs need no resharding to be inputs again."""
        return self.placement is None

    def dispatch_decode(self, rows: np.ndarray, last_tokens: np.ndarray | None, sampling: BatchSampling | None,
                        out_positions: np.ndarray, after: "DecodeHandle | None" = None, steps: int = 1
                        ) -> "DecodeHandle":
        """``decode_rows`` without waiting: the step is queued and its tokens stay on the device.
        ``after``: the step just queued over the same ``rows``, not yet collected; its tokens are this
        step's inputs and its settings are reused (``last_tokens`` and ``sampling`` are then ignored),
        so the host prepares step n+1 while the device still runs step n. ``steps`` (1 or
        ``max_decode_steps``): decode steps in this call, each row's positions and output positions
        advancing by one a step; every row must have room for them under its request's limit."""
        if steps != 1 and steps != self.max_decode_steps:
            raise ValueError(f"a decode call runs 1 or {self.max_decode_steps} steps on this runner, not {steps}")
        row_slots, where = self.row_layout(rows)
        b = len(row_slots)
        start = self.host_lengths[rows]
        kv_len = self.kv_bucket_for(int(start.max()) + steps)
        if after is not None:
            if not self.can_chain or not np.array_equal(after.rows, rows):
                raise ValueError("a chained decode step runs over the same rows of a single-device runner")
            tokens_in, valid, row_sampling = after.last, after.num_valid, after.sampling
        else:
            tokens_in = self._decode_tokens(scatter_rows(last_tokens, where, b, 0))
            # Host arrays, kept by the handle for a chained step: jit's own transfer of a small host
            # array costs a few microseconds, a jax.device_put about 60 (0.4 ms a step for these six).
            valid = scatter_rows(np.ones(len(rows), np.int32), where, b, 0)
            row_sampling = scatter_sampling(sampling, where, b)
        self.cache, tokens, load, *rest = self._steps[1](
            self.state, self.cache, row_slots, tokens_in, self.row_starts(row_slots, where, start), valid,
            row_sampling, scatter_rows(out_positions, where, b, 0), kv_len=kv_len, steps=steps,
        )
        if steps > 1:
            last, self.captured = rest[0], None
        else:
            last, self.captured = tokens, rest[0] if rest else None
        self.host_lengths[rows] += steps
        return DecodeHandle(np.asarray(rows), where, tokens, load, valid, row_sampling, last, steps)

    def _decode_tokens(self, tokens: np.ndarray):
        """A decode step's input tokens placed as a step's output tokens are (committed to the
        device): a chained step passes the previous output, and jit keys its compilations on
        placement, so every decode step passes them alike."""
        return jax.device_put(tokens, self.cache.lengths.sharding) if self.can_chain else tokens

    def collect_decode(self, handle: "DecodeHandle") -> np.ndarray:
        """Wait for a dispatched step: its tokens [n] on the host ([n, steps] for several steps)."""
        tokens = np.asarray(handle.tokens)
        self.add_expert_load(handle.load)
        return tokens[handle.where]

    def queue_step(self, slots: SlotTable, plan: DecodePlan, last_tokens: np.ndarray | None,
                   after: QueuedStep | None = None) -> QueuedStep:
        """A plain decode step over ``plan.slots`` (inputs ``last_tokens`` [n]), dispatched; ``after``:
        the step queued just before over the same slots, not applied yet, whose tokens feed this one
        (``last_tokens`` is then not read)."""
        t0 = time.perf_counter()
        act = plan.slots
        if after is None:
            handle = self.dispatch_decode(act, last_tokens, slots.sampling(act), slots.num_generated[act],
                                          steps=plan.steps)
        else:  # the call before is not applied yet: every slot is its steps further than the table says
            handle = self.dispatch_decode(act, None, None, slots.num_generated[act] + after.plan.steps,
                                          after=after.handle, steps=plan.steps)
        return QueuedStep(plan, handle, t0)

    def collect_step(self, queued: QueuedStep, overlapped: bool = True) -> StepResult:
        """Wait for a queued step; ``overlapped``: collected a step later (``StepResult.queued``)."""
        tokens = self.collect_decode(queued.handle)
        return StepResult.plain(queued.plan.slots, tokens, time.perf_counter() - queued.t0, queued=overlapped)

    def idle_decode(self, rows: int, kv_len: int, live: bool = False, steps: int = 1) -> None:
        """A decode step (``steps`` of them in one call) of ``rows`` rows that touches no slot (every
        write lands past the cache end or on the padding slot id), waited for: compiles that bucket,
        or, ``live``, times it with valid random tokens, which route to experts as real traffic does."""
        s = self.num_slots
        zeros = np.zeros(rows, np.int32)
        tokens = np.random.default_rng(rows).integers(0, self.cfg.vocab_size, rows).astype(np.int32) if live else zeros
        self.cache, out, *_ = self._steps[1](
            self.state, self.cache, np.full(rows, s, np.int32), self._decode_tokens(tokens),
            np.full(rows, self.max_len, np.int32),
            np.full(rows, int(live), np.int32), pad_sampling(SlotTable(0).sampling(), rows), zeros, kv_len=kv_len,
            steps=steps)
        out.block_until_ready()
        if not self.compact_rows:
            self.sync_lengths()

    @property
    def offset_prefill_widths(self) -> list[int]:
        """Length buckets a prefill after a cached prefix (paged caches: any) or an earlier chunk (up
        to a chunk's) can take; none without either."""
        if self.paging is None and self.prefill_chunk is None:
            return []
        longest = self.max_len if self.paging is not None else self.bucket_for(self.prefill_chunk)
        return [b for b in self.buckets if b <= longest]

    def warmup_offset_prefill(self) -> None:
        """Compile prefill after a cached prefix or earlier chunks: every (rows, length) bucket a
        prompt's rest can take (writes go to the padding slot id)."""
        s = self.num_slots
        for rows in self.prefill_row_buckets:
            for bucket in self.offset_prefill_widths:
                self.cache, token, *_ = self._steps[2](
                    self.state, self.cache, np.full((rows, bucket), self.cfg.pad_id, np.int32),
                    np.zeros(rows, np.int32), np.full(rows, s, np.int32), np.zeros(rows, np.int32),
                    pad_sampling(SlotTable(0).sampling(), rows), kv_len=self.max_len)
        token.block_until_ready()

    def sync_lengths(self) -> None:
        """Device lengths := the host's (after a step that ran over idle slots in order)."""
        self._set_lengths(jnp.asarray(self.host_lengths))

    def expert_load_snapshot(self) -> np.ndarray:
        """A copy of the cumulative tokens routed per expert [layers, experts]."""
        return self.expert_load.copy()

    def device_info(self) -> tuple[str, tuple[str, ...], dict[str, int]]:
        """(platform, devices, mesh shape) of the parameters."""
        leaves = jax.tree.leaves(self.state)
        sharding = getattr(leaves[0], "sharding", None) if leaves else None
        if sharding is None:
            devs = jax.local_devices()[:1]
            return devs[0].platform, tuple(str(d) for d in devs), {}
        devs = sorted(sharding.device_set, key=lambda d: d.id)
        mesh = getattr(sharding, "mesh", None)
        shape = {str(k): int(v) for k, v in mesh.shape.items()} if mesh is not None and hasattr(mesh, "shape") else {}
        return devs[0].platform, tuple(str(d) for d in devs), shape

    def add_expert_load(self, load) -> None:
        """Add a step's routed-token counts [L, E] (a device array) to ``expert_load``."""
        self.expert_load += np.asarray(load)

    def set_length(self, slot: int, length: int) -> None:
        self.host_lengths[slot] = length
        self._set_lengths(self.cache.set_length(slot, length).lengths)

    def set_lengths_host(self, rows: np.ndarray, lengths: np.ndarray) -> None:
        """Record lengths a step already set on the device (e.g. verification's accepted prefix)."""
        self.host_lengths[rows] = lengths

    def _set_lengths(self, lengths) -> None:
        # Host-side edits of the lengths go back to the cache's own sharding, so the next
        # step's input matches its compiled sharding (no transfer, no recompilation).
        # A host array would be uncommitted and change the step's signature (a recompile).
        target = self.cache_sharding.lengths if self.cache_sharding is not None else self.cache.lengths.sharding
        lengths = jax.device_put(lengths, target)
        self.cache = self.cache.with_lengths(lengths)

    def lengths(self) -> np.ndarray:
        return np.asarray(self.cache.lengths)

    def warmup(self, decode: bool = True) -> None:
        """Compile every prefill (rows x length) bucket and every decode (rows x span) bucket (not
        with ``decode=False``: a caller whose steps never run this runner's decode); no request
        state is touched (every write goes to the padding slot id)."""
        saved = self.lengths()
        saved_host = self.host_lengths.copy()
        s = self.num_slots
        for rows in self.prefill_row_buckets:
            for bucket in self.buckets:
                tokens = np.full((rows, bucket), self.cfg.pad_id, np.int32)
                self.cache, token, *_ = self._steps[0](
                    self.state, self.cache, tokens, np.full(rows, s, np.int32), np.zeros(rows, np.int32),
                    pad_sampling(SlotTable(0).sampling(), rows))
        for b in self.batch_buckets if decode else ():
            for kv_len in self.kv_buckets:
                for steps in sorted({1, self.max_decode_steps}):
                    self.idle_decode(b, kv_len, steps=steps)
        if self.offset_prefill_widths:
            self.warmup_offset_prefill()
        if self.mixed_length is not None:
            for b in self.batch_buckets:
                self._run_mixed(np.full(b, s, np.int32), np.zeros(b, np.int32), np.zeros(b, np.int32),
                                np.zeros(b, np.int32), pad_sampling(SlotTable(0).sampling(), b), np.zeros(b, np.int32),
                                self.padding_chunk())[0].block_until_ready()
        self.set_length(0, 0)  # the release path's small update, compiled here rather than mid-serving
        self._set_lengths(jnp.asarray(saved))
        self.host_lengths[:] = saved_host

    # ------------------------------------------------ prefill chunk + decode in one call
    @property
    def mixed_length(self) -> int | None:
        """The compiled length of a prefill chunk that runs in one call with a decode step
        (``mixed_step``): a full chunk of a long prompt. None: this runner never mixes (switched
        off, whole prompts, slots split over devices, or steps that return hidden features)."""
        if not self.mixed_prefill or self.prefill_chunk is None or not self.compact_rows or self.statics.aux_layers:
            return None
        return self.bucket_for(self.prefill_chunk)

    def mixed_chunk(self, slot: int, prompt_ids: Sequence[int], start: int, sampling: BatchSampling) -> tuple:
        """Inputs of a full chunk ``prompt_ids[start:]`` of ``slot`` in a mixed step: tokens [1, L]
        (L = ``mixed_length``), start, slot and valid count [1] each, sampling [1]."""
        n_p = len(prompt_ids) - start
        if self.mixed_length is None or self.bucket_for(n_p) != self.mixed_length:
            raise ValueError(f"a chunk of {n_p} tokens does not run with a decode step on this runner")
        tokens = np.full((1, self.mixed_length), self.cfg.pad_id, np.int32)
        tokens[0, :n_p] = prompt_ids[start:]
        one = lambda x: np.array([x], np.int32)  # noqa: E731
        return tokens, one(start), one(slot), one(n_p), pad_sampling(sampling, 1)

    def padding_chunk(self) -> tuple:
        """``mixed_chunk``'s inputs for a chunk that writes nothing (slot id S, no valid token): warm-up."""
        one = lambda x: np.array([x], np.int32)  # noqa: E731
        return (np.full((1, self.mixed_length), self.cfg.pad_id, np.int32), one(0), one(self.num_slots), one(0),
                pad_sampling(SlotTable(0).sampling(), 1))

    def mixed_forward_fn(self) -> Callable:
        """A pure function (state, cache, segments, kv_lens) -> (logits per segment, cache, expert
        load) (``mixed_step.forward_mixed``), for speculative verification mixed with a chunk."""
        return functools.partial(forward_mixed, self.graphdef, self.statics)

    def _run_mixed(self, row_slots, d_tokens, d_start, d_valid, d_sampling, d_out_positions, chunk: tuple):
        """``chunk``: ``mixed_chunk``'s inputs."""
        key = () if self.placement is None else self._cache_key
        step = mixed_step(self.graphdef, self.statics, self.max_len, self.state_sharding, self.cache_sharding, key)
        self.cache, d_out, p_out, load = step(
            self.state, self.cache, row_slots, d_tokens, d_start, d_valid, d_sampling, d_out_positions, *chunk)
        return d_out, p_out, load

    def prefill_with_decode(self, slot: int, prompt_ids: Sequence[int], start: int, p_sampling: BatchSampling,
                            rows: np.ndarray, last_tokens: np.ndarray, sampling: BatchSampling,
                            out_positions: np.ndarray) -> tuple[int, np.ndarray]:
        """Prefill ``prompt_ids[start:]`` into ``slot`` (a chunk of ``mixed_length`` tokens' bucket)
        and decode one token for each slot in ``rows`` [n] (inputs one per row), in one call ->
        (the token the chunk samples, decode tokens [n])."""
        chunk = self.mixed_chunk(slot, prompt_ids, start, p_sampling)
        row_slots, where = self.row_layout(rows)
        b = len(row_slots)
        d_out, p_out, load = self._run_mixed(
            row_slots, scatter_rows(last_tokens, where, b, 0), self.row_starts(row_slots, where, self.host_lengths[rows]),
            scatter_rows(np.ones(len(rows), np.int32), where, b, 0), scatter_sampling(sampling, where, b),
            scatter_rows(out_positions, where, b, 0), chunk)
        self.captured = None
        self.host_lengths[rows] += 1
        self.host_lengths[slot] = len(prompt_ids)
        self.add_expert_load(load)
        return int(np.asarray(p_out)[0]), np.asarray(d_out)[where]
