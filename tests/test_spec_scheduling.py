"""The speculative scheduler's adaptive choices in serving: plain-first buckets, observed periods,
realised and end-to-end rates, probes and their cost, without models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jaxspec.speculative.adaptive import CostModel, KPolicy
from test_spec_adaptive import BUCKETS, _costs


def test_the_scheduler_prices_a_probe_by_its_wall_time():
    """The first drafting step after plain ones is a probe's (or a switch's) cost: the scheduler hands
    its period to the policy, whose next probes then wait longer when it was expensive."""
    from jaxspec.engine.step import StepResult
    from jaxspec.speculative.scheduling import SpecScheduler

    def run(probe_s: float) -> list[int]:
        costs = CostModel({0: 0.0, **{b: 0.1 * b for b in BUCKETS}}, {0: 1e-2, **{b: 1e-2 for b in BUCKETS}})
        clock = [0.0]
        sched = SpecScheduler(1, BUCKETS, 8, None, rows_for=lambda n: 1, measure=lambda rows: costs,
                              probe_every=4, clock=lambda: clock[0], trial_steps=0)
        slots, act = _running(sched, 1, 100_000)
        kbs = []
        for _ in range(400):
            kb = sched.plan(slots, act).kb
            kbs.append(kb)
            clock[0] += probe_s if kb else 1e-2
            sched.update(StepResult(act, [[0] * (1 + (kb > 0))], np.array([kb]), np.array([0]), kb, 0.0, 1e-2))
            slots.num_generated[act] += 1 + (kb > 0)
        return [i for i, kb in enumerate(kbs) if kb]

    cheap, costly = run(1e-2), run(1.0)  # a probe of one plain step, and of a hundred
    assert len(cheap) >= 5 and 1 <= len(costly) <= 2 and costly[0] == cheap[0]


def _running(sched, n: int, max_tokens: int):
    """A slot table with n requests running, each started in ``sched``; (slots, active slot ids)."""
    from jaxspec.engine.request import Request
    from jaxspec.engine.slots import SlotTable
    from jaxspec.sampling import SamplingParams

    slots = SlotTable(n)
    for s in range(n):
        req = Request(f"r{s}", [1, 2, 3], SamplingParams(max_tokens=max_tokens), seed=s)
        slots.assign(s, req)
        slots.active[s] = True
        sched.start(s, req)
    return slots, np.arange(n)


def _clocked(costs: CostModel, trial_steps: int = 0, max_tokens: int = 200, trial_budget: float = 1.0):
    """A scheduler over 4 running requests whose clock moves by each step's time; (scheduler,
    slots, active ids, run(kb, tokens_per_row, step_s)) where run feeds one step's result.
    Without trials unless asked (the tests of trials ask); a trial may follow the last one at once
    unless ``trial_budget`` says otherwise (the serving default spaces them)."""
    from jaxspec.engine.step import StepResult
    from jaxspec.speculative.scheduling import SpecScheduler

    clock = [0.0]
    sched = SpecScheduler(4, BUCKETS, 8, None, rows_for=lambda n: 4, measure=lambda rows: costs,
                          clock=lambda: clock[0], trial_steps=trial_steps, trial_budget=trial_budget)
    slots, act = _running(sched, 4, max_tokens)

    def run(kb: int, tokens_per_row: int, step_s: float) -> None:
        clock[0] += step_s  # the wall period from the step before
        sched.update(StepResult(act, [[0] * tokens_per_row] * 4, np.full(4, kb), np.full(4, tokens_per_row - 1),
                                kb, 0.0, step_s))

    return sched, slots, act, run


def _accepted_so_far(sched, accepted: float = 80.0, rejected: float = 20.0) -> None:
    """Engine-wide acceptance as if many earlier rounds had been seen (new requests start from it),
    so the cautious end of a new request's estimate is not the bare prior's."""
    sched.estimator.global_acc, sched.estimator.global_rej = accepted, rejected


def _learn_plain_period(sched, slots, act, run, plain_s: float) -> None:
    """A batch bucket's first steps are plain until their period is known (``_plain_first``)."""
    from jaxspec.speculative.adaptive import MIN_PERIODS

    for _ in range(MIN_PERIODS + 1):  # the first step has no step before it: no period
        assert sched.plan(slots, act).kb == 0
        run(0, 1, plain_s)


