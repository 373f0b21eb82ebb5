"""Continuous-batching generation engine.

The engine is driven by one thread (the one that owns the device): callers add
requests, then call ``step()`` repeatedly; each step admits waiting requests
into free slots (prefill), runs one batched decode step over every active slot
(plain, or draft+verify when the runner speculates), and returns per-request
``RequestOutput`` deltas. Requests can join and leave between any two steps.

Runners (``StepRunner``) do the device work; the engine does scheduling,
validation, stopping and detokenisation, so plain and speculative decoding
share every host-side rule.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import random
import time
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from jaxspec.config import ModelConfig
from jaxspec.engine.request import (
    Completion,
    FinishReason,
    InvalidRequestError,
    QueueFullError,
    Request,
    RequestOutput,
    SpecStats,
)
from jaxspec.engine.pages import PagePool, Reservation
from jaxspec.engine.scheduler import Scheduler, SpecPolicy
from jaxspec.engine.slots import SlotTable
from jaxspec.engine.step import DecodePlan, PrefillChunk, QueuedStep, StepResult
from jaxspec.engine.stopping import OutputTracker
from jaxspec.sampling import SamplingParams
from jaxspec.tokenizer import Tokenizer


class StepRunner(Protocol):
    """Device work for one engine. ``decode`` executes a ``DecodePlan`` and returns, per planned
    slot, the new tokens (one for plain decoding, 1..k+1 under speculation) and (drafted,
    accepted) counts."""

    cfg: ModelConfig
    num_slots: int
    max_len: int

    max_prefill_rows: int  # most prompts one ``prefill_batch`` takes
    # Longest prompt piece one step prefills (longer prompts go in chunks); None: whole prompts.
    prefill_chunk: int | None

    def prefill_batch(self, chunks: list[PrefillChunk], slots: SlotTable) -> list[int]:
        """Prefill prompt chunks in one call; returns each chunk's sampled token (the request's
        first token where the chunk is its prompt's last; meaningless otherwise)."""
        ...

    def decode(self, slots: SlotTable, plan: DecodePlan) -> StepResult:
        """Run one decode step as planned."""
        ...

    # Whether decode steps can be queued before the previous one's tokens reach the host
    # (``dispatch`` / ``collect``; plain single-device decoding).
    pipelined: bool

    def dispatch(self, slots: SlotTable, plan: DecodePlan, after: Any = None) -> Any:
        """Pipelined runners: queue ``decode``'s device work and return a handle. ``after``: the
        handle of the step just queued over the same slots and not collected yet; it feeds this one."""
        ...

    def collect(self, handle: Any) -> StepResult:
        """Pipelined runners: wait for a dispatched step; its result."""
        ...

    def speculation(self) -> SpecPolicy | None:
        """The policy that plans this runner's proposal lengths (None: plain decoding)."""
        ...

    def paging(self) -> tuple[int, int] | None:
        """(num_pages, page_size) of a paged cache; None: a slot cache."""
        ...

    # Paged caches: whether a prompt can start prefill after a prefix already in shared pages.
    reuses_prefix: bool
    # Positions past a request's last token that one step may write (speculative look-ahead).
    lookahead: int

    def assign_pages(self, slot: int, pages: list[int]) -> None:
        """Paged caches: ``slot`` holds its positions in ``pages`` (empty: none) from now on."""
        ...

    def release(self, slot: int) -> None: ...

    def warmup(self) -> None: ...

    def padded_length(self, prompt_len: int) -> int:
        """The compiled length a prompt of this many tokens is prefilled at."""
        ...

    def expert_load_snapshot(self) -> "np.ndarray":
        """Cumulative tokens routed per expert [layers, experts] of the target (a copy)."""
        ...

    def device_info(self) -> tuple[str, tuple[str, ...], dict[str, int]]:
        """(platform, devices, mesh shape) of the target's parameters."""
        ...


