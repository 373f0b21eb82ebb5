"""Chat templates from a checkpoint's tokenizer files, rendered as transformers renders them.

The template comes from ``chat_template.jinja``, ``chat_template.json`` or the
``chat_template`` key of ``tokenizer_config.json`` (a string, or a list of named
templates of which ``default`` is used), in the order transformers reads them.
Rendering uses the same jinja2 set-up as ``apply_chat_template``: an immutable
sandbox, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson``,
``strftime_now``, the ``{% generation %}`` tag, the special tokens as strings and
``add_generation_prompt=True``. The rendered text already holds any bos token,
so it is tokenised without adding one.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The template refused the messages (``raise_exception``) or failed to render."""


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _pick(template: Any) -> str | None:
    if isinstance(template, str):
        return template
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default")
    return None


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class GenerationTag(Extension):
            """``{% generation %}`` marks assistant text for training masks; rendering keeps its body."""

            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

            def _render(self, caller):
                return caller()

        def raise_exception(message: str):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[GenerationTag, loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._jinja_errors = jinja2.exceptions.TemplateError
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = env.from_string(source)

    @classmethod
    def from_directory(cls, directory: str | Path) -> "ChatTemplate | None":
        """The checkpoint's template, or None when it has none."""
        d = Path(directory)
        config = _read_json(d / "tokenizer_config.json")
        source = None
        if (d / "chat_template.jinja").is_file():
            source = (d / "chat_template.jinja").read_text()
        elif (d / "chat_template.json").is_file():
            source = _pick(_read_json(d / "chat_template.json").get("chat_template"))
        if source is None:
            source = _pick(config.get("chat_template"))
        if not source:
            return None
        special = {k: v for k in _SPECIAL_TOKEN_KEYS if (v := _token_content(config.get(k))) is not None}
        return cls(source, special)

    def render(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """The prompt text for ``messages`` followed by the assistant's turn. Raises ChatTemplateError."""
        try:
            return self._template.render(messages=messages, tools=None, documents=None, add_generation_prompt=True,
                                         **{**self.special_tokens, **kwargs})
        except self._jinja_errors as e:
            raise ChatTemplateError(str(e)) from None
        except (TypeError, ValueError, KeyError, AttributeError) as e:  # a template tripping over odd input
            raise ChatTemplateError(f"{type(e).__name__}: {e}") from None


def chat_template_for(tokenizer: Any) -> ChatTemplate | None:
    """The template of the checkpoint ``tokenizer`` was loaded from (Hugging Face tokenizers only)."""
    directory = getattr(tokenizer, "directory", None)
    return ChatTemplate.from_directory(directory) if directory is not None else None
