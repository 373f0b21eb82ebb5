"""Host-side page allocator of a paged KV cache, with prefix caching.

One pool of ``num_pages`` pages of ``page_size`` positions serves every slot (the target's and
the draft's caches use the same page ids, so one table describes both). How much a request takes
at admission is the engine's choice (``Engine(kv_admission=...)``): everything it can write up
front (prompt, ``max_tokens``, the speculative look-ahead: the pool never runs dry, a request
that does not fit waits), or its prompt and first step only, the rest taken page by page as it
grows (``extend``), with preemption when the pool runs dry.

Prefix caching: once a prompt is prefilled, every page holding a *full* block of prompt tokens
is keyed by a digest of that block and every block before it. A later prompt with the same
leading blocks takes those pages (reference counted, stored once however many requests share
them) and prefills only the rest. A page whose last user finished stays cached, least recently
used first out, until the pool needs it. The block holding a prompt's last token is never taken
from the cache: prefill must run that token to get the first output token's logits. With
``key_tokens`` k > 0 a block's key also covers the k tokens after it, for caches whose entry at a
position depends on the tokens that follow (an EAGLE-3 head's reads the next token): two prompts
share a block only where they also agree on what follows it.

Groups: a pool split over a mesh's data axis (``groups`` > 1) holds ``num_pages / groups`` pages
per group, group g being page ids ``g * num_pages / groups ..``; a request's pages all come from
one group (the one its slot's data shard holds), and prefixes are cached per group.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import numpy as np


@dataclasses.dataclass
class Reservation:
    """Pages for one request: ``pages[i]`` holds positions ``i * page_size ..``; the first
    ``cached_blocks`` come from the prefix cache (already hold the prompt's K/V)."""

    pages: list[int]
    cached_blocks: int
    page_size: int
    group: int = 0

    @property
    def cached_tokens(self) -> int:
        return self.cached_blocks * self.page_size


@dataclasses.dataclass
class PrefixStats:
    queries: int = 0  # prompts looked up
    hit_tokens: int = 0  # prompt tokens served from the cache
    prompt_tokens: int = 0  # prompt tokens looked up
    evictions: int = 0


class PagePool:
    def __init__(self, num_pages: int, page_size: int, groups: int = 1, prefix_caching: bool = True,
                 key_tokens: int = 0):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"a page pool needs num_pages >= 1 and page_size >= 1, got {num_pages}, {page_size}")
        if key_tokens < 0:
            raise ValueError(f"key_tokens must be >= 0, got {key_tokens}")
        if groups < 1 or num_pages % groups:
            raise ValueError(f"{num_pages} pages do not split into {groups} equal groups")
        self.num_pages = num_pages
        self.page_size = page_size
        self.groups = groups
        self.group_pages = num_pages // groups  # pages per group
        self.prefix_caching = prefix_caching
        self.key_tokens = key_tokens
        self.refs = np.zeros(num_pages, np.int32)
        per = self.group_pages
        # Per group: pages holding nothing worth keeping; cached, unreferenced pages (LRU first);
        # cached prefixes by digest.
        self._free = [collections.deque(range(g * per, (g + 1) * per)) for g in range(groups)]
        self._idle: list[collections.OrderedDict[int, None]] = [collections.OrderedDict() for _ in range(groups)]
        self._by_digest: list[dict[bytes, int]] = [{} for _ in range(groups)]
        self._digest_of: dict[int, bytes] = {}
        self.stats = PrefixStats()

    # ------------------------------------------------------------------ queries
    @property
    def available(self) -> int:
        """Pages a new reservation can take (free, or cached but unreferenced), over every group."""
        return sum(self.available_in(g) for g in range(self.groups))

    def available_in(self, group: int) -> int:
        return len(self._free[group]) + len(self._idle[group])

    def group_of(self, page: int) -> int:
        return page // self.group_pages

    @property
    def cached_pages(self) -> int:
        return len(self._digest_of)

    def pages_for(self, positions: int) -> int:
        return -(-positions // self.page_size)

    def digests(self, prompt: list[int] | np.ndarray) -> list[bytes]:
        """Chained digests of the prompt's full blocks (each with the ``key_tokens`` after it), except
        one holding its last token."""
        blocks = (len(prompt) - max(self.key_tokens, 1)) // self.page_size
        out, prev = [], b""
        arr = np.asarray(prompt, np.int64)
        for i in range(blocks):
            h = hashlib.blake2b(prev, digest_size=16)
            h.update(arr[i * self.page_size:(i + 1) * self.page_size + self.key_tokens].tobytes())
            prev = h.digest()
            out.append(prev)
        return out

    def _match(self, prompt, group: int = 0) -> list[int]:
        pages = []
        if self.prefix_caching:
            for d in self.digests(prompt):
                page = self._by_digest[group].get(d)
                if page is None:
                    break
                pages.append(page)
        return pages

    # -------------------------------------------------------------- reserving
    def cached_blocks(self, prompt: list[int], group: int) -> int:
        """Leading blocks of ``prompt`` cached in ``group``."""
        return len(self._match(prompt, group))

    def reserve(self, prompt: list[int], positions: int, use_cache: bool = True, keep_free: int = 0,
                record: bool = True, group: int = 0) -> Reservation | None:
        """Pages of ``group`` for a request that writes positions [0, positions), its prompt's cached
        prefix shared; None if the group cannot hold it now with ``keep_free`` pages still available
        after (nothing is taken then). ``record``: count the lookup in ``stats`` (not for a preempted
        request's recomputation)."""
        need = self.pages_for(positions)
        cached = self._match(prompt, group) if use_cache else []
        cached = cached[:need]
        # Cached pages nobody references count against what is available, like fresh ones.
        taken_idle = sum(1 for p in cached if self.refs[p] == 0)
        if need - len(cached) + taken_idle + keep_free > self.available_in(group):
            return None
        for p in cached:
            if self.refs[p] == 0:
                del self._idle[group][p]
            self.refs[p] += 1
        fresh = [self._take(group) for _ in range(need - len(cached))]
        for p in fresh:
            self.refs[p] = 1
        if use_cache and record:
            self.stats.queries += 1
            self.stats.prompt_tokens += len(prompt)
            self.stats.hit_tokens += len(cached) * self.page_size
        return Reservation(cached + fresh, len(cached), self.page_size, group)

    def extend(self, reservation: Reservation, positions: int) -> bool:
        """Grow a reservation to cover positions [0, positions) with fresh pages; False (nothing
        taken) if the pool has too few available."""
        more = self.pages_for(positions) - len(reservation.pages)
        if more <= 0:
            return True
        if more > self.available_in(reservation.group):
            return False
        for _ in range(more):
            p = self._take(reservation.group)
            self.refs[p] = 1
            reservation.pages.append(p)
        return True

    def _take(self, group: int) -> int:
        if self._free[group]:
            return self._free[group].popleft()
        page, _ = self._idle[group].popitem(last=False)  # least recently used cached page
        del self._by_digest[group][self._digest_of.pop(page)]
        self.stats.evictions += 1
        return page

    def register(self, prompt: list[int], reservation: Reservation) -> None:
        """The prompt is now in the reservation's pages: key its full blocks for later requests."""
        if not self.prefix_caching:
            return
        for i, d in enumerate(self.digests(prompt)):
            if i >= len(reservation.pages):
                break
            page = reservation.pages[i]
            by_digest = self._by_digest[reservation.group]
            if d not in by_digest and page not in self._digest_of:
                by_digest[d] = page
                self._digest_of[page] = d

    def release(self, reservation: Reservation) -> None:
        """The request ended: its pages go back (cached ones stay findable until reused)."""
        for p in reservation.pages:
            self.refs[p] -= 1
            if self.refs[p] < 0:
                raise RuntimeError(f"page {p} released more often than reserved")
            if self.refs[p] == 0:
                if p in self._digest_of:
                    self._idle[self.group_of(p)][p] = None  # most recently used end
                else:
                    self._free[self.group_of(p)].append(p)

    def clear_cache(self) -> None:
        """Forget every cached prefix (pages in use stay with their requests)."""
        for g in range(self.groups):
            self._free[g].extend(self._idle[g])
            self._idle[g].clear()
            self._by_digest[g].clear()
        self._digest_of.clear()
