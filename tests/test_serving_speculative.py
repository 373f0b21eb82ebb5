"""Speculative serving (n-gram proposer, k <= 2): requests choose speculation, stats reach clients and metrics."""

from __future__ import annotations

import urllib.request

import grpc
import pytest

from serving.build import EngineOptions, load_engine
from serving.client import JaxSpecClient
from serving.server import ServerOptions
from serving.servicer import INVALID_FIELD_KEY
from serving.testing import BackgroundServer, persistent_compilation_cache

pytestmark = pytest.mark.slow  # compiles the verification step for every proposal length

K = 2
OPTS = EngineOptions(model="tiny-moe", spec_method="ngram", num_speculative_tokens=K, adaptive_k=False, slots=16,
                     max_len=64)
PROMPT = "abcabcabcabc abcabc"  # repeated n-grams give the proposer something to find
COMMON = dict(max_tokens=30, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def client():
    with persistent_compilation_cache():
        server = BackgroundServer(lambda: load_engine(OPTS), ServerOptions(port=0, metrics_port=0)).start()
        c = JaxSpecClient(server.target, timeout=60)
        try:
            c.metrics_port = server.server.metrics_port
            yield c
        finally:
            c.close()
            server.close()


def test_model_info_reports_speculation(client):
    info = client.model_info()
    assert info.spec_method == "ngram" and info.max_speculative_tokens == K


def test_requests_choose_speculation_without_changing_greedy_output(client):
    spec = client.generate(PROMPT, **COMMON)
    plain = client.generate(PROMPT, speculation=False, **COMMON)
    assert list(spec.token_ids) == list(plain.token_ids) and spec.text == plain.text
    assert not plain.HasField("speculation")
    s = spec.speculation
    assert s.num_drafts > 0 and s.num_drafts <= s.num_draft_tokens <= K * s.num_drafts
    assert s.num_accepted_tokens <= s.num_draft_tokens
    assert s.acceptance_rate == pytest.approx(s.num_accepted_tokens / s.num_draft_tokens)
    assert s.mean_acceptance_length == pytest.approx(1 + s.num_accepted_tokens / s.num_drafts)
    assert sum(s.accepted_per_position) == s.num_accepted_tokens
    assert sum(s.drafted_per_position) == s.num_draft_tokens and len(s.drafted_per_position) <= K

    # A per-request draft length of 1; streaming carries the same tokens.
    one = list(client.generate_stream(PROMPT, num_speculative_tokens=1, **COMMON))
    assert [t for m in one for t in m.token_ids] == list(plain.token_ids)
    last = one[-1].speculation
    assert last.num_drafts > 0 and last.num_draft_tokens == last.num_drafts


def test_speculative_tokens_above_server_max_is_invalid(client):
    with pytest.raises(grpc.RpcError) as err:
        client.generate(PROMPT, num_speculative_tokens=K + 1, **COMMON)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (INVALID_FIELD_KEY, "speculation.num_speculative_tokens") in tuple(err.value.trailing_metadata())


def test_acceptance_in_server_info_and_metrics(client):
    client.generate(PROMPT, **COMMON)
    info = client.server_info().speculation
    assert info.num_drafts > 0 and 0 < info.acceptance_rate <= 1
    text = urllib.request.urlopen(f"http://127.0.0.1:{client.metrics_port}/metrics", timeout=10).read().decode()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith("jaxspec_spec_decode")}
    assert values["jaxspec_spec_decode_num_drafts_total"] > 0
    assert values["jaxspec_spec_decode_num_draft_tokens_total"] >= values["jaxspec_spec_decode_num_accepted_tokens_total"]
    assert values['jaxspec_spec_decode_num_draft_tokens_per_pos_total{position="0"}'] > 0
