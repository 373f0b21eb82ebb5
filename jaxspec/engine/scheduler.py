"""The engine's decisions for one step: admission, then the decode plan.

The scheduler is pure host logic: it reads the waiting queue, the free slots and the
slot table and returns plans; the engine carries them out (one batched prefill call,
one decode step) and the runner does the device work. Prompts are admitted in arrival
order, several per step, under a per-step budget of prefill tokens, so that a burst of
arrivals is spread over several steps and the running requests keep decoding between
them; a prompt longer than ``chunk`` is prefilled a chunk per step, interleaved with the
running requests' decode steps. The decode plan says which slots step and how many tokens each proposes; with a
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
from jaxspec.engine.step import DecodePlan, PrefillChunk, StepResult


@dataclasses.dataclass(frozen=True)
class PrefillPlan:
    """One step's prefill call: chunks of prompts already in slots (continued first), then of
    requests admitted this step (``admitted``: their ``(slot, request)`` pairs)."""

    chunks: tuple[PrefillChunk, ...] = ()
    admitted: tuple[tuple[int, Request], ...] = ()


class SpecPolicy(Protocol):
    """Chooses the proposal lengths of a speculative runner's steps."""

    def start(self, slot: int, request: Request) -> None: ...

    def release(self, slot: int) -> None: ...

    def plan(self, slots: SlotTable, act: np.ndarray, steps: int = 1) -> DecodePlan:
        """The step over ``act``; a plain one may run up to ``steps`` decode steps as one call."""
        ...

    def update(self, result: StepResult) -> tuple[float, float]:
        """Learn from a step; returns its (draft_s, verify_s)."""
        ...


class Scheduler:
    def __init__(self, max_prefill_rows: int, prefill_token_budget: int, padded_length: Callable[[int], int],
                 spec: SpecPolicy | None = None, chunk: int | None = None, decode_steps: int = 1):
        """``padded_length``: a prompt length -> the compiled length its prefill runs at;
        the budget counts padded tokens (rows bucketed to a power of two x longest bucket),
        which is what the step costs. ``spec``: the speculation policy (None: plain decoding).
        ``chunk``: prompts longer than this are prefilled this many tokens per step, so a long
        prompt never stops the running requests for more than one chunk (None: whole prompts).
        ``decode_steps``: the most plain decode steps one call may run (the runner's; see
        ``plan_decode``)."""
        if max_prefill_rows < 1 or prefill_token_budget < 1:
            raise ValueError("max_prefill_rows and prefill_token_budget must be >= 1")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.max_prefill_rows = max_prefill_rows
        self.prefill_token_budget = prefill_token_budget
        self.padded_length = padded_length
        self.spec = spec
        self.chunk = chunk
        self.decode_steps = decode_steps

    def _take(self, remaining: int) -> int:
        return remaining if self.chunk is None else min(remaining, self.chunk)

    def plan_prefill(self, waiting: collections.deque[Request], free_slots: Sequence[int],
                     reserve: Callable[[Request, Sequence[int]], int | None] | None = None,
                     in_progress: Sequence[tuple[int, Request, int]] = ()) -> PrefillPlan:
        """This step's prefill: the next chunk of each prompt in progress (``(slot, request, tokens
        done)``, oldest first), then waiting requests popped in arrival order. The first chunk always
        fits the token budget, whatever its length. ``reserve(request, free slots)``: the free slot the
        request takes, its cache memory taken (it may set ``num_cached_tokens``), or None if it must
        wait (then it and everything behind it wait); without it, the first free slot."""
        chunks: list[PrefillChunk] = []
        longest = 0

        def fits(tokens: int) -> int | None:
            length = max(longest, self.padded_length(tokens))
            rows = 1 << (len(chunks)).bit_length()  # rows bucket after adding this one
            return None if chunks and rows * length > self.prefill_token_budget else length

        for slot, req, done in in_progress:
            if len(chunks) == self.max_prefill_rows:
                break
            n = self._take(len(req.prompt_ids) - done)
            if (length := fits(n)) is None:
                break
            longest = length
            chunks.append(PrefillChunk(slot, req, done, done + n))
        admitted: list[tuple[int, Request]] = []
        free = list(free_slots)
        while waiting and free and len(chunks) < self.max_prefill_rows:
            if (length := fits(self._take(len(waiting[0].prompt_ids)))) is None:
                break
            slot = free[0] if reserve is None else reserve(waiting[0], free)
            if slot is None:
                break
            free.remove(slot)
            longest = length
            req = waiting.popleft()
            admitted.append((slot, req))
            start = req.num_cached_tokens
            chunks.append(PrefillChunk(slot, req, start, start + self._take(len(req.prompt_ids) - start)))
        return PrefillPlan(tuple(chunks), tuple(admitted))

    # ------------------------------------------------------------ decode
    def started(self, slot: int, request: Request) -> None:
        """``request`` was prefilled into ``slot`` and decodes from the next step on."""
        if self.spec is not None:
            self.spec.start(slot, request)

    def released(self, slot: int) -> None:
        if self.spec is not None:
            self.spec.release(slot)

    def plan_decode(self, slots: SlotTable, ahead: int = 0, several: bool = False) -> DecodePlan:
        """The decode step over every active slot. Plain decoding with ``several`` (nothing waits to
        be admitted or prefilled) runs ``decode_steps`` steps in one call where every request has
        room for them after the ``ahead`` tokens of a call still in flight: a call's fixed cost is
        paid once for them (about a quarter of a 1-row step of a small model on a CPU). Each step feeds
        the token the one before sampled, so the tokens are those of single steps; a request that
        stops within the call had the rest of its rows computed for nothing, and a request that
        arrives meanwhile waits for the call."""
        act = np.flatnonzero(slots.active)
        steps = self.decode_steps
        if steps > 1 and several and act.size:
            room = min(slots.requests[s].params.max_tokens - int(slots.num_generated[s]) for s in act.tolist())
            steps = steps if room - ahead >= steps else 1
        else:
            steps = 1
        if self.spec is not None:  # the speculation policy's plain steps may run them too
            return self.spec.plan(slots, act, steps)
        return DecodePlan.plain(act, steps)

    def refit(self, plan: DecodePlan, slots: SlotTable) -> DecodePlan:
        """``plan`` once the step queued before it has been applied: over the slots still active,
        each k capped by what its request can still use. No new choice (the policy chose once)."""
        act = np.flatnonzero(slots.active)
        if self.spec is None:
            return DecodePlan.plain(act)
        return self.spec.refit(plan, slots, act)

    def update(self, result: StepResult) -> tuple[float, float]:
        """Learn from a decode step's result; returns its (draft_s, verify_s)."""
        if self.spec is not None:
            return self.spec.update(result)
        return result.draft_s, result.verify_s
