"""The proposer interface, the per-slot token history it reads, and the "none" proposer.

A proposer guesses the next tokens of every active slot; verification decides
which of them the target keeps. Proposers plug in behind ``Proposer`` (a draft
model, prompt lookup, and later EAGLE-style or MTP heads reading the target's
hidden states) and never see the acceptance rule.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Protocol

import jax
import numpy as np

from jaxspec.config import ModelConfig
from jaxspec.sampling import BatchSampling


class TokenHistory:
    """Host-side copy of every slot's context (prompt + generated tokens), which
    proposers read (n-gram lookup, a lagging draft model's catch-up)."""

    def __init__(self, num_slots: int, capacity: int):
        self.tokens = np.zeros((num_slots, capacity), np.int32)
        self.length = np.zeros(num_slots, np.int32)

    @property
    def capacity(self) -> int:
        return self.tokens.shape[1]

    def start(self, slot: int, ids: list[int]) -> None:
        n = len(ids)
        if n > self.capacity:
            raise ValueError(f"context of {n} tokens exceeds the history capacity {self.capacity}")
        self.tokens[slot, :n] = ids
        self.length[slot] = n

    def extend(self, slot: int, ids: list[int] | np.ndarray) -> None:
        n, at = len(ids), int(self.length[slot])
        # Tokens beyond the capacity can only lie past a request's max_tokens (the
        # engine truncates them), so they are dropped rather than an error.
        keep = max(0, min(n, self.capacity - at))
        self.tokens[slot, at : at + keep] = np.asarray(ids[:keep], np.int32)
        self.length[slot] = at + n

    def append(self, slot: int, token: int) -> None:
        at = int(self.length[slot])
        if at < self.capacity:
            self.tokens[slot, at] = token
        self.length[slot] = at + 1

    def clear(self, slot: int) -> None:
        self.length[slot] = 0

    def context(self, slot: int) -> np.ndarray:
        return self.tokens[slot, : min(int(self.length[slot]), self.capacity)]

    def last(self) -> np.ndarray:
        """The newest token per slot [S] (0 for empty slots): the next step's input."""
        idx = np.clip(np.minimum(self.length, self.capacity) - 1, 0, None)
        return self.tokens[np.arange(len(idx)), idx]

    def window(self, starts: np.ndarray, width: int, counts: np.ndarray, slots: np.ndarray | None = None) -> np.ndarray:
        """tokens[s, starts[i] : starts[i] + counts[i]] left-aligned in a [n, width] block (rest 0), s =
        slots[i] (default: every slot in order; ids past the last slot read slot 0, counts 0 there)."""
        rows = self.tokens if slots is None else self.tokens[np.where(slots < len(self.tokens), slots, 0)]
        cols = starts[:, None] + np.arange(width)[None, :]
        block = np.take_along_axis(rows, np.clip(cols, 0, self.capacity - 1), axis=1)
        return np.where(np.arange(width)[None, :] < counts[:, None], block, 0).astype(np.int32)


@dataclasses.dataclass
class SpecContext:
    """A proposer's view of one step (host arrays, one entry per batch row).

    A step runs over the active slots packed into a compiled batch bucket: row r is slot
    ``slots[r]``; padding rows have ``active[r] = False`` (and slot id ``num_slots``).
    ``slots=None`` means row r is slot r."""

    history: TokenHistory
    active: np.ndarray  # [B] bool
    k: np.ndarray  # [B] i32 tokens wanted per row (0 for padding rows)
    kb: int  # static proposal length (a compiled bucket), >= k.max()
    sampling: BatchSampling  # the requests' settings (numpy arrays, [B])
    out_pos: np.ndarray  # [B] i32 output position of the first proposed token
    slots: np.ndarray | None = None  # [B] i32 slot of each row
    kv_len: int | None = None  # the step's attention span (a compiled bucket), if the proposer wants one

    @property
    def rows(self) -> np.ndarray:
        """Slot id per row (padding rows: the number of slots)."""
        return np.arange(len(self.active), dtype=np.int32) if self.slots is None else self.slots

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        """(row indices, slot ids) of the rows that hold a request."""
        idx = np.flatnonzero(self.active)
        return idx, self.rows[idx]


class Proposal(NamedTuple):
    tokens: jax.Array | np.ndarray  # [B, kb] i32 per batch row; entries at or past num_draft are ignored
    probs: jax.Array | None  # [B, kb, V] f32 the q each token was sampled from; None: deterministic (one-hot)
    num_draft: np.ndarray  # [B] i32 tokens proposed per row (<= ctx.k)


class Proposer(Protocol):
    name: str
    deterministic: bool  # proposals are a function of the context (one-hot q; Proposal.probs is None)
    # ``would_propose`` is True for every slot whatever the history (a model): the scheduler skips asking.
    always_proposes: bool
    # Steps a slot did not draft in must be fed to the proposer before it drafts again (a draft model's
    # own cache): a probe then pays that per slot it covers, so the scheduler probes one slot.
    catches_up: bool
    # Whether ``prefill`` can start after a prompt prefix already cached in shared pages, and how
    # many tokens after a cached block the proposer's cache entries of that block depend on.
    reuses_prefix: bool
    prefix_key_tokens: int

    def attach(self, target_cfg: ModelConfig, num_slots: int, max_len: int,
               paging: tuple[int, int, int] | None = None) -> None:
        """Bind to a target: check compatibility, allocate per-slot state. ``paging``: the target's
        cache is paged as (num_pages, page_size, page groups); a proposer with a cache of its own pages it the
        same way and follows the target's page assignments (``set_pages``)."""

    def set_pages(self, slot: int, pages: list[int]) -> None:
        """``slot`` holds its positions in these pages from now on (paged caches only)."""

    def prefill(self, slot: int, prompt_ids: list[int], start: int = 0) -> None:
        """A request entered ``slot`` (its first output token is not processed yet); its first
        ``start`` tokens are already in the (shared) cache pages."""

    def would_propose(self, history: TokenHistory, slots: np.ndarray) -> np.ndarray:
        """bool [n]: whether a step over ``history`` as it stands could propose anything for each
        slot (a lookup that finds nothing cannot: the scheduler then plans a plain step, which can
        be queued ahead of the step before it)."""

    def propose(self, ctx: SpecContext) -> Proposal: ...

    def commit(self, ctx: SpecContext, proposal: Proposal, num_accepted: np.ndarray) -> None:
        """Verification kept ``num_accepted[s]`` proposals of slot s (plus one target token)."""

    def release(self, slot: int) -> None: ...

    def warmup(self, buckets: list[int], batch_buckets: list[int] | None = None) -> None:
        """Compile whatever ``propose`` runs for these proposal lengths and batch row counts."""

    def measure(self, kb: int, reps: int, rows: int | None = None, kv_len: int | None = None) -> float:
        """Seconds one ``propose`` of length kb takes over ``rows`` rows (default: every slot)
        attending over ``kv_len`` positions (no state touched)."""


class NoProposer:
    """Plain decoding through the speculative loop (k = 0 for every slot)."""

    name = "none"
    deterministic = True
    always_proposes = False
    catches_up = False

    reuses_prefix = True
    prefix_key_tokens = 0

    def attach(self, target_cfg: ModelConfig, num_slots: int, max_len: int,
               paging: tuple[int, int, int] | None = None) -> None:
        self.num_slots = num_slots

    def set_pages(self, slot: int, pages: list[int]) -> None:
        pass

    def prefill(self, slot: int, prompt_ids: list[int], start: int = 0) -> None:
        pass

    def would_propose(self, history: TokenHistory, slots: np.ndarray) -> np.ndarray:
        return np.zeros(len(slots), bool)

    def propose(self, ctx: SpecContext) -> Proposal:
        s = len(ctx.active)
        return Proposal(np.zeros((s, ctx.kb), np.int32), None, np.zeros(s, np.int32))

    def commit(self, ctx: SpecContext, proposal: Proposal, num_accepted: np.ndarray) -> None:
        pass

    def release(self, slot: int) -> None:
        pass

    def warmup(self, buckets: list[int], batch_buckets: list[int] | None = None) -> None:
        pass

    def measure(self, kb: int, reps: int, rows: int | None = None, kv_len: int | None = None) -> float:
        return 0.0
