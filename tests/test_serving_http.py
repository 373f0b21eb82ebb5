"""The OpenAI-compatible HTTP API, driven by the official openai client, against the gRPC output.

One in-process server (tiny-moe, TLS and a bearer token) answers both protocols; a
tiny Hugging Face chat model covers /v1/chat/completions; the built-in pair covers
speculation counters. Drain runs last on the shared server.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import ssl
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from jaxspec import serve  # noqa: E402
from serving.build import EngineOptions, load_engine  # noqa: E402
from serving.chat_template import ChatTemplate  # noqa: E402
from serving.client import JaxSpecClient  # noqa: E402
from serving.server import ServerOptions  # noqa: E402
from serving.testing import BackgroundServer, ControlledRunner, persistent_compilation_cache  # noqa: E402
from test_serving_lifecycle import _start_cli, wait_until  # noqa: E402
from test_serving_security import tls_files  # noqa: E402,F401  (fixture)

TOKEN = "http-test-token"
SLOTS, MAX_LEN = 4, 64
OPTS = EngineOptions(model="tiny-moe", slots=SLOTS, max_len=MAX_LEN, max_waiting=2, default_max_tokens=16)
PROMPT = "The quick brown fox"


class Env:
    def __init__(self, server: BackgroundServer, runner: ControlledRunner, cert: Path):
        self.server, self.runner, self.cert = server, runner, cert
        self.port = server.server.http_port
        self.ssl = ssl.create_default_context(cafile=str(cert))
        self.grpc = JaxSpecClient(server.target, auth_token=TOKEN, root_certificates=cert, timeout=60)

    def openai(self, api_key: str = TOKEN) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"https://127.0.0.1:{self.port}/v1", api_key=api_key, max_retries=0,
                             timeout=60, http_client=openai.DefaultHttpxClient(verify=self.ssl))

    def connection(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ssl, timeout=60)

    def post(self, path: str, body: object, token: str | None = TOKEN) -> tuple[int, dict]:
        conn = self.connection()
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        conn.request("POST", path, body=body if isinstance(body, str) else json.dumps(body), headers=headers)
        resp = conn.getresponse()
        data = json.loads(resp.read())
        conn.close()
        return resp.status, data

    def idle(self, timeout: float = 30.0) -> None:
        wait_until(lambda: (i := self.grpc.server_info()).num_running == 0 and i.num_waiting == 0, timeout, "idle")


@pytest.fixture(scope="module")
def env(tls_files):  # noqa: F811
    cert, key = tls_files
    runners: list[ControlledRunner] = []

    def wrap(runner):
        runners.append(ControlledRunner(runner))
        return runners[-1]

    with persistent_compilation_cache():
        server = BackgroundServer(
            lambda: load_engine(OPTS, wrap_runner=wrap),
            ServerOptions(port=0, http_port=0, tls_cert=str(cert), tls_key=str(key), auth_token=TOKEN,
                          grace_period=30.0),
        ).start()
        e = Env(server, runners[0], cert)
        try:
            yield e
        finally:
            e.grpc.close()
            server.close()


@pytest.fixture
def slow(env):
    env.runner.step_delay_s = 0.05
    try:
        yield env
    finally:
        env.runner.step_delay_s = 0.0
        env.idle()


def test_models_and_health(env):
    models = env.openai().models.list().data
    assert [m.id for m in models] == ["tiny-moe"] and models[0].max_model_len == MAX_LEN
    conn = env.connection()
    conn.request("GET", "/health")  # no token: probes stay open
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read()) == {"status": "serving"}


SAMPLED = dict(temperature=0.8, top_p=0.9, seed=7)


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), SAMPLED], ids=["greedy", "seeded"])
def test_completions_equal_grpc(env, sampling):
    grpc_resp = env.grpc.generate(PROMPT, max_tokens=12, ignore_eos=True, **sampling)
    client = env.openai()
    extra = {"ignore_eos": True}
    unary = client.completions.create(model="tiny-moe", prompt=PROMPT, max_tokens=12, extra_body=extra, **sampling)
    [choice] = unary.choices
    assert choice.token_ids == list(grpc_resp.token_ids) and choice.text == grpc_resp.text
    assert choice.finish_reason == "length" and unary.model == "tiny-moe" and unary.object == "text_completion"
    assert (unary.usage.prompt_tokens, unary.usage.completion_tokens, unary.usage.total_tokens) == (
        grpc_resp.usage.prompt_tokens, 12, grpc_resp.usage.prompt_tokens + 12)
    assert unary.jaxspec["finish_reason"] == "length" and "speculation" not in unary.jaxspec

    chunks = list(client.completions.create(model="tiny-moe", prompt=PROMPT, max_tokens=12, extra_body=extra,
                                            stream=True, stream_options={"include_usage": True}, **sampling))
    *deltas, usage = chunks
    assert [t for c in deltas for t in c.choices[0].token_ids] == list(grpc_resp.token_ids)
    assert "".join(c.choices[0].text for c in deltas) == grpc_resp.text
    assert [c.choices[0].finish_reason for c in deltas] == [None] * (len(deltas) - 1) + ["length"]
    assert usage.choices == [] and usage.usage.completion_tokens == 12
    assert all(c.usage is None for c in deltas) and len({c.id for c in chunks}) == 1

    # A token-id prompt is the same request as its text.
    ids = client.completions.create(model="tiny-moe", prompt=_prompt_ids(env), max_tokens=12, extra_body=extra,
                                    **sampling)
    assert ids.choices[0].token_ids == list(grpc_resp.token_ids)


def _prompt_ids(env) -> list[int]:
    return env.server.server.servicer.bundle.tokenizer.encode(PROMPT)


def test_stop_string_and_unset_max_tokens(env):
    full = env.grpc.generate(PROMPT, max_tokens=12, temperature=0.0, ignore_eos=True)
    stop = full.text[4:6]
    resp = env.openai().completions.create(model="tiny-moe", prompt=PROMPT, temperature=0, max_tokens=12,
                                           stop=[stop], extra_body={"ignore_eos": True})
    expected = env.grpc.generate(PROMPT, max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop])
    assert resp.choices[0].finish_reason == "stop" and resp.choices[0].text == expected.text
    assert resp.jaxspec["stop_string"] == stop == expected.stop_string
    # No max_tokens: the server's default, as over gRPC.
    default = env.openai().completions.create(model="tiny-moe", prompt=PROMPT, temperature=0,
                                              extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == OPTS.default_max_tokens


@pytest.mark.parametrize("body, param", [
    (dict(n=2), "n"),
    (dict(top_p=2.0), "top_p"),
    (dict(temperature=-1), "temperature"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens="many"), "max_tokens"),
    (dict(logprobs=1), "logprobs"),
    (dict(seed=-1), "seed"),
    (dict(stop=["x"] * 17), "stop"),
    (dict(prompt=["one", "two"]), "prompt"),
    (dict(prompt=[1, 10**6]), "prompt"),
    (dict(prompt=""), "prompt"),
    (dict(speculation={"enabled": True}), "speculation.enabled"),
    (dict(speculation={"num_speculative_tokens": -1}), "speculation.num_speculative_tokens"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_parameter_is_400_naming_it(env, body, param):
    extension = {k: v for k, v in body.items() if k == "speculation"}
    known = {k: v for k, v in body.items() if k not in extension}
    with pytest.raises(openai.BadRequestError) as err:
        env.openai().completions.create(**{"model": "tiny-moe", "prompt": PROMPT, **known}, extra_body=extension)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"
    assert err.value.body["message"].startswith(param)


def test_auth_model_route_and_body_errors(env):
    for key in ("wrong-token", TOKEN + "x"):
        with pytest.raises(openai.AuthenticationError) as err:
            env.openai(key).completions.create(model="tiny-moe", prompt=PROMPT, max_tokens=2)
        assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    status, data = env.post("/v1/completions", {"prompt": PROMPT}, token=None)
    assert status == 401 and set(data["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError) as err:
        env.openai().completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert err.value.body["param"] == "model" and err.value.body["code"] == "model_not_found"
    status, data = env.post("/v1/embeddings", {"input": "x"})
    assert status == 404 and data["error"]["code"] == "not_found"
    status, data = env.post("/v1/completions", "{not json")
    assert status == 400 and data["error"]["code"] == "invalid_json"
    # A model without a chat template cannot chat.
    with pytest.raises(openai.BadRequestError) as err:
        env.openai().chat.completions.create(model="tiny-moe", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["param"] == "messages" and "chat template" in err.value.body["message"]


def test_deadline_is_504(slow):
    with pytest.raises(openai.InternalServerError) as err:
        slow.openai().completions.create(model="tiny-moe", prompt=PROMPT, max_tokens=40,
                                         extra_body={"ignore_eos": True, "request_timeout": 0.3})
    assert err.value.status_code == 504 and err.value.body["code"] == "deadline_exceeded"


def test_engine_failure_is_500_unary_and_an_error_event_streaming(env):
    client = env.openai()
    env.runner.fail_decodes = 1
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model="tiny-moe", prompt=PROMPT, max_tokens=4, extra_body={"ignore_eos": True})
    assert err.value.status_code == 500 and err.value.body["code"] == "engine_error"
    # The engine serves on (ignore_eos: a sampled first token may be EOS, which would end it at 0).
    assert client.completions.create(model="tiny-moe", prompt=PROMPT, max_tokens=2,
                                     extra_body={"ignore_eos": True}).usage.completion_tokens == 2
    env.runner.fail_decodes = 1
    with pytest.raises(openai.APIError, match="injected decode fault"):
        list(client.completions.create(model="tiny-moe", prompt=PROMPT, max_tokens=4, stream=True,
                                       extra_body={"ignore_eos": True}))
    # The engine serves on (ignore_eos: a sampled first token may be EOS, which would end it at 0).
    assert client.completions.create(model="tiny-moe", prompt=PROMPT, max_tokens=2,
                                     extra_body={"ignore_eos": True}).usage.completion_tokens == 2


def _open_stream(env, prompt: str, max_tokens: int = 40) -> tuple[http.client.HTTPSConnection,
                                                                  http.client.HTTPResponse]:
    conn = env.connection()
    conn.request("POST", "/v1/completions", headers={"Authorization": f"Bearer {TOKEN}",
                                                     "Content-Type": "application/json"},
                 body=json.dumps({"prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}))
    return conn, conn.getresponse()


def test_disconnect_cancels_and_full_queue_is_429(slow):
    env = slow
    # Headers arrive once the engine took the request: SLOTS running, then a full queue.
    t0 = time.monotonic()
    streams = [_open_stream(env, f"req {i}", max_tokens=50) for i in range(SLOTS)]
    wait_until(lambda: env.grpc.server_info().num_running == SLOTS, 30, "all slots busy")
    streams += [_open_stream(env, f"wait {i}", max_tokens=50) for i in range(2)]
    assert [r.status for _, r in streams] == [200] * (SLOTS + 2)
    wait_until(lambda: env.grpc.server_info().num_waiting == 2, 30, "a full queue")
    status, data = env.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert status == 429 and data["error"]["type"] == "rate_limit_error"
    # Clients that go away end their requests in the engine before 50 steps of 50 ms could.
    for conn, _ in streams:
        conn.sock.close()
        conn.close()
    env.idle(timeout=10)
    assert time.monotonic() - t0 < 50 * 0.05

    # A unary request whose client gives up is ended too.
    client = openai.OpenAI(base_url=f"https://127.0.0.1:{env.port}/v1", api_key=TOKEN, max_retries=0, timeout=0.5,
                           http_client=openai.DefaultHttpxClient(verify=env.ssl))
    t0 = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.completions.create(model="tiny-moe", prompt=PROMPT, max_tokens=40, extra_body={"ignore_eos": True})
    env.idle(timeout=5)
    assert time.monotonic() - t0 < 40 * 0.05


def test_cli_flag():
    args = serve.parse_args(["--model", "tiny-moe", "--http-port", "0"])
    assert serve.options_from_args(args)[1].http_port == 0
    assert serve.options_from_args(serve.parse_args(["--model", "tiny-moe"]))[1].http_port is None


# ------------------------------------------------------------------ chat
CHATML = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "the quick brown fox"},
    {"role": "assistant", "content": "jumps over"},
    {"role": "user", "content": [{"type": "text", "text": "the lazy dog"}]},
]


def _build_chat_model(directory: Path) -> None:
    """A tiny random Llama with a byte-level BPE, ChatML special tokens and a chat template."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>", "<|im_start|>", "<|im_end|>"])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "system user assistant"] * 20, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "<|im_end|>", "add_bos_token": False, "chat_template": CHATML,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   initializer_range=0.1, bos_token_id=0, eos_token_id=2)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(directory)


