"""Adaptive speculation length: acceptance estimates, step costs, and the choice of k.

Design. Every decode step runs all slots through one compiled draft loop and one
compiled verification, so the step's cost is set by the proposal length ``kb``
(a bucket from a small fixed set: 0, 1, 2, 4, ..., k_max), not by each slot's k.
Given the bucket, proposing fewer than kb tokens for a slot saves nothing, so
the policy picks the bucket that maximises the batch's expected tokens per second

    sum_s E(a_s, k_s(kb)) / (cost_draft(kb) + cost_verify(kb + 1)),
    E(a, k) = (1 - a^(k+1)) / (1 - a),   k_s(kb) = min(kb, cap_s),

which for one slot is exactly "maximise that request's tokens per unit time";
a_s is the slot's acceptance estimate, cap_s the tokens it can still use. kb = 0
(verify one token, skip the draft) wins whenever speculation would slow the
batch down. For an MoE target that happens at both ends: at batch 1, verifying
T tokens reads the weights of ~N(1 - (1 - top_k/N)^T) experts per layer instead
of top_k (qwen3-30b-a3b: ~57 of 128 for T = 9, against 8), so verification is
several times a plain step; at large batches every expert is read anyway but
compute (and the draft's KV reads) grow with kb, and verification is no longer
free. The sweet spot is in between, and measured costs find it per machine.

Costs are measured, not guessed: the runner times every compiled draft loop and
verification at warm-up (per compiled batch bucket), and the scheduler then
weighs the wall periods the steps actually take in serving (``CostModel.step_cost``):
a plain step queued behind the previous one hides the host's work, a drafting
step hides less of it, and a policy fed only device times drafts where plain is
faster. Warm-up's time of a drafting step (a call waited for, over a typical
span) also overstates what queued drafting steps take, so with speculation off
the scheduler runs short trials of each bucket (``SpecScheduler._trial_due``)
and the policy weighs a bucket seen in serving at its period (``tried``).
``CostModel.analytic`` is a roofline model (weight bytes read, with an MoE layer
reading the ``N * (1 - (1 - top_k/N)^T)`` experts that T tokens touch, plus FLOPs)
for planning and deterministic tests; the engine does not use it unless asked.

While kb = 0 nothing is learned about acceptance, so after ``probe_every``
steps off the smallest bucket is run once anyway to refresh the estimates; each
probe that does not turn speculation back on doubles the wait (up to
``max_probe_every``), so a draft that never pays costs almost nothing. A probe
costs more than its step: a draft model first catches up on every token it
skipped, for every slot in the batch (at 8 requests here about ten plain steps).
So the wait after a probe is also long enough that probing takes at most
``probe_budget`` of the time (``KPolicy.probe_cost``).
"""

from __future__ import annotations

import collections
import dataclasses
import statistics

import numpy as np

from jaxspec.config import ModelConfig

MIN_PERIODS = 3  # observed steps of a bucket before their periods are its cost
PERIOD_WINDOW = 32  # recent periods kept per bucket (CostModel.period)
RECENT_PERIODS = 8  # the latest periods, whose typical value also bounds a bucket's cost (step_cost)


def expected_tokens(alpha: np.ndarray | float, k: np.ndarray | int) -> np.ndarray:
    """Expected tokens a step emits with k drafts accepted i.i.d. with probability alpha."""
    alpha = np.clip(np.asarray(alpha, np.float64), 0.0, 1.0)
    k = np.asarray(k, np.float64)
    near_one = alpha > 1.0 - 1e-9
    safe = np.where(near_one, 0.5, alpha)
    return np.where(near_one, k + 1.0, (1.0 - safe ** (k + 1.0)) / (1.0 - safe))


def expected_experts_touched(num_tokens: int | float, num_experts: int, top_k: int) -> float:
    """Distinct experts T uniformly routed tokens reach in one layer: N (1 - (1 - k/N)^T)."""
    if num_experts <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)


def k_buckets(k_max: int, extra: tuple[int, ...] = ()) -> list[int]:
    """Proposal lengths with a compiled step: powers of two below k_max, k_max, and ``extra``."""
    out, b = set(), 1
    while b < k_max:
        out.add(b)
        b *= 2
    if k_max > 0:
        out.add(k_max)
    out.update(e for e in extra if 0 < e <= k_max)
    return sorted(out)


def bucket_for(k: int, buckets: list[int]) -> int:
    """The smallest bucket holding k proposals (0 for k <= 0)."""
    if k <= 0:
        return 0
    for b in buckets:
        if k <= b:
            return b
    raise ValueError(f"k={k} exceeds the largest bucket {buckets[-1] if buckets else 0}")


