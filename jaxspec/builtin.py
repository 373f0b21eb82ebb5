"""The built-in models shipped in ``jaxspec/assets/``: a Mixture-of-Experts Python code model
(the target) and a dense draft distilled from it, sharing one sentencepiece tokenizer.

``python -m jaxspec.serve`` and ``python -m jaxspec.generate`` use them when no ``--model`` is
given (with the draft proposing). ``BUILTIN`` is also accepted wherever a model or a draft is
named: ``--model builtin``, ``--draft builtin``. How they were built, on what, and how well they
do: ``jaxspec/assets/MODEL_CARD.md``; to rebuild them: ``python tools/build_assets.py``.
"""

from __future__ import annotations

from pathlib import Path

from jaxspec.config import ConfigError

BUILTIN = "builtin"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
ROLES = ("target", "draft")


def asset_dir(role: str = "target") -> Path:
    """The shipped model directory for ``role`` ("target" or "draft"); raises if it is missing."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    path = ASSETS_DIR / role
    if not (path / "config.json").exists():
        raise ConfigError(
            f"the built-in {role} model is missing ({path}): this install has no trained assets. "
            "Rebuild them with `python tools/build_assets.py`, or name a model with --model"
        )
    return path


def available() -> bool:
    return all((ASSETS_DIR / role / "config.json").exists() for role in ROLES)


def resolve(name_or_path: str, role: str = "target") -> str:
    """``BUILTIN`` -> the shipped model directory for ``role``; anything else unchanged."""
    return str(asset_dir(role)) if name_or_path == BUILTIN else name_or_path
