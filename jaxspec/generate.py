"""Command-line generation: ``python -m jaxspec.generate [options] PROMPT``.

Prints the completion; with ``--json`` prints text, token ids, finish reason and timing.
"""

from __future__ import annotations

if __name__ == "__main__":  # before anything imports jax
    from jaxspec.startup import one_shot_gc, quiet_start

    one_shot_gc()
    quiet_start()

import argparse
import contextlib
import json
import logging
import statistics
import sys
import time
from collections import Counter

from jaxspec import compilation_cache, kernels
from jaxspec.checkpoint import CheckpointError
from jaxspec.config import ConfigError
from jaxspec.engine import Engine, InvalidRequestError
from jaxspec.engine.factory import make_runner
from jaxspec.loading import DEFAULT_MODEL, default_draft, draft_load_placement, load_any
from jaxspec.mesh import AUTO_MESH, mesh_for_option, placement_for_mesh
from jaxspec.models.kv_cache import KV_DTYPES
from jaxspec.models.quant import MODES as QUANT_MODES
from jaxspec.sampling import SamplingError, SamplingParams
from jaxspec.speculative import SPEC_METHODS, DraftModelProposer, SpeculativeRunner
from jaxspec.speculative.adaptive import CostModel, KPolicy, Roofline

ONE_SHOT_PROBE_EVERY = 64  # steps with speculation off before trying it again (the server's policy: 16)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxspec.generate",
        description="Generate a completion for PROMPT with a jaxspec model.",
    )
    p.add_argument("prompt", help="prompt text")
    p.add_argument(
        "--model",
        default=None,
        help=f"'builtin' (the shipped MoE code model), 'builtin-dense' (its dense counterpart of equal active size), "
        f"config name (configs/models/*.json; random weights), "
        f"orbax model directory, or Hugging Face folder (default: {DEFAULT_MODEL}, with the built-in draft)",
    )
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="override parameter dtype")
    p.add_argument("--quantize", default=None, choices=QUANT_MODES,
                   help="quantize the target's weights at load: int8 (per-channel scales) or int4 (grouped scales); "
                   "activations stay in --dtype")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_DTYPES,
                   help="the target's KV cache: auto (the model's dtype) or int8 (per-head-per-token scales)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="makes sampled output reproducible")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--max-len", type=int, default=None, help="cache length (default: min(model context, 2048))")
    p.add_argument("--mesh", default=AUTO_MESH, metavar="NAME",
                   help="device mesh config (configs/meshes) or path; 'auto': one for the accelerators present")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of plain text")
    compilation_cache.add_arguments(p)
    p.add_argument("--kernel-selftest", choices=("on", "off"), default="on",
                   help="on an accelerator, check the Pallas kernels in use against their references first "
                   "(falling back to XLA's path if one disagrees)")
    p.add_argument("--warmup", action="store_true",
                   help="compile every step shape and time them before the first token, as the server does "
                   "(default: compile each shape when first used)")
    spec = p.add_argument_group("speculative decoding (output is unchanged; only speed differs)")
    spec.add_argument("--draft", default=None, metavar="NAME_OR_PATH",
                      help="draft model sharing the target's vocabulary ('builtin', config name, orbax dir or HF folder; "
                      "default: the built-in draft when the model is a built-in one); with --spec-method eagle3, an "
                      "EAGLE-3 head folder (EAGLE/SpecForge or speculators layout)")
    spec.add_argument("--spec-method", default=None, choices=list(SPEC_METHODS),
                      help="none: plain decoding; draft: a draft model proposes; ngram: prompt lookup; eagle3: an "
                      "EAGLE-3 head (--draft) drafts from the target's hidden states "
                      "(default: draft if there is a draft, else none)")
    spec.add_argument("--num-speculative-tokens", type=k_arg(0), default="auto", metavar="{K,auto}",
                      help="tokens proposed per step, or auto (default): adapt k to the acceptance and the step "
                      "costs (estimated, then measured on the steps that run; with --warmup, measured first)")
    spec.add_argument("--k-max", type=int, default=8, help="largest k (default 8)")
    spec.add_argument("--draft-quantize", default=None, choices=QUANT_MODES,
                      help="quantize the draft model's weights at load (costs acceptance, never correctness)")
    return p


