"""Greedy-decode throughput: transformers (torch, CPU) vs jaxspec, in process and through the gRPC server.

    python tools/compare_transformers.py                      # all rows, batch/concurrency 1 and 8
    python tools/compare_transformers.py --repeats 1 --no-transformers --json out.json
    python tools/compare_transformers.py --serve-args "--spec-method ngram --num-speculative-tokens 4"

Creates a random-weight Mixtral with transformers (defaults: 6 layers, d_model 256,
8 experts top-2 of width 512, vocab 4096, 8 heads / 2 KV heads, float32, context 512),
saves it with a small tokenizer to a temporary folder and loads it into jaxspec with
``load_hf``. Prompts are random token ids, lengths drawn from [--prompt-len-min,
--prompt-len-max] with a fixed seed (or all --prompt-len long); each is decoded greedily
for --new-tokens tokens, EOS ignored. At batch (or concurrency) B every row decodes the
same max(--requests, B x --requests-per-client) prompts: 8 at B=1, 16 at B=8.

* transformers   ``model.generate(do_sample=False)``, B prompts per call (left padded)
* jaxspec loop   the bare model: a jitted prefill of B prompts (padded to a power of two)
                 and one jitted ``fori_loop`` of decode steps over the donated cache, with the
                 engine's MoE dispatch (its measured table unless --no-engine)
* jaxspec engine the engine the server builds from the same flags (``serving.build.load_engine``),
                 in process, B prompts per ``Engine.generate`` call (the server minus gRPC)
* jaxspec server ``python -m jaxspec.serve`` in a subprocess (default --slots, its context
                 the model's 512 unless --serve-args has --max-len; --spec-method none
                 unless --serve-args says otherwise), B client threads sending unary
                 requests back-to-back; one untimed warm-up request first

tokens/s = generated tokens / wall time of the level (prefill included; best of
--repeats after an untimed warm-up pass, where jaxspec compiles). P50/P99: per-request
latency (in-process rows: per call). "same tokens": fraction equal to transformers' at
that batch (random weights give near-tied logits, so a late divergence is no error);
server rows also get "same_engine" (vs the in-process engine; both jaxspec float32
greedy, so 1.0 for plain decoding), "wait_s" (mean send -> the engine took the request:
gRPC plus waiting for the engine thread's current step) and "reply_s" (last token -> client).
"served / bare" = tokens/s over the bare loop's at that batch. The bars printed at the
end: served >= 2x transformers and served >= 80% of bare, at the same batch. The server
shares this process' compilation cache, so its warm-up loads rather than compiles.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental.compilation_cache import compilation_cache  # noqa: E402

from jaxspec.checkpoint import load_hf  # noqa: E402
from jaxspec.models import KVCache, Transformer  # noqa: E402
from jaxspec.models.expert_slices import split_experts  # noqa: E402

Prompts = list  # of 1-D int arrays (lengths differ)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="in-process batch sizes")
    p.add_argument("--concurrency", type=int, nargs="+", default=None,
                   help="server client threads (default: the batch sizes)")
    p.add_argument("--requests", type=int, default=8, help="prompts decoded at each level, at least")
    p.add_argument("--requests-per-client", type=int, default=2,
                   help="level B decodes max(--requests, B x this) prompts (8 server clients: 2 requests each)")
    p.add_argument("--prompt-len", type=int, default=None, help="fixed prompt length (overrides min/max)")
    p.add_argument("--prompt-len-min", type=int, default=100)
    p.add_argument("--prompt-len-max", type=int, default=200)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per row; the best is reported")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--expert-dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--max-positions", type=int, default=None,
                   help="max_position_embeddings, the server's context per slot (default: the smallest power "
                   "of two >= longest prompt + new tokens, at least 64: 512 with the defaults)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers rows (torch still "
                   "writes the checkpoint)")
    p.add_argument("--no-engine", action="store_true", help="skip the in-process engine rows")
    p.add_argument("--no-server", action="store_true", help="skip the gRPC server rows")
    p.add_argument("--serve-args", default="", help="extra flags for python -m jaxspec.serve (later flags win)")
    p.add_argument("--server-start-timeout", type=float, default=900.0, help="seconds to load and compile")
    p.add_argument("--level-timeout", type=float, default=600.0, help="seconds one server level may take")
    p.add_argument("--json", default=None, metavar="PATH", help="write config, rows and bars as JSON")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.prompt_len is not None:
        args.prompt_len_min = args.prompt_len_max = args.prompt_len
    if not 1 <= args.prompt_len_min <= args.prompt_len_max:
        p.error("need 1 <= --prompt-len-min <= --prompt-len-max")
    if args.max_positions is not None and args.max_positions < args.prompt_len_max + args.new_tokens:
        p.error("--max-positions must hold the longest prompt plus --new-tokens")
    if args.max_positions is None:
        args.max_positions = max(64, 1 << (args.prompt_len_max + args.new_tokens - 1).bit_length())
    args.concurrency = args.concurrency or args.batch_sizes
    return args


# ------------------------------------------------------------------ checkpoint
def make_checkpoint(args: argparse.Namespace, directory: Path):
    """A random Mixtral saved by transformers (safetensors) plus a small byte-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(args.seed)
    cfg = MixtralConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.expert_dim,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=args.max_positions,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,  # no EOS: every side generates the full length
    )
    model = MixtralForCausalLM(cfg).to(torch.float32).eval()
    model.save_pretrained(directory)
    # load_hf wants a tokenizer; this benchmark feeds token ids, so any small one will do.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["benchmark text"], trainers.BpeTrainer(
        vocab_size=260, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]))
    tok.save(str(directory / "tokenizer.json"))
    return model


