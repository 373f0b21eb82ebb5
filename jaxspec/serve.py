"""Serve a model over gRPC (jaxspec.v1), e.g. python -m jaxspec.serve --model tiny-moe --port 50051

Continuous batching on one engine thread, streaming, grpc.health.v1, server
reflection and Prometheus metrics. SIGTERM/SIGINT drain the server: new requests
are refused (UNAVAILABLE), in-flight ones get --grace-period seconds to finish,
then the process exits 0; a second signal aborts what is left at once.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # before anything imports jax
    from jaxspec.startup import multiprocess_requested, quiet_start

    quiet_start(backend=not multiprocess_requested(sys.argv[1:]))

import argparse
import asyncio
import logging
import signal

from jaxspec import compilation_cache
from jaxspec import distributed
from jaxspec.config import ConfigError
from jaxspec.generate import k_arg
from jaxspec.loading import DEFAULT_MODEL, default_draft
from jaxspec.mesh import AUTO_MESH, mesh_for_option
from jaxspec.models.kv_cache import KV_DTYPES
from jaxspec.models.quant import MODES as QUANT_MODES
from jaxspec.engine.model_runner import MIXED_PREFILL
from serving.auth import load_token
from serving.build import KV_ADMISSIONS, KV_CACHES, MATMUL_MODES, SPEC_METHODS, EngineOptions, load_engine
from serving.server import JaxSpecServer, ServerOptions

log = logging.getLogger("jaxspec.serving")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's paragraphs and shows defaults only where there is one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS, False) and "%(default)" not in help_text:
            help_text += " (default: %(default)s)"
        return help_text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jaxspec.serve",
        description=__doc__,
        formatter_class=_HelpFormatter,
    )
    m = p.add_argument_group("model and decoding")
    m.add_argument("--model", default=DEFAULT_MODEL,
                   help="'builtin' (the shipped MoE code model), 'builtin-dense' (its dense counterpart of equal "
                   "active size), config name (random weights), jaxspec model "
                   "directory or Hugging Face folder")
    m.add_argument("--draft", default=None,
                   help="draft model for --spec-method draft (same forms as --model; default: the built-in draft "
                   "when the model is a built-in one), or an EAGLE-3 head folder for --spec-method eagle3")
    m.add_argument("--spec-method", choices=SPEC_METHODS, default=None,
                   help="speculative decoding method (default: draft if there is a draft, else none)")
    m.add_argument("--num-speculative-tokens", type=k_arg(1), default="auto", metavar="{K,auto}",
                   help="draft tokens per step, or auto (default): choose k per step, 0 (off) up to "
                   "--max-speculative-tokens, from measured step costs and acceptance")
    m.add_argument("--max-speculative-tokens", type=int, default=4, metavar="K",
                   help="the most a step proposes with auto, and the most a request may ask for")
    m.add_argument("--mesh", default=AUTO_MESH, metavar="NAME",
                   help="device mesh: a config under configs/meshes (e.g. tpu-v5e-8, gpu-8xh100) or a path; "
                   "'auto' picks one for the accelerators present (one device: no mesh)")
    m.add_argument("--slots", type=int, metavar="N", default=8, help="requests decoded together (continuous batching)")
    m.add_argument("--max-len", type=int, metavar="N", default=None,
                   help="context length per request (prompt + output); default: the model's max_seq_len")
    m.add_argument("--kv-cache", choices=KV_CACHES, default="slot",
                   help="KV cache layout: slot (every slot reserves --max-len positions) or paged (one pool of "
                   "pages handed out as requests need them, with prefix caching)")
    m.add_argument("--kv-cache-dtype", choices=KV_DTYPES, default="auto",
                   help="what the target's KV cache stores: auto (the model's dtype) or int8 (per-head-per-token "
                   "scales: half the bytes of bfloat16, so twice the tokens in the same memory)")
    m.add_argument("--draft-kv-cache-dtype", choices=KV_DTYPES, default="auto",
                   help="the draft model's (or EAGLE-3 head's) KV cache, likewise (costs acceptance, never "
                   "correctness)")
    m.add_argument("--page-size", type=int, metavar="N", default=16, help="positions per KV page (--kv-cache paged)")
    m.add_argument("--kv-pages", type=int, metavar="N", default=None,
                   help="pages in the KV pool (--kv-cache paged; on a mesh that splits the slots over data, rounded "
                   "down to whole page groups, one per data shard); default: --slots x --max-len / --page-size")
    m.add_argument("--kv-memory-fraction", type=float, metavar="F", default=None,
                   help="--kv-cache paged: size the pool to this fraction of the device's memory, less the weights "
                   "(instead of --kv-pages)")
    m.add_argument("--no-prefix-cache", action="store_true",
                   help="--kv-cache paged: do not reuse cached pages of earlier prompts' leading blocks")
    m.add_argument("--no-overlap", action="store_true",
                   help="plain decoding: apply each decode step on the host before queuing the next (by default "
                   "step n+1 runs on the device while step n's tokens are checked and sent)")
    m.add_argument("--decode-steps", type=int, metavar="N", default=EngineOptions.decode_steps,
                   help="plain decode steps on one device (no speculation, or adaptive k at 0): run up to N "
                   "as one device call while no "
                   "request waits to be admitted (each step's fixed cost paid once for N; tokens reach clients "
                   "N at a time, and an arriving request waits for the call in flight); 1: one step a call")
    m.add_argument("--kv-admission", choices=KV_ADMISSIONS, default="optimistic",
                   help="--kv-cache paged: 'optimistic' admits a request when its prompt fits and gives it pages "
                   "as it grows, preempting (and later recomputing) the newest request if the pool runs dry; "
                   "'reserve' takes pages for prompt + max_tokens up front, so nothing is ever preempted")
    m.add_argument("--moe-dispatch", default="measured", metavar="{measured,auto,BACKEND}",
                   help="how MoE layers compute their experts: 'measured' times the exact backends at start-up "
                   "on this machine for each step size and keeps the fastest (a CPU, one device, float experts "
                   "over 1 MiB a layer; elsewhere as 'auto'), 'auto' a fixed rule per platform, or one backend "
                   "(dense, per_expert, per_expert_static, expert_rows, sorted, ragged, pallas)")
    m.add_argument("--matmul", choices=MATMUL_MODES, default=EngineOptions.matmul,
                   help="dense projections (attention, dense MLPs, the output head) of up to 64 rows: 'auto' "
                   "computes them with the C++ kernel that streams each weight once for all rows where it "
                   "applies (one CPU device, float32 unquantized weights), else XLA; 'xla' or 'cpu' force one")
    m.add_argument("--mixed-prefill", choices=MIXED_PREFILL, default="auto",
                   help="run a full --max-step-tokens chunk of a long prompt and the running requests' decode "
                   "step as one call, so each layer's weights (the experts) are read once for both: 'auto' on "
                   "TPU/GPU, not on a CPU (compute-bound there, where it measured slower)")
    m.add_argument("--max-step-tokens", type=int, metavar="N", default=512,
                   help="prompt tokens prefilled per engine step; a longer prompt is prefilled in chunks between "
                   "the running requests' decode steps, so it never stalls them for more than one chunk")
    m.add_argument("--max-waiting", type=int, metavar="N", default=256,
                   help="queued requests beyond the slots; more are refused with RESOURCE_EXHAUSTED")
    m.add_argument("--default-max-tokens", type=int, metavar="N", default=256,
                   help="output budget of requests that do not set max_tokens (capped by the context)")
    m.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="override the parameter dtype")
    m.add_argument("--quantize", choices=QUANT_MODES, default=None,
                   help="quantize the target's weights at load: int8 (per-channel scales) or int4 (grouped scales); "
                   "activations stay in --dtype")
    m.add_argument("--draft-quantize", choices=QUANT_MODES, default=None,
                   help="quantize the draft model's weights at load (costs acceptance, never correctness)")
    compilation_cache.add_arguments(m)
    m.add_argument("--kernel-selftest", choices=("on", "off"), default="on",
                   help="on an accelerator, check the Pallas kernels in use against their references at warm-up "
                   "and fall back to XLA's path if one disagrees")

    n = p.add_argument_group("network and security")
    n.add_argument("--host", metavar="ADDR", default="127.0.0.1", help="address to listen on (use 0.0.0.0 to accept remote clients)")
    n.add_argument("--port", type=int, metavar="PORT", default=50051, help="gRPC port (0: pick a free one and log it)")
    n.add_argument("--http-port", type=int, metavar="PORT", default=None,
                   help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                   "/v1/models) on this port, with the same TLS and token (0: pick a free one and log it)")
    n.add_argument("--tls-cert", default=None, metavar="PEM", help="TLS certificate chain (needs --tls-key)")
    n.add_argument("--tls-key", default=None, metavar="PEM", help="TLS private key (needs --tls-cert)")
    n.add_argument("--auth-token-file", default=None, metavar="FILE",
                   help="require 'authorization: Bearer <token>' with the token in FILE (health stays open)")

    o = p.add_argument_group("operations")
    o.add_argument("--metrics-port", type=int, metavar="PORT", default=None,
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (0: pick a free port); on a "
                        "multi-host follower also /health (docs/multihost.md)")
    o.add_argument("--grace-period", type=float, metavar="SECONDS", default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM/SIGINT")
    o.add_argument("--expert-load-interval", type=float, default=10.0, metavar="SECONDS",
                   help="how often the per-expert routing counters are read from the device")
    o.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    distributed.add_arguments(p)
    return p.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> tuple[EngineOptions, ServerOptions]:
    """Checked options (raises ConfigError / ValueError / OSError before anything slow starts)."""
    draft = default_draft(args.model, args.draft, args.spec_method)
    engine = EngineOptions(
        model=args.model, draft=draft, spec_method=args.spec_method or ("draft" if draft else "none"),
        num_speculative_tokens=(args.max_speculative_tokens if args.num_speculative_tokens == "auto"
                                else args.num_speculative_tokens),
        adaptive_k=args.num_speculative_tokens == "auto", slots=args.slots,
        max_len=args.max_len,
        max_waiting=args.max_waiting, dtype=args.dtype, quantize=args.quantize, draft_quantize=args.draft_quantize,
        mesh=args.mesh, default_max_tokens=args.default_max_tokens,
        kernel_selftest=args.kernel_selftest == "on", kv_cache=args.kv_cache, page_size=args.page_size,
        kv_cache_dtype=args.kv_cache_dtype, draft_kv_cache_dtype=args.draft_kv_cache_dtype,
        kv_pages=args.kv_pages, kv_memory_fraction=args.kv_memory_fraction, prefix_cache=not args.no_prefix_cache, overlap=not args.no_overlap, max_step_tokens=args.max_step_tokens, kv_admission=args.kv_admission,
        mixed_prefill=args.mixed_prefill, moe_dispatch=args.moe_dispatch, decode_steps=args.decode_steps,
        matmul=args.matmul,
    )
    engine.validate()
    server = ServerOptions(
        host=args.host, port=args.port, tls_cert=args.tls_cert, tls_key=args.tls_key,
        auth_token=load_token(args.auth_token_file) if args.auth_token_file else None,
        metrics_port=args.metrics_port, http_port=args.http_port, grace_period=args.grace_period,
        expert_load_interval_s=args.expert_load_interval,
    )
    server.validate()
    for path in (args.tls_cert, args.tls_key):
        if path is not None:
            open(path, "rb").close()  # fail now, not after the model loaded
    return engine, server


async def serve(engine_opts: EngineOptions, server_opts: ServerOptions) -> int:
    """Run until drained by a signal (exit code 0) or failed (1)."""
    server = JaxSpecServer(lambda: load_engine(engine_opts), server_opts)
    await server.start()
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("%s: draining (grace period %.1fs)", sig.name, server_opts.grace_period)
            asyncio.ensure_future(server.drain())
        else:
            log.warning("%s again: aborting in-flight requests", sig.name)
            asyncio.ensure_future(server.stop())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    return await server.wait_stopped()


def _speculation(opts: EngineOptions) -> str:
    if not opts.speculative:
        return "none"
    k = f"adaptive k 0..{opts.num_speculative_tokens}" if opts.adaptive_k else f"k {opts.num_speculative_tokens}"
    return f"{opts.spec_method} ({opts.draft}, {k})" if opts.draft else f"{opts.spec_method} ({k})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # first: checking the options starts jax's backend, which must join the job before it starts
        process = distributed.initialize_from_args(args)
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        engine_opts, server_opts = options_from_args(args)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)  # some dependencies install a root handler at import
    if args.log_level != "DEBUG":
        logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-checkpoint INFO lines
    try:
        if not args.no_compilation_cache:
            compilation_cache.enable(args.compilation_cache_dir)
    except PermissionError as e:
        log.error("%s", e)
        return 2
    mesh_cfg = mesh_for_option(engine_opts.mesh)
    log.info("model %s; speculation %s; mesh %s; %d slots; max_len %s; %s KV cache (%s)", engine_opts.model,
             _speculation(engine_opts), f"{mesh_cfg.name} {mesh_cfg.axes}" if mesh_cfg else "none (one device)",
             engine_opts.slots, engine_opts.max_len or "the model's max_seq_len", engine_opts.kv_cache,
             engine_opts.kv_cache_dtype if engine_opts.kv_cache_dtype != "auto" else "model dtype")
    try:
        if process is not None:  # one process of a multi-host job: the leader serves, the others follow
            from serving import multihost

            return multihost.run(process, engine_opts, server_opts)
        return asyncio.run(serve(engine_opts, server_opts))
    except OSError as e:  # port in use, unreadable certificate...
        log.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