def test_a_batch_bucket_runs_plain_until_it_knows_what_a_plain_step_costs():
    """Warm-up's time of a plain step (a call waited for) overstates what queued plain steps cost,
    and every drafting choice is weighed against it: a bucket learns the plain period first, and
    gives up on it after PLAIN_FIRST_STEPS steps that never ran back to back."""
    from jaxspec.speculative.scheduling import PLAIN_FIRST_STEPS, SpecScheduler

    costs = _costs(1e-4, 0.02)  # drafting nearly free on paper
    sched, slots, act, run = _clocked(costs)
    _accepted_so_far(sched)
    plain = 0.9 * costs.verify_s[0]  # queued plain steps: below warm-up's time
    _learn_plain_period(sched, slots, act, run, plain)
    assert costs.step_cost(0) == pytest.approx(plain)
    assert sched.plan(slots, act).kb > 0  # then the policy chooses
    # A batch that changes every step (a start resets the period's clock) runs plain a bounded while.
    other = SpecScheduler(4, BUCKETS, 8, None, rows_for=lambda n: 4, measure=lambda rows: _costs(1e-4, 0.02))
    slots, act = _running(other, 4, 200)
    _accepted_so_far(other)
    kbs = []
    for _ in range(PLAIN_FIRST_STEPS + 1):
        kbs.append(other.plan(slots, act).kb)
        other.release(int(act[0]))
        other.start(int(act[0]), slots.requests[int(act[0])])
    assert kbs[:PLAIN_FIRST_STEPS] == [0] * PLAIN_FIRST_STEPS and kbs[-1] > 0
    # Given costs (not this machine's seconds) are used as they are, from the first step.
    fixed = SpecScheduler(4, BUCKETS, 8, None, rows_for=lambda n: 4, measure=lambda rows: costs,
                          cost_model=CostModel(costs.draft_s, costs.verify_s, smoothing=0.0))
    slots, act = _running(fixed, 4, 200)
    assert fixed.plan(slots, act).kb > 0


def test_a_drafting_bucket_not_seen_yet_costs_its_own_time_plus_the_hosts_time_between_steps():
    """Where host work between steps is large (a busy server on few cores), a drafting step that is
    waited for pays it in full: before any drafting run is seen, the policy prices it in and stays
    plain where on device times alone drafting would look better (acceptance 0.6, the prior)."""
    from jaxspec.engine.step import StepResult
    from jaxspec.speculative.scheduling import SpecScheduler

    costs = _costs(1e-3, 0.1)
    clock = [0.0]
    sched = SpecScheduler(4, BUCKETS, 8, None, rows_for=lambda n: 4, measure=lambda rows: costs,
                          clock=lambda: clock[0], trial_steps=0)
    slots, act = _running(sched, 4, 200)
    own0, gap = costs.own_cost(0), 0.03
    kbs = []
    for _ in range(8):
        kbs.append(sched.plan(slots, act).kb)
        clock[0] += own0  # a plain step's own time, then the host's work before the next plan
        sched.update(StepResult(act, [[0]] * 4, np.zeros(4, int), np.zeros(4, int), 0, 0.0, own0, queued=True))
        clock[0] += gap
    assert costs.host_gap() == pytest.approx(gap)
    assert costs.step_cost(2) == pytest.approx(costs.own_cost(2) + gap)
    assert kbs[-1] == 0
    # The same scheduler without the host's gap drafts.
    quick = SpecScheduler(4, BUCKETS, 8, None, rows_for=lambda n: 4, measure=lambda rows: _costs(1e-3, 0.1),
                          clock=lambda: clock[0], trial_steps=0)
    slots, act = _running(quick, 4, 200)
    _accepted_so_far(quick)
    for _ in range(8):
        kb = quick.plan(slots, act).kb
        clock[0] += own0 + gap
        quick.update(StepResult(act, [[0] * (kb + 1)] * 4, np.full(4, kb), np.full(4, kb), kb, 0.0, own0, queued=kb == 0))
    assert kb > 0


def test_drafting_stops_where_its_runs_realise_less_end_to_end_than_plain_ones():
    """Step periods leave out what happens between steps after a batch change (an admission's
    prefill): drafting runs whose requests keep being replaced one by one can realise less than
    plain runs while each drafting step beats a plain one. Compared end to end, drafting stops at
    that batch size, and is tried again once that comparison is WALL_TTL_S old."""
    from jaxspec.speculative.scheduling import WALL_MIN, WALL_TTL_S

    costs = _costs(1e-4, 0.02)  # drafting nearly free on paper
    sched, slots, act, run = _clocked(costs)
    plain = costs.verify_s[0]
    for _ in range(WALL_MIN + 1):
        sched.plan(slots, act)
        run(0, 1, plain)
    first = sched.plan(slots, act).kb
    assert first > 0
    for i in range(WALL_MIN + 1):
        if i % 4 == 3:  # a request ends and another takes its slot: the step pays its prefill
            sched.release(int(act[0]))
            sched.start(int(act[0]), slots.requests[int(act[0])])
            run(first, 2, 1.2 * plain + 10 * plain)
        else:
            run(first, 2, 1.2 * plain)
        assert not sched._blocked(4, costs) or i >= WALL_MIN - 1
    assert sched._blocked(4, costs) == frozenset(BUCKETS)
    assert sched.plan(slots, act).kb == 0
    run(0, 1, WALL_TTL_S + 1)  # (a long step: the drafting runs are now old)
    assert sched._blocked(4, costs) == frozenset()


