"""Adaptive k (estimator, cost model, policy) and prompt lookup, without models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jaxspec.config import load_config
from jaxspec.speculative.adaptive import (
    AcceptanceEstimator,
    CostModel,
    KPolicy,
    Roofline,
    bucket_for,
    expected_experts_touched,
    expected_tokens,
    k_buckets,
)
from jaxspec.speculative.ngram import NgramProposer, lookup
from jaxspec.speculative.proposer import SpecContext, TokenHistory

BUCKETS = k_buckets(8)


def test_expected_tokens_formula():
    assert float(expected_tokens(0.0, 5)) == 1.0
    assert float(expected_tokens(1.0, 5)) == 6.0
    a, k = 0.6, 4
    assert float(expected_tokens(a, k)) == pytest.approx(sum(a**i for i in range(k + 1)))
    assert np.all(np.diff(expected_tokens(0.7, np.arange(9))) > 0)


def test_experts_touched():
    assert expected_experts_touched(1, 8, 2) == pytest.approx(2.0)
    assert expected_experts_touched(9, 128, 8) == pytest.approx(128 * (1 - (1 - 8 / 128) ** 9))
    assert expected_experts_touched(10_000, 64, 4) == pytest.approx(64.0)
    assert expected_experts_touched(3, 0, 0) == 0.0


def test_buckets():
    assert BUCKETS == [1, 2, 4, 8]
    assert k_buckets(6, extra=(3,)) == [1, 2, 3, 4, 6]
    assert k_buckets(0) == []
    assert [bucket_for(k, BUCKETS) for k in (0, 1, 3, 5, 8)] == [0, 1, 4, 8, 8]
    with pytest.raises(ValueError):
        bucket_for(9, BUCKETS)


def test_estimator_tracks_each_slot_and_forgets():
    est = AcceptanceEstimator(2, prior_mean=0.5, prior_strength=2.0, decay=0.9)
    assert est.mean(np.array([0, 1])) == pytest.approx([0.5, 0.5])
    for _ in range(30):
        est.update(0, 4, 4)  # everything accepted
        est.update(1, 4, 0)  # first draft rejected
    hi, lo = est.mean(np.array([0, 1]))
    assert hi > 0.9 and lo < 0.15
    for _ in range(40):  # slot 0's draft got worse: the estimate follows
        est.update(0, 4, 1)
    assert est.mean(np.array([0]))[0] < 0.6
    est.reset(0)  # a new request starts from the engine-wide estimate
    assert est.mean(np.array([0]))[0] == pytest.approx(est.global_mean())
    est.update(1, 0, 0)  # a step without drafts tells nothing
    assert est.mean(np.array([1]))[0] == pytest.approx(lo, rel=0.2)


def _costs(draft_per_token: float, verify_growth: float) -> CostModel:
    """Verification 10 ms plus verify_growth per extra token; drafting draft_per_token per token."""
    return CostModel({0: 0.0, **{b: draft_per_token * b for b in BUCKETS}},
                     {0: 1e-2, **{b: 1e-2 * (1 + verify_growth * b) for b in BUCKETS}})


def _settled(policy: KPolicy, *args) -> int:
    """The policy's choice once it has climbed to it (it moves up one bucket per choice)."""
    for _ in range(len(policy.buckets) + 1):
        kb = policy.choose(*args)
    return kb


def test_policy_follows_acceptance_and_cost():
    free, caps = np.full(4, -1), np.full(4, 8)
    cheap = _costs(1e-4, 0.02)
    assert _settled(KPolicy(BUCKETS), np.full(4, 0.95), caps, free, cheap) == 8
    assert _settled(KPolicy(BUCKETS), np.full(4, 0.6), caps, free, cheap) in (2, 4)
    assert _settled(KPolicy(BUCKETS), np.full(4, 0.02), caps, free, cheap) == 0
    expensive = _costs(4e-3, 0.3)  # a draft 40% of the target per token, verification cost growing fast
    assert _settled(KPolicy(BUCKETS), np.full(4, 0.6), caps, free, expensive) == 0
    # The choice maximises the batch's expected tokens per second exactly.
    pol = KPolicy(BUCKETS, min_gain=0.0)
    alphas = np.array([0.9, 0.3, 0.7, 0.5])
    kb = _settled(pol, alphas, caps, free, cheap)
    rates = {b: expected_tokens(alphas, b).sum() / cheap.step_cost(b) for b in [0, *BUCKETS]}
    assert kb == max(rates, key=rates.get)


