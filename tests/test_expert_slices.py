"""Expert weights held per expert beside the stacked array (``models.expert_slices``): which
parameters a runner's tree splits, and that a model's forward on the split tree is the same."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxspec.config import load_config
from jaxspec.engine.steps import params_tree
from jaxspec.models import KVCache, create_model
from jaxspec.models.expert_slices import ExpertSlices, has_expert_slices, split_experts


def _moe():
    return create_model(load_config("tiny-moe").replace(max_seq_len=32))


def test_only_moe_expert_arrays_are_split_and_the_rest_is_shared():
    model = _moe()
    params = params_tree(nnx.split(model)[1])
    split = split_experts(params)
    held = [x for x in jax.tree.leaves(split, is_leaf=lambda x: isinstance(x, ExpertSlices)) if isinstance(x, ExpertSlices)]
    cfg = model.cfg
    assert len(held) == 3 * sum(cfg.layer_is_moe(i) for i in range(cfg.num_layers)) > 0
    for h in held:
        assert len(h.parts) == cfg.num_experts and h.shape == h.whole.shape and len(h.shape) == 3
        np.testing.assert_array_equal(np.stack([np.asarray(p) for p in h.parts]), np.asarray(h.whole))
        assert h[1] is h.parts[1]  # an expert is its own array, not a slice taken at run time
    # Every other leaf is the very same array (router, attention, a dense MLP's 2-D weights).
    plain = [x for x in jax.tree.leaves(split, is_leaf=lambda x: isinstance(x, ExpertSlices))
             if not isinstance(x, ExpertSlices)]
    assert all(any(x is y for y in jax.tree.leaves(params)) for x in plain)
    assert has_expert_slices(split) and not has_expert_slices(params)


def test_quantized_experts_are_left_stacked():
    from jaxspec.models.quant import quantize_model

    model = quantize_model(_moe(), "int8")
    split = split_experts(params_tree(nnx.split(model)[1]))
    assert not has_expert_slices(split)


@pytest.mark.parametrize("backend", ["per_expert_static", "expert_chunks", "dense"])
def test_a_forward_on_the_split_tree_equals_the_stacked_one(backend):
    model = _moe()
    graphdef, state = nnx.split(model)
    params = params_tree(state)
    cache = KVCache.create(model.cfg, 2, 32)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, model.cfg.vocab_size, (2, 7)), jnp.int32)

    @jax.jit
    def logits(p):
        return nnx.merge(graphdef, p)(tokens, jnp.zeros((2,), jnp.int32), cache, moe_backend=backend).logits

    np.testing.assert_array_equal(logits(split_experts(params)), logits(params))