def test_scheduler_leaves_out_buckets_that_realise_less_than_plain():
    """A bucket whose steps keep emitting fewer tokens per row-second than a plain step (acceptance
    that falls with the draft position, costs the step model does not see) stops being chosen, and
    comes back once probes of it do better."""
    from jaxspec.engine.step import StepResult
    from jaxspec.speculative.scheduling import MIN_REALISED_STEPS, SpecScheduler

    costs = _costs(1e-4, 0.02)  # drafting nearly free on paper
    sched, slots, act, run = _clocked(costs)
    plain = costs.verify_s[0]  # a plain step: one token per row in this long
    _learn_plain_period(sched, slots, act, run, plain)
    first = sched.plan(slots, act).kb
    assert first > 0
    for _ in range(MIN_REALISED_STEPS + 1):  # (the switch's step has no period)
        run(first, 2, 3 * plain)  # 2 tokens per row in 3 plain steps' time: worse than plain
    assert first in sched._blocked(4, costs)
    assert sched.plan(slots, act).kb != first
    for _ in range(20):  # the bucket's steps get good again (e.g. as probes)
        run(first, 4, 1.2 * plain)
    assert not sched._blocked(4, costs)
    assert sched.plan(slots, act).kb > 0  # (acceptance rose meanwhile: possibly a longer bucket)
    # Costs held fixed (smoothing 0) are not this machine's seconds: nothing is left out.
    fixed = SpecScheduler(4, BUCKETS, 8, None, rows_for=lambda n: 4, measure=lambda rows: costs,
                          cost_model=CostModel(costs.draft_s, costs.verify_s, smoothing=0.0))
    fixed.update(StepResult(act, [[0]] * 4, np.full(4, first), np.zeros(4), first, 0.0, 1.0))
    assert not fixed.realised


def test_the_first_drafting_step_after_plain_ones_is_not_a_drafting_period():
    """Switching from plain steps to drafting pays once (the draft catches up on what it missed, a
    queued step is waited for): the periods of drafting runs leave that first step out."""
    from jaxspec.engine.step import StepResult
    from jaxspec.speculative.scheduling import SpecScheduler

    costs = _costs(1e-3, 0.1)
    clock = [0.0]
    sched = SpecScheduler(1, BUCKETS, 8, None, rows_for=lambda n: 1, measure=lambda rows: costs,
                          clock=lambda: clock[0])
    _, act = _running(sched, 1, 10_000)
    assert sched.costs_for(1) is costs

    def step(kb: int, seconds: float) -> None:
        clock[0] += seconds
        sched.update(StepResult(act, [[0] * (kb + 1)], np.array([kb]), np.array([kb]), kb, 0.0, seconds,
                                queued=True))

    step(0, 0.01)
    step(2, 5.0)  # the switch
    assert 2 not in costs.periods
    step(2, 0.02)
    step(2, 0.03)
    assert list(costs.periods[2]) == pytest.approx([0.02, 0.03])
    step(0, 0.01)
    step(2, 7.0)  # switching back in: left out again
    assert list(costs.periods[2]) == pytest.approx([0.02, 0.03])


def _one_request_clocked(probe_every: int, max_tokens: int):
    """One running request under a scheduler with measured-style costs and a clock the test moves;
    (costs, clock [seconds], scheduler, slots, active ids)."""
    from jaxspec.speculative.scheduling import SpecScheduler

    costs = _costs(1e-4, 0.02)
    clock = [0.0]
    sched = SpecScheduler(1, BUCKETS, 8, None, rows_for=lambda n: 1, measure=lambda rows: costs,
                          clock=lambda: clock[0], probe_every=probe_every)
    slots, act = _running(sched, 1, max_tokens)
    return costs, clock, sched, slots, act


def test_scheduler_stops_drafting_when_served_periods_say_plain_is_faster():
    """On paper (the steps' own times) drafting pays; in serving, plain steps queued behind each other
    take half their own time and drafting steps pay the host's work on top: the policy follows the
    periods it measures and turns speculation off."""
    from jaxspec.engine.step import StepResult

    costs, clock, sched, slots, act = _one_request_clocked(probe_every=1000, max_tokens=10_000)
    plain = costs.own_cost(0)
    for _ in range(200):
        plan = sched.plan(slots, act)
        if plan.kb == 0:
            clock[0] += 0.5 * plain
            result = StepResult.plain(act, np.zeros(1, np.int32), queued=True)
        else:  # half the drafts accepted; the step costs its own time and 3 plain steps of host work
            clock[0] += costs.own_cost(plan.kb) + 3 * plain
            acc = plan.kb // 2
            result = StepResult(act, [[0] * (acc + 1)], np.array([plan.kb]), np.array([acc]), plan.kb, 0.0,
                                costs.own_cost(plan.kb))
        sched.update(result)
        slots.num_generated[0] += len(result.tokens[0])
    # Drafting ran in its trials (one per bucket, to see its periods) and hardly otherwise.
    drafting = sum(n for kb, n in sched.bucket_steps.items() if kb)
    assert drafting <= len(sched.buckets) * sched.trial_steps + 10
    assert sched.plan(slots, act).kb == 0
    assert sched.costs_for(1).step_cost(0) == pytest.approx(0.5 * plain)


