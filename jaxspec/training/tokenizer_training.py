"""Training a byte-exact sentencepiece BPE tokenizer for source code.

Settings, and why (each verified on the standard library; see tests):

- ``normalization_rule_name="identity"``, ``remove_extra_whitespaces=False``,
  ``add_dummy_prefix=False``: the text is never rewritten, so indentation,
  blank lines and trailing spaces survive and decode(encode(x)) == x.
- ``allow_whitespace_only_pieces=True``: runs of spaces become single pieces
  ("▁▁▁▁", "▁▁▁▁▁▁▁▁", ...), learned from the data, so no user-defined
  indentation symbols are needed (those would also block merges such as ":\\n").
  Newlines are ordinary characters: pieces like ":\\n" and "\\n\\n" are learned.
- ``byte_fallback=True``: any character outside the vocabulary (tabs, emoji,
  control bytes) is spelled as UTF-8 byte pieces, never <unk>.
- ``split_digits=True``: numbers are spelled digit by digit (no arbitrary
  multi-digit pieces).
- ids ``pad=0, bos=1, eos=2, unk=3``, the ``ModelConfig`` defaults.

The one text sentencepiece cannot reproduce is the character U+2581 ("▁"),
its internal space symbol: it decodes as a space. ``check_roundtrip`` finds
such files.

Training input: documents cut at line boundaries into chunks of at most
``chunk_chars`` characters (a line longer than that is cut inside), so pieces
can span newlines. With ``max_sentences`` a seeded random sample of chunks is
used (sentencepiece's own sampling is not seedable).
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Iterator, Sequence

from jaxspec.tokenizer import SentencePieceTokenizer
from jaxspec.training.corpus import Document

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# Byte pieces + special pieces + the distinct characters sentencepiece must keep.
MIN_VOCAB = 300


def document_chunks(text: str, chunk_chars: int = 2048) -> Iterator[str]:
    """Consecutive pieces of ``text`` of at most ``chunk_chars`` characters, cut after newlines where possible."""
    cur: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        while len(line) > chunk_chars:  # a pathological long line: cut it (rare; minified data)
            if cur:
                yield "".join(cur)
                cur, size = [], 0
            yield line[:chunk_chars]
            line = line[chunk_chars:]
        if size + len(line) > chunk_chars and cur:
            yield "".join(cur)
            cur, size = [], 0
        cur.append(line)
        size += len(line)
    if cur:
        yield "".join(cur)


def training_sentences(
    documents: Sequence[Document], chunk_chars: int = 2048, max_sentences: int | None = None, seed: int = 0
) -> list[str]:
    sentences = [c for d in documents for c in document_chunks(d.text, chunk_chars)]
    if max_sentences is not None and len(sentences) > max_sentences:
        sentences = random.Random(seed).sample(sentences, max_sentences)
    return sentences


def train_sentencepiece(
    documents: Sequence[Document],
    output: str | os.PathLike,
    vocab_size: int = 4096,
    character_coverage: float = 0.9999,
    max_sentences: int | None = None,
    chunk_chars: int = 2048,
    seed: int = 0,
    num_threads: int = 2,
) -> Path:
    """Train BPE on ``documents`` and write the model file to ``output`` (a ``tokenizer.model`` path)."""
    import sentencepiece as spm

    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB} (256 byte pieces + specials + characters)")
    sentences = training_sentences(documents, chunk_chars, max_sentences, seed)
    if not sentences:
        raise ValueError("no training text")
    model = io.BytesIO()
    try:
        _train(spm, sentences, model, vocab_size, character_coverage, chunk_chars, num_threads)
    except RuntimeError as e:
        if "required_chars" in str(e):  # more distinct characters than the vocabulary can hold
            raise ValueError(f"vocab_size {vocab_size} is too small for this corpus' characters "
                             f"(raise it or lower character_coverage): {e}") from e
        raise
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return out


def _train(spm, sentences: list[str], model: io.BytesIO, vocab_size: int, character_coverage: float,
           chunk_chars: int, num_threads: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        # Small corpora (tests) may not support vocab_size merges; take what there is.
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=character_coverage,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=4 * chunk_chars + 16,  # bytes, and a character is up to 4
        pad_id=PAD_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        num_threads=num_threads,
        minloglevel=2,
    )


def check_roundtrip(tokenizer: SentencePieceTokenizer, documents: Sequence[Document]) -> list[str]:
    """Ids of the documents whose bytes do not survive encode -> decode_bytes (empty: all exact)."""
    failures = []
    for d in documents:
        ids = tokenizer.encode(d.text, add_bos=False)
        if tokenizer.decode_bytes(ids) != d.text.encode("utf-8") or tokenizer.decode(ids) != d.text:
            failures.append(d.id)
    return failures


def tokenizer_stats(tokenizer: SentencePieceTokenizer, documents: Sequence[Document]) -> dict:
    """Token and byte counts, and how many tokens are byte-fallback pieces."""
    tokens = num_bytes = fallback = 0
    sp = tokenizer.sp
    for d in documents:
        ids = tokenizer.encode(d.text, add_bos=False)
        tokens += len(ids)
        num_bytes += d.num_bytes
        fallback += sum(1 for i in ids if sp.is_byte(i))
    return {
        "documents": len(documents),
        "tokens": tokens,
        "bytes": num_bytes,
        "bytes_per_token": num_bytes / tokens if tokens else 0.0,
        "byte_fallback_tokens": fallback,
    }
