"""Tokenizers behind one small protocol, and incremental detokenisation.

Implementations: ``ByteTokenizer`` (no files; used by the built-in test configs),
``SentencePieceTokenizer`` (``tokenizer.model``). A Hugging Face
``tokenizer.json`` tokenizer plugs in by implementing the same protocol.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    @property
    def eos_ids(self) -> tuple[int, ...]: ...

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The exact UTF-8 bytes of ``ids`` (may end inside a multi-byte character)."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, directory: str | os.PathLike) -> None:
        """Write the files ``load_tokenizer(directory)`` needs."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: 0 pad, 1 bos, 2 eos, byte b -> b + 3. Vocab 259."""

    OFFSET = 3
    pad_id = 0

    @property
    def vocab_size(self) -> int:
        return 256 + self.OFFSET

    @property
    def bos_id(self) -> int | None:
        return 1

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return (2,)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [b + self.OFFSET for b in text.encode("utf-8")]
        return [1] + ids if add_bos else ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return bytes(i - self.OFFSET for i in ids if i >= self.OFFSET)

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "byte_tokenizer.txt").write_text("jaxspec byte tokenizer\n")


class SentencePieceTokenizer:
    """A ``tokenizer.model`` (sentencepiece) with byte-exact decoding through piece bytes."""

    def __init__(self, model_path: str | os.PathLike):
        import sentencepiece as spm

        self.model_path = Path(model_path)
        if not self.model_path.exists():
            raise FileNotFoundError(f"sentencepiece model not found: {self.model_path}")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        self._piece_bytes = [self._bytes_of(i) for i in range(self.sp.get_piece_size())]

    def _bytes_of(self, i: int) -> bytes:
        if self.sp.is_control(i) or self.sp.is_unknown(i):
            return b""
        piece = self.sp.id_to_piece(i)
        if self.sp.is_byte(i):  # "<0xAB>"
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int | None:
        b = self.sp.bos_id()
        return b if b >= 0 else None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.sp.eos_id()
        return (e,) if e >= 0 else ()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(self.sp.encode(text))
        return [self.bos_id] + ids if add_bos and self.bos_id is not None else ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        out = b"".join(self._piece_bytes[i] for i in ids if 0 <= i < len(self._piece_bytes))
        # sentencepiece drops the dummy-prefix space of the first piece when it adds one.
        if self._adds_dummy_prefix and out.startswith(b" "):
            out = out[1:]
        return out

    @property
    def _adds_dummy_prefix(self) -> bool:
        if not hasattr(self, "_dummy_prefix"):
            self._dummy_prefix = self.sp.encode("a", out_type=str)[0].startswith("\u2581")
        return self._dummy_prefix

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "tokenizer.model").write_bytes(self.model_path.read_bytes())


def load_tokenizer(directory: str | os.PathLike | None) -> Tokenizer:
    """The tokenizer stored in a model directory; ``None`` gives the byte tokenizer."""
    if directory is None:
        return ByteTokenizer()
    d = Path(directory)
    if (d / "tokenizer.model").exists():
        return SentencePieceTokenizer(d / "tokenizer.model")
    if (d / "tokenizer.json").exists():
        from jaxspec.hf_tokenizer import HFTokenizer  # optional extra: `tokenizers`

        return HFTokenizer(d)
    if (d / "byte_tokenizer.txt").exists():
        return ByteTokenizer()
    raise FileNotFoundError(f"no tokenizer in {d}: expected tokenizer.model, tokenizer.json or byte_tokenizer.txt")


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas that are always whole UTF-8 characters."""

    _CONTEXT = 8

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._pending = b""
        self.text = ""

    def add(self, new_ids: Sequence[int]) -> str:
        """Append tokens; return the newly completed text (possibly empty)."""
        n_old = len(self.ids)
        self.ids.extend(int(i) for i in new_ids)
        # Decode from a few tokens back so that prefix-dependent rules (a leading-space
        # strip) apply equally to both decodes; the difference is the new bytes.
        start = max(0, n_old - self._CONTEXT)
        before = len(self.tokenizer.decode_bytes(self.ids[start:n_old]))
        data = self.tokenizer.decode_bytes(self.ids[start:])[before:]
        self._pending += data
        cut = _complete_utf8_prefix(self._pending)
        delta = self._pending[:cut].decode("utf-8", errors="replace")
        self._pending = self._pending[cut:]
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a request: whatever bytes remain, invalid ones replaced."""
        delta = self._pending.decode("utf-8", errors="replace")
        self._pending = b""
        self.text += delta
        return delta


def _complete_utf8_prefix(data: bytes) -> int:
    """Length of the longest prefix of ``data`` that does not end inside a UTF-8 character."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        b = data[n - back]
        if b & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        if b & 0x80 == 0:  # ASCII
            return n
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return n if back >= need else n - back
    return n  # only continuation bytes: invalid anyway, let them through as replacement chars