def levels(args: argparse.Namespace) -> list[int]:
    return sorted(set(args.batch_sizes) | set(args.concurrency))


def workload(args: argparse.Namespace, level: int) -> int:
    """Prompts decoded at batch/concurrency ``level``: every row of that level decodes the same ones."""
    return max(args.requests, level * args.requests_per_client)


def make_prompts(args: argparse.Namespace) -> Prompts:
    rng = np.random.RandomState(args.seed + 1)
    lengths = rng.randint(args.prompt_len_min, args.prompt_len_max + 1, size=workload(args, max(levels(args))))
    return [rng.randint(1, args.vocab, size=n) for n in lengths]


# ---------------------------------------------------------------- generators
# Each generator decodes one batch (a list of prompts) and returns [len(batch), new_tokens].
def transformers_generate(model, batch: Prompts, new_tokens: int) -> np.ndarray:
    import torch

    width = max(map(len, batch))
    ids = np.zeros((len(batch), width), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(batch):  # left padding: generate appends after the last column
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
        )
    return out[:, width:].numpy()


def pow2_bucket(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def jaxspec_loop(model: Transformer, new_tokens: int, moe_backend=None,
                 expert_slices: bool = False, attention: str = "xla",
                 matmul: str = "xla") -> Callable[[Prompts], np.ndarray]:
    """Greedy generation: jitted prefill, then a jitted fori_loop of decode steps (cache donated).
    ``moe_backend``: the MoE dispatch (the engine's measured table, so both run the same experts' code);
    ``expert_slices``: the expert weights one array per expert, as the engine holds them then;
    ``attention``, ``matmul``: the engine's attention and dense-projection backends."""
    graphdef, state = nnx.split(model)
    if expert_slices:
        state = split_experts(nnx.to_pure_dict(state))

    @partial(jax.jit, donate_argnums=(3,))
    def prefill(state, tokens, lengths, cache):
        # Right-padded rows: num_valid masks the padding and sets each row's cache length.
        out = nnx.merge(graphdef, state)(tokens, jnp.zeros_like(lengths), cache, num_valid=lengths,
                                         moe_backend=moe_backend, logits_at=lengths - 1, attention_backend=attention,
                                         matmul_backend=matmul)
        last = out.logits[:, 0]
        return jnp.argmax(last, axis=-1).astype(jnp.int32), out.cache

    @partial(jax.jit, donate_argnums=(2,))
    def decode(state, first, cache):
        b = first.shape[0]
        model = nnx.merge(graphdef, state)

        def step(i, carry):
            tokens, cache, out = carry
            # each row at its own length
            o = model(tokens[:, None], cache.lengths, cache, moe_backend=moe_backend, attention_backend=attention,
                      matmul_backend=matmul)
            nxt = jnp.argmax(o.logits[:, 0], axis=-1).astype(jnp.int32)
            return nxt, o.cache, out.at[:, i + 1].set(nxt)

        out = jnp.zeros((b, new_tokens), jnp.int32).at[:, 0].set(first)
        _, cache, out = jax.lax.fori_loop(0, new_tokens - 1, step, (first, cache, out))
        return out, cache

    def run(batch: Prompts) -> np.ndarray:
        lengths = np.array([len(p) for p in batch], np.int32)
        width = pow2_bucket(int(lengths.max()))  # few shapes, few compilations (as the engine)
        tokens = np.full((len(batch), width), model.cfg.pad_id, np.int32)
        for i, p in enumerate(batch):
            tokens[i, : len(p)] = p
        cache = KVCache.create(model.cfg, len(batch), width + new_tokens)
        first, cache = prefill(state, jnp.asarray(tokens), jnp.asarray(lengths), cache)
        out, _ = decode(state, first, cache)
        return np.asarray(out)

    return run


def jaxspec_engine(served: argparse.Namespace, new_tokens: int):
    """The engine the server builds from the same flags (runner, slots, context, scheduling), in process."""
    from jaxspec.sampling import SamplingParams
    from jaxspec.serve import options_from_args
    from serving.build import load_engine

    engine = load_engine(options_from_args(served)[0]).engine
    engine.runner.warmup()  # every prefill bucket and the decode step, as the server does before SERVING
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)

    def run(batch: Prompts) -> np.ndarray:
        done = engine.generate([list(map(int, p)) for p in batch], params)
        return np.array([c.token_ids for c in done])

    run.moe_backend = engine.runner.moe_dispatch()  # with --moe-dispatch measured (the default): the measured table
    # The layout the table was measured for is the one the engine's runner holds (``tune_moe_dispatch``).
    run.expert_slices = getattr(run.moe_backend, "expert_slices", False)
    run.attention = engine.runner.attention_backend()
    run.matmul = engine.runner.matmul_backend()
    return run


