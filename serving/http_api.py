"""OpenAI-compatible HTTP API (``--http-port``), served next to gRPC by the same process and engine.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``
and ``GET /health`` (never behind auth). A request body becomes a
``jaxspec.v1.GenerateRequest`` and goes through the gRPC servicer's admission
(``serving.servicer.admit``: the same validation, limits and engine queue);
responses are built from ``protocol.merge_outputs``, so text, token ids and
speculation counters are what gRPC returns for the same request.

OpenAI semantics where they differ from gRPC: an unset ``temperature`` is 1.0
and ``eos`` is reported as ``stop``. Extensions in requests (vLLM's names where it
has them): ``top_k`` (-1 or 0: off), ``min_p``, ``stop_token_ids``, ``ignore_eos``,
``speculation`` ({"enabled", "num_speculative_tokens"}), ``request_timeout``
(seconds; past it the answer is 504) and the ``X-Request-Id`` header. Extensions
in responses: ``choices[0].token_ids`` (in every stream chunk too) and, on the
final response or chunk, ``jaxspec`` = {request_id, finish_reason (the engine's:
eos / stop / length / aborted), stop_string or stop_token_id, speculation}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import time
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jaxspec.engine import FinishReason, InvalidRequestError, QueueFullError, RequestOutput
from serving.chat_template import ChatTemplate, ChatTemplateError, chat_template_for
from serving.engine_loop import EngineUnavailableError, RequestHandle, ServerState
from serving.pb import jaxspec_pb2 as pb
from serving.protocol import merge_outputs
from serving.servicer import JaxSpecServicer, admit

log = logging.getLogger("jaxspec.serving")

# Proto field paths (what admission names) -> the request parameter a client sent.
_PARAM = {
    "sampling.temperature": "temperature", "sampling.top_p": "top_p", "sampling.top_k": "top_k",
    "sampling.min_p": "min_p", "sampling.seed": "seed", "stopping.max_tokens": "max_tokens",
    "stopping.stop": "stop", "stopping.stop_token_ids": "stop_token_ids", "prompt": "prompt",
    "token_ids": "prompt", "request_id": "X-Request-Id",
    "speculation.enabled": "speculation.enabled",
    "speculation.num_speculative_tokens": "speculation.num_speculative_tokens",
}
_FINISH = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_EOS: "stop",
           pb.FINISH_REASON_ABORTED: "abort"}
_ENGINE_FINISH = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_EOS: "eos",
                  pb.FINISH_REASON_ABORTED: "aborted"}
_REJECTED_CODE = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
                  503: "UNAVAILABLE"}
_UINT32, _UINT64, _INT32 = 2**32, 2**64, 2**31
_INLINE_TOKENIZE_CHARS = 4096


class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _invalid(param: str | None, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


# ------------------------------------------------------------------ requests
def _get(body: dict[str, Any], name: str, kinds: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise _invalid(name, f"must be {what}, got {json.dumps(value)[:50]}")
    return value


def _int(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = _get(body, name, (int,), "an integer")
    if value is not None and not lo <= value < hi:
        raise _invalid(name, f"must be in [{lo}, {hi - 1}], got {value}")
    return value


def _float(body: dict[str, Any], name: str) -> float | None:
    value = _get(body, name, (int, float), "a number")
    return None if value is None else float(value)


def _unsupported(body: dict[str, Any], name: str, allowed: tuple[Any, ...], why: str) -> None:
    if name in body and body[name] not in allowed:
        raise _invalid(name, why)


def _generate_request(body: dict[str, Any], max_tokens_names: tuple[str, ...]) -> pb.GenerateRequest:
    """The sampling, stopping and speculation fields shared by completions and chat completions."""
    _unsupported(body, "n", (None, 1), "only n=1 is supported")
    _unsupported(body, "best_of", (None, 1), "only best_of=1 is supported")
    for name in ("frequency_penalty", "presence_penalty"):
        _unsupported(body, name, (None, 0, 0.0), "penalties are not supported (only 0)")
    _unsupported(body, "repetition_penalty", (None, 1, 1.0), "penalties are not supported (only 1)")
    _unsupported(body, "logit_bias", (None, {}), "logit_bias is not supported")
    req = pb.GenerateRequest()
    s, st = req.sampling, req.stopping
    temperature = _float(body, "temperature")
    s.temperature = 1.0 if temperature is None else temperature  # OpenAI's default, not gRPC's greedy one
    for name in ("top_p", "min_p"):
        if (value := _float(body, name)) is not None:
            setattr(s, name, value)
    top_k = _int(body, "top_k", -1, _INT32)
    if top_k is not None:
        s.top_k = max(top_k, 0)  # vLLM's -1 means off, as 0 does here
    if (seed := _int(body, "seed", 0, _UINT64)) is not None:
        s.seed = seed
    for name in max_tokens_names:  # chat: max_completion_tokens wins over the deprecated max_tokens
        if (value := _int(body, name, 0, _UINT32)) is not None:
            st.max_tokens = value
            break
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
            raise _invalid("stop", "must be a string or a list of strings")
        st.stop.extend(x for x in stop if x)
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list) or not all(type(x) is int and 0 <= x < _UINT32 for x in stop_ids):
            raise _invalid("stop_token_ids", "must be a list of token ids")
        st.stop_token_ids.extend(stop_ids)
    if (ignore_eos := _get(body, "ignore_eos", (bool,), "a boolean")) is not None:
        st.ignore_eos = ignore_eos
    spec = body.get("speculation")
    if spec is not None:
        if not isinstance(spec, dict):
            raise _invalid("speculation", "must be an object {enabled, num_speculative_tokens}")
        try:
            if (enabled := _get(spec, "enabled", (bool,), "a boolean")) is not None:
                req.speculation.enabled = enabled
            if (k := _int(spec, "num_speculative_tokens", 0, _UINT32)) is not None:
                req.speculation.num_speculative_tokens = k
        except ApiError as e:
            raise _invalid(f"speculation.{e.param}", e.message.split(": ", 1)[-1]) from None
    return req


def _completion_prompt(body: dict[str, Any], req: pb.GenerateRequest) -> None:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        req.text = prompt
    elif isinstance(prompt, list) and all(type(t) is int for t in prompt):
        if not all(0 <= t < _UINT32 for t in prompt):
            raise _invalid("prompt", "token ids must be >= 0")
        req.token_ids.ids.extend(prompt)
    elif isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt):
        raise _invalid("prompt", f"one prompt per request, got {len(prompt)}")
    else:
        raise _invalid("prompt", "must be a string or a list of token ids")


def _chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _invalid(f"messages[{i}]", "must be an object with a string role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _invalid(f"messages[{i}].content", "only text content parts are supported")
            m = {**m, "content": "\n".join(p["text"] for p in content)}
        elif content is not None and not isinstance(content, str):
            raise _invalid(f"messages[{i}].content", "must be a string or a list of text parts")
        out.append(m)
    return out


# ----------------------------------------------------------------- responses
def _usage(resp: pb.GenerateResponse) -> dict[str, Any]:
    p, c = resp.usage.prompt_tokens, resp.usage.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": resp.usage.cached_prompt_tokens}}


def _extension(resp: pb.GenerateResponse) -> dict[str, Any]:
    ext: dict[str, Any] = {"request_id": resp.request_id, "finish_reason": _ENGINE_FINISH[resp.finish_reason]}
    which = resp.WhichOneof("matched_stop")
    if which is not None:
        ext[which] = getattr(resp, which)
    if resp.HasField("speculation"):
        s = resp.speculation
        ext["speculation"] = {
            "num_drafts": s.num_drafts, "num_draft_tokens": s.num_draft_tokens,
            "num_accepted_tokens": s.num_accepted_tokens, "acceptance_rate": s.acceptance_rate,
            "mean_acceptance_length": s.mean_acceptance_length,
            "accepted_per_position": list(s.accepted_per_position), "drafted_per_position": list(s.drafted_per_position),
        }
    return ext


class _Call:
    """One admitted request: what its answers need to know."""

    def __init__(self, handle: RequestHandle, chat: bool, model: str, deadline: float | None):
        self.handle, self.chat, self.model, self.deadline = handle, chat, model, deadline
        self.id = ("chatcmpl-" if chat else "cmpl-") + handle.request_id
        self.created = int(time.time())

    def envelope(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion" + (".chunk" if chunk else "")) if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def choice(self, resp: pb.GenerateResponse, chunk: bool, first: bool = False) -> dict[str, Any]:
        finish = _FINISH[resp.finish_reason] if resp.finished else None
        if not self.chat:
            return {"index": 0, "text": resp.text, "logprobs": None, "finish_reason": finish,
                    "token_ids": list(resp.token_ids)}
        key = "delta" if chunk else "message"
        message: dict[str, Any] = {"role": "assistant", "content": resp.text} if first or not chunk else {}
        if chunk and resp.text:
            message["content"] = resp.text
        return {"index": 0, key: message, "logprobs": None, "finish_reason": finish, "token_ids": list(resp.token_ids)}

    def final_error(self, out: RequestOutput) -> ApiError | None:
        if out.finish_reason == FinishReason.ERROR:
            log.error("request %s failed: %s", out.request_id, out.error)
            return ApiError(500, f"request {out.request_id} failed: {out.error}", code="engine_error")
        if out.finish_reason == FinishReason.DEADLINE:
            return ApiError(504, f"request {out.request_id} passed its deadline", code="deadline_exceeded",
                            type_="timeout_error")
        return None


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class OpenAIApp:
    """The Starlette application; admission and engine calls go through the gRPC servicer's objects."""

    def __init__(self, servicer: JaxSpecServicer, auth_token: str | None = None):
        self.servicer = servicer
        self.loop = servicer.loop
        self.metrics = servicer.metrics
        self._expected = f"Bearer {auth_token}".encode() if auth_token else None
        self._templates: dict[int, ChatTemplate | None] = {}
        self.app = Starlette(
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_exception},
        )

    # -------------------------------------------------------------- routes
    async def health(self, request: Request) -> Response:
        state = self.loop.state
        return JSONResponse({"status": state.value}, status_code=200 if state == ServerState.SERVING else 503)

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
            bundle = self._bundle()
        except ApiError as e:
            return self._refuse(e)
        d = bundle.description
        return JSONResponse({"object": "list", "data": [{
            "id": d.model_id, "object": "model", "created": int(time.time() - (time.monotonic() - self.servicer.started)),
            "owned_by": "jaxspec", "max_model_len": d.context_length,
        }]})

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    # ------------------------------------------------------------ handling
    async def _generate(self, request: Request, chat: bool) -> Response:
        try:
            self._authorize(request)
            body = await self._json(request)
            call, stream, include_usage = await self._admit(request, body, chat)
        except ApiError as e:
            return self._refuse(e)
        if stream:
            return StreamingResponse(self._stream(call, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._unary(request, call)

    async def _admit(self, request: Request, body: dict[str, Any], chat: bool) -> tuple[_Call, bool, bool]:
        bundle = self._bundle()
        model = body.get("model")
        if model is not None and model != bundle.description.model_id:
            raise ApiError(404, f"model {model!r} is not served here (this server serves "
                           f"{bundle.description.model_id!r})", param="model", code="model_not_found")
        stream = _get(body, "stream", (bool,), "a boolean") or False
        options = _get(body, "stream_options", (dict,), "an object") or {}
        include_usage = bool(stream and options.get("include_usage"))
        timeout = _float(body, "request_timeout")
        if timeout is not None and timeout <= 0:
            raise _invalid("request_timeout", "must be > 0 seconds")
        deadline = time.monotonic() + timeout if timeout is not None else None
        if chat:
            _unsupported(body, "logprobs", (None, False), "logprobs are not supported")
            _unsupported(body, "top_logprobs", (None, 0), "logprobs are not supported")
            _unsupported(body, "tools", (None, []), "tools are not supported")
            _unsupported(body, "tool_choice", (None, "none"), "tools are not supported")
            _unsupported(body, "response_format", (None, {"type": "text"}), "only text responses are supported")
            req = _generate_request(body, ("max_completion_tokens", "max_tokens"))
            req.token_ids.ids.extend(await self._render_chat(bundle, _chat_messages(body)))
        else:
            _unsupported(body, "logprobs", (None,), "logprobs are not supported")
            _unsupported(body, "echo", (None, False), "echo is not supported")
            _unsupported(body, "suffix", (None, ""), "suffix is not supported")
            req = _generate_request(body, ("max_tokens",))
            _completion_prompt(body, req)
        req.request_id = request.headers.get("x-request-id", "")
        try:
            handle = await admit(self.loop, bundle, req, deadline)
        except InvalidRequestError as e:
            param = _PARAM.get(e.field, e.field)
            if chat and param == "prompt":
                param = "messages"
            raise _invalid(param, str(e).split(": ", 1)[-1]) from None
        except QueueFullError as e:
            raise ApiError(429, str(e), code="queue_full", type_="rate_limit_error") from None
        except EngineUnavailableError as e:
            raise ApiError(503, str(e), code="unavailable") from None
        return _Call(handle, chat, bundle.description.model_id, deadline), stream, include_usage

    async def _render_chat(self, bundle: Any, messages: list[dict[str, Any]]) -> list[int]:
        key = id(bundle.tokenizer)
        if key not in self._templates:
            self._templates[key] = chat_template_for(bundle.tokenizer)
        template = self._templates[key]
        if template is None:
            raise _invalid("messages", f"model {bundle.description.model_id!r} has no chat template "
                           "(tokenizer_config.json chat_template); use /v1/completions")
        try:
            text = template.render(messages)
        except ChatTemplateError as e:
            raise _invalid("messages", f"the chat template refused the messages: {e}") from None
        encode = bundle.tokenizer.encode
        # The template writes any bos token itself, as apply_chat_template's text does.
        return (encode(text, add_bos=False) if len(text) <= _INLINE_TOKENIZE_CHARS
                else await asyncio.to_thread(encode, text, add_bos=False))

    async def _unary(self, request: Request, call: _Call) -> Response:
        handle = call.handle
        disconnect = asyncio.ensure_future(_wait_disconnect(request))
        try:
            final = asyncio.ensure_future(handle.all_outputs())
            await asyncio.wait((final, disconnect), return_when=asyncio.FIRST_COMPLETED)
            if not final.done():  # the client went away: nobody to answer
                final.cancel()
                return Response(status_code=499)
            outputs = final.result()
        finally:
            disconnect.cancel()
            self._release(call)
        if (error := call.final_error(outputs[-1])) is not None:
            return error.response()
        resp = merge_outputs(outputs, with_spec=handle.speculative)
        return JSONResponse({**call.envelope(chunk=False), "choices": [call.choice(resp, chunk=False)],
                             "usage": _usage(resp), "jaxspec": _extension(resp)})

    async def _stream(self, call: _Call, include_usage: bool) -> AsyncIterator[str]:
        handle, first = call.handle, True
        try:
            while True:
                outputs = await handle.next_outputs()
                if outputs[-1].finished and (error := call.final_error(outputs[-1])) is not None:
                    yield _sse(error.body())
                    yield "data: [DONE]\n\n"
                    return
                resp = merge_outputs(outputs, with_spec=handle.speculative)
                if resp.token_ids or resp.text or resp.finished or (first and call.chat):
                    chunk = {**call.envelope(chunk=True), "choices": [call.choice(resp, chunk=True, first=first)]}
                    if include_usage:
                        chunk["usage"] = None
                    if resp.finished:
                        chunk["jaxspec"] = _extension(resp)
                    yield _sse(chunk)
                    first = False
                if resp.finished:
                    if include_usage:
                        yield _sse({**call.envelope(chunk=True), "choices": [], "usage": _usage(resp)})
                    yield "data: [DONE]\n\n"
                    return
        finally:  # also on a client disconnect (the response task is cancelled)
            self._release(call)

    # ------------------------------------------------------------- helpers
    def _release(self, call: _Call) -> None:
        """The answer is over: if the engine is still working on the request, end it."""
        if call.handle.finished:
            return
        late = call.deadline is not None and time.monotonic() >= call.deadline
        self.loop.cancel(call.handle.request_id, FinishReason.DEADLINE if late else FinishReason.ABORTED)

    def _authorize(self, request: Request) -> None:
        if self._expected is None:
            return
        got = request.headers.get("authorization", "").encode()
        # Constant-time comparison, as for gRPC: timing must not reveal how much of a guess matched.
        if not hmac.compare_digest(got, self._expected):
            raise ApiError(401, "missing or invalid bearer token", code="invalid_api_key")

    def _bundle(self) -> Any:
        bundle = self.servicer.bundle
        if self.loop.state != ServerState.SERVING or bundle is None:
            raise ApiError(503, f"server is {self.loop.state.value}", code="unavailable")
        return bundle

    def _refuse(self, error: ApiError) -> Response:
        """The error response, counted in jaxspec_requests_rejected_total under the gRPC code gRPC would give."""
        self.metrics.request_rejected(_REJECTED_CODE.get(error.status, str(error.status)))
        return error.response()

    async def _json(self, request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        return body

    async def _http_exception(self, request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


class HttpFrontend:
    """uvicorn serving ``OpenAIApp`` on the caller's event loop (the gRPC server's)."""

    def __init__(self, servicer: JaxSpecServicer, host: str, port: int, *, auth_token: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None):
        import uvicorn

        class _Server(uvicorn.Server):
            def capture_signals(self):  # the serving process' own handlers drain both servers
                import contextlib

                return contextlib.nullcontext()

        self.api = OpenAIApp(servicer, auth_token)
        self._config = uvicorn.Config(
            self.api.app, host=host, port=port, ssl_certfile=tls_cert, ssl_keyfile=tls_key,
            log_config=None, access_log=False, lifespan="off", ws="none", http="h11",
        )
        self._server = _Server(self._config)
        self._task: asyncio.Task | None = None
        self.port: int | None = None

    async def start(self) -> int:
        """Bind (raises OSError) and start serving; returns the port."""
        if logging.getLogger("uvicorn.error").level == logging.NOTSET:
            logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its start/stop lines repeat ours
        self._config.load()
        host = self._config.host
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host.strip("[]"), self._config.port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError("HTTP server stopped during start-up")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self, grace: float) -> None:
        """Stop accepting; answers still being written get ``grace`` seconds, then connections are cut."""
        if self._task is None:
            return
        self._server.should_exit = True
        await asyncio.wait({self._task}, timeout=max(grace, 0.2))
        if not self._task.done():
            # Idle TLS connections wait for the peer's close_notify (up to 30 s): cut them, and
            # cancel answers that outlived the grace period.
            for connection in list(self._server.server_state.connections):
                connection.transport.abort()
            for task in list(self._server.server_state.tasks):
                task.cancel()
            await asyncio.wait({self._task}, timeout=5.0)
        if self._task.done() and not self._task.cancelled() and self._task.exception() is not None:
            log.error("HTTP server stopped with an error", exc_info=self._task.exception())
