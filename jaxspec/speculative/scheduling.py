"""The scheduler's half of speculative decoding: how many tokens each slot proposes this step.

``SpecScheduler`` holds everything the choice needs and nothing the device does: per-slot
overrides (a request's ``num_speculative_tokens``), acceptance estimates, the adaptive policy
and the step costs it weighs (measured by the runner at warm-up, refined from every step's own
wall time). The engine asks it for a ``DecodePlan`` before each decode step and gives it the
``StepResult`` after; the runner only executes plans.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import statistics
import time
from collections import Counter
from typing import Callable

import numpy as np

from jaxspec.engine.request import Request
from jaxspec.engine.slots import SlotTable
from jaxspec.engine.step import DecodePlan, StepResult
from jaxspec.speculative.adaptive import AcceptanceEstimator, CostModel, KPolicy, bucket_for


REALISED_WINDOW = 32  # recent steps of a bucket whose tokens over row-seconds are its realised rate
MIN_REALISED_STEPS = 3  # steps of a bucket before its realised rate can leave it out
ON_REFRESH_STEPS = 8  # drafting steps over the same batch between two full choices (a request's last tokens,
# not drafted, dip the rates for a step or two; a switch off and on again drains the queue and catches up)
OFF_REFRESH_STEPS = 32  # steps with speculation off between two full choices (costs drift meanwhile; a full
# choice costs about a third of a 1-request step here, and probes already turn speculation back on)
PLAIN_FIRST_STEPS = 24  # most plain steps a batch bucket runs to learn its plain period (_plain_first)
# While drafting, plain's period is not observed, and what it was (often at the bucket's first, slow steps
# after admissions, or on a busier machine) is what drafting is weighed against: every
# PLAIN_REFRESH_EVERY drafting steps a run of PLAIN_REFRESH_STEPS plain ones measures it afresh.
PLAIN_REFRESH_EVERY = 96
PLAIN_REFRESH_STEPS = 6
# End-to-end rates (``_wall_rate``): every interval between two steps of one kind, admissions included.
WALL_WINDOW = 64  # recent intervals kept per (batch bucket, plain or drafting)
WALL_MIN = 24  # intervals of each kind before the two are compared
WALL_TTL_S = 30.0  # intervals are forgotten after this long (drafting left out is tried again)
# A trial: consecutive drafting steps at one proposal bucket, run with speculation off so that the
# bucket's period in serving is observed (periods price a bucket; a probe's lone step has none).
TRIAL_STEPS = 8  # the first pays the switch; the rest are periods
TRIAL_SETTLE = 2  # a trial's first periods left out: its first steps after plain ones run slower (measured)
TRIAL_TTL_S = 20.0  # a bucket neither tried nor run for this long at a batch bucket is tried again
TRIAL_BUDGET = 0.05  # and not before its last trial is at most this share of the time since
TRIAL_EVIDENCE_S = 300.0  # how long what trials found at a batch bucket decides trials at larger ones


class SpecScheduler:
    def __init__(self, num_slots: int, buckets: list[int], k_max: int, default_k: int | None,
                 rows_for: Callable[[int], int], measure: Callable[[int], CostModel],
                 cost_model: CostModel | None = None, probe_every: int = 16,
                 clock: Callable[[], float] = time.perf_counter,
                 would_propose: Callable[[np.ndarray], np.ndarray] | None = None, probe_one_slot: bool = False,
                 trial_steps: int = TRIAL_STEPS, trial_budget: float = TRIAL_BUDGET):
        """``default_k``: the fixed proposal length, or None for adaptive k. ``rows_for(n)``: the
        compiled batch bucket a step over n slots runs at (costs are kept per bucket).
        ``measure(rows)`` times the compiled steps at a bucket (the runner's ``measure_costs``),
        used when a bucket's costs are first needed; ``cost_model`` replaces measured costs at
        every bucket. ``clock``: seconds, for the wall period between consecutive steps.
        ``would_propose(slots)``: bool per slot, whether the proposer could propose anything now
        (``Proposer.would_propose``); slots that could not are planned k = 0, and a step none of
        whose slots could is a plain step (which the engine can queue ahead). ``probe_one_slot``: a
        probe (speculation off) drafts for one slot, the one with the shortest context, in a step
        over that slot alone (``_probe_plan``): for a proposer that catches up on the steps it skipped
        (``Proposer.catches_up``), which a probe over the batch would pay for every slot.
        ``trial_steps``: the drafting steps of a trial run (``_trial_due``; 0: none); ``trial_budget``:
        the most share of the time since a trial's start that it may have taken before the next."""
        self.would_propose = would_propose
        self.probe_one_slot = probe_one_slot
        self._rows_for = functools.lru_cache(maxsize=None)(rows_for)
        self.buckets = list(buckets)
        self.k_max = k_max
        self.adaptive = default_k is None
        self.default_k = 0 if default_k is None else default_k
        self.cost_model = cost_model
        self.cost_models: dict[int, CostModel] = {}  # measured, per batch bucket
        self._measure = measure
        self.override = np.full(num_slots, -1, np.int32)  # per slot: the request's k, -1 = free
        self.max_tokens = np.zeros(num_slots, np.int64)  # per slot: the request's output budget
        self.prompt_len = np.zeros(num_slots, np.int64)  # per slot: its prompt's tokens (``_probe_plan``)
        self.estimator = AcceptanceEstimator(num_slots)
        self.policy = KPolicy(self.buckets, probe_every=probe_every)
        self.bucket_steps: Counter[int] = Counter()  # decode steps per proposal length run (reporting)
        # (tokens, row-seconds) of the recent steps of each (batch bucket, kb > 0) that had a period.
        # The policy's prediction assumes i.i.d. acceptance; a bucket whose steps keep emitting fewer
        # tokens per row-second than a plain step is left out until a trial or probe does better.
        # Sums over a window, not a running mean of per-step rates: a request's last step, capped
        # by its budget, emits little and must not price the next request's steps.
        self.realised: dict[tuple[int, int], collections.deque] = {}
        # The wall period of a step is the time from the update of the step before to its own: the
        # step, its planning and the host's work on the outputs before it, which is what serving
        # pays per step. A batch change (start, release) starts a new run of consecutive steps.
        self._clock = clock
        self._last_update: tuple[float, int] | None = None  # (clock, batch bucket) of the last step
        self._last_kb = 0  # proposal bucket of the last step
        self._gap_open = False  # no plan since the last update
        # Steps since the policy chose kb = 0 over the current batch (None: choose afresh next step).
        self._off_run: int | None = None
        self._off_rows = 0
        # The plan repeated while speculation stays off over the same slots (``_repeat_off``: the plain
        # path's every step, where a full plan's host work is a tenth of a 2-core step), and how many
        # more steps it may repeat before a slot's room for a probe has to be checked again.
        self._off_plan: DecodePlan | None = None
        self._off_left = 0
        self._plain_first_steps: Counter[int] = Counter()  # per batch bucket (``_plain_first``)
        self._drafting_run = 0  # drafting steps since the last plain one (PLAIN_REFRESH_EVERY)
        self._refresh_left = 0  # plain steps left in a refresh run
        # (clock, kb) of the last step, kept across starts and releases (not across an idle engine).
        self._wall_last: tuple[float, int] | None = None
        self._wall: dict[tuple[int, bool], collections.deque] = {}  # (rows, drafting) -> (clock, tokens, row-seconds)
        self._running = 0  # requests started and not released
        self._on_run: tuple[int, int, int] | None = None  # (kb, steps, batch bucket) since drafting was chosen
        self.trial_steps = trial_steps
        self.trial_budget = trial_budget
        # (batch bucket, kb, steps left, clock at its start) of a trial run under way.
        self._trial: tuple[int, int, int, float] | None = None
        # (batch bucket, kb) -> clock of its trial's start or its last period once it can be priced.
        self._tried_at: dict[tuple[int, int], float] = {}
        self._trial_wait: dict[int, float] = {}  # per batch bucket: seconds its last trial asks to wait
        # No trial starts before this clock: the last one is then at most trial_budget of the time since
        # its start. A trial's cost falls on the requests running through it; trials back to back (the
        # climb over proposal buckets, the next batch bucket) would put all of it on the same requests.
        self._trial_next = float("-inf")
        self._settle: tuple[int, int] | None = None  # (kb, periods still to leave out) of a trial started

    # ------------------------------------------------------------ slots
    def start(self, slot: int, request: Request) -> None:
        """``request`` entered ``slot`` (its num_speculative_tokens: None = the server's setting,
        0 = no speculation)."""
        k = request.num_speculative_tokens
        self.override[slot] = -1 if k is None else min(int(k), self.k_max)
        self.max_tokens[slot] = request.params.max_tokens
        self.prompt_len[slot] = len(request.prompt_ids)
        self.estimator.reset(slot)
        self._last_update = None  # the admission's prefill is not part of the next step's period
        self._off_run = self._off_plan = self._on_run = None
        self._running += 1

    def release(self, slot: int) -> None:
        self.override[slot] = -1
        self.estimator.reset(slot)
        self._last_update = self._off_run = self._off_plan = self._on_run = None
        self._running = max(0, self._running - 1)
        if not self._running:  # what follows is idle time, not a step's
            self._wall_last = None

    # ------------------------------------------------------------ costs
    def costs_for(self, rows: int) -> CostModel:
        """The adaptive policy's costs at a batch bucket (the given model, else measured ones)."""
        if self.cost_model is not None:
            return self.cost_model
        model = self.cost_models.get(rows)
        if model is None:
            model = self.cost_models[rows] = self._measure(rows)
        return model

    def _known_costs(self, rows: int) -> CostModel | None:
        return self.cost_model if self.cost_model is not None else self.cost_models.get(rows)

    def _lend(self, rows: int, costs: CostModel) -> None:
        """A batch bucket's costs borrow, until they have their own, what the other buckets saw of
        serving: how much queued plain steps beat their own time, and the host time drafting steps
        add (so a batch size seen for the first time does not start by drafting on device times)."""
        if self.cost_model is not None or costs.smoothing <= 0:
            return
        others = [m for r, m in self.cost_models.items() if r != rows]
        ratios = [x for m in others if (x := m.plain_ratio()) is not None]
        extras = [x for m in others if (x := m.drafting_extra()) is not None]
        costs.lent = (statistics.median(ratios) if ratios else None, statistics.median(extras) if extras else None)

    def _wall_rate(self, rows: int, drafting: bool) -> float | None:
        """Tokens per row-second over the recent intervals between two steps of one kind at a batch
        bucket, everything the engine did between them included (admissions' prefills too)."""
        seen = self._wall.get((rows, drafting))
        if seen:  # both kinds expire: a plain rate from a bucket's slow start must not outlive it
            oldest = self._clock() - WALL_TTL_S
            while seen and seen[0][0] < oldest:
                seen.popleft()
        if not seen or len(seen) < WALL_MIN:
            return None
        row_s = sum(x[2] for x in seen)
        return sum(x[1] for x in seen) / row_s if row_s > 0 else None

    def _blocked(self, rows: int, costs: CostModel) -> frozenset[int]:
        """Buckets whose realised tokens per row-second fell below a plain step's (1 / its period);
        every drafting bucket where drafting runs realised less end to end than plain ones
        (``_wall_rate``: what step periods leave out, such as the prefills of requests that, drafting,
        finish and are replaced one by one instead of together)."""
        if costs.smoothing <= 0:
            return frozenset()
        if self._wall_blocked(rows):
            return frozenset(self.buckets)
        if not self.realised:
            return frozenset()
        plain = 1.0 / costs.step_cost(0)
        return frozenset(kb for (r, kb) in self.realised
                         if r == rows and (rate := self.realised_rate(r, kb)) is not None and rate < plain)

    def _wall_blocked(self, rows: int) -> bool:
        """Whether drafting runs realised less end to end than plain ones at this batch bucket."""
        plain_wall, drafting_wall = self._wall_rate(rows, False), self._wall_rate(rows, True)
        return plain_wall is not None and drafting_wall is not None and drafting_wall < plain_wall

    def realised_rate(self, rows: int, kb: int) -> float | None:
        """Tokens per row-second of bucket kb's recent steps at a batch bucket (None: too few seen)."""
        seen = self.realised.get((rows, kb))
        if not seen or len(seen) < MIN_REALISED_STEPS:
            return None
        row_s = sum(x[1] for x in seen)
        return sum(x[0] for x in seen) / row_s if row_s > 0 else None

    def _plain_first(self, rows: int, costs: CostModel) -> bool:
        """Whether a step at this batch bucket runs plain to learn what a plain step costs in
        serving. Every drafting choice is weighed against that period, and warm-up's own time of a
        plain step (a call waited for) overstates it where steps queue, so a bucket starts with
        plain steps (the baseline: nothing is lost) until their period is known, or up to
        ``PLAIN_FIRST_STEPS`` of them where batch changes keep interrupting the runs."""
        if self.cost_model is not None or costs.smoothing <= 0 or costs.period(0) is not None:
            return False
        if self._plain_first_steps[rows] >= PLAIN_FIRST_STEPS:
            return False
        self._plain_first_steps[rows] += 1
        return True

    # ------------------------------------------------------------ the step
    def plan(self, slots: SlotTable, act: np.ndarray, steps: int = 1) -> DecodePlan:
        """``_plan``'s step; a plain one over every active slot runs ``steps`` decode steps as one
        call (the engine's room for them), unless the proposer looks for proposals every step."""
        plan = self._plan(slots, act)
        if steps > 1 and plan.kb == 0 and self.would_propose is None and len(plan.slots) == len(act):
            return dataclasses.replace(plan, steps=steps)
        return plan

    def _plan(self, slots: SlotTable, act: np.ndarray) -> DecodePlan:
        """k per active slot and the step's proposal bucket kb >= their max.

        A slot's k is capped by the tokens its request can still use, but with a fixed k the
        bucket is not: the step keeps one compiled shape from the first token to the last (kb = 0
        only once every slot is on its final token), which also keeps a request's numerics
        independent of where the others are in their generation."""
        if self._off_plan is not None and (repeated := self._repeat_off(slots, act)) is not None:
            return repeated
        k = np.zeros(len(act), np.int32)
        if self.k_max == 0 or act.size == 0:
            return DecodePlan(act, k, 0)
        forced = self.override[act]
        if not forced.any():  # every request opted out (k = 0): a plain step
            return DecodePlan(act, k, 0)
        caps = self._caps(slots, act)
        if self.would_propose is not None:
            # A lookup that finds nothing now (with a step in flight: one token ago) proposes
            # nothing: planned as such, a step of such slots only is plain and is queued ahead
            # instead of waiting for every token to find out.
            caps = np.where(self.would_propose(act), caps, 0)
        if not caps.any():  # nothing any slot could draft: a plain step, whatever the policy
            return DecodePlan(act, k, 0)
        if not self.adaptive:
            wanted = np.where(forced < 0, self.default_k, forced)
            k[:] = np.minimum(wanted, caps)
            return DecodePlan(act, k, bucket_for(int(wanted.max()), self.buckets) if k.any() else 0)
        rows = self._rows_for(len(act))
        self._observe_gap(rows)
        if self._refresh_left > 0 and not (forced > 0).any():
            # A refresh run: plain steps while drafting, so the next choices weigh plain's current period.
            self._refresh_left -= 1
            return DecodePlan(act, k, 0)
        if self._trial is not None:
            t_rows, t_kb, left, began = self._trial
            if t_rows == rows and left > 0:
                self._trial = (rows, t_kb, left - 1, began)
                return self._plan_for(act, t_kb, forced, caps)
            self._trial = None
            self._trial_wait[t_rows] = (self._clock() - began) / self.trial_budget
            self._trial_next = began + self._trial_wait[t_rows]
        if self._on_run is not None:
            on_kb, steps, on_rows = self._on_run
            if (steps < ON_REFRESH_STEPS and on_rows == rows and self.policy.drafting
                    and on_kb not in self._blocked(rows, self.costs_for(rows))):
                self._on_run = (on_kb, steps + 1, rows)
                plan = self._plan_for(act, on_kb, forced, caps)
                # The bucket's shape, or the smaller one that holds every slot's k once requests near their ends.
                return DecodePlan(plan.slots, plan.k, bucket_for(int(plan.k.max(initial=0)), self.buckets))
            self._on_run = None
        if self._off_run is not None and self._off_run < OFF_REFRESH_STEPS and self._off_rows == rows:
            # Speculation is off and nothing the choice depends on moved but the costs' slow drift:
            # no new choice, only the policy's count towards its next probe.
            self._off_run += 1
            kb = self.policy.off_step(caps, forced)
        else:
            costs = self.costs_for(rows)
            self._lend(rows, costs)
            if self._plain_first(rows, costs):
                kb, self._off_run = 0, None
            elif (trial := self._trial_due(rows, costs, caps, forced)) is not None:
                now = self._clock()
                self._trial, self._off_run = (rows, trial, self.trial_steps - 1, now), None
                self._tried_at[(rows, trial)] = now
                self._settle = (trial, TRIAL_SETTLE + 1)  # its switching step and its first periods
                costs.forget_periods(trial)
                self.realised.pop((rows, trial), None)
                return self._plan_for(act, trial, forced, caps)
            else:
                alphas = self.estimator.mean(act)
                # Only a switch on weighs the estimate's low end (KPolicy.choose): not computed while drafting.
                cautious = None if self.policy.drafting else self.estimator.lower(act, alphas)
                tried = frozenset(b for b in self.buckets if costs.period(b) is not None)
                kb = self.policy.choose(alphas, caps, forced, costs, self._blocked(rows, costs), cautious=cautious,
                                        tried=tried)
                self._off_run, self._off_rows = (0 if kb == 0 else None), rows
                self._on_run = (kb, 0, rows) if kb > 0 and not self.policy.probing else None
        if kb > 0 and self.policy.probing:
            return self._probe_plan(slots, act, kb, forced, caps)
        plan = self._plan_for(act, kb, forced, caps)
        if self._off_run is not None and plan.kb == 0 and self.would_propose is None:
            # Off, and stays off until a probe, a batch change or the next full choice: repeat this
            # plan while some free slot is sure to have room for a probe (each plain step takes one
            # token; one more is kept back for a step queued ahead and not applied yet).
            room = self.max_tokens[act] - slots.num_generated[act] - 2
            self._off_left = int(room[forced < 0].max(initial=0))
            self._off_plan = plan if self._off_left > 0 else None
        return plan

    def _trial_due(self, rows: int, costs: CostModel, caps: np.ndarray, forced: np.ndarray) -> int | None:
        """The proposal bucket to try at this batch bucket now, if any: with speculation off, the
        smallest bucket neither tried nor run for ``TRIAL_TTL_S`` (and for long enough that the last
        trial here took at most ``TRIAL_BUDGET`` of the time), unless drafting as a whole realised
        less end to end than plain steps here (``_wall_blocked``) or, at the nearest smaller batch
        bucket with buckets tried or run in the last TRIAL_EVIDENCE_S, none beat plain steps: a
        verification's extra tokens cost more the more rows share the step, so drafting that lost
        over fewer rows loses over more, and a trial that would show it again costs the switch's
        catch-up (the draft feeding every row's whole context) for every row. The policy prices a
        bucket it has not seen run by its step's own time, a call waited for, which holds host work
        that queued steps hide, and which a host-bound plain step does not get back: tried, a
        bucket is weighed at what it costs in serving. Buckets are tried from the smallest up and
        no further once one realised less than plain steps and less than the bucket before it; no
        trial, at any batch bucket, before the last one is at most ``trial_budget`` of the time
        since its start, so that trials take at most about that share of the time and no request
        runs through several in a row."""
        if (self.trial_steps <= 0 or costs.smoothing <= 0 or self.policy.drafting
                or not self.policy.can_probe(caps, forced) or self._wall_blocked(rows)):
            return None
        now, plain, before = self._clock(), 1.0 / costs.step_cost(0), None
        if now < self._trial_next:
            return None
        smaller = (self._drafting_won(r, now) for r in sorted(self.cost_models, reverse=True) if r < rows)
        if next((won for won in smaller if won is not None), True) is False:
            return None
        wait = max(TRIAL_TTL_S, self._trial_wait.get(rows, 0.0))
        for kb in self.buckets:
            seen = self._tried_at.get((rows, kb))
            if seen is None or now - seen >= wait:
                return kb
            rate = self.realised_rate(rows, kb)
            if rate is not None and rate < plain and before is not None and rate < before:
                return None
            before = rate if rate is not None else before
        return None

    def _drafting_won(self, rows: int, now: float) -> bool | None:
        """Whether a bucket tried or run at this batch bucket within TRIAL_EVIDENCE_S realised more
        than its plain steps (None: none was)."""
        costs = self.cost_models.get(rows)
        if costs is None or costs.period(0) is None:
            return None
        rates = [rate for kb in self.buckets
                 if (seen := self._tried_at.get((rows, kb))) is not None and now - seen < TRIAL_EVIDENCE_S
                 and (rate := self.realised_rate(rows, kb)) is not None]
        return max(rates) >= 1.0 / costs.step_cost(0) if rates else None

    def _repeat_off(self, slots: SlotTable, act: np.ndarray) -> DecodePlan | None:
        """The repeated off plan for this step, or None (a full plan is due)."""
        plan = self._off_plan
        if (self._off_run is None or self._off_run >= OFF_REFRESH_STEPS or self._off_left <= 0
                or not np.array_equal(plan.slots, act)):
            self._off_plan = None
            return None
        self._observe_gap(self._off_rows)
        self._off_run += 1
        self._off_left -= 1
        kb = self.policy.tick()
        if kb == 0:
            return plan
        self._off_plan = None  # a probe: its outcome brings a full choice
        return self._probe_plan(slots, act, kb, self.override[act], self._caps(slots, act))

    def _caps(self, slots: SlotTable, act: np.ndarray) -> np.ndarray:
        """Per active slot: the drafts its request can still use (its last token is never drafted)."""
        return np.clip(self.max_tokens[act] - slots.num_generated[act] - 1, 0, self.k_max)

    def _probe_plan(self, slots: SlotTable, act: np.ndarray, kb: int, forced: np.ndarray, caps: np.ndarray
                    ) -> DecodePlan:
        """A probe's plan: bucket kb's over the batch, or with ``probe_one_slot`` over one free slot
        with room for a draft, the one with the shortest context (the least to catch up on). The other
        requests wait out that one short step instead of each paying its own catch-up."""
        if not self.probe_one_slot or len(act) < 2:
            return self._plan_for(act, kb, forced, caps)
        can = np.flatnonzero((forced < 0) & (caps > 0))
        if not can.size:
            return self._plan_for(act, kb, forced, caps)
        context = self.prompt_len[act[can]] + slots.num_generated[act[can]]
        i = can[int(np.argmin(context))]
        return self._plan_for(act[i:i + 1], kb, forced[i:i + 1], caps[i:i + 1])

    @staticmethod
    def _plan_for(act: np.ndarray, kb: int, forced: np.ndarray, caps: np.ndarray) -> DecodePlan:
        """Bucket kb's plan: free slots propose kb, overridden ones their own k, each within its cap."""
        k = np.where(forced < 0, np.minimum(kb, caps), np.minimum(forced, caps)).astype(np.int32)
        return DecodePlan(act, k, kb if k.any() else 0)

    def _observe_gap(self, rows: int) -> None:
        """The host's time since the last step's update, when this plan follows it at the same bucket."""
        if self._gap_open and self._last_update is not None and self._last_update[1] == rows:
            if (costs := self._known_costs(rows)) is not None and costs.smoothing > 0:
                costs.observe_gap(self._clock() - self._last_update[0])
        self._gap_open = False

    def refit(self, plan: DecodePlan, slots: SlotTable, act: np.ndarray) -> DecodePlan:
        """``plan`` over those of its slots still in ``act`` (the others ended), k capped again. A
        probe over one slot whose request ended meanwhile becomes a plain step over ``act``."""
        keep = np.isin(plan.slots, act)
        if not keep.any():
            return DecodePlan.plain(act)
        k, act = plan.k[keep], plan.slots[keep]
        caps = self._caps(slots, act)
        k = np.minimum(k, caps).astype(np.int32)
        return DecodePlan(act, k, plan.kb if k.any() else 0)

    def update(self, result: StepResult) -> tuple[float, float]:
        """Fold a step's outcome into the acceptance estimates and its time into the step costs.
        Returns the step's (draft_s, verify_s): a fused step's one wall time split as its bucket's
        costs split."""
        now = self._clock()
        if result.kb > 0:  # acceptance estimates move (a plain step drafted nothing)
            for slot, _, drafted, accepted in result.items():
                self.estimator.update(slot, drafted, accepted)
            self._off_run = self._off_plan = None
        self.bucket_steps[result.kb] += result.steps
        rows = self._rows_for(len(result.slots))
        last, self._last_update = self._last_update, (now, rows)
        self._gap_open = True  # the next plan measures the host's time since (CostModel.host_gap)
        emitted = sum(map(len, result.tokens))
        self._observe_wall(now, rows, result, emitted)
        # The first drafting step after plain ones pays for switching (the draft model catches up on
        # the tokens it missed; a queued step before it is waited for): not a drafting run's period,
        # but what a probe costs against a plain step of the batch before it (the probe over one of
        # its slots or all), which sets how often the policy may probe.
        previous_kb, self._last_kb = self._last_kb, result.kb
        switching = result.kb > 0 and previous_kb == 0
        if switching and last is not None and self.adaptive:
            batch = self._known_costs(last[1])
            if batch is not None and batch.smoothing > 0:
                self.policy.probe_cost(now - last[0], batch.step_cost(0))
        costs = self._known_costs(rows)
        times = (result.draft_s, result.verify_s)
        if costs is None:
            return times
        if result.fused:
            times = costs.split(result.kb, result.draft_s + result.verify_s)
        per_step = tuple(t / result.steps for t in times)  # a plain call of several steps: each one's share
        # Costs held fixed (smoothing 0: synthetic or given) are not seconds of this machine's steps.
        if costs.smoothing <= 0:
            return times
        # The first plain step after drafting ones waits out the switch: not a plain run's period either.
        unswitching = result.kb == 0 and previous_kb > 0
        period = ((now - last[0]) / result.steps if last is not None and last[1] == rows
                  and not (switching or unswitching) else None)
        if self.adaptive:
            self._drafting_run = self._drafting_run + 1 if result.kb > 0 else 0
            if self._drafting_run >= PLAIN_REFRESH_EVERY:
                self._drafting_run, self._refresh_left = 0, PLAIN_REFRESH_STEPS
                costs.forget_periods(0)
        if self._settle is not None and self._settle[0] == result.kb:
            left = self._settle[1] - 1
            self._settle = (result.kb, left) if left > 0 else None
            period = None
        if period is not None:
            costs.observe_period(result.kb, period)
            # Run, a bucket needs no trial while it has periods enough to be priced: a stray period
            # or two (the tail of a run over more rows, as requests end) is not a trial's worth.
            if result.kb > 0 and costs.period(result.kb) is not None:
                self._tried_at[(rows, result.kb)] = now
        # A queued step's own time is not its cost (StepResult.queued), nor is a switching step's (it
        # holds the draft's catch-up).
        if not (result.queued or switching):
            costs.observe(result.kb, *per_step)
        # What serving paid for the step: its period (a step after a batch change has none; its
        # time then holds work that is not drafting's).
        if self.adaptive and result.kb > 0 and period and len(result.slots):
            seen = self.realised.setdefault((rows, result.kb), collections.deque(maxlen=REALISED_WINDOW))
            seen.append((emitted, len(result.slots) * period))
        return times

    def _observe_wall(self, now: float, rows: int, result: StepResult, emitted: int) -> None:
        """The interval since the last step into its kind's end-to-end rate, where both steps were of
        that kind (the cost of switching between the two is not a run's)."""
        last, self._wall_last = self._wall_last, (now, result.kb)
        if last is None or not self.adaptive or not len(result.slots) or (last[1] > 0) != (result.kb > 0):
            return
        seen = self._wall.setdefault((rows, result.kb > 0), collections.deque(maxlen=WALL_WINDOW))
        seen.append((now, emitted, len(result.slots) * (now - last[0])))