def test_while_drafting_plain_steps_are_measured_afresh_and_end_drafting_that_no_longer_pays():
    """Plain's period was measured slow (a busy start); drafting then looks worth it and runs. Every
    PLAIN_REFRESH_EVERY drafting steps a run of PLAIN_REFRESH_STEPS plain steps measures plain's
    period afresh (the old periods dropped, the first one after drafting left out), and the policy,
    weighing the fresh period, turns drafting off."""
    from jaxspec.engine.step import StepResult
    from jaxspec.speculative.scheduling import PLAIN_REFRESH_EVERY, PLAIN_REFRESH_STEPS

    costs, clock, sched, slots, act = _one_request_clocked(probe_every=10_000, max_tokens=100_000)
    plain = costs.own_cost(0)
    slow = [True]
    kbs = []
    for _ in range(PLAIN_REFRESH_EVERY + 60):
        plan = sched.plan(slots, act)
        kbs.append(plan.kb)
        if plan.kb == 0:  # queued plain steps: their own time while the machine was busy, then half
            clock[0] += (1.0 if slow[0] else 0.5) * plain
            result = StepResult.plain(act, np.zeros(1, np.int32), queued=True)
        else:  # a drafting step takes its own time and emits 1.5 tokens on average
            slow[0] = False
            clock[0] += costs.own_cost(plan.kb)
            acc = 1 if len(kbs) % 2 else 0
            result = StepResult(act, [[0] * (acc + 1)], np.array([plan.kb]), np.array([acc]), plan.kb, 0.0,
                                costs.own_cost(plan.kb))
        sched.update(result)
        slots.num_generated[0] += len(result.tokens[0])
    first = kbs.index(next(kb for kb in kbs if kb > 0))
    assert all(kb > 0 for kb in kbs[first:first + PLAIN_REFRESH_EVERY])  # drafting on a stale plain period
    refresh = kbs[first + PLAIN_REFRESH_EVERY:first + PLAIN_REFRESH_EVERY + PLAIN_REFRESH_STEPS]
    assert refresh == [0] * PLAIN_REFRESH_STEPS
    assert sched.costs_for(1).period(0) == pytest.approx(0.5 * plain)  # only the fresh periods
    assert not any(kbs[first + PLAIN_REFRESH_EVERY:])  # and drafting stays off


def test_scheduler_with_speculation_off_skips_the_choice_but_keeps_probing():
    """While the policy keeps kb = 0 the scheduler does not redo the full choice every step (it runs on
    the plain path's every step), yet probes come on the policy's schedule and a changed batch or a
    probe's outcome brings a full choice back."""
    from jaxspec.engine.step import StepResult
    from jaxspec.speculative.scheduling import OFF_REFRESH_STEPS, SpecScheduler

    costs = CostModel({0: 0.0, **{b: 1.0 * b for b in BUCKETS}}, {0: 1e-2, **{b: 1e-2 for b in BUCKETS}},
                      smoothing=0.0)  # drafting never pays
    sched = SpecScheduler(2, BUCKETS, 8, None, rows_for=lambda n: 2, measure=lambda rows: costs, cost_model=costs,
                          probe_every=5)
    choices = []
    choose = sched.policy.choose
    sched.policy.choose = lambda *a, **kw: choices.append(1) or choose(*a, **kw)
    slots, act = _running(sched, 2, 10_000)
    kbs = []
    for _ in range(60):
        kb = sched.plan(slots, act).kb
        kbs.append(kb)
        tokens = [[0] * (1 + (kb > 0))] * 2
        sched.update(StepResult(act, tokens, np.full(2, kb), np.full(2, int(kb > 0)), kb, 0.0, 1e-2))
        slots.num_generated[act] += len(tokens[0])
    probes = [i for i, kb in enumerate(kbs) if kb > 0]
    assert probes and all(kbs[i] == BUCKETS[0] for i in probes)
    gaps = np.diff(probes)
    assert gaps[0] >= 5 and (gaps[1:] >= gaps[:-1]).all()  # the wait before a probe doubles while probes fail
    # A full choice after every probe and at least every OFF_REFRESH_STEPS off steps, not every step.
    assert len(probes) < len(choices) <= len(probes) + 60 // OFF_REFRESH_STEPS + 2
    n = len(choices)
    sched.release(1)
    slots.active[1] = False
    sched.plan(slots, np.arange(1))
    assert len(choices) == n + 1  # a changed batch chooses afresh


