"""Parameters and cache sharded over a 2x4 virtual-CPU mesh give the single-device logits."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from helpers import scaled_model
from jaxspec.models import KVCache
from jaxspec.sharding import TENSOR_PARALLEL_RULES, cache_shardings, shard_cache, shard_model


def test_tensor_parallel_forward_equals_single_device():
    assert len(jax.devices()) >= 8, "conftest sets 8 virtual CPU devices"
    # 4 kv heads: the 4-way model axis divides them, so the cache really is split over it.
    model = scaled_model("tiny-qwen3-moe", num_kv_heads=4)
    cfg = model.cfg
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, size=(2, 12)), jnp.int32)
    start = jnp.zeros((2,), jnp.int32)

    def run(model, cache):
        graphdef, state = nnx.split(model)

        @jax.jit
        def fwd(state, cache):
            out = nnx.merge(graphdef, state)(tokens, start, cache)
            step = nnx.merge(graphdef, state)(tokens[:, :1], out.cache.lengths, out.cache)
            return out.logits, step.logits, step.cache

        return fwd(state, cache)

    single = run(model, KVCache.create(cfg, 2, 32))

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    sharded_model = shard_model(scaled_model("tiny-qwen3-moe", num_kv_heads=4), mesh, TENSOR_PARALLEL_RULES)
    cache = shard_cache(KVCache.create(cfg, 2, 32), mesh, TENSOR_PARALLEL_RULES)
    wq = sharded_model.layers[0].attn.wq[...]
    assert wq.sharding.spec[1] == "model", "heads must be split over the model axis"
    assert cache.k.sharding.spec[1] == "data" and cache.k.sharding.spec[3] == "model"
    multi = run(sharded_model, cache)
    np.testing.assert_allclose(np.asarray(multi[0]), np.asarray(single[0]), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(multi[1]), np.asarray(single[1]), atol=1e-5, rtol=1e-5)
    assert multi[2].k.sharding.is_equivalent_to(cache_shardings(cache, mesh, TENSOR_PARALLEL_RULES).k, 5)