def timed_batches(fn: Callable[[Prompts], np.ndarray], prompts: Prompts, batch: int, repeats: int,
                  warm_all: bool = True) -> dict:
    """Decode the pool ``batch`` prompts per call; best wall of ``repeats`` after a warm-up pass
    (the whole pool for jaxspec, whose shapes compile; one prompt for torch, which only warms up)."""
    chunks = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    for chunk in chunks if warm_all else [prompts[:1]]:
        fn(chunk)
    best = None
    for _ in range(repeats):
        lat, outs, start = [], [], time.perf_counter()
        for chunk in chunks:
            t0 = time.perf_counter()
            outs.append(fn(chunk))
            lat.append(time.perf_counter() - t0)
        wall = time.perf_counter() - start
        if best is None or wall < best["seconds"]:
            best = dict(seconds=wall, latencies=lat, tokens=[t for o in outs for t in o])
    return best


# ---------------------------------------------------------------- the server
class ServerProcess:
    """``python -m jaxspec.serve`` on a free loopback port; always stopped on exit."""

    def __init__(self, flags: list[str], log_path: Path, start_timeout: float):
        self.cmd = [sys.executable, "-m", "jaxspec.serve", *flags]
        self.log_path, self.start_timeout = log_path, start_timeout
        self.proc: subprocess.Popen | None = None
        self.target = ""

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def __enter__(self) -> "ServerProcess":
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        # Same matmul precision as this process, so server and in-process engine compute alike.
        env["JAX_DEFAULT_MATMUL_PRECISION"] = str(jax.config.jax_default_matmul_precision or "default")
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            self._wait_healthy()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_healthy(self) -> None:
        from serving.client import JaxSpecClient

        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if not self.target:  # with --port 0 the server logs the port it bound (no race for a free one)
                m = re.search(r"listening on (\S+) \(", self.log_path.read_text(errors="replace"))
                self.target = m.group(1) if m else ""
            if self.target:
                with JaxSpecClient(self.target) as client:
                    try:
                        if client.health(timeout=2.0) == "SERVING":
                            return
                    except Exception:  # not accepting connections yet
                        pass
            time.sleep(0.5)
        raise TimeoutError(f"server not SERVING after {self.start_timeout:.0f}s:\n{self.log_tail()}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # SIGTERM drains; nothing is in flight by now
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


def serve_pool(target: str, prompts: Prompts, concurrency: int, new_tokens: int, timeout: float) -> dict:
    """``concurrency`` client threads take prompts from a shared queue, one unary request at a time."""
    from serving.client import JaxSpecClient

    todo: queue.SimpleQueue = queue.SimpleQueue()
    for item in enumerate(prompts):
        todo.put(item)
    tokens: list = [None] * len(prompts)
    lat, wait, reply, errors = [0.0] * len(prompts), [0.0] * len(prompts), [0.0] * len(prompts), []
    deadline = time.monotonic() + timeout

    def worker() -> None:
        with JaxSpecClient(target) as client:
            while time.monotonic() < deadline:
                try:
                    i, p = todo.get_nowait()
                except queue.Empty:
                    return
                t0, sent = time.perf_counter(), time.time()
                try:
                    r = client.generate(list(map(int, p)), max_tokens=new_tokens, ignore_eos=True, temperature=0.0,
                                        timeout=max(1.0, deadline - time.monotonic()))
                except Exception as e:  # reported below; the other threads go on
                    errors.append(f"{type(e).__name__}: {e}")
                    return
                lat[i], received = time.perf_counter() - t0, time.time()
                tokens[i] = np.array(r.token_ids)
                # Wall clock on both sides (one host): send -> the engine took the request (gRPC in, then
                # waiting for the engine thread to end its current step), last token -> client (gRPC out).
                wait[i] = r.timing.arrival_time.ToNanoseconds() / 1e9 - sent
                reply[i] = received - r.timing.last_token_time.ToNanoseconds() / 1e9

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 5.0)
    wall = time.perf_counter() - start
    if errors or any(t is None for t in tokens):
        raise RuntimeError(f"server level {concurrency}: {len(errors)} failed request(s), "
                           f"{sum(t is None for t in tokens)} unfinished; first error: {errors[:1]}")
    return dict(seconds=wall, latencies=lat, tokens=tokens, wait_s=float(np.mean(wait)), reply_s=float(np.mean(reply)))


