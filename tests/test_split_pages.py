"""A paged KV cache on a mesh whose data axis splits the slots: the pool's pages split into groups
that follow the slots (each data shard holds its slots' pages only), a request's pages all from its
slot's group, prefixes cached per group, preemption within the group that ran dry; output equal to
one device's, and a decode step reads no page across shards."""

import re

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from helpers import scaled_model
from jaxspec.engine import Engine, ModelRunner, SlotTable
from jaxspec.engine.factory import make_runner
from jaxspec.engine.pages import PagePool
from jaxspec.engine.request import FinishReason
from jaxspec.mesh import EP_TP_RULES, TP_RULES, Placement
from jaxspec.models import KVCache
from jaxspec.sampling import SamplingParams
from jaxspec.tokenizer import ByteTokenizer

MOE = dict(num_heads=8, num_kv_heads=8, head_dim=16, vocab_size=264)
SLOTS, MAX_LEN = 4, 64
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


def placement_for(shape, rules) -> Placement:
    devs = np.asarray(jax.devices()[: int(np.prod(shape))], dtype=object).reshape(shape)
    return Placement.create(Mesh(devs, ("data", "expert", "tensor")), rules)


@pytest.fixture(scope="module")
def target():
    return scaled_model("tiny-qwen3-moe", scale=3.0, **MOE)


