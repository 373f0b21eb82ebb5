"""Continuous-batching generation engine.

The engine is driven by one thread (the one that owns the device): callers add
requests, then call ``step()`` repeatedly; each step admits waiting requests
into free slots (prefill), runs one batched decode step over every active slot
(plain, or draft+verify when the runner speculates), and returns per-request
``RequestOutput`` deltas. Requests can join and leave between any two steps.

Runners (``StepRunner``, ``jaxspec.engine.runner``) do the device work; the engine does scheduling,
validation, stopping and detokenisation, so plain and speculative decoding
share every host-side rule.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import random
import time
from typing import Iterable, Sequence

import numpy as np

from jaxspec.engine.request import (
    Completion,
    FinishReason,
    InvalidRequestError,
    QueueFullError,
    Request,
    RequestOutput,
    SpecStats,
)
from jaxspec.engine.kv_admission import KV_ADMISSIONS, KVAdmission
from jaxspec.engine.pages import PagePool
from jaxspec.engine.runner import StepRunner
from jaxspec.engine.scheduler import Scheduler
from jaxspec.engine.slots import SlotTable
from jaxspec.engine.step import DecodePlan, PrefillChunk, QueuedStep, StepResult
from jaxspec.engine.stopping import OutputTracker
from jaxspec.sampling import SamplingParams
from jaxspec.tokenizer import Tokenizer

log = logging.getLogger(__name__)




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
        self.num_cached_tokens = request.num_cached_tokens  # of its first admission (the response's)
        self.preemptions = 0


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
        kv_admission: str = "optimistic",
        kv_watermark: float = 0.01,
    ):
        """``prefill_token_budget``: padded prompt tokens prefilled per step at most (one prompt
        of any length always is), so arrivals never stall the running requests for long.
        ``prefix_caching``: with a paged cache, prompts reuse cached pages of earlier prompts'
        leading blocks (off where the runner's proposer cannot, e.g. an EAGLE-3 head).
        ``overlap``: where the runner is pipelined (single-device decoding), queue a plain decode
        step n+1 on the device before applying step n on the host (stop checks, detokenising,
        outputs), so host work hides behind device work. A step's tokens then come out of the
        next ``step()`` call; a request that stops at step n had a wasted row in step n+1. Steps
        the scheduler plans with proposals (speculative) wait for every earlier token first.
        ``kv_admission`` (paged caches): "optimistic" admits a request while the pool has pages for
        its prompt and first step plus ``kv_watermark`` (a fraction of the pool) to spare, takes
        pages as it grows, and when the pool runs dry preempts the newest request (its pages are
        freed; it waits at the front of the queue with its output so far and is recomputed, exactly,
        when pages free up); "reserve" takes every page a request may write (prompt, max_tokens,
        speculative look-ahead) at admission, so nothing is ever preempted but pages a request never
        uses stay idle (for latency that must not depend on the load of others)."""
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
                                   chunk=runner.prefill_chunk, decode_steps=runner.decode_steps)
        self.prefilling: dict[int, int] = {}  # slot -> prompt tokens in its cache, for prompts prefilled in chunks
        paging = runner.paging()
        self.pages = None if paging is None else PagePool(*paging, prefix_caching=prefix_caching and runner.reuses_prefix,
                                                          key_tokens=runner.prefix_key_tokens)
        if kv_admission not in KV_ADMISSIONS:
            raise ValueError(f"kv_admission must be one of {', '.join(KV_ADMISSIONS)}, got {kv_admission!r}")
        if not 0.0 <= kv_watermark < 1.0:
            raise ValueError(f"kv_watermark must be in [0, 1), got {kv_watermark}")
        self.kv_admission = kv_admission
        # Paged caches: the pages each request holds, admission and growth by memory.
        self.kv = None if self.pages is None else KVAdmission(self.pages, runner, kv_admission, kv_watermark)
        self.num_preemptions = 0  # over the engine's life
        self._preempted: dict[str, _Live] = {}  # request id -> state of a preempted request (waiting)
        self._no_admission = False  # this step preempted: admit nothing new (it would be preempted next)
        self.overlap = overlap and runner.pipelined
        self._in_flight_step: _InFlight | None = None  # overlap: dispatched, not applied yet
        self._mixed_result: StepResult | None = None  # a decode run with this step's prefill chunk
        self._planned: DecodePlan | None = None  # this step's decode plan, made before a chunk declined it

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
        if self.kv is not None:
            self.kv.check(len(prompt_ids), min(self.max_len, len(prompt_ids) + 1 + self.runner.lookahead),
                          self._positions(len(prompt_ids), params), params.max_tokens)
        bad_stop = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad_stop:
            raise InvalidRequestError("stop_token_ids", f"token id {bad_stop[0]} outside the vocabulary [0, {vocab})")

    def _positions(self, prompt_len: int, params: SamplingParams) -> int:
        """Cache positions a request may write: prompt, output and the speculative look-ahead."""
        return min(self.max_len, prompt_len + params.max_tokens + self.runner.lookahead)

    def _limit(self, req: Request) -> int:
        """Cache positions ``req`` may ever write (a recomputed request counts its own prompt only)."""
        return self._positions(req.num_prompt_tokens, req.params)

    def _cache_length(self, slot: int) -> int:
        """Positions in a decoding slot's cache: its prompt and all output tokens but the last."""
        req = self.live[slot].request
        return req.num_prompt_tokens + int(self.slots.num_generated[slot]) - 1

    def _reserve(self, req: Request, free_slots: Sequence[int]) -> int | None:
        """The free slot ``req`` takes, with its pages taken now (paged caches), or None: it must wait."""
        if self.kv is None:
            return free_slots[0]
        if not self.kv.optimistic:
            return self.kv.reserve(req, free_slots, self._limit(req))
        if self._no_admission:
            return None
        # Prompt and the first decode step now; later steps' pages as the request grows.
        return self.kv.reserve(req, free_slots, min(self._limit(req), len(req.prompt_ids) + 1 + self.runner.lookahead))

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
                live = self._preempted.pop(request_id, None)
                if live is not None:  # preempted: its output so far stands
                    return RequestOutput(
                        request_id, [], live.tracker.finish(reason), True, reason,
                        num_prompt_tokens=req.num_prompt_tokens, num_generated_tokens=len(live.tracker.token_ids),
                        arrival_time=req.arrival_time, first_token_time=live.first_token_time,
                        last_token_time=live.last_token_time,
                        spec=live.spec.snapshot() if live.spec is not None else None,
                        num_cached_tokens=live.num_cached_tokens, num_preemptions=live.preemptions)
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
        self._planned = None
        if self._in_flight_step is not None and not (self._can_chain() and self._grow(extra=self._advance())):
            outputs += self._apply_in_flight()  # the batch changes: apply the queued step first
        outputs += self._expire_deadlines()
        self._no_admission = False
        if self._in_flight_step is None:
            self._make_room()  # pages for this step's decode, before anyone new is admitted
        outputs += self._admit()
        if self._mixed_result is not None:  # this step's decode ran with a prompt chunk's prefill
            result, self._mixed_result = self._mixed_result, None
            return outputs + self._apply(result)
        if not self.slots.active.any():
            return outputs
        if self.overlap:
            return outputs + self._overlapped_decode(outputs)
        try:
            plan = self._plan()
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
    def _advance(self) -> int:
        """Tokens the step in flight can add to each of its requests (its proposals and one more, or its steps)."""
        return self._in_flight_step.queued.plan.advance

    def _can_chain(self, kb: int = 0) -> bool:
        """Whether the next decode step (proposing up to ``kb`` tokens a slot) can be queued behind
        the one in flight: the same requests, each with room for both steps' tokens under its limit
        (rows past it would be wasted, and positions past it are not the request's to write),
        nobody waiting to be admitted or prefilling, no deadline due."""
        flight = self._in_flight_step
        act = np.flatnonzero(self.slots.active)
        if self.waiting or self.prefilling or not np.array_equal(flight.queued.plan.slots, act):
            return False
        now = time.monotonic()
        for slot, rid in zip(act.tolist(), flight.request_ids):
            req = self.live[slot].request
            if req.request_id != rid or (req.deadline is not None and req.deadline <= now):
                return False
            if self.slots.num_generated[slot] + self._advance() + kb + 1 > req.params.max_tokens:
                return False
        return True

    def _chains(self, plan: DecodePlan) -> bool:
        """Whether ``plan`` is queued behind the step in flight: steps of one kind (plain, or
        drafting where the runner queues those) over the same slots, with room for both."""
        flight = self._in_flight_step.queued.plan
        if not np.array_equal(plan.slots, flight.slots) or (plan.kb > 0) != (flight.kb > 0):
            return False
        return plan.kb == 0 or (self.runner.queues_drafting and self._can_chain(plan.kb))

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
        """Queue this step's decode and apply the one queued before it while it runs. A drafting
        step is queued too where the runner queues those (its inputs follow from the step before
        on the device); otherwise it applies the queued one first and runs at once (it drafts
        from every token so far)."""
        done: list[RequestOutput] = []
        flight = self._in_flight_step
        result = nxt = None
        try:
            plan = self._plan()
            if flight is not None and not self._chains(plan):
                done += self._apply_in_flight()
                flight = None
                if not self.slots.active.any():
                    return done
                plan = self.scheduler.refit(plan, self.slots)
            self._in_flight_step = None
            if plan.kb > 0 and not self.runner.queues_drafting:
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

    # ------------------------------------------------- optimistic admission
    def _grow(self, extra: int = 0) -> bool:
        """Optimistic admission: give every decoding request the pages its next step writes (its
        cache length, the token fed, the speculative look-ahead; ``extra``: steps queued ahead and
        not applied yet). All or nothing: False, taking nothing, if the pool has too few."""
        if self.kv is None or not self.kv.optimistic:
            return True
        return self.kv.grow({slot: min(self._limit(self.live[slot].request),
                                       self._cache_length(slot) + 1 + extra + self.runner.lookahead)
                             for slot in self.slots.active_slots()})

    def _make_room(self) -> None:
        """``_grow``, preempting the newest request until the pool holds the rest's next step (one
        request alone always fits: ``validate`` refused any that could not fit an empty pool)."""
        while not self._grow():
            victims = self.kv.victims(self.live)  # within a group that ran dry: only its pages help
            if not victims:
                raise RuntimeError("the KV pool cannot hold the next step of a single request")
            self._preempt(max(victims, key=lambda s: (self.live[s].request.arrival_time, s)))

    def _preempt(self, slot: int) -> None:
        """Free ``slot``'s cache and put its request back at the front of the queue with its output so
        far: it is prefilled again (prompt and all output tokens but the last, from the prefix cache
        where it can) and continues from its last token, so its output is what it would have been."""
        live = self.live.pop(slot)
        req = live.request
        tokens = live.tracker.token_ids
        if self.slots.active[slot] and tokens:
            base = req.prompt_ids[: req.num_prompt_tokens]
            again = dataclasses.replace(req, prompt_ids=[*base, *tokens[:-1]], resumed=len(tokens) - 1,
                                        num_cached_tokens=0)
            # Its computed blocks stay findable for the recomputation. A speculative runner's draft
            # cache lags its context, so there only the prompt's blocks (registered at prefill) are.
            if req.use_prefix_cache and not self.speculative:
                self.kv.register(slot, again.prompt_ids)
        else:  # preempted while its prompt was being prefilled: it starts that again
            again = dataclasses.replace(req, num_cached_tokens=0)
        live.preemptions += 1
        self.num_preemptions += 1
        self._preempted[req.request_id] = live
        self.prefilling.pop(slot, None)
        self.slots.release(slot)
        self.scheduler.released(slot)
        self._release_pages(slot)
        self.runner.release(slot)
        self.waiting.appendleft(again)
        self._no_admission = True

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
            live = self._preempted.pop(req.request_id, None)
            if live is None:
                live = _Live(req, OutputTracker(self.tokenizer, req.params, self.eos_ids), self.speculative)
            live.request = req
            self.live[slot] = live
            self.slots.assign(slot, req)
            if self.kv is not None:
                self.kv.take(slot, req.request_id)
        chunks = list(plan.chunks)
        try:
            firsts = self._prefill_with_decode(chunks)
            groups = [(chunks, firsts if firsts is not None else self.runner.prefill_batch(chunks, self.slots))]
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
                if self.kv is not None and req.use_prefix_cache:
                    self.kv.register(slot, req.prompt_ids)
                self.slots.active[slot] = True
                tokens = self.live[slot].tracker.token_ids
                if tokens:  # recomputed after a preemption: its next step feeds its last token again
                    self.slots.num_generated[slot] = len(tokens)
                    self.slots.last_token[slot] = tokens[-1]
                    self.runner.resume(slot, tokens[-1])
                    self.scheduler.started(slot, req)
                    continue
                self.scheduler.started(slot, req)
                outputs.append(self._emit_or_fail(slot, [first], time.monotonic()))
        return outputs

    def _plan(self) -> DecodePlan:
        """This step's decode plan: the one made for a chunk that did not mix, if it still covers the
        active slots, else a new one."""
        plan, self._planned = self._planned, None
        if plan is not None and np.array_equal(plan.slots, np.flatnonzero(self.slots.active)):
            return plan
        ahead = 0 if self._in_flight_step is None else self._advance()
        return self.scheduler.plan_decode(self.slots, ahead, several=not (self.waiting or self.prefilling))

    def _prefill_with_decode(self, chunks: list[PrefillChunk]) -> list[int] | None:
        """A long prompt's chunk and the running requests' plain decode step in one call, where the
        runner can (its result waits in ``_mixed_result``); None: nothing ran. A failure of the
        joint call leaves the two to run apart, where a failure is the prompt's or the step's."""
        if (not self.runner.mixes_prefill or len(chunks) != 1 or self._in_flight_step is not None
                or not self.slots.active.any()):
            return None
        plan = self.scheduler.plan_decode(self.slots)
        try:
            mixed = self.runner.prefill_with_decode(chunks[0], self.slots, plan)
        except Exception:
            log.warning("prefill with decode failed; running them apart", exc_info=True)
            return None
        if mixed is None:
            self._planned = plan  # the step's decode takes it (the policy chose once)
            return None
        first, self._mixed_result = mixed
        return [first]

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
            num_prompt_tokens=req.num_prompt_tokens,
            num_generated_tokens=len(live.tracker.token_ids),
            arrival_time=req.arrival_time,
            first_token_time=live.first_token_time,
            last_token_time=live.last_token_time,
            error=error,
            # On the final output only (what the server, metrics and ``generate`` read): a copy per
            # token would be host work on every step. A copy: it is delivered to another thread.
            spec=live.spec.snapshot() if live.spec is not None and finished else None,
            num_cached_tokens=live.num_cached_tokens,
            num_preemptions=live.preemptions,
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
        if self.kv is not None:
            self.kv.release(slot, tell_runner)

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
        num_preemptions=last.num_preemptions,
    )
