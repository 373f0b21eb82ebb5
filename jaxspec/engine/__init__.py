"""Generation engine: slots, jitted prefill/decode, continuous batching."""

from jaxspec.engine.engine import Engine
from jaxspec.engine.model_runner import ModelRunner, prefill_buckets
from jaxspec.engine.runner import PlainRunner, StepRunner
from jaxspec.engine.request import (
    Completion,
    FinishReason,
    InvalidRequestError,
    QueueFullError,
    Request,
    RequestOutput,
    SpecStats,
)
from jaxspec.engine.slots import SlotTable
from jaxspec.engine.step import DecodePlan, StepResult

__all__ = [
    "Completion", "DecodePlan", "Engine", "FinishReason", "InvalidRequestError", "ModelRunner", "PlainRunner", "QueueFullError",
    "Request", "RequestOutput", "SlotTable", "SpecStats", "StepResult", "StepRunner", "prefill_buckets",
]