def _prompts(n: int = 6, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    shared = list(rng.integers(3, 200, size=9))  # two full pages of 4 shared by every prompt
    return [shared + list(rng.integers(3, 200, size=int(rng.integers(1, 12)))) for _ in range(n)]


def _engine(model, num_pages, placement=None, **kw) -> Engine:
    return Engine(make_runner(model, num_slots=SLOTS, max_len=MAX_LEN, page_size=4, num_pages=num_pages,
                              placement=placement, **kw), ByteTokenizer(), eos_ids=[])


# ----------------------------------------------------------------------------- the pool
def test_pool_groups_hand_out_their_own_pages_and_cache_prefixes_per_group():
    pool = PagePool(8, 4, groups=2)
    assert (pool.group_pages, pool.available_in(0), pool.available_in(1)) == (4, 4, 4)
    prompt = list(range(10))  # two full blocks before the last token's
    a = pool.reserve(prompt, 10, group=1)
    assert a.group == 1 and all(4 <= p < 8 for p in a.pages) and pool.available_in(1) == 1
    pool.register(prompt, a)
    assert pool.cached_blocks(prompt, 1) == 2 and pool.cached_blocks(prompt, 0) == 0
    c = pool.reserve(prompt, 10, group=1)  # shares group 1's two cached blocks, takes its last page
    assert c.cached_blocks == 2 and c.pages[:2] == a.pages[:2] and pool.available_in(1) == 0
    b = pool.reserve(prompt, 12, group=0)  # group 0 holds no copy of the prefix: 3 fresh pages of its own
    assert b.cached_blocks == 0 and all(p < 4 for p in b.pages)
    assert pool.reserve(prompt, 12, group=0) is None  # 3 more do not fit group 0's last page
    assert not pool.extend(c, 16) and len(c.pages) == 3  # group 1 is full, whatever group 0 holds
    for res in (a, b, c):
        pool.release(res)
    assert pool.available == 8 and not pool.refs.any()
    with pytest.raises(ValueError, match="equal groups"):
        PagePool(9, 4, groups=2)


# ------------------------------------------------------------------------ the engine
def _record_pages(engine: Engine) -> list[tuple[int, list[int]]]:
    """Every (slot, pages) the engine hands the runner, kept in a list."""
    seen, assign = [], engine.runner.assign_pages

    def record(slot, pages):
        seen.append((slot, list(pages)))
        assign(slot, pages)

    engine.runner.assign_pages = record
    return seen


def test_split_pool_preempts_within_a_group_and_outputs_equal_one_device(target):
    prompts = _prompts()
    ref = [c.token_ids for c in _engine(target, 64).generate(prompts, GREEDY)]
    placement = placement_for((2, 1, 4), TP_RULES)
    # Two groups of 12 pages, two slots each; a request grows to 11 pages: some must give way.
    eng = _engine(target, 25, placement)  # rounded down to whole groups
    assert eng.runner.paging() == (24, 4, 2) and eng.pages.groups == 2
    cache = eng.runner.runner.cache
    assert cache.k.sharding.spec[1] == "data" and cache.k.addressable_shards[0].data.shape[1] == 12
    seen = _record_pages(eng)
    done = eng.generate(prompts, GREEDY)
    assert [c.token_ids for c in done] == ref
    assert all(c.finish_reason == FinishReason.LENGTH for c in done)
    assert eng.num_preemptions > 0
    assert {slot // 2 for slot, pages in seen if pages} == {0, 1}  # both groups served requests
    assert all(p // 12 == slot // 2 for slot, pages in seen for p in pages)  # each from its slot's group
    assert eng.pages.available == 24 and not eng.pages.refs.any()


def test_a_prompt_goes_to_the_group_that_caches_its_prefix(target):
    placement = placement_for((2, 1, 4), TP_RULES)
    eng = _engine(target, 32, placement)
    prefix = list(range(40, 56))  # four full pages
    long_one = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    seen = _record_pages(eng)
    # A long request takes group 0 first; the prefixed one then goes to group 1, which has more pages.
    first = eng.generate([list(range(100, 110)), prefix + [7]], [long_one, short])
    assert [slot // 2 for slot, pages in seen if pages][:2] == [0, 1] and first[1].num_cached_tokens == 0
    # Both groups are idle again (cached pages count as available): the prefix decides, not the group id.
    again = eng.generate([prefix + [9]], short)[0]
    assert again.num_cached_tokens == len(prefix)
    assert [slot // 2 for slot, pages in seen if pages][-1] == 1


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_split_pages_decode_reads_no_page_across_shards(target, kv_dtype):
    """Compiled decode over split pages on a 2x2x2 mesh: no collective carries anything as large as the
    keys a data shard reads for one layer (only the new tokens' keys and values, and activations)."""
    placement = placement_for((2, 2, 2), EP_TP_RULES)
    runner = ModelRunner(target, 8, MAX_LEN, placement=placement, page_size=8, num_pages=48, kv_dtype=kv_dtype)
    assert runner.cache.groups == 2 and not runner.compact_rows
    slots = SlotTable(8)
    span = runner.kv_buckets[-1]
    ids = np.arange(8, dtype=np.int32)
    args = (runner.state, runner.cache, ids, slots.last_token, ids * 0, np.ones(8, np.int32), slots.sampling(),
            slots.num_generated)
    hlo = runner._steps[1].for_span(span).lower(*args).compile().as_text()
    found = re.findall(r"= \w+\[([\d,]*)\][^\n]*? (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)",
                       hlo)
    assert found  # sanity: the mesh is used
    # Either what a shard's rows read of one layer (S/D rows x span x kv heads per tensor shard x head_dim)
    # or one layer's pages on a shard (P/D x page_size x ...): neither may travel.
    limit = min(4 * span * (8 // 2) * 16, 24 * 8 * (8 // 2) * 16)
    for dims, op in found:
        size = int(np.prod([int(d) for d in dims.split(",") if d]))
        assert size < limit, f"{op} of [{dims}] moves cached keys or values between shards"


@pytest.mark.slow
def test_split_int8_pages_and_speculation_equal_one_device(target):
    prompts = _prompts(seed=2)
    draft = scaled_model("tiny-dense", seed=7, scale=3.0, vocab_size=264)
    placement = placement_for((2, 2, 2), EP_TP_RULES)
    for kw in (dict(kv_dtype="int8"), dict(spec_method="draft", draft=draft, num_speculative_tokens=2)):
        ref = [c.token_ids for c in _engine(target, 64, **kw).generate(prompts, GREEDY)]
        eng = _engine(target, 32, placement, **kw)
        assert eng.pages.groups == 2
        assert [c.token_ids for c in eng.generate(prompts, GREEDY)] == ref
        assert eng.pages.available == 32


def test_the_in_place_paged_kernel_is_refused_for_split_pages(target):
    with pytest.raises(ValueError, match="need the xla backend"):
        ModelRunner(target, 8, MAX_LEN, placement=placement_for((2, 1, 4), TP_RULES), page_size=8, num_pages=16,
                    attention_backend="pallas")
    with pytest.raises(ValueError, match="divisible by 2, got 15 pages"):
        KVCache.abstract(target.cfg, 8, MAX_LEN, num_pages=15, page_size=8, page_groups=2)
