"""What passes between the scheduler, the runner and the engine in one decode step.

The scheduler decides (``DecodePlan``: which slots step, how many tokens each proposes), the
runner executes the plan and reports (``StepResult``), the engine applies the result (stop
checks, detokenisation, outputs) and hands it back to the scheduler (acceptance estimates,
step costs). Host values only: the runner keeps every device array to itself (a ``QueuedStep``
carries them as the runner's opaque handle).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class PrefillChunk:
    """Prefill ``request.prompt_ids[start:end]`` into ``slot``; positions before ``start`` are
    already in its cache (a cached prefix, or earlier chunks of a long prompt)."""

    slot: int
    request: Any  # jaxspec.engine.request.Request
    start: int
    end: int

    @property
    def last(self) -> bool:
        """The prompt's final chunk: its prefill samples the request's first token."""
        return self.end == len(self.request.prompt_ids)


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """One decode step over the active slots."""

    slots: np.ndarray  # [n] int, the slots the step runs in ascending order: the active ones (a probe: one)
    k: np.ndarray  # [n] int, draft tokens each slot proposes (0: plain decoding for that slot)
    kb: int  # the step's compiled proposal length, >= k.max() (0: a plain decode step)
    steps: int = 1  # plain decode steps run as one call (kb = 0 only)

    @classmethod
    def plain(cls, slots: np.ndarray, steps: int = 1) -> "DecodePlan":
        slots = np.asarray(slots, np.int64)
        return cls(slots, np.zeros(len(slots), np.int32), 0, steps)

    @property
    def advance(self) -> int:
        """Tokens the step adds to each of its requests at most (its proposals and one more, or its steps)."""
        return self.kb + 1 if self.kb else self.steps


@dataclasses.dataclass(frozen=True)
class QueuedStep:
    """A plain decode step a pipelined runner queued on the device and has not collected yet."""

    plan: DecodePlan
    handle: Any  # the runner's own record of its device arrays
    t0: float  # when it was queued (its result's step time runs from here to its collection)


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one decode step produced, per planned slot (same order as ``DecodePlan.slots``)."""

    slots: np.ndarray  # [n]
    tokens: list[list[int]]  # per slot: its accepted drafts, then one target token
    drafted: np.ndarray  # [n] draft tokens verified
    accepted: np.ndarray  # [n] of them accepted
    kb: int  # proposal length the step ran with (0 when nothing was proposed after all)
    draft_s: float = 0.0  # wall time of drafting
    verify_s: float = 0.0  # wall time of the rest of the step
    fused: bool = False  # drafting and verification ran as one call (verify_s holds both)
    # Queued ahead and collected a step later (``QueuedStep``): its wall time spans the host's work
    # on the step before, so it is no measure of the step's own cost.
    queued: bool = False
    steps: int = 1  # plain decode steps the call ran (each slot's tokens; its times cover them all)

    @classmethod
    def plain(cls, slots: np.ndarray, tokens: np.ndarray, step_s: float = 0.0, queued: bool = False) -> "StepResult":
        """Plain decoding's result: ``tokens`` [n], or [n, steps] for a call of several steps."""
        n = len(slots)
        zeros = np.zeros(n, np.int32)
        tokens = np.asarray(tokens).reshape(n, -1)
        return cls(np.asarray(slots), tokens.tolist(), zeros, zeros, 0, 0.0, step_s, queued=queued,
                   steps=tokens.shape[1] if n else 1)

    def items(self):
        """(slot, tokens, drafted, accepted) per slot."""
        return zip(self.slots.tolist(), self.tokens, self.drafted.tolist(), self.accepted.tolist())
