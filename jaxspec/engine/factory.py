"""The one place that chooses plain or speculative decoding (the CLI and the server both call it)."""

from __future__ import annotations

from jaxspec.engine.engine import PlainRunner, StepRunner
from jaxspec.engine.model_runner import ModelRunner
from jaxspec.mesh import Placement
from jaxspec.models import Transformer
from jaxspec.speculative import AUTO, SPEC_METHODS, SpeculativeRunner, make_proposer


def make_runner(model: Transformer, *, num_slots: int, max_len: int | None = None, placement: Placement | None = None,
                spec_method: str = "none", draft=None,
                num_speculative_tokens: int | str = AUTO, k_max: int = 4) -> StepRunner:
    """A ``PlainRunner`` for ``spec_method="none"``, else a ``SpeculativeRunner`` whose proposer is
    ``draft`` ("draft": a ``Transformer``; "eagle3": an ``Eagle3Head``, which reads this target's hidden
    states) or prompt lookup ("ngram"), with k fixed or "auto" (adaptive, up to k_max).
    Raises ValueError for an unknown method or an incompatible draft."""
    if spec_method not in SPEC_METHODS:
        raise ValueError(f"spec_method must be one of {', '.join(SPEC_METHODS)}, got {spec_method!r}")
    target = ModelRunner(model, num_slots, max_len, placement=placement)
    if spec_method == "none":
        return PlainRunner(target)
    k_max = max(k_max, num_speculative_tokens if isinstance(num_speculative_tokens, int) else 0)
    return SpeculativeRunner(target, make_proposer(spec_method, draft, target=model),
                             num_speculative_tokens=num_speculative_tokens, k_max=k_max)
