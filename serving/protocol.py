"""jaxspec.v1 messages <-> engine inputs and outputs, with field-named validation.

Every refusal is an ``InvalidRequestError`` whose ``field`` is the proto field
path the client sent (``sampling.top_p``, ``stopping.stop``...), so the servicer
can answer INVALID_ARGUMENT naming it. Rules that the engine and
``SamplingParams`` already enforce are not repeated here; their errors are
translated to proto field paths instead.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from jaxspec.engine import FinishReason, InvalidRequestError, RequestOutput, SpecStats
from jaxspec.sampling import SamplingError, SamplingParams
from serving.pb import jaxspec_pb2 as pb

# Engine / SamplingParams names -> proto field paths.
ENGINE_FIELD_TO_PROTO = {
    "prompt": "prompt",
    "prompt_token_ids": "token_ids",
    "max_tokens": "stopping.max_tokens",
    "stop_token_ids": "stopping.stop_token_ids",
    "stop_strings": "stopping.stop",
    "request_id": "request_id",
    "temperature": "sampling.temperature",
    "top_p": "sampling.top_p",
    "top_k": "sampling.top_k",
    "min_p": "sampling.min_p",
    "seed": "sampling.seed",
}

FINISH_REASON_TO_PROTO = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.ABORTED: pb.FINISH_REASON_ABORTED,
    FinishReason.DEADLINE: pb.FINISH_REASON_DEADLINE,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What the server accepts; echoed in ModelInfo so clients can check up front."""

    context_length: int
    vocab_size: int
    default_max_tokens: int = 256
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_stop_token_ids: int = 64
    max_request_id_chars: int = 128
    max_abort_ids: int = 1024
    speculative: bool = False  # the server has a speculative method
    max_speculative_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    request_id: str
    text: str | None  # exactly one of text / token_ids is set
    token_ids: list[int] | None
    params: SamplingParams  # max_tokens is provisional until the prompt length is known
    explicit_max_tokens: bool
    num_speculative_tokens: int | None  # None: the server's default
    use_prefix_cache: bool = True

    def resolve(self, num_prompt_tokens: int, limits: RequestLimits) -> SamplingParams:
        """Final parameters: an unset max_tokens becomes the default, capped by the room left."""
        if self.explicit_max_tokens:
            return self.params
        room = limits.context_length - num_prompt_tokens
        # A prompt that fills the context keeps max_tokens 1 so that the engine reports the prompt.
        return dataclasses.replace(self.params, max_tokens=max(1, min(limits.default_max_tokens, room)))


def to_proto_field(engine_field: str) -> str:
    return ENGINE_FIELD_TO_PROTO.get(engine_field, engine_field)


def translate(error: InvalidRequestError) -> InvalidRequestError:
    """An engine refusal with its field renamed to the proto path."""
    proto_field = to_proto_field(error.field)
    message = str(error).split(": ", 1)[-1]
    return InvalidRequestError(proto_field, message)


def parse_request(req: pb.GenerateRequest, limits: RequestLimits) -> ParsedRequest:
    """Check a GenerateRequest and turn it into engine inputs. Raises InvalidRequestError."""
    request_id = _request_id(req.request_id, limits)
    text, token_ids = _prompt(req)
    params, explicit = _sampling_params(req, limits)
    return ParsedRequest(request_id, text, token_ids, params, explicit, _speculation(req, limits),
                         not req.skip_prefix_cache)


def _request_id(rid: str, limits: RequestLimits) -> str:
    if not rid:
        return uuid.uuid4().hex
    if len(rid) > limits.max_request_id_chars:
        raise InvalidRequestError("request_id", f"at most {limits.max_request_id_chars} characters, got {len(rid)}")
    if not rid.isprintable():
        raise InvalidRequestError("request_id", "must be printable characters only")
    return rid


def _prompt(req: pb.GenerateRequest) -> tuple[str | None, list[int] | None]:
    which = req.WhichOneof("prompt")
    if which == "text" and req.text:
        return req.text, None
    if which == "token_ids" and req.token_ids.ids:
        return None, list(req.token_ids.ids)
    raise InvalidRequestError("prompt", "prompt is empty: set text or token_ids")