# ------------------------------------------------------------------ reporting
def make_row(impl: str, level: int, res: dict, reference) -> dict:
    n = sum(len(t) for t in res["tokens"])
    row = dict(impl=impl, batch=level, seconds=res["seconds"], tokens=n, tok_s=n / res["seconds"],
               p50_s=float(np.percentile(res["latencies"], 50)), p99_s=float(np.percentile(res["latencies"], 99)),
               same=same_fraction(res["tokens"], reference) if reference is not None else None)
    row.update({k: res[k] for k in ("wait_s", "reply_s") if k in res})
    print(f"  {impl} batch {level}: {row['tok_s']:.1f} tokens/s", flush=True)
    return row


def same_fraction(tokens, reference) -> float:
    return float(np.mean(np.concatenate([np.asarray(a) == np.asarray(b) for a, b in zip(tokens, reference)])))


def ratio(row: dict, rows: list[dict], impl: str) -> float | None:
    base = [r["tok_s"] for r in rows if r["impl"] == impl and r["batch"] == row["batch"]]
    return row["tok_s"] / base[0] if base else None


def report(rows: list[dict]) -> list[dict]:
    def fmt(x, width: int, spec: str, suffix: str = "") -> str:
        return f"{'-' if x is None else format(x, spec) + suffix:>{width}}"

    order = {"transformers": 0, "jaxspec loop": 1, "jaxspec engine": 2, "jaxspec server": 3}
    rows.sort(key=lambda r: (r["batch"], order[r["impl"]]))  # each batch's rows together
    head = ["implementation".ljust(15), "batch", " seconds", " tokens/s", "vs transformers", "served / bare",
            "same tokens", "p50 (s)", "p99 (s)"]
    print("\n| " + " | ".join(head) + " |\n|" + "|".join("-" * (len(h) + 1) + (":" if i else "-")
                                                     for i, h in enumerate(head)) + "|")
    for r in rows:
        r["vs_transformers"] = ratio(r, rows, "transformers")
        r["vs_bare"] = ratio(r, rows, "jaxspec loop") if r["impl"] in ("jaxspec engine", "jaxspec server") else None
        same = None if r["same"] is None else r["same"] * 100
        print(f"| {r['impl']:<15} | {r['batch']:>5} | {r['seconds']:>8.3f} | {r['tok_s']:>9.1f} | "
              f"{fmt(r['vs_transformers'], 15, '.2f', 'x')} | {fmt(r['vs_bare'], 13, '.0%')} | "
              f"{fmt(same, 11, '.1f', '%')} | "
              f"{r['p50_s']:>7.3f} | {r['p99_s']:>7.3f} |")
    bars = [dict(bar=name, batch=r["batch"], value=value, met=value >= need)
            for r in rows if r["impl"] == "jaxspec server"
            for name, value, need in (("served >= 2x transformers", r["vs_transformers"], 2.0),
                                      ("served >= 80% of bare", r["vs_bare"], 0.8)) if value is not None]
    print()
    for b in bars:
        print(f"bar {b['bar']} at batch {b['batch']}: {'met' if b['met'] else 'NOT met'} ({b['value']:.2f})")
    for r in rows:
        if "same_engine" in r:
            print(f"server at batch {r['batch']}: {r['same_engine']:.1%} of tokens as the in-process engine's; per "
                  f"request {r['wait_s'] * 1e3:.1f} ms until the engine took it, {r['reply_s'] * 1e3:.1f} ms reply")
    return bars


