"""The engine's decisions for one step: admission, then the decode plan.

The scheduler is pure host logic: it reads the waiting queue, the free slots and the
slot table and returns plans; the engine carries them out (one batched prefill call,
one decode step) and the runner does the device work. Prompts are admitted in arrival
order, several per step, under a per-step budget of prefill tokens, so that a burst of
arrivals is spread over several steps and the running requests keep decoding between
them. The decode plan says which slots step and how many tokens each proposes; with a
speculative runner, a ``SpecPolicy`` (``jaxspec.speculative.scheduling.SpecScheduler``)
chooses k from acceptance estimates and step costs, and learns from each step's result.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Protocol, Sequence

import numpy as np

from jaxspec.engine.request import Request
from jaxspec.engine.slots import SlotTable
from jaxspec.engine.step import DecodePlan, StepResult


@dataclasses.dataclass(frozen=True)
class Admission:
    """Requests prefilled together in one step: ``(slot, request)`` pairs."""

    items: tuple[tuple[int, Request], ...] = ()


class SpecPolicy(Protocol):
    """Chooses the proposal lengths of a speculative runner's steps."""

    def start(self, slot: int, request: Request) -> None: ...

    def release(self, slot: int) -> None: ...

    def plan(self, slots: SlotTable, act: np.ndarray) -> DecodePlan: ...

    def update(self, result: StepResult) -> tuple[float, float]:
        """Learn from a step; returns its (draft_s, verify_s)."""
        ...


class Scheduler:
    def __init__(self, max_prefill_rows: int, prefill_token_budget: int, padded_length: Callable[[int], int],
                 spec: SpecPolicy | None = None):
        """``padded_length``: a prompt length -> the compiled length its prefill runs at;
        the budget counts padded tokens (rows bucketed to a power of two x longest bucket),
        which is what the step costs. ``spec``: the speculation policy (None: plain decoding)."""
        if max_prefill_rows < 1 or prefill_token_budget < 1:
            raise ValueError("max_prefill_rows and prefill_token_budget must be >= 1")
        self.max_prefill_rows = max_prefill_rows
        self.prefill_token_budget = prefill_token_budget
        self.padded_length = padded_length
        self.spec = spec

    def admit(self, waiting: collections.deque[Request], free_slots: Sequence[int],
              reserve: Callable[[Request], bool] | None = None) -> Admission:
        """Pop the requests to prefill this step (the first always fits the token budget, whatever
        its length). ``reserve(request)``: take the request's cache memory, or False if it must
        wait (then it and everything behind it wait: arrival order is kept)."""
        items: list[tuple[int, Request]] = []
        longest = 0
        while waiting and len(items) < min(len(free_slots), self.max_prefill_rows):
            length = max(longest, self.padded_length(len(waiting[0].prompt_ids)))
            rows = 1 << (len(items)).bit_length()  # rows bucket after adding this one
            if items and rows * length > self.prefill_token_budget:
                break
            if reserve is not None and not reserve(waiting[0]):
                break
            longest = length
            items.append((free_slots[len(items)], waiting.popleft()))
        return Admission(tuple(items))

    # ------------------------------------------------------------ decode
    def started(self, slot: int, request: Request) -> None:
        """``request`` was prefilled into ``slot`` and decodes from the next step on."""
        if self.spec is not None:
            self.spec.start(slot, request)

    def released(self, slot: int) -> None:
        if self.spec is not None:
            self.spec.release(slot)

    def plan_decode(self, slots: SlotTable) -> DecodePlan:
        """The decode step over every active slot."""
        act = np.flatnonzero(slots.active)
        return self.spec.plan(slots, act) if self.spec is not None else DecodePlan.plain(act)

    def update(self, result: StepResult) -> tuple[float, float]:
        """Learn from a decode step's result; returns its (draft_s, verify_s)."""
        if self.spec is not None:
            return self.spec.update(result)
        return result.draft_s, result.verify_s
