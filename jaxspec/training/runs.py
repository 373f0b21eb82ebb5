"""Small pieces the training tools share: tokenizer-aligned configs, run metadata, reports."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import jax

from jaxspec.config import ModelConfig
from jaxspec.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer


def load_tokenizer_arg(path: str | None) -> Tokenizer:
    """``--tokenizer DIR`` (a directory with tokenizer.model / tokenizer.json), or the byte tokenizer."""
    return ByteTokenizer() if path in (None, "", "byte") else load_tokenizer(path)


def tokenizer_pad_id(tokenizer: Tokenizer) -> int:
    sp = getattr(tokenizer, "sp", None)
    if sp is not None and sp.pad_id() >= 0:
        return int(sp.pad_id())
    return int(getattr(tokenizer, "pad_id", 0))


def config_for_tokenizer(cfg: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    """The config with the tokenizer's vocabulary size and special ids written in, so a model
    directory's config.json always agrees with the tokenizer stored beside it."""
    return cfg.replace(
        vocab_size=tokenizer.vocab_size,
        bos_id=tokenizer.bos_id,
        eos_ids=tuple(tokenizer.eos_ids) or cfg.eos_ids,
        pad_id=tokenizer_pad_id(tokenizer),
    )


def environment() -> dict[str, Any]:
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def write_json(path: str | os.PathLike, data: Any) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, (set, tuple)):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The JSON lines of ``RUN_DIR/metrics.jsonl`` (empty when absent)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
