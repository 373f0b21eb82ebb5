"""The jitted bodies of speculative steps, as pure functions a runner compiles: verification of
drafted tokens, a draft model's loop fused with verification (which also derives the next step's
inputs, its carry), and an EAGLE-3 head's round and absorb fused with verification."""

from __future__ import annotations

import jax.numpy as jnp

from jaxspec.engine.mixed_step import chunk_token
from jaxspec.models.transformer import Segment
from jaxspec.sampling import BatchSampling, logits_to_probs
from jaxspec.speculative.verify import verify_with_keys


def _accept(logits, draft_tokens, draft_probs, num_draft, sampling: BatchSampling, out_pos, backend: str):
    """(tokens [B, kb+1], accepted [B]) of a verification from the target's logits [B, kb+1, V]."""
    col = lambda x: x[:, None]  # noqa: E731  per-row settings broadcast over the kb+1 positions
    p = logits_to_probs(logits, col(sampling.temperature), col(sampling.top_k), col(sampling.top_p),
                        col(sampling.min_p))
    # Greedy rows verify one-hot p against drafts that were argmaxes too (a draft model samples
    # greedy rows greedily; deterministic drafters are one-hot by construction).
    return verify_with_keys(p, draft_probs, draft_tokens, num_draft, sampling.seed, out_pos, backend,
                            all_greedy=jnp.all(sampling.temperature <= 0))


def make_verify(fwd, backend: str, kv_len: int, identity_rows: bool):
    def verify(state, cache, slot_ids, last_tokens, start, draft_tokens, draft_probs, num_draft, sampling: BatchSampling,
               out_pos, active):
        """B rows, row b = slot slot_ids[b] (padding rows: slot id S, inactive; ``identity_rows``:
        row b is slot b and inactive rows keep their lengths)."""
        tokens = jnp.concatenate([last_tokens[:, None], draft_tokens.astype(jnp.int32)], axis=1)
        num_draft = jnp.where(active, num_draft, 0)
        ids = None if identity_rows else slot_ids
        out = fwd(state, tokens, start, cache, ids, jnp.where(active, num_draft + 1, 0), kv_len=kv_len)
        out_tokens, accepted = _accept(out.logits, draft_tokens, draft_probs, num_draft, sampling, out_pos, backend)
        # Roll back to the accepted context (padding rows write nothing).
        if identity_rows:
            lengths = jnp.where(active, start + 1 + accepted, cache.lengths)
        else:
            lengths = out.cache.lengths.at[slot_ids].set(start + 1 + accepted, mode="drop")
        # With a target capturing hidden states (EAGLE-3), its features [B, kb+1, F] come last.
        extra = () if out.aux_hidden is None else (out.aux_hidden,)
        return out.cache.with_lengths(lengths), out_tokens, accepted, out.expert_load, *extra

    return verify


def make_verify_mixed(mixed_fwd, backend: str, kv_len: int):
    """``make_verify`` (packed rows) with a prompt chunk's prefill in the same forward
    (``mixed_step.forward_mixed``: the experts read once for both): it also takes the chunk's
    (tokens [1, L], start, slot, valid [1], sampling) and returns the chunk's sampled token [1] last."""

    def verify(state, cache, slot_ids, last_tokens, start, draft_tokens, draft_probs, num_draft, sampling: BatchSampling,
               out_pos, active, p_tokens, p_start, p_slots, p_valid, p_sampling: BatchSampling):
        tokens = jnp.concatenate([last_tokens[:, None], draft_tokens.astype(jnp.int32)], axis=1)
        num_draft = jnp.where(active, num_draft, 0)
        rows = Segment(tokens, start, slot_ids, jnp.where(active, num_draft + 1, 0))
        (logits, p_logits), cache, load = mixed_fwd(state, cache, (rows, Segment(p_tokens, p_start, p_slots, p_valid)),
                                                    (kv_len, kv_len))
        out_tokens, accepted = _accept(logits, draft_tokens, draft_probs, num_draft, sampling, out_pos, backend)
        lengths = cache.lengths.at[slot_ids].set(start + 1 + accepted, mode="drop")  # the chunk's is written
        return cache.with_lengths(lengths), out_tokens, accepted, load, chunk_token(p_logits, p_valid, p_sampling)

    return verify


# Columns of a fused drafting step's carry [B, CARRY_WIDTH] int32: the inputs one step derives for
# the next from its accepted count and bonus token, so a chained step never waits for the host.
(C_BLOCK0, C_BLOCK1, C_PENDING, C_DLEN, C_LAST, C_START, C_OUTPOS), CARRY_WIDTH = range(7), 7