def _reference_prompt(directory: Path, messages: list[dict]) -> tuple[str, list[int]]:
    """What transformers' apply_chat_template makes of the conversation."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return text, list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


@pytest.fixture(scope="module")
def chat_env(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat") / "tiny-chat"
    _build_chat_model(directory)
    opts = EngineOptions(model=str(directory), slots=2, max_len=96, default_max_tokens=8)
    with persistent_compilation_cache():
        server = BackgroundServer(lambda: load_engine(opts), ServerOptions(port=0, http_port=0)).start()
        client = JaxSpecClient(server.target, timeout=60)
        try:
            yield directory, server, client
        finally:
            client.close()
            server.close()


def test_chat_template_renders_as_transformers(tmp_path):
    _build_chat_model(tmp_path)
    template = ChatTemplate.from_directory(tmp_path)
    messages = [m if isinstance(m["content"], str) else {**m, "content": "the lazy dog"} for m in CONVERSATION]
    text, _ = _reference_prompt(tmp_path, messages)
    assert template.render(messages) == text and text.startswith("<s><|im_start|>system\n")


@pytest.mark.slow
def test_chat_equals_grpc_on_the_templated_prompt(chat_env):
    directory, server, grpc_client = chat_env
    flat = [m if isinstance(m["content"], str) else {**m, "content": "the lazy dog"} for m in CONVERSATION]
    _, prompt_ids = _reference_prompt(directory, flat)
    expected = grpc_client.generate(prompt_ids, max_tokens=10, temperature=0.0, ignore_eos=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server.http_port}/v1", api_key="unused",
                           max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    unary = client.chat.completions.create(model=model, messages=CONVERSATION, max_completion_tokens=10,
                                           temperature=0, extra_body={"ignore_eos": True})
    [choice] = unary.choices
    assert choice.token_ids == list(expected.token_ids) and choice.message.content == expected.text
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert unary.usage.prompt_tokens == len(prompt_ids) and unary.object == "chat.completion"

    chunks = list(client.chat.completions.create(model=model, messages=CONVERSATION, max_tokens=10, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert [t for c in chunks for t in c.choices[0].token_ids] == list(expected.token_ids)
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].object == "chat.completion.chunk"

    # The template's raise_exception is a 400 that says why.
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=[{"role": "tool", "content": "x"}])
    assert err.value.body["param"] == "messages" and "unknown role tool" in err.value.body["message"]


# --------------------------------------------------------------- built-in
@pytest.mark.slow
def test_builtin_pair_completions_equal_grpc_with_speculation_counters():
    opts = EngineOptions(model="builtin", draft="builtin", spec_method="draft", num_speculative_tokens=3,
                         adaptive_k=False, slots=2, max_len=256)
    prompt = "def fibonacci(n):\n"
    with persistent_compilation_cache():
        with BackgroundServer(lambda: load_engine(opts), ServerOptions(port=0, http_port=0)) as server:
            with JaxSpecClient(server.target, timeout=120) as grpc_client:
                expected = grpc_client.generate(prompt, max_tokens=32, temperature=0.0)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server.http_port}/v1", api_key="unused",
                                   max_retries=0, timeout=120)
            assert client.models.list().data[0].id == "builtin-target"
            unary = client.completions.create(model="builtin-target", prompt=prompt, max_tokens=32, temperature=0)
            assert unary.choices[0].token_ids == list(expected.token_ids)
            assert unary.choices[0].text == expected.text
            spec = unary.jaxspec["speculation"]
            assert spec["num_draft_tokens"] > 0 and 0 <= spec["num_accepted_tokens"] <= spec["num_draft_tokens"]
            assert spec["accepted_per_position"] == list(expected.speculation.accepted_per_position)
            chunks = list(client.completions.create(model="builtin-target", prompt=prompt, max_tokens=32,
                                                    temperature=0, stream=True))
            assert "".join(c.choices[0].text for c in chunks) == expected.text
            assert chunks[-1].jaxspec["speculation"]["num_draft_tokens"] > 0


# ------------------------------------------------------------------ the CLI
@pytest.mark.slow
def test_cli_http_port_serves_and_sigterm_drains_it():
    proc, lines, reader = _start_cli("--http-port", "0", "--grace-period", "20")
    try:
        def port() -> int | None:
            pattern = r"OpenAI-compatible API on http://127\.0\.0\.1:(\d+)/v1"
            return next((int(m.group(1)) for line in list(lines) if (m := re.search(pattern, line))), None)

        wait_until(lambda: port() is not None or proc.poll() is not None, 120, "the HTTP port in the log")
        assert port(), "".join(lines)
        base = f"http://127.0.0.1:{port()}"

        def serving() -> bool:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port(), timeout=2)
                conn.request("GET", "/health")
                return conn.getresponse().status == 200
            except OSError:
                return False

        wait_until(lambda: serving() or proc.poll() is not None, 300, "SERVING")
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        resp = client.completions.create(model="tiny-moe", prompt=PROMPT, max_tokens=6, temperature=0,
                                         extra_body={"ignore_eos": True})
        assert resp.usage.completion_tokens == 6
        # SIGTERM right after a stream started: the stream still ends normally, then the process exits 0.
        stream = client.completions.create(model="tiny-moe", prompt=PROMPT, max_tokens=40, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        first = next(iter(stream))
        proc.send_signal(signal.SIGTERM)
        chunks = [first, *stream]  # tokens ready together leave in one chunk: maybe all of them in the first
        assert sum(len(c.choices[0].token_ids) for c in chunks) == 40
        assert chunks[-1].choices[0].finish_reason == "length"
        assert proc.wait(timeout=60) == 0, "".join(lines)
        reader.join(10)
        assert "server stopped" in "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ drain (last: it stops the shared server)
def test_drain_refuses_new_requests_and_finishes_in_flight(env):
    env.runner.step_delay_s = 0.05
    conn, resp = _open_stream(env, "in flight", max_tokens=30)
    assert resp.status == 200
    drained = threading.Thread(target=env.server.drain, kwargs={"grace": 30.0})
    drained.start()
    wait_until(lambda: env.server.server.engine_loop.state.value == "draining", 10, "draining")
    status, data = env.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert status == 503 and data["error"]["code"] == "unavailable"
    conn_health = env.connection()
    conn_health.request("GET", "/health")
    assert conn_health.getresponse().status == 503
    conn_health.close()
    events = [e for e in resp.read().decode().split("\n\n") if e.startswith("data: ")]
    conn.close()
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] == "length" and last["jaxspec"]["finish_reason"] == "length"
    assert sum(len(json.loads(e[6:])["choices"][0]["token_ids"]) for e in events[:-1]) == 30
    drained.join(60)
    with pytest.raises(OSError):  # the HTTP server stopped with the gRPC one
        env.connection().request("GET", "/health")
