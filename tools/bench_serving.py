"""End-to-end serving sweep: speculation configurations x concurrency levels through the gRPC server.

    python tools/bench_serving.py --configs none draft:k=2 draft:k=4 draft:auto ngram:k=4 \\
        --concurrency 1 2 4 8 16 --requests 16 --max-tokens 64 --workload code
    python tools/bench_serving.py --model tiny-moe --configs none ngram:k=2 --workload synthetic:in=16,out=8 \\
        --serve-args "--slots 4 --max-len 64" --json out.json

For each config one ``python -m jaxspec.serve`` subprocess is started (port 0, a private persistent
compilation cache so restarts skip most compiling), then for each workload: 2 warm-up requests (not
counted), and at each concurrency level c a closed loop of c client threads, each sending unary requests
back-to-back until max(--requests, c) requests are done (none started after --time-limit). The server is
stopped (SIGTERM, kill after a timeout) before the next config starts. Every config sees the same prompts.

Configs: ``none`` (--spec-method none), ``draft:k=K`` / ``ngram:k=K`` (fixed K draft tokens per step),
``draft:auto`` / ``ngram:auto`` (k chosen per step; ``,max=K`` sets --max-speculative-tokens). Config
flags come after --serve-args, so they win.

Workloads (seeded; requests are token ids, temperature 0, ignore_eos):
* code    held-out CPython stdlib files (the built-in model's evaluation split) cut at line boundaries
          into prompts of 100-200 tokens; greedy completion of --max-tokens.
* edit    copy-heavy: a held-out function (cut to ~160 tokens), a comment line ``# the same function,
          unchanged:`` and the function's first line again, so the right continuation re-emits the
          prompt (what n-gram lookup proposes).
* synthetic:in=N,out=M  random token ids, N long, M tokens generated (overrides --max-tokens).

Columns: tok/s = generated tokens of the level / its wall time (first send to last reply); p99 s =
client-side end-to-end latency, 99th percentile (linear interpolation); "x none" = tok/s over none's at
the same level; "p99/none" = P99 over none's; "auto/best" = draft:auto's tok/s over the best of none and
the fixed-k draft configs. Detail table: req/s, p50/p90/p99, acceptance length (1 + accepted/drafts: the
tokens a verification step emits) and rate (accepted/drafted) summed over the level's responses, failed
(RPC errors, ERROR/ABORTED/DEADLINE finishes), short (fewer tokens than asked) and "same" (share of
requests whose tokens equal none's: greedy speculation should not change them). The speculation bars
are printed last, with met / NOT met.
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ("none", "draft", "ngram")
CONFIG_USAGE = "expected none, draft:k=K, draft:auto[,max=K], ngram:k=K or ngram:auto[,max=K] (K >= 1)"
OK_FINISH = ("FINISH_REASON_LENGTH", "FINISH_REASON_STOP", "FINISH_REASON_EOS")
EDIT_MARKER = "# the same function, unchanged:"


# --------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class SpecConfig:
    name: str
    method: str  # none | draft | ngram
    k: int | str | None = None  # fixed draft length, "auto", or None (no speculation)
    max_k: int | None = None  # --max-speculative-tokens (auto only)

    def serve_flags(self) -> list[str]:
        flags = ["--spec-method", self.method]
        if self.method != "none":
            flags += ["--num-speculative-tokens", str(self.k)]
        if self.max_k is not None:
            flags += ["--max-speculative-tokens", str(self.max_k)]
        return flags


def parse_config(text: str) -> SpecConfig:
    method, sep, rest = text.partition(":")
    if method not in METHODS:
        raise ValueError(f"bad config {text!r}: unknown method {method!r}; {CONFIG_USAGE}")
    if method == "none":
        if sep:
            raise ValueError(f"bad config {text!r}: 'none' takes no options; {CONFIG_USAGE}")
        return SpecConfig(text, "none")
    m = re.fullmatch(r"k=(\d+)|auto(?:,max=(\d+))?", rest)
    if not m or int(m.group(1) or 1) < 1 or int(m.group(2) or 1) < 1:
        raise ValueError(f"bad config {text!r}: {CONFIG_USAGE}")
    if m.group(1):
        return SpecConfig(text, method, int(m.group(1)))
    return SpecConfig(text, method, "auto", int(m.group(2)) if m.group(2) else None)


# -------------------------------------------------------------------------- workloads
@dataclasses.dataclass
class Workload:
    name: str
    prompts: list[list[int]]  # request i of a level sends prompts[i]; the last two are the warm-up
    max_tokens: int


def tokenizer_for(model: str):
    """The model's tokenizer without loading its weights (random-weight configs: bytes)."""
    from jaxspec import builtin
    from jaxspec.tokenizer import ByteTokenizer, load_tokenizer

    path = Path(builtin.resolve(model))
    return load_tokenizer(path) if path.is_dir() else ByteTokenizer()