class AcceptanceEstimator:
    """Per-slot acceptance rate: Beta posterior over exponentially forgotten counts.

    A round with ``drafted`` proposals of which ``accepted`` were kept observed
    ``accepted`` successes and, if it stopped early, one failure (positions past
    the first rejection were never tested). New requests start from the
    engine-wide estimate (same rule, slower forgetting) as their prior.
    """

    # A strong prior (8 rounds): the policy drafts exactly when a slot's estimate is high, so with a
    # weak one a few lucky rounds start drafting that then loses (selection bias).
    def __init__(self, num_slots: int, prior_mean: float = 0.6, prior_strength: float = 8.0,
                 decay: float = 0.9, global_decay: float = 0.99):
        self.prior_mean, self.prior_strength = prior_mean, prior_strength
        self.decay, self.global_decay = decay, global_decay
        self.acc = np.zeros(num_slots)
        self.rej = np.zeros(num_slots)
        self.global_acc = 0.0
        self.global_rej = 0.0

    def reset(self, slot: int) -> None:
        self.acc[slot] = self.rej[slot] = 0.0

    def update(self, slot: int, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        rejected = 1.0 if accepted < drafted else 0.0
        self.acc[slot] = self.decay * self.acc[slot] + accepted
        self.rej[slot] = self.decay * self.rej[slot] + rejected
        self.global_acc = self.global_decay * self.global_acc + accepted
        self.global_rej = self.global_decay * self.global_rej + rejected

    def global_mean(self) -> float:
        n0 = self.prior_strength
        return (self.global_acc + self.prior_mean * n0) / (self.global_acc + self.global_rej + n0)

    def mean(self, slots: np.ndarray) -> np.ndarray:
        n0, m0 = self.prior_strength, self.global_mean()
        a, r = self.acc[slots], self.rej[slots]
        return (a + m0 * n0) / (a + r + n0)

    def lower(self, slots: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
        """One posterior standard deviation below ``mean`` (given, or computed): what the estimate
        promises at its low end."""
        n = self.acc[slots] + self.rej[slots] + self.prior_strength
        m = self.mean(slots) if mean is None else mean
        return np.clip(m - np.sqrt(m * (1.0 - m) / (n + 1.0)), 0.0, 1.0)


@dataclasses.dataclass
class CostModel:
    """Seconds per step for each proposal bucket (kb = 0: verification of one token, no draft).

    ``draft_s``/``verify_s`` are the steps' own (device) times. What the policy weighs is each
    bucket's wall period in serving, which differs: a plain step queued behind the one before hides
    the host's work on it, a queued drafting step less of it, one that waits for every token none.
    ``observe_period`` records the periods a scheduler measures between consecutive steps; a bucket
    with enough of them costs their typical value (``period``; at most a plain step's own time, at
    least a drafting step's), one without costs its own time plus the host time the
    observed drafting buckets showed above theirs (none seen yet: the larger of what other batch
    buckets showed, ``lent``, and the host's time between this bucket's steps, ``host_gap``)."""

    draft_s: dict[int, float]
    verify_s: dict[int, float]
    source: str = "measured"
    smoothing: float = 0.05  # weight of each observed step in the running refinement
    periods: dict[int, collections.deque] = dataclasses.field(default_factory=dict)
    # (plain_ratio, drafting_extra) seen at other batch buckets: used where this one has seen none yet.
    lent: tuple[float | None, float | None] = (None, None)
    gaps: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=PERIOD_WINDOW))
    # Medians kept until their window next changes: the policy weighs every bucket on every full choice.
    _medians: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def own_cost(self, kb: int) -> float:
        """The step's own time (draft + verification), without the host's work around it."""
        return self.draft_s.get(kb, 0.0) + self.verify_s[kb]

    def period(self, kb: int) -> float | None:
        """What a step of bucket kb costs in serving once enough were seen: the median over the
        window of the mean of each two consecutive periods. With steps queued, the host's work lands
        between every other pair of results, so periods alternate short and long and a step costs
        their mean; a median of single periods would take the short ones. The median over pairs
        keeps a stray pause (another process, a collection) from pricing the bucket."""
        return self._pair_median(kb, PERIOD_WINDOW)

    def recent_period(self, kb: int) -> float | None:
        """``period`` over the latest RECENT_PERIODS periods only."""
        return self._pair_median(kb, RECENT_PERIODS)

    def _pair_median(self, kb: int, last: int) -> float | None:
        key = kb if last == PERIOD_WINDOW else (kb, last)
        if key in self._medians:
            return self._medians[key]
        seen = self.periods.get(kb)
        if seen is None or len(seen) < MIN_PERIODS:
            value = None
        else:
            seen = list(seen)[-last:]
            value = statistics.median((a + b) / 2 for a, b in zip(seen, seen[1:]))
        self._medians[key] = value
        return value

    def step_cost(self, kb: int) -> float:
        observed = self.period(kb)
        own = self.own_cost(kb)
        if observed is not None:
            # Periods are noisy (another process, a collection, a burst of outputs); a queued plain
            # step costs no more than one waited for. A drafting step's own time is no floor: it was
            # timed at warm-up over a typical span, waited for, and queued drafting steps take less.
            # Where the machine's speed changed within the window, the latest periods win on the
            # side that keeps plain decoding: a plain period read while the machine was busy must
            # not make drafting look cheap once it is quiet again.
            recent = self.recent_period(kb)
            return min(observed, recent, own) if kb == 0 else max(observed, recent)
        lent_ratio, lent_extra = self.lent
        if kb == 0:
            return own * (lent_ratio if lent_ratio is not None else 1.0)
        extra = self.drafting_extra()
        if extra is None:
            # Nothing seen of drafting at this batch size: a drafting step, waited for, pays on top
            # of its own time the host's work between steps, which this bucket's steps showed
            # (``host_gap``); other batch sizes' drafting host time is lent where larger.
            extra = max((x for x in (lent_extra, self.host_gap()) if x is not None), default=0.0)
        return own + extra

    def observe_gap(self, seconds: float) -> None:
        """The host's time from a step's result to planning the next (outputs, admission, serving)."""
        self.gaps.append(seconds)
        self._medians.pop("gap", None)

    def host_gap(self) -> float | None:
        if "gap" not in self._medians:
            self._medians["gap"] = statistics.median(self.gaps) if len(self.gaps) >= MIN_PERIODS else None
        return self._medians["gap"]

    def plain_ratio(self) -> float | None:
        """Observed plain period over the plain step's own time (below 1 where steps queue)."""
        observed = self.period(0)
        return observed / self.own_cost(0) if observed is not None and self.own_cost(0) > 0 else None

    def drafting_extra(self) -> float | None:
        """Median host time the observed drafting buckets' periods showed above their own times."""
        extra = [p - self.own_cost(b) for b in self.periods if b > 0 and (p := self.period(b)) is not None]
        return statistics.median(extra) if extra else None

    def observe_period(self, kb: int, seconds: float) -> None:
        if kb in self.verify_s:
            self.periods.setdefault(kb, collections.deque(maxlen=PERIOD_WINDOW)).append(seconds)
            self._drop_medians(kb)

    def forget_periods(self, kb: int) -> None:
        """Drop bucket kb's observed periods (they are about to be measured afresh)."""
        self.periods.pop(kb, None)
        self._drop_medians(kb)

    def _drop_medians(self, kb: int) -> None:
        self._medians.pop(kb, None)
        self._medians.pop((kb, RECENT_PERIODS), None)

    def observe(self, kb: int, draft_s: float, verify_s: float) -> None:
        """Fold a step's measured times in (the machine may be busier than at warm-up)."""
        w = self.smoothing
        if kb in self.verify_s:
            self.verify_s[kb] = (1 - w) * self.verify_s[kb] + w * verify_s
            if kb > 0:
                self.draft_s[kb] = (1 - w) * self.draft_s.get(kb, draft_s) + w * draft_s

    def split(self, kb: int, step_s: float) -> tuple[float, float]:
        """(draft_s, verify_s) of a step whose draft and verification ran as one call, split as this
        model splits bucket kb."""
        total = self.own_cost(kb) if kb in self.verify_s else 0.0
        share = self.draft_s.get(kb, 0.0) / total if total > 0 else 0.0
        return share * step_s, (1.0 - share) * step_s

    def observe_total(self, kb: int, step_s: float) -> None:
        """Fold in a step whose draft and verification ran as one call."""
        self.observe(kb, *self.split(kb, step_s))

    def rows(self) -> list[tuple[int, float, float]]:
        return [(kb, self.draft_s.get(kb, 0.0), self.verify_s[kb]) for kb in sorted(self.verify_s)]

    @classmethod
    def analytic(cls, target: ModelConfig, draft: ModelConfig | None, num_slots: int, buckets: list[int],
                 context_len: int = 512, hw: "Roofline | None" = None) -> "CostModel":
        hw = hw or Roofline()
        verify = {kb: hw.forward_s(target, num_slots, kb + 1, context_len) for kb in [0, *buckets]}
        drafts = {0: 0.0}
        for kb in buckets:
            drafts[kb] = 0.0 if draft is None else (
                hw.forward_s(draft, num_slots, 2, context_len) + (kb - 1) * hw.forward_s(draft, num_slots, 1, context_len)
            )
        return cls(drafts, verify, source="analytic")