def test_drafting_turns_on_at_the_smallest_bucket_and_climbs_one_bucket_per_choice():
    """Acceptance estimated from short drafts (a probe drafts one token) overstates long ones, so a
    switch on starts at the smallest bucket and each choice moves at most one bucket up; down, and
    off, it moves at once."""
    free, caps = np.full(4, -1), np.full(4, 8)
    cheap = _costs(1e-4, 0.02)
    pol = KPolicy(BUCKETS)
    high = np.full(4, 0.95)
    assert [pol.choose(high, caps, free, cheap) for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    assert pol.choose(np.full(4, 0.6), caps, free, cheap) in (2, 4)  # down in one choice
    assert pol.choose(np.full(4, 0.02), caps, free, cheap) == 0
    assert pol.choose(high, caps, free, cheap) == 1  # on again: from the smallest
    # A request's own k is its floor, whatever the climb.
    assert KPolicy(BUCKETS).choose(high, caps, np.array([4, -1, -1, -1]), cheap) == 4
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "it turns on at the smallest proposal length and moves up at most one length per step" in readme


def test_turning_drafting_on_weighs_acceptance_at_the_low_end_of_its_estimate():
    """Off, the policy weighs ``cautious`` acceptance (one posterior standard deviation below the
    mean): an estimate resting on few rounds must pay there to turn drafting on; on, the mean keeps it."""
    est = AcceptanceEstimator(2)
    fresh = est.lower(np.arange(2))
    assert (fresh < est.mean(np.arange(2))).all()
    for _ in range(200):  # many rounds at 0.6 narrow the posterior towards its mean
        est.update(0, 4, 2)
    gap_seen = est.mean(np.array([0]))[0] - est.lower(np.array([0]))[0]
    assert gap_seen < est.mean(np.array([1]))[0] - est.lower(np.array([1]))[0]
    costs = CostModel({0: 0.0, 2: 0.0}, {0: 1e-2, 2: 1.6 / 120})  # at acceptance 0.6: 47% over plain, 0.45: 24%
    caps, free = np.full(1, 8), np.full(1, -1)
    policy = KPolicy([2], switch_gain=0.3)
    assert policy.choose(np.full(1, 0.6), caps, free, costs) == 2
    policy = KPolicy([2], switch_gain=0.3)
    assert policy.choose(np.full(1, 0.6), caps, free, costs, cautious=np.full(1, 0.45)) == 0
    assert policy.choose(np.full(1, 0.6), caps, free, costs, cautious=np.full(1, 0.6)) == 2
    assert policy.choose(np.full(1, 0.6), caps, free, costs, cautious=np.full(1, 0.1)) == 2  # on: the mean
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "weighing each request's acceptance one standard deviation below its estimate" in readme


def test_policy_turns_drafting_on_only_for_a_clear_gain_and_keeps_it_at_a_small_one():
    """Speculation off: a bucket must beat plain steps by ``switch_gain`` to turn it on (a switch
    costs what step rates do not show); on: ``min_gain`` keeps it."""
    costs = CostModel({0: 0.0, 2: 0.0}, {0: 1e-2, 2: 1.75 / 108})  # at acceptance 0.5: 8% over plain
    caps, free = np.full(1, 8), np.full(1, -1)
    policy = KPolicy([2], switch_gain=0.15, min_gain=0.02)
    assert policy.choose(np.full(1, 0.5), caps, free, costs) == 0
    assert policy.choose(np.full(1, 0.9), caps, free, costs) == 2  # 67% over plain: on
    assert policy.choose(np.full(1, 0.5), caps, free, costs) == 2  # and 8% keeps it on
    assert policy.choose(np.full(1, 0.3), caps, free, costs) == 0
    assert policy.choose(np.full(1, 0.5), caps, free, costs) == 0  # off again: 8% is not enough
    assert KPolicy([2], switch_gain=0.05).choose(np.full(1, 0.5), caps, free, costs) == 2


def test_policy_respects_overrides_caps_and_probes_when_off():
    cheap = _costs(1e-4, 0.02)
    pol = KPolicy(BUCKETS, probe_every=3)
    forced = np.array([4, -1])
    # A request that asked for k=4 sets the floor even when acceptance says "off".
    assert pol.choose(np.array([0.01, 0.01]), np.array([8, 8]), forced, cheap) == 4
    # Caps: a request with one token left cannot use drafts.
    assert pol.choose(np.array([0.99]), np.array([0]), np.array([-1]), cheap) == 0
    # Off for probe_every steps -> one probe at the smallest bucket, so the estimate can recover;
    # probes that change nothing come at doubling intervals (every 3, then 6, then 12 steps).
    low = np.array([0.01])
    picks = [pol.choose(low, np.array([8]), np.array([-1]), cheap) for _ in range(24)]
    assert [i for i, kb in enumerate(picks) if kb] == [2, 8, 20] and set(picks) == {0, 1}
    # Acceptance recovered: speculation is back on, and the probe interval starts over.
    assert _settled(pol, np.array([0.95]), np.array([8]), np.array([-1]), cheap) == 8
    picks = [pol.choose(low, np.array([8]), np.array([-1]), cheap) for _ in range(3)]
    assert picks == [0, 0, 1]
    # Steps in which no slot can draft (a prompt lookup that found nothing) neither count towards
    # the next probe nor restart its count: two off steps, any number of those, then the probe.
    pol = KPolicy(BUCKETS, probe_every=3)
    picks = [pol.choose(low, np.array([8]), np.array([-1]), cheap) for _ in range(2)]
    picks += [pol.choose(low, np.array([0]), np.array([-1]), cheap) for _ in range(5)]
    picks += [pol.choose(low, np.array([8]), np.array([-1]), cheap)]
    assert picks == [0] * 7 + [1]


def test_costly_probes_wait_long_enough_to_stay_within_the_probe_budget():
    """A probe that costs five plain steps more than one, at a budget of 10%, is followed by 50 steps
    off at least (then the doubling resumes from there); the wait never exceeds max_budget_wait."""
    cheap, low, caps, free = _costs(1e-4, 0.02), np.array([0.01]), np.array([8]), np.array([-1])

    def probes(pol, steps=160, probe_s=None):
        picks = []
        for _ in range(steps):
            picks.append(pol.choose(low, caps, free, cheap))
            if picks[-1] and probe_s is not None:
                pol.probe_cost(probe_s, 1e-3)
        return [i for i, kb in enumerate(picks) if kb]

    assert probes(KPolicy(BUCKETS, probe_every=3, probe_budget=0.1)) == [2, 8, 20, 44, 92]
    assert probes(KPolicy(BUCKETS, probe_every=3, probe_budget=0.1), probe_s=6e-3) == [2, 52, 152]
    capped = KPolicy(BUCKETS, probe_every=3, max_probe_every=8, probe_budget=0.1, max_budget_wait=20)
    assert probes(capped, probe_s=1.0) == [2, 22, 42, 62, 82, 102, 122, 142]  # 9990 steps' worth, capped
    default = KPolicy(BUCKETS)  # the README's figures
    assert (default.probe_every, default.max_probe_every, default.probe_budget, default.max_budget_wait) == (
        16, 512, 0.01, 4096)
    # A probe that cost no more than a plain step leaves the doubling schedule as it was.
    assert probes(KPolicy(BUCKETS, probe_every=3, probe_budget=0.1), probe_s=1e-3) == [2, 8, 20, 44, 92]


def test_the_scheduler_prices_a_probe_by_its_wall_time():
    """The first drafting step after plain ones is a probe's (or a switch's) cost: the scheduler hands
    its period to the policy, whose next probes then wait longer when it was expensive."""
    from jaxspec.engine.step import StepResult
    from jaxspec.speculative.scheduling import SpecScheduler

    def run(probe_s: float) -> list[int]:
        costs = CostModel({0: 0.0, **{b: 0.1 * b for b in BUCKETS}}, {0: 1e-2, **{b: 1e-2 for b in BUCKETS}})
        clock = [0.0]
        sched = SpecScheduler(1, BUCKETS, 8, None, rows_for=lambda n: 1, measure=lambda rows: costs,
                              probe_every=4, clock=lambda: clock[0])
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


def test_observed_step_times_refine_costs():
    cm = _costs(1e-4, 0.02)
    before = cm.step_cost(4)
    for _ in range(200):
        cm.observe(4, 1e-3, 5e-2)
    assert cm.step_cost(4) == pytest.approx(5.1e-2, rel=1e-3) and before < 2e-2


def test_roofline_prices_moe_verification_by_experts_touched():
    """Verifying 9 tokens in a sparse MoE reads the weights of many more experts than
    decoding one (at batch 1), so it costs far more relative to plain decoding than in a
    dense model with the same active size; at large batches every expert is read anyway
    and compute takes over, where speculation stops paying."""
    moe, dense = load_config("qwen3-30b-a3b"), load_config("qwen3-0.6b")
    hw = Roofline()
    ratio_moe = hw.forward_s(moe, 1, 9, 1024) / hw.forward_s(moe, 1, 1, 1024)
    ratio_dense = hw.forward_s(dense, 1, 9, 1024) / hw.forward_s(dense, 1, 1, 1024)
    assert ratio_moe > 3.0 and ratio_dense < 1.2
    picks = {}
    for batch in (1, 32, 1024):
        costs = CostModel.analytic(moe, dense, batch, BUCKETS, context_len=1024)
        picks[batch] = _settled(KPolicy(BUCKETS), np.full(batch, 0.7), np.full(batch, 8), np.full(batch, -1), costs)
    assert picks[1] == 0  # batch 1: nine tokens touch ~4.5x the experts of one — not worth it at a = 0.7
    assert picks[32] >= 2  # mid batch: experts are shared, verification is nearly free
    assert picks[1024] < picks[32]  # large batch: compute-bound, back off


# ------------------------------------------------------------------- prompt lookup
def test_lookup_prefers_longest_most_recent_match():
    ctx = np.array([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3])
    # Suffix [5, 2, 3]: no earlier 3-gram; [2, 3] occurs at 1 and 6 -> the most recent (6) continues 7, 8, ...
    assert lookup(ctx, 3).tolist() == [7, 8, 5]
    assert lookup(np.array([4, 1, 2, 3, 4, 1, 2]), 2, max_n=3).tolist() == [3, 4]  # 3-gram [4,1,2] wins
    assert lookup(np.array([1, 2, 3]), 4).tolist() == []  # nothing repeats
    assert lookup(np.array([5, 6, 5]), 4).tolist() == [6, 5]  # continuation stops at the context end
    assert lookup(np.array([7]), 2).tolist() == []
    assert lookup(np.array([1, 2, 1, 2]), 0).tolist() == []


def test_ngram_proposer_per_slot_k():
    hist = TokenHistory(3, 32)
    hist.start(0, [1, 2, 3, 4, 1, 2])
    hist.start(1, [9, 8, 7])
    hist.start(2, [5, 5, 5, 5])
    prop = NgramProposer()
    prop.attach(None, 3, 32)
    ctx = SpecContext(hist, np.array([True, True, False]), np.array([2, 4, 4], np.int32), 4, None,
                      np.zeros(3, np.int32))
    p = prop.propose(ctx)
    assert p.probs is None and p.num_draft.tolist() == [2, 0, 0]
    assert p.tokens[0, :2].tolist() == [3, 4]


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


def _clocked(costs: CostModel):
    """A scheduler over 4 running requests whose clock moves by each step's time; (scheduler,
    slots, active ids, run(kb, tokens_per_row, step_s)) where run feeds one step's result."""
    from jaxspec.engine.step import StepResult
    from jaxspec.speculative.scheduling import SpecScheduler

    clock = [0.0]
    sched = SpecScheduler(4, BUCKETS, 8, None, rows_for=lambda n: 4, measure=lambda rows: costs,
                          clock=lambda: clock[0])
    slots, act = _running(sched, 4, 200)

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
                          clock=lambda: clock[0])
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
                          clock=lambda: clock[0])
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
    for _ in range(MIN_REALISED_STEPS):
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


