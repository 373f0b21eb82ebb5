"""The runner side of the engine: the ``StepRunner`` protocol every runner implements (the device
work of prefill, decode steps and cache bookkeeping) and ``PlainRunner``, plain decoding over a
``ModelRunner``. The engine schedules and applies; a runner executes plans and returns results."""

from __future__ import annotations

import time
from typing import Any, Protocol

import numpy as np

from jaxspec.config import ModelConfig
from jaxspec.engine.scheduler import SpecPolicy
from jaxspec.engine.slots import SlotTable
from jaxspec.engine.step import DecodePlan, PrefillChunk, QueuedStep, StepResult


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

    def prefill_with_decode(self, chunk: PrefillChunk, slots: SlotTable, plan: DecodePlan
                            ) -> tuple[int, StepResult] | None:
        """Prefill one chunk and run a decode step in one call where this runner can (the experts'
        weights read once for both): (the chunk's sampled token, the step's result). None: not
        for this chunk and plan; nothing ran, and the engine runs them apart."""
        ...

    # Whether ``prefill_with_decode`` can ever run a chunk with a step (the engine asks only then).
    mixes_prefill: bool

    # Whether decode steps can be queued before the previous one's tokens reach the host
    # (``dispatch`` / ``collect``; plain single-device decoding), and drafting steps too.
    pipelined: bool
    queues_drafting: bool

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

    def paging(self) -> tuple[int, int, int] | None:
        """(num_pages, page_size, page groups) of a paged cache (a slot's pages all come from group
        slot // (num_slots / groups)); None: a slot cache."""
        ...

    # Paged caches: whether a prompt can start prefill after a prefix already in shared pages, and
    # how many tokens after a cached block its key must also cover (the caches' entries of a
    # block depend on them: 1 for an EAGLE-3 head).
    reuses_prefix: bool
    prefix_key_tokens: int
    # Positions past a request's last token that one step may write (speculative look-ahead, or a
    # call's further decode steps).
    lookahead: int
    # The most plain decode steps one call runs (``DecodePlan.steps``; 1 where each step is a call).
    decode_steps: int

    def assign_pages(self, slot: int, pages: list[int]) -> None:
        """Paged caches: ``slot`` holds its positions in ``pages`` (empty: none) from now on."""
        ...

    def resume(self, slot: int, last_token: int) -> None:
        """A preempted request's context (prompt and all but its last output token) was
        prefilled again into ``slot``: its next step feeds ``last_token``, not the token that
        prefill sampled."""
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
    prefix_key_tokens = 0
    queues_drafting = False

    @property
    def decode_steps(self) -> int:
        return self.runner.max_decode_steps

    @property
    def lookahead(self) -> int:
        # A call of several steps writes that many positions: the paged cache grows by them.
        return self.decode_steps - 1

    def paging(self) -> tuple[int, int, int] | None:
        return self.runner.paging

    def assign_pages(self, slot: int, pages: list[int]) -> None:
        self.runner.assign_pages(slot, pages)

    def resume(self, slot: int, last_token: int) -> None:
        pass  # the engine's slot table feeds the last token

    @property
    def prefill_chunk(self) -> int | None:
        return self.runner.prefill_chunk

    def prefill_batch(self, chunks: list[PrefillChunk], slots: SlotTable) -> list[int]:
        idx = np.array([c.slot for c in chunks])
        return self.runner.prefill_many(idx, [c.request.prompt_ids[: c.end] for c in chunks], slots.sampling(idx),
                                        [c.start for c in chunks])

    @property
    def mixes_prefill(self) -> bool:
        return self.runner.mixed_length is not None

    def prefill_with_decode(self, chunk: PrefillChunk, slots: SlotTable, plan: DecodePlan
                            ) -> tuple[int, StepResult] | None:
        r = self.runner
        if plan.kb or r.mixed_length is None or r.bucket_for(chunk.end - chunk.start) != r.mixed_length:
            return None
        t0 = time.perf_counter()
        act = plan.slots
        first, tokens = r.prefill_with_decode(
            chunk.slot, chunk.request.prompt_ids[: chunk.end], chunk.start, slots.sampling(np.array([chunk.slot])),
            act, slots.last_token[act], slots.sampling(act), slots.num_generated[act])
        return first, StepResult.plain(act, tokens, time.perf_counter() - t0)

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

    def moe_dispatch(self):
        """The MoE dispatch the steps run (a backend name, a measured table, or None: the config's)."""
        return self.runner.moe_backend

    def attention_backend(self) -> str:
        """The attention backend the steps run (``layers.ATTENTION_BACKENDS``)."""
        return self.runner.statics.attention_backend

    def matmul_backend(self) -> str:
        """The dense projections' backend the steps run (``dense_cpu.MATMUL_BACKENDS``)."""
        return self.runner.statics.matmul_backend

    def release(self, slot: int) -> None:
        self.runner.set_length(slot, 0)

    def warmup(self) -> None:
        self.runner.warmup()
