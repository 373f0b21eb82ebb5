"""The server over a paged KV cache: prefix hits reported in usage and metrics, per-request opt-out,
output equal to the slot cache's, requests waiting for pages rather than failing."""

from __future__ import annotations

import concurrent.futures as cf
import urllib.request

import numpy as np
import pytest

from serving.build import EngineOptions, load_engine
from serving.client import JaxSpecClient
from serving.server import ServerOptions
from serving.testing import BackgroundServer, persistent_compilation_cache

pytestmark = pytest.mark.slow  # two servers' warm-ups

OPTS = dict(model="tiny-moe", slots=6, max_len=128, default_max_tokens=8, max_step_tokens=32)


def _server(**kw) -> BackgroundServer:
    opts = EngineOptions(**{**OPTS, **kw})
    return BackgroundServer(lambda: load_engine(opts), ServerOptions(port=0, metrics_port=0, grace_period=5.0)).start()


@pytest.fixture(scope="module")
def servers():
    with persistent_compilation_cache():
        # 24 pages of 8: a request of ~60 prompt + 8 output tokens needs 9, so at most 2 run at once.
        paged = _server(kv_cache="paged", page_size=8, kv_pages=24)
        slot = _server(kv_cache="slot")
        try:
            yield paged, slot
        finally:
            paged.close()
            slot.close()


def _scrape(server) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read().decode()


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def test_prefix_hits_are_reported_and_outputs_equal_the_slot_cache(servers):
    paged, slot = servers
    rng = np.random.default_rng(0)
    shared = [int(t) for t in rng.integers(3, 250, size=50)]
    prompts = [shared + [int(t) for t in rng.integers(3, 250, size=int(n))] for n in (3, 9, 5, 12)]
    with JaxSpecClient(paged.target, timeout=120) as pc, JaxSpecClient(slot.target, timeout=120) as sc:
        got = [pc.generate(p, max_tokens=8, ignore_eos=True) for p in prompts]
        ref = [sc.generate(p, max_tokens=8, ignore_eos=True) for p in prompts]
        skipped = pc.generate(prompts[1], max_tokens=8, ignore_eos=True, skip_prefix_cache=True)
    assert [list(r.token_ids) for r in got] == [list(r.token_ids) for r in ref]
    cached = [r.usage.cached_prompt_tokens for r in got]
    assert cached == [0, 48, 48, 48]  # 50 shared tokens: 6 whole pages of 8
    assert skipped.usage.cached_prompt_tokens == 0 and list(skipped.token_ids) == list(ref[1].token_ids)
    assert all(r.usage.cached_prompt_tokens == 0 for r in ref)
    text = _scrape(paged)
    assert _metric(text, "jaxspec_prefix_cache_hit_tokens_total") >= 144
    assert 'jaxspec_prefix_cache_requests_total{hit="true"}' in text


def test_requests_beyond_the_pages_wait_and_all_finish(servers):
    paged, slot = servers
    rng = np.random.default_rng(1)
    prompts = [[int(t) for t in rng.integers(3, 250, size=60)] for _ in range(8)]
    before = _metric(_scrape(paged), "jaxspec_num_preemptions_total")
    with JaxSpecClient(paged.target, timeout=300) as c, cf.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda p: c.generate(p, max_tokens=8, ignore_eos=True), prompts))
    assert all(len(o.token_ids) == 8 for o in outs)
    # Admitted optimistically (prompt and first step), some were preempted and recomputed: exactly.
    with JaxSpecClient(slot.target, timeout=300) as c:
        ref = [c.generate(p, max_tokens=8, ignore_eos=True) for p in prompts]
    assert [list(o.token_ids) for o in outs] == [list(r.token_ids) for r in ref]
    # Each response counts its own preemptions; together they are what the metric gained.
    after = _metric(_scrape(paged), "jaxspec_num_preemptions_total")
    assert sum(o.usage.preemptions for o in outs) == after - before
    assert all(r.usage.preemptions == 0 for r in ref)
