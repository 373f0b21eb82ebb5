"""Models on 8 virtual CPU devices (1x8, 2x4, 8x1 and 2x2x2 meshes; TP-only, EP-only and EP+TP rules)
compute what one device computes: logits to 1e-5 (float32), identical greedy engine output, identical
speculative greedy output; and the compiled decode / verify steps move no weight or cache."""

from __future__ import annotations

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from helpers import scaled_model
from jaxspec.engine import Engine, ModelRunner, PlainRunner, SlotTable
from jaxspec.mesh import EP_RULES, EP_TP_RULES, TP_RULES, Placement, draft_placement
from jaxspec.models import KVCache
from jaxspec.sampling import SamplingParams
from jaxspec.tokenizer import ByteTokenizer

# 8 heads / 8 kv heads / vocab 264 / 8 experts divide every axis size used here, so each rule
# really splits its dimension (an indivisible one would silently stay replicated).
MOE = dict(num_heads=8, num_kv_heads=8, head_dim=16, vocab_size=264)
SLOTS, MAX_LEN = 8, 64

LAYOUTS = [  # (data, expert, tensor), rules
    pytest.param((1, 1, 8), TP_RULES, id="1x8-tp"),
    pytest.param((1, 8, 1), EP_RULES, id="1x8-ep"),
    pytest.param((2, 1, 4), TP_RULES, id="2x4-tp"),
    pytest.param((2, 4, 1), EP_RULES, id="2x4-ep"),
    pytest.param((1, 2, 4), EP_TP_RULES, id="2x4-eptp"),
    pytest.param((2, 2, 2), EP_TP_RULES, id="2x2x2-eptp"),
    pytest.param((8, 1, 1), EP_TP_RULES, id="8x1-data"),
]
# Expert parallelism with routed tokens (moe_exchange="ragged_all_to_all"; all-gather form on CPU).
ROUTED = [
    pytest.param((1, 8, 1), EP_RULES, "ragged_all_to_all", id="1x8-ep-routed"),
    pytest.param((2, 2, 2), EP_TP_RULES, "ragged_all_to_all", id="2x2x2-eptp-routed"),
]


def placement_for(shape, rules, moe_exchange: str = "psum") -> Placement:
    devs = np.asarray(jax.devices()[: int(np.prod(shape))], dtype=object).reshape(shape)
    return Placement.create(Mesh(devs, ("data", "expert", "tensor")), rules, moe_exchange)


@pytest.fixture(scope="module")
def target():
    return scaled_model("tiny-qwen3-moe", scale=3.0, **MOE)


def _logits(runner: ModelRunner, tokens: np.ndarray):
    """Prefill-shaped forward of every slot, then one decode-shaped step, through the runner's forward."""
    fwd = runner.forward_fn()

    @jax.jit
    def run(state, cache):
        start = jnp.zeros((tokens.shape[0],), jnp.int32)
        out = fwd(state, tokens, start, cache)
        step = fwd(state, tokens[:, :1], out.cache.lengths, out.cache)
        return out.logits, step.logits

    return run(runner.state, runner.cache)


@pytest.mark.parametrize("shape,rules,exchange", [pytest.param(*p.values, "psum", id=p.id) for p in LAYOUTS] + ROUTED)
def test_logits_equal_single_device(target, shape, rules, exchange, monkeypatch):
    from jaxspec.models import moe_parallel

    exchanges = []  # traced routed exchanges: the routed path really runs (no silent psum fallback)
    emulated = moe_parallel.ragged_all_to_all_via_all_gather
    monkeypatch.setattr(moe_parallel, "ragged_all_to_all_via_all_gather",
                        lambda *a, **kw: exchanges.append(1) or emulated(*a, **kw))
    tokens = np.random.default_rng(1).integers(3, 259, size=(SLOTS, 12)).astype(np.int32)
    want = _logits(ModelRunner(target, SLOTS, MAX_LEN, moe_backend="dense"), tokens)
    placement = placement_for(shape, rules, exchange)
    runner = ModelRunner(scaled_model("tiny-qwen3-moe", scale=3.0, **MOE), SLOTS, MAX_LEN, placement=placement)
    if placement.axis_size("expert") > 1:  # the experts really are split
        w_gate = runner.state["layers"][0]["moe"]["w_gate"][...]
        assert w_gate.addressable_shards[0].data.shape[0] == 8 // placement.axis_size("expert")
    got = _logits(runner, tokens)
    # 3 exchanges per MoE layer, in the prefill-shaped and the decode-shaped forward.
    assert len(exchanges) == (3 * 2 * runner.cfg.num_layers if exchange != "psum" else 0)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)


PROMPTS = ["def f(x):", "import os", "class A:\n    pass\n", "z", "hello world", "for i in", "x = [", "#"]


def _greedy(runner) -> list[list[int]]:
    eng = Engine(runner, ByteTokenizer())
    return [r.token_ids for r in eng.generate(PROMPTS, SamplingParams(max_tokens=10, ignore_eos=True))]


