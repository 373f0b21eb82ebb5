"""Speculative decoding: proposers, the acceptance rule, adaptive k, and the engine runner.

Speculation changes speed, never output: greedy output equals plain greedy
decoding of the target token for token, sampled output follows the target's
distribution exactly (see ``verify`` for the rule and its random numbers).
"""

from jaxspec.speculative.adaptive import AcceptanceEstimator, CostModel, KPolicy, Roofline, expected_tokens
from jaxspec.speculative.draft_model import DraftModelProposer
from jaxspec.speculative.ngram import NgramProposer
from jaxspec.speculative.pairs import SPEC_METHODS, make_proposer, perturbed_copy
from jaxspec.speculative.proposer import NoProposer, Proposal, Proposer, SpecContext, TokenHistory
from jaxspec.speculative.runner import AUTO, SpeculativeRunner
from jaxspec.speculative.verify import rejection_sample

__all__ = [
    "AUTO", "AcceptanceEstimator", "CostModel", "DraftModelProposer", "KPolicy", "NgramProposer", "NoProposer",
    "Proposal", "Proposer", "Roofline", "SPEC_METHODS", "SpecContext", "SpeculativeRunner", "TokenHistory",
    "expected_tokens", "make_proposer", "perturbed_copy", "rejection_sample",
]