def test_a_probe_of_a_catching_up_proposer_runs_over_the_slot_with_the_shortest_context():
    """``probe_one_slot``: with speculation off, each probe is a step over one free slot with room for a
    draft, the one with the least context to catch up on; every other step covers the batch. A probe
    whose slot ended before it ran (refit) becomes a plain step over the rest."""
    from jaxspec.engine.request import Request
    from jaxspec.engine.slots import SlotTable
    from jaxspec.engine.step import StepResult
    from jaxspec.sampling import SamplingParams
    from jaxspec.speculative.scheduling import SpecScheduler

    costs = CostModel({0: 0.0, **{b: 1.0 * b for b in BUCKETS}}, {0: 1e-2, **{b: 1e-2 for b in BUCKETS}},
                      smoothing=0.0)  # drafting never pays
    sched = SpecScheduler(3, BUCKETS, 8, None, rows_for=lambda n: n, measure=lambda rows: costs, cost_model=costs,
                          probe_every=3, probe_one_slot=True)
    slots = SlotTable(3)
    prompts = {0: 40, 1: 9, 2: 20}  # slot 1 has the shortest context; slot 2 asks for no speculation
    for s, n in prompts.items():
        req = Request(f"r{s}", [1] * n, SamplingParams(max_tokens=1000), seed=s,
                      num_speculative_tokens=0 if s == 2 else None)
        slots.assign(s, req)
        slots.active[s] = True
        sched.start(s, req)
    act = np.arange(3)
    probes = []
    for _ in range(40):
        plan = sched.plan(slots, act)
        if plan.kb:
            probes.append(plan)
        else:
            assert plan.slots.tolist() == [0, 1, 2]
        sched.update(StepResult(plan.slots, [[0] * (1 + int(k)) for k in plan.k], plan.k, plan.k, plan.kb, 0.0, 1e-2))
        slots.num_generated[plan.slots] += 1 + plan.k
    assert len(probes) >= 2
    assert all(p.slots.tolist() == [1] and p.k.tolist() == [BUCKETS[0]] for p in probes)
    # Slot 1 ran ahead in the probes; once its context is the longer, slot 0 is probed instead.
    slots.num_generated[1] += 100
    while not (plan := sched.plan(slots, act)).kb:
        sched.update(StepResult(plan.slots, [[0]] * 3, plan.k, plan.k, 0, 0.0, 1e-2))
    assert plan.slots.tolist() == [0]
    assert sched.refit(plan, slots, np.array([1, 2])).slots.tolist() == [1, 2]  # slot 0 ended first
    assert sched.refit(plan, slots, np.array([0, 2])).slots.tolist() == [0]


def test_repeated_off_plans_never_probe_past_a_request_s_room():
    """With speculation off the scheduler repeats one plan over the same slots (no full plan per
    step), yet a probe never drafts more than a slot can still use, and none comes once no slot has
    room for one."""
    from jaxspec.engine.step import StepResult
    from jaxspec.speculative.scheduling import SpecScheduler

    costs = CostModel({0: 0.0, **{b: 1.0 * b for b in BUCKETS}}, {0: 1e-2, **{b: 1e-2 for b in BUCKETS}},
                      smoothing=0.0)  # drafting never pays
    sched = SpecScheduler(2, BUCKETS, 8, None, rows_for=lambda n: 2, measure=lambda rows: costs, cost_model=costs,
                          probe_every=2)
    slots, act = _running(sched, 2, 40)
    plans, probes = [], []
    while (left := 40 - slots.num_generated[act]).min() > 0:
        plan = sched.plan(slots, act)
        plans.append(plan)
        assert (plan.k <= np.maximum(left - 1, 0)).all()
        if plan.kb:
            probes.append(int(left.min()))
        tokens = [[0] * (1 + int(plan.k[i] > 0)) for i in range(2)]
        sched.update(StepResult(act, tokens, plan.k, (plan.k > 0).astype(np.int32), plan.kb, 0.0, 1e-2))
        slots.num_generated[act] += [len(t) for t in tokens]
    assert probes
    assert any(a is b for a, b in zip(plans, plans[1:]))  # the off plan was repeated, not planned afresh


def test_probe_schedule_defaults_match_the_readme():
    """README: with speculation off a probe runs after 16 plain steps, the wait doubling up to 512."""
    import inspect

    from jaxspec.speculative import SpeculativeRunner

    assert inspect.signature(SpeculativeRunner).parameters["probe_every"].default == 16
    policy = KPolicy([1, 2])
    assert (policy.probe_every, policy.max_probe_every) == (16, 512)
    # "a length tried in serving must promise 5% more ... one not tried 30% ... 2% keeps it on"
    assert (policy.tried_gain, policy.switch_gain, policy.min_gain) == (0.05, 0.3, 0.02)
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "must promise 5% more tokens per second than plain steps to turn it on" in readme
    assert "one not tried 30%" in readme and "2% keeps it on" in readme
    from jaxspec.speculative.scheduling import TRIAL_BUDGET, TRIAL_EVIDENCE_S, TRIAL_STEPS, TRIAL_TTL_S

    assert (TRIAL_STEPS, TRIAL_TTL_S, TRIAL_BUDGET, TRIAL_EVIDENCE_S) == (8, 20.0, 0.05, 300.0)
    assert "a trial runs each proposal length for 8 steps" in readme
    assert "tried or run in the last 20 s is not tried again (nor before its last trial is 5% of the time since)" in readme
    assert "tried or run in the last 5 minutes" in readme
    from jaxspec.speculative.scheduling import SpecScheduler

    assert inspect.signature(SpecScheduler).parameters["trial_budget"].default == TRIAL_BUDGET
    assert ("Trials never run back to back: none starts, at any batch bucket, before the last one is at most 5% "
            "of the time since its start") in readme
    from jaxspec.speculative.scheduling import PLAIN_FIRST_STEPS

    assert PLAIN_FIRST_STEPS == 24 and "until their served period is known (at most 24)" in readme
    from jaxspec.speculative.scheduling import PLAIN_REFRESH_EVERY, PLAIN_REFRESH_STEPS

    assert (PLAIN_REFRESH_EVERY, PLAIN_REFRESH_STEPS) == (96, 6)
    assert "every 96 drafting steps a run of 6 plain steps measures that period afresh" in readme
    from jaxspec.speculative.adaptive import PERIOD_WINDOW

    assert PERIOD_WINDOW == 32 and "the median, over the last 32 steps, of two consecutive periods' mean" in readme
    from jaxspec.speculative.adaptive import RECENT_PERIODS

    assert RECENT_PERIODS == 8 and "or over the last 8 where that is on plain decoding's side" in readme
    from jaxspec.speculative.scheduling import WALL_TTL_S, WALL_WINDOW

    assert (WALL_WINDOW, WALL_TTL_S) == (64, 30.0)
    assert "(the last 64 intervals between two steps of each kind, admissions included) every drafting bucket is left out for 30 s" in readme