def test_costs_are_the_observed_wall_periods_once_seen():
    """A bucket's cost is the mean wall period its steps showed in serving; a bucket not seen yet
    costs its own time plus the host time the seen drafting buckets showed above theirs."""
    from jaxspec.speculative.adaptive import MIN_PERIODS

    costs = _costs(1e-3, 0.1)
    own0, own2, own4 = costs.own_cost(0), costs.own_cost(2), costs.own_cost(4)
    for _ in range(MIN_PERIODS - 1):
        costs.observe_period(0, 0.5 * own0)
    assert costs.step_cost(0) == pytest.approx(own0)  # too few periods yet
    costs.observe_period(0, 0.5 * own0)
    costs.observe_period(0, 100.0)  # a stray pause is left out
    assert costs.step_cost(0) == pytest.approx(0.5 * own0)  # queued plain steps hide the host's work
    assert costs.step_cost(2) == pytest.approx(own2)  # no drafting bucket seen: its own time
    for _ in range(MIN_PERIODS):
        costs.observe_period(4, own4 + 3e-3)
    assert costs.step_cost(4) == pytest.approx(own4 + 3e-3)
    assert costs.step_cost(2) == pytest.approx(own2 + 3e-3)  # the host time bucket 4 showed
    assert costs.split(4, 1.0) == pytest.approx((costs.draft_s[4] / own4, costs.verify_s[4] / own4))


