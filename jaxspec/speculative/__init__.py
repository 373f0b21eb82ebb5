"""Speculative decoding: proposers, the acceptance rule, adaptive k, and the engine runner.

Speculation changes speed, never output: greedy output equals plain greedy
decoding of the target token for token, sampled output follows the target's
distribution exactly.

Modules (one job each):

  proposer     the ``Proposer`` interface, the per-slot token history, "none"
  draft_model  a separate draft model with its own slot cache; one jitted
               ``lax.scan`` drafts kb tokens for every slot (catch-up protocol
               in its docstring)
  ngram        prompt lookup (host numpy, one-hot drafts)
  eagle3       an EAGLE-3 head drafting from the target's hidden states (captured
               in the target's own steps; absorbed after each step)
  verify       the acceptance rule (the kernel contract), its position-keyed
               random numbers, and the backend switch (xla / the kernel
               engineer's reference / the Pallas kernel)
  adaptive     acceptance estimates, measured step costs (plus a roofline
               model with MoE expert-touch pricing), and the choice of kb
  runner       ``SpeculativeRunner``: the engine's StepRunner for
               draft-then-verify; rollback is setting cache lengths
  pairs        building draft models and proposers (CLI, bench, tests)

Compiled shapes: verification always runs every slot with T = kb + 1, the draft
loop kb steps, kb from a fixed bucket set (0, 1, 2, 4, ..., k_max, plus a fixed
k); per-slot k, greedy/sampled and top-k/top-p are data, so nothing recompiles
after ``warmup``. Random numbers are keyed by (seed, output position, purpose),
so a seeded request's tokens do not depend on the batch around it (with a fixed
k; adaptive k reacts to load, which changes a sampled request's draws but not
its distribution).
"""

from jaxspec.speculative.adaptive import AcceptanceEstimator, CostModel, KPolicy, Roofline, expected_tokens
from jaxspec.speculative.draft_model import DraftModelProposer
from jaxspec.speculative.eagle3 import Eagle3Proposer
from jaxspec.speculative.ngram import NgramProposer
from jaxspec.speculative.pairs import SPEC_METHODS, make_proposer, perturbed_copy
from jaxspec.speculative.proposer import NoProposer, Proposal, Proposer, SpecContext, TokenHistory
from jaxspec.speculative.runner import AUTO, SpeculativeRunner
from jaxspec.speculative.verify import rejection_sample

__all__ = [
    "AUTO", "AcceptanceEstimator", "CostModel", "DraftModelProposer", "Eagle3Proposer", "KPolicy", "NgramProposer", "NoProposer",
    "Proposal", "Proposer", "Roofline", "SPEC_METHODS", "SpecContext", "SpeculativeRunner", "TokenHistory",
    "expected_tokens", "make_proposer", "perturbed_copy", "rejection_sample",
]