def test_a_new_batch_bucket_borrows_what_other_buckets_saw_in_serving():
    """Costs at a batch size not seen yet take the queued-plain ratio and the drafting host time from
    the buckets that were: drafting does not look cheap there just because it is new."""
    from jaxspec.speculative.adaptive import MIN_PERIODS
    from jaxspec.speculative.scheduling import SpecScheduler

    models = {1: _costs(1e-3, 0.1), 4: _costs(1e-3, 0.1)}
    sched = SpecScheduler(4, BUCKETS, 8, None, rows_for=lambda n: 1 if n == 1 else 4, measure=models.__getitem__)
    seen = sched.costs_for(1)
    for _ in range(MIN_PERIODS):
        seen.observe_period(0, 0.5 * seen.own_cost(0))
        seen.observe_period(2, seen.own_cost(2) + 4e-3)
    new = sched.costs_for(4)
    assert new.step_cost(0) == pytest.approx(new.own_cost(0)) and new.step_cost(4) == pytest.approx(new.own_cost(4))
    sched._lend(4, new)
    assert new.step_cost(0) == pytest.approx(0.5 * new.own_cost(0))
    assert new.step_cost(4) == pytest.approx(new.own_cost(4) + 4e-3)
    for _ in range(MIN_PERIODS):  # its own observations win once it has them
        new.observe_period(0, 0.9 * new.own_cost(0))
    assert new.step_cost(0) == pytest.approx(0.9 * new.own_cost(0))


def _drafting_dear_on_paper() -> CostModel:
    """Warm-up's own times: a drafting step (waited for, over a long span) 4x a plain one."""
    return CostModel({0: 0.0, **{b: 0.0 for b in BUCKETS}}, {0: 1e-2, **{b: 4e-2 for b in BUCKETS}})


def _serve(sched, slots, act, run, steps: int, period: dict[int, float], tokens: dict[int, int]) -> list[int]:
    """``steps`` planned steps, each taking ``period[kb]`` and emitting ``tokens[kb]`` per row; the kbs."""
    kbs = []
    for _ in range(steps):
        kb = sched.plan(slots, act).kb
        kbs.append(kb)
        run(kb, tokens[kb], period[kb])
        slots.num_generated[act] += tokens[kb]
    return kbs


def test_a_trial_prices_drafting_at_its_period_in_serving():
    """Where queued drafting steps beat plain ones but warm-up's waited-for times say otherwise, the
    scheduler, speculation off, tries each bucket (TRIAL_STEPS steps, the smallest first) and the
    policy then weighs the periods it saw: it drafts, at the bucket that pays best. Without trials
    it stays plain but for its probes."""
    from jaxspec.speculative.scheduling import TRIAL_STEPS

    plain = 1e-2
    period = {0: plain, **{b: 1.2 * plain for b in BUCKETS}}  # every drafting step: 1.2 plain steps
    tokens = {0: 1, **{b: b + 1 for b in BUCKETS}}  # every draft accepted
    runs = {}
    expected = [b for b in BUCKETS for _ in range(TRIAL_STEPS)]
    steps = len(expected) + 20
    for trials in (0, TRIAL_STEPS):
        sched, slots, act, run = _clocked(_drafting_dear_on_paper(), trial_steps=trials, max_tokens=100_000)
        _accepted_so_far(sched, 95.0, 5.0)
        _learn_plain_period(sched, slots, act, run, plain)
        runs[trials] = _serve(sched, slots, act, run, steps, period, tokens)
    assert runs[0].count(0) >= steps - 6  # plain steps, and the odd probe
    tried = runs[TRIAL_STEPS]
    assert tried[:len(expected)] == expected
    assert tried[len(expected):] == [BUCKETS[-1]] * 20