def test_a_bucket_costs_the_mean_of_alternating_periods_not_their_median():
    """Queued steps' results arrive in bursts (short and long periods alternate); what a step costs
    in throughput is their mean, which a median of mostly short periods would understate."""
    costs = _costs(1e-3, 0.1)
    for period in [1e-3, 9e-3] * 5 + [1e-3, 1e-3]:
        costs.observe_period(0, period)
    assert costs.period(0) == pytest.approx(5e-3)
    for period in [1e-3, 9e-3] * 5 + [0.2, 1e-3]:  # stray pauses do not price the bucket
        costs.observe_period(0, period)
    assert costs.period(0) == pytest.approx(5e-3)


def test_the_latest_periods_bound_a_bucket_s_cost_on_plain_decoding_s_side():
    """Plain periods read while the machine was busy, then fast ones: the window's median still says
    slow, but plain is priced at the latest periods; drafting periods that turned slow price drafting
    slow at once. Either way drafting is not made to look cheap by a change within the window."""
    from jaxspec.speculative.adaptive import PERIOD_WINDOW, RECENT_PERIODS

    costs = _costs(1e-3, 0.1)
    own0, own2 = costs.own_cost(0), costs.own_cost(2)
    for _ in range(PERIOD_WINDOW - RECENT_PERIODS):
        costs.observe_period(0, 0.9 * own0)  # busy
        costs.observe_period(2, 1.1 * own2)
    assert costs.step_cost(0) == pytest.approx(0.9 * own0)
    for _ in range(RECENT_PERIODS):
        costs.observe_period(0, 0.5 * own0)  # quiet again
        costs.observe_period(2, 1.6 * own2)  # drafting turned slow
    assert costs.period(0) == pytest.approx(0.9 * own0) and costs.period(2) == pytest.approx(1.1 * own2)
    assert costs.step_cost(0) == pytest.approx(0.5 * own0)
    assert costs.step_cost(2) == pytest.approx(1.6 * own2)
    # The other way round, the window's median stays the bound.
    other = _costs(1e-3, 0.1)
    for _ in range(PERIOD_WINDOW - RECENT_PERIODS):
        other.observe_period(0, 0.5 * own0)
    for _ in range(RECENT_PERIODS):
        other.observe_period(0, 0.9 * own0)
    assert other.step_cost(0) == pytest.approx(0.5 * own0)


