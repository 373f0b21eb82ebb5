"""``SpeculativeRunner``: the engine's ``StepRunner`` for draft-then-verify decoding.

One decode step for every active slot s (context of L+1 tokens; the last one,
t0, not yet in the target's cache; g tokens generated so far):

  1. choose k_s (fixed, per-request override, or adaptive) and the step's
     proposal length kb = the smallest compiled bucket >= max k_s;
  2. the proposer drafts d_0..d_{kb-1} (q's for sampled drafts);
  3. one target forward over [t0, d_0..d_{kb-1}] at positions L..L+kb with
     num_valid = k_s + 1 (``ModelRunner.forward_fn``), p = ``logits_to_probs``
     with the request's own settings, and the acceptance rule of ``verify``;
  4. the target cache is rolled back to the accepted length (L + 1 + a_s), the
     proposer catches up, and the slot gets its a_s accepted drafts plus one
     target token.

Steps run over the active slots packed into a compiled batch bucket and attend over a
compiled span holding their contexts; with T = kb + 1 static per proposal bucket, a
changing mix of k, batch size, context length, greedy and sampled requests never
recompiles; ``warmup`` compiles every (rows, span, kb) bucket.
With k = 0 for every slot the step is plain decoding: it runs the target's own
decode step (``ModelRunner.decode_tokens``: no verification work, so an adaptive
policy that turns speculation off pays what ``PlainRunner`` pays), which draws the
same (seed, position, PURPOSE_TARGET) token a kb = 0 verification would.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections import Counter

import jax
import numpy as np

from jaxspec.engine.model_runner import ModelRunner, scatter_rows, scatter_sampling
from jaxspec.engine.request import InvalidRequestError, Request
from jaxspec.engine.slots import SlotTable
from jaxspec.engine.step import DecodePlan, PrefillChunk, QueuedStep, StepResult
from jaxspec.sampling import BatchSampling
from jaxspec.speculative.adaptive import CostModel, KPolicy, k_buckets
from jaxspec.speculative.compiled import CompiledSteps
from jaxspec.speculative.draft_model import DraftModelProposer
from jaxspec.speculative.proposer import NoProposer, Proposer, SpecContext, TokenHistory
from jaxspec.speculative.scheduling import SpecScheduler
from jaxspec.speculative.verify import get_backend

AUTO = "auto"


@dataclasses.dataclass(eq=False)
class _DraftHandle:
    """A queued fused drafting step: its rows and settings (a chained step reuses them), the
    furthest any slot's start can be (``reach``: kv-span bucket of the steps behind it), and its
    device outputs."""

    rows: np.ndarray  # [n] the stepped slots
    row_slots: np.ndarray  # [B] slot of each batch row
    where: np.ndarray  # [n] row of each stepped slot
    active: np.ndarray  # [B]
    sampling: BatchSampling  # [B] rows
    kb: int
    reach: int
    packed: jax.Array  # [B, kb + 2] tokens, then the accepted count
    carry: jax.Array  # [B, step_fns.CARRY_WIDTH]
    load: jax.Array
    num_draft: np.ndarray  # [B]
    released: set = dataclasses.field(default_factory=set)
    chunk_token: jax.Array | None = None  # [1]: a prompt chunk prefilled in the same call, its token


class SpeculativeRunner(CompiledSteps):
    """Draft-then-verify decoding over a target ``ModelRunner`` and a ``Proposer``."""

    speculative = True

    def __init__(
        self,
        target: ModelRunner,
        proposer: Proposer | None = None,
        num_speculative_tokens: int | str = AUTO,
        k_max: int = 8,
        verify_backend: str = "xla",
        cost_model: CostModel | None = None,
        measure_reps: int = 7,
        probe_every: int = 16,
        profile: bool = False,
        fuse: bool = True,
    ):
        """``num_speculative_tokens``: a fixed k for every request, or "auto" (adaptive,
        the default). ``k_max`` bounds k everywhere, including per-request overrides.
        ``cost_model``: costs for the adaptive policy (default: measured at warm-up,
        or before the first adaptive step). ``profile``: wait for the draft before
        verifying, so the step's time splits into drafting and verification (a host sync per
        step; off when serving: the draft's time is then only its dispatch). ``fuse``: run a
        single-device draft model's loop, or an EAGLE-3 head's round and absorb (on one device or
        a mesh alike), inside the verification step, one call per step."""
        self.target = target
        self.cfg = target.cfg
        self.num_slots = target.num_slots
        self.max_len = target.max_len
        self.proposer: Proposer = proposer if proposer is not None else NoProposer()
        if target.placement is not None and hasattr(self.proposer, "use_placement"):
            self.proposer.use_placement(target.placement, self.num_slots, self.max_len)
        self.proposer.attach(self.cfg, self.num_slots, self.max_len, target.paging)
        # A proposer that reads the target's hidden states (EAGLE-3) gets every step's features.
        self.feature_layers = tuple(getattr(self.proposer, "feature_layers", None) or ())
        if self.feature_layers:
            target.capture_hidden(self.feature_layers)
        if isinstance(self.proposer, NoProposer):
            k_max, num_speculative_tokens = 0, 0
        if k_max < 0:
            raise ValueError(f"k_max must be >= 0, got {k_max}")
        self.adaptive = num_speculative_tokens == AUTO
        if not self.adaptive:
            k = int(num_speculative_tokens)
            if not 0 <= k <= k_max:
                raise ValueError(f"num_speculative_tokens must be 'auto' or in [0, k_max={k_max}], got {k}")
            self.default_k = k
        self.k_max = k_max
        self.buckets = k_buckets(k_max, extra=() if self.adaptive else (self.default_k,))
        get_backend(verify_backend)  # fail now on an unknown backend, not at the first step
        self.verify_backend = verify_backend
        self.measure_reps = measure_reps
        self.profile = profile
        self.history = TokenHistory(self.num_slots, self.max_len + k_max + 1)
        # The choice of k per step is the scheduler's: the engine plans with this, the runner executes.
        self.spec = SpecScheduler(self.num_slots, self.buckets, k_max, None if self.adaptive else self.default_k,
                                  rows_for=lambda n: len(self.target.row_layout(np.arange(n))[0]),
                                  measure=lambda rows: self.measure_costs(self.measure_reps, rows),
                                  cost_model=cost_model, probe_every=probe_every,
                                  would_propose=None if self.proposer.always_proposes else
                                  lambda slots: self.proposer.would_propose(self.history, slots),
                                  probe_one_slot=self.proposer.catches_up)
        self._verify_fns: dict[tuple[int, bool, int], object] = {}
        # A single-device model drafter runs inside the verification step (one call per step).
        self.fused = (fuse and isinstance(self.proposer, DraftModelProposer) and target.placement is None
                      and self.proposer.placement is None and target.compact_rows and self.proposer.compact_rows)
        self._fused_fns: dict[tuple[int, int], object] = {}
        self._queued: list[_DraftHandle] = []  # drafting steps dispatched and not collected yet
        # An EAGLE-3 head likewise (on a mesh too): its round, the verification and its absorb in one call.
        self.fused_head = fuse and bool(self.feature_layers) and hasattr(self.proposer, "round_fns")

    # ------------------------------------------------------------------ StepRunner
    @property
    def max_prefill_rows(self) -> int:
        return self.target.prefill_row_buckets[-1]

    def prefill(self, slot: int, request: Request, slots: SlotTable) -> int:
        chunk = PrefillChunk(slot, request, request.num_cached_tokens, len(request.prompt_ids))
        return self.prefill_batch([chunk], slots)[0]

    def padded_length(self, prompt_len: int) -> int:
        return self.target.bucket_for(prompt_len)

    def expert_load_snapshot(self) -> np.ndarray:
        return self.target.expert_load_snapshot()

    def device_info(self) -> tuple[str, tuple[str, ...], dict[str, int]]:
        return self.target.device_info()

    def paging(self) -> tuple[int, int, int] | None:
        return self.target.paging

    @property
    def reuses_prefix(self) -> bool:
        return self.proposer.reuses_prefix

    @property
    def prefix_key_tokens(self) -> int:
        return self.proposer.prefix_key_tokens

    @property
    def lookahead(self) -> int:
        """Positions past a request's last token a step may write (verification of k_max drafts, or
        a plain call's steps)."""
        return max(self.k_max, self.decode_steps - 1)

    @property
    def decode_steps(self) -> int:
        """Plain steps (speculation off) run several to a call where they are queued (``pipelined``)."""
        return self.target.max_decode_steps if self.pipelined else 1

    def assign_pages(self, slot: int, pages: list[int]) -> None:
        self.target.assign_pages(slot, pages)
        if self.target.paging is not None:
            self.proposer.set_pages(slot, pages)

    @property
    def prefill_chunk(self) -> int | None:
        return self.target.prefill_chunk

    @staticmethod
    def _check_override(chunk: PrefillChunk) -> None:
        override = chunk.request.num_speculative_tokens
        if override is not None and override < 0:
            raise InvalidRequestError("num_speculative_tokens", f"must be >= 0, got {override}")

    def prefill_batch(self, chunks: list[PrefillChunk], slots: SlotTable) -> list[int]:
        for c in chunks:
            self._check_override(c)
        idx = np.array([c.slot for c in chunks])
        firsts = self.target.prefill_many(idx, [c.request.prompt_ids[: c.end] for c in chunks], slots.sampling(idx),
                                          [c.start for c in chunks])
        for c, first in zip(chunks, firsts):
            self.proposer.prefill(c.slot, c.request.prompt_ids[: c.end], c.start)
            if c.last:
                self.history.start(c.slot, [*c.request.prompt_ids, first])
        if self.feature_layers:
            # The features of each chunk's positions start..end-1, each followed by the next token
            # (the prompt's, then the sampled first token after the prompt's last position).
            feats = self.target.captured
            rows, width = feats.shape[0], feats.shape[1]
            tokens = np.zeros((rows, width), np.int32)
            start, count = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
            for i, (c, first) in enumerate(zip(chunks, firsts)):
                nxt = [*c.request.prompt_ids, first][c.start + 1: c.end + 1]
                tokens[i, : len(nxt)] = nxt
                start[i], count[i] = c.start, len(nxt)
            row_slots = np.full(rows, self.num_slots, np.int32)
            row_slots[: len(chunks)] = idx
            # After a cached prefix or a chunk: the whole context, as the target prefills there (one span).
            self.proposer.observe(row_slots, tokens, feats, start, count,
                                  self.proposer.kv_bucket_for(self.max_len) if start.any() else None)
        return firsts

    def resume(self, slot: int, last_token: int) -> None:
        """``slot``'s context was prefilled again after a preemption: its next step feeds
        ``last_token`` (the output token it had), not the token that prefill sampled."""
        at = int(self.history.length[slot]) - 1
        if 0 <= at < self.history.capacity:
            self.history.tokens[slot, at] = last_token

    def release(self, slot: int) -> None:
        for h in self._queued:  # a step queued over it: its outcome is not this slot's any more
            if slot in h.rows:
                h.released.add(slot)
        self.target.set_length(slot, 0)
        self.proposer.release(slot)
        self.history.clear(slot)

    def warmup(self) -> None:
        """Compile prefill, every draft loop and verification (rows x span x k buckets); measure
        costs per batch bucket if adaptive."""
        # Fused with an EAGLE-3 head every step, k = 0 included, is the runner's own: the target's
        # plain decode steps never run.
        self.target.warmup(decode=not self.fused_head)
        if self.fused:
            self.proposer.warmup(self.buckets, loops=False)
        elif self.feature_layers:
            # The head's absorbs of prefills and of what follows a cached prefix or an earlier
            # chunk (the widths the target prefills there); fused, its rounds and other absorbs
            # run in the steps.
            self.proposer.warmup(self.buckets, self.target.batch_buckets, drafts=not self.fused_head,
                                 chunk_widths=self.target.offset_prefill_widths)
        else:
            self.proposer.warmup(self.buckets, self.target.batch_buckets)
        for rows in self.target.batch_buckets:
            for kv_len in self.target.kv_buckets:
                for kb in [0, *self.buckets] if self.fused_head else self.buckets:
                    self._dummy_step(kb, rows, kv_len)
            if self.fused and self.target.mixed_length is not None:  # drafting steps that carry a chunk
                for kb in self.buckets:
                    if kb:
                        self._dummy_step(kb, rows, self.max_len, chunk=True)
        if self.adaptive and self.spec.cost_model is None:
            for rows in self.target.batch_buckets:
                self.spec.cost_models[rows] = self.measure_costs(self.measure_reps, rows)

    def measure_costs(self, reps: int = 5, rows: int | None = None) -> CostModel:
        """Median seconds of each compiled draft loop and verification over ``rows`` rows (default:
        every slot), attending over the middle compiled span (a typical context). The buckets are
        timed in turns, so a load change on a shared machine shifts them together and the policy,
        which compares them, is not misled by when each one happened to be timed."""
        rows = rows or self.target.batch_buckets[-1]
        kv_len = self.target.kv_buckets[len(self.target.kv_buckets) // 2]
        kbs = [0, *self.buckets]
        draft_s: dict[int, float] = {}
        for kb in kbs:
            if self.fused or self.fused_head or kb == 0:  # a fused step's time holds its draft
                draft_s[kb] = 0.0
            else:
                draft_s[kb] = self.proposer.measure(kb, reps, rows, kv_len)
            self._dummy_step(kb, rows, kv_len, live=True)  # compile / warm
        times: dict[int, list[float]] = {kb: [] for kb in kbs}
        for _ in range(reps):
            for kb in kbs:
                t = time.perf_counter()
                self._dummy_step(kb, rows, kv_len, live=True)
                times[kb].append(time.perf_counter() - t)
        return CostModel(draft_s, {kb: statistics.median(times[kb]) for kb in kbs}, source="measured")

    def costs_for(self, rows: int) -> CostModel:
        """The adaptive policy's costs at a batch bucket (the given model, else measured ones)."""
        return self.spec.costs_for(rows)

    # The scheduler's speculation settings, reachable from the runner for the CLI and tools.
    def speculation(self) -> SpecScheduler:
        return self.spec

    def moe_dispatch(self):
        """The target's MoE dispatch (a backend name, a measured table, or None: the config's)."""
        return self.target.moe_backend

    def attention_backend(self) -> str:
        """The target's attention backend (``layers.ATTENTION_BACKENDS``)."""
        return self.target.statics.attention_backend

    def matmul_backend(self) -> str:
        """The target's dense projections' backend (``dense_cpu.MATMUL_BACKENDS``)."""
        return self.target.statics.matmul_backend

    @property
    def cost_model(self) -> CostModel | None:
        return self.spec.cost_model

    @cost_model.setter
    def cost_model(self, model: CostModel | None) -> None:
        self.spec.cost_model = model

    @property
    def policy(self) -> KPolicy:
        return self.spec.policy

    @policy.setter
    def policy(self, policy: KPolicy) -> None:
        self.spec.policy = policy

    @property
    def cost_models(self) -> dict[int, CostModel]:
        return self.spec.cost_models

    @property
    def bucket_steps(self) -> Counter:
        return self.spec.bucket_steps

    @property
    def mixes_prefill(self) -> bool:
        return not self.feature_layers and self.target.mixed_length is not None

    def prefill_with_decode(self, chunk: PrefillChunk, slots: SlotTable, plan: DecodePlan
                            ) -> tuple[int, StepResult] | None:
        """A full chunk of a long prompt prefilled in the same target forward as this step: a plain
        step's (``ModelRunner.prefill_with_decode``) or a fused draft model's drafting step's
        verification (``step_fns.make_verify_mixed``), so the target's experts are read once for
        both. The draft model prefills the chunk into its own cache in a call of its own (it is
        small). None (nothing ran): an EAGLE-3 head, an unfused drafter, or a chunk or runner that
        does not mix (``ModelRunner.mixed_length``)."""
        t = self.target
        if (not self.mixes_prefill or t.bucket_for(chunk.end - chunk.start) != t.mixed_length
                or (plan.kb > 0 and not self.fused)):
            return None
        self._check_override(chunk)
        prompt = chunk.request.prompt_ids[: chunk.end]
        p_sampling = slots.sampling(np.array([chunk.slot]))
        act = plan.slots
        t0 = time.perf_counter()
        if plan.kb == 0:
            first, tokens = t.prefill_with_decode(chunk.slot, prompt, chunk.start, p_sampling, act,
                                                  self.history.last()[act], slots.sampling(act),
                                                  slots.num_generated[act])
            for s, token in zip(act.tolist(), tokens.tolist()):
                self.history.append(s, token)
            result = StepResult.plain(act, tokens, time.perf_counter() - t0)
        else:
            queued = self._dispatch_drafting(slots, plan, None, t.mixed_chunk(chunk.slot, prompt, chunk.start, p_sampling))
            result = self._collect_drafting(queued, queued.handle, overlapped=False)
            first = int(np.asarray(queued.handle.chunk_token)[0])
            t.set_lengths_host(np.array([chunk.slot]), np.array([chunk.end], np.int32))
        self.proposer.prefill(chunk.slot, prompt, chunk.start)
        if chunk.last:
            self.history.start(chunk.slot, [*chunk.request.prompt_ids, first])
        return first, result

    def decode(self, slots: SlotTable, plan: DecodePlan) -> StepResult:
        act = plan.slots
        n = len(act)
        if n == 0:
            return StepResult.plain(act, np.zeros(0, np.int32))
        k, kb = plan.k, plan.kb
        if (kb == 0 and not self.feature_layers) or (kb > 0 and self.fused):
            # Nothing to propose: the target's own decode step and only the bookkeeping it needs, so
            # that an adaptive policy that turns speculation off pays what ``PlainRunner`` pays. A
            # fused draft model's step is one call, queued and collected at once.
            return self.collect(self.dispatch(slots, plan), overlapped=False)
        out_pos = slots.num_generated[act].astype(np.int32)
        sampling = slots.sampling(act)
        row_slots, where = self.target.row_layout(act)  # batch rows; the row of each active slot
        b = len(row_slots)
        active = scatter_rows(np.ones(n, bool), where, b, False)
        ctx = SpecContext(self.history, active, scatter_rows(k, where, b, 0), kb, scatter_sampling(sampling, where, b),
                          scatter_rows(out_pos, where, b, 0), slots=row_slots)
        last = self.history.last()[act]
        t0 = time.perf_counter()
        proposal = None
        kb_run = kb
        if self.fused_head:
            return self._fused_head_decode(ctx, act, where, row_slots, last, t0)
        if kb > 0:
            proposal = self.proposer.propose(ctx)
            if self.proposer.deterministic and not proposal.num_draft.any():
                kb_run = 0  # no lookup found anything: a plain step instead of an empty verification
            if self.profile:
                jax.block_until_ready(proposal.tokens)
        t1 = time.perf_counter()
        if kb_run == 0:
            # Nothing drafted: the target's own decode step (one token, no verification work);
            # it draws the same (seed, position, PURPOSE_TARGET) token a kb = 0 verification would.
            out_tokens = self.target.decode_rows(act, last, sampling, out_pos)[:, None]
            accepted = np.zeros(n, np.int32)
            if self.feature_layers:
                start = (self.history.length[act] - 1).astype(np.int32)
                self.proposer.observe(row_slots, scatter_rows(out_tokens, where, b, 0), self.target.captured,
                                      self.target.row_starts(row_slots, where, start),
                                      scatter_rows(np.ones(n, np.int32), where, b, 0))
        else:
            start = (self.history.length[act] - 1).astype(np.int32)
            kv_len = self.target.kv_bucket_for(int(start.max()) + kb_run + 1)
            out_tokens, accepted, load = self._run_verify(
                kb_run, self.proposer.deterministic, kv_len, row_slots, scatter_rows(last, where, b, 0),
                self.target.row_starts(row_slots, where, start), proposal.tokens, proposal.probs, proposal.num_draft, ctx.sampling,
                ctx.out_pos, active,
            )
            out_tokens, accepted = np.asarray(out_tokens), np.asarray(accepted)
            if self.feature_layers:  # t0 and the accepted drafts, each followed by the next kept token
                self.proposer.observe(row_slots, out_tokens, self.target.captured,
                                      self.target.row_starts(row_slots, where, start),
                                      np.where(active, accepted + 1, 0))
            out_tokens, accepted = out_tokens[where], accepted[where]
            self.target.set_lengths_host(act, start + 1 + accepted)
            self.target.add_expert_load(load)
        t2 = time.perf_counter()
        if kb > 0:
            self.proposer.commit(ctx, proposal, scatter_rows(accepted, where, b, 0))
        drafted = proposal.num_draft[where] if proposal is not None and kb_run > 0 else np.zeros(n, np.int32)
        return StepResult(act, self._extend_history(act, out_tokens, accepted), np.asarray(drafted, np.int32),
                          np.asarray(accepted, np.int32), kb_run, t1 - t0, t2 - t1)

    @property
    def pipelined(self) -> bool:
        """Steps planned without proposals can be queued before the previous one is collected
        (``dispatch``); not with an EAGLE-3 head, which absorbs every step's hidden states."""
        return not self.feature_layers and self.target.can_chain

    @property
    def queues_drafting(self) -> bool:
        """Drafting steps are queued too (a fused single-device draft model): a step over the same
        slots takes its inputs from the one before on the device (its carry)."""
        return self.fused and self.pipelined

    def dispatch(self, slots: SlotTable, plan: DecodePlan, after: QueuedStep | None = None) -> QueuedStep:
        """Queue a step; ``after``: the step of the same kind (plain, or drafting) queued just before
        over the same slots and not collected yet, whose outputs (still on the device) feed this one."""
        prev = None if after is None else after.handle
        if plan.kb == 0 and not self.feature_layers and not isinstance(prev, _DraftHandle):
            last = self.history.last()[plan.slots] if after is None else None  # chained: fed on the device
            return self.target.queue_step(slots, plan, last, after)
        if plan.kb == 0 or not self.fused or (prev is not None and not (isinstance(prev, _DraftHandle)
                                                                         and self.queues_drafting)):
            raise ValueError("queued steps are plain steps, or drafting steps of a fused single-device draft "
                             "model, each chained only behind its own kind")
        return self._dispatch_drafting(slots, plan, prev)

    def _dispatch_drafting(self, slots: SlotTable, plan: DecodePlan, prev: "_DraftHandle | None",
                           chunk: tuple = ()) -> QueuedStep:
        """Queue a fused drafting step (behind ``prev``, or from the host's state); ``chunk``: a prompt
        chunk's inputs prefilled in its target forward (whole context span; never chained)."""
        t0 = time.perf_counter()
        act, kb = plan.slots, plan.kb
        if prev is None:
            out_pos = slots.num_generated[act].astype(np.int32)
            row_slots, where = self.target.row_layout(act)  # batch rows; the row of each active slot
            b = len(row_slots)
            active = scatter_rows(np.ones(len(act), bool), where, b, False)
            sampling = scatter_sampling(slots.sampling(act), where, b)
            ctx = SpecContext(self.history, active, scatter_rows(plan.k, where, b, 0), kb, sampling,
                              scatter_rows(out_pos, where, b, 0), slots=row_slots)
            block, pending, d_lengths = self.proposer.prepare(ctx, record=False)
            start = (self.history.length[act] - 1).astype(np.int32)
            carry = self._carry(block, pending, d_lengths, scatter_rows(self.history.last()[act], where, b, 0),
                                self.target.row_starts(row_slots, where, start), ctx.out_pos)
            reach = int(start.max())
            self._queued = []
        else:
            if not np.array_equal(prev.rows, act):
                raise ValueError("a chained drafting step runs over the slots of the step before it")
            row_slots, where, active, sampling, carry = prev.row_slots, prev.where, prev.active, prev.sampling, prev.carry
            reach = prev.reach + prev.kb + 1  # each slot's start moved by at most the step before's kb + 1
        num_draft = scatter_rows(plan.k, where, len(row_slots), 0).astype(np.int32)
        # A chunk attends over the whole context: one span for both (as ``mixed_step``).
        kv_len = self.max_len if chunk else self.target.kv_bucket_for(reach + kb + 1)
        packed, carry, load, first = self._run_fused(kb, kv_len, row_slots, carry, num_draft, sampling, active, chunk)
        handle = _DraftHandle(act, row_slots, where, active, sampling, kb, reach, packed, carry, load, num_draft,
                              chunk_token=first)
        self._queued.append(handle)
        return QueuedStep(plan, handle, t0)

    def collect(self, queued: QueuedStep, overlapped: bool = True) -> StepResult:
        h = queued.handle
        if isinstance(h, _DraftHandle):
            return self._collect_drafting(queued, h, overlapped)
        result = self.target.collect_step(queued, overlapped)
        for s, tokens in zip(result.slots.tolist(), result.tokens):
            self.history.extend(s, tokens)
        return result

    def _collect_drafting(self, queued: QueuedStep, h: "_DraftHandle", overlapped: bool) -> StepResult:
        """Wait for a queued drafting step and bring the host's lengths and history in line (slots
        released since it was queued keep their fresh state)."""
        packed = np.asarray(h.packed)  # the step's one device->host transfer
        if h in self._queued:
            self._queued.remove(h)
        act, kb = h.rows, h.kb
        out_tokens, accepted = packed[h.where, : kb + 1], packed[h.where, kb + 1]
        keep = np.array([s not in h.released for s in act.tolist()], bool)
        start = (self.history.length[act] - 1).astype(np.int32)  # the collects before brought it here
        self.target.set_lengths_host(act[keep], (start + 1 + accepted)[keep])
        self.target.add_expert_load(h.load)
        self.proposer.set_committed(act[keep], start[keep], accepted[keep], kb)
        tokens = self._extend_history(act, out_tokens, accepted, keep)
        return StepResult(act, tokens, h.num_draft[h.where], accepted.astype(np.int32), kb, 0.0,
                          time.perf_counter() - queued.t0, fused=True, queued=overlapped)

    def _extend_history(self, act, out_tokens, accepted, keep=None) -> list[list[int]]:
        """Per active slot: its a accepted drafts plus one target token, appended to the history
        (of the slots in ``keep``, default all)."""
        out = []
        for i, s in enumerate(act.tolist()):
            tokens = out_tokens[i, : int(accepted[i]) + 1].tolist()
            if keep is None or keep[i]:
                self.history.extend(s, tokens)
            out.append(tokens)
        return out

    def _fused_head_decode(self, ctx: SpecContext, act, where, row_slots, last, t0: float) -> StepResult:
        """``decode``'s step with an EAGLE-3 head as one jitted call (round, verification, absorb)."""
        b, kb = len(row_slots), ctx.kb
        self.proposer.check_round(ctx)
        start = (self.history.length[act] - 1).astype(np.int32)
        kv_len = self.target.kv_bucket_for(int(start.max()) + kb + 1)
        num_draft = np.where(ctx.active, ctx.k, 0).astype(np.int32)
        starts = self.target.row_starts(row_slots, where, start)
        packed, load = self._run_fused_head(kb, kv_len, row_slots, scatter_rows(last, where, b, 0), starts, num_draft,
                                            ctx.sampling, ctx.out_pos, ctx.active)
        packed = np.asarray(packed)  # the step's one device->host transfer
        out_tokens, accepted = packed[where, : kb + 1], packed[where, kb + 1]
        self.target.set_lengths_host(act, start + 1 + accepted)
        self.target.add_expert_load(load)
        self.proposer.absorbed(row_slots, starts, np.where(ctx.active, packed[:, kb + 1] + 1, 0))
        step_s = time.perf_counter() - t0
        return StepResult(act, self._extend_history(act, out_tokens, accepted), num_draft[where],
                          accepted.astype(np.int32), kb, 0.0, step_s, fused=True)
