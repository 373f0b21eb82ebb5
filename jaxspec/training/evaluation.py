"""Held-out figures of a trained model: bits per byte (vs xz) and expert load.

Bits per byte: the held-out documents as one [bos] doc [eos] stream, cut into
non-overlapping windows (``data.eval_windows``); total NLL in bits over every
predicted token (eos included: it encodes where a file ends, which a compressor
encodes too) divided by the files' UTF-8 bytes.

xz baseline: ``lzma`` with preset 9 | PRESET_EXTREME (``xz -9e``), both on each
file separately (summed; what ``xz -9e file`` does per file) and on the files
concatenated (a stronger baseline that, like the model's packed windows, can
use other files as context).
"""

from __future__ import annotations

import lzma
import math
from typing import Sequence

from flax import nnx

from jaxspec.models import Transformer
from jaxspec.tokenizer import Tokenizer
from jaxspec.training.corpus import Document
from jaxspec.training.data import encode_documents, eval_windows, token_byte_lengths
from jaxspec.training.lm import evaluate_nll
from jaxspec.training.losses import expert_balance

XZ_PRESET = 9 | lzma.PRESET_EXTREME


def xz_bits_per_byte(documents: Sequence[Document]) -> dict[str, float]:
    data = [d.text.encode("utf-8") for d in documents]
    total = sum(len(b) for b in data)
    per_file = sum(len(lzma.compress(b, preset=XZ_PRESET)) for b in data)
    joined = len(lzma.compress(b"".join(data), preset=XZ_PRESET))
    return {"xz_per_file_bpb": 8 * per_file / total, "xz_concatenated_bpb": 8 * joined / total, "bytes": total}


def heldout_bits_per_byte(
    model: Transformer,
    tokenizer: Tokenizer,
    documents: Sequence[Document],
    seq_len: int,
    batch_size: int = 8,
    moe_backend: str | None = None,
) -> dict:
    cfg = model.cfg
    stream = encode_documents(tokenizer, documents)
    windows = eval_windows(stream, seq_len, cfg.pad_id)
    graphdef, state = nnx.split(model)
    r = evaluate_nll(graphdef, nnx.to_pure_dict(state), windows, batch_size, moe_backend)
    nbytes = int(token_byte_lengths(tokenizer)[windows.targets[windows.mask]].sum())
    moe_layers = [i for i in range(cfg.num_layers) if cfg.layer_is_moe(i)]
    return {
        "loss_nats_per_token": r["nll_sum"] / r["tokens"],
        "bits_per_byte": r["nll_sum"] / math.log(2) / nbytes,
        "tokens": r["tokens"],
        "bytes": nbytes,
        "seq_len": seq_len,
        "expert_balance_per_layer": expert_balance(r["expert_load"], moe_layers) if moe_layers else [],
        "expert_load": r["expert_load"].tolist(),
    }
