"""jaxspec.v1 over a real in-process server (tiny-moe, 16 slots): results, concurrency,
abort / cancel / deadline, invalid input, queue limits, faults, health, reflection, metrics."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import time
import urllib.request

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from jaxspec.engine import Engine, ModelRunner, PlainRunner
from jaxspec.loading import load_any
from jaxspec.sampling import SamplingParams
from serving.build import EngineOptions, load_engine
from serving.client import JaxSpecClient, build_request
from serving.pb import jaxspec_pb2 as pb
from serving.server import ServerOptions
from serving.servicer import INVALID_FIELD_KEY
from serving.testing import BackgroundServer, ControlledRunner, persistent_compilation_cache

SLOTS, MAX_LEN, MAX_WAITING = 16, 64, 64
OPTS = EngineOptions(model="tiny-moe", slots=SLOTS, max_len=MAX_LEN, max_waiting=MAX_WAITING, default_max_tokens=16)
POISON_TEXT = "<<poison>>"  # prefill raises for exactly this prompt


class Env:
    def __init__(self, server: BackgroundServer, runner: ControlledRunner, client: JaxSpecClient):
        self.server, self.runner, self.client = server, runner, client

    def info(self) -> pb.ServerInfo:
        return self.client.server_info()

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "condition") -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            time.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}; server info: {self.info()}")

    def scrape(self) -> str:
        port = self.server.server.metrics_port
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


@pytest.fixture(scope="module")
def env():
    _, tokenizer = load_any("tiny-moe")
    poison = tokenizer.encode(POISON_TEXT)
    runners: list[ControlledRunner] = []

    def wrap(runner):
        runners.append(ControlledRunner(runner, poison_prompt_ids=poison))
        return runners[-1]

    with persistent_compilation_cache():
        server = BackgroundServer(
            lambda: load_engine(OPTS, wrap_runner=wrap),
            ServerOptions(port=0, metrics_port=0, expert_load_interval_s=0.1, grace_period=5.0),
        ).start()
        client = JaxSpecClient(server.target, timeout=60)
        try:
            yield Env(server, runners[0], client)
        finally:
            client.close()
            server.close()


@pytest.fixture(scope="module")
def reference(env):
    """Direct engine output for the same model (same random weights), no server involved."""
    model, tokenizer = load_any("tiny-moe")  # `env` keeps the compilation cache on meanwhile
    return Engine(PlainRunner(ModelRunner(model, SLOTS, MAX_LEN)), tokenizer)


@pytest.fixture
def slow(env):
    """Decode steps take 20 ms while the test runs (long requests stay in flight); cleans up after."""
    env.runner.step_delay_s = 0.02
    try:
        yield env
    finally:
        env.runner.step_delay_s = 0.0
        env.wait_for(lambda: (i := env.info()).num_running == 0 and i.num_waiting == 0, what="idle server")


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = fn(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    return info.value


def stream_all(call) -> list[pb.GenerateResponse]:
    return list(call)


CASES = [  # ignore_eos: a random model may sample EOS early; these compare full-length outputs
    dict(temperature=0.0, ignore_eos=True),
    dict(temperature=0.8, seed=7, top_p=0.9, top_k=50, ignore_eos=True),
    dict(temperature=1.2, seed=123, min_p=0.05, ignore_eos=True),
]


@pytest.mark.parametrize("case", CASES, ids=["greedy", "top_p_top_k", "min_p"])
def test_unary_and_stream_equal_direct_engine(env, reference, case):
    prompt = "The quick brown fox"
    [expected] = reference.generate([prompt], SamplingParams(max_tokens=12, **case))

    unary = env.client.generate(prompt, max_tokens=12, **case)
    assert list(unary.token_ids) == expected.token_ids
    assert unary.text == expected.text
    assert unary.finished and unary.finish_reason == pb.FINISH_REASON_LENGTH
    assert unary.usage.prompt_tokens == expected.num_prompt_tokens
    assert unary.usage.completion_tokens == 12

    messages = stream_all(env.client.generate_stream(prompt, max_tokens=12, **case))
    assert [t for m in messages for t in m.token_ids] == expected.token_ids
    assert "".join(m.text for m in messages) == expected.text
    assert [m.finished for m in messages] == [False] * (len(messages) - 1) + [True]
    assert [m.usage.completion_tokens for m in messages] == sorted(m.usage.completion_tokens for m in messages)
    last = messages[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    # Timing on the last message: arrival <= first token <= last token.
    t = last.timing
    assert t.arrival_time.ToNanoseconds() <= t.first_token_time.ToNanoseconds() <= t.last_token_time.ToNanoseconds()
    assert not last.HasField("speculation")  # a plain server reports no speculation stats


def test_token_id_prompt_stop_strings_and_eos(env, reference):
    ids = [1, 80, 81, 82, 83]
    common = dict(max_tokens=20, temperature=0.7, seed=5, ignore_eos=True)
    [expected] = reference.generate([ids], SamplingParams(**common))
    full = env.client.generate(ids, **common)
    assert list(full.token_ids) == expected.token_ids

    # Stop on a token id that the unconstrained output produces: it ends there, and says what matched.
    stop_id = expected.token_ids[5]
    first = expected.token_ids.index(stop_id)
    resp = env.client.generate(ids, stop_token_ids=[stop_id], **common)
    assert resp.finish_reason == pb.FINISH_REASON_STOP
    assert resp.WhichOneof("matched_stop") == "stop_token_id" and resp.stop_token_id == stop_id
    assert list(resp.token_ids) == expected.token_ids[:first]

    # A stop string cut out of the produced text (whole characters).
    text = expected.text
    if len(text) >= 6:
        stop = text[3:5]
        resp = env.client.generate(ids, stop=[stop], **common)
        assert resp.finish_reason == pb.FINISH_REASON_STOP and resp.stop_string == stop
        assert resp.text == text[: text.index(stop)]


def test_unset_max_tokens_uses_server_default_capped_by_context(env):
    resp = env.client.generate("hi", temperature=0.0, ignore_eos=True)
    assert resp.usage.completion_tokens == OPTS.default_max_tokens
    long_prompt = [1] + [70] * 55  # 56 tokens: 8 left in a 64-token context
    resp = env.client.generate(long_prompt, temperature=0.0, ignore_eos=True)
    assert resp.usage.completion_tokens == MAX_LEN - len(long_prompt)


def test_64_concurrent_requests_at_16_slots(env, reference):
    prompts = [f"request {i}: " + "ab" * (i % 7) for i in range(64)]
    params = [dict(max_tokens=8 + i % 9, temperature=0.9, seed=1000 + i, top_k=40, ignore_eos=i % 3 > 0)
              for i in range(64)]
    expected = reference.generate(prompts, [SamplingParams(**p) for p in params])

    def run(i: int) -> tuple[list[int], str]:
        if i % 2:  # half streamed, half unary
            msgs = list(env.client.generate_stream(prompts[i], request_id=f"c{i}", **params[i]))
            assert msgs[-1].request_id == f"c{i}"
            return [t for m in msgs for t in m.token_ids], "".join(m.text for m in msgs)
        r = env.client.generate(prompts[i], request_id=f"c{i}", **params[i])
        return list(r.token_ids), r.text

    with cf.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(run, range(64)))
    for i, (ids, text) in enumerate(results):
        assert ids == expected[i].token_ids, f"request {i} got another request's tokens"
        assert text == expected[i].text
    info = env.info()
    assert info.num_running == 0 and info.num_waiting == 0


def test_abort_ends_stream_and_frees_slot(slow):
    env = slow
    call = env.client.generate_stream([1, 70], max_tokens=60, request_id="to-abort", ignore_eos=True)
    first = next(call)
    assert first.request_id == "to-abort" and not first.finished
    assert env.client.abort("to-abort", "not-in-flight") == ["to-abort"]
    rest = list(call)
    assert rest[-1].finished and rest[-1].finish_reason == pb.FINISH_REASON_ABORTED
    assert rest[-1].usage.completion_tokens < 60
    env.wait_for(lambda: env.info().num_running == 0, what="slot release after abort")


def test_cancelled_stream_slot_is_reused(slow):
    env = slow
    before = env.scrape()
    calls = [env.client.generate_stream([1, 70 + i], max_tokens=60, ignore_eos=True, request_id=f"long{i}")
             for i in range(SLOTS)]
    for c in calls:
        next(c)  # every slot holds a long request
    env.wait_for(lambda: env.info().num_running == SLOTS, what="all slots busy")
    calls[0].cancel()
    env.wait_for(lambda: env.info().num_running == SLOTS - 1, timeout=5, what="the cancelled request's slot to free")
    # A new request gets the freed slot and finishes while the other long requests still run.
    resp = env.client.generate("next", max_tokens=3, ignore_eos=True)
    assert resp.finish_reason == pb.FINISH_REASON_LENGTH
    info = env.info()
    assert info.num_running == SLOTS - 1, "the long requests should still be running"
    env.client.abort(*[f"long{i}" for i in range(1, SLOTS)])
    for c in calls[1:]:
        assert list(c)[-1].finish_reason == pb.FINISH_REASON_ABORTED
    assert _sample(env.scrape(), 'jaxspec_requests_total{finish_reason="aborted"}') >= \
        _sample(before, 'jaxspec_requests_total{finish_reason="aborted"}') + SLOTS


def test_deadline_ends_request_in_engine(slow):
    env = slow
    before = _sample(env.scrape(), 'jaxspec_requests_total{finish_reason="deadline"}')
    err = rpc_error(env.client.generate_stream, [1, 70], max_tokens=60, ignore_eos=True, timeout=0.3)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    err = rpc_error(env.client.generate, [1, 71], max_tokens=60, ignore_eos=True, timeout=0.3)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    env.wait_for(lambda: env.info().num_running == 0, timeout=5, what="slots freed after deadlines")
    env.wait_for(lambda: _sample(env.scrape(), 'jaxspec_requests_total{finish_reason="deadline"}') >= before + 2,
                 timeout=5, what="deadline metrics")


INVALID = [
    ("empty text", dict(prompt=""), "prompt"),
    ("empty token ids", dict(prompt=[]), "prompt"),
    ("prompt fills context", dict(prompt=[1] + [70] * 70), "prompt"),
    ("prompt+max_tokens > context", dict(prompt=[1] + [70] * 20, max_tokens=50), "stopping.max_tokens"),
    ("max_tokens 0", dict(max_tokens=0), "stopping.max_tokens"),
    ("temperature < 0", dict(temperature=-0.5), "sampling.temperature"),
    ("top_p 0", dict(top_p=0.0), "sampling.top_p"),
    ("top_p > 1", dict(top_p=1.5), "sampling.top_p"),
    ("top_k < 0", dict(top_k=-1), "sampling.top_k"),
    ("min_p > 1", dict(min_p=2.0), "sampling.min_p"),
    ("seed >= 2**63", dict(seed=2**63), "sampling.seed"),
    ("token id outside vocab", dict(prompt=[1, 70, 259]), "token_ids"),
    ("stop token id outside vocab", dict(stop_token_ids=[5000]), "stopping.stop_token_ids"),
    ("too many stop strings", dict(stop=[f"s{i}" for i in range(17)]), "stopping.stop"),
    ("stop string too long", dict(stop=["x" * 257]), "stopping.stop"),
    ("empty stop string", dict(stop=[""]), "stopping.stop"),
    ("speculative tokens above max", dict(num_speculative_tokens=1), "speculation.num_speculative_tokens"),
    ("speculation on a plain server", dict(speculation=True), "speculation.enabled"),
    ("request id too long", dict(request_id="r" * 129), "request_id"),
]


@pytest.mark.parametrize("kwargs,field", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
@pytest.mark.parametrize("rpc", ["unary", "stream"])
def test_invalid_argument_names_field(env, rpc, kwargs, field):
    kwargs = {"prompt": "hello", **kwargs}
    prompt = kwargs.pop("prompt")
    fn = env.client.generate if rpc == "unary" else env.client.generate_stream
    err = rpc_error(fn, prompt, **kwargs)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert err.details().startswith(f"{field}: "), err.details()
    assert (INVALID_FIELD_KEY, field) in tuple(err.trailing_metadata())


def test_missing_prompt_is_invalid(env):
    err = rpc_error(env.client.stub.Generate, pb.GenerateRequest())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("prompt: ")


def test_request_id_reused_while_in_flight(slow):
    env = slow
    call = env.client.generate_stream([1, 70], max_tokens=60, ignore_eos=True, request_id="dup")
    next(call)
    err = rpc_error(env.client.generate, "hello", request_id="dup")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("request_id: ")
    env.client.abort("dup")
    assert list(call)[-1].finish_reason == pb.FINISH_REASON_ABORTED
    # Once finished, the id is free again.
    assert env.client.generate("hello", request_id="dup", max_tokens=2).finished


def test_queue_full_is_resource_exhausted_at_once(slow):
    env = slow
    running = [env.client.generate_stream([1, 70], max_tokens=60, ignore_eos=True, request_id=f"run{i}")
               for i in range(SLOTS)]
    env.wait_for(lambda: env.info().num_running == SLOTS, what="all slots busy")
    waiting = [env.client.generate_stream([1, 71], max_tokens=60, ignore_eos=True, request_id=f"wait{i}")
               for i in range(MAX_WAITING)]
    env.wait_for(lambda: env.info().num_waiting == MAX_WAITING, what="a full queue")
    t0 = time.monotonic()
    err = rpc_error(env.client.generate, "one too many", max_tokens=2)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert time.monotonic() - t0 < 2.0, "a full queue must refuse at once, not wait for room"
    aborted = env.client.abort(*[f"run{i}" for i in range(SLOTS)], *[f"wait{i}" for i in range(MAX_WAITING)])
    assert len(aborted) == SLOTS + MAX_WAITING
    for c in running + waiting:
        assert list(c)[-1].finish_reason == pb.FINISH_REASON_ABORTED


def test_prefill_fault_fails_only_that_request(env, reference, caplog):
    caplog.set_level(logging.ERROR, logger="jaxspec.serving")
    [expected] = reference.generate(["fine"], SamplingParams(max_tokens=10, temperature=0.5, seed=9))
    with cf.ThreadPoolExecutor(4) as pool:
        good = [pool.submit(env.client.generate, "fine", max_tokens=10, temperature=0.5, seed=9) for _ in range(3)]
        bad = pool.submit(rpc_error, env.client.generate_stream, POISON_TEXT, max_tokens=10)
        err = bad.result()
        assert err.code() == grpc.StatusCode.INTERNAL and "injected prefill fault" in err.details()
        for f in good:
            assert list(f.result().token_ids) == expected.token_ids
    assert any(r.exc_info and "injected prefill fault" in str(r.exc_info[1]) for r in caplog.records), \
        "the failure must be logged with its traceback"
    assert env.client.generate("still serving", max_tokens=3).finished


def test_step_fault_fails_running_requests_and_server_goes_on(slow, caplog):
    env = slow
    caplog.set_level(logging.ERROR, logger="jaxspec.serving")
    call = env.client.generate_stream([1, 70], max_tokens=60, ignore_eos=True)
    next(call)
    env.runner.fail_decodes = 1
    err = rpc_error(list, call)
    assert err.code() == grpc.StatusCode.INTERNAL and "injected decode fault" in err.details()
    assert any(r.exc_info for r in caplog.records if "engine step failed" in r.getMessage())
    env.runner.step_delay_s = 0.0
    assert env.client.generate("after the fault", max_tokens=4).finish_reason == pb.FINISH_REASON_LENGTH
    assert env.client.health() == "SERVING"


def test_model_and_server_info(env):
    info = env.client.model_info()
    assert info.model_id == "tiny-moe" and info.context_length == MAX_LEN and info.vocab_size == 259
    assert list(info.eos_token_ids) == [2] and info.spec_method == "none" and info.max_speculative_tokens == 0
    assert info.num_slots == SLOTS and info.platform == "cpu" and info.devices
    assert info.num_experts == 4 and info.num_experts_per_token == 2
    assert info.max_stop_strings == 16 and info.max_stop_string_length == 256
    server = env.info()
    assert server.state == pb.ServerInfo.STATE_SERVING
    assert server.max_waiting == MAX_WAITING and server.num_slots == SLOTS and server.num_finished > 0


def test_health_and_reflection(env):
    assert env.client.health("") == "SERVING"
    assert env.client.health("jaxspec.v1.JaxSpec") == "SERVING"
    assert rpc_error(env.client.health, "no.such.Service").code() == grpc.StatusCode.NOT_FOUND
    db = ProtoReflectionDescriptorDatabase(env.client.channel)
    services = set(db.get_services())
    assert {"jaxspec.v1.JaxSpec", "grpc.health.v1.Health"} <= services
    svc = db.FindFileContainingSymbol("jaxspec.v1.JaxSpec").service[0]
    assert {m.name for m in svc.method} == {"Generate", "GenerateStream", "Abort", "GetModelInfo", "GetServerInfo"}


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_scrape(env):
    env.client.generate("metrics", max_tokens=5, ignore_eos=True)
    rpc_error(env.client.generate, "", max_tokens=5)
    env.wait_for(lambda: "jaxspec_expert_routed_tokens_total" in env.scrape(), timeout=10, what="expert load")
    text = env.scrape()
    assert _sample(text, 'jaxspec_requests_total{finish_reason="length"}') >= 1
    assert _sample(text, "jaxspec_prompt_tokens_total") > 0
    assert _sample(text, "jaxspec_generation_tokens_total") >= 5
    assert _sample(text, "jaxspec_time_to_first_token_seconds_count") >= 1
    assert _sample(text, "jaxspec_inter_token_latency_seconds_count") >= 4
    assert _sample(text, "jaxspec_e2e_request_latency_seconds_count") >= 1
    assert _sample(text, 'jaxspec_requests_rejected_total{code="INVALID_ARGUMENT"}') >= 1
    assert "jaxspec_num_requests_waiting " in text and "jaxspec_num_requests_running " in text
    routed = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("jaxspec_expert_routed_tokens_total{")]
    assert routed and sum(routed) > 0
    # Every token of every MoE layer picks num_experts_per_tok experts: totals per layer are equal.
    per_layer: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("jaxspec_expert_routed_tokens_total{"):
            layer = line.split('layer="')[1].split('"')[0]
            per_layer[layer] = per_layer.get(layer, 0.0) + float(line.rsplit(" ", 1)[1])
    assert len(set(per_layer.values())) == 1, per_layer


def test_build_request_leaves_unset_fields_unset():
    req = build_request("x", temperature=0.0)
    assert req.sampling.HasField("temperature") and req.sampling.temperature == 0.0
    assert not req.sampling.HasField("top_p") and not req.stopping.HasField("max_tokens")
    assert not req.HasField("speculation")
