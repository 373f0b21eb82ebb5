"""Per-request output tracking: stop conditions, detokenisation and streamed text.

Tokens arrive one or several at a time (several under speculation); ``append``
walks them in order so that EOS, a stop token, a stop string or max_tokens
falling in the middle of an accepted run ends the output exactly there.
"""

from __future__ import annotations

import dataclasses

from jaxspec.engine.request import FinishReason
from jaxspec.sampling import SamplingParams
from jaxspec.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclasses.dataclass
class AppendResult:
    token_ids: list[int]  # tokens that became part of the output
    text_delta: str  # text that may be sent now
    finish_reason: FinishReason | None = None
    stop_match: str | int | None = None


class OutputTracker:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, eos_ids: tuple[int, ...]):
        self.params = params
        self.eos_ids = () if params.ignore_eos else tuple(eos_ids)
        self.stop_ids = set(params.stop_token_ids)
        self.detok = IncrementalDetokenizer(tokenizer)
        self.token_ids: list[int] = []
        self.text = ""  # detokenised output, cut at a stop string
        self.sent = 0  # characters of self.text already handed out
        # A stop string may straddle steps: hold back text that could be its start.
        self._holdback = max((len(s) for s in params.stop_strings), default=1) - 1
        self.finished: FinishReason | None = None

    def append(self, new_ids: list[int]) -> AppendResult:
        if self.finished is not None:
            raise RuntimeError("append after finish")
        accepted: list[int] = []
        reason, match = None, None
        for tok in new_ids:
            tok = int(tok)
            if tok in self.eos_ids:
                reason, match = FinishReason.EOS, tok
                break
            if tok in self.stop_ids:
                reason, match = FinishReason.STOP, tok
                break
            accepted.append(tok)
            self.token_ids.append(tok)
            if self.params.stop_strings:
                search_from = max(0, len(self.text) - self._holdback)
                self.text += self.detok.add([tok])
                hit = _find_first(self.text, self.params.stop_strings, search_from)
                if hit is not None:
                    pos, s = hit
                    self.text = self.text[:pos]
                    reason, match = FinishReason.STOP, s
                    break
            else:
                self.text += self.detok.add([tok])
            if len(self.token_ids) >= self.params.max_tokens:
                reason = FinishReason.LENGTH
                break
        if reason is not None:
            self.finished = reason
            if reason != FinishReason.STOP or not isinstance(match, str):
                self.text += self.detok.flush()
        return AppendResult(accepted, self._take_text(final=reason is not None), reason, match)

    def finish(self, reason: FinishReason) -> str:
        """End from outside (abort, deadline, error): release any held-back text."""
        self.finished = reason
        self.text += self.detok.flush()
        return self._take_text(final=True)

    def _take_text(self, final: bool) -> str:
        limit = len(self.text) if final else max(self.sent, len(self.text) - self._holdback)
        delta = self.text[self.sent : limit]
        self.sent = limit
        return delta


def _find_first(text: str, stops: tuple[str, ...], start: int) -> tuple[int, str] | None:
    best = None
    for s in stops:
        pos = text.find(s, start)
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, s)
    return best