def k_arg(minimum: int):
    """An argparse type for ``--num-speculative-tokens``: "auto" or an integer >= ``minimum``."""

    def parse(value: str) -> int | str:
        if value == "auto":
            return value
        try:
            k = int(value)
        except ValueError:
            k = None
        if k is None or k < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum} or 'auto', got {value!r}")
        return k

    return parse


def build_engine(args: argparse.Namespace) -> Engine:
    # The mesh first: a model directory is then read straight into its shardings, shard by shard.
    mesh_cfg = mesh_for_option(args.mesh)
    placement = placement_for_mesh(mesh_cfg) if mesh_cfg is not None else None
    model, tokenizer = load_any(args.model, dtype=args.dtype, quantize=args.quantize, placement=placement)
    max_len = args.max_len or min(model.cfg.max_seq_len, 2048)
    draft_name = default_draft(args.model, args.draft, args.spec_method)
    method = args.spec_method or ("draft" if draft_name else "none")
    if args.draft_quantize and method != "draft":
        raise ValueError("--draft-quantize quantizes a draft model (--spec-method draft)")
    draft = None
    if method == "draft" and draft_name:
        draft = load_any(draft_name, dtype=args.dtype, role="draft", quantize=args.draft_quantize,
                         placement=draft_load_placement(draft_name, placement, 1, max_len, args.dtype))[0]
    if method == "eagle3":
        if not draft_name:
            raise ValueError("--spec-method eagle3 needs --draft PATH (an EAGLE-3 head folder)")
        from jaxspec.checkpoint.eagle3_io import load_eagle3

        draft = load_eagle3(draft_name, target=model.cfg, dtype=args.dtype)
    runner = make_runner(model, num_slots=1, max_len=max_len, placement=placement, spec_method=method, draft=draft,
                         num_speculative_tokens=args.num_speculative_tokens, k_max=args.k_max,
                         kv_dtype=args.kv_cache_dtype)
    if getattr(args, "kernel_selftest", "on") == "on":
        kernels.selftest(runner)
    if getattr(args, "warmup", False):
        runner.warmup()
    elif isinstance(runner, SpeculativeRunner) and runner.adaptive and runner.cost_model is None:
        # Timing every k bucket first would compile them all before the first token.
        runner.cost_model = LazyCosts(CostModel.analytic(
            model.cfg, draft.cfg if method == "draft" else None, runner.num_slots, runner.buckets,
            context_len=min(max_len, 512), hw=roofline_for(placement)))
        # A probe's first step compiles its bucket (on a CPU as long as tens of plain steps), which
        # the server paid at warm-up: probe less often.
        runner.policy = KPolicy(runner.buckets, probe_every=ONE_SHOT_PROBE_EVERY)
    return Engine(runner, tokenizer, overlap=True)


def precision(engine: Engine) -> dict[str, dict[str, str | None]]:
    """What the target (and a draft model) compute in: activation dtype and weight quantization (None: float)."""
    of = lambda cfg: {"dtype": cfg.dtype, "quantization": cfg.quantization}  # noqa: E731
    out = {"target": of(engine.cfg)}
    proposer = getattr(engine.runner, "proposer", None)
    if isinstance(proposer, DraftModelProposer):
        out["draft"] = of(proposer.cfg)
    return out


def roofline_for(placement) -> Roofline:
    """Relative step costs before any is measured: the accelerator default, or a CPU's (float32,
    bandwidth- and dispatch-bound)."""
    import jax

    devices = placement.mesh.devices.flat if placement is not None else jax.devices()
    if next(iter(devices)).platform == "cpu":
        return Roofline(bandwidth=2e10, peak_flops=5e10, overhead_s=5e-4, bytes_per_param=4)
    return Roofline()


