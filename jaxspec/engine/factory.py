"""The one place that chooses plain or speculative decoding (the CLI and the server both call it)."""

from __future__ import annotations

import logging

from jaxspec.engine.runner import PlainRunner, StepRunner
from jaxspec.engine.cpu_backends import auto_attention, auto_matmul
from jaxspec.engine.model_runner import ModelRunner
from jaxspec.mesh import Placement
from jaxspec.models import Transformer
from jaxspec.models.kv_cache import page_groups, whole_groups
from jaxspec.speculative import AUTO, SPEC_METHODS, SpeculativeRunner, make_proposer

KV_CACHES = ("slot", "paged")
# How MoE layers pick their dispatch: "auto" (a fixed rule per platform and token count),
# "measured" (timed at start-up on this machine where that can matter, ``ModelRunner.tune_moe_dispatch``;
# elsewhere as "auto") or one backend's name (``jaxspec.models.moe_dispatch.BACKENDS``).
MOE_DISPATCH_MODES = ("auto", "measured")
# Attention: "auto" is the C++ kernel (``cpu_kernels.slot_attention``) where it can serve the runner
# (a single CPU device, float32 model and slot cache; ``cpu_backends.auto_attention``), else XLA.
ATTENTION_MODES = ("auto", "xla", "cpu", "pallas")
# Dense projections: "auto" is the C++ products of few rows (``jaxspec.models.dense_cpu``) where they
# can serve the runner (a single CPU device, float32 unquantized weights; ``cpu_backends.auto_matmul``),
# else XLA.
MATMUL_MODES = ("auto", "xla", "cpu")

log = logging.getLogger("jaxspec")


def make_runner(model: Transformer, *, num_slots: int, max_len: int | None = None, placement: Placement | None = None,
                spec_method: str = "none", draft=None,
                num_speculative_tokens: int | str = AUTO, k_max: int = 4,
                page_size: int | None = None, num_pages: int | None = None,
                prefill_chunk: int | None = None, kv_dtype: str | None = None,
                draft_kv_dtype: str | None = None, mixed_prefill: str = "auto",
                moe_dispatch: str = "auto", attention: str = "auto", decode_steps: int = 1,
                matmul: str = "auto") -> StepRunner:
    """A ``PlainRunner`` for ``spec_method="none"``, else a ``SpeculativeRunner`` whose proposer is
    ``draft`` ("draft": a ``Transformer``; "eagle3": an ``Eagle3Head``, which reads this target's hidden
    states) or prompt lookup ("ngram"), with k fixed or "auto" (adaptive, up to k_max).
    ``page_size``: a paged KV cache of ``num_pages`` pages (default: as many positions as the slot
    cache would hold, ``num_slots * max_len``) for the target and a draft model or EAGLE-3 head alike.
    ``prefill_chunk``: prompts longer than this are prefilled in chunks, one per engine step.
    ``kv_dtype`` / ``draft_kv_dtype``: "int8" KV caches (per-head-per-token scales) for the target /
    a draft model, each on its own; None or "auto": the model's dtype.
    ``mixed_prefill``: a full prompt chunk and a plain decode step in one call ("on"), two ("off"),
    or one on accelerators only ("auto"; ``jaxspec.engine.mixed_step``).
    ``moe_dispatch``: ``MOE_DISPATCH_MODES`` or a backend name. ``attention``: ``ATTENTION_MODES``.
    ``matmul``: ``MATMUL_MODES`` (the target's and a draft model's dense projections).
    ``decode_steps``: plain decode steps on one device (speculation off, or none) run up to this
    many per call while nothing waits (``Scheduler.plan_decode``); a drafting step is one call.
    Raises ValueError for an unknown method or an incompatible draft."""
    if spec_method not in SPEC_METHODS:
        raise ValueError(f"spec_method must be one of {', '.join(SPEC_METHODS)}, got {spec_method!r}")
    if page_size is not None and num_pages is None:
        num_pages = num_slots * (max_len or model.cfg.max_seq_len) // page_size
    if page_size is not None:  # pages split over the data axis come in equal groups, one per shard
        num_pages = whole_groups(num_pages, page_groups(placement, num_slots, page_size))
    backend = None if moe_dispatch in MOE_DISPATCH_MODES else check_moe_dispatch(moe_dispatch)
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
    if attention == "auto":
        attention = auto_attention(model.cfg, placement, page_size, kv_dtype)
    if matmul not in MATMUL_MODES:
        raise ValueError(f"matmul must be one of {', '.join(MATMUL_MODES)}, got {matmul!r}")
    if matmul == "auto":
        matmul = auto_matmul(model.cfg, placement)
    target = ModelRunner(model, num_slots, max_len, moe_backend=backend, placement=placement, page_size=page_size,
                         num_pages=num_pages, prefill_chunk=prefill_chunk, kv_dtype=kv_dtype,
                         mixed_prefill=mixed_prefill, attention_backend=attention,
                         decode_steps=decode_steps, matmul_backend=matmul)
    k_max = max(k_max, num_speculative_tokens if isinstance(num_speculative_tokens, int) else 0)
    if moe_dispatch == "measured":
        # Before any step is built: verification steps take the target's backend when they are made.
        table = target.tune_moe_dispatch(tokens_per_row=range(1, k_max + 2) if spec_method != "none" else (1,))
        if table is not None:
            log.info("MoE dispatch measured per step size (tokens <= N: backend): %s",
                     ", ".join(f"{n}: {name}" for n, name in table.choices))
    if spec_method == "none":
        return PlainRunner(target)
    return SpeculativeRunner(target, make_proposer(spec_method, draft, target=model, draft_kv_dtype=draft_kv_dtype),
                             num_speculative_tokens=num_speculative_tokens, k_max=k_max)


def check_moe_dispatch(name: str) -> str:
    """``name`` if it is a ``MOE_DISPATCH_MODES`` entry or a dispatch backend; else ValueError."""
    from jaxspec.models.moe_dispatch import available_backends, load_backend

    if name in MOE_DISPATCH_MODES or load_backend(name):
        return name
    raise ValueError(f"unknown MoE dispatch {name!r}: one of {', '.join(MOE_DISPATCH_MODES + tuple(available_backends()))}")
