"""The built-in models shipped in ``jaxspec/assets/``: a Mixture-of-Experts Python code model
(the target) and a dense draft distilled from it, sharing one sentencepiece tokenizer; and,
for comparing MoE and dense at equal active size, a dense target of the same active
parameter count with its own distilled draft (``jaxspec/assets/dense/``, same tokenizer).

``python -m jaxspec.serve`` and ``python -m jaxspec.generate`` use the MoE pair when no
``--model`` is given (with the draft proposing). ``BUILTIN`` is also accepted wherever a model
or a draft is named: ``--model builtin``, ``--draft builtin`` (with ``--spec-method eagle3``, the
EAGLE-3 head trained for the MoE target, ``jaxspec/assets/eagle3/``, which is also that method's
default for the MoE target); ``BUILTIN_DENSE`` names the dense pair: ``--model builtin-dense`` (its draft proposes; ``--draft builtin`` with it means its own
draft). How they were built, on what, and how well they do: ``jaxspec/assets/MODEL_CARD.md`` and
``jaxspec/assets/dense/MODEL_CARD.md``; to rebuild them: ``python tools/build_assets.py`` and
``python tools/build_assets.py --family dense``.
"""

from __future__ import annotations

from pathlib import Path

from jaxspec.config import ConfigError

BUILTIN = "builtin"
BUILTIN_DENSE = "builtin-dense"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
# Each built-in name -> the directory holding its target/ and draft/.
FAMILY_DIRS = {BUILTIN: ASSETS_DIR, BUILTIN_DENSE: ASSETS_DIR / "dense"}
_REBUILD = {BUILTIN: "python tools/build_assets.py", BUILTIN_DENSE: "python tools/build_assets.py --family dense"}
ROLES = ("target", "draft")
# The EAGLE-3 head trained for the MoE target (speculators layout; tools/train_eagle3.py).
EAGLE3_DIR = ASSETS_DIR / "eagle3"


def is_builtin(name: str | None) -> bool:
    return name in FAMILY_DIRS


def asset_dir(role: str = "target", name: str = BUILTIN) -> Path:
    """The shipped model directory for ``role`` ("target" or "draft") of the built-in ``name``
    (``BUILTIN`` or ``BUILTIN_DENSE``); raises ConfigError if it is missing."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if name not in FAMILY_DIRS:
        raise ValueError(f"built-in name must be one of {tuple(FAMILY_DIRS)}, got {name!r}")
    path = FAMILY_DIRS[name] / role
    if not (path / "config.json").exists():
        what = f"the built-in {role} model" if name == BUILTIN else f"the built-in dense {role} model ({name})"
        raise ConfigError(
            f"{what} is missing ({path}): this install has no trained assets for it. "
            f"Rebuild them with `{_REBUILD[name]}`, or name a model with --model"
        )
    return path


def available(name: str = BUILTIN) -> bool:
    return all((FAMILY_DIRS[name] / role / "config.json").exists() for role in ROLES)


def draft_for(model: str | None) -> str:
    """The built-in name whose draft goes with target ``model``: its own for a built-in target
    (``builtin-dense`` -> the dense pair's draft), else the MoE pair's draft."""
    return model if is_builtin(model) else BUILTIN


def resolve(name_or_path: str, role: str = "target") -> str:
    """A built-in name -> its shipped model directory for ``role``; anything else unchanged."""
    return str(asset_dir(role, name_or_path)) if is_builtin(name_or_path) else name_or_path


def eagle3_head(name: str = BUILTIN) -> Path:
    """The shipped EAGLE-3 head folder for the built-in target ``name`` (only the MoE target has
    one); raises ConfigError if there is none."""
    if name != BUILTIN or not (EAGLE3_DIR / "config.json").exists():
        raise ConfigError(f"there is no built-in EAGLE-3 head for {name!r}: name a head folder with --draft, "
                          "or train one with tools/train_eagle3.py")
    return EAGLE3_DIR
