"""Prometheus metrics and the per-request log line.

Each server owns its own ``CollectorRegistry`` (several servers can live in one
process, e.g. in tests). Metric names follow vLLM's where one exists, with the
``jaxspec_`` prefix. ``ServingMetrics`` implements ``engine_loop.LoopObserver``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from jaxspec.engine import FinishReason, RequestOutput
from serving.engine_loop import RequestHandle

request_log = logging.getLogger("jaxspec.serving.requests")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
_U32 = 2**32


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("jaxspec_requests", "Finished requests by finish reason", ["finish_reason"], registry=r)
        self.rejected = Counter("jaxspec_requests_rejected", "Requests refused before reaching the engine, by gRPC code",
                                ["code"], registry=r)
        self.prompt_tokens = Counter("jaxspec_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_prompt_tokens = Counter("jaxspec_prefix_cache_hit_tokens",
                                            "Prompt tokens of finished requests served from the prefix cache", registry=r)
        self.prefix_cache_hits = Counter("jaxspec_prefix_cache_requests",
                                         "Finished requests by whether their prompt hit the prefix cache", ["hit"],
                                         registry=r)
        self.preemptions = Counter("jaxspec_num_preemptions",
                                   "Preemptions of finished requests: KV pages freed when the pool ran dry, the "
                                   "request recomputed later (optimistic KV admission)", registry=r)
        self.generation_tokens = Counter("jaxspec_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("jaxspec_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("jaxspec_inter_token_latency_seconds",
                             "Time between output tokens (a step that yields n tokens counts n gaps of 1/n)",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("jaxspec_e2e_request_latency_seconds", "Arrival to finish",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("jaxspec_num_requests_waiting", "Requests waiting for a slot", registry=r)
        self.active_slots = Gauge("jaxspec_num_requests_running", "Slots holding a request", registry=r)
        self.step_failures = Counter("jaxspec_engine_step_failures", "Engine steps that raised", registry=r)
        self.spec_drafts = Counter("jaxspec_spec_decode_num_drafts", "Verification steps that carried draft tokens",
                                   registry=r)
        self.spec_draft_tokens = Counter("jaxspec_spec_decode_num_draft_tokens", "Draft tokens proposed", registry=r)
        self.spec_accepted_tokens = Counter("jaxspec_spec_decode_num_accepted_tokens", "Draft tokens accepted",
                                            registry=r)
        self.spec_accepted_per_pos = Counter("jaxspec_spec_decode_num_accepted_tokens_per_pos",
                                             "Draft tokens accepted at each draft position", ["position"], registry=r)
        self.spec_drafted_per_pos = Counter("jaxspec_spec_decode_num_draft_tokens_per_pos",
                                            "Draft tokens proposed at each draft position", ["position"], registry=r)
        self.expert_tokens = Counter("jaxspec_expert_routed_tokens", "Tokens routed to each expert of each MoE layer",
                                     ["layer", "expert"], registry=r)
        self.num_finished = 0
        self._expert_prev: np.ndarray | None = None
        self._http: Any = None
        self._http_thread: threading.Thread | None = None

    # ------------------------------------------------------------ LoopObserver
    def on_output(self, handle: RequestHandle, out: RequestOutput) -> None:
        n = len(out.new_token_ids)
        if not n or out.last_token_time is None:
            return
        self.generation_tokens.inc(n)
        if handle.prev_token_time is not None:
            gap = (out.last_token_time - handle.prev_token_time) / n
            for _ in range(n):
                self.itl.observe(gap)
        handle.prev_token_time = out.last_token_time

    def on_finish(self, handle: RequestHandle, out: RequestOutput) -> None:
        reason = out.finish_reason.value if out.finish_reason is not None else "unknown"
        self.requests.labels(reason).inc()
        self.prompt_tokens.inc(out.num_prompt_tokens)
        self.cached_prompt_tokens.inc(out.num_cached_tokens)
        self.prefix_cache_hits.labels("true" if out.num_cached_tokens else "false").inc()
        self.preemptions.inc(out.num_preemptions)
        now = time.monotonic()
        ttft = out.first_token_time - out.arrival_time if out.first_token_time is not None else None
        if ttft is not None:
            self.ttft.observe(ttft)
        e2e = now - out.arrival_time
        self.e2e.observe(e2e)
        self.num_finished += 1
        spec = out.spec if handle.speculative else None
        if spec is not None and spec.num_drafts:
            self.spec_drafts.inc(spec.num_drafts)
            self.spec_draft_tokens.inc(spec.num_draft_tokens)
            self.spec_accepted_tokens.inc(spec.num_accepted_tokens)
            for pos, count in enumerate(spec.accepted_per_position):
                self.spec_accepted_per_pos.labels(str(pos)).inc(count)
            for pos, count in enumerate(spec.drafted_per_position):
                self.spec_drafted_per_pos.labels(str(pos)).inc(count)
        log_request(handle, out, ttft, e2e)

    def on_engine_state(self, num_waiting: int, num_running: int) -> None:
        self.queue_depth.set(num_waiting)
        self.active_slots.set(num_running)

    def on_expert_load(self, load: np.ndarray) -> None:
        load = np.asarray(load, np.int64)
        prev = self._expert_prev if self._expert_prev is not None else np.zeros_like(load)
        # The device counters are int32 and may wrap on a long-running server: the
        # difference modulo 2**32 is right as long as reads are frequent enough.
        delta = (load - prev) % _U32
        self._expert_prev = load
        for layer, expert in zip(*np.nonzero(delta)):
            self.expert_tokens.labels(str(layer), str(expert)).inc(int(delta[layer, expert]))

    def on_step_failure(self) -> None:
        self.step_failures.inc()

    def request_rejected(self, code: str) -> None:
        self.rejected.labels(code).inc()

    # ------------------------------------------------------------------- HTTP
    def serve_http(self, host: str, port: int) -> int:
        """Expose /metrics; returns the bound port (``port`` 0 picks a free one)."""
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_address[1])

    def shutdown(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def log_request(handle: RequestHandle, out: RequestOutput, ttft: float | None, e2e: float) -> None:
    """One JSON line per finished request. Never the prompt or output text."""
    if not request_log.isEnabledFor(logging.INFO):
        return
    record: dict[str, Any] = {
        "event": "request_finished",
        "request_id": out.request_id,
        "finish_reason": out.finish_reason.value if out.finish_reason else None,
        "prompt_tokens": out.num_prompt_tokens,
        "completion_tokens": out.num_generated_tokens,
        "ttft_s": round(ttft, 6) if ttft is not None else None,
        "e2e_s": round(e2e, 6),
    }
    if out.first_token_time is not None and out.last_token_time is not None and out.num_generated_tokens > 1:
        record["mean_itl_s"] = round((out.last_token_time - out.first_token_time) / (out.num_generated_tokens - 1), 6)
    if out.num_preemptions:
        record["preemptions"] = out.num_preemptions
    if handle.cancel_reason is not None and out.finish_reason in (FinishReason.ABORTED, FinishReason.DEADLINE):
        record["cancelled_by_client"] = True
    if handle.speculative and out.spec is not None:
        record.update(num_drafts=out.spec.num_drafts, num_draft_tokens=out.spec.num_draft_tokens,
                      num_accepted_tokens=out.spec.num_accepted_tokens,
                      acceptance_rate=round(out.spec.acceptance_rate, 4))
    if out.error:
        record["error"] = out.error
    request_log.info(json.dumps(record, separators=(",", ":")))
