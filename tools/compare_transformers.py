"""Greedy-decode throughput: transformers (torch, CPU) vs jaxspec on one random Mixtral-shaped checkpoint.

    python tools/compare_transformers.py [--batch-sizes 1 8] [--prompt-len 32] [--new-tokens 64]

Creates a random-weight Mixtral (~77M parameters with the defaults) with
transformers, saves it to a temporary folder, loads it into jaxspec with
``load_hf`` and times greedy generation of ``--new-tokens`` tokens per row on
both sides, after one untimed warm-up run each (jaxspec compiles there). Rows:

* transformers   ``model.generate(do_sample=False)``, float32
* jaxspec loop   one jitted prefill + one jitted ``fori_loop`` of T=1 decode
                 steps over the donated KV cache (the model's raw forward)
* jaxspec engine ``jaxspec.engine.Engine`` (per-request prefill, batched decode),
                 i.e. what the server runs

tokens/s counts generated tokens only (batch x new tokens / wall time, prefill
included). "same tokens" is the fraction of greedy tokens equal to transformers'
(random weights give near-tied logits, so a late divergence is not an error).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxspec.checkpoint import load_hf  # noqa: E402
from jaxspec.models import KVCache, Transformer  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per row; the best is reported")
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--expert-dim", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--no-engine", action="store_true", help="skip the jaxspec engine row")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ------------------------------------------------------------------ checkpoint
def make_checkpoint(args: argparse.Namespace, directory: Path):
    """A random Mixtral saved by transformers (safetensors) plus a small byte-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(args.seed)
    cfg = MixtralConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.expert_dim,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=max(256, args.prompt_len + args.new_tokens),
        bos_token_id=None,
        eos_token_id=None,  # both sides generate the full length
        pad_token_id=0,
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


# ---------------------------------------------------------------- generators
def transformers_generate(model, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor(prompts, dtype=torch.long),
            attention_mask=torch.ones(prompts.shape, dtype=torch.long),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
    return out[:, prompts.shape[1] :].numpy()


def jaxspec_loop(model: Transformer, new_tokens: int) -> Callable[[np.ndarray], np.ndarray]:
    """Greedy generation: jitted prefill, then a jitted fori_loop of decode steps (cache donated)."""
    graphdef, state = nnx.split(model)

    @partial(jax.jit, donate_argnums=(2,))
    def prefill(state, tokens, cache):
        b, t = tokens.shape
        out = nnx.merge(graphdef, state)(tokens, jnp.zeros((b,), jnp.int32), cache)
        return jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32), out.cache

    @partial(jax.jit, donate_argnums=(2,))
    def decode(state, first, cache, prompt_len):
        b = first.shape[0]
        model = nnx.merge(graphdef, state)

        def step(i, carry):
            tokens, cache, out = carry
            last = tokens[:, None]
            o = model(last, jnp.full((b,), prompt_len, jnp.int32) + i, cache)
            nxt = jnp.argmax(o.logits[:, 0], axis=-1).astype(jnp.int32)
            return nxt, o.cache, out.at[:, i + 1].set(nxt)

        out = jnp.zeros((b, new_tokens), jnp.int32).at[:, 0].set(first)
        _, cache, out = jax.lax.fori_loop(0, new_tokens - 1, step, (first, cache, out))
        return out, cache

    def run(prompts: np.ndarray) -> np.ndarray:
        b, t = prompts.shape
        cache = KVCache.create(model.cfg, b, t + new_tokens)
        first, cache = prefill(state, jnp.asarray(prompts, jnp.int32), cache)
        out, _ = decode(state, first, cache, jnp.int32(t))
        return np.asarray(out)

    return run


def jaxspec_engine(model: Transformer, tokenizer, batch: int, max_len: int, new_tokens: int):
    from jaxspec.engine import Engine, ModelRunner, PlainRunner
    from jaxspec.sampling import SamplingParams

    engine = Engine(PlainRunner(ModelRunner(model, num_slots=batch, max_len=max_len)), tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)

    def run(prompts: np.ndarray) -> np.ndarray:
        done = engine.generate([list(map(int, p)) for p in prompts], params)
        return np.array([c.token_ids for c in done])

    return run


def timed(
    fn: Callable[[np.ndarray], np.ndarray], prompts: np.ndarray, repeats: int, warmups: int = 1
) -> tuple[float, np.ndarray]:
    for _ in range(warmups):  # compiles on the jaxspec side
        out = fn(prompts)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(prompts)
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        hf_model = make_checkpoint(args, directory)
        model, tokenizer = load_hf(directory, dtype="float32")
        counts = model.cfg.param_counts()
        print(
            f"Mixtral-shaped random model: {counts['total'] / 1e6:.1f}M parameters ({counts['active'] / 1e6:.1f}M active), "
            f"{args.layers} layers, {args.experts} experts top-{args.top_k}, d_model {args.hidden}; "
            f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, float32"
        )
        print(
            f"CPU: {os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} threads); "
            f"jax {jax.__version__} ({jax.default_backend()})"
        )
        rng = np.random.RandomState(args.seed + 1)
        max_len = args.prompt_len + args.new_tokens
        for batch in args.batch_sizes:
            prompts = rng.randint(1, args.vocab, size=(batch, args.prompt_len))
            sides = [("transformers", partial(transformers_generate, hf_model, new_tokens=args.new_tokens), 1)]
            sides.append(("jaxspec loop", jaxspec_loop(model, args.new_tokens), 1))
            if not args.no_engine:
                # Two warm-ups: the engine's second request still compiles its prefill once more
                # (its fresh cache is uncommitted, later ones are committed).
                sides.append(("jaxspec engine", jaxspec_engine(model, tokenizer, batch, max_len, args.new_tokens), 2))
            reference = None
            for name, fn, warmups in sides:
                seconds, tokens = timed(fn, prompts, args.repeats, warmups)
                reference = tokens if reference is None else reference
                rows.append(dict(
                    impl=name, batch=batch, seconds=seconds, tok_s=batch * args.new_tokens / seconds,
                    same=float(np.mean(tokens == reference)),
                ))
                print(f"  {name} batch {batch}: {rows[-1]['tok_s']:.1f} tokens/s", flush=True)
    base = {r["batch"]: r["tok_s"] for r in rows if r["impl"] == "transformers"}
    print(f"\n| {'implementation':<15} | batch | {'seconds':>8} | {'tokens/s':>9} | vs transformers | same tokens |")
    print(f"|{'-' * 17}|-------|{'-' * 10}|{'-' * 11}|-----------------|-------------|")
    for r in rows:
        print(
            f"| {r['impl']:<15} | {r['batch']:>5} | {r['seconds']:>8.3f} | {r['tok_s']:>9.1f} | "
            f"{r['tok_s'] / base[r['batch']]:>14.2f}x | {r['same'] * 100:>10.1f}% |"
        )
    return rows


if __name__ == "__main__":
    main()
