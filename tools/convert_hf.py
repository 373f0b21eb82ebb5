"""Convert a Hugging Face model folder (config.json, safetensors, tokenizer) to a jaxspec model directory.

    python tools/convert_hf.py HF_DIR OUT_DIR [--dtype bfloat16] [--max-seq-len 8192]

The output is an orbax model directory that ``jaxspec.checkpoint.load_model``
restores (straight into a sharding, if given one), which is faster to load than
re-converting the safetensors every time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

# Running as a script puts tools/ first on sys.path; the package lives one level up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm  # noqa: E402

from jaxspec.checkpoint import load_hf, save_model  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("hf_dir", type=Path, help="Hugging Face model folder")
    p.add_argument("out_dir", type=Path, help="jaxspec model directory to write")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="parameter dtype (default: the checkpoint's own dtype)",
    )
    p.add_argument("--max-seq-len", type=int, default=None, help="default KV cache length (default: max_position_embeddings)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the conversion; returns the written directory."""
    args = parse_args(argv)
    bar = tqdm(desc="tensors", unit="tensor", disable=args.quiet)

    def progress(done: int, total: int, name: str) -> None:
        if bar.total != total:
            bar.total = total
        bar.set_postfix_str(name, refresh=False)
        bar.update(done - bar.n)

    try:
        model, tokenizer = load_hf(args.hf_dir, dtype=args.dtype, max_seq_len=args.max_seq_len, progress=progress)
    finally:
        bar.close()
    out = save_model(args.out_dir, model, tokenizer)
    counts = model.cfg.param_counts()
    print(
        f"wrote {out}: {model.cfg.name} {model.cfg.dtype}, "
        f"{counts['total'] / 1e6:.1f}M parameters ({counts['active'] / 1e6:.1f}M active per token)"
    )
    return out


if __name__ == "__main__":
    main()
