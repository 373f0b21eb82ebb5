"""Multi-host serving for real, on one machine: 2 processes x 4 CPU devices joined by
``jax.distributed`` (gloo collectives) run the tiny MoE over one 8-device global mesh; the
leader's engine drives the follower through ``serving.multihost``, and its greedy tokens equal
a single-process run on an 8-device mesh of the same config and weights.

This file is also the worker both processes run (``python tests/test_multihost.py worker ...``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROMPTS = [[5, 17, 42, 99, 7], [200, 3, 3, 80], list(range(30, 52))]
MAX_TOKENS = 8
SLOTS, MAX_LEN = 4, 64
MODEL, MESH, SCALE = "tiny-moe", "cpu-8", 3.0
TIMEOUT_S = 480  # both processes compile every step on one shared core


def _build_runner():
    from helpers import scaled_model
    from jaxspec.engine.factory import make_runner
    from jaxspec.mesh import load_mesh_config, placement_for_mesh

    # The same seed on every process: each one builds identical weights and places its shards.
    model = scaled_model(MODEL, scale=SCALE)
    return make_runner(model, num_slots=SLOTS, max_len=MAX_LEN, placement=placement_for_mesh(load_mesh_config(MESH)))


def _generate(runner) -> list[list[int]]:
    from jaxspec.engine import Engine
    from jaxspec.sampling import SamplingParams
    from jaxspec.tokenizer import ByteTokenizer

    engine = Engine(runner, ByteTokenizer(), eos_ids=[])
    done = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    return [c.token_ids for c in done]


def _worker(process_id: int, port: int, out: str) -> int:
    import jax

    from jaxspec import distributed

    info = distributed.initialize(f"127.0.0.1:{port}", 2, process_id, timeout_s=120)
    jax.config.update("jax_default_matmul_precision", "highest")  # as conftest sets for the reference
    assert info.global_devices == 8 and info.local_devices == 4, info
    from serving.multihost import BroadcastingRunner, follow

    runner = _build_runner()
    channel = distributed.StepChannel()
    if not info.is_leader:
        return follow(runner, channel, idle_timeout_s=TIMEOUT_S)
    leader = BroadcastingRunner(runner, channel)
    try:
        tokens = _generate(leader)
    finally:
        leader.stop()
    Path(out).write_text(json.dumps({"tokens": tokens, "calls": channel.seq}))
    return 0


def _serve_worker(process_id: int, port: int, grpc_port: int) -> int:
    """One process of ``python -m jaxspec.serve --coordinator ...`` (serving.multihost.run)."""
    from jaxspec import distributed

    info = distributed.initialize(f"127.0.0.1:{port}", 2, process_id, timeout_s=120, heartbeat_timeout_s=10)
    from serving.build import EngineOptions
    from serving.multihost import run
    from serving.server import ServerOptions

    engine = EngineOptions(model=MODEL, mesh=MESH, slots=SLOTS, max_len=MAX_LEN, kernel_selftest=False)
    return run(info, engine, ServerOptions(port=grpc_port, grace_period=5.0), stall_s=10.0)


# ------------------------------------------------------------------------------ the tests
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_generate_what_one_process_does(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    port, out = _free_port(), tmp_path / "leader.json"
    procs = [subprocess.Popen([sys.executable, __file__, "worker", str(i), str(port), str(out)], env=env,
                              stdout=open(tmp_path / f"p{i}.log", "w"), stderr=subprocess.STDOUT)
             for i in range(2)]
    try:
        deadline = time.monotonic() + TIMEOUT_S
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:  # a hang fails the test instead of blocking the suite
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = {i: (tmp_path / f"p{i}.log").read_text()[-3000:] for i in range(2)}
    assert codes == [0, 0], f"exit codes {codes}\nleader log:\n{logs[0]}\nfollower log:\n{logs[1]}"
    got = json.loads(out.read_text())

    # The reference: this process (8 virtual devices, see conftest), same config, weights and mesh.
    want = _generate(_build_runner())
    assert got["tokens"] == want
    assert all(len(t) == MAX_TOKENS for t in want)
    # Every prefill and decode went through the channel: at least one prefill and
    # MAX_TOKENS - 1 decodes, plus each request's release, plus the stop record.
    assert got["calls"] >= 1 + (MAX_TOKENS - 1) + len(PROMPTS) + 1


class _Job:
    """Two worker processes, killed in any case when the test ends."""

    def __init__(self, tmp_path: Path, mode: str, *args: str):
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
        self.logs = [tmp_path / f"{mode}-p{i}.log" for i in range(2)]
        self.procs = [subprocess.Popen([sys.executable, __file__, mode, str(i), *args], env=env,
                                       stdout=open(self.logs[i], "w"), stderr=subprocess.STDOUT) for i in range(2)]

    def wait(self, timeout: float) -> list[int | None]:
        deadline = time.monotonic() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes

    def tails(self) -> str:
        return "\n".join(f"--- process {i}:\n{log.read_text()[-3000:]}" for i, log in enumerate(self.logs))

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _wait_serving(client, job: _Job, timeout: float) -> None:
    import grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in job.procs), f"a process exited during start-up\n{job.tails()}"
        try:
            if client.health(timeout=2.0) == "SERVING":
                return
        except grpc.RpcError:
            pass
        time.sleep(1.0)
    raise AssertionError(f"not SERVING within {timeout}s\n{job.tails()}")


def _serve_reference() -> list[list[int]]:
    """What one process with an 8-device mesh generates for each prompt alone, as the server loads it."""
    from jaxspec.engine import Engine
    from jaxspec.engine.factory import make_runner
    from jaxspec.loading import load_any
    from jaxspec.mesh import load_mesh_config, placement_for_mesh
    from jaxspec.sampling import SamplingParams

    model, tokenizer = load_any(MODEL, seed=0)
    runner = make_runner(model, num_slots=SLOTS, max_len=MAX_LEN, placement=placement_for_mesh(load_mesh_config(MESH)))
    engine = Engine(runner, tokenizer, eos_ids=[])
    return [engine.generate([p], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))[0].token_ids
            for p in PROMPTS]


@pytest.mark.slow
def test_leader_serves_grpc_and_sigterm_stops_every_process(tmp_path):
    from serving.client import JaxSpecClient

    grpc_port = _free_port()
    job = _Job(tmp_path, "serve", str(_free_port()), str(grpc_port))
    try:
        with JaxSpecClient(f"127.0.0.1:{grpc_port}", timeout=TIMEOUT_S) as client:
            _wait_serving(client, job, TIMEOUT_S)
            got = [list(client.generate(p, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True).token_ids)
                   for p in PROMPTS]
        job.procs[0].send_signal(signal.SIGTERM)  # the leader drains, then stops the follower
        codes = job.wait(120)
        assert codes == [0, 0], f"exit codes {codes}\n{job.tails()}"
    finally:
        job.kill()
    assert got == _serve_reference()


if __name__ == "__main__" and len(sys.argv) >= 2 and sys.argv[1] in ("worker", "serve"):
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if sys.argv[1] == "worker":
        sys.exit(_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
    sys.exit(_serve_worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
