"""Server lifecycle: health while warming up, draining, grace period; the CLI under SIGTERM; client CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import jax
import pytest

from serving.build import EngineOptions, load_engine
from serving.client import JaxSpecClient
from serving.engine_loop import ServerState
from serving.pb import jaxspec_pb2 as pb
from serving.server import ServerOptions
from serving.testing import BackgroundServer, ControlledRunner, compilation_cache_dir_for_tests, \
    persistent_compilation_cache

REPO = Path(__file__).resolve().parent.parent
# One decode step per call: the drain test times its requests in steps of an injected delay per call.
OPTS = EngineOptions(model="tiny-moe", slots=16, max_len=64, default_max_tokens=8, decode_steps=1)


def wait_until(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def health_or_none(client: JaxSpecClient, service: str = "") -> str | None:
    try:
        return client.health(service, timeout=2)
    except grpc.RpcError:
        return None


def test_health_transitions_warmup_serving_draining():
    gate = threading.Event()
    runners: list[ControlledRunner] = []

    def wrap(runner):
        runners.append(ControlledRunner(runner))
        runners[-1].warmup_gate = gate
        return runners[-1]

    with persistent_compilation_cache():
        server = BackgroundServer(lambda: load_engine(OPTS, wrap_runner=wrap),
                                  ServerOptions(port=0, grace_period=2.0)).start(wait_ready=False)
        client = JaxSpecClient(server.target, timeout=30)
        try:
            # Warming up: bound and answering, but not serving.
            for service in ("", "jaxspec.v1.JaxSpec"):
                assert client.health(service) == "NOT_SERVING"
            assert client.server_info().state == pb.ServerInfo.STATE_WARMING_UP
            for call in (lambda: client.generate("hi", max_tokens=2), client.model_info):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            gate.set()
            wait_until(lambda: client.health() == "SERVING", 300, "SERVING after warm-up")
            assert client.health("jaxspec.v1.JaxSpec") == "SERVING"

            # Drain with two requests in flight: the short one finishes within the 2 s grace
            # period, the long one (60 steps of >= 50 ms) is aborted when it runs out.
            runner = runners[0]
            runner.step_delay_s = 0.05
            short = client.generate_stream([1, 70], max_tokens=8, ignore_eos=True)
            long = client.generate_stream([1, 71], max_tokens=60, ignore_eos=True)
            next(short), next(long)
            drained = server.submit(server.server.drain())
            wait_until(lambda: client.health() == "NOT_SERVING", 10, "NOT_SERVING while draining")
            assert client.health("jaxspec.v1.JaxSpec") == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as err:
                client.generate("too late", max_tokens=2)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            last_short = list(short)[-1]
            assert last_short.finish_reason == pb.FINISH_REASON_LENGTH and last_short.usage.completion_tokens == 8
            last_long = list(long)[-1]
            assert last_long.finish_reason == pb.FINISH_REASON_ABORTED and last_long.usage.completion_tokens < 60
            drained.result(timeout=60)
            assert server.server.engine_loop.state == ServerState.STOPPED
        finally:
            client.close()
            server.close()


def test_repeated_step_failures_mark_the_server_failed():
    runners: list[ControlledRunner] = []

    def wrap(runner):
        runners.append(ControlledRunner(runner))
        return runners[-1]

    with persistent_compilation_cache():
        server = BackgroundServer(lambda: load_engine(OPTS, wrap_runner=wrap), ServerOptions(port=0)).start()
        client = JaxSpecClient(server.target, timeout=30)
        try:
            runners[0].fail_decodes = 3  # MAX_CONSECUTIVE_STEP_FAILURES
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as err:
                    client.generate("hello", max_tokens=4)
                assert err.value.code() == grpc.StatusCode.INTERNAL
            # The engine is considered broken: the server stops itself with exit code 1.
            assert server.run(server.server.wait_stopped(), timeout=60) == 1
            assert server.server.engine_loop.state == ServerState.FAILED
            with pytest.raises(grpc.RpcError) as err:
                client.generate("hello", max_tokens=4, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            client.close()
            server.close()


def _server_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    # Same numerics settings as the in-process servers, so the subprocess reuses their compiled executables.
    precision = jax.config.jax_default_matmul_precision
    if precision is not None:
        env["JAX_DEFAULT_MATMUL_PRECISION"] = str(precision)
    return env


def _start_cli(*extra: str) -> tuple[subprocess.Popen, list[str], threading.Thread]:
    env = _server_env()
    cmd = [sys.executable, "-m", "jaxspec.serve", "--model", "tiny-moe", "--slots", "16", "--max-len", "64",
           "--port", "0", "--compilation-cache-dir", str(compilation_cache_dir_for_tests()), *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def pump() -> None:  # keep the pipe drained so the server never blocks on logging
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    return proc, lines, reader


def _port(lines: list[str], proc: subprocess.Popen) -> int:
    def found() -> re.Match | None:
        return next((m for line in list(lines) if (m := re.search(r"listening on 127\.0\.0\.1:(\d+)", line))), None)

    wait_until(lambda: found() is not None or proc.poll() is not None, 120, "the server to listen")
    match = found()
    assert match, "".join(lines)
    return int(match.group(1))


def _run_client(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxspec.client", *args], cwd=REPO, env=_server_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_serves_then_sigterm_drains_and_exits_zero():
    proc, lines, reader = _start_cli("--grace-period", "20", "--metrics-port", "0")
    try:
        port = _port(lines, proc)
        target = f"127.0.0.1:{port}"
        client = JaxSpecClient(target, timeout=60)
        wait_until(lambda: health_or_none(client) == "SERVING" or proc.poll() is not None, 300, "SERVING")
        assert proc.poll() is None, "".join(lines)

        # The client CLI: streamed text, and --json with the whole response.
        out = _run_client("hello", "--target", target, "--max-tokens", "6", "--temperature", "0", "--ignore-eos")
        assert out.returncode == 0, out.stderr
        unary = client.generate("hello", max_tokens=6, temperature=0.0, ignore_eos=True)
        assert out.stdout == unary.text + "\n" and "[length; 6 tokens]" in out.stderr
        out = _run_client("hello", "--target", target, "--max-tokens", "6", "--temperature", "0", "--ignore-eos",
                          "--json")
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        assert data["finish_reason"] == "FINISH_REASON_LENGTH" and data["token_ids"] == list(unary.token_ids)
        bad = _run_client("hello", "--target", target, "--temperature", "-1")
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr

        # SIGTERM with requests in flight: they complete, then the process exits 0.
        streams = [client.generate_stream([1, 70 + i], max_tokens=50, ignore_eos=True) for i in range(16)]
        for s in streams:
            next(s)
        proc.send_signal(signal.SIGTERM)
        for s in streams:
            last = list(s)[-1]
            assert last.finish_reason == pb.FINISH_REASON_LENGTH and last.usage.completion_tokens == 50
        assert proc.wait(timeout=60) == 0, "".join(lines)
        reader.join(10)
        log = "".join(lines)
        assert "SIGTERM: draining" in log and "server stopped" in log
        # One structured line per request, without the prompt text.
        records = [json.loads(line.split(": ", 1)[1]) for line in lines if "jaxspec.serving.requests" in line]
        assert len(records) == 3 + 16 and all(r["event"] == "request_finished" for r in records)
        assert all("hello" not in line for line in lines if "jaxspec.serving.requests" in line)
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_cli_exits_nonzero_when_the_model_cannot_load():
    proc, lines, reader = _start_cli("--model", "no-such-model-config")
    try:
        assert proc.wait(timeout=120) == 1, "".join(lines)
        reader.join(10)
        assert "engine start-up failed" in "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_unary_call_wakes_once_for_every_output_of_its_request():
    """A unary RPC's task waits for the final output, not for each step's, and still gets every
    output in order (the merged response is built from all of them)."""
    import asyncio

    from jaxspec.engine import FinishReason, RequestOutput
    from serving.engine_loop import RequestHandle

    async def main():
        handle = RequestHandle("r", 3, False)
        final = asyncio.ensure_future(handle.all_outputs())
        for i in range(4):
            handle.push(RequestOutput("r", [i], str(i)))
            await asyncio.sleep(0)
            assert not final.done()
        handle.push(RequestOutput("r", [4], "4", finished=True, finish_reason=FinishReason.LENGTH))
        outputs = await asyncio.wait_for(final, 5)
        assert [o.new_token_ids for o in outputs] == [[0], [1], [2], [3], [4]]
        assert outputs[-1].finished

    asyncio.run(main())


def test_an_idle_engine_takes_a_bursts_following_requests_before_its_first_step():
    """Woken from idle by one request, the engine thread takes the commands queued behind it (so
    they share one prefill), and stops waiting once none comes within the gap."""
    from serving.engine_loop import BURST_WINDOW_S, EngineLoop

    loop = EngineLoop(lambda: None)
    ran = []
    for i in range(3):
        loop._inbox.put((lambda i=i: ran.append(i), None))
    t0 = time.monotonic()
    loop._gather_burst()
    assert ran == [0, 1, 2]
    assert time.monotonic() - t0 < BURST_WINDOW_S + 0.05  # nothing more came: it did not wait on


def test_the_serving_readme_states_the_burst_window():
    from serving.engine_loop import BURST_GAP_S, BURST_WINDOW_S

    readme = " ".join((Path(__file__).resolve().parents[1] / "serving" / "README.md").read_text().split())
    assert (BURST_GAP_S, BURST_WINDOW_S) == (0.001, 0.004)
    assert "takes those that follow within 1 ms of each other (4 ms at most)" in readme