def cut_lines(tok, lines: Sequence[str], limit: int) -> tuple[str, list[int]]:
    """The longest run of whole lines (newlines kept: the tokenizer merges '):\\n' into one piece,
    so a prompt ending mid-line-break would be one the model never saw) within ``limit`` tokens."""
    best = ("", [])
    for j in range(1, len(lines) + 1):
        text = "".join(lines[:j])
        ids = tok.encode(text, add_bos=True)
        if len(ids) > limit:
            break
        best = (text, ids)
    return best


def code_prompts(docs, tok, count: int, seed: int, lo: int = 100, hi: int = 200) -> list[list[int]]:
    rng = random.Random(seed)
    weights = [len(d.text) for d in docs]  # long files give proportionally more prompts
    prompts: list[list[int]] = []
    for _ in range(50 * count):
        if len(prompts) == count:
            return prompts
        lines = rng.choices(docs, weights)[0].text.splitlines(keepends=True)
        start, limit = rng.randrange(len(lines)), rng.randint(lo, hi)
        _, ids = cut_lines(tok, lines[start:], limit)
        if len(ids) >= lo:  # a start near the end of a file gives too short a prompt: draw again
            prompts.append(ids)
    raise ValueError(f"could not cut {count} prompts of {lo}-{hi} tokens from the held-out files")


