"""GetModelInfo reports the precision the target and draft run in: weights and the target's KV cache."""

from __future__ import annotations

import asyncio

from serving.build import EngineOptions, load_engine
from serving.pb import jaxspec_pb2 as pb
from serving.servicer import JaxSpecServicer


def _model_info(**opts) -> pb.ModelInfo:
    servicer = JaxSpecServicer(engine_loop=None, metrics=None)
    servicer.bundle = load_engine(EngineOptions(model="tiny-moe", slots=2, max_len=64, kernel_selftest=False, **opts))
    return asyncio.run(servicer.GetModelInfo(pb.GetModelInfoRequest(), context=None))


def test_model_info_reports_weight_and_kv_cache_precision():
    info = _model_info(draft="tiny-moe", spec_method="draft", quantize="int8", draft_quantize="int4",
                       kv_cache_dtype="int8")
    assert (info.dtype, info.quantization, info.draft_quantization, info.kv_cache_dtype) == \
        ("float32", "int8", "int4", "int8")
    plain = _model_info(spec_method="none")
    assert (plain.quantization, plain.draft_quantization, plain.kv_cache_dtype) == ("", "", "float32")
