"""Hugging Face ``tokenizer.json`` tokenizers behind the :class:`jaxspec.tokenizer.Tokenizer` protocol.

Encoding goes through the ``tokenizers`` package. Decoding does not: a streaming
server needs the exact bytes of a token run that may end inside a UTF-8
character, which ``tokenizers.decode`` (returning ``str``) cannot give. Every
token's bytes are therefore precomputed from the vocabulary, for the two
layouts the supported model families use:

* byte-level BPE (GPT-2 / Llama-3 / Qwen): each piece is written in a 256-char
  alphabet that stands for the 256 byte values;
* sentencepiece-style BPE (Llama-2 / Mistral / Mixtral): ``▁`` stands for a
  space, ``<0xAB>`` pieces are byte fallbacks, and the decoder drops the leading
  space of the first piece.

Special ids: bos/eos come from ``tokenizer_config.json``, ``generation_config.json``
and ``config.json`` (see ``HFTokenizer.__init__``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

_METASPACE = "\u2581"
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenizerFormatError(ValueError):
    """A tokenizer.json this class cannot decode byte-exactly."""


def byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet: one printable character per byte value -> that byte.

    Bytes that are visible Latin-1 characters stand for themselves; the other 68
    (controls, space, a few invisible ones) are moved, in byte order, to the
    characters from U+0100 upwards so that every piece is printable text.
    """
    visible = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table: dict[str, int] = {}
    moved = 0
    for byte in range(256):
        if byte in visible:
            table[chr(byte)] = byte
        else:
            table[chr(0x100 + moved)] = byte
            moved += 1
    return table


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    with open(path) as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _decoder_parts(decoder: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not decoder:
        return []
    if decoder.get("type") == "Sequence":
        return [p for d in decoder.get("decoders", []) for p in _decoder_parts(d)]
    return [decoder]


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


class HFTokenizer:
    """A Hugging Face model folder's ``tokenizer.json`` with byte-exact decoding."""

    def __init__(self, directory: str | os.PathLike):
        from tokenizers import Tokenizer as _HFTokenizer  # optional extra: jaxspec[hf]

        self.directory = Path(directory)
        path = self.directory / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"tokenizer.json not found in {self.directory}")
        self._tok = _HFTokenizer.from_file(str(path))
        spec = json.loads(self._tok.to_str())
        self._tokenizer_config = _read_json(self.directory / "tokenizer_config.json")
        self._generation_config = _read_json(self.directory / "generation_config.json")
        self._model_config = _read_json(self.directory / "config.json")

        self._mode, self._strip_leading_space = self._decode_layout(spec)
        special = {i for i, tok in self._tok.get_added_tokens_decoder().items() if tok.special}
        added = {i: tok.content for i, tok in self._tok.get_added_tokens_decoder().items()}
        alphabet = byte_level_alphabet()
        self._piece_bytes: list[bytes] = []
        for i in range(self._tok.get_vocab_size(with_added_tokens=True)):
            if i in special:
                piece = b""  # control tokens have no text, as in the sentencepiece tokenizer
            elif i in added:
                piece = added[i].encode("utf-8")  # added tokens are stored as plain text
            else:
                piece = self._piece_to_bytes(self._tok.id_to_token(i), alphabet)
            self._piece_bytes.append(piece)

        self._bos_id, self._adds_bos = self._resolve_bos()
        self._eos_ids = self._resolve_eos()

    # ------------------------------------------------------------ decode layout
    def _decode_layout(self, spec: dict[str, Any]) -> tuple[str, bool]:
        """("byte_level" | "metaspace", strip the first leading space?) from the decoder spec."""
        parts = _decoder_parts(spec.get("decoder"))
        kinds = {p.get("type") for p in parts}
        if "ByteLevel" in kinds:
            return "byte_level", False
        metaspace = [p for p in parts if p.get("type") == "Metaspace"]
        replaces_metaspace = any(
            p.get("type") == "Replace" and (p.get("pattern") or {}).get("String") == _METASPACE for p in parts
        )
        if metaspace or replaces_metaspace:
            strip = any(
                p.get("type") == "Strip" and p.get("content") == " " and int(p.get("start", 0)) >= 1 for p in parts
            )
            for m in metaspace:
                scheme = m.get("prepend_scheme", "always" if m.get("add_prefix_space", True) else "never")
                strip |= scheme != "never"
            return "metaspace", strip
        pre = _decoder_parts(spec.get("pre_tokenizer"))
        if not parts and any(p.get("type") == "ByteLevel" for p in pre):
            return "byte_level", False
        raise TokenizerFormatError(
            f"{self.directory / 'tokenizer.json'}: decoder {sorted(k for k in kinds if k) or None} is not supported "
            "(supported: ByteLevel, Metaspace, or Replace('\u2581', ' ') with ByteFallback)"
        )

    def _piece_to_bytes(self, piece: str | None, alphabet: dict[str, int]) -> bytes:
        if piece is None:
            return b""
        if self._mode == "byte_level":
            if all(c in alphabet for c in piece):
                return bytes(alphabet[c] for c in piece)
            return piece.encode("utf-8")
        match = _BYTE_PIECE.match(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace(_METASPACE, " ").encode("utf-8")

    # ------------------------------------------------------------- special ids
    def _config_value(self, key: str) -> Any:
        """``key`` from generation_config.json, else config.json (the order HF generate() uses)."""
        for cfg in (self._generation_config, self._model_config):
            if cfg.get(key) is not None:
                return cfg[key]
        return None

    def _resolve_bos(self) -> tuple[int | None, bool]:
        """(bos id, whether encode(add_bos=True) prepends it)."""
        with_special = self._tok.encode("a", add_special_tokens=True).ids
        without = self._tok.encode("a", add_special_tokens=False).ids
        # The id the post-processor puts in front, if any (Llama-2/3 templates do, Qwen does not).
        prepends = len(with_special) > len(without) and with_special[1 : 1 + len(without)] == without
        post_bos = with_special[0] if prepends else None
        content = _token_content(self._tokenizer_config.get("bos_token"))
        bos = self._tok.token_to_id(content) if content else None
        if bos is None:
            bos = post_bos
        if bos is None:
            ids = _as_id_list(self._config_value("bos_token_id"))
            bos = ids[0] if ids else None
        adds = self._tokenizer_config.get("add_bos_token")
        adds_bos = bool(adds) if adds is not None else post_bos is not None
        return bos, adds_bos and bos is not None

    def _resolve_eos(self) -> tuple[int, ...]:
        ids = _as_id_list(self._config_value("eos_token_id"))
        if not ids:
            content = _token_content(self._tokenizer_config.get("eos_token"))
            eos = self._tok.token_to_id(content) if content else None
            ids = [] if eos is None else [eos]
        return tuple(dict.fromkeys(ids))

    # --------------------------------------------------------------- protocol
    @property
    def vocab_size(self) -> int:
        return len(self._piece_bytes)

    @property
    def bos_id(self) -> int | None:
        """The id ``encode(add_bos=True)`` prepends; None when this tokenizer uses no bos."""
        return self._bos_id if self._adds_bos else None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # The post-processor is bypassed so that only bos is ever added (some templates add eos too).
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        return [self._bos_id] + ids if add_bos and self.bos_id is not None else ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        n = len(self._piece_bytes)
        out = b"".join(self._piece_bytes[i] for i in ids if 0 <= i < n)
        if self._strip_leading_space and out.startswith(b" "):
            out = out[1:]
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        """Copy tokenizer.json / tokenizer_config.json and record the resolved bos/eos ids.

        The ids go to generation_config.json because a jaxspec model directory's
        config.json is the jaxspec ModelConfig, not HF's.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            src = self.directory / name
            if src.exists() and src.resolve() != (d / name).resolve():
                shutil.copyfile(src, d / name)
        generation = dict(self._generation_config)
        generation["bos_token_id"] = self._bos_id
        generation["eos_token_id"] = list(self._eos_ids)
        (d / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