# ------------------------------------------------------------------------ main
def in_process_rows(args, prompts: Prompts, hf_model, model, served, rows: list, tokens: dict) -> None:
    """transformers, bare loop and engine rows; ``tokens[(impl, batch)]`` keeps what each decoded."""
    engine = None if args.no_engine else jaxspec_engine(served, args.new_tokens)
    if engine is not None:
        attention, matmul = engine.attention, engine.matmul
    else:  # as make_runner's "auto": the C++ kernels where they apply
        from jaxspec.engine.cpu_backends import auto_attention, auto_matmul

        attention, matmul = auto_attention(model.cfg), auto_matmul(model.cfg)
    loop = jaxspec_loop(model, args.new_tokens, getattr(engine, "moe_backend", None),
                        getattr(engine, "expert_slices", False), attention, matmul)
    for batch in args.batch_sizes:
        pool = prompts[: workload(args, batch)]
        sides = [] if args.no_transformers else [
            ("transformers", partial(transformers_generate, hf_model, new_tokens=args.new_tokens), False)]
        sides.append(("jaxspec loop", loop, True))
        if engine is not None:
            sides.append(("jaxspec engine", engine, True))
        for impl, fn, warm_all in sides:  # warm_all: jaxspec compiles each new shape in the warm-up pass
            res = timed_batches(fn, pool, batch, args.repeats, warm_all)
            tokens[impl, batch] = res["tokens"]
            rows.append(make_row(impl, batch, res, tokens.get(("transformers", batch))))


