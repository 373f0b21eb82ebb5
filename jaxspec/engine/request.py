"""Requests, their outputs, and the errors a bad request gets."""

from __future__ import annotations

import dataclasses
import enum
import time

from jaxspec.sampling import SamplingParams


class InvalidRequestError(ValueError):
    """A request was refused; ``field`` names the offending input (for INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class QueueFullError(RuntimeError):
    """The engine's waiting queue is at its limit (RESOURCE_EXHAUSTED)."""


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    STOP = "stop"  # a stop string or stop token id matched
    EOS = "eos"
    ABORTED = "aborted"
    DEADLINE = "deadline"
    ERROR = "error"


@dataclasses.dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # resolved seed (the request's own, or drawn by the engine)
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() value after which the request is ended
    num_speculative_tokens: int | None = None  # per-request override (None: engine default)
    use_prefix_cache: bool = True  # paged caches: may reuse (and offer) cached prompt pages
    num_cached_tokens: int = 0  # set at admission: prompt tokens found in the prefix cache
    # A preempted request waiting to be recomputed: ``prompt_ids`` ends with this many of its own
    # output tokens (all but the last one it generated), prefilled again before it continues.
    resumed: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids) - self.resumed


@dataclasses.dataclass
class SpecStats:
    """Speculation counters for one request, or aggregated over an engine (names as vLLM reports them)."""

    num_drafts: int = 0  # verification steps that carried at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = dataclasses.field(default_factory=list)
    drafted_per_position: list[int] = dataclasses.field(default_factory=list)
    num_steps: int = 0  # decode steps, with or without drafts
    draft_time_s: float = 0.0  # wall time of the steps' drafting (each request counts its steps in full)
    verify_time_s: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    @property
    def acceptance_per_position(self) -> list[float]:
        """P(draft i accepted | draft i proposed), i = 0, 1, ..."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    def add(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        if len(self.accepted_per_position) < drafted:
            self.accepted_per_position.extend([0] * (drafted - len(self.accepted_per_position)))
            self.drafted_per_position.extend([0] * (drafted - len(self.drafted_per_position)))
        for i in range(accepted):
            self.accepted_per_position[i] += 1
        for i in range(drafted):
            self.drafted_per_position[i] += 1

    def snapshot(self) -> "SpecStats":
        """A copy that later updates do not touch (for readers on other threads)."""
        return dataclasses.replace(self, accepted_per_position=list(self.accepted_per_position),
                                   drafted_per_position=list(self.drafted_per_position))

    def add_step(self, draft_s: float, verify_s: float) -> None:
        self.num_steps += 1
        self.draft_time_s += draft_s
        self.verify_time_s += verify_s

    def to_dict(self) -> dict:
        return {
            "num_steps": self.num_steps,
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "acceptance_rate": self.acceptance_rate,
            "mean_acceptance_length": self.mean_acceptance_length,
            "acceptance_per_position": self.acceptance_per_position,
            "draft_time_s": self.draft_time_s,
            "verify_time_s": self.verify_time_s,
        }


@dataclasses.dataclass
class RequestOutput:
    """One step's news for one request (deltas), plus cumulative state on the last one."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_match: str | int | None = None  # the stop string or token id that ended it
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    last_token_time: float | None = None
    error: str | None = None
    spec: SpecStats | None = None  # speculative engines, on the final output: the request's counters
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (not prefilled)
    num_preemptions: int = 0  # times the request was preempted (its cache freed, recomputed later)


@dataclasses.dataclass
class Completion:
    """A finished request, assembled from its outputs (``Engine.generate``)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    stop_match: str | int | None
    num_prompt_tokens: int
    arrival_time: float
    first_token_time: float | None
    last_token_time: float | None
    spec: SpecStats | None = None
    num_cached_tokens: int = 0
    num_preemptions: int = 0
