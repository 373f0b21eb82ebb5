"""Admission by memory for a paged KV cache: the engine's bookkeeping of which pages each request
holds (``engine.pages.PagePool`` hands them out).

* Which free slot an arrival takes, with its pages: on a pool split over a mesh's data axis, a slot
  of the group that caches the longest prefix of its prompt, then of the group with the most pages.
* "optimistic" admission takes a request's prompt and first step, keeping a watermark of the
  group's pages spare for the running requests, then grows every running request's pages step by
  step (``grow``); when a group runs dry the engine preempts the newest request of that group
  (``victims``). "reserve" takes every page a request may write at admission.
"""

from __future__ import annotations

import collections
from typing import Mapping, Sequence

from jaxspec.engine.pages import PagePool, Reservation
from jaxspec.engine.request import InvalidRequestError, Request

KV_ADMISSIONS = ("optimistic", "reserve")


class KVAdmission:
    def __init__(self, pool: PagePool, runner, mode: str = "optimistic", watermark: float = 0.01):
        if mode not in KV_ADMISSIONS:
            raise ValueError(f"kv_admission must be one of {', '.join(KV_ADMISSIONS)}, got {mode!r}")
        if not 0.0 <= watermark < 1.0:
            raise ValueError(f"kv_watermark must be in [0, 1), got {watermark}")
        self.pool = pool
        self.runner = runner  # told each slot's pages (``assign_pages``)
        self.optimistic = mode == "optimistic"
        self.watermark = int(watermark * pool.group_pages)  # pages kept spare per group
        self.reservations: dict[int, Reservation] = {}  # slot -> its pages
        self.pending: dict[str, Reservation] = {}  # request id -> pages reserved at admission, no slot yet
        self.short_groups: set[int] = set()  # groups the last failed ``grow`` lacked pages in

    def check(self, prompt_len: int, first: int, most: int, max_tokens: int) -> None:
        """Refuse a request that could not fit an empty group: ``first`` positions for its prompt and
        first step, ``most`` it may ever write."""
        pool = self.pool
        held = pool.group_pages  # a request's pages all come from one group (its slot's data shard)
        holds = f"the pool holds {held}" + (" per data shard" if pool.groups > 1 else "")
        if pool.pages_for(first) > held:
            raise InvalidRequestError(
                "prompt", f"prompt ({prompt_len} tokens) needs {pool.pages_for(first)} KV pages of {pool.page_size} "
                f"positions; {holds}")
        if pool.pages_for(most) > held:
            raise InvalidRequestError(
                "max_tokens", f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) needs {pool.pages_for(most)} "
                f"KV pages of {pool.page_size} positions; {holds}")

    def group(self, slot: int) -> int:
        """The page group (data shard) of ``slot``'s pages."""
        return slot // (self.runner.num_slots // self.pool.groups)

    def reserve(self, req: Request, free_slots: Sequence[int], positions: int) -> int | None:
        """The free slot ``req`` takes with pages for ``positions`` taken now (pending until ``take``),
        or None: it must wait. Optimistic admission keeps the watermark spare while others run (an
        empty engine admits whatever fits: nothing else could ever make room)."""
        keep = self.watermark if self.optimistic and (self.reservations or self.pending) else 0
        by_group: dict[int, int] = {}
        for slot in free_slots:
            by_group.setdefault(self.group(slot), slot)
        use = req.use_prefix_cache
        order = sorted(by_group, key=lambda g: (-(self.pool.cached_blocks(req.prompt_ids, g) if use else 0),
                                                -self.pool.available_in(g), g))
        for group in order:
            res = self.pool.reserve(req.prompt_ids, positions, use_cache=use, keep_free=keep,
                                    record=not req.resumed, group=group)
            if res is not None:
                req.num_cached_tokens = res.cached_tokens
                self.pending[req.request_id] = res
                return by_group[group]
        return None

    def take(self, slot: int, request_id: str) -> None:
        """The admitted request's reserved pages are ``slot``'s now."""
        res = self.reservations[slot] = self.pending.pop(request_id)
        self.runner.assign_pages(slot, res.pages)

    def grow(self, positions: Mapping[int, int]) -> bool:
        """Give each slot the pages to hold ``positions[slot]`` positions. All or nothing: False, taking
        nothing and noting the groups that lack pages (``short_groups``), if any group has too few."""
        grow, wanted = [], collections.Counter()
        for slot, n in positions.items():
            res = self.reservations.get(slot)
            if res is None:
                continue
            more = self.pool.pages_for(n) - len(res.pages)
            if more > 0:
                grow.append((slot, res, n))
                wanted[res.group] += more
        self.short_groups = {g for g, n in wanted.items() if n > self.pool.available_in(g)}
        if self.short_groups:
            return False
        for slot, res, n in grow:
            self.pool.extend(res, n)
            self.runner.assign_pages(slot, res.pages)
        return True

    def victims(self, slots) -> list[int]:
        """Of ``slots``, those whose pages would help the groups that ran dry."""
        return [s for s in slots if s in self.reservations and self.reservations[s].group in self.short_groups]

    def register(self, slot: int, prompt: Sequence[int]) -> None:
        """``slot``'s pages now hold ``prompt``: its whole blocks become findable prefixes."""
        self.pool.register(list(prompt), self.reservations[slot])

    def release(self, slot: int, tell_runner: bool = True) -> None:
        res = self.reservations.pop(slot, None)
        if res is not None:
            self.pool.release(res)  # host bookkeeping first: the pages are free whatever follows
            if tell_runner:
                self.runner.assign_pages(slot, [])