@pytest.fixture(scope="module")
def single_device_greedy(target):
    return _greedy(PlainRunner(ModelRunner(target, SLOTS, MAX_LEN, moe_backend="dense")))


@pytest.mark.parametrize("shape,rules,exchange",
                         [pytest.param(*LAYOUTS[i].values, "psum", id=LAYOUTS[i].id) for i in (1, 4, 5, 6)] + ROUTED)
def test_engine_greedy_identical_on_mesh(target, single_device_greedy, shape, rules, exchange):
    placement = placement_for(shape, rules, exchange)
    runner = ModelRunner(target, SLOTS, MAX_LEN, placement=placement)
    assert _greedy(PlainRunner(runner)) == single_device_greedy
    # The cache kept its placement through prefills, decodes and slot releases.
    assert runner.cache.k.sharding.is_equivalent_to(runner.cache_sharding.k, 5)
    assert runner.cache.lengths.sharding.is_equivalent_to(runner.cache_sharding.lengths, 1)


def test_speculative_greedy_identical_on_mesh(target, single_device_greedy):
    from jaxspec.speculative import DraftModelProposer, SpeculativeRunner

    placement = placement_for((2, 2, 2), EP_TP_RULES)
    draft = scaled_model("tiny-dense", seed=7, scale=3.0, vocab_size=264)
    assert draft_placement(draft.cfg, placement).rules["heads"] is None, "a tiny draft is replicated"
    # The runner places the draft itself (weights replicated, cache slots over data).
    runner = SpeculativeRunner(ModelRunner(target, SLOTS, MAX_LEN, placement=placement), DraftModelProposer(draft),
                               num_speculative_tokens=3, k_max=3)
    assert _greedy(runner) == single_device_greedy
    proposer, tgt = runner.proposer, runner.target
    for leaf in jax.tree.leaves(proposer.state):
        assert len(leaf.sharding.device_set) == 8 and leaf.sharding.is_fully_replicated
    # Both caches kept their compiled layouts through prefills, draft loops, verifications, rollbacks.
    assert proposer.cache.k.sharding.is_equivalent_to(proposer._cache_sharding.k, 5)
    assert proposer.cache.k.sharding.spec[1] == "data"
    assert proposer.cache.lengths.sharding.is_equivalent_to(proposer._cache_sharding.lengths, 1)
    assert tgt.cache.k.sharding.is_equivalent_to(tgt.cache_sharding.k, 5)
    # The verification step the runner compiled moves no weight or cache and returns the cache as it took it.
    s = SLOTS
    ids = np.arange(s, dtype=np.int32)
    compiled = runner._verify_fn(3, False, tgt.kv_buckets[-1]).lower(
        tgt.state, tgt.cache, ids, np.zeros(s, np.int32), np.zeros(s, np.int32), np.zeros((s, 3), np.int32),
        jnp.zeros((s, 3, 264), jnp.float32), np.zeros(s, np.int32), SlotTable(s).sampling(), np.zeros(s, np.int32),
        np.zeros(s, bool)).compile()
    _assert_moves_no_state(compiled, tgt)
    assert compiled.output_shardings[0].k.is_equivalent_to(tgt.cache_sharding.k, 5)


# ------------------------------------------------------------------------------- HLO
_COLLECTIVE = re.compile(r"=\s*(\w+)\[([\d,]*)\][^=]*?\s(all-gather|all-to-all|collective-permute)(?:-start)?\(")


