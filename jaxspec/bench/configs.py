"""Benchmark configurations: which speculation setting (and which serve flags) one measured server runs.

A configuration is written ``[LABEL=]METHOD[:OPTIONS] [SERVE FLAGS...]``:

* ``none``                       plain decoding (``--spec-method none``)
* ``draft:k=4`` / ``ngram:k=4`` / ``eagle3:k=4``  a fixed number of draft tokens per step
* ``draft:auto`` / ``ngram:auto[,max=8]``  k chosen per step by the server (``max``: the largest k)
* anything after the first space is passed to ``python -m jaxspec.serve`` for this configuration only,
  e.g. ``"none --model builtin-dense"`` or ``"dense-k4=draft:k=4 --model builtin-dense --slots 16"``.

Configurations that share their serve flags (apart from the speculation ones and ``--draft``) form a
*group*: the
``none`` configuration of a group is the baseline its other members are compared with.

Against a running server (``--server``) a configuration cannot start anything, so it becomes
per-request options: ``none`` sends ``speculation.enabled = false``, ``METHOD:k=K`` sends
``num_speculative_tokens = K``, ``METHOD:auto`` leaves the server's own setting.
"""

from __future__ import annotations

import dataclasses
import re
import shlex

METHODS = ("none", "draft", "ngram", "eagle3")
USAGE = ("expected [LABEL=]METHOD[:OPTIONS] [SERVE FLAGS], METHOD:OPTIONS one of none, draft:k=K, "
         "draft:auto[,max=K], ngram:k=K, ngram:auto[,max=K], eagle3:k=K, eagle3:auto[,max=K] (K >= 1)")
# Flags a configuration's METHOD sets; giving them again among its serve flags would be ambiguous.
SPEC_FLAGS = ("--spec-method", "--num-speculative-tokens", "--max-speculative-tokens")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    name: str  # the label in every table
    method: str  # none | draft | ngram | eagle3
    k: int | str | None = None  # fixed draft length, "auto", or None (no speculation)
    max_k: int | None = None  # --max-speculative-tokens (auto only)
    serve_args: tuple[str, ...] = ()  # extra `python -m jaxspec.serve` flags for this configuration

    @property
    def group(self) -> tuple[str, ...]:
        """Configurations with the same serve flags (apart from ``--draft``, part of the speculation
        choice) are compared with that group's ``none``."""
        out, skip = [], False
        for a in self.serve_args:
            if skip:
                skip = False
            elif a == "--draft":
                skip = True
            elif not a.startswith("--draft="):
                out.append(a)
        return tuple(out)

    @property
    def model(self) -> str | None:
        """The ``--model`` among this configuration's serve flags, if any."""
        args = list(self.serve_args)
        for i, a in enumerate(args):
            if a == "--model" and i + 1 < len(args):
                return args[i + 1]
            if a.startswith("--model="):
                return a.split("=", 1)[1]
        return None

    def serve_flags(self) -> list[str]:
        flags = ["--spec-method", self.method]
        if self.method != "none":
            flags += ["--num-speculative-tokens", str(self.k)]
        if self.max_k is not None:
            flags += ["--max-speculative-tokens", str(self.max_k)]
        return [*self.serve_args, *flags]

    def request_options(self) -> dict:
        """Per-request speculation options that select this configuration on an already running server."""
        if self.method == "none":
            return {"speculation": False}
        if isinstance(self.k, int):
            return {"num_speculative_tokens": self.k}
        return {}

    @property
    def is_fixed_draft(self) -> bool:
        return self.method == "draft" and isinstance(self.k, int)

    @property
    def is_auto_draft(self) -> bool:
        return self.method == "draft" and self.k == "auto"


def parse_config(text: str) -> BenchConfig:
    parts = shlex.split(text)
    if not parts:
        raise ValueError(f"bad config {text!r}: empty; {USAGE}")
    head, serve_args = parts[0], tuple(parts[1:])
    label, eq, spec = head.partition("=")
    if not eq or ":" in label:  # "draft:k=4": the '=' belongs to the options, not a label
        label, spec = "", head
    method, sep, rest = spec.partition(":")
    if method not in METHODS:
        raise ValueError(f"bad config {text!r}: unknown method {method!r}; {USAGE}")
    for flag in serve_args:
        if flag.split("=", 1)[0] in SPEC_FLAGS:
            raise ValueError(f"bad config {text!r}: {flag} is set by the method part; {USAGE}")
    name = label or text.strip()
    if method == "none":
        if sep:
            raise ValueError(f"bad config {text!r}: 'none' takes no options; {USAGE}")
        return BenchConfig(name, "none", serve_args=serve_args)
    m = re.fullmatch(r"k=(\d+)|auto(?:,max=(\d+))?", rest)
    if not m or int(m.group(1) or 1) < 1 or int(m.group(2) or 1) < 1:
        raise ValueError(f"bad config {text!r}: {USAGE}")
    if m.group(1):
        return BenchConfig(name, method, int(m.group(1)), serve_args=serve_args)
    return BenchConfig(name, method, "auto", int(m.group(2)) if m.group(2) else None, serve_args=serve_args)


def baseline_of(config: BenchConfig, configs: list[BenchConfig]) -> BenchConfig | None:
    """The ``none`` configuration of ``config``'s group (None if the run has none)."""
    return next((c for c in configs if c.method == "none" and c.group == config.group), None)
