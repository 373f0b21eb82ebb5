"""An EAGLE-3 head as proposer: drafts from the target's own hidden states.

The runner makes the target's steps (prefill, plain decode, verification) also return the hidden
states entering the head's ``aux_layers`` (``ModelRunner.capture_hidden``; no second forward) and
hands every step's features to ``observe``. Head position p reads the target's features at p and
the token at p + 1 (see ``jaxspec.models.eagle3``), so once a step's tokens are known the head
*absorbs* the positions the target just processed: one head forward over them (the accepted
drafts plus the emitted token after a verification, one token after a plain step, the prompt after
a prefill) writes the head's cache and keeps, per slot, the head's output at the last position
(``last``). ``lengths[s]`` counts the positions absorbed, which is always the target's cache length:
entries the drafting wrote past it are stale and overwritten by the next absorb before any query
reads them (the cache masks by absolute position).

A round (``propose``) for slot s at context length L + 1 (the last token, t0, at position L):

  d_0      from the head's logits at ``last[s]`` (position L - 1: features at L - 1, token t0);
  d_i      feed (d_{i-1}, the head's previous output) at position L + i - 1, i = 1..kb-1.

Drafts are sampled from the head's own distribution over the draft vocabulary with the request's
settings (``logits_to_probs``: temperature, top-k/top-p/min-p applied there) and Exp(1) noise keyed
(seed, output position, PURPOSE_DRAFT); q, scattered to the target ids through d2t (zero
elsewhere), is returned with the tokens, so exact rejection sampling stays exact.

Rounds and absorbs attend over a compiled span of the rows' real lengths (``kv_buckets``, x4
apart, as a draft model's), every span compiled at warm-up. When every row is greedy a drafted
token is the argmax of the head's logits and q its one-hot, with no softmax or noise; q's stay in
the draft vocabulary until one scatter to the target's ids per round.

In the runner's fused step (``SpeculativeRunner.fused_head``, on one device or a mesh) the round,
the target's verification and the absorb of the kept positions run as one jitted call
(``round_fns``; the host only books the absorbed lengths, ``absorbed``); otherwise (``fuse=False``)
the round is its own call before verification and the absorb one after (``observe``). Fused, a
step in which the adaptive policy drafts nothing (k = 0) is one call as well: the target's one-token
step and the absorb of its features. Prefills are absorbed through ``observe`` in both cases.

On a mesh (``use_placement``, called by the runner when the target is placed) the head is placed
as a draft model is: weights replicated when the head and its cache are small, else by the
target's rules; its cache's slots split like the target's; the shared embedding table where the
target's is. The target's steps return the features replicated, like the logits, and the head's
calls are compiled with explicit in/out shardings, so its cache keeps its layout from step to step.
Where the target's cache splits slots over devices a step covers every slot in order, and the
head's calls index its cache by those slot ids.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspec.config import ModelConfig
from jaxspec.engine.model_runner import batch_buckets, bucket_up, kv_buckets, prefill_buckets
from jaxspec.engine.steps import params_tree, params_variables
from jaxspec.mesh import Placement, device_memory_bytes, draft_placement
from jaxspec.models import KVCache
from jaxspec.models.kv_cache import check_kv_dtype, set_table_row
from jaxspec.models.eagle3 import Eagle3Head
from jaxspec.sampling import PURPOSE_DRAFT, BatchSampling, batch_noise, logits_to_probs, sample_from_probs
from jaxspec.speculative.jit_cache import cached_jit
from jaxspec.speculative.proposer import Proposal, SpecContext


def _draw(head: Eagle3Head, out: jax.Array, sampling: BatchSampling, pos: jax.Array, all_greedy
          ) -> tuple[jax.Array, jax.Array]:
    """One draft-vocabulary id per row and its q [B, draft_vocab]. When every row is greedy, the
    argmax and its one-hot directly (what ``logits_to_probs`` and the race give greedy rows):
    no softmax, filter test or noise per drafted token."""
    logits = head.logits(out)

    def greedy():
        d = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return d, jax.nn.one_hot(d, logits.shape[-1], dtype=jnp.float32)

    def sampled():
        q_d = logits_to_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p)
        noise = batch_noise(sampling.seed, pos, q_d.shape[-1], PURPOSE_DRAFT, all_greedy)
        return sample_from_probs(q_d, noise), q_d

    return jax.lax.cond(all_greedy, greedy, sampled)


def _to_target_vocab(head: Eagle3Head, q_d: jax.Array, vocab: int) -> jax.Array:
    """q over the draft vocabulary [..., draft_vocab] -> over the target's [..., V] (zero off d2t's ids)."""
    return jnp.zeros((*q_d.shape[:-1], vocab), jnp.float32).at[..., head.target_ids()].set(q_d)


def _make_absorb(graphdef, kv_len: int):
    def absorb(state, embed, cache, last, slot_ids, tokens, features, start, count):
        """Rows b: slot slot_ids[b] (padding: the slot count), positions start[b] .. start[b]+count[b]-1
        (all below ``kv_len``) with target features [B, W, F] and next tokens [B, W] -> (cache, last)."""
        return absorb_rows(nnx.merge(graphdef, state), embed, cache, last, slot_ids, tokens, features, start, count,
                           kv_len)

    return absorb


def absorb_rows(head: Eagle3Head, embed, cache, last, slot_ids, tokens, features, start, count, kv_len: int):
    """The absorb of ``_make_absorb`` on a merged head (also run inside a fused step)."""
    s = last.shape[0]
    ids = jnp.where(count > 0, slot_ids, s)  # rows with nothing to absorb write nothing
    out, cache = head(jnp.maximum(tokens, 0), features, start, cache, ids, embed, kv_len=kv_len)
    final = jnp.take_along_axis(out, jnp.maximum(count - 1, 0)[:, None, None], axis=1)[:, 0]
    return cache, last.at[ids].set(final.astype(last.dtype), mode="drop")


def _make_draft(graphdef, kb: int, vocab: int, kv_len: int):
    def draft(state, embed, cache, last, slot_ids, start, sampling: BatchSampling, out_pos):
        """kb drafts for rows b (slot slot_ids[b]; padding rows: the slot count), the first fed at
        ``start`` (live rows' start + kb <= ``kv_len``) -> (cache, tokens [B, kb], q [B, kb, V])."""
        return draft_rows(nnx.merge(graphdef, state), kb, vocab, kv_len, embed, cache, last, slot_ids, start,
                          sampling, out_pos)

    return draft


def draft_rows(head: Eagle3Head, kb: int, vocab: int, kv_len: int, embed, cache, last, slot_ids, start,
               sampling: BatchSampling, out_pos):
    """The round of ``_make_draft`` on a merged head (also run inside a fused step). Drafts and q's
    stay in the draft vocabulary until the end: one scatter to the target's ids per round."""
    all_greedy = jnp.all(sampling.temperature <= 0)
    h = jnp.take(last, slot_ids, axis=0, mode="clip")
    d, q_d = _draw(head, h, sampling, out_pos, all_greedy)
    ds, qs = [d], [q_d]
    ids = head.target_ids()
    for i in range(1, kb):  # unrolled: kb is a small static bucket
        out, cache = head(jnp.take(ids, d)[:, None], h[:, None], start + i - 1, cache, slot_ids, embed, fused=True,
                          kv_len=kv_len)
        h = out[:, 0]
        d, q_d = _draw(head, h, sampling, out_pos + i, all_greedy)
        ds.append(d)
        qs.append(q_d)
    return cache, jnp.take(ids, jnp.stack(ds, axis=1)), _to_target_vocab(head, jnp.stack(qs, axis=1), vocab)


class Eagle3Proposer:
    """Proposals from an EAGLE-3 head reading the target's hidden states (see the module docstring)."""

    name = "eagle3"
    deterministic = False
    always_proposes = True
    catches_up = False  # the head absorbs every step's features, drafting or not

    def __init__(self, head: Eagle3Head, target_embed: jax.Array | None = None, kv_dtype: str | None = None):
        """``target_embed``: the target's embedding table [V, D], shared (needed unless the head has its own).
        ``kv_dtype``: "int8" for the head's own KV cache (None or "auto": the head's dtype)."""
        self.cfg = head.cfg
        self.kv_dtype = check_kv_dtype(kv_dtype)
        if not self.cfg.own_embeddings and target_embed is None:
            raise ValueError("this EAGLE-3 head shares the target's embeddings: pass target_embed")
        self.graphdef, state = nnx.split(head)
        self.state = params_tree(state)
        self.embed = None if self.cfg.own_embeddings else target_embed
        self.feature_layers = self.cfg.aux_layers  # the runner makes the target return these
        self.cache: KVCache | None = None
        self.paging: tuple[int, int, int] | None = None
        self.page_table: np.ndarray | None = None
        self._fns: dict = {}
        self.placement: Placement | None = None
        self._shardings = None  # on a mesh: (state, embed, cache, last, replicated)

    def use_placement(self, target: Placement, num_slots: int = 0, max_len: int = 0) -> None:
        """Run on the target's mesh (call before ``attach``), placed as a draft model is
        (``mesh.draft_placement``: weights replicated when the head with its cache is small, else
        the target's rules; cache slots split like the target's). A shared embedding table goes
        where the target's own is (a table already there, e.g. read into the target's shardings,
        is used as it is). Rounds and absorbs get explicit in/out shardings: the head's cache keeps
        its layout from step to step, ``last`` [S, D] and the step inputs are replicated."""
        hbm = device_memory_bytes(target.mesh.devices.flat[0])
        self.placement = placement = draft_placement(self.cfg, target, num_slots, max_len, hbm,
                                                     kv_dtype=self.kv_dtype)
        state_sharding = params_tree(placement.state_shardings(params_variables(self.graphdef, self.state)))
        self.state = jax.device_put(self.state, state_sharding)
        embed_sharding = None
        if self.embed is not None:  # the target's embed parameter's logical axes, by the target's rules
            embed_sharding = target.sharding(("vocab", "embed"), self.embed.shape)
            self.embed = jax.device_put(self.embed, embed_sharding)
        rep = placement.replicated()
        self._shardings = (state_sharding, embed_sharding or rep, None, rep, rep)
        self._fns = {}

    # ------------------------------------------------------------------ setup
    # The head's position p reads the token at p + 1, so its entries of a cached block depend on
    # the token after the block too: prefix-cache keys cover that token (prompts share a block of
    # the head's pages only where they also agree on the next token).
    reuses_prefix = True
    prefix_key_tokens = 1

    def set_pages(self, slot: int, pages: list[int]) -> None:
        if self.page_table is None:
            raise RuntimeError("set_pages on an EAGLE-3 head with a slot cache")
        self.cache = set_table_row(self.cache, self.page_table, slot, pages,
                                   self._shardings[2].page_table if self.placement is not None else None)

    def attach(self, target_cfg: ModelConfig, num_slots: int, max_len: int,
               paging: tuple[int, int, int] | None = None) -> None:
        from jaxspec.checkpoint.eagle3_io import check_head_for_target

        check_head_for_target(self.cfg, target_cfg)
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"EAGLE-3 head {self.cfg.name} holds {self.cfg.max_seq_len} positions; "
                             f"the engine needs {max_len}")
        self.num_slots, self.max_len = num_slots, max_len
        self.feature_dtype = jnp.dtype(target_cfg.dtype)
        # Paged like the target, page for page (the engine hands both the same page ids), so the
        # head's memory follows the requests' lengths as the target's does.
        self.paging = paging
        pages = dict(num_pages=paging[0], page_size=paging[1], page_groups=paging[2]) if paging is not None else {}
        self.page_table = None if paging is None else np.full((num_slots, max_len // paging[1]), paging[0], np.int32)
        create = lambda: KVCache.create(self.cfg, num_slots, max_len, kv_dtype=self.kv_dtype, **pages)  # noqa: E731
        last = jnp.zeros((num_slots, self.cfg.hidden_size), jnp.dtype(self.cfg.dtype))  # [S, D]
        if self.placement is None:
            # Committed to a device like every later (jit-output) array: first and later calls share
            # one compilation.
            dev = jax.devices()[0]
            self.cache, self.last = jax.device_put(create(), dev), jax.device_put(last, dev)
        else:  # created in place, shard by shard
            state, embed, _, last_sharding, rep = self._shardings
            cache_sharding = self.placement.cache_shardings(
                KVCache.abstract(self.cfg, num_slots, max_len, kv_dtype=self.kv_dtype, **pages))
            self._shardings = (state, embed, cache_sharding, last_sharding, rep)
            self.cache = jax.jit(create, out_shardings=cache_sharding)()
            self.last = jax.device_put(last, last_sharding)
        self._fns = {}
        self.lengths = np.zeros(num_slots, np.int32)
        self.prefill_widths = prefill_buckets(max_len)
        self.rows = batch_buckets(min(4, num_slots))  # ModelRunner's default prefill row buckets
        # Attention spans, as the draft model's (x4 apart: the head's attention is a small part of
        # its round, and every span multiplies the rounds compiled).
        self.kv_buckets = kv_buckets(max_len, factor=4)

    def kv_bucket_for(self, positions: int) -> int:
        return bucket_up(min(int(positions), self.max_len), self.kv_buckets)

    def _jit(self, key: tuple, make, donate: tuple[int, ...], num_small: int, outputs: tuple[str, ...]):
        """Resolved once per proposer: the shared cache's key hashes the graphdef (~1 ms). Every
        call takes (state, embed, cache, last, then ``num_small`` small inputs); on a mesh the
        outputs named "cache" / "last" keep those layouts, the others are replicated."""
        fn = self._fns.get(key)
        if fn is None:
            kwargs: dict = {"donate_argnums": donate}
            full = ("eagle3", self.graphdef, *key)
            if self.placement is not None:
                state, embed, cache, last, rep = self._shardings
                kwargs["in_shardings"] = (state, embed, cache, last, *[rep] * num_small)
                kwargs["out_shardings"] = tuple({"cache": cache, "last": last}.get(o, rep) for o in outputs)
                full = (*full, self.placement, self.num_slots, self.max_len, self.paging, self.kv_dtype)
            fn = self._fns[key] = cached_jit(full, make, **kwargs)
        return fn

    def _absorb(self, kv_len: int):
        return self._jit(("absorb", kv_len), lambda: _make_absorb(self.graphdef, kv_len), (2, 3),  # cache, last
                         5, ("cache", "last"))

    def _draft(self, kb: int, kv_len: int):
        vocab = self.cfg.vocab_size
        return self._jit(("draft", kb, vocab, kv_len), lambda: _make_draft(self.graphdef, kb, vocab, kv_len),
                         (2,), 4, ("cache", "tokens", "q"))  # donates the cache

    def absorb_span(self, start: np.ndarray, count: np.ndarray, width: int) -> int:
        """The span an absorb of positions start[b] .. start[b]+count[b]-1 attends over: the rows'
        real end, but at least the block's width (a prompt's absorb then compiles one span per
        prompt bucket, not every span)."""
        live = np.asarray(count) > 0
        end = int((np.asarray(start)[live] + np.asarray(count)[live]).max(initial=0))
        return self.kv_bucket_for(max(end, width))

    # ---------------------------------------------------------------- requests
    def prefill(self, slot: int, prompt_ids: list[int], start: int = 0) -> None:
        """The prompt's features arrive through ``observe``; its first ``start`` positions are in
        the head's cache already (a cached prefix's shared pages, or earlier chunks)."""
        if start and self.paging is None and self.lengths[slot] != start:
            raise ValueError(f"EAGLE-3 head: a prompt continues at position {start} but the head's slot cache "
                             f"holds {int(self.lengths[slot])}")
        self.lengths[slot] = start

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0

    def observe(self, row_slots: np.ndarray, tokens, features: jax.Array, start: np.ndarray,
                count: np.ndarray, kv_len: int | None = None) -> None:
        """The target processed positions start[b] .. start[b]+count[b]-1 of slot row_slots[b]
        (count 0: nothing) with ``features`` [B, W, F]; ``tokens`` [B, W] holds the token *after*
        each of those positions (the next input, already known). Absorbed into the head's cache,
        attending over ``kv_len`` (default ``absorb_span``)."""
        row_slots, count = self.absorbed(row_slots, start, count)
        kv_len = kv_len or self.absorb_span(start, count, features.shape[1])
        self.cache, self.last = self._absorb(kv_len)(self.state, self.embed, self.cache, self.last, row_slots,
                                                     tokens, features, np.asarray(start, np.int32), count)

    def absorbed(self, row_slots, start, count) -> tuple[np.ndarray, np.ndarray]:
        """Host bookkeeping of an absorb of positions start[b] .. start[b]+count[b]-1 of slot
        row_slots[b] (``observe``, or a runner's fused step that absorbed them on the device)."""
        row_slots = np.asarray(row_slots, np.int32)
        count = np.asarray(count, np.int32)
        live = count > 0
        if (self.lengths[row_slots[live]] != np.asarray(start)[live]).any():
            raise RuntimeError(f"EAGLE-3 head out of step with the target: head lengths "
                               f"{self.lengths[row_slots[live]].tolist()}, target positions "
                               f"{np.asarray(start)[live].tolist()}")
        self.lengths[row_slots[live]] += count[live]
        return row_slots, count

    def check_round(self, ctx: SpecContext) -> None:
        _, live = ctx.live()
        if (ctx.history.length[live] - 1 != self.lengths[live]).any():
            raise RuntimeError("EAGLE-3 head has not absorbed the context the target has")

    def step_shardings(self) -> tuple | None:
        """On a mesh: the shardings of (state, embed, cache, last) for a runner's fused step; else None."""
        return None if self.placement is None else self._shardings[:4]

    def round_fns(self, kb: int, kv_len: int):
        """(round, absorb) as pure functions, for a runner to fuse into its step: round (state,
        embed, cache, last, slot_ids, start, sampling, out_pos) -> (cache, tokens [B, kb], q's
        [B, kb, V]); absorb (state, embed, cache, last, slot_ids, tokens, features, start, count)
        -> (cache, last). Both attend over ``kv_len``."""
        return _make_draft(self.graphdef, kb, self.cfg.vocab_size, kv_len), _make_absorb(self.graphdef, kv_len)

    def would_propose(self, history, slots: np.ndarray) -> np.ndarray:
        return np.ones(len(slots), bool)  # a model always drafts

    def propose(self, ctx: SpecContext) -> Proposal:
        idx, live = ctx.live()
        rows = ctx.rows.astype(np.int32)
        safe = np.minimum(rows, self.num_slots - 1)
        start = np.where(ctx.active, self.lengths[safe], self.max_len).astype(np.int32)
        self.check_round(ctx)
        kv_len = self.kv_bucket_for(int(start[ctx.active].max(initial=0)) + ctx.kb)
        self.cache, tokens, probs = self._draft(ctx.kb, kv_len)(self.state, self.embed, self.cache, self.last, rows,
                                                                 start, ctx.sampling, ctx.out_pos)
        return Proposal(tokens, probs, np.where(ctx.active, ctx.k, 0).astype(np.int32))

    def commit(self, ctx: SpecContext, proposal: Proposal, num_accepted: np.ndarray) -> None:
        pass  # the accepted positions arrive through ``observe`` with the target's features

    # ----------------------------------------------------------------- warm-up
    def warmup(self, buckets: list[int], batch_buckets: list[int] | None = None, drafts: bool = True,
               chunk_widths: list[int] = ()) -> None:
        """Compile every draft length x batch bucket x span, the absorbs of plain steps (width 1) and
        verifications (width kb + 1) at every span (``drafts=False``: none of these, where a runner
        fuses the round and the absorbs into its steps), the absorbs of prefills (every prompt
        bucket at its own span) and of later prompt chunks (``chunk_widths``, over the whole
        context, as the target prefills them); no slot is touched."""
        for kb in buckets if drafts else ():
            for rows in batch_buckets or [self.num_slots]:
                for kv_len in self.kv_buckets:
                    if kb > 0:
                        self._run_dummy(kb, rows, kv_len)
        for rows in (batch_buckets or [self.num_slots]) if drafts else ():
            for width in sorted({1, *[kb + 1 for kb in buckets if kb > 0]}):
                for kv_len in self.kv_buckets:
                    if kv_len >= self.kv_bucket_for(width):
                        self._dummy_absorb(rows, width, kv_len)
        for width in self.prefill_widths:
            for rows in self.rows:
                self._dummy_absorb(rows, width, self.kv_bucket_for(width))
        for width in chunk_widths:
            for rows in self.rows:
                self._dummy_absorb(rows, width, self.kv_bucket_for(self.max_len))

    def _dummy_absorb(self, rows: int, width: int, kv_len: int | None = None) -> None:
        z = np.zeros(rows, np.int32)
        # Committed like the target's step outputs, so the real calls share this compilation.
        where = self._shardings[4] if self.placement is not None else jax.devices()[0]
        feats = jax.device_put(jnp.zeros((rows, width, self.cfg.feature_size), self.feature_dtype), where)
        self.cache, self.last = self._absorb(kv_len or self.kv_bucket_for(width))(
            self.state, self.embed, self.cache, self.last, np.full(rows, self.num_slots, np.int32),
            np.zeros((rows, width), np.int32), feats, z, z)

    def _run_dummy(self, kb: int, rows: int | None = None, kv_len: int | None = None) -> None:
        b = rows or self.num_slots
        sampling = BatchSampling(np.zeros(b, np.float32), np.zeros(b, np.int32), np.ones(b, np.float32),
                                 np.zeros(b, np.float32), np.zeros((b, 2), np.uint32))
        far = np.full(b, self.max_len, np.int32)  # padding rows at positions past the cache: nothing written
        self.cache, tokens, _ = self._draft(kb, self.kv_bucket_for(kv_len or self.max_len))(
            self.state, self.embed, self.cache, self.last, np.full(b, self.num_slots, np.int32), far, sampling,
            np.zeros(b, np.int32))
        tokens.block_until_ready()

    def measure(self, kb: int, reps: int, rows: int | None = None, kv_len: int | None = None) -> float:
        if kb == 0:
            return 0.0
        self._run_dummy(kb, rows, kv_len)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            self._run_dummy(kb, rows, kv_len)
            times.append(time.perf_counter() - t)
        return statistics.median(times)
