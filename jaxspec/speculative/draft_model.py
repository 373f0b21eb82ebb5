"""A separate draft model (dense or MoE, sharing the target's vocabulary) as proposer.

Cache protocol. ``lengths[s]`` (host, authoritative; mirrored into the device
cache) counts the context tokens the draft has processed for slot s. The context
is held in the runner's ``TokenHistory``; the tokens from ``lengths[s]`` to its
end are *pending*. Normally one token is pending (the target's last emitted
token), or two when every proposal was accepted (the last proposal was sampled
but never fed back, then the bonus). Each round:

  step 0   one forward over a [S, 2] block of the pending tokens (num_valid 1 or 2)
           -> q_0 at the last pending token, sample d_0;
  step i   feed d_{i-1}, sample d_i (i = 1..kb-1), inside one ``lax.scan``.

Proposals are sampled with ``logits_to_probs`` on the request's own settings and
Exp(1) noise keyed (seed, output position, PURPOSE_DRAFT); the q's are returned
for verification. After verification kept ``a`` proposals, the draft has seen
exactly the accepted context when ``lengths = L + 1 + min(a, kb - 1)``, L being
the cache position of the last pending token (see ``commit``); entries past the
length are stale and overwritten before any query reads them (see kv_cache).

A slot whose draft fell further behind (speculation was off for the whole batch,
so the draft was skipped) is caught up by chunked batched forwards first.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspec.config import ModelConfig
from jaxspec.engine.cpu_backends import auto_attention, auto_matmul
from jaxspec.engine.model_runner import kv_buckets, prefill_buckets, slots_unsplit
from jaxspec.engine.steps import params_tree, params_variables
from jaxspec.mesh import Placement, check_placement, device_memory_bytes, draft_placement
from jaxspec.models import KVCache, Transformer
from jaxspec.models.kv_cache import check_kv_dtype, set_table_row
from jaxspec.models.moe_parallel import moe_backend_for
from jaxspec.sampling import PURPOSE_DRAFT, BatchSampling, batch_noise, logits_to_probs, sample_from_probs
from jaxspec.speculative.jit_cache import cached_jit
from jaxspec.speculative.proposer import Proposal, SpecContext

PENDING_BLOCK = 2  # pending tokens step 0 can absorb (last proposal + bonus)
CALL_ROWS = 64  # a call's fixed cost, in token rows computed, when choosing how to catch up


def _make_extend(graphdef, backend, attention: str = "xla", matmul: str = "xla"):
    def extend(state, cache, tokens, start, slot_ids, num_valid):
        return nnx.merge(graphdef, state)(tokens, start, cache, slot_ids, num_valid, moe_backend=backend,
                                          attention_backend=attention, matmul_backend=matmul).cache

    return extend


def _make_loop(graphdef, backend, kb: int, kv_len: int, identity_rows: bool, attention: str = "xla",
               matmul: str = "xla"):
    def loop(state, cache, slot_ids, block, block_valid, start, sampling: BatchSampling, out_pos):
        """B rows (row b is slot slot_ids[b]; padding rows: slot id S and block_valid 0; with
        ``identity_rows`` row b is slot b)."""
        model = nnx.merge(graphdef, state)
        slot_ids = None if identity_rows else slot_ids
        vocab = model.cfg.vocab_size
        all_greedy = jnp.all(sampling.temperature <= 0)
        live = (block_valid > 0).astype(jnp.int32)  # padding rows stay invalid in every step

        def draw(logits, pos):
            q = logits_to_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p)
            noise = batch_noise(sampling.seed, pos, vocab, PURPOSE_DRAFT, all_greedy)
            return sample_from_probs(q, noise), q

        out = model(block, start, cache, slot_ids, block_valid, moe_backend=backend, kv_len=kv_len,
                    attention_backend=attention, matmul_backend=matmul)
        last = jnp.take_along_axis(out.logits, jnp.maximum(block_valid - 1, 0)[:, None, None], axis=1)[:, 0]
        tok0, q0 = draw(last, out_pos)
        first = start + block_valid  # cache position where d_0 goes

        def step(carry, i):
            cache, tok = carry
            o = model(tok[:, None], first + i - 1, cache, slot_ids, live, moe_backend=backend, kv_len=kv_len,
                      attention_backend=attention, matmul_backend=matmul)
            t, q = draw(o.logits[:, 0], out_pos + i)
            return (o.cache, t), (t, q)

        # Unrolled (kb <= k_max steps): XLA:GPU copied the whole draft cache once per round for the
        # while loop's carry (AOT, 1B draft, 16x4096 cache on H100: 2.02 -> 1.01 GiB of temporaries).
        (cache, _), (toks, qs) = jax.lax.scan(step, (out.cache, tok0), jnp.arange(1, kb, dtype=jnp.int32), unroll=True)
        tokens = jnp.concatenate([tok0[:, None], jnp.swapaxes(toks, 0, 1)], axis=1)
        probs = jnp.concatenate([q0[:, None], jnp.swapaxes(qs, 0, 1)], axis=1)
        return cache, tokens, probs

    return loop


class DraftModelProposer:
    """Proposals sampled from a smaller model with its own slot KV cache."""

    name = "draft"
    deterministic = False
    always_proposes = True
    catches_up = True  # the draft's cache skips the steps it does not draft in (``_catch_up``)

    def __init__(self, model: Transformer, moe_backend: str | None = None, catchup_chunk: int = 16,
                 kv_dtype: str | None = None):
        """``kv_dtype``: the draft's own KV cache precision ("int8" or None/"auto": the model's dtype),
        independent of the target's."""
        self.cfg: ModelConfig = model.cfg
        self.kv_dtype = check_kv_dtype(kv_dtype)
        self.graphdef, state = nnx.split(model)
        self.state = params_tree(state)
        self.moe_backend = moe_backend
        self.catchup_chunk = catchup_chunk
        self.cache: KVCache | None = None
        self.lengths = np.zeros(0, np.int32)
        self._round: tuple[np.ndarray, np.ndarray] | None = None  # (slots that drafted, their L)
        self._fns: dict = {}
        self.placement: Placement | None = None
        self.paging: tuple[int, int, int] | None = None
        self._state_sharding = self._cache_sharding = None
        self.attention = "xla"  # decided in ``attach``, once the cache's layout is known
        self.matmul = "xla"  # the dense projections' backend, decided in ``attach`` too

    @property
    def backends(self) -> tuple[str, str]:
        """(attention, matmul) backends of the draft's forwards: part of every compiled step's key."""
        return self.attention, self.matmul

    def use_placement(self, target: Placement, num_slots: int = 0, max_len: int = 0) -> None:
        """Run on the target's mesh (call before ``attach``): weights replicated when the draft with
        its cache for ``num_slots`` x ``max_len`` is small (its k sequential steps then need no
        collective; ``mesh.draft_placement``), else by the target's rules; cache slots split like
        the target's. Steps get explicit in/out shardings, so the draft cache keeps its layout from
        step to step."""
        hbm = device_memory_bytes(target.mesh.devices.flat[0])
        placement = draft_placement(self.cfg, target, num_slots, max_len, hbm, kv_dtype=self.kv_dtype)
        check_placement(self.cfg, placement)
        self.placement = placement
        self._state_sharding = params_tree(placement.state_shardings(params_variables(self.graphdef, self.state)))
        self.state = jax.device_put(self.state, self._state_sharding)
        self.moe_backend = moe_backend_for(placement) or self.moe_backend
        self._fns = {}

    # ------------------------------------------------------------------ setup
    reuses_prefix = True
    prefix_key_tokens = 0

    def attach(self, target_cfg: ModelConfig, num_slots: int, max_len: int,
               paging: tuple[int, int, int] | None = None) -> None:
        if self.cfg.vocab_size != target_cfg.vocab_size:
            raise ValueError(
                f"draft {self.cfg.name} has vocab_size {self.cfg.vocab_size}, the target {target_cfg.name} has "
                f"{target_cfg.vocab_size}: a draft must share the target's vocabulary"
            )
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"draft {self.cfg.name} holds {self.cfg.max_seq_len} positions; the engine needs {max_len}")
        self.num_slots, self.max_len = num_slots, max_len
        # Paged like the target, page for page: the target's table is the draft's too.
        self.paging = paging
        # The C++ attention kernel where it can serve the draft's cache, as make_runner's "auto".
        self.attention = auto_attention(self.cfg, self.placement, paging[1] if paging is not None else None,
                                        self.kv_dtype)
        self.matmul = auto_matmul(self.cfg, self.placement)
        pages = dict(num_pages=paging[0], page_size=paging[1], page_groups=paging[2]) if paging is not None else {}
        pages["kv_dtype"] = self.kv_dtype
        self.page_table = None if paging is None else np.full((num_slots, max_len // paging[1]), paging[0], np.int32)
        if self.placement is None:
            # Committed to a device like every later (jit-output) cache: the first step and the
            # later ones then share one compilation.
            self.cache = jax.device_put(KVCache.create(self.cfg, num_slots, max_len, **pages), jax.devices()[0])
        else:  # created in place, shard by shard
            self._cache_sharding = self.placement.cache_shardings(
                KVCache.abstract(self.cfg, num_slots, max_len, **pages))
            self.cache = jax.jit(lambda: KVCache.create(self.cfg, num_slots, max_len, **pages),
                                 out_shardings=self._cache_sharding)()
        self._fns = {}
        # Like the target's runner: rows are packed unless the cache's slots are split over devices.
        self.compact_rows = self._cache_sharding is None or slots_unsplit(self._cache_sharding)
        self.lengths = np.zeros(num_slots, np.int32)
        self.buckets = prefill_buckets(max_len)
        # Coarser spans than the target's (x4): a draft's attention is a small part of its step,
        # and every span multiplies the draft loops compiled (rows x k x span).
        self.kv_buckets = kv_buckets(max_len, factor=4)

    # Resolved once per proposer: the shared cache's key hashes the graphdef (~1 ms).
    def _jit(self, name: tuple, make, num_outputs: int):
        fn = self._fns.get(name)
        if fn is None:
            key = name
            kwargs: dict = {"donate_argnums": (1,)}
            if self.placement is not None:  # (state, cache, then small replicated inputs) -> (cache, replicated...)
                rep = self.placement.replicated()
                num_small = 4 if name[0] == "extend" else 6
                kwargs["in_shardings"] = (self._state_sharding, self._cache_sharding, *[rep] * num_small)
                kwargs["out_shardings"] = self._cache_sharding if num_outputs == 1 else (
                    self._cache_sharding, *[rep] * (num_outputs - 1))
                key = (*key, self.placement, self.num_slots, self.max_len, self.paging, self.kv_dtype)
            fn = self._fns[name] = cached_jit(("draft", self.graphdef, self.moe_backend, *self.backends, *key), make,
                                              **kwargs)
        return fn

    def _extend(self):
        return self._jit(("extend", 0), lambda: _make_extend(self.graphdef, self.moe_backend, *self.backends), 1)

    def _loop(self, kb: int, kv_len: int):
        identity = not self.compact_rows
        return self._jit(("loop", kb, kv_len, identity),
                         lambda: _make_loop(self.graphdef, self.moe_backend, kb, kv_len, identity, *self.backends), 3)

    def _sync_lengths(self) -> None:
        # Back to the cache's own (committed) layout: an uncommitted host array here would change
        # the next step's signature and recompile it mid-serving.
        target = self._cache_sharding.lengths if self._cache_sharding is not None else self.cache.lengths.sharding
        self.cache = self.cache.with_lengths(jax.device_put(self.lengths, target))

    # ---------------------------------------------------------------- requests
    def set_pages(self, slot: int, pages: list[int]) -> None:
        if self.page_table is None:
            raise RuntimeError("set_pages on a draft with a slot cache")
        self.cache = set_table_row(self.cache, self.page_table, slot, pages,
                                   self._cache_sharding.page_table if self._cache_sharding is not None else None)

    def prefill(self, slot: int, prompt_ids: list[int], start: int = 0) -> None:
        """A slot cache feeds the prompt at the slot's first drafting step (``_catch_up``), so a
        request that never drafts (adaptive k off) never pays for it. Paged caches feed it now:
        prompt pages are shared with later requests through the prefix cache, draft half included."""
        if self.paging is None:
            if start == 0:
                self.lengths[slot] = 0
            return
        self._feed(slot, prompt_ids, start)

    def _feed(self, slot: int, prompt_ids, start: int = 0) -> None:
        """Extend ``slot``'s cache with ``prompt_ids[start:]`` (one row, a prefill bucket)."""
        n = len(prompt_ids) - start
        bucket = next(b for b in self.buckets if n <= b)
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, :n] = prompt_ids[start:]
        self.cache = self._extend()(
            self.state, self.cache, tokens, np.array([start], np.int32), np.array([slot], np.int32),
            np.array([n], np.int32)
        )
        self.lengths[slot] = start + n

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0
        self._sync_lengths()

    def _catch_up(self, ctx: SpecContext) -> None:
        """Feed all but the last pending token of slots more than PENDING_BLOCK behind (after steps
        that did not draft, or a prompt not yet prefilled). Either one prefill-shaped call per
        lagging slot, or chunks over every slot at once, whichever computes fewer rows: a few slots
        far behind (one request at a time, a probe after many plain steps) take the first, many
        slots a little behind the second. Both shapes are compiled at warm-up."""
        hist_len = ctx.history.length
        active = np.zeros(self.num_slots, bool)
        active[ctx.live()[1]] = True
        todo = np.where(active & (hist_len - self.lengths > PENDING_BLOCK), hist_len - 1 - self.lengths, 0)
        lagging = np.flatnonzero(todo)
        if not lagging.size:
            return
        chunked = -(-int(todo.max()) // self.catchup_chunk) * (self.num_slots * self.catchup_chunk + CALL_ROWS)
        per_slot = sum(next(b for b in self.buckets if t <= b) + CALL_ROWS for t in todo[lagging].tolist())
        if per_slot <= chunked:
            for slot in lagging.tolist():
                self._feed(slot, ctx.history.context(slot)[: hist_len[slot] - 1], int(self.lengths[slot]))
            return
        while True:
            lag = np.where(active, hist_len - self.lengths, 0)
            todo = np.where(lag > PENDING_BLOCK, np.minimum(lag - 1, self.catchup_chunk), 0).astype(np.int32)
            if not todo.any():
                return
            block = ctx.history.window(self.lengths, self.catchup_chunk, todo)
            self.cache = self._extend()(self.state, self.cache, block, self.lengths.copy(), None, todo)
            self.lengths = self.lengths + todo

    def kv_bucket_for(self, positions: int) -> int:
        return next(b for b in self.kv_buckets if min(positions, self.max_len) <= b)

    def prepare(self, ctx: SpecContext, record: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Host inputs of one round, per batch row: (pending block [B, 2], pending counts [B], draft
        lengths [B]); catches lagging slots up first and (``record``) records the round for
        ``commit`` (a fused step's collect calls ``set_committed`` instead)."""
        self._catch_up(ctx)
        idx, live = ctx.live()
        rows = ctx.rows
        if not self.compact_rows and not np.array_equal(rows, np.arange(self.num_slots)):
            raise ValueError("this draft's cache splits slots over devices: steps must cover every slot in order")
        safe = np.where(rows < self.num_slots, rows, 0)
        lengths = np.where(ctx.active, self.lengths[safe], self.lengths[safe] if not self.compact_rows else 0)
        lengths = lengths.astype(np.int32)
        pending = np.where(ctx.active, ctx.history.length[safe] - lengths, 0).astype(np.int32)
        if pending.max(initial=0) > PENDING_BLOCK or (pending[idx] < 1).any():
            raise RuntimeError(f"draft cache out of step with the context: pending tokens {pending.tolist()}")
        block = ctx.history.window(lengths, PENDING_BLOCK, pending, rows)
        if record:
            self._round = (idx, live, ctx.history.length[live] - 1)
        return block, pending, lengths

    def would_propose(self, history, slots: np.ndarray) -> np.ndarray:
        return np.ones(len(slots), bool)  # a model always drafts

    def propose(self, ctx: SpecContext) -> Proposal:
        block, pending, lengths = self.prepare(ctx)
        kv_len = self.kv_bucket_for(int((lengths + pending).max(initial=0)) + ctx.kb)
        self.cache, tokens, probs = self._loop(ctx.kb, kv_len)(
            self.state, self.cache, ctx.rows.astype(np.int32), block, pending, lengths, ctx.sampling, ctx.out_pos
        )
        return Proposal(tokens, probs, np.where(ctx.active, ctx.k, 0).astype(np.int32))

    def loop_fn(self, kb: int, kv_len: int):
        """The round as a pure function (state, cache, slot_ids, block, pending, lengths, sampling,
        out_pos) -> (cache, tokens [B, kb], q's [B, kb, V]), for a runner to fuse into its step."""
        return _make_loop(self.graphdef, self.moe_backend, kb, kv_len, not self.compact_rows, *self.backends)

    def set_committed(self, slots: np.ndarray, last_pos: np.ndarray, num_accepted: np.ndarray, kb: int) -> None:
        """``commit``'s host lengths where a fused step already set the device's: ``slots`` fed
        their token at ``last_pos`` and accepted ``num_accepted`` of ``kb`` drafts."""
        self.lengths[slots] = last_pos + 1 + np.minimum(num_accepted, kb - 1)

    def commit(self, ctx: SpecContext, proposal: Proposal, num_accepted: np.ndarray) -> None:
        # The round fed the pending tokens (ending with the one at position L) and
        # d_0..d_{kb-2} at L+1..; accepted d_0..d_{a-1} are therefore in the cache
        # up to d_{kb-2}. d_{kb-1} (all accepted) stays pending with the bonus.
        idx, slots, last_pos = self._round
        self.lengths[slots] = last_pos + 1 + np.minimum(np.asarray(num_accepted)[idx], ctx.kb - 1)
        self._round = None
        self._sync_lengths()

    # ----------------------------------------------------------------- warm-up
    def warmup(self, buckets: list[int], batch_buckets: list[int] | None = None, loops: bool = True) -> None:
        """Compile prefills, catch-up and (``loops``) every draft loop; ``loops=False`` where a runner
        fuses the loop into its own step."""
        saved = self.lengths.copy()
        for b in self.buckets:
            self._feed(0, [0] * b)
        for kb in buckets if loops else ():
            for rows in batch_buckets or [self.num_slots]:
                for kv_len in self.kv_buckets:
                    self._run_dummy(kb, rows, kv_len)
        idle = np.zeros(self.num_slots, np.int32)
        self.cache = self._extend()(
            self.state, self.cache, np.zeros((self.num_slots, self.catchup_chunk), np.int32),
            np.full(self.num_slots, self.max_len, np.int32), None, idle,
        )
        self.lengths = saved
        self._sync_lengths()

    def _run_dummy(self, kb: int, rows: int | None = None, kv_len: int | None = None) -> None:
        """One loop over padding rows only (every write dropped): compiles and times, touching no slot."""
        b = rows if rows and self.compact_rows else self.num_slots
        sampling = BatchSampling(
            np.zeros(b, np.float32), np.zeros(b, np.int32), np.ones(b, np.float32), np.zeros(b, np.float32),
            np.zeros((b, 2), np.uint32),
        )
        self.cache, tokens, _ = self._loop(kb, self.kv_bucket_for(kv_len) if kv_len else self.kv_buckets[-1])(
            self.state, self.cache, np.full(b, self.num_slots, np.int32), np.zeros((b, PENDING_BLOCK), np.int32),
            np.zeros(b, np.int32), np.full(b, self.max_len, np.int32), sampling, np.zeros(b, np.int32),
        )  # positions past the cache end: nothing is written even where rows are slots in order
        tokens.block_until_ready()

    def measure(self, kb: int, reps: int, rows: int | None = None, kv_len: int | None = None) -> float:
        if kb == 0:
            return 0.0
        self._run_dummy(kb, rows, kv_len)  # compile / warm
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            self._run_dummy(kb, rows, kv_len)
            times.append(time.perf_counter() - t)
        self._sync_lengths()
        return statistics.median(times)