def test_trials_climb_while_rates_rise_and_come_back_after_their_wait():
    """Buckets are tried from the smallest up, no further once one realised less than plain steps and
    less than the bucket before it; a bucket is tried again once TRIAL_TTL_S have passed."""
    from jaxspec.speculative.scheduling import TRIAL_TTL_S

    plain = 1e-2
    # Per row-second: bucket 1 gives 0.8 of plain, bucket 2 0.6, buckets 4 and 8 would pay.
    period = {0: plain, 1: 2.5 * plain, 2: 5 * plain, 4: 1.2 * plain, 8: 1.2 * plain}
    tokens = {0: 1, 1: 2, 2: 3, 4: 5, 8: 9}
    sched, slots, act, run = _clocked(_drafting_dear_on_paper(), trial_steps=6, max_tokens=10_000)
    _accepted_so_far(sched, 95.0, 5.0)
    _learn_plain_period(sched, slots, act, run, plain)
    kbs = _serve(sched, slots, act, run, 80, period, tokens)
    assert kbs[:12] == [1] * 6 + [2] * 6
    assert 4 not in kbs and 8 not in kbs and kbs[-20:].count(0) >= 18  # and the odd probe (bucket 1)
    run(0, 1, TRIAL_TTL_S)  # a long while later (one long step)
    kbs = _serve(sched, slots, act, run, 40, period, tokens)
    assert [1] * 6 in [kbs[i:i + 6] for i in range(len(kbs) - 5)]  # bucket 1 tried again


def test_trials_are_spaced_so_that_no_request_runs_through_several_in_a_row():
    """A trial's cost falls on the requests running through it. With the serving default, the
    climb over proposal buckets does not run its trials back to back: each starts once the one
    before took at most TRIAL_BUDGET of the time since that one's start."""
    from jaxspec.speculative.scheduling import TRIAL_BUDGET

    plain = 1e-2
    # Per row-second: bucket 1 gives 0.8 of plain, bucket 2 0.6, buckets 4 and 8 would pay.
    period = {0: plain, 1: 2.5 * plain, 2: 5 * plain, 4: 1.2 * plain, 8: 1.2 * plain}
    tokens = {0: 1, 1: 2, 2: 3, 4: 5, 8: 9}
    sched, slots, act, run = _clocked(_drafting_dear_on_paper(), trial_steps=6, max_tokens=100_000,
                                      trial_budget=TRIAL_BUDGET)
    _accepted_so_far(sched, 95.0, 5.0)
    _learn_plain_period(sched, slots, act, run, plain)
    starts, kbs = [], []
    for _ in range(2000):
        kb = sched.plan(slots, act).kb
        if kb and sched._trial is not None and (not kbs or kbs[-1] != kb):
            starts.append((sched._clock(), kb))
        kbs.append(kb)
        run(kb, tokens[kb], period[kb])
        slots.num_generated[act] += tokens[kb]
    assert [kb for _, kb in starts[:2]] == [1, 2]  # the same climb as back to back
    took = 6 * period[1]  # the first trial's steps (its start is the clock before the first)
    assert starts[1][0] - starts[0][0] >= took / TRIAL_BUDGET
    assert 0 in kbs[kbs.index(1) + 6:kbs.index(2)]  # plain steps between the two trials
    # Back to back (a budget of 1: the next may start once the last ended), the climb is immediate.
    sched, slots, act, run = _clocked(_drafting_dear_on_paper(), trial_steps=6, max_tokens=100_000)
    _accepted_so_far(sched, 95.0, 5.0)
    _learn_plain_period(sched, slots, act, run, plain)
    assert _serve(sched, slots, act, run, 12, period, tokens) == [1] * 6 + [2] * 6


def test_no_trials_over_more_rows_while_drafting_lost_over_fewer():
    """A verification's extra tokens cost more the more rows share the step: while recent trials at
    a batch bucket found no bucket beating plain steps, larger batch buckets skip their trials (each
    would pay the draft's catch-up for every row); once those trials are TRIAL_EVIDENCE_S old, they run."""
    from jaxspec.engine.step import StepResult
    from jaxspec.speculative.scheduling import TRIAL_EVIDENCE_S, SpecScheduler

    clock = [0.0]
    costs = {2: _drafting_dear_on_paper(), 4: _drafting_dear_on_paper()}
    sched = SpecScheduler(4, BUCKETS, 8, None, rows_for=lambda n: 2 if n <= 2 else 4,
                          measure=lambda rows: costs[rows], clock=lambda: clock[0], trial_steps=6, trial_budget=1.0)
    slots, act = _running(sched, 4, 10_000)
    _accepted_so_far(sched, 95.0, 5.0)
    plain = 1e-2
    period = {0: plain, 1: 2.5 * plain, 2: 5 * plain, 4: 5 * plain, 8: 5 * plain}  # drafting loses
    tokens = {0: 1, 1: 2, 2: 3, 4: 5, 8: 9}

    def serve(rows: np.ndarray, steps: int) -> list[int]:
        kbs = []
        for _ in range(steps):
            kb = sched.plan(slots, rows).kb
            kbs.append(kb)
            clock[0] += period[kb]
            n = len(rows)
            sched.update(StepResult(rows, [[0] * tokens[kb]] * n, np.full(n, kb), np.full(n, tokens[kb] - 1),
                                    kb, 0.0, period[kb]))
            slots.num_generated[rows] += tokens[kb]
        return kbs

    assert serve(act[:2], 20)[4:16] == [1] * 6 + [2] * 6  # plain first, then trials that lose
    four = serve(act, 40)
    assert four.count(0) >= 38  # no trial over 4 rows (the odd probe only)
    clock[0] += TRIAL_EVIDENCE_S
    four = serve(act, 40)
    assert [1] * 6 in [four[i:i + 6] for i in range(len(four) - 5)]