def server_rows(args, prompts: Prompts, flags: list[str], log_path: Path, rows: list, tokens: dict) -> None:
    with ServerProcess(flags, log_path, args.server_start_timeout) as srv:
        print(f"  server up at {srv.target}: {' '.join(srv.cmd[1:])}", flush=True)
        serve_pool(srv.target, prompts[:1], 1, args.new_tokens, args.level_timeout)  # warm-up, not counted
        for level in args.concurrency:
            pool = prompts[: workload(args, level)]
            res = min((serve_pool(srv.target, pool, level, args.new_tokens, args.level_timeout)
                       for _ in range(args.repeats)), key=lambda r: r["seconds"])
            # Compared with the same batch's rows (the same prompts; transformers' padding differs by batch).
            row = make_row("jaxspec server", level, res, tokens.get(("transformers", level)))
            engine_ref = tokens.get(("jaxspec engine", level))
            if engine_ref is not None:
                row["same_engine"] = same_fraction(res["tokens"], engine_ref)
            rows.append(row)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from jaxspec.serve import parse_args as serve_parse_args
    from serving.testing import persistent_compilation_cache

    prompts = make_prompts(args)
    rows: list[dict] = []
    tokens: dict[tuple[str, int], list] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        directory = Path(tmp) / "mixtral-random"
        directory.mkdir()
        # The server's flags; the engine rows build their engine from the same ones (slots, context...).
        flags = ["--model", str(directory), "--host", "127.0.0.1", "--port", "0", "--spec-method", "none",
                 "--dtype", "float32", *shlex.split(args.serve_args)]  # later flags win
        served = serve_parse_args(flags)
        if not args.no_server:
            # One compilation cache for this process and the server: the server's warm-up then loads the
            # engine's executables instead of compiling them again (same model, slots and context).
            jcc = Path(tmp) / "jcc"
            jcc.mkdir(mode=0o700)
            compilation_cache.reset_cache()  # (re)initialised with the directory at the next compile
            stack.enter_context(persistent_compilation_cache(jcc))
            flags = ["--compilation-cache-dir", str(jcc), *flags]
        hf_model = make_checkpoint(args, directory)
        model, _ = load_hf(directory, dtype="float32")  # for the bare loop
        counts = model.cfg.param_counts()
        lens = [len(p) for p in prompts]
        print(
            f"Mixtral-shaped random model: {counts['total'] / 1e6:.1f}M parameters ({counts['active'] / 1e6:.1f}M "
            f"active), {args.layers} layers, {args.experts} experts top-{args.top_k} (width {args.expert_dim}), "
            f"d_model {args.hidden}, vocab {args.vocab}, context {args.max_positions}, float32; prompts of "
            f"{min(lens)}-{max(lens)} tokens (mean {np.mean(lens):.0f}), {args.new_tokens} new tokens each; "
            + ", ".join(f"{workload(args, b)} prompts at batch {b}" for b in levels(args))
        )
        torch_info = "skipped"
        if not args.no_transformers:
            import torch

            torch_info = f"{torch.__version__} ({torch.get_num_threads()} threads)"
        print(f"CPU: {os.cpu_count()} cores; torch {torch_info}; jax {jax.__version__} ({jax.default_backend()}); "
              f"server/engine: {served.slots} slots, context {served.max_len or args.max_positions}")
        in_process_rows(args, prompts, hf_model, model, served, rows, tokens)
        if not args.no_server:
            server_rows(args, prompts, flags, Path(tmp) / "serve.log", rows, tokens)
    bars = report(rows)
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "json"}
        Path(args.json).write_text(json.dumps(dict(config=config, rows=rows, bars=bars), indent=2))
    return rows


if __name__ == "__main__":
    main()
