"""Building the engine a server runs: model loading, the step runner, and what ModelInfo reports.

``build_runner`` is the one place that chooses plain or speculative decoding;
everything else (engine loop, servicer, metrics) only sees the ``StepRunner``
interface and the ``speculative`` flag.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

import jax
from flax import nnx

from jaxspec.config import ConfigError
from jaxspec.engine import Engine, StepRunner
from jaxspec.engine.kv_admission import KV_ADMISSIONS
from jaxspec.engine.factory import KV_CACHES, MATMUL_MODES, check_moe_dispatch, make_runner
from jaxspec.engine.model_runner import MIXED_PREFILL
from jaxspec import builtin, compilation_cache, kernels
from jaxspec.loading import DEFAULT_MODEL, draft_load_placement, load_any
from jaxspec.mesh import MeshConfigError, Placement, mesh_for_option, placement_for_mesh
from jaxspec.models import KVCache, Transformer
from jaxspec.models.kv_cache import KV_DTYPES, page_groups
from jaxspec.models.quant import MODES as QUANT_MODES
from jaxspec.speculative import SPEC_METHODS, DraftModelProposer
from jaxspec.tokenizer import Tokenizer
from serving.engine_loop import GuardedRunner
from serving.protocol import RequestLimits

log = logging.getLogger("jaxspec.serving")



@dataclasses.dataclass(frozen=True)
class EngineOptions:
    model: str = DEFAULT_MODEL  # config name, orbax model directory or Hugging Face folder
    draft: str | None = None  # draft model (spec_method "draft")
    spec_method: str = "none"
    num_speculative_tokens: int = 4  # the most a step proposes (and a request may ask for); the fixed k if not adaptive
    adaptive_k: bool = True  # choose k per step (0..num_speculative_tokens) from measured acceptance and step costs
    slots: int = 8
    max_len: int | None = None  # per-slot context; None: the model's max_seq_len
    max_waiting: int = 256
    dtype: str | None = None
    quantize: str | None = None  # target weights: "int8" | "int4" (jaxspec.models.quant); None: as loaded
    draft_quantize: str | None = None  # the draft model's weights, likewise
    seed: int = 0  # random-weight configs only
    default_max_tokens: int = 256
    mesh: str | None = None  # mesh config name/path or "auto" (jaxspec.mesh.mesh_for_option); None: one device
    kernel_selftest: bool = True  # on an accelerator, check the Pallas kernels in use first (jaxspec.kernels)
    kv_cache: str = "slot"  # "slot": max_len positions per slot; "paged": a shared pool of pages
    page_size: int = 16  # positions per page (paged)
    kv_pages: int | None = None  # pages in the pool (paged); None: slots * max_len / page_size
    kv_memory_fraction: float | None = None  # paged: size the pool to this fraction of device memory instead
    prefix_cache: bool = True  # paged: reuse cached pages of earlier prompts' leading blocks
    overlap: bool = True  # plain decoding: queue step n+1 before applying step n (Engine(overlap=...))
    max_step_tokens: int = 512  # prompt tokens prefilled per step; longer prompts go in chunks
    mixed_prefill: str = "auto"  # a full chunk with the decode step in one call: on / off / accelerators only
    kv_admission: str = "optimistic"  # paged: take pages as requests grow (preempt when dry) or reserve them up front
    kv_cache_dtype: str = "auto"  # target's KV cache: "auto" (the model's dtype) or "int8" (models.kv_cache)
    draft_kv_cache_dtype: str = "auto"  # a draft model's or EAGLE-3 head's own KV cache, likewise
    moe_dispatch: str = "auto"  # "measured" at start-up, "auto" (fixed rule) or a backend (engine.factory)
    decode_steps: int = 4  # plain decode steps on one device: up to this many per call while nothing waits
    matmul: str = "auto"  # dense projections: the C++ products of few rows where they apply, XLA, or C++ (engine.factory)

    def validate(self) -> None:
        if self.spec_method not in SPEC_METHODS:
            raise ConfigError(f"spec_method must be one of {', '.join(SPEC_METHODS)}, got {self.spec_method!r}")
        if self.spec_method in ("draft", "eagle3") and not self.draft:
            raise ConfigError(f"spec_method {self.spec_method!r} needs a draft model or EAGLE-3 head (--draft)")
        if self.draft and self.spec_method not in ("draft", "eagle3"):
            raise ConfigError(f"--draft is only used with --spec-method draft or eagle3 (got {self.spec_method!r})")
        for name in ("quantize", "draft_quantize"):
            if getattr(self, name) not in (None, *QUANT_MODES):
                raise ConfigError(f"{name} must be one of {', '.join(QUANT_MODES)} or unset, got {getattr(self, name)!r}")
        if self.draft_quantize and self.spec_method != "draft":
            raise ConfigError("--draft-quantize quantizes a draft model (--spec-method draft)")
        for name in ("kv_cache_dtype", "draft_kv_cache_dtype"):
            if getattr(self, name) not in KV_DTYPES:
                raise ConfigError(f"{name} must be one of {', '.join(KV_DTYPES)}, got {getattr(self, name)!r}")
        if self.draft_kv_cache_dtype != "auto" and self.spec_method not in ("draft", "eagle3"):
            raise ConfigError("--draft-kv-cache-dtype sets a draft model's or EAGLE-3 head's cache "
                              "(--spec-method draft or eagle3)")
        if self.spec_method != "none" and self.num_speculative_tokens < 1:
            raise ConfigError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        for name in ("slots", "max_waiting", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_len is not None and self.max_len < 2:
            raise ConfigError(f"max_len must be >= 2, got {self.max_len}")
        if self.kv_cache not in KV_CACHES:
            raise ConfigError(f"kv_cache must be one of {', '.join(KV_CACHES)}, got {self.kv_cache!r}")
        if self.page_size < 1 or (self.max_len is not None and self.max_len % self.page_size):
            raise ConfigError(f"page_size {self.page_size} must be >= 1 and divide max_len ({self.max_len})")
        if self.max_step_tokens < 1:
            raise ConfigError(f"max_step_tokens must be >= 1, got {self.max_step_tokens}")
        if self.decode_steps < 1:
            raise ConfigError(f"decode_steps must be >= 1, got {self.decode_steps}")
        if self.matmul not in MATMUL_MODES:
            raise ConfigError(f"matmul must be one of {', '.join(MATMUL_MODES)}, got {self.matmul!r}")
        if self.mixed_prefill not in MIXED_PREFILL:
            raise ConfigError(f"mixed_prefill must be one of {', '.join(MIXED_PREFILL)}, got {self.mixed_prefill!r}")
        if self.kv_admission not in KV_ADMISSIONS:
            raise ConfigError(f"kv_admission must be one of {', '.join(KV_ADMISSIONS)}, got {self.kv_admission!r}")
        if self.kv_pages is not None and self.kv_pages < 1:
            raise ConfigError(f"kv_pages must be >= 1, got {self.kv_pages}")
        if self.kv_memory_fraction is not None:
            if not 0 < self.kv_memory_fraction < 1:
                raise ConfigError(f"kv_memory_fraction must be in (0, 1), got {self.kv_memory_fraction}")
            if self.kv_pages is not None or self.kv_cache != "paged":
                raise ConfigError("kv_memory_fraction sizes a paged cache (--kv-cache paged) instead of --kv-pages")
        try:
            check_moe_dispatch(self.moe_dispatch)
        except ValueError as e:
            raise ConfigError(f"moe_dispatch: {e}") from e
        try:
            mesh_for_option(self.mesh)
        except MeshConfigError as e:
            raise ConfigError(f"--mesh: {e}") from e

    @property
    def speculative(self) -> bool:
        return self.spec_method != "none"


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    """Static facts for GetModelInfo."""

    model_id: str
    context_length: int
    vocab_size: int
    eos_ids: tuple[int, ...]
    num_slots: int
    spec_method: str = "none"
    max_speculative_tokens: int = 0
    draft_model_id: str = ""
    platform: str = ""
    devices: tuple[str, ...] = ()
    mesh_shape: dict[str, int] = dataclasses.field(default_factory=dict)
    dtype: str = ""
    quantization: str = ""  # the target's weights: "int8", "int4"; "": float (dtype)
    draft_quantization: str = ""  # a draft model's, likewise
    kv_cache_dtype: str = ""  # what the target's KV cache stores: "int8" or a float dtype
    num_experts: int = 0
    num_experts_per_token: int = 0


@dataclasses.dataclass
class EngineBundle:
    engine: Engine
    tokenizer: Tokenizer
    description: ModelDescription
    limits: RequestLimits


def engine_placement(opts: EngineOptions) -> Placement | None:
    """The target's placement for ``opts.mesh`` (None: one device), built before any weights are
    read so they can be read straight into it."""
    mesh_cfg = mesh_for_option(opts.mesh)
    return placement_for_mesh(mesh_cfg) if mesh_cfg is not None else None


def build_runner(opts: EngineOptions, model: Transformer, tokenizer: Tokenizer) -> StepRunner:
    """The step runner for ``opts``: plain decoding, or draft-then-verify.

    ``jaxspec.engine.factory.make_runner`` picks the decoding method (for the CLI too). The
    serving layer only needs a ``StepRunner`` that honours ``Request.num_speculative_tokens``
    (0 = plain decoding for that request), as ``SpeculativeRunner`` does. A draft model is
    read straight into its shardings on the mesh (each process reading its own shards).
    """
    mesh_cfg = mesh_for_option(opts.mesh)
    placement = placement_for_mesh(mesh_cfg) if mesh_cfg is not None else None
    if placement is not None:
        log.info("mesh %s %s", mesh_cfg.name, mesh_cfg.axes)
    draft_model = None
    if opts.spec_method == "eagle3":
        from jaxspec.checkpoint.eagle3_io import load_eagle3

        log.info("loading EAGLE-3 head %s", opts.draft)
        draft_model = load_eagle3(opts.draft, target=model.cfg, dtype=opts.dtype)
    if opts.spec_method == "draft":
        log.info("loading draft model %s", opts.draft)
        draft_model, draft_tokenizer = load_any(opts.draft, dtype=opts.dtype, seed=opts.seed, role="draft",
                                                quantize=opts.draft_quantize,
                                                placement=draft_load_placement(
                                                    opts.draft, placement, opts.slots,
                                                    opts.max_len or model.cfg.max_seq_len, opts.dtype,
                                                    opts.draft_kv_cache_dtype))
        if draft_tokenizer.vocab_size != tokenizer.vocab_size:
            raise ConfigError(
                f"draft tokenizer has {draft_tokenizer.vocab_size} tokens, the target's {tokenizer.vocab_size}: "
                "a draft must share the target's vocabulary"
            )
    kv_pages = opts.kv_pages
    if opts.kv_memory_fraction is not None:
        kv_pages = pages_for_memory_fraction(opts, model, draft_model, placement)
        log.info("KV pool: %d pages of %d positions (%.0f%% of device memory less weights)", kv_pages,
                 opts.page_size, 100 * opts.kv_memory_fraction)
    try:
        return make_runner(model, num_slots=opts.slots, max_len=opts.max_len, placement=placement,
                           spec_method=opts.spec_method, draft=draft_model,
                           num_speculative_tokens="auto" if opts.adaptive_k else opts.num_speculative_tokens,
                           k_max=opts.num_speculative_tokens,
                           page_size=opts.page_size if opts.kv_cache == "paged" else None, num_pages=kv_pages,
                           prefill_chunk=opts.max_step_tokens, kv_dtype=opts.kv_cache_dtype,
                           draft_kv_dtype=opts.draft_kv_cache_dtype, mixed_prefill=opts.mixed_prefill,
                           moe_dispatch=opts.moe_dispatch, decode_steps=opts.decode_steps, matmul=opts.matmul)
    except ValueError as e:  # incompatible draft (vocabulary, context length)
        raise ConfigError(str(e)) from e


def pages_for_memory_fraction(opts: EngineOptions, model: Transformer, draft=None,
                              placement: Placement | None = None) -> int:
    """Pages of the target's (and a draft model's or EAGLE-3 head's: each pages its cache page for
    page with the target) cache that fit ``kv_memory_fraction`` of one
    device's memory after the weights (the first device; per-device on a mesh: weights and
    pages are counted as if unsharded, which under-fills a sharded pool rather than overfilling it).
    Pages split over ``placement``'s data axis (``page_groups``) hold a group per data shard: the pool
    is that many times the pages one device holds."""
    from jaxspec.mesh import device_memory_bytes

    hbm = device_memory_bytes(jax.devices()[0])
    if hbm is None:
        raise ConfigError("--kv-memory-fraction needs a device that reports its memory (this one does not): "
                          "give the pool's size with --kv-pages")
    models = [(model, opts.kv_cache_dtype)] + ([(draft, opts.draft_kv_cache_dtype)] if draft is not None else [])
    weights = sum(x.size * x.dtype.itemsize for m, _ in models for x in jax.tree.leaves(nnx.state(m)))
    # One page of every layer's keys and values (int8: a byte per value plus a float32 scale per head).
    per_page = sum(KVCache.abstract(m.cfg, 1, opts.page_size, num_pages=1, page_size=opts.page_size,
                                    kv_dtype=kv).nbytes() - 2 * 4 for m, kv in models)
    pages = int((hbm * opts.kv_memory_fraction - weights) // per_page)
    pages *= page_groups(placement, opts.slots, opts.page_size)
    if pages < 1:
        raise ConfigError(f"--kv-memory-fraction {opts.kv_memory_fraction}: {hbm * opts.kv_memory_fraction / 2**30:.2f} "
                          f"GiB leaves no room for KV pages beside {weights / 2**30:.2f} GiB of weights")
    return pages


def load_engine(opts: EngineOptions, wrap_runner: Callable[[StepRunner], StepRunner] | None = None) -> EngineBundle:
    """Load the model(s) and build the engine (slow: call on the engine thread).

    ``wrap_runner`` may wrap the step runner (tests inject faults and delays this way)."""
    opts.validate()
    # The mesh first, then the weights: a model directory is read straight into its shardings,
    # each process of a multi-host job reading only its own devices' shards.
    placement = engine_placement(opts)
    log.info("loading model %s", opts.model)
    model, tokenizer = load_any(opts.model, dtype=opts.dtype, seed=opts.seed, quantize=opts.quantize,
                                placement=placement)
    _check_memory(opts, model)
    runner = build_runner(opts, model, tokenizer)
    if opts.kernel_selftest:
        kernels.selftest(runner)
    if wrap_runner is not None:
        runner = wrap_runner(runner)
    return bundle_engine(
        runner, tokenizer, model_id=_model_id(opts.model), max_waiting=opts.max_waiting,
        spec_method=opts.spec_method, max_speculative_tokens=opts.num_speculative_tokens if opts.speculative else 0,
        draft_model_id=_model_id(opts.draft, "draft") if opts.draft else "", default_max_tokens=opts.default_max_tokens,
        prefix_caching=opts.prefix_cache, prefill_token_budget=opts.max_step_tokens, overlap=opts.overlap,
        kv_admission=opts.kv_admission,
    )


def _check_memory(opts: EngineOptions, model: Transformer) -> None:
    """Refuse slots x context that cannot fit the device before the KV cache is allocated
    (an out-of-memory at allocation or mid-warm-up says much less)."""
    from jaxspec.planning import DoesNotFit, check_fits_on_device

    from jaxspec.planning import check_fits

    max_len = opts.max_len or model.cfg.max_seq_len
    if opts.kv_cache == "paged" and max_len % opts.page_size:
        raise ConfigError(f"--page-size {opts.page_size} must divide the context length {max_len}")
    slots = opts.slots
    if opts.kv_cache == "paged" and opts.kv_pages is not None:  # the pool's positions, in whole contexts
        slots = -(-opts.kv_pages * opts.page_size // max_len)
    try:
        mesh_cfg = mesh_for_option(opts.mesh)
        if mesh_cfg is None:
            plan = check_fits_on_device(model.cfg, slots, max_len, kv_dtype=opts.kv_cache_dtype)
        else:
            plan = check_fits(model.cfg, mesh_cfg, slots, max_len, devices=jax.devices(), compile=False,
                              kv_dtype=opts.kv_cache_dtype)
    except MeshConfigError as e:
        raise ConfigError(f"--mesh: {e}") from e
    except DoesNotFit as e:
        raise ConfigError(f"--slots/--max-len do not fit: {e}") from e
    log.info("memory per device: %.2f GiB (weights %.2f, KV cache %.2f)", plan.total / 2**30,
             plan.weights / 2**30, plan.kv_cache / 2**30)


def bundle_engine(
    runner: StepRunner,
    tokenizer: Tokenizer,
    *,
    model_id: str,
    max_waiting: int = 256,
    spec_method: str = "none",
    max_speculative_tokens: int = 0,
    draft_model_id: str = "",
    default_max_tokens: int = 256,
    prefix_caching: bool = True,
    prefill_token_budget: int = 1024,
    overlap: bool = True,
    kv_admission: str = "optimistic",
) -> EngineBundle:
    """An engine around ``runner`` (wrapped so request failures are logged) and its descriptions."""
    speculative = spec_method != "none"
    engine = Engine(GuardedRunner(runner), tokenizer, max_waiting=max_waiting, speculative=speculative,
                    prefix_caching=prefix_caching, prefill_token_budget=prefill_token_budget, overlap=overlap,
                    kv_admission=kv_admission)
    cfg = runner.cfg
    proposer = getattr(runner, "proposer", None)
    draft_quantization = proposer.cfg.quantization if isinstance(proposer, DraftModelProposer) else None
    platform, devices, mesh = runner.device_info()
    description = ModelDescription(
        model_id=model_id, context_length=engine.max_len, vocab_size=cfg.vocab_size, eos_ids=engine.eos_ids,
        num_slots=runner.num_slots, spec_method=spec_method, max_speculative_tokens=max_speculative_tokens,
        draft_model_id=draft_model_id, platform=platform, devices=devices, mesh_shape=mesh, dtype=cfg.dtype,
        quantization=cfg.quantization or "", draft_quantization=draft_quantization or "",
        kv_cache_dtype=_kv_cache_dtype(runner),
        num_experts=cfg.num_experts, num_experts_per_token=cfg.num_experts_per_tok,
    )
    limits = RequestLimits(
        context_length=engine.max_len, vocab_size=cfg.vocab_size, default_max_tokens=default_max_tokens,
        speculative=speculative, max_speculative_tokens=max_speculative_tokens,
    )
    return EngineBundle(engine, tokenizer, description, limits)


def _kv_cache_dtype(runner: StepRunner) -> str:
    """What the target's KV cache stores ("int8" or the model's dtype), for ModelInfo."""
    model_runner = getattr(runner, "target", None) or getattr(runner, "runner", None)
    return getattr(model_runner, "kv_dtype", None) or runner.cfg.dtype


def _model_id(name_or_path: str, role: str = "target") -> str:
    if builtin.is_builtin(name_or_path):  # builtin-target, builtin-dense-draft, ...
        return f"{name_or_path}-{role}"
    path = Path(name_or_path)
    return path.name if path.is_dir() else name_or_path


def enable_compilation_cache(directory: str | Path) -> None:
    """Persist compiled executables under ``directory`` (``jaxspec.compilation_cache.enable``)."""
    compilation_cache.enable(directory)