@dataclasses.dataclass(frozen=True)
class Roofline:
    """Time of one forward = launch overhead + max(bytes / bandwidth, flops / peak).
    Defaults are H100-like (bf16 weights); only relative costs matter to the policy."""

    bandwidth: float = 3.0e12  # bytes/s
    peak_flops: float = 4.0e14
    overhead_s: float = 3e-5
    bytes_per_param: int = 2

    def forward_s(self, cfg: ModelConfig, rows: int, tokens_per_row: int, context_len: int) -> float:
        n = rows * tokens_per_row
        d = cfg.d_model
        attn = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
        params_read = cfg.vocab_size * d  # lm head (the embedding lookup reads n rows only)
        flops = 2.0 * n * cfg.vocab_size * d
        for layer in range(cfg.num_layers):
            params_read += attn
            flops += 2.0 * n * attn + 4.0 * n * context_len * cfg.num_heads * cfg.head_dim
            if cfg.layer_is_moe(layer):
                expert = 3 * d * cfg.moe_mlp_dim
                touched = expected_experts_touched(n, cfg.num_experts, cfg.num_experts_per_tok)
                shared = 3 * d * cfg.shared_expert_mlp_dim
                params_read += touched * expert + shared + d * cfg.num_experts
                flops += 2.0 * n * (cfg.num_experts_per_tok * expert + shared)
            else:
                params_read += 3 * d * cfg.mlp_dim
                flops += 2.0 * n * 3 * d * cfg.mlp_dim
        kv_bytes = rows * context_len * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * self.bytes_per_param
        byte_count = params_read * self.bytes_per_param + kv_bytes
        return self.overhead_s + max(byte_count / self.bandwidth, flops / self.peak_flops)


