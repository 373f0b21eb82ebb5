"""The jaxspec.v1.JaxSpec servicer (grpc.aio): admission, validation, streaming, cancellation.

Status codes:
- INVALID_ARGUMENT: the message starts with the proto field path, which the
  trailing metadata key ``jaxspec-invalid-field`` also carries;
- RESOURCE_EXHAUSTED: the waiting queue is full (answered at once, never queued);
- UNAVAILABLE: warming up, draining, stopped or failed;
- INTERNAL: the request failed inside the engine (traceback in the server log);
- DEADLINE_EXCEEDED: the request's deadline passed in the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import NoReturn

import grpc

from jaxspec.engine import FinishReason, InvalidRequestError, QueueFullError, RequestOutput
from serving.build import EngineBundle
from serving.engine_loop import EngineLoop, EngineUnavailableError, RequestHandle, ServerState
from serving.metrics import ServingMetrics
from serving.pb import jaxspec_pb2 as pb
from serving.pb import jaxspec_pb2_grpc as pb_grpc
from serving.protocol import check_abort_ids, merge_outputs, parse_request, spec_stats_to_proto, translate

log = logging.getLogger("jaxspec.serving")

INVALID_FIELD_KEY = "jaxspec-invalid-field"
# Text longer than this is tokenised off the event loop so that it stays responsive.
_INLINE_TOKENIZE_CHARS = 4096
# A call that ends this close to its deadline ended by it: the client's timer starts before the
# server's copy of the deadline (sent as a timeout), so a client giving up at its deadline reaches the
# server with a little time left on the server's.
DEADLINE_SLACK_S = 0.05

_STATE_TO_PROTO = {
    ServerState.WARMING_UP: pb.ServerInfo.STATE_WARMING_UP,
    ServerState.SERVING: pb.ServerInfo.STATE_SERVING,
    ServerState.DRAINING: pb.ServerInfo.STATE_DRAINING,
    ServerState.STOPPED: pb.ServerInfo.STATE_STOPPED,
    ServerState.FAILED: pb.ServerInfo.STATE_FAILED,
}


async def admit(loop: EngineLoop, bundle: EngineBundle | None, request: pb.GenerateRequest,
                deadline: float | None = None) -> RequestHandle:
    """Admission shared by the gRPC and HTTP front ends: state, validation, tokenisation, engine queue.

    Raises EngineUnavailableError, QueueFullError, or InvalidRequestError naming the proto field path."""
    if loop.state != ServerState.SERVING or bundle is None:
        raise EngineUnavailableError(f"server is {loop.state.value}")
    try:
        parsed = parse_request(request, bundle.limits)
        if parsed.text is not None:
            text = parsed.text
            prompt_ids = (bundle.tokenizer.encode(text) if len(text) <= _INLINE_TOKENIZE_CHARS
                          else await asyncio.to_thread(bundle.tokenizer.encode, text))
        else:
            prompt_ids = parsed.token_ids
        params = parsed.resolve(len(prompt_ids), bundle.limits)
        return await loop.submit(prompt_ids, params, parsed.request_id, deadline, parsed.num_speculative_tokens,
                                 parsed.use_prefix_cache)
    except InvalidRequestError as e:
        raise translate(e) from None


class JaxSpecServicer(pb_grpc.JaxSpecServicer):
    def __init__(self, engine_loop: EngineLoop, metrics: ServingMetrics):
        self.loop = engine_loop
        self.metrics = metrics
        self.started = time.monotonic()
        self.bundle: EngineBundle | None = None  # set by the server once the engine is built

    # ------------------------------------------------------------------ RPCs
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        handle = await self._start(request, context)
        try:
            outputs = await handle.all_outputs()
        finally:
            self._release(handle, context)
        await self._check_final(outputs[-1], context)
        return merge_outputs(outputs, with_spec=handle.speculative)

    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        handle = await self._start(request, context)
        try:
            while True:
                outputs = await handle.next_outputs()
                last = outputs[-1]
                if last.finished:
                    await self._check_final(last, context)
                resp = merge_outputs(outputs, with_spec=handle.speculative)
                if resp.token_ids or resp.text or resp.finished:
                    await context.write(resp)
                if last.finished:
                    return
        finally:
            self._release(handle, context)

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        if self.bundle is None:
            await self._unavailable(context, f"server is {self.loop.state.value}")
        try:
            check_abort_ids(request.request_ids, self.bundle.limits)
        except InvalidRequestError as e:
            await self._invalid(context, e)
        aborted = await self.loop.abort(list(request.request_ids), FinishReason.ABORTED)
        if aborted:
            log.info("aborted %d request(s) on request: %s", len(aborted), ", ".join(aborted))
        return pb.AbortResponse(aborted_ids=aborted)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        bundle = self.bundle
        if bundle is None:
            await self._unavailable(context, f"server is {self.loop.state.value}")
        d, lim = bundle.description, bundle.limits
        return pb.ModelInfo(
            model_id=d.model_id, context_length=d.context_length, vocab_size=d.vocab_size,
            eos_token_ids=list(d.eos_ids), spec_method=d.spec_method, max_speculative_tokens=d.max_speculative_tokens,
            draft_model_id=d.draft_model_id, num_slots=d.num_slots, platform=d.platform, devices=list(d.devices),
            mesh_shape=d.mesh_shape, dtype=d.dtype, quantization=d.quantization,
            draft_quantization=d.draft_quantization, kv_cache_dtype=d.kv_cache_dtype, num_experts=d.num_experts,
            num_experts_per_token=d.num_experts_per_token, max_stop_strings=lim.max_stop_strings,
            max_stop_string_length=lim.max_stop_string_chars, default_max_tokens=lim.default_max_tokens,
        )

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext) -> pb.ServerInfo:
        snap = self.loop.snapshot
        bundle = self.bundle
        return pb.ServerInfo(
            state=_STATE_TO_PROTO[self.loop.state],
            num_running=snap.num_running,
            num_waiting=snap.num_waiting,
            max_waiting=bundle.engine.max_waiting if bundle else 0,
            num_slots=bundle.description.num_slots if bundle else 0,
            num_finished=self.metrics.num_finished,
            speculation=spec_stats_to_proto(snap.spec_stats) if snap.spec_stats is not None else None,
            uptime_seconds=time.monotonic() - self.started,
        )

    # --------------------------------------------------------------- helpers
    async def _start(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> RequestHandle:
        """Admission; aborts the RPC on refusal."""
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        try:
            return await admit(self.loop, self.bundle, request, deadline)
        except InvalidRequestError as e:
            await self._invalid(context, e)
        except QueueFullError as e:
            self.metrics.request_rejected("RESOURCE_EXHAUSTED")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except EngineUnavailableError as e:
            await self._unavailable(context, str(e))
        raise AssertionError("unreachable")  # context.abort raises

    def _release(self, handle: RequestHandle, context: grpc.aio.ServicerContext) -> None:
        """The RPC is over: if the engine is still working on it (client cancelled, deadline), end it."""
        if handle.finished:
            return
        remaining = context.time_remaining()
        late = remaining is not None and remaining <= DEADLINE_SLACK_S
        reason = FinishReason.DEADLINE if late else FinishReason.ABORTED
        self.loop.cancel(handle.request_id, reason)

    async def _check_final(self, out: RequestOutput, context: grpc.aio.ServicerContext) -> None:
        if out.finish_reason == FinishReason.ERROR:
            log.error("request %s failed: %s", out.request_id, out.error)
            await context.abort(grpc.StatusCode.INTERNAL, f"request {out.request_id} failed: {out.error}")
        if out.finish_reason == FinishReason.DEADLINE:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"request {out.request_id} passed its deadline")

    async def _invalid(self, context: grpc.aio.ServicerContext, e: InvalidRequestError) -> NoReturn:
        self.metrics.request_rejected("INVALID_ARGUMENT")
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e), trailing_metadata=((INVALID_FIELD_KEY, e.field),))
        raise AssertionError("unreachable")

    async def _unavailable(self, context: grpc.aio.ServicerContext, message: str) -> NoReturn:
        self.metrics.request_rejected("UNAVAILABLE")
        await context.abort(grpc.StatusCode.UNAVAILABLE, message)
        raise AssertionError("unreachable")