def test_period_and_host_gap_follow_every_new_observation_after_being_read():
    """Their medians are kept between reads; a new period or gap is in the next read."""
    from jaxspec.speculative.adaptive import PERIOD_WINDOW

    costs = _costs(1e-3, 0.1)
    assert costs.period(2) is None and costs.host_gap() is None
    for _ in range(PERIOD_WINDOW):
        costs.observe_period(2, 4e-3)
        costs.observe_gap(1e-3)
    assert costs.period(2) == pytest.approx(4e-3) and costs.host_gap() == pytest.approx(1e-3)
    for _ in range(PERIOD_WINDOW):  # the window turns over: the old values are gone
        costs.observe_period(2, 6e-3)
        costs.observe_gap(2e-3)
    assert costs.period(2) == pytest.approx(6e-3) and costs.host_gap() == pytest.approx(2e-3)
    costs.observe_period(4, 1e-2)
    assert costs.period(2) == pytest.approx(6e-3) and costs.period(4) is None  # per bucket


def test_observed_costs_are_bounded_by_the_steps_own_times_on_the_side_of_plain_decoding():
    """Noise in the periods cannot make drafting look cheap: a plain step's cost is at most its own
    (waited for) time and a drafting step's at least its own."""
    from jaxspec.speculative.adaptive import MIN_PERIODS

    costs = _costs(1e-3, 0.1)
    own0, own2 = costs.own_cost(0), costs.own_cost(2)
    for _ in range(MIN_PERIODS):
        costs.observe_period(0, 1.6 * own0)
        costs.observe_period(2, 0.7 * own2)
    assert costs.period(0) == pytest.approx(1.6 * own0) and costs.period(2) == pytest.approx(0.7 * own2)
    assert costs.step_cost(0) == pytest.approx(own0)
    assert costs.step_cost(2) == pytest.approx(own2)
    costs = _costs(1e-3, 0.1)
    for _ in range(MIN_PERIODS):
        costs.observe_period(0, 0.5 * own0)
        costs.observe_period(2, 1.3 * own2)
    assert costs.step_cost(0) == pytest.approx(0.5 * own0)  # queued plain steps hide the host's work
    assert costs.step_cost(2) == pytest.approx(1.3 * own2)  # the host time drafting steps add


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
    assert sched.bucket_steps[0] > 150
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
    # "drafting must promise 30% more tokens per second than plain steps to turn it on ... 2% keeps it on"
    assert (policy.switch_gain, policy.min_gain) == (0.3, 0.02)
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "promise 30% more tokens per second than plain steps to turn it on" in readme
    assert "and 2% keeps it on" in readme
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
