"""Benchmark workloads: seeded lists of requests (prompt token ids + output budget).

* ``code``    held-out CPython standard-library files (the split the built-in models never trained on,
              ``jaxspec.training.corpus``) cut at line boundaries into prompts of 100-200 tokens; the
              model completes them.
* ``edit[:copies=N]``  copy-heavy: a held-out function, the comment ``# the same function, unchanged:``
              and the function's first line again, so the right continuation re-emits the prompt (what
              n-gram / prompt-lookup speculation is for). ``copies=N`` (default 1) shows the function
              and the marker N times before the first line, a copy made before one is asked for.
* ``long[:in=N,out=M]``  prefill-heavy: held-out file text cut to prompts near the context length
              (default: context - out - 8 tokens), short outputs (default 16).
* ``synthetic:in=N,out=M[,text=random|repeat]``  fixed token counts; ``repeat`` repeats one random
              16-token block (a prompt the model can copy from).
* ``jsonl:PATH``  the user's prompts, one JSON object per line: ``{"prompt": "...", "max_tokens": N}``
              (``max_tokens`` optional), or ShareGPT-style ``{"conversations": [{"from": "human",
              "value": ...}, {"from": "gpt", "value": ...}, ...]}`` (the first human turn is the prompt,
              the length of the reply that follows it is the output budget).

Requests are sent as token ids with ``ignore_eos`` so every configuration generates the same number of
tokens for the same prompt; greedy (temperature 0) unless the bench is told otherwise.
"""

from __future__ import annotations

import ast
import dataclasses
import random
import re
from pathlib import Path
from typing import Sequence

EDIT_MARKER = "# the same function, unchanged:"
WORKLOAD_USAGE = ("expected code, edit[:copies=N], long[:in=N,out=M], synthetic:in=N,out=M[,text=random|repeat] "
                  "or jsonl:PATH")


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    index: int
    prompt: tuple[int, ...]
    max_tokens: int


@dataclasses.dataclass
class Workload:
    name: str
    requests: list[BenchRequest]  # request i of a level is requests[i % len(requests)]
    warmup: list[BenchRequest]  # sent before each configuration's levels, not counted
    dropped: int = 0  # user prompts left out because prompt + output do not fit the context

    def describe(self) -> str:
        lens = [len(r.prompt) for r in self.requests]
        outs = [r.max_tokens for r in self.requests]
        text = (f"workload {self.name}: {len(lens)} requests, prompts {min(lens)}-{max(lens)} tokens, "
                f"outputs {min(outs)}-{max(outs)} tokens")
        return text + (f" ({self.dropped} prompts too long for the context left out)" if self.dropped else "")


def tokenizer_for(model: str):
    """The model's tokenizer without loading its weights (random-weight configs use bytes)."""
    from jaxspec.tokenizer import ByteTokenizer, load_tokenizer

    path = Path(resolve_model(model))
    return load_tokenizer(path) if path.is_dir() else ByteTokenizer()


def resolve_model(model: str) -> str:
    from jaxspec import builtin

    return builtin.resolve(model)


def context_length(model: str) -> int:
    """The model's context length from its config (no weights loaded)."""
    from jaxspec.config import load_config

    path = Path(resolve_model(model))
    return load_config(path / "config.json" if path.is_dir() else model).max_seq_len


def cut_lines(tok, lines: Sequence[str], limit: int) -> tuple[str, list[int]]:
    """The longest run of whole lines within ``limit`` tokens (a prompt ending mid-line-break would be
    one the model never saw: the tokenizer merges '):\\n' into one piece). Bisection: encoding is the
    cost, and long prompts hold hundreds of lines."""
    lo, hi, best = 0, len(lines), ("", [])
    while lo < hi:
        mid = (lo + hi + 1) // 2
        text = "".join(lines[:mid])
        ids = tok.encode(text, add_bos=True)
        if len(ids) <= limit:
            lo, best = mid, (text, ids)
        else:
            hi = mid - 1
    return best


def _held_out_docs(corpus: str):
    from jaxspec.training.corpus import read_corpus

    docs = [d for d in read_corpus(corpus).split()[1] if d.text.strip()]
    if not docs:
        raise ValueError(f"corpus {corpus} has no held-out documents")
    return docs


def file_prompts(docs, tok, count: int, seed: int, lo: int, hi: int) -> list[list[int]]:
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


