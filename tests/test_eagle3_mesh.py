"""EAGLE-3 heads with the target on a mesh (8 virtual CPU devices, float32): the target's captured
features equal one device's, and greedy speculative output equals plain greedy decoding, with the
head replicated (1x8 tensor mesh, slots whole on every device) or placed by the target's rules
(2x4 data x tensor mesh, cache slots split over data), fused into the verification step or not,
with a paged cache (the head's paged like the target's) and chunked prompts; and, once warmed up,
no step compiles."""

from __future__ import annotations

import collections
import os

# Several virtual CPU devices, set before jax is first imported (conftest.py does the same for the
# whole suite; a process that imported jax already keeps its devices).
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from helpers import CompileCounter, scaled_model  # noqa: E402
from jaxspec import mesh as mesh_mod  # noqa: E402
from jaxspec.engine import Engine, ModelRunner, PlainRunner, SlotTable  # noqa: E402
from jaxspec.engine.factory import make_runner  # noqa: E402
from jaxspec.mesh import TP_RULES, Placement  # noqa: E402
from jaxspec.models.eagle3 import Eagle3Config, create_head  # noqa: E402
from jaxspec.sampling import SamplingParams  # noqa: E402
from jaxspec.speculative import SpeculativeRunner, make_proposer  # noqa: E402
from jaxspec.tokenizer import ByteTokenizer  # noqa: E402

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (virtual) devices")

# 8 heads / 8 kv heads / vocab 264 divide every axis size used here, so the target's rules really
# split them (as in test_sharding_engine).
MOE = dict(num_heads=8, num_kv_heads=8, head_dim=16, vocab_size=264)
SLOTS, MAX_LEN = 4, 64
LAYERS = (0, 1, 2)  # the embeddings, and the inputs of layers 1 and 2 (= the last layer's output)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = ["def f(x):", "import os", "class A:\n    pass\n", "hello world", "for i in", "x = ["]
TOK = ByteTokenizer()


def placement_for(shape) -> Placement:
    devs = np.asarray(jax.devices()[: int(np.prod(shape))], dtype=object).reshape(shape)
    return Placement.create(Mesh(devs, ("data", "expert", "tensor")), TP_RULES)


MESHES = {"1x8": (1, 1, 8), "2x4": (2, 1, 4)}  # (data, expert, tensor); 2x4 splits cache slots over data


@pytest.fixture(scope="module")
def target():
    return scaled_model("tiny-qwen3-moe", scale=3.0, **MOE)


@pytest.fixture(scope="module")
def plain_greedy(target):
    eng = Engine(PlainRunner(ModelRunner(target, SLOTS, MAX_LEN)), TOK)
    return [o.token_ids for o in eng.generate(PROMPTS, GREEDY)]


def make_head(target, outputs: list[list[int]], seed: int = 5):
    """A random head sharing the target's embeddings, weights scaled up from their 0.02-std init
    (drafts then depend on the features), whose draft vocabulary is the four tokens the target
    emits most: random drafts are then accepted often enough for accepted runs, rejections and
    bonus tokens to all occur."""
    cfg = target.cfg
    ids = np.array(sorted(t for t, _ in collections.Counter(t for o in outputs for t in o).most_common(4)))
    head_cfg = Eagle3Config(name="mesh-head", hidden_size=cfg.d_model, target_hidden_size=cfg.d_model,
                            vocab_size=cfg.vocab_size, draft_vocab_size=len(ids), num_heads=8, num_kv_heads=8,
                            head_dim=16, mlp_dim=128, aux_layers=LAYERS, max_seq_len=256)
    head = create_head(head_cfg, seed, d2t=ids - np.arange(len(ids)))
    for p in jax.tree.leaves(nnx.state(head, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)):
        if p[...].ndim > 1:  # matrices; norm scales stay 1
            p.set_value(p[...] * 7.5)
    return head