def _collectives(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for dtype, dims, op in _COLLECTIVE.findall(hlo):
        out.append((op, tuple(int(d) for d in dims.split(",") if d)))
    return out


_MIN_SIZE_CHECKED = 4096


def _forbidden_shapes(arrays) -> tuple[set[tuple[int, ...]], set[int]]:
    """Shapes (and sizes) a gather of a sharded array would produce: any mix of its local and
    global dimensions other than the local shard itself."""
    shapes, sizes = set(), set()
    for a in arrays:
        local = a.addressable_shards[0].data.shape
        if local == a.shape:
            continue  # replicated: nothing to gather
        # Sizes catch a gather that reshapes on the way; small arrays (routers, norms) share their
        # element count with per-step activations of these tiny models, so only large ones count.
        if a.size >= _MIN_SIZE_CHECKED:
            sizes.add(int(np.prod(a.shape)))
        for pick in itertools.product(*[(lo, gl) for lo, gl in zip(local, a.shape)]):
            if pick != tuple(local):
                shapes.add(pick)
    return shapes, sizes


def _assert_moves_no_state(compiled, runner: ModelRunner) -> None:
    hlo = compiled.as_text()
    arrays = [*jax.tree.leaves(runner.state), runner.cache.k, runner.cache.v]
    shapes, sizes = _forbidden_shapes(arrays)
    for op, shape in _collectives(hlo):
        assert shape not in shapes and int(np.prod(shape)) not in sizes, (
            f"{op} producing {shape} moves a sharded weight or cache inside the step"
        )


@pytest.mark.parametrize("shape,rules", [LAYOUTS[0], LAYOUTS[3], LAYOUTS[5]])
def test_decode_and_verify_move_no_weights_or_cache(target, shape, rules):
    placement = placement_for(shape, rules)
    runner = ModelRunner(target, SLOTS, MAX_LEN, placement=placement)
    slots = SlotTable(SLOTS)
    decode = runner._steps[1].for_span(runner.kv_buckets[-1])
    ids = np.arange(SLOTS, dtype=np.int32)
    args = (runner.state, runner.cache, ids, slots.last_token, ids * 0, np.ones(SLOTS, np.int32), slots.sampling(),
            slots.num_generated)
    compiled = decode.lower(*args).compile()
    _assert_moves_no_state(compiled, runner)
    # The cache comes out exactly as it went in: the next step takes it without a transfer.
    out_cache = compiled.output_shardings[0]
    assert out_cache.k.is_equivalent_to(runner.cache_sharding.k, 5)
    assert out_cache.lengths.is_equivalent_to(runner.cache_sharding.lengths, 1)
    assert "all-reduce" in compiled.as_text()  # sanity: the mesh really is used

    # Speculative verification of 3 drafts, built from forward_fn as SpeculativeRunner does.
    fwd = runner.forward_fn()

    def verify(state, cache, tokens, start):
        out = fwd(state, tokens, start, cache, None, jnp.full((SLOTS,), 4, jnp.int32))
        return out.cache, jnp.argmax(out.logits, -1)

    tokens = np.zeros((SLOTS, 4), np.int32)
    compiled = jax.jit(verify, donate_argnums=(1,)).lower(runner.state, runner.cache, tokens,
                                                          np.zeros(SLOTS, np.int32)).compile()
    _assert_moves_no_state(compiled, runner)
    assert compiled.output_shardings[0].k.is_equivalent_to(runner.cache_sharding.k, 5)


def test_hlo_check_catches_a_weight_all_gather(target):
    """The inspection itself can fail: a step that gathers a tensor-parallel weight is caught."""
    placement = placement_for((1, 1, 8), TP_RULES)
    runner = ModelRunner(target, SLOTS, MAX_LEN, placement=placement)
    wq_sharding = runner.state["layers"][0]["attn"]["wq"][...].sharding

    def gathers(state):
        wq = state["layers"][0]["attn"]["wq"][...]
        return jax.lax.with_sharding_constraint(wq * 2, placement.replicated())

    compiled = jax.jit(gathers).lower(runner.state).compile()
    assert wq_sharding.spec[1] == "tensor"
    with pytest.raises(AssertionError, match="all-gather"):
        _assert_moves_no_state(compiled, runner)


def test_nnx_state_of_placed_runner_is_sharded(target):
    runner = ModelRunner(target, SLOTS, MAX_LEN, placement=placement_for((2, 2, 2), EP_TP_RULES))
    graph, _ = nnx.split(target)
    assert graph == runner.graphdef
    assert runner.state["layers"][0]["attn"]["wq"][...].sharding.spec[1] == "tensor"
    assert runner.cache.k.sharding.spec[1] == "data" and runner.cache.k.sharding.spec[3] == "tensor"
    assert runner.cache.k.addressable_shards[0].data.shape == (2, SLOTS // 2, MAX_LEN, 4, 16)
    assert KVCache  # imported for the shape contract above


@pytest.mark.slow
def test_paged_cache_greedy_identical_on_mesh(target, single_device_greedy):
    """A paged target and draft cache on a 2x2x2 mesh: kv heads split over tensor, pages split over data
    in two groups that follow the slots, output equal to one device's slot cache."""
    from jaxspec.speculative import DraftModelProposer, SpeculativeRunner

    placement = placement_for((2, 2, 2), EP_TP_RULES)
    plain = ModelRunner(target, SLOTS, MAX_LEN, placement=placement, page_size=8, num_pages=40)
    assert _greedy(PlainRunner(plain)) == single_device_greedy
    assert plain.cache.k.sharding.is_equivalent_to(plain.cache_sharding.k, 5)
    assert plain.cache.k.sharding.spec[1] == "data" and plain.paging == (40, 8, 2)
    assert plain.cache.k.addressable_shards[0].data.shape[1] == 20  # each data shard holds its group only
    assert plain.cache.page_table.sharding.spec[0] == "data"
    draft = scaled_model("tiny-dense", seed=7, scale=3.0, vocab_size=264)
    spec = SpeculativeRunner(ModelRunner(target, SLOTS, MAX_LEN, placement=placement, page_size=8, num_pages=40),
                             DraftModelProposer(draft), num_speculative_tokens=3, k_max=3)
    assert _greedy(spec) == single_device_greedy
    assert spec.proposer.cache.paged and spec.proposer.cache.k.sharding.is_equivalent_to(
        spec.proposer._cache_sharding.k, 5)
