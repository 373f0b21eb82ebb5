"""Token streams, packed fixed-length training windows and evaluation windows.

A corpus split becomes one token stream: each document as ``[bos] + ids + [eos]``
(bos when the tokenizer has one), concatenated. Training examples are the
non-overlapping windows ``stream[i*T : i*T + T + 1]`` (inputs = first T tokens,
targets = last T), so every token is a target exactly once per epoch and a window
may span a document boundary (attention crosses it; the eos in between tells the
model a new file starts, as in GPT-style packing).

Order: window ``g`` of the endless sequence of epochs is window
``perm_e[g mod W]`` of epoch ``e = g // W``, with ``perm_e`` a permutation seeded
by (seed, e). The data position is the number of windows consumed, so a run
resumed from a checkpoint continues with exactly the windows it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from jaxspec.tokenizer import Tokenizer
from jaxspec.training.corpus import Document, corpus_fingerprint


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """Identifies a tokenizer by its files (sentencepiece) or its kind and vocabulary."""
    model_path = getattr(tokenizer, "model_path", None)
    h = hashlib.sha256()
    if model_path is not None:
        h.update(Path(model_path).read_bytes())
    else:
        h.update(f"{type(tokenizer).__name__}:{tokenizer.vocab_size}".encode())
    return h.hexdigest()[:16]


def encode_documents(tokenizer: Tokenizer, documents: Sequence[Document]) -> np.ndarray:
    """The documents' token stream (int32), each as [bos] + ids + [eos]."""
    if not tokenizer.eos_ids:
        raise ValueError("the tokenizer has no eos id to separate documents")
    eos = tokenizer.eos_ids[0]
    parts = [np.asarray(tokenizer.encode(d.text, add_bos=True) + [eos], np.int32) for d in documents]
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def cached_stream(
    tokenizer: Tokenizer, documents: Sequence[Document], cache_path: str | os.PathLike | None
) -> np.ndarray:
    """``encode_documents``, stored in ``cache_path`` (.npy + .json) and reused while the
    corpus and the tokenizer are unchanged (a resumed run then trains on the same stream)."""
    if cache_path is None:
        return encode_documents(tokenizer, documents)
    path = Path(cache_path)
    meta_path = path.with_suffix(".json")
    key = {"corpus": corpus_fingerprint(documents), "tokenizer": tokenizer_fingerprint(tokenizer)}
    if path.exists() and meta_path.exists() and json.loads(meta_path.read_text()) == key:
        return np.load(path)
    stream = encode_documents(tokenizer, documents)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, stream)
    meta_path.write_text(json.dumps(key))
    return stream


class Batch(NamedTuple):
    inputs: np.ndarray  # [B, T] int32
    targets: np.ndarray  # [B, T] int32
    mask: np.ndarray  # [B, T] bool: positions that count in the loss


def epoch_order(num_items: int, position: int, count: int, seed: int) -> np.ndarray:
    """Item indices ``position .. position+count-1`` of the endless seeded epoch order."""
    out = np.empty(count, np.int64)
    g = position
    filled = 0
    while filled < count:
        epoch, offset = divmod(g, num_items)
        perm = np.random.default_rng([seed, epoch]).permutation(num_items)
        take = min(count - filled, num_items - offset)
        out[filled : filled + take] = perm[offset : offset + take]
        filled += take
        g += take
    return out


class PackedWindows:
    """Fixed-length training windows over a token stream, in seeded epoch order."""

    def __init__(self, stream: np.ndarray, seq_len: int, seed: int = 0):
        self.stream = np.asarray(stream, np.int32)
        self.seq_len = seq_len
        self.seed = seed
        self.num_windows = (len(self.stream) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(
                f"the training stream has {len(self.stream)} tokens: too short for one window of {seq_len} + 1"
            )

    @property
    def tokens_per_epoch(self) -> int:
        return self.num_windows * self.seq_len

    def batch(self, position: int, batch_size: int) -> Batch:
        """Windows ``position .. position + batch_size - 1`` (position counts windows, not batches)."""
        idx = epoch_order(self.num_windows, position, batch_size, self.seed)
        starts = idx * self.seq_len
        rows = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        w = self.stream[rows]
        return Batch(w[:, :-1], w[:, 1:], np.ones((batch_size, self.seq_len), bool))


def eval_windows(stream: np.ndarray, seq_len: int, pad_id: int = 0) -> Batch:
    """Every target of the stream exactly once, in order: windows of ``seq_len`` with the last one padded.

    Each window starts without context from the previous one (a small, documented
    pessimism of non-overlapping evaluation)."""
    stream = np.asarray(stream, np.int32)
    n_targets = len(stream) - 1
    if n_targets < 1:
        raise ValueError("evaluation stream needs at least 2 tokens")
    n = -(-n_targets // seq_len)
    inputs = np.full((n, seq_len), pad_id, np.int32)
    targets = np.full((n, seq_len), pad_id, np.int32)
    mask = np.zeros((n, seq_len), bool)
    for i in range(n):
        chunk = stream[i * seq_len : i * seq_len + seq_len + 1]
        m = len(chunk) - 1
        inputs[i, :m] = chunk[:-1]
        targets[i, :m] = chunk[1:]
        mask[i, :m] = True
    return Batch(inputs, targets, mask)


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for specials) [V].

    Decoding concatenates these bytes, so the bytes covered by any set of target
    tokens is a sum over this table: bits per byte of any subset of windows is exact."""
    return np.array([len(tokenizer.decode_bytes([i])) for i in range(tokenizer.vocab_size)], np.int64)
