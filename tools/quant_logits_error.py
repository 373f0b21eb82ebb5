"""Logits error of int8 / int4 weights on a random Mixtral-shaped Hugging Face checkpoint.

    python tools/quant_logits_error.py [--batch 4 --tokens 128] [compare_transformers.py's model flags]

Builds the checkpoint ``tools/compare_transformers.py`` benchmarks (random weights, saved by
transformers), loads it into jaxspec in float32 and quantized at load, and runs one teacher-forced
forward over random tokens. Prints, per precision, the logits' error against jaxspec float32 (max
absolute, RMS relative to the float32 logits' RMS) and how often the argmax agrees; the float32 row
is checked against transformers' own logits on the same weights. A random model's logits are
nearly flat, so argmax agreement here is a harsh test: small errors flip near-ties.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_transformers import make_checkpoint, parse_args  # noqa: E402
from jaxspec.loading import load_any  # noqa: E402
from jaxspec.models import KVCache  # noqa: E402


def logits(model, tokens: np.ndarray) -> np.ndarray:
    b, t = tokens.shape
    cache = KVCache.create(model.cfg, b, t)
    return np.asarray(jax.jit(lambda m, x, c: m(x, jnp.zeros((b,), jnp.int32), c).logits)(model, tokens, cache))


def measure(args, batch: int, tokens: int) -> tuple[float, list[tuple[str, float, float, float]]]:
    """(max |jaxspec float32 - transformers| logits, rows of (weights, max abs error, RMS error /
    RMS logits, argmax agreement) against jaxspec float32)."""
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(1, args.vocab, (batch, tokens)).astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        hf_model = make_checkpoint(args, Path(tmp))
        import torch

        with torch.no_grad():
            ref_hf = hf_model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()
        rows, ref, err_hf = [], None, 0.0
        for quantize in (None, "int8", "int4"):
            model, _ = load_any(tmp, dtype="float32", quantize=quantize)
            out = logits(model, ids)
            if ref is None:
                ref, err_hf = out, float(np.abs(out - ref_hf).max())
            diff = out - ref
            rms = float(np.sqrt(np.mean(diff ** 2)) / np.sqrt(np.mean(ref ** 2)))
            rows.append((quantize or "float32", float(np.abs(diff).max()), rms,
                         float(np.mean(out.argmax(-1) == ref.argmax(-1)))))
    return err_hf, rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    batch, tokens = 4, 128
    for flag in ("--batch", "--tokens"):
        if flag in argv:
            i = argv.index(flag)
            value = int(argv[i + 1])
            del argv[i: i + 2]
            batch, tokens = (value, tokens) if flag == "--batch" else (batch, value)
    args = parse_args(argv)
    err_hf, rows = measure(args, batch, tokens)
    print(f"random Mixtral-shaped checkpoint: {args.layers} layers, d_model {args.hidden}, {args.experts} experts "
          f"top-{args.top_k}, expert width {args.expert_dim}, vocabulary {args.vocab}; {batch} x {tokens} tokens")
    print(f"jaxspec float32 vs transformers float32: max |logits difference| {err_hf:.2e}")
    print("| weights | max abs error | RMS error / RMS logits | argmax = float32's |")
    print("|---|---:|---:|---:|")
    for name, max_abs, rms, agree in rows:
        print(f"| {name} | {max_abs:.2e} | {rms:.4f} | {agree:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
