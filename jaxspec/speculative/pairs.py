"""Building target/draft pairs and proposers (CLI, benchmarks, tests).

Random weights make acceptance meaningless: a noisy copy of the target accepts
as much as its noise level allows, an unrelated random draft almost nothing.
They exercise every code path; trained pairs are the real benchmark.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspec.models import Transformer
from jaxspec.speculative.draft_model import DraftModelProposer
from jaxspec.speculative.ngram import NgramProposer
from jaxspec.speculative.proposer import NoProposer, Proposer

SPEC_METHODS = ("none", "draft", "ngram", "eagle3")


def perturbed_copy(model: Transformer, noise: float, seed: int = 0) -> Transformer:
    """The model with every weight w replaced by w + noise * std(w) * N(0, 1)
    (noise 0: an identical copy). Norm scales, whose std is 0, stay put.

    The noise is drawn on the host with numpy: op-by-op JAX would compile every
    random op of every parameter shape, which costs far more than drawing it."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    new = []
    for w in leaves:
        w32 = np.asarray(w, np.float32)
        perturbed = w32 + noise * w32.std() * rng.standard_normal(w32.shape, np.float32)
        new.append(jnp.asarray(perturbed, w.dtype))
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, new))


def make_proposer(method: str, draft=None, moe_backend: str | None = None,
                  ngram_max: int = 3, ngram_min: int = 1, target: Transformer | None = None,
                  draft_kv_dtype: str | None = None) -> Proposer:
    """``draft``: a ``Transformer`` ("draft") or an ``Eagle3Head`` ("eagle3", which shares the
    ``target``'s embeddings unless it has its own). ``draft_kv_dtype``: "int8" for the draft model's
    or the EAGLE-3 head's own KV cache."""
    if method == "none":
        return NoProposer()
    if method == "ngram":
        return NgramProposer(max_n=ngram_max, min_n=ngram_min)
    if method == "draft":
        if draft is None:
            raise ValueError("--spec-method draft needs a draft model (--draft NAME_OR_PATH)")
        return DraftModelProposer(draft, moe_backend=moe_backend, kv_dtype=draft_kv_dtype)
    if method == "eagle3":
        from jaxspec.models.eagle3 import Eagle3Head
        from jaxspec.speculative.eagle3 import Eagle3Proposer

        if not isinstance(draft, Eagle3Head):
            raise ValueError("--spec-method eagle3 needs an EAGLE-3 head (--draft PATH to a head folder)")
        embed = None if draft.cfg.own_embeddings or target is None else target.embed[...]
        return Eagle3Proposer(draft, target_embed=embed, kv_dtype=draft_kv_dtype)
    raise ValueError(f"unknown speculative method {method!r}; choose from {', '.join(SPEC_METHODS)}")
