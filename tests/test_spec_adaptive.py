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
    assert "an untried length is reached from the smallest one up, at most one length per step" in readme


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
    assert "one not tried 30%, at one standard deviation below the estimate" in readme


def test_a_bucket_tried_in_serving_turns_drafting_on_at_a_small_gain_at_the_mean_acceptance():
    """A bucket whose cost is its period in serving (``tried``) needs ``tried_gain`` over plain steps,
    weighed at the mean acceptance, and is reachable past the smallest bucket; an untried one needs
    ``switch_gain`` at the cautious acceptance and is reached from the smallest up."""
    costs = CostModel({0: 0.0, 1: 0.0, 2: 0.0}, {0: 1e-2, 1: 1e-2 * 1.5, 2: 1.96 / 118})  # 2: 18% over plain at 0.6
    caps, free = np.full(1, 8), np.full(1, -1)
    mean, low = np.full(1, 0.6), np.full(1, 0.45)
    assert KPolicy([1, 2]).choose(mean, caps, free, costs, cautious=low) == 0
    assert KPolicy([1, 2]).choose(mean, caps, free, costs, cautious=low, tried=frozenset({2})) == 2
    # Tried: weighed at the mean (at the cautious 0.45 it would not beat plain steps at all).
    assert KPolicy([1, 2], tried_gain=0.1).choose(mean, caps, free, costs, cautious=low, tried=frozenset({2})) == 2
    assert KPolicy([1, 2], tried_gain=0.2).choose(mean, caps, free, costs, cautious=low, tried=frozenset({2})) == 0
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "a length tried in serving must promise 5% more tokens per second" in readme
    assert KPolicy([1]).tried_gain == 0.05


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


def test_observed_costs_bound_plain_by_its_own_time_and_take_drafting_periods_as_seen():
    """A plain step's cost is at most its own (waited for) time; a drafting bucket seen in serving
    costs its period, below warm-up's own time where queued steps hide the host's work."""
    from jaxspec.speculative.adaptive import MIN_PERIODS

    costs = _costs(1e-3, 0.1)
    own0, own2 = costs.own_cost(0), costs.own_cost(2)
    for _ in range(MIN_PERIODS):
        costs.observe_period(0, 1.6 * own0)
        costs.observe_period(2, 0.7 * own2)
    assert costs.period(0) == pytest.approx(1.6 * own0) and costs.period(2) == pytest.approx(0.7 * own2)
    assert costs.step_cost(0) == pytest.approx(own0)
    assert costs.step_cost(2) == pytest.approx(0.7 * own2)
    costs = _costs(1e-3, 0.1)
    for _ in range(MIN_PERIODS):
        costs.observe_period(0, 0.5 * own0)
        costs.observe_period(2, 1.3 * own2)
    assert costs.step_cost(0) == pytest.approx(0.5 * own0)  # queued plain steps hide the host's work
    assert costs.step_cost(2) == pytest.approx(1.3 * own2)  # the host time drafting steps add
