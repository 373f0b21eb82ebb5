"""Long prompts under load, through the server: paged cache capacity, prefix caching, chunked prefill.

    python tools/bench_long_context.py                      # all three scenarios, bench-long-moe
    python tools/bench_long_context.py --scenarios prefix --model builtin
    python tools/bench_long_context.py --scenarios prefix --model builtin --vocab 4096 --max-len 512 \
        --prefix-tokens 400 --serve-args "--spec-method eagle3 --num-speculative-tokens 4"

Each scenario starts ``python -m jaxspec.serve`` twice (the feature off, then on) with the same
weights and replays the same requests against both; the table compares them.

* ``capacity``  prompts of ~200 tokens, 64 output tokens, context 2048, the same KV memory
                (8 x 2048 positions): a slot cache with 8 slots against a paged cache of the same
                positions with 64 slots. Reports the most requests running at once (from the
                server's own first/last-token times) and throughput at 32 and 64 concurrent clients.
* ``prefix``    requests sharing a 1,500-token prefix (``--prefix-tokens``), one at a time:
                server-side TTFT of the first (a miss) against the later ones (hits), with and
                without the prefix cache; the outputs must be identical. ``--serve-args`` adds
                server flags (e.g. speculative decoding) to both servers.
* ``chunked``   4 clients streaming short requests while 4,000-token prompts keep arriving: the
                short requests' inter-token latency (P50/P99) with chunked prefill
                (--max-step-tokens 256) against whole-prompt prefill.
* ``admission`` in process, no server: the same page pool with every page a request may write
                reserved at admission (``Engine(kv_admission="reserve")``) against optimistic
                admission (pages taken as requests grow, the newest preempted and recomputed when
                the pool runs dry), for requests allowed 512 output tokens that stop far earlier
                (a stop token set that ends outputs after ~32, or ~128, tokens). Reports the most
                requests running at once, preemptions, throughput, and that the outputs are equal.
* ``steps``     in process, no server: one decode step's time over a slot cache and over a paged
                cache at the same batch (what paging costs per step), and over the paged cache at
                the batches only it can hold (what a larger batch buys on this machine).
* ``mixed``     in process, no server: one step that prefills a 256-token chunk of a long prompt
                and decodes b running requests, as two calls (the chunk, then the decode step)
                against one mixed call (``jaxspec.engine.mixed_step``).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxspec.bench.load import SendOptions, closed_loop, send  # noqa: E402
from jaxspec.bench.server import ServerProcess  # noqa: E402
from jaxspec.bench.workloads import BenchRequest  # noqa: E402

SCENARIOS = ("capacity", "prefix", "chunked", "admission", "steps", "mixed")


def _requests(rng, n: int, prompt: int, out: int, vocab: int, prefix: list[int] | None = None) -> list[BenchRequest]:
    head = prefix or []
    return [BenchRequest(i, tuple(head + [int(t) for t in rng.integers(3, vocab, size=prompt)]), out)
            for i in range(n)]


def _pct(xs, q) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def peak_running(records: list[dict]) -> int:
    """Most requests between their first and last token at once (server timestamps)."""
    events = []
    for r in records:
        if r.get("server_ttft_s") is None or r.get("server_e2e_s") is None:
            continue
        t0 = r["server_arrival_s"]
        events += [(t0 + r["server_ttft_s"], 1), (t0 + r["server_e2e_s"], -1)]
    most = cur = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        cur += d
        most = max(most, cur)
    return most


class Server:
    def __init__(self, flags: list[str], timeout: float):
        self.proc = ServerProcess(flags)
        self.target = self.proc.start(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.stop()


def capacity(args, rng) -> list[str]:
    common = ["--model", args.model, "--max-len", "2048", "--spec-method", "none", "--max-step-tokens", "512"]
    servers = {"slot cache, 8 slots": [*common, "--kv-cache", "slot", "--slots", "8"],
               "paged, 64 slots, same memory": [*common, "--kv-cache", "paged", "--slots", "64", "--page-size", "16",
                                                "--kv-pages", str(8 * 2048 // 16)]}
    reqs = _requests(rng, 64, 200, 64, args.vocab)
    rows = ["| cache | concurrency | most running | tokens/s | P50 e2e (s) | P99 e2e (s) |", "|---|---:|---:|---:|---:|---:|"]
    for label, flags in servers.items():
        with Server(flags, args.start_timeout) as s:
            closed_loop(s.target, reqs[:4], 4, 4, 600, SendOptions())  # warm
            for conc in (32, 64):
                recs, wall = closed_loop(s.target, reqs, conc, conc * 2, 1200, SendOptions())
                ok = [r for r in recs if r["ok"]]
                lat = [r["latency_s"] for r in ok]
                rows.append(f"| {label} | {conc} | {peak_running(ok)} | {sum(r['completion_tokens'] for r in ok) / wall:.0f} "
                            f"| {_pct(lat, 50):.2f} | {_pct(lat, 99):.2f} |")
                print(rows[-1], flush=True)
    return rows


def prefix(args, rng) -> list[str]:
    shared = [int(t) for t in rng.integers(3, args.vocab, size=args.prefix_tokens)]
    reqs = _requests(rng, 9, 24, 16, args.vocab, prefix=shared)
    common = ["--model", args.model, "--max-len", str(args.max_len), "--spec-method", "none", "--kv-cache", "paged",
              "--slots", "4", "--max-step-tokens", str(args.max_len), *shlex.split(args.serve_args)]
    rows = ["| prefix cache | TTFT miss (s) | TTFT hits, median (s) | hit / miss |", "|---|---:|---:|---:|"]
    outputs = {}
    for label, extra in (("off", ["--no-prefix-cache"]), ("on", [])):
        with Server([*common, *extra], args.start_timeout) as s:
            # An unrelated warm-up request: the shared prefix is first seen by request 0.
            closed_loop(s.target, _requests(rng, 1, args.prefix_tokens, 4, args.vocab), 1, 1, 600, SendOptions())
            with s.target.client() as c:
                recs = [send(c, r, SendOptions(), time.perf_counter()) for r in reqs]
            outputs[label] = [r.get("token_ids") for r in recs]
            ttft = [r["server_ttft_s"] for r in recs]
            rows.append(f"| {label} | {ttft[0]:.3f} | {statistics.median(ttft[1:]):.3f} | "
                        f"{statistics.median(ttft[1:]) / ttft[0]:.2f} |")
            print(rows[-1], flush=True)
    rows.append(f"\noutputs identical with and without the prefix cache: {outputs['on'] == outputs['off']}")
    return rows


def chunked(args, rng) -> list[str]:
    common = ["--model", args.model, "--max-len", "4224", "--spec-method", "none", "--slots", "8"]
    shorts = _requests(rng, 200, 32, 48, args.vocab)
    longs = _requests(rng, 20, 4000, 4, args.vocab)
    rows = ["| prefill | short ITL P50 (ms) | short ITL P99 (ms) | short max gap (ms) | long TTFT P50 (s) |",
            "|---|---:|---:|---:|---:|"]
    for label, step in (("whole prompts", "8192"), ("chunks of 256", "256")):
        with Server([*common, "--max-step-tokens", step], args.start_timeout) as s:
            closed_loop(s.target, longs[:1] + shorts[:2], 2, 3, 600, SendOptions(stream=True))  # warm
            long_recs: list[dict] = []
            stop = threading.Event()

            def longs_loop():
                with s.target.client() as c:
                    i = 0
                    while not stop.is_set():
                        long_recs.append(send(c, longs[i % len(longs)], SendOptions(), time.perf_counter()))
                        i += 1
                        time.sleep(0.5)

            th = threading.Thread(target=longs_loop, daemon=True)
            th.start()
            recs, _ = closed_loop(s.target, shorts, 4, 10**6, args.duration, SendOptions(stream=True))
            stop.set()
            th.join()
            gaps = [g for r in recs if r["ok"] for g in r.get("itl_s", [])]
            lt = [r["server_ttft_s"] for r in long_recs if r["ok"]]
            rows.append(f"| {label} | {_pct(gaps, 50) * 1e3:.1f} | {_pct(gaps, 99) * 1e3:.1f} | {max(gaps) * 1e3:.0f} | "
                        f"{_pct(lt, 50):.2f} |")
            print(rows[-1], flush=True)
    return rows


def admission(args, rng) -> list[str]:
    from jaxspec.config import load_config
    from jaxspec.engine.engine import Engine
    from jaxspec.engine.factory import make_runner
    from jaxspec.models import create_model
    from jaxspec.sampling import SamplingParams
    from jaxspec.tokenizer import ByteTokenizer

    model = create_model(load_config(args.model))
    vocab = model.cfg.vocab_size
    max_len, page, pages, slots, n = 1024, 16, 256, 32, args.admission_requests
    runner = make_runner(model, num_slots=slots, max_len=max_len, page_size=page, num_pages=pages)
    prompts = [[int(t) for t in rng.integers(3, args.vocab, size=200)] for _ in range(n)]

    def run(mode: str, count: int, every: int):
        stop_ids = tuple(range(3, vocab, every))  # 1/every of the vocabulary ends an output
        eng = Engine(runner, ByteTokenizer(), eos_ids=[], max_waiting=count, kv_admission=mode, prefix_caching=False)
        for i, p in enumerate(prompts[:count]):
            eng.add_request(p, SamplingParams(max_tokens=512, temperature=1.0, seed=i, stop_token_ids=stop_ids))
        outs: dict[str, list[int]] = {}
        most, t = 0, time.perf_counter()
        while eng.has_unfinished():
            for o in eng.step():
                outs.setdefault(o.request_id, []).extend(o.new_token_ids)
            most = max(most, eng.num_running)
        return eng, outs, most, time.perf_counter() - t

    run("optimistic", min(n, 2 * slots), 32)  # compile every shape the runs take
    rows = [f"{n} requests, prompts of 200 tokens, max_tokens 512, context {max_len}; {pages} pages of {page} "
            f"positions ({pages * page} positions), {slots} slots; an output ends at any of 1/N of the vocabulary", "",
            "| stop ids | admission | most running | preemptions | mean output | tokens/s | wall (s) |",
            "|---|---|---:|---:|---:|---:|---:|"]
    same = []
    for every in (32, 128):
        outputs = {}
        for mode in ("reserve", "optimistic"):
            eng, outs, most, wall = run(mode, n, every)
            outputs[mode] = outs
            total = sum(len(v) for v in outs.values())
            rows.append(f"| 1/{every} | {mode} | {most} | {eng.num_preemptions} | {total / len(outs):.1f} "
                        f"| {total / wall:.0f} | {wall:.1f} |")
            print(rows[-1], flush=True)
        same.append(outputs["reserve"] == outputs["optimistic"])
    rows.append(f"\noutputs identical under both admissions: {all(same)}")
    return rows


def steps(args, rng) -> list[str]:
    from jaxspec.config import load_config
    from jaxspec.engine.model_runner import ModelRunner
    from jaxspec.engine.slots import SlotTable
    from jaxspec.models import create_model

    model = create_model(load_config(args.model))
    max_len, ctx, page = 2048, 240, 16
    runners = {"slot": ModelRunner(model, 8, max_len), "paged": ModelRunner(model, 64, max_len, page_size=page,
                                                                           num_pages=8 * max_len // page)}
    per_slot = 8 * max_len // page // 64
    for s in range(64):  # every slot holds ctx positions in pages of its own
        runners["paged"].assign_pages(s, list(range(s * per_slot, (s + 1) * per_slot)))
    cases = [("slot", 8), ("paged", 8), ("paged", 32), ("paged", 64)]
    times: dict[tuple[str, int], list[float]] = {c: [] for c in cases}
    tokens = lambda b: rng.integers(3, args.vocab, size=b).astype(np.int32)  # noqa: E731

    def step(name, b):
        r = runners[name]
        r.host_lengths[:b] = ctx
        t = time.perf_counter()
        r.decode_rows(np.arange(b), tokens(b), SlotTable(b).sampling(), np.zeros(b, np.int32))
        return time.perf_counter() - t

    for c in cases:
        for _ in range(3):
            step(*c)  # compile, warm
    for _ in range(args.reps):
        for c in cases:  # interleaved, so load changes hit every case alike
            times[c].append(step(*c))
    base = statistics.median(times[("slot", 8)])
    rows = [f"decode step, {args.model}, context {ctx}, median of {args.reps} interleaved reps", "",
            "| cache | batch | ms / step | x slot at 8 | tokens/s |", "|---|---:|---:|---:|---:|"]
    for name, b in cases:
        m = statistics.median(times[(name, b)])
        rows.append(f"| {name} | {b} | {m * 1e3:.2f} | {m / base:.2f} | {b / m:.0f} |")
    print("\n".join(rows), flush=True)
    return rows


def mixed(args, rng) -> list[str]:
    from jaxspec.config import load_config
    from jaxspec.engine.model_runner import ModelRunner
    from jaxspec.engine.slots import SlotTable
    from jaxspec.models import create_model

    model = create_model(load_config(args.model))
    max_len, ctx, chunk, slots = 2048, 1024, 256, 16
    runner = ModelRunner(model, slots, max_len, prefill_chunk=chunk, mixed_prefill="on")
    runner.warmup()
    prompt = [int(t) for t in rng.integers(3, args.vocab, size=ctx + chunk)]
    one = SlotTable(1).sampling()
    cases = [(kind, b) for b in (1, 4, 8) for kind in ("apart", "mixed")]
    times: dict[tuple[str, int], list[float]] = {c: [] for c in cases}

    def step(kind, b):
        rows = np.arange(b)
        runner.host_lengths[:b] = 240  # the decoding requests' contexts
        tokens, positions = rng.integers(3, args.vocab, size=b).astype(np.int32), np.zeros(b, np.int32)
        t = time.perf_counter()
        if kind == "apart":  # the engine's two calls: the chunk at an offset, then the decode step
            runner.prefill_many([slots - 1], [prompt], one, [ctx])
            runner.decode_rows(rows, tokens, SlotTable(b).sampling(), positions)
        else:
            runner.prefill_with_decode(slots - 1, prompt, ctx, one, rows, tokens, SlotTable(b).sampling(), positions)
        return time.perf_counter() - t

    for c in cases:
        step(*c)
    for _ in range(args.reps):
        for c in cases:  # interleaved, so load changes hit every case alike
            times[c].append(step(*c))
    rows = [f"one step: a {chunk}-token chunk at position {ctx} + b decode rows (contexts 240), {args.model}, "
            f"context {max_len}, median of {args.reps} interleaved reps", "",
            "| decode rows | two calls (ms) | one mixed call (ms) | mixed / two |", "|---:|---:|---:|---:|"]
    for b in (1, 4, 8):
        apart, joint = statistics.median(times[("apart", b)]), statistics.median(times[("mixed", b)])
        rows.append(f"| {b} | {apart * 1e3:.2f} | {joint * 1e3:.2f} | {joint / apart:.2f} |")
    print("\n".join(rows), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    p.add_argument("--model", default="bench-long-moe", help="a model config with a context of at least 4224")
    p.add_argument("--vocab", type=int, default=259, help="prompt token ids are drawn from [3, vocab)")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of short traffic per chunked run")
    p.add_argument("--start-timeout", type=float, default=1800.0)
    p.add_argument("--out", default=None, help="write the tables here (markdown)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=30, help="interleaved repetitions per case (steps)")
    p.add_argument("--admission-requests", type=int, default=96, help="requests per admission run")
    p.add_argument("--prefix-tokens", type=int, default=1500, help="the shared prefix's length (prefix)")
    p.add_argument("--max-len", type=int, default=2048, help="the servers' context length (prefix)")
    p.add_argument("--serve-args", default="", help="more server flags for both servers (prefix)")
    args = p.parse_args(argv)
    report = []
    for name in args.scenarios:
        rng = np.random.default_rng(args.seed)
        print(f"## {name}", flush=True)
        report += [f"## {name}", "", *globals()[name](args, rng), ""]
    text = "\n".join(report)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