class KPolicy:
    """Chooses each step's proposal bucket (module docstring)."""

    def __init__(self, buckets: list[int], probe_every: int = 16, min_gain: float = 0.02,
                 max_probe_every: int = 512, switch_gain: float = 0.3, probe_budget: float = 0.01,
                 max_budget_wait: int = 4096, tried_gain: float = 0.05):
        self.buckets = list(buckets)
        self.probe_every = probe_every
        self.max_probe_every = max(max_probe_every, probe_every)
        # Share of the time probes may take while speculation stays off, and the longest wait that
        # budget may impose (a change in the traffic is still noticed within that many steps).
        self.probe_budget = probe_budget
        self.max_budget_wait = max(max_budget_wait, self.max_probe_every)
        self._budget_wait = 0  # steps off after a probe that keep probing within the budget
        self.min_gain = min_gain  # a longer bucket must beat a shorter one by this much (timing noise)
        # With speculation off, drafting must beat plain steps by this much to turn it on: a switch
        # costs what the step rates do not show (the draft catches up on the tokens it missed for
        # every slot, a queued step is waited for; requests that finished together start finishing,
        # and are replaced, one by one), and the acceptance it is weighed at comes from a few probe
        # tokens. Measured on the built-in pair at 8 requests: predicted 25% over plain, realised 5%
        # on its steps and a loss end to end.
        self.switch_gain = switch_gain
        # A bucket whose steps were seen in serving (``tried``: a trial run, ``SpecScheduler``) is
        # weighed at its observed period, which holds the switch's hidden costs but the catch-up:
        # it turns speculation on at this smaller margin, from any bucket, at the mean acceptance.
        self.tried_gain = tried_gain
        self._last_kb = 0  # the last choice's bucket (0: off)
        self._off_steps = 0
        self._wait = probe_every  # steps off before the next probe (doubles while probes fail)
        self._probed = False
        self.last_rates: dict[int, float] = {}
    def choose(self, alphas: np.ndarray, caps: np.ndarray, forced: np.ndarray, cost: CostModel,
               blocked: frozenset[int] = frozenset(), cautious: np.ndarray | None = None,
               tried: frozenset[int] = frozenset()) -> int:
        """alphas/caps/forced per active slot (forced < 0: free). ``blocked``: buckets whose steps
        have realised fewer tokens/s than plain steps (left out, except as a probe). ``cautious``:
        acceptance at the low end of its estimate (``AcceptanceEstimator.lower``), weighed instead
        of ``alphas`` while speculation is off: turning it on must pay even there, since the
        estimate then rests on a few probe tokens and is highest exactly when it says to switch.
        ``tried``: buckets whose cost is their observed period in serving (``tried_gain``).
        Returns kb."""
        weighed = cautious if cautious is not None and not self.drafting else alphas
        forced_k = np.minimum(forced, caps)
        floor = bucket_for(int(forced_k.max(initial=0)), self.buckets)
        free = forced < 0
        best_kb, best_rate = None, -1.0
        # Acceptance is known at the positions drafted so far (a probe drafts one bucket[0]), and real
        # drafts agree less the further they guess: the i.i.d. estimate from short steps overstates
        # long ones. So drafting turns on at the smallest bucket and climbs one bucket per choice,
        # each bucket then proving itself in the steps it runs (``SpecScheduler._blocked``); a
        # bucket already tried in serving is reachable at once.
        reach = self.buckets[0] if self._last_kb == 0 else self._above(self._last_kb)
        candidates = [kb for kb in [0, *self.buckets]
                      if (floor <= kb <= max(reach, floor) or kb in tried) and (kb not in blocked or kb == floor)]
        # Every candidate bucket at once ([buckets, slots]): this runs on every decode step.
        kbs = np.asarray(candidates)[:, None]
        k = np.where(free[None, :], np.minimum(kbs, caps[None, :]), forced_k[None, :])
        tokens = expected_tokens(np.broadcast_to(weighed, k.shape), k).sum(axis=1)
        if weighed is not alphas and tried:
            at_mean = expected_tokens(np.broadcast_to(alphas, k.shape), k).sum(axis=1)
            tokens = np.where(np.isin(candidates, list(tried)), at_mean, tokens)
        self.last_rates = {}
        for kb, expected in zip(candidates, tokens.tolist()):
            rate = expected / cost.step_cost(kb)
            self.last_rates[kb] = rate
            if best_kb == 0 and not self.drafting:
                gain = self.tried_gain if kb in tried else self.switch_gain
            else:
                gain = self.min_gain
            if best_kb is None or rate > best_rate * (1.0 + gain):
                best_kb, best_rate = kb, rate
        self._last_kb = best_kb
        if best_kb == 0:
            return self.off_step(caps, forced)
        self._off_steps = 0
        self._wait, self._probed = self.probe_every, False
        return best_kb

    @property
    def drafting(self) -> bool:
        """Whether the last choice drafted (a probe is not a choice)."""
        return self._last_kb != 0

    def _above(self, kb: int) -> int:
        """The bucket after kb (the largest for the largest)."""
        return next((b for b in self.buckets if b > kb), self.buckets[-1])

    @property
    def probing(self) -> bool:
        """Whether the bucket this policy last returned is a probe's."""
        return self._probed

    def can_probe(self, caps: np.ndarray, forced: np.ndarray) -> bool:
        """Whether a step with speculation off could run a probe: a free slot that can use a draft."""
        free = forced < 0
        return bool(self.buckets) and bool(free.any()) and bool((caps[free] > 0).any())

    def off_step(self, caps: np.ndarray, forced: np.ndarray) -> int:
        """A step for which kb = 0 was chosen: 0, or the smallest bucket when a probe is due (the wait
        doubles after each probe that did not turn speculation back on). A step in which no free slot
        could use a draft neither counts towards the next probe nor restarts the count: with prompt
        lookup, steps whose lookups find nothing come and go."""
        if not self.can_probe(caps, forced):
            return 0
        return self.tick()

    def probe_cost(self, probe_s: float, plain_s: float) -> None:
        """A probe (or a switch to drafting) took ``probe_s`` of wall time where a plain step takes
        ``plain_s``: later probes wait long enough that the extra stays within ``probe_budget``."""
        if plain_s > 0 and self.probe_budget > 0:
            extra = max(probe_s - plain_s, 0.0)
            self._budget_wait = min(int(np.ceil(extra / (self.probe_budget * plain_s))), self.max_budget_wait)

    def tick(self) -> int:
        """``off_step`` for a step known to be able to probe (``can_probe``)."""
        if self._probed:
            self._wait = max(min(2 * self._wait, self.max_probe_every), self._budget_wait)
            self._probed = False
        self._off_steps += 1
        if self._off_steps >= self._wait:
            self._off_steps = 0
            self._probed = True
            return self.buckets[0]
        return 0