def spec_runner(target, head, shape, fuse=True, k=2, paged=False):
    """The CLI's and the server's path (``make_runner`` with a placement) for the fused step;
    ``paged``: a paged cache (the head's paged with the target's table) and prompts in chunks."""
    placement = placement_for(shape)
    if fuse:
        pages = dict(page_size=8, num_pages=SLOTS * MAX_LEN // 8, prefill_chunk=16) if paged else {}
        runner = make_runner(target, num_slots=SLOTS, max_len=MAX_LEN, placement=placement, spec_method="eagle3",
                             draft=head, num_speculative_tokens=k, k_max=k, **pages)
    else:
        runner = SpeculativeRunner(ModelRunner(target, SLOTS, MAX_LEN, placement=placement),
                                   make_proposer("eagle3", head, target=target), num_speculative_tokens=k, k_max=k,
                                   fuse=False)
    assert runner.fused_head == fuse
    return runner


def test_captured_features_equal_single_device(target):
    """Prefill (from position 0 and after a prefix) and decode steps of a runner on a 2x4 mesh,
    slots split over data, return the features one device computes."""
    prompts = [list(b"def f(x):\n  return"), list(b"import os")]
    single = ModelRunner(target, SLOTS, MAX_LEN)
    placed = ModelRunner(target, SLOTS, MAX_LEN, placement=placement_for(MESHES["2x4"]))
    assert not placed.compact_rows
    got = []
    for runner in (single, placed):
        runner.capture_hidden(LAYERS)
        feats = []
        slots = SlotTable(SLOTS)  # greedy settings
        first = runner.prefill_many([1, 2], prompts, slots.sampling(np.array([1, 2])))
        cap = np.asarray(runner.captured)  # positions past a prompt's end are padding: not compared
        feats += [cap[0, : len(prompts[0])], cap[1, : len(prompts[1])]]
        rows = np.array([1, 2])
        _, where = runner.row_layout(rows)
        runner.decode_rows(rows, np.array(first, np.int32), slots.sampling(rows), np.zeros(2, np.int32))
        feats.append(np.asarray(runner.captured)[where])
        # The rest of a prompt after a prefix already in the cache (prefill at an offset).
        runner.prefill_many([3], [prompts[0][:4]], slots.sampling(np.array([3])))
        runner.prefill_many([3], [prompts[0]], slots.sampling(np.array([3])), starts=[4])
        feats.append(np.asarray(runner.captured)[0, : len(prompts[0]) - 4])
        got.append(feats)
    for want, have in zip(*got):
        assert have.shape == want.shape and want.shape[-1] == len(LAYERS) * target.cfg.d_model
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)
    assert placed.captured.sharding.is_fully_replicated


@pytest.mark.parametrize("mesh,fuse,sharded_head,paged", [
    pytest.param("1x8", True, False, False, id="1x8-fused-replicated-head"),
    pytest.param("2x4", True, True, False, id="2x4-split-slots-fused-sharded-head"),
    pytest.param("2x4", False, False, False, id="2x4-split-slots-unfused"),
    pytest.param("2x4", True, True, True, id="2x4-paged-chunked-fused-sharded-head"),
])
def test_greedy_output_equals_plain_decoding(target, plain_greedy, monkeypatch, mesh, fuse, sharded_head, paged):
    if sharded_head:  # no head is small enough to replicate: it takes the target's rules
        monkeypatch.setattr(mesh_mod, "DRAFT_REPLICATE_MAX_BYTES", 0)
    head = make_head(target, plain_greedy)
    runner = spec_runner(target, head, MESHES[mesh], fuse=fuse, paged=paged)
    engine = Engine(runner, TOK)
    assert [o.token_ids for o in engine.generate(PROMPTS, GREEDY)] == plain_greedy
    stats = engine.spec_stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens, (stats.num_accepted_tokens, stats.num_draft_tokens)

    prop, tgt = runner.proposer, runner.target
    wq = prop.state["attn"]["wq"][...].sharding
    assert len(wq.device_set) == 8
    assert wq.is_fully_replicated != sharded_head  # heads split over tensor by the target's rules
    # Both caches kept their compiled layouts through prefills, rounds, verifications and absorbs.
    h_cache = prop.step_shardings()[2]
    assert prop.cache.k.sharding.is_equivalent_to(h_cache.k, 5)
    # Slots, or pages in groups that follow the slots, split over data.
    assert prop.cache.k.sharding.spec[1] == tgt.cache.k.sharding.spec[1] == "data"
    assert prop.cache.paged == tgt.cache.paged == paged
    assert prop.last.sharding.is_fully_replicated
    assert tgt.cache.k.sharding.is_equivalent_to(tgt.cache_sharding.k, 5)
    assert prop.embed.sharding.is_equivalent_to(tgt.state["embed"][...].sharding, 2)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["1x8", "2x4"])
def test_nothing_compiles_after_warmup(target, plain_greedy, mesh):
    """Fused steps on a mesh: every round, verification and absorb compiled at warm-up."""
    head = make_head(target, plain_greedy, seed=6)
    runner = spec_runner(target, head, MESHES[mesh])
    engine = Engine(runner, TOK)
    runner.warmup()
    counter = CompileCounter()
    assert [o.token_ids for o in engine.generate(PROMPTS, GREEDY)] == plain_greedy
    assert counter.count == 0, f"{counter.count} compilation(s) after warm-up"