def edit_prompts(docs, tok, count: int, seed: int, max_tokens: int) -> list[list[int]]:
    """Function text + marker comment + the function's first line: the continuation is a copy.
    Functions must hold at least max_tokens + 16 tokens so the whole output can be copied."""
    need = max_tokens + 16
    limit = max(160, need + 48)
    functions = []
    for d in docs:  # documents come sorted by id and ast.walk is deterministic
        try:
            tree = ast.parse(d.text)
        except SyntaxError:
            continue
        lines = d.text.splitlines(keepends=True)
        functions += [lines[n.lineno - 1: n.end_lineno] for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    random.Random(seed).shuffle(functions)
    prompts: list[list[int]] = []
    for fn in functions:
        first = fn[0] if fn[0].endswith("\n") else fn[0] + "\n"
        indent = first[: len(first) - len(first.lstrip())]
        text, ids = cut_lines(tok, fn, limit)
        if len(ids) < need:
            continue
        prompts.append(tok.encode(text.rstrip("\n") + "\n\n" + indent + EDIT_MARKER + "\n" + first, add_bos=True))
        if len(prompts) == count:
            return prompts
    if not prompts:
        raise ValueError(f"no held-out function of >= {need} tokens for the edit workload")
    return [prompts[i % len(prompts)] for i in range(count)]  # few functions: reuse them


def make_workload(spec: str, tok, count: int, max_tokens: int, seed: int, corpus: str = "stdlib") -> Workload:
    if spec in ("code", "edit"):
        from jaxspec.training.corpus import read_corpus

        # The held-out split (jaxspec.training.corpus): files the built-in models never trained on.
        docs = [d for d in read_corpus(corpus).split()[1] if d.text.strip()]
        if not docs:
            raise ValueError(f"corpus {corpus} has no held-out documents")
        if spec == "code":
            return Workload(spec, code_prompts(docs, tok, count, seed), max_tokens)
        return Workload(spec, edit_prompts(docs, tok, count, seed, max_tokens), max_tokens)
    m = re.fullmatch(r"synthetic:in=(\d+),out=(\d+)", spec)
    if not m or min(int(m.group(1)), int(m.group(2))) < 1:
        raise ValueError(f"bad workload {spec!r}: expected code, edit or synthetic:in=N,out=M (N, M >= 1)")
    rng = random.Random(seed)
    # ids >= 4 skip the special ids (pad, bos, eos, unk) of both shipped tokenizer kinds
    prompts = [[rng.randrange(4, tok.vocab_size) for _ in range(int(m.group(1)))] for _ in range(count)]
    return Workload(spec, prompts, int(m.group(2)))


# ------------------------------------------------------------------------- statistics
def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(records: Sequence[dict], wall_s: float) -> dict:
    """One level's figures from its request records (failed requests count in no rate or latency)."""
    ok = [r for r in records if r["ok"]]
    lat = [r["latency_s"] for r in ok]
    tokens = sum(r["completion_tokens"] for r in ok)
    drafts, drafted, accepted = (sum(r.get(key, 0) for r in ok)
                                 for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"))
    return dict(
        requests=len(records), failed=len(records) - len(ok),
        short=sum(r["completion_tokens"] < r["max_tokens"] for r in ok), tokens=tokens, wall_s=wall_s,
        tok_s=tokens / wall_s if wall_s > 0 else 0.0, req_s=len(ok) / wall_s if wall_s > 0 else 0.0,
        p50_s=percentile(lat, 50), p90_s=percentile(lat, 90), p99_s=percentile(lat, 99),
        num_drafts=drafts, num_draft_tokens=drafted, num_accepted_tokens=accepted,
        mean_acceptance_length=1 + accepted / drafts if drafts else None,
        acceptance_rate=accepted / drafted if drafted else None,
    )


def same_as_plain(records: Sequence[dict]) -> dict[tuple[str, str, int], float]:
    """(workload, config, concurrency) -> share of requests whose tokens equal none's for the same prompt."""
    plain = {(r["workload"], r["concurrency"], r["index"]): r.get("token_ids") for r in records
             if r["config"] == "none" and r["ok"]}
    pairs = collections.defaultdict(list)
    for r in records:
        ref = plain.get((r["workload"], r["concurrency"], r["index"]))
        if r["config"] != "none" and r["ok"] and ref is not None:
            pairs[r["workload"], r["config"], r["concurrency"]].append(r.get("token_ids") == ref)
    return {key: sum(v) / len(v) for key, v in pairs.items()}


# ---------------------------------------------------------------------------- server
def default_cache_dir() -> Path:
    """Per-user and private: the cache holds executables the server will run."""
    path = Path(tempfile.gettempdir()) / f"jaxspec-bench-jcc-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise PermissionError(f"{path} must be owned by this user and not group/world-writable")
    return path


class ServerProcess:
    """``python -m jaxspec.serve`` on a free loopback port; its output is kept (last lines) by a thread."""

    def __init__(self, cmd: list[str]):
        self.cmd, self.proc, self.port = cmd, None, None
        self.lines: collections.deque[str] = collections.deque(maxlen=300)

    def tail(self, n: int = 40) -> str:
        return "".join(list(self.lines)[-n:])

    def _pump(self) -> None:  # a full pipe would block the server's logging
        for line in self.proc.stdout:
            self.lines.append(line)
            if self.port is None and (m := re.search(r"listening on \S+:(\d+) \(", line)):
                self.port = int(m.group(1))

    def start(self, timeout: float) -> str:
        import grpc

        from serving.client import JaxSpecClient

        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, errors="replace")
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            if self.port is not None:  # bound, but SERVING only once warm-up compiled everything
                with JaxSpecClient(f"127.0.0.1:{self.port}") as client:
                    try:
                        if client.health(timeout=2.0) == "SERVING":
                            return f"127.0.0.1:{self.port}"
                    except grpc.RpcError:
                        pass
            time.sleep(0.25)
        raise TimeoutError(f"server not SERVING after {timeout:.0f}s:\n{self.tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # drains: anything still in flight gets the grace period
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


def send(client, workload: Workload, i: int, prompt: list[int], timeout: float, t0: float) -> dict:
    from serving.pb import jaxspec_pb2 as pb

    rec = dict(workload=workload.name, index=i, prompt_tokens=len(prompt), max_tokens=workload.max_tokens,
               start_s=time.perf_counter() - t0)
    t = time.perf_counter()
    try:
        r = client.generate(prompt, max_tokens=workload.max_tokens, temperature=0.0, ignore_eos=True,
                            timeout=timeout)
    except Exception as e:  # counted as a failure; the level goes on
        code = getattr(e, "code", None)
        return dict(rec, ok=False, latency_s=time.perf_counter() - t, completion_tokens=0,
                    error=f"{code().name if callable(code) else type(e).__name__}: "
                          f"{e.details() if hasattr(e, 'details') else e}")
    rec.update(latency_s=time.perf_counter() - t, finish_reason=pb.FinishReason.Name(r.finish_reason),
               completion_tokens=r.usage.completion_tokens, token_ids=list(r.token_ids))
    rec["ok"] = rec["finish_reason"] in OK_FINISH
    if r.HasField("speculation"):
        s = r.speculation
        rec.update(num_drafts=s.num_drafts, num_draft_tokens=s.num_draft_tokens,
                   num_accepted_tokens=s.num_accepted_tokens)
    return rec


def run_level(target: str, workload: Workload, concurrency: int, n: int, time_limit: float,
              indices: Sequence[int] | None = None) -> tuple[list[dict], float]:
    """Closed loop: ``concurrency`` threads, each sending its next request when its last one returns,
    until ``n`` were sent (none are started after ``time_limit``). Returns (records, wall seconds)."""
    from serving.client import JaxSpecClient

    indices = list(range(n)) if indices is None else list(indices)
    lock, claimed, records = threading.Lock(), [0], []
    deadline = time.monotonic() + time_limit
    t0 = time.perf_counter()

    def worker() -> None:
        with JaxSpecClient(target) as client:  # a channel per thread, as independent clients have
            while True:
                with lock:
                    if claimed[0] >= n or time.monotonic() >= deadline:
                        return
                    j = claimed[0]
                    claimed[0] += 1
                i = indices[j]
                # The RPC deadline is a safety net for a stuck server; the level limit stops new sends.
                records.append(send(client, workload, i, workload.prompts[i], time_limit + 120, t0))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(records, key=lambda r: r["index"]), time.perf_counter() - t0


# --------------------------------------------------------------------------- report
def _fmt(x, spec: str, suffix: str = "") -> str:
    return "-" if x is None else format(x, spec) + suffix


def _div(a, b):
    return a / b if a is not None and b else None


def is_auto_draft(c: SpecConfig) -> bool:
    return c.method == "draft" and c.k == "auto"


def report(rows: list[dict], configs: Sequence[SpecConfig], workloads: Sequence[str], levels: Sequence[int]) -> None:
    by = {(r["workload"], r["config"], r["concurrency"]): r for r in rows}
    auto = next((c.name for c in configs if is_auto_draft(c)), None)
    base = [c.name for c in configs if c.method == "none" or (c.method == "draft" and isinstance(c.k, int))]
    for w in workloads:
        head = ["conc"]
        for c in configs:
            head += [f"{c.name} tok/s", f"{c.name} p99 s"]
            if c.method != "none":
                head += [f"{c.name} x none", f"{c.name} p99/none"]
        if auto and base:
            head.append(f"{auto} auto/best")
        print(f"\n### workload {w}\n\n| " + " | ".join(head) + " |\n|" + "---:|" * len(head))
        for lv in levels:
            plain = by.get((w, "none", lv))
            cells = [str(lv)]
            for c in configs:
                r = by.get((w, c.name, lv))
                cells += [_fmt(r and r["tok_s"], ".1f"), _fmt(r and r["p99_s"], ".3f")]
                if c.method != "none":
                    cells += [_fmt(_div(r and r["tok_s"], plain and plain["tok_s"]), ".2f", "x"),
                              _fmt(_div(r and r["p99_s"], plain and plain["p99_s"]), ".2f")]
            if auto and base:
                best = max((by[w, b, lv]["tok_s"] for b in base if (w, b, lv) in by), default=None)
                cells.append(_fmt(_div(by.get((w, auto, lv), {}).get("tok_s"), best), ".2f", "x"))
            print("| " + " | ".join(cells) + " |")
        print("\n| config | conc | tok/s | req/s | p50 s | p90 s | p99 s | acc len | acc rate | failed | short | same |"
              "\n|---|" + "---:|" * 11)
        for r in (r for r in rows if r["workload"] == w):
            print(f"| {r['config']} | {r['concurrency']} | {r['tok_s']:.1f} | {r['req_s']:.2f} | "
                  f"{_fmt(r['p50_s'], '.3f')} | {_fmt(r['p90_s'], '.3f')} | {_fmt(r['p99_s'], '.3f')} | "
                  f"{_fmt(r['mean_acceptance_length'], '.2f')} | {_fmt(r['acceptance_rate'], '.2f')} | "
                  f"{r['failed']}/{r['requests']} | {r['short']} | {_fmt(r.get('same_as_none'), '.0%')} |")


def bars(rows: list[dict], configs: Sequence[SpecConfig]) -> list[dict]:
    """The speculation bars, at the levels and configs this run measured."""
    by = {(r["workload"], r["config"], r["concurrency"]): r for r in rows}
    out = []

    def bar(name, w, lv, value, need, at_least=True):
        if value is not None:
            out.append(dict(bar=name, workload=w, concurrency=lv, value=value, need=need, rel=">=" if at_least
                            else "<=", met=value >= need if at_least else value <= need))

    auto = next((c.name for c in configs if is_auto_draft(c)), None)
    fixed = [c.name for c in configs if c.method == "draft" and isinstance(c.k, int)]
    for w, name, lv in sorted(by, key=lambda key: (key[0], key[2])):
        plain = by.get((w, "none", lv))
        if name == auto and plain:
            r = by[w, name, lv]
            if lv in (4, 8):
                bar(f"{auto} >= 1.3x none tok/s", w, lv, _div(r["tok_s"], plain["tok_s"]), 1.3)
            if lv in (1, 2, 4, 8, 16):
                best = max([plain["tok_s"]] + [by[w, f, lv]["tok_s"] for f in fixed if (w, f, lv) in by])
                bar(f"{auto} >= 0.97x best of none and fixed k", w, lv, _div(r["tok_s"], best), 0.97)
            bar(f"{auto} P99 <= 1.05x none's", w, lv, _div(r["p99_s"], plain["p99_s"]), 1.05, at_least=False)
        if name.startswith("ngram") and w == "edit" and lv == 1 and plain:
            r = by[w, name, lv]
            bar(f"{name} >= 1.5x none tok/s on edit", w, lv, _div(r["tok_s"], plain["tok_s"]), 1.5)
            bar(f"{name} edit workload mean acceptance length >= 3.5", w, lv, r["mean_acceptance_length"], 3.5)
    for b in out:
        print(f"bar {b['bar']} [{b['workload']}, {b['concurrency']} concurrent]: {b['value']:.2f} "
              f"(need {b['rel']} {b['need']}): {'met' if b['met'] else 'NOT met'}")
    return out


# ----------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["none", "draft:k=2", "draft:k=4", "draft:auto"],
                   metavar="CONFIG", help=CONFIG_USAGE)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--requests", type=int, default=16, help="requests per level (at least the concurrency)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (code, edit)")
    p.add_argument("--workload", nargs="+", default=["code"], help="code, edit or synthetic:in=N,out=M (several: "
                   "each is run on every server)")
    p.add_argument("--model", default="builtin")
    p.add_argument("--serve-args", default="", help="extra python -m jaxspec.serve flags (e.g. \"--slots 16\")")
    p.add_argument("--corpus", default="stdlib", help="where code/edit prompts come from (its held-out split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds a level may take to send its requests")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to be SERVING")
    p.add_argument("--compilation-cache-dir", default=None, help=f"default: {tempfile.gettempdir()}/"
                   "jaxspec-bench-jcc-UID")
    p.add_argument("--json", default=None, metavar="PATH", help="write every request record and the summary")
    args = p.parse_args(argv)
    try:
        args.configs = [parse_config(c) for c in args.configs]
    except ValueError as e:
        p.error(f"--configs: {e}")
    if len({c.name for c in args.configs}) != len(args.configs):
        p.error("--configs: a config is listed twice")
    if min(args.concurrency) < 1 or args.requests < 1 or args.max_tokens < 1:
        p.error("--concurrency, --requests and --max-tokens must be >= 1")
    args.concurrency = sorted(set(args.concurrency))
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    tok = tokenizer_for(args.model)
    n_max = max(args.requests, max(args.concurrency))
    try:  # + 2 prompts for the warm-up, so no counted request repeats one
        workloads = [make_workload(w, tok, n_max + 2, args.max_tokens, args.seed, args.corpus) for w in args.workload]
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    cache = args.compilation_cache_dir or str(default_cache_dir())
    for w in workloads:
        lens = [len(p) for p in w.prompts]
        print(f"workload {w.name}: {len(w.prompts)} prompts of {min(lens)}-{max(lens)} tokens, "
              f"{w.max_tokens} generated each", flush=True)
    records, rows, errors = [], [], {}
    for cfg in args.configs:
        server = ServerProcess([sys.executable, "-m", "jaxspec.serve", "--model", args.model, "--host", "127.0.0.1",
                                "--port", "0", "--compilation-cache-dir", cache, *shlex.split(args.serve_args),
                                *cfg.serve_flags()])
        try:
            t = time.perf_counter()
            target = server.start(args.start_timeout)
            print(f"{cfg.name}: SERVING at {target} after {time.perf_counter() - t:.1f}s "
                  f"({' '.join(cfg.serve_flags())})", flush=True)
            for w in workloads:
                warm, _ = run_level(target, w, 2, 2, args.time_limit, indices=[n_max, n_max + 1])
                if not any(r["ok"] for r in warm):
                    print(f"  warning: warm-up failed: {warm[0].get('error') or warm[0].get('finish_reason')}")
                for lv in args.concurrency:
                    recs, wall = run_level(target, w, lv, max(args.requests, lv), args.time_limit)
                    for r in recs:
                        r.update(config=cfg.name, concurrency=lv)
                    records += recs
                    rows.append(dict(workload=w.name, config=cfg.name, concurrency=lv, **summarize(recs, wall)))
                    r = rows[-1]
                    print(f"  {w.name} x{lv}: {r['tok_s']:.1f} tok/s, p99 {_fmt(r['p99_s'], '.3f')} s, "
                          f"{r['failed']} failed" + next((f" ({x['error']})" for x in recs if "error" in x), ""),
                          flush=True)
                    if server.proc.poll() is not None:  # every later request would fail: drop the config
                        raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.tail()}")
        except (RuntimeError, TimeoutError, OSError) as e:  # this config is lost; the others still run
            errors[cfg.name] = str(e)
            print(f"{cfg.name}: server failed: {e}", file=sys.stderr, flush=True)
        finally:
            server.stop()
    for key, same in same_as_plain(records).items():
        next(r for r in rows if (r["workload"], r["config"], r["concurrency"]) == key)["same_as_none"] = same
    print(f"\nmodel {args.model}; {args.requests} requests per level (at least the concurrency); "
          f"serve args: {args.serve_args or '-'}; {os.cpu_count()} CPUs")
    report(rows, args.configs, [w.name for w in workloads], args.concurrency)
    print()
    bar_list = bars(rows, args.configs)
    for name, e in errors.items():
        print(f"config {name} did not run: {e.splitlines()[0]}")
    summary = dict(model=args.model, configs=[c.name for c in args.configs], levels=rows, bars=bar_list,
                   config_errors=errors)
    if args.json:
        config = {k: (v if k != "configs" else [c.name for c in v]) for k, v in vars(args).items()}
        Path(args.json).write_text(json.dumps(dict(args=config, records=records, **summary), indent=1))
    return summary


if __name__ == "__main__":
    main()