class PlainRunner:
    """One token per active slot per step, through ``ModelRunner``."""

    def __init__(self, model_runner):
        self.runner = model_runner
        self.cfg = model_runner.cfg
        self.num_slots = model_runner.num_slots
        self.max_len = model_runner.max_len

    @property
    def max_prefill_rows(self) -> int:
        return self.runner.prefill_row_buckets[-1]

    reuses_prefix = True
    lookahead = 0

    def paging(self) -> tuple[int, int] | None:
        return self.runner.paging

    def assign_pages(self, slot: int, pages: list[int]) -> None:
        self.runner.assign_pages(slot, pages)

    @property
    def prefill_chunk(self) -> int | None:
        return self.runner.prefill_chunk

    def prefill_batch(self, chunks: list[PrefillChunk], slots: SlotTable) -> list[int]:
        idx = np.array([c.slot for c in chunks])
        return self.runner.prefill_many(idx, [c.request.prompt_ids[: c.end] for c in chunks], slots.sampling(idx),
                                        [c.start for c in chunks])

    def padded_length(self, prompt_len: int) -> int:
        return self.runner.bucket_for(prompt_len)

    def expert_load_snapshot(self) -> np.ndarray:
        return self.runner.expert_load_snapshot()

    def device_info(self) -> tuple[str, tuple[str, ...], dict[str, int]]:
        return self.runner.device_info()

    def decode(self, slots: SlotTable, plan: DecodePlan) -> StepResult:
        return self.runner.collect_step(self.dispatch(slots, plan), overlapped=False)

    @property
    def pipelined(self) -> bool:
        return self.runner.can_chain

    def dispatch(self, slots: SlotTable, plan: DecodePlan, after: QueuedStep | None = None) -> QueuedStep:
        return self.runner.queue_step(slots, plan, slots.last_token[plan.slots], after)

    def collect(self, queued: QueuedStep) -> StepResult:
        return self.runner.collect_step(queued)

    def speculation(self) -> None:
        return None

    def release(self, slot: int) -> None:
        self.runner.set_length(slot, 0)

    def warmup(self) -> None:
        self.runner.warmup()


@dataclasses.dataclass(frozen=True)
class _InFlight:
    """The engine's record of a dispatched step it has not applied yet: which request each
    stepped slot held, so that tokens of a request that ended meanwhile are dropped."""

    queued: QueuedStep
    request_ids: tuple[str, ...]  # per planned slot


class StepFailed(RuntimeError):
    """A step's device work raised. ``outputs`` holds every output of the step, including the
    final ERROR outputs of the requests the failed work ran over; deliver them all."""

    def __init__(self, outputs: list[RequestOutput], cause: Exception):
        super().__init__(f"engine step failed: {type(cause).__name__}: {cause}")
        self.outputs = outputs
        self.cause = cause


class _Live:
    """Engine-side state of a request that holds a slot."""

    def __init__(self, request: Request, tracker: OutputTracker, speculative: bool):
        self.request = request
        self.tracker = tracker
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.spec = SpecStats() if speculative else None


