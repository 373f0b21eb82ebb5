"""The compiled steps of a ``SpeculativeRunner`` (a mixin of it): verification, a fused draft
model's drafting step (with or without a prompt chunk in its target forward), an EAGLE-3 head's
fused round, each jitted once per (k bucket, span) and shared through ``jit_cache``; and the dummy
steps that compile (and, live, time) them without touching any slot.

It reads the runner's target (``ModelRunner``), proposer, verification backend and compiled-step
dictionaries; ``SpeculativeRunner.__init__`` sets them."""

from __future__ import annotations

import jax
import numpy as np

from jaxspec.engine.slots import SlotTable
from jaxspec.sampling import pad_sampling
from jaxspec.speculative.jit_cache import cached_jit
from jaxspec.speculative.step_fns import make_fused, make_fused_head, make_verify, make_verify_mixed


class CompiledSteps:
    def _verify_fn(self, kb: int, deterministic: bool, kv_len: int):
        # Resolved once per runner: the shared cache's key hashes the graphdef (~1 ms).
        fn = self._verify_fns.get((kb, deterministic, kv_len))
        if fn is None:
            target = self.target
            key = ("verify", target.graphdef, target.statics, kb, kv_len, self.verify_backend, deterministic,
                   target.compact_rows)
            kwargs: dict = {"donate_argnums": (1,)}
            if target.placement is not None:  # explicit layouts: the cache comes back as it went in
                rep = target.placement.replicated()
                kwargs["in_shardings"] = (target.state_sharding, target.cache_sharding, *[rep] * 9)
                # With a target capturing hidden states (EAGLE-3) its features come last, replicated.
                kwargs["out_shardings"] = (target.cache_sharding, rep, rep, rep, *((rep,) if self.feature_layers else ()))
                key = (*key, self.num_slots, self.max_len, target.paging, target.kv_dtype)  # the shardings depend on these
            fn = self._verify_fns[(kb, deterministic, kv_len)] = cached_jit(
                key, lambda: make_verify(target.forward_fn(), self.verify_backend, kv_len, not target.compact_rows),
                **kwargs)
        return fn

    def _fused_fn(self, kb: int, kv_len: int, mixed: bool = False):
        """The fused drafting step; ``mixed``: with a prompt chunk's prefill in its target forward."""
        fn = self._fused_fns.get((kb, kv_len, mixed))
        if fn is None:
            target, prop = self.target, self.proposer
            key = ("fused", mixed, target.graphdef, target.statics, prop.graphdef, prop.moe_backend,
                   getattr(prop, "backends", None), kb, kv_len, self.verify_backend)

            def make():
                if mixed:
                    verify = make_verify_mixed(target.mixed_forward_fn(), self.verify_backend, kv_len)
                else:
                    verify = make_verify(target.forward_fn(), self.verify_backend, kv_len, False)
                return make_fused(prop.loop_fn(kb, kv_len), verify, kb)

            fn = self._fused_fns[(kb, kv_len, mixed)] = cached_jit(key, make, donate_argnums=(1, 3))
        return fn

    def _fused_head_fn(self, kb: int, kv_len: int):
        fn = self._fused_fns.get(("head", kb, kv_len))
        if fn is None:
            target, prop = self.target, self.proposer
            key = ("fused_head", target.graphdef, target.statics, prop.graphdef, kb, kv_len, self.verify_backend)
            kwargs: dict = {"donate_argnums": (1, 4, 5)}  # the target's cache, the head's cache and last
            head = prop.step_shardings() if hasattr(prop, "step_shardings") else None
            if target.placement is not None and head is not None:  # every state and cache as placed
                rep = target.placement.replicated()
                h_state, embed, h_cache, last = head
                kwargs["in_shardings"] = (target.state_sharding, target.cache_sharding, h_state, embed, h_cache, last,
                                          *[rep] * 7)
                kwargs["out_shardings"] = (target.cache_sharding, h_cache, last, rep, rep)
                key = (*key, prop.placement, self.num_slots, self.max_len, target.paging, target.kv_dtype,
                       prop.kv_dtype)
            identity = not target.compact_rows
            def make():
                round_, absorb = prop.round_fns(max(kb, 1), kv_len)
                return make_fused_head(round_ if kb else None, absorb,
                                       make_verify(target.forward_fn(), self.verify_backend, kv_len, identity))

            fn = self._fused_fns[("head", kb, kv_len)] = cached_jit(key, make, **kwargs)
        return fn

    def _run_fused_head(self, kb: int, kv_len: int, slot_ids, last_tokens, start, num_draft, sampling, out_pos,
                        active):
        t, p = self.target, self.proposer
        t.cache, p.cache, p.last, packed, load = self._fused_head_fn(kb, kv_len)(
            t.state, t.cache, p.state, p.embed, p.cache, p.last, slot_ids, last_tokens, start, num_draft, sampling,
            out_pos, active)
        return packed, load

    def _run_fused(self, kb: int, kv_len: int, slot_ids, carry, num_draft, sampling, active, chunk: tuple = ()):
        """``chunk``: a prompt chunk's inputs (``ModelRunner.mixed_chunk`` and its sampling) prefilled in
        the same call; its sampled token comes back last (None without)."""
        t, p = self.target, self.proposer
        t.cache, p.cache, packed, carry, load, *first = self._fused_fn(kb, kv_len, bool(chunk))(
            t.state, t.cache, p.state, p.cache, slot_ids, carry, num_draft, sampling, active, *chunk)
        return packed, carry, load, (first[0] if first else None)

    def _carry(self, block, pending, d_lengths, last_tokens, start, out_pos):
        """A fused step's carry from host arrays [B], placed as a step's output carry is (jit keys
        its compilations on placement; one transfer for the six)."""
        carry = np.stack([block[:, 0], block[:, 1], pending, d_lengths, last_tokens, start, out_pos], axis=1)
        return jax.device_put(carry.astype(np.int32), self.target.cache.lengths.sharding)

    def _run_verify(self, kb: int, deterministic: bool, kv_len: int, slot_ids, last_tokens, start, draft_tokens,
                    draft_probs, num_draft, sampling, out_pos, active):
        fn = self._verify_fn(kb, deterministic, kv_len)
        self.target.cache, out_tokens, accepted, load, *aux = fn(
            self.target.state, self.target.cache, slot_ids, last_tokens, start, draft_tokens,
            None if deterministic else draft_probs, num_draft, sampling, out_pos, active,
        )
        self.target.captured = aux[0] if aux else None
        return out_tokens, accepted, load

    def _dummy_step(self, kb: int, rows: int, kv_len: int, live: bool = False, chunk: bool = False) -> None:
        """A draft loop and verification (or, kb = 0, a decode step) that touches no slot: every
        write lands past the cache end or on the padding slot id. Compiles; with ``live``, times
        the step with valid random tokens that route to experts as real traffic does. ``chunk``: the
        fused step with a (padding) prompt chunk in its target forward."""
        s = self.num_slots
        rows = rows if self.target.compact_rows else s
        if kb == 0 and not self.fused_head:
            self.target.idle_decode(rows, kv_len, live)
            return
        sampling = pad_sampling(SlotTable(0).sampling(), rows)
        rng = np.random.default_rng(rows * 16 + kb)
        slot_ids, zeros = np.full(rows, s, np.int32), np.zeros(rows, np.int32)
        if self.fused_head:
            far = np.full(rows, self.max_len, np.int32)  # every write past the cache end (and slot id S)
            last = rng.integers(0, self.cfg.vocab_size, rows).astype(np.int32)
            num_draft = np.full(rows, kb if live else 0, np.int32)
            packed, _ = self._run_fused_head(kb, kv_len, slot_ids, last, far, num_draft, sampling, zeros,
                                             np.full(rows, live, bool))
            packed.block_until_ready()
            if live and not self.target.compact_rows:  # slots in order: live dummy rows set lengths
                self.target.sync_lengths()
            return
        if self.fused:
            far = np.full(rows, self.max_len, np.int32)  # every write past the cache end (and slot id S)
            block = rng.integers(0, self.cfg.vocab_size, (rows, 2)).astype(np.int32)
            carry = self._carry(block, np.full(rows, int(live), np.int32), far, block[:, 0], far, zeros)
            inputs = self.target.padding_chunk() if chunk else ()
            packed, _, _, _ = self._run_fused(kb, kv_len, slot_ids, carry, np.full(rows, kb if live else 0, np.int32),
                                              sampling, np.full(rows, live, bool), inputs)
            packed.block_until_ready()
            return
        # A model drafter's tokens and q's arrive as its committed device outputs (a deterministic
        # drafter's as host arrays): the dummy passes the same kind of array, or the first real
        # step would compile this step again, mid-serving.
        tokens, probs = rng.integers(0, self.cfg.vocab_size, (rows, kb)).astype(np.int32), None
        if not self.proposer.deterministic:
            where = self.target.placement.replicated() if self.target.placement is not None else jax.devices()[0]
            tokens = jax.device_put(tokens, where)
            probs = jax.device_put(np.full((rows, kb, self.cfg.vocab_size), 1.0 / self.cfg.vocab_size, np.float32),
                                   where)
        last = rng.integers(0, self.cfg.vocab_size, rows).astype(np.int32)
        far = np.full(rows, self.max_len, np.int32)  # writes past the cache end: dropped
        out, _, _ = self._run_verify(kb, self.proposer.deterministic, kv_len, slot_ids, last, far, tokens, probs,
                                     np.full(rows, kb if live else 0, np.int32), sampling, zeros,
                                     np.full(rows, live, bool))
        out.block_until_ready()
        if live and not self.target.compact_rows:
            self.target.sync_lengths()