def make_fused(loop, verify, kb: int):
    """Draft loop, verification and the draft cache's rollback in one step (packed rows only):
    one dispatch and one device->host transfer (tokens and accept counts packed) per step. Its
    inputs per row come as a carry (the draft's pending block and count, the draft's cache length,
    the token fed, the target's start position, the output position), and it returns the next
    step's carry: a step over the same rows can be queued before this one's tokens reach the host.
    With ``verify`` from ``make_verify_mixed`` it takes a prompt chunk's inputs last and returns the
    chunk's sampled token last."""

    def step(t_state, t_cache, d_state, d_cache, slot_ids, carry, num_draft, sampling: BatchSampling, active, *chunk):
        block, pending, d_lengths = carry[:, C_BLOCK0:C_BLOCK1 + 1], carry[:, C_PENDING], carry[:, C_DLEN]
        last_tokens, start, out_pos = carry[:, C_LAST], carry[:, C_START], carry[:, C_OUTPOS]
        d_cache, drafts, q = loop(d_state, d_cache, slot_ids, block, pending, d_lengths, sampling, out_pos)
        t_cache, out_tokens, accepted, load, *first = verify(t_state, t_cache, slot_ids, last_tokens, start, drafts, q,
                                                             num_draft, sampling, out_pos, active, *chunk)
        out_tokens, accepted = out_tokens.astype(jnp.int32), accepted.astype(jnp.int32)
        # The draft has seen the accepted context up to d_{kb-2} (see DraftModelProposer.commit):
        # what it has not seen (the bonus token, after d_{kb-1} if every draft was accepted) is
        # the next step's pending block.
        seen = jnp.minimum(accepted, kb - 1)
        d_len = start + 1 + seen
        pick = lambda i: jnp.take_along_axis(out_tokens, i[:, None], axis=1)[:, 0]  # noqa: E731
        nxt = jnp.stack([pick(seen), pick(jnp.minimum(seen + 1, kb)), 1 + accepted - seen, d_len, pick(accepted),
                         start + 1 + accepted, out_pos + 1 + accepted], axis=1)
        carry = jnp.where(active[:, None], nxt, carry)
        d_cache = d_cache.with_lengths(d_cache.lengths.at[slot_ids].set(d_len, mode="drop"))
        packed = jnp.concatenate([out_tokens, accepted[:, None]], axis=1)
        return t_cache, d_cache, packed, carry, load, *first

    return step


def make_fused_head(round_, absorb, verify):
    """EAGLE-3: the head's round, the verification (which returns the target's features of the
    verified positions) and the head's absorb of the kept ones in one step, so a step is one
    dispatch and one device->host transfer, as with a fused draft model. Rows are packed, or every
    slot in order where the target's cache splits slots over devices (``verify`` then built with
    ``identity_rows``); on a mesh the runner compiles it with every state and cache as placed.
    ``round_`` None: a k = 0 step (the one-token verification draws the token a plain decode step
    draws), so a step the adaptive policy does not draft in is one call too."""

    def step(t_state, t_cache, h_state, embed, h_cache, last, slot_ids, last_tokens, start, num_draft,
             sampling: BatchSampling, out_pos, active):
        if round_ is None:  # k = 0: the target's one-token step and the head's absorb of it
            drafts, q = jnp.zeros((slot_ids.shape[0], 0), jnp.int32), None
        else:
            # Rows that do not step (slots in order, where the cache splits them over devices) draft
            # at positions past the head's cache: nothing of theirs is written.
            far = jnp.where(active, start, h_cache.max_len)
            h_cache, drafts, q = round_(h_state, embed, h_cache, last, slot_ids, far, sampling, out_pos)
        t_cache, out_tokens, accepted, load, feats = verify(t_state, t_cache, slot_ids, last_tokens, start, drafts, q,
                                                            num_draft, sampling, out_pos, active)
        # t0 and the accepted drafts, each followed by the next kept token (as ``observe`` gets them).
        h_cache, last = absorb(h_state, embed, h_cache, last, slot_ids, out_tokens, feats, start,
                               jnp.where(active, accepted + 1, 0))
        packed = jnp.concatenate([out_tokens.astype(jnp.int32), accepted.astype(jnp.int32)[:, None]], axis=1)
        return t_cache, h_cache, last, packed, load

    return step
