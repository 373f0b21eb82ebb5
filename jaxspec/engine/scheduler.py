"""Admission: which waiting requests enter which free slots this step.

The scheduler is pure host logic: it reads the waiting queue and the free slots and
returns a plan; the engine carries it out (one batched prefill call) and the runner
does the device work. Prompts are admitted in arrival order, several per step, under
a per-step budget of prefill tokens, so that a burst of arrivals is spread over
several steps and the running requests keep decoding between them.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Sequence

from jaxspec.engine.request import Request


@dataclasses.dataclass(frozen=True)
class Admission:
    """Requests prefilled together in one step: ``(slot, request)`` pairs."""

    items: tuple[tuple[int, Request], ...] = ()


class Scheduler:
    def __init__(self, max_prefill_rows: int, prefill_token_budget: int, padded_length: Callable[[int], int]):
        """``padded_length``: a prompt length -> the compiled length its prefill runs at;
        the budget counts padded tokens (rows bucketed to a power of two x longest bucket),
        which is what the step costs."""
        if max_prefill_rows < 1 or prefill_token_budget < 1:
            raise ValueError("max_prefill_rows and prefill_token_budget must be >= 1")
        self.max_prefill_rows = max_prefill_rows
        self.prefill_token_budget = prefill_token_budget
        self.padded_length = padded_length

    def admit(self, waiting: collections.deque[Request], free_slots: Sequence[int]) -> Admission:
        """Pop the requests to prefill this step (the first always fits, whatever its length)."""
        items: list[tuple[int, Request]] = []
        longest = 0
        while waiting and len(items) < min(len(free_slots), self.max_prefill_rows):
            length = max(longest, self.padded_length(len(waiting[0].prompt_ids)))
            rows = 1 << (len(items)).bit_length()  # rows bucket after adding this one
            if items and rows * length > self.prefill_token_budget:
                break
            longest = length
            items.append((free_slots[len(items)], waiting.popleft()))
        return Admission(tuple(items))