def test_drafting_keeps_its_bucket_between_full_choices_unless_the_bucket_is_left_out():
    """While drafting over the same batch, the choice is made afresh every ON_REFRESH_STEPS steps, not
    every step: a request's last tokens (not drafted) dip the rates for a step or two, and a switch
    off and on again drains the queue and pays the draft's catch-up. A bucket that realises less
    than plain steps stops at once."""
    from jaxspec.speculative.scheduling import MIN_REALISED_STEPS, ON_REFRESH_STEPS

    costs = _costs(1e-4, 0.02)  # drafting nearly free on paper
    sched, slots, act, run = _clocked(costs)
    _accepted_so_far(sched)
    plain = costs.verify_s[0]
    _learn_plain_period(sched, slots, act, run, plain)
    kb = sched.plan(slots, act).kb
    assert kb > 0
    run(kb, kb + 1, 1.1 * plain)
    sched.estimator.acc[:] = 0.0  # every slot's acceptance collapses: a full choice would stop
    sched.estimator.rej[:] = 1e6
    kbs = [sched.plan(slots, act).kb for _ in range(ON_REFRESH_STEPS)]
    assert kbs == [kb] * ON_REFRESH_STEPS
    assert sched.plan(slots, act).kb == 0  # the next full choice
    # Left out (realised below plain) while within the run: stops at the next step.
    costs = _costs(1e-4, 0.02)
    sched, slots, act, run = _clocked(costs)
    _accepted_so_far(sched)
    _learn_plain_period(sched, slots, act, run, plain)
    kb = sched.plan(slots, act).kb
    for _ in range(MIN_REALISED_STEPS + 1):
        run(kb, 1, 3 * plain)
    assert sched.plan(slots, act).kb != kb


def test_a_trials_first_periods_are_left_out():
    """A trial's first steps after plain ones run slower than its later ones (measured: the first
    periods of a k=2 trial 1.6-2.1 ms, the rest 1.3-1.5): its switching step and the next
    TRIAL_SETTLE periods do not price the bucket."""
    from jaxspec.speculative.scheduling import TRIAL_SETTLE, TRIAL_STEPS

    plain = 1e-2
    sched, slots, act, run = _clocked(_drafting_dear_on_paper(), trial_steps=TRIAL_STEPS, max_tokens=100_000)
    _accepted_so_far(sched, 95.0, 5.0)
    _learn_plain_period(sched, slots, act, run, plain)
    costs = sched.costs_for(4)
    for i in range(TRIAL_STEPS):
        assert sched.plan(slots, act).kb == 1
        run(1, 2, (5.0 if i <= TRIAL_SETTLE else 1.0) * plain)
        slots.num_generated[act] += 2
    assert list(costs.periods[1]) == pytest.approx([plain] * (TRIAL_STEPS - 1 - TRIAL_SETTLE))
    assert sched.realised_rate(4, 1) == pytest.approx(2 / plain)


def test_a_stray_drafting_period_does_not_stand_for_a_trial():
    """Drafting steps over 2 rows that end with one row left record a period or two at 1 row: too few
    to price a bucket, so the bucket is still tried there."""
    from jaxspec.engine.step import StepResult
    from jaxspec.speculative.scheduling import SpecScheduler

    clock = [0.0]
    costs = {1: _drafting_dear_on_paper(), 2: _drafting_dear_on_paper()}
    sched = SpecScheduler(2, BUCKETS, 8, None, rows_for=lambda n: n, measure=lambda rows: costs[rows],
                          clock=lambda: clock[0], trial_steps=8)
    slots, act = _running(sched, 2, 10_000)
    _accepted_so_far(sched, 95.0, 5.0)
    one = act[:1]

    def step(rows: np.ndarray, kb: int, seconds: float) -> None:
        clock[0] += seconds
        sched.update(StepResult(rows, [[0] * (kb + 1)] * len(rows), np.full(len(rows), kb),
                                np.full(len(rows), kb), kb, 0.0, seconds))

    for _ in range(4):  # plain steps at 1 row: its plain period is known
        assert sched.plan(slots, one).kb == 0
        step(one, 0, 1e-2)
    step(one, 2, 1.2e-2)  # a drafting run's last two steps, after its other row ended
    step(one, 2, 1.2e-2)
    assert costs[1].period(2) is None
    assert sched.plan(slots, one).kb == 1  # bucket 1 is tried, then bucket 2 too
    assert (1, 2) not in sched._tried_at