def _sampling_params(req: pb.GenerateRequest, limits: RequestLimits) -> tuple[SamplingParams, bool]:
    s, st = req.sampling, req.stopping
    if len(st.stop) > limits.max_stop_strings:
        raise InvalidRequestError("stopping.stop", f"at most {limits.max_stop_strings} stop strings, got {len(st.stop)}")
    for i, stop in enumerate(st.stop):
        if len(stop) > limits.max_stop_string_chars:
            raise InvalidRequestError(
                "stopping.stop", f"stop string {i} has {len(stop)} characters; the limit is {limits.max_stop_string_chars}"
            )
    if len(st.stop_token_ids) > limits.max_stop_token_ids:
        raise InvalidRequestError(
            "stopping.stop_token_ids", f"at most {limits.max_stop_token_ids} ids, got {len(st.stop_token_ids)}"
        )
    kwargs = {name: getattr(s, name) for name in ("temperature", "top_p", "top_k", "min_p", "seed") if s.HasField(name)}
    explicit = st.HasField("max_tokens")
    try:
        params = SamplingParams(
            **kwargs,
            max_tokens=st.max_tokens if explicit else 1,
            stop_token_ids=tuple(st.stop_token_ids),
            stop_strings=tuple(st.stop),
            ignore_eos=st.ignore_eos,
        )
    except SamplingError as e:
        # SamplingParams messages start with the parameter's name ("top_p must be ...").
        name = str(e).split(" ", 1)[0]
        raise InvalidRequestError(ENGINE_FIELD_TO_PROTO.get(name, "sampling"), str(e)) from None
    return params, explicit


def _speculation(req: pb.GenerateRequest, limits: RequestLimits) -> int | None:
    if not req.HasField("speculation"):
        return None
    sp = req.speculation
    enabled = sp.enabled if sp.HasField("enabled") else None
    k = sp.num_speculative_tokens if sp.HasField("num_speculative_tokens") else None
    if enabled is False:
        if k:
            raise InvalidRequestError("speculation.num_speculative_tokens", "set to > 0 while speculation.enabled is false")
        return 0
    if enabled and not limits.speculative:
        raise InvalidRequestError("speculation.enabled", "this server runs without speculative decoding")
    if k is not None and k > limits.max_speculative_tokens:
        raise InvalidRequestError(
            "speculation.num_speculative_tokens",
            f"{k} exceeds the server maximum of {limits.max_speculative_tokens}",
        )
    return k


def check_abort_ids(ids: Sequence[str], limits: RequestLimits) -> None:
    if len(ids) > limits.max_abort_ids:
        raise InvalidRequestError("request_ids", f"at most {limits.max_abort_ids} ids per call, got {len(ids)}")


# ------------------------------------------------------------------ responses
def monotonic_to_timestamp(t: float | None) -> Timestamp | None:
    """Engine times are time.monotonic(); clients want wall-clock times."""
    if t is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int((t + time.time() - time.monotonic()) * 1e9))
    return ts


def spec_stats_to_proto(spec: SpecStats) -> pb.SpeculationStats:
    return pb.SpeculationStats(
        num_drafts=spec.num_drafts,
        num_draft_tokens=spec.num_draft_tokens,
        num_accepted_tokens=spec.num_accepted_tokens,
        acceptance_rate=spec.acceptance_rate,
        mean_acceptance_length=spec.mean_acceptance_length,
        accepted_per_position=spec.accepted_per_position,
        drafted_per_position=spec.drafted_per_position,
    )


def merge_outputs(outputs: Sequence[RequestOutput], *, with_spec: bool) -> pb.GenerateResponse:
    """One response from consecutive outputs of one request (deltas joined, cumulative fields from the last)."""
    last = outputs[-1]
    resp = pb.GenerateResponse(
        request_id=last.request_id,
        text="".join(o.text_delta for o in outputs),
        token_ids=[t for o in outputs for t in o.new_token_ids],
        usage=pb.Usage(prompt_tokens=last.num_prompt_tokens, completion_tokens=last.num_generated_tokens,
                       cached_prompt_tokens=last.num_cached_tokens, preemptions=last.num_preemptions),
        finished=last.finished,
    )
    if not last.finished:
        return resp
    resp.finish_reason = FINISH_REASON_TO_PROTO[last.finish_reason]
    if isinstance(last.stop_match, str):
        resp.stop_string = last.stop_match
    elif last.stop_match is not None:
        resp.stop_token_id = int(last.stop_match)
    if with_spec and last.spec is not None:
        resp.speculation.CopyFrom(spec_stats_to_proto(last.spec))
    for name, t in (("arrival_time", last.arrival_time), ("first_token_time", last.first_token_time),
                    ("last_token_time", last.last_token_time)):
        ts = monotonic_to_timestamp(t)
        if ts is not None:
            getattr(resp.timing, name).CopyFrom(ts)
    return resp