class LazyCosts(CostModel):
    """Step costs for the adaptive policy without a warm-up: a bucket not yet timed costs its
    analytic estimate scaled by how the timed buckets compared with theirs. A bucket's first step is
    not counted (it compiles or loads the step); its second sets its cost, later ones refine it."""

    def __init__(self, prior: CostModel):
        super().__init__(dict(prior.draft_s), dict(prior.verify_s), source="lazy")
        self.prior = prior
        self.seen: Counter[int] = Counter()
        self.timed: set[int] = set()

    def step_cost(self, kb: int) -> float:
        if kb in self.timed:
            return super().step_cost(kb)
        ratios = [super(LazyCosts, self).step_cost(b) / self.prior.step_cost(b) for b in self.timed]
        return self.prior.step_cost(kb) * (statistics.median(ratios) if ratios else 1.0)

    def observe(self, kb: int, draft_s: float, verify_s: float) -> None:
        self.seen[kb] += 1
        if self.seen[kb] == 1 or kb not in self.verify_s:
            return
        if kb not in self.timed:
            self.timed.add(kb)
            self.draft_s[kb], self.verify_s[kb] = draft_s, verify_s
            return
        super().observe(kb, draft_s, verify_s)


class CompileStatus(logging.Handler):
    """Writes one status line to stderr when the process first compiles (a persistent-cache miss)."""

    LOGGER = "jax._src.compiler"

    def __init__(self, cache_dir):
        super().__init__(logging.DEBUG)
        self.cache_dir = cache_dir
        self.shown = False

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= self.passed_level:  # what the logger would have passed on without us
            logging.getLogger(self.LOGGER).parent.handle(record)
        if self.shown or not record.getMessage().startswith("PERSISTENT COMPILATION CACHE MISS"):
            return
        self.shown = True
        kept = f" (once: kept in {self.cache_dir} for later runs)" if self.cache_dir else ""
        print(f"compiling{kept} ...", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def installed(self):
        # The miss is logged at DEBUG: the logger is opened to DEBUG for this handler alone.
        logger = logging.getLogger(self.LOGGER)
        level, propagate = logger.level, logger.propagate
        self.passed_level = logger.getEffectiveLevel() if propagate else logging.CRITICAL + 1
        logger.addHandler(self)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        try:
            yield self
        finally:
            logger.removeHandler(self)
            logger.setLevel(level)
            logger.propagate = propagate


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
            seed=args.seed, max_tokens=args.max_tokens, stop_strings=tuple(args.stop), ignore_eos=args.ignore_eos,
        )
    except SamplingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        cache = compilation_cache.cli_cache(args.no_compilation_cache, args.compilation_cache_dir)
        with cache as cache_dir, CompileStatus(cache_dir).installed():
            return _run(args, params)
    except PermissionError as e:  # an unsafe cache directory
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, params: SamplingParams) -> int:
    t0 = time.perf_counter()
    try:
        engine = build_engine(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        (result,) = engine.generate([args.prompt], params)
        gen_s = time.perf_counter() - t1
    except InvalidRequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        ttft = (result.first_token_time - result.arrival_time) if result.first_token_time else None
        decode_s = (result.last_token_time - result.first_token_time) if result.first_token_time else 0.0
        n = len(result.token_ids)
        out = {
            "text": result.text,
            "token_ids": result.token_ids,
            "finish_reason": result.finish_reason.value,
            "stop_match": result.stop_match,
            "usage": {"prompt_tokens": result.num_prompt_tokens, "completion_tokens": n},
            "timing": {
                "load_s": round(load_s, 4),
                "generate_s": round(gen_s, 4),
                "time_to_first_token_s": round(ttft, 4) if ttft is not None else None,
                # First-call compilation is included in both figures.
                "decode_tokens_per_s": round((n - 1) / decode_s, 2) if n > 1 and decode_s > 0 else None,
            },
        }
        if result.spec is not None:
            out["spec"] = result.spec.to_dict()
        out["precision"] = precision(engine)
        print(json.dumps(out, ensure_ascii=False))
    else:
        print(result.text)
    return 0


if __name__ == "__main__":
    from jaxspec.startup import fast_exit

    fast_exit(main())
