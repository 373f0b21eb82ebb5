"""Prompt lookup: propose the continuation of the most recent earlier occurrence of
the context's last n tokens (n from ``max_n`` down to ``min_n``). No model; the
drafts are a deterministic function of the context, so their q is one-hot and
verification accepts x with probability p(x) — exact for sampled requests too.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from jaxspec.config import ModelConfig
from jaxspec.speculative.proposer import Proposal, SpecContext, TokenHistory


def match_start(context: np.ndarray, max_n: int = 3, min_n: int = 1) -> int | None:
    """Where the tokens that followed the latest earlier match of the context's suffix start (at
    least one token follows: a match ends before the suffix); None: no match."""
    length = len(context)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = context[length - n :]
        # Windows that start before the suffix itself and have at least one token after them.
        windows = sliding_window_view(context[: length - 1], n)
        hits = np.flatnonzero(np.all(windows == suffix, axis=1))
        if hits.size:
            return int(hits[-1]) + n
    return None


def lookup(context: np.ndarray, k: int, max_n: int = 3, min_n: int = 1) -> np.ndarray:
    """Up to k tokens that followed the latest earlier match of the context's suffix."""
    start = match_start(context, max_n, min_n) if k > 0 else None
    return context[:0] if start is None else context[start : start + k]


class NgramProposer:
    name = "ngram"
    deterministic = True
    always_proposes = False  # a lookup finds something or not
    catches_up = False

    def __init__(self, max_n: int = 3, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n = max_n, min_n
        # Per slot: (context length, last token, match start) of its latest lookup. A step's plan
        # asks ``would_propose`` and its proposal then needs the same lookup: done once.
        self._found: dict[int, tuple[int, int, int | None]] = {}

    reuses_prefix = True  # reads the runner's token history only
    prefix_key_tokens = 0

    def attach(self, target_cfg: ModelConfig, num_slots: int, max_len: int,
               paging: tuple[int, int, int] | None = None) -> None:
        self.num_slots, self.max_len = num_slots, max_len

    def set_pages(self, slot: int, pages: list[int]) -> None:
        pass

    def prefill(self, slot: int, prompt_ids: list[int], start: int = 0) -> None:
        self._found.pop(slot, None)

    def _match(self, history: TokenHistory, slot: int) -> tuple[np.ndarray, int | None]:
        context = history.context(slot)
        key = (len(context), int(context[-1]) if len(context) else -1)
        seen = self._found.get(slot)
        if seen is None or seen[:2] != key:
            seen = self._found[slot] = (*key, match_start(context, self.max_n, self.min_n))
        return context, seen[2]

    def would_propose(self, history: TokenHistory, slots: np.ndarray) -> np.ndarray:
        return np.array([self._match(history, s)[1] is not None for s in slots.tolist()], bool)

    def propose(self, ctx: SpecContext) -> Proposal:
        tokens = np.zeros((len(ctx.active), ctx.kb), np.int32)
        num = np.zeros(len(ctx.active), np.int32)
        rows = ctx.rows
        for r in np.flatnonzero(ctx.active & (ctx.k > 0)):
            context, start = self._match(ctx.history, int(rows[r]))
            if start is not None:
                found = context[start : start + int(ctx.k[r])]
                tokens[r, : len(found)] = found
                num[r] = len(found)
        return Proposal(tokens, None, num)

    def commit(self, ctx: SpecContext, proposal: Proposal, num_accepted: np.ndarray) -> None:
        pass

    def release(self, slot: int) -> None:
        self._found.pop(slot, None)

    def warmup(self, buckets: list[int], batch_buckets: list[int] | None = None) -> None:
        pass

    def measure(self, kb: int, reps: int, rows: int | None = None, kv_len: int | None = None) -> float:
        """Lookup time over ``rows`` synthetic contexts of ``kv_len`` tokens (host work only)."""
        if kb == 0:
            return 0.0
        rows = rows or self.num_slots
        length = min(kv_len or self.max_len, self.max_len)
        rng = np.random.default_rng(0)
        hist = TokenHistory(rows, length)
        for s in range(rows):
            hist.start(s, rng.integers(0, 50, length).tolist())
        ctx = SpecContext(hist, np.ones(rows, bool), np.full(rows, kb, np.int32), kb, None, np.zeros(rows, np.int32))
        times = []
        for _ in range(reps):
            fresh = NgramProposer(self.max_n, self.min_n)  # every rep looks up afresh; the slots' lookups stay
            t = time.perf_counter()
            fresh.propose(ctx)
            times.append(time.perf_counter() - t)
        return statistics.median(times)