def edit_prompts(docs, tok, count: int, seed: int, max_tokens: int, copies: int = 1,
                 context: int | None = None) -> list[list[int]]:
    """(Function text + marker comment) x ``copies`` + the function's first line: the continuation is
    a copy. Functions must hold at least max_tokens + 16 tokens so the whole output can be copied,
    and (with ``context``) the prompt and the output must fit it."""
    need = max_tokens + 16
    limit = max(160, need + 48)
    if context is not None:
        limit = min(limit, (context - max_tokens - 8) // copies - 16)
        if limit < need:
            raise ValueError(f"edit workload: {copies} copies of a function of >= {need} tokens and "
                             f"{max_tokens} output tokens do not fit the context of {context}")
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
        shown = (text.rstrip("\n") + "\n\n" + indent + EDIT_MARKER + "\n") * copies
        ids = tok.encode(shown + first, add_bos=True)
        if context is not None and len(ids) + max_tokens > context:
            continue
        prompts.append(ids)
        if len(prompts) == count:
            return prompts
    if not prompts:
        raise ValueError(f"no held-out function of >= {need} tokens for the edit workload")
    return [prompts[i % len(prompts)] for i in range(count)]  # few functions: reuse them


def _options(text: str, spec: str, allowed: dict[str, str]) -> dict[str, str]:
    out = {}
    for part in filter(None, text.split(",")):
        key, eq, value = part.partition("=")
        if not eq or key not in allowed or not re.fullmatch(allowed[key], value):
            raise ValueError(f"bad workload {spec!r}: option {part!r}; {WORKLOAD_USAGE}")
        out[key] = value
    return out


def jsonl_requests(path: Path, tok, default_max_tokens: int) -> list[tuple[list[int], int]]:
    """(prompt ids, max_tokens) per usable line; a malformed line is an error naming its number."""
    from jaxspec.training.corpus import json_lines

    out = []
    for n, obj in json_lines(path):
        if "conversations" in obj:
            turns = obj["conversations"]
            if not isinstance(turns, list):
                raise ValueError(f"{path}:{n}: 'conversations' must be a list of turns")
            i = next((i for i, t in enumerate(turns) if isinstance(t, dict)
                      and t.get("from") in ("human", "user") and isinstance(t.get("value"), str)), None)
            if i is None:
                continue  # a conversation without a human turn has no prompt: skipped, like other tools
            reply = next((t.get("value") for t in turns[i + 1:] if isinstance(t, dict)
                          and t.get("from") in ("gpt", "assistant", "model")), None)
            prompt = turns[i]["value"]
            max_tokens = max(1, len(tok.encode(reply))) if isinstance(reply, str) else default_max_tokens
        else:
            prompt = obj.get("prompt")
            if not isinstance(prompt, str):
                raise ValueError(f"{path}:{n}: 'prompt' must be a string")
            max_tokens = obj.get("max_tokens", default_max_tokens)
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
                raise ValueError(f"{path}:{n}: 'max_tokens' must be an integer >= 1")
        out.append((tok.encode(prompt, add_bos=True), max_tokens))
    if not out:
        raise ValueError(f"{path}: no usable prompts")
    return out


def make_workload(spec: str, tok, count: int, max_tokens: int, seed: int, *, context: int = 512,
                  corpus: str = "stdlib", warmup: int = 2) -> Workload:
    """``count`` counted requests plus ``warmup`` others, all seeded by ``seed``."""
    total = count + warmup
    kind, _, rest = spec.partition(":")
    pairs: list[tuple[list[int], int]]
    dropped = 0
    if kind == "code" and not rest:
        pairs = [(p, max_tokens) for p in file_prompts(_held_out_docs(corpus), tok, total, seed, 100, 200)]
    elif kind == "edit":
        opts = _options(rest, spec, {"copies": r"[1-9]\d*"})
        copies = int(opts.get("copies", 1))
        pairs = [(p, max_tokens) for p in edit_prompts(_held_out_docs(corpus), tok, total, seed, max_tokens,
                                                       copies, context)]
    elif kind == "long":
        opts = _options(rest, spec, {"in": r"\d+", "out": r"\d+"})
        out = int(opts.get("out", 16))
        n_in = int(opts.get("in", context - out - 8))
        if out < 1 or n_in < 8 or n_in + out > context:
            raise ValueError(f"bad workload {spec!r}: need in >= 8, out >= 1 and in + out <= context ({context})")
        pairs = [(p, out) for p in file_prompts(_held_out_docs(corpus), tok, total, seed, int(0.9 * n_in), n_in)]
    elif kind == "synthetic":
        opts = _options(rest, spec, {"in": r"\d+", "out": r"\d+", "text": r"random|repeat"})
        if "in" not in opts or "out" not in opts or min(int(opts["in"]), int(opts["out"])) < 1:
            raise ValueError(f"bad workload {spec!r}: {WORKLOAD_USAGE} (N, M >= 1)")
        n_in, out = int(opts["in"]), int(opts["out"])
        rng = random.Random(seed)
        pairs = []
        for _ in range(total):
            # ids >= 4 skip the special ids (pad, bos, eos, unk) of both shipped tokenizer kinds
            block = [rng.randrange(4, tok.vocab_size) for _ in range(16 if opts.get("text") == "repeat" else n_in)]
            pairs.append(((block * (n_in // len(block) + 1))[:n_in], out))
    elif kind == "jsonl" and rest:
        path = Path(rest)
        if not path.is_file():
            raise ValueError(f"bad workload {spec!r}: no such file {path}")
        usable = []
        for ids, out in jsonl_requests(path, tok, max_tokens):
            if len(ids) + out <= context:
                usable.append((ids, out))
            else:
                dropped += 1
        if not usable:
            raise ValueError(f"workload {spec!r}: no prompt fits the context of {context} tokens")
        random.Random(seed).shuffle(usable)
        pairs = [usable[i % len(usable)] for i in range(total)]
    else:
        raise ValueError(f"bad workload {spec!r}: {WORKLOAD_USAGE}")
    reqs = [BenchRequest(i, tuple(p), m) for i, (p, m) in enumerate(pairs)]
    return Workload(spec, reqs[:count], reqs[count:], dropped)