class Engine:
    def __init__(
        self,
        runner: StepRunner,
        tokenizer: Tokenizer,
        max_waiting: int = 1024,
        eos_ids: Sequence[int] | None = None,
        speculative: bool | None = None,
        prefill_token_budget: int = 1024,
        prefix_caching: bool = True,
        overlap: bool = False,
    ):
        """``prefill_token_budget``: padded prompt tokens prefilled per step at most (one prompt
        of any length always is), so arrivals never stall the running requests for long.
        ``prefix_caching``: with a paged cache, prompts reuse cached pages of earlier prompts'
        leading blocks (off where the runner's proposer cannot, e.g. an EAGLE-3 head).
        ``overlap``: where the runner is pipelined (single-device decoding), queue a plain decode
        step n+1 on the device before applying step n on the host (stop checks, detokenising,
        outputs), so host work hides behind device work. A step's tokens then come out of the
        next ``step()`` call; a request that stops at step n had a wasted row in step n+1. Steps
        the scheduler plans with proposals (speculative) wait for every earlier token first."""
        self.runner = runner
        self.tokenizer = tokenizer
        self.cfg = runner.cfg
        self.max_waiting = max_waiting
        self.eos_ids = tuple(eos_ids if eos_ids is not None else tokenizer.eos_ids or self.cfg.eos_ids)
        spec_policy = runner.speculation()
        self.speculative = spec_policy is not None if speculative is None else speculative
        self.spec_stats = SpecStats() if self.speculative else None  # aggregate over all requests
        self.slots = SlotTable(runner.num_slots)
        self.waiting: collections.deque[Request] = collections.deque()
        self.live: dict[int, _Live] = {}  # slot -> live request
        self._ids = itertools.count()
        self._seed_rng = random.Random()
        self._in_flight: set[str] = set()
        self.scheduler = Scheduler(runner.max_prefill_rows, prefill_token_budget, runner.padded_length, spec_policy,
                                   chunk=runner.prefill_chunk)
        self.prefilling: dict[int, int] = {}  # slot -> prompt tokens in its cache, for prompts prefilled in chunks
        paging = runner.paging()
        self.pages = None if paging is None else PagePool(*paging, prefix_caching=prefix_caching and runner.reuses_prefix)
        self._reservations: dict[int, Reservation] = {}  # slot -> its pages (paged caches)
        self._pending: dict[str, Reservation] = {}  # request id -> pages reserved at admission
        self.overlap = overlap and runner.pipelined
        self._in_flight_step: _InFlight | None = None  # overlap: dispatched, not applied yet

    # ------------------------------------------------------------- admission
    @property
    def max_len(self) -> int:
        return self.runner.max_len

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        if len(prompt_ids) == 0:
            raise InvalidRequestError("prompt", "prompt is empty")
        vocab = self.cfg.vocab_size
        bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
        if bad:
            raise InvalidRequestError("prompt_token_ids", f"token id {bad[0]} outside the vocabulary [0, {vocab})")
        if len(prompt_ids) >= self.max_len:
            raise InvalidRequestError(
                "prompt", f"prompt has {len(prompt_ids)} tokens; the context holds {self.max_len} (prompt + output)"
            )
        if len(prompt_ids) + params.max_tokens > self.max_len:
            raise InvalidRequestError(
                "max_tokens",
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                f"length {self.max_len}",
            )
        if self.pages is not None:
            need = self.pages.pages_for(self._positions(len(prompt_ids), params))
            if need > self.pages.num_pages:
                raise InvalidRequestError(
                    "max_tokens", f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) needs {need} "
                    f"KV pages of {self.pages.page_size} positions; the pool holds {self.pages.num_pages}")
        bad_stop = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad_stop:
            raise InvalidRequestError("stop_token_ids", f"token id {bad_stop[0]} outside the vocabulary [0, {vocab})")

    def _positions(self, prompt_len: int, params: SamplingParams) -> int:
        """Cache positions a request may write: prompt, output and the speculative look-ahead."""
        return min(self.max_len, prompt_len + params.max_tokens + self.runner.lookahead)

    def _reserve(self, req: Request) -> bool:
        """Paged caches: take the request's pages now, or say it must wait."""
        if self.pages is None:
            return True
        res = self.pages.reserve(req.prompt_ids, self._positions(len(req.prompt_ids), req.params),
                                 use_cache=req.use_prefix_cache)
        if res is None:
            return False
        req.num_cached_tokens = res.cached_tokens
        self._pending[req.request_id] = res
        return True

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        deadline: float | None = None,
        num_speculative_tokens: int | None = None,
        use_prefix_cache: bool = True,
    ) -> str:
        """Queue a request (text or token ids). Raises InvalidRequestError / QueueFullError."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            prompt_ids = self.tokenizer.encode(prompt) if prompt else []
        else:
            prompt_ids = [int(t) for t in prompt]
        self.validate(prompt_ids, params)
        if num_speculative_tokens is not None and num_speculative_tokens < 0:
            raise InvalidRequestError("num_speculative_tokens", f"must be >= 0, got {num_speculative_tokens}")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._in_flight:
            raise InvalidRequestError("request_id", f"request id {request_id!r} is already in flight")
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"waiting queue is full ({self.max_waiting} requests)")
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        self.waiting.append(
            Request(request_id, prompt_ids, params, seed, deadline=deadline, num_speculative_tokens=num_speculative_tokens,
                    use_prefix_cache=use_prefix_cache)
        )
        self._in_flight.add(request_id)
        return request_id

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORTED) -> RequestOutput | None:
        """End a request wherever it is; returns its final output (None if unknown)."""
        for req in list(self.waiting):
            if req.request_id == request_id:
                self.waiting.remove(req)
                self._in_flight.discard(request_id)
                return RequestOutput(request_id, [], "", True, reason, arrival_time=req.arrival_time,
                                     num_prompt_tokens=len(req.prompt_ids))
        for slot, live in list(self.live.items()):
            if live.request.request_id == request_id:
                return self._finish(slot, reason, live.tracker.finish(reason))
        return None

    # ------------------------------------------------------------------ loop
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.live)

    @property
    def num_running(self) -> int:
        return len(self.live)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def step(self) -> list[RequestOutput]:
        """One iteration: expire deadlines, admit (one batched prefill), one decode step.

        Every request that entered the step gets its outputs: if the decode raises, the
        requests it ran over get a final ERROR output and ``StepFailed`` carries every output
        of the step (expiries and admissions included) to the caller."""
        outputs: list[RequestOutput] = []
        if self._in_flight_step is not None and not self._can_chain():
            outputs += self._apply_in_flight()  # the batch changes: apply the queued step first
        outputs += self._expire_deadlines()
        outputs += self._admit()
        if not self.slots.active.any():
            return outputs
        if self.overlap:
            return outputs + self._overlapped_decode(outputs)
        try:
            plan = self.scheduler.plan_decode(self.slots)
            result = self.runner.decode(self.slots, plan)
        except Exception as e:
            outputs += [self._fail_hard(slot, e) for slot in self.slots.active_slots()]
            raise StepFailed(outputs, e) from e
        return outputs + self._apply(result)

    def _apply(self, result: StepResult, request_ids: Sequence[str] | None = None) -> list[RequestOutput]:
        """A decode step's tokens to its requests (``request_ids``: only to these, per slot)."""
        outputs = []
        now = time.monotonic()
        times = self.scheduler.update(result)  # (draft_s, verify_s)
        if self.spec_stats is not None:
            self.spec_stats.add_step(*times)
        for i, (slot, tokens, drafted, accepted) in enumerate(result.items()):
            live = self.live.get(slot)
            if live is None or (request_ids is not None and live.request.request_id != request_ids[i]):
                continue  # the request ended after the step was queued
            if live.spec is not None:
                live.spec.add(drafted, accepted)
                live.spec.add_step(*times)
                self.spec_stats.add(drafted, accepted)
            outputs.append(self._emit_or_fail(slot, tokens, now))
        return outputs

    # ------------------------------------------------------- overlapped steps
    def _can_chain(self) -> bool:
        """Whether the next decode step can be queued behind the one in flight: the same requests,
        none of them at its token limit (their rows would be wasted), nobody waiting to be admitted
        or prefilling, no deadline due."""
        flight = self._in_flight_step
        act = np.flatnonzero(self.slots.active)
        if self.waiting or self.prefilling or not np.array_equal(flight.queued.plan.slots, act):
            return False
        now = time.monotonic()
        for slot, rid in zip(act.tolist(), flight.request_ids):
            req = self.live[slot].request
            if req.request_id != rid or (req.deadline is not None and req.deadline <= now):
                return False
            if self.slots.num_generated[slot] + 2 > req.params.max_tokens:
                return False
        return True

    def _dispatch(self, plan: DecodePlan, after: "_InFlight | None") -> _InFlight:
        queued = self.runner.dispatch(self.slots, plan, None if after is None else after.queued)
        return _InFlight(queued, tuple(self.live[s].request.request_id for s in plan.slots.tolist()))

    def _apply_in_flight(self, flight: _InFlight | None = None) -> list[RequestOutput]:
        if flight is None:
            flight, self._in_flight_step = self._in_flight_step, None
        try:
            result = self.runner.collect(flight.queued)
        except Exception as e:
            outputs = [self._fail_hard(slot, e) for slot, rid in zip(flight.queued.plan.slots.tolist(), flight.request_ids)
                       if slot in self.live and self.live[slot].request.request_id == rid]
            raise StepFailed(outputs, e) from e
        return self._apply(result, flight.request_ids)

    def _overlapped_decode(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Queue this step's plain decode and apply the one queued before it while it runs; a
        speculative step applies the queued one first (it drafts from every token so far)."""
        done: list[RequestOutput] = []
        flight = self._in_flight_step
        result = nxt = None
        try:
            plan = self.scheduler.plan_decode(self.slots)
            if flight is not None and (plan.kb > 0 or not np.array_equal(plan.slots, flight.queued.plan.slots)):
                done += self._apply_in_flight()
                flight = None
                if not self.slots.active.any():
                    return done
                plan = self.scheduler.refit(plan, self.slots)
            self._in_flight_step = None
            if plan.kb > 0:
                result = self.runner.decode(self.slots, plan)
            else:
                nxt = self._dispatch(plan, flight)
        except StepFailed as failed:
            raise StepFailed(outputs + done + failed.outputs, failed.cause) from failed.cause
        except Exception as e:
            if flight is not None:  # step n's tokens are still good: deliver them
                try:
                    done += self._apply_in_flight(flight)
                except StepFailed as failed:
                    done += failed.outputs
            done += [self._fail_hard(slot, e) for slot in self.slots.active_slots()]
            raise StepFailed(outputs + done, e) from e
        if result is not None:
            return done + self._apply(result)
        self._in_flight_step = nxt
        if flight is None:
            return done
        try:
            return done + self._apply_in_flight(flight)
        except StepFailed as failed:
            # Step n+1 was fed by the failed step n: void. Its requests end with step n's error.
            self._in_flight_step = None
            rest = [self._fail_hard(s, failed.cause) for s in self.slots.active_slots()]
            raise StepFailed(outputs + done + failed.outputs + rest, failed.cause) from failed.cause

    def _emit_or_fail(self, slot: int, tokens: list[int], now: float) -> RequestOutput:
        """Host-side processing of one request's tokens; a failure there (detokenizer,
        stop handling) fails that request alone."""
        try:
            return self._emit(slot, tokens, now)
        except Exception as e:
            return self._fail(slot, e)

    def _admit(self) -> list[RequestOutput]:
        in_progress = [(slot, self.live[slot].request, done) for slot, done in self.prefilling.items()]
        plan = self.scheduler.plan_prefill(self.waiting, self.slots.free_slots(), self._reserve, in_progress)
        if not plan.chunks:
            return []
        for slot, req in plan.admitted:
            self.live[slot] = _Live(req, OutputTracker(self.tokenizer, req.params, self.eos_ids), self.speculative)
            self.slots.assign(slot, req)
            if self.pages is not None:
                res = self._reservations[slot] = self._pending.pop(req.request_id)
                self.runner.assign_pages(slot, res.pages)
        chunks = list(plan.chunks)
        try:
            groups = [(chunks, self.runner.prefill_batch(chunks, self.slots))]
        except Exception:
            if len(chunks) == 1:
                groups = [(chunks, None)]
            else:  # one bad prompt must not fail the others: prefill them one by one
                groups = [([c], None) for c in chunks]
        outputs = []
        for group, firsts in groups:
            if firsts is None:
                try:
                    firsts = self.runner.prefill_batch(group, self.slots)
                except Exception as e:  # one bad request must not take the engine down
                    outputs += [self._fail(c.slot, e) for c in group]
                    continue
            for chunk, first in zip(group, firsts):
                slot, req = chunk.slot, chunk.request
                if not chunk.last:
                    self.prefilling[slot] = chunk.end
                    continue
                self.prefilling.pop(slot, None)
                if self.pages is not None and req.use_prefix_cache:
                    self.pages.register(req.prompt_ids, self._reservations[slot])
                self.slots.active[slot] = True
                self.scheduler.started(slot, req)
                outputs.append(self._emit_or_fail(slot, [first], time.monotonic()))
        return outputs

    def _emit(self, slot: int, tokens: list[int], now: float) -> RequestOutput:
        live = self.live[slot]
        res = live.tracker.append(tokens)
        if tokens:
            live.first_token_time = live.first_token_time or now
            live.last_token_time = now
        # The runner already advanced its own caches; the slot table advances the host counters.
        self.slots.num_generated[slot] += len(tokens)
        self.slots.last_token[slot] = tokens[-1] if tokens else self.slots.last_token[slot]
        if res.finish_reason is not None:
            return self._finish(slot, res.finish_reason, res.text_delta, res.token_ids, res.stop_match)
        return self._output(slot, res.token_ids, res.text_delta)

    def _output(self, slot, token_ids, text, finished=False, reason=None, match=None, error=None) -> RequestOutput:
        live = self.live[slot]
        req = live.request
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=list(token_ids),
            text_delta=text,
            finished=finished,
            finish_reason=reason,
            stop_match=match,
            num_prompt_tokens=len(req.prompt_ids),
            num_generated_tokens=len(live.tracker.token_ids),
            arrival_time=req.arrival_time,
            first_token_time=live.first_token_time,
            last_token_time=live.last_token_time,
            error=error,
            spec=live.spec.snapshot() if live.spec is not None else None,  # delivered to another thread
            num_cached_tokens=req.num_cached_tokens,
        )

    def _finish(self, slot, reason, text="", token_ids=(), match=None, error=None) -> RequestOutput:
        out = self._output(slot, token_ids, text, True, reason, match, error)
        self._in_flight.discard(out.request_id)
        del self.live[slot]
        self.prefilling.pop(slot, None)
        self.slots.release(slot)
        self.scheduler.released(slot)
        self._release_pages(slot)
        self.runner.release(slot)
        return out

    def _release_pages(self, slot: int, tell_runner: bool = True) -> None:
        res = self._reservations.pop(slot, None)
        if res is not None:
            self.pages.release(res)  # host bookkeeping first: the pages are free whatever follows
            if tell_runner:
                self.runner.assign_pages(slot, [])

    def _fail(self, slot: int, exc: Exception) -> RequestOutput:
        live = self.live[slot]
        try:
            text = live.tracker.finish(FinishReason.ERROR)
        except Exception:  # the tracker itself may be what failed
            text = ""
        return self._finish(slot, FinishReason.ERROR, text, error=f"{type(exc).__name__}: {exc}")

    def _fail_hard(self, slot: int, exc: Exception) -> RequestOutput:
        """``_fail`` for a request whose step failed: it gets its final output even if releasing
        its slot fails too (the runner's state is then unknown; the caller decides what next)."""
        try:
            return self._fail(slot, exc)
        except Exception:
            live = self.live.pop(slot)
            self._in_flight.discard(live.request.request_id)
            self.prefilling.pop(slot, None)
            self.slots.release(slot)
            self._release_pages(slot, tell_runner=False)  # the runner's state is unknown here
            return RequestOutput(live.request.request_id, [], "", True, FinishReason.ERROR,
                                 num_prompt_tokens=len(live.request.prompt_ids), arrival_time=live.request.arrival_time,
                                 error=f"{type(exc).__name__}: {exc}")

    def _expire_deadlines(self) -> list[RequestOutput]:
        now = time.monotonic()
        expired = [r.request_id for r in self.waiting if r.deadline is not None and r.deadline <= now]
        expired += [l.request.request_id for l in self.live.values()
                    if l.request.deadline is not None and l.request.deadline <= now]
        return [o for rid in expired if (o := self.abort(rid, FinishReason.DEADLINE)) is not None]

    # ------------------------------------------------------------ convenience
    def generate(
        self,
        prompts: Iterable[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Run prompts to completion (batched over the slots); results in prompt order. Any number
        of prompts: they are queued as the waiting queue has room."""
        prompts = list(prompts)
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        todo = list(zip(prompts, plist))
        ids: list[str] = []
        parts: dict[str, list[RequestOutput]] = {}
        while len(ids) < len(todo) or self.has_unfinished():
            while len(ids) < len(todo) and len(self.waiting) < self.max_waiting:
                ids.append(self.add_request(*todo[len(ids)]))
                parts[ids[-1]] = []
            for out in self.step():
                if out.request_id in parts:
                    parts[out.request_id].append(out)
        return [_assemble(parts[i]) for i in ids]


def _assemble(outputs: list[RequestOutput]) -> Completion:
    last = outputs[-1]
    return Completion(
        request_id=last.request_id,
        text="".join(o.text_delta for o in outputs),
        token_ids=[t for o in outputs for t in o.new_token_ids],
        finish_reason=last.finish_reason,
        stop_match=last.stop_match,
        num_prompt_tokens=last.num_prompt_tokens,
        arrival_time=last.arrival_time,
        first_token_time=last.first_token_time,
        last_token_time=last.last_token_time,
        spec=last.spec,
        num_cached_tokens=last.num_cached_tokens,
    )
