"""The NNX model against an independent numpy reference (float32, 1e-5), every MoE backend."""

import numpy as np
import pytest
from flax import nnx

from helpers import full_forward, scaled_model
from reference_model import reference_logits

CONFIGS = ["tiny-moe", "tiny-dense", "tiny-qwen2-moe", "tiny-qwen3-moe"]


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_matches_reference(name):
    model = scaled_model(name)
    tokens = np.random.default_rng(0).integers(3, model.cfg.vocab_size, size=23)
    ref = reference_logits(nnx.to_pure_dict(nnx.state(model)), model.cfg, tokens)
    got = full_forward(model, tokens)
    assert np.abs(ref).max() > 0.5, "reference logits too flat to be a meaningful comparison"
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


# Single-device backends; "expert_parallel" needs a mesh (tests/test_sharding_*.py).
@pytest.mark.parametrize("backend", ["dense", "per_expert", "per_expert_static", "expert_rows", "sorted", "ragged",
                                     "pallas"])
def test_every_moe_backend_matches_reference(backend):
    model = scaled_model("tiny-qwen3-moe", moe_backend=backend)
    tokens = np.random.default_rng(1).integers(3, model.cfg.vocab_size, size=37)
    ref = reference_logits(nnx.to_pure_dict(nnx.state(model)), model.cfg, tokens)
    np.testing.assert_allclose(full_forward(model, tokens), ref, atol=1e-5, rtol=1e-5)


def test_sliding_window_matches_reference():
    model = scaled_model("tiny-dense", sliding_window=5)
    tokens = np.random.default_rng(2).integers(3, model.cfg.vocab_size, size=19)
    ref = reference_logits(nnx.to_pure_dict(nnx.state(model)), model.cfg, tokens)
    np.testing.assert_allclose(full_forward(model, tokens), ref, atol=1e-5, rtol=1e-5)
    # and the window really changes the result
    full = scaled_model("tiny-dense")
    assert np.abs(full_forward(full, tokens)[-1] - ref[-1]).max() > 1e-3


def test_tied_embeddings_have_no_lm_head():
    model = scaled_model("tiny-dense", tie_embeddings=True)
    assert not hasattr(model, "lm_head")
    tokens = np.arange(3, 15)
    ref = reference_logits(nnx.to_pure_dict(nnx.state(model)), model.cfg, tokens)
    np.testing.assert_allclose(full_forward(model, tokens), ref, atol=1e-5, rtol=1e-5)
