"""Multi-host serving for real, on one machine: 2 processes x 4 CPU devices joined by
``jax.distributed`` (gloo collectives) run the tiny MoE over one 8-device global mesh; the
leader's engine drives the follower through ``serving.multihost``, and its greedy tokens equal
a single-process run on an 8-device mesh of the same config and weights.

This file is also the worker both processes run (``python tests/test_multihost.py worker ...``).
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from ports import free_port

PROMPTS = [[5, 17, 42, 99, 7], [200, 3, 3, 80], list(range(30, 52))]
MAX_TOKENS = 8
SPEC_TOKENS = 24  # adaptive k probes after 16 steps off: requests long enough to reach one
SLOTS, MAX_LEN = 4, 64
MODEL, MESH, SCALE = "tiny-moe", "cpu-8", 3.0
TIMEOUT_S = 480  # both processes compile every step on one shared core
_CACHE_ENV = "JAXSPEC_MULTIHOST_TEST_CACHE"


def _build_runner(spec: str = "none"):
    from helpers import scaled_model
    from jaxspec.engine.factory import make_runner
    from jaxspec.mesh import load_mesh_config, placement_for_mesh

    # The same seed on every process: each one builds identical weights and places its shards.
    model = scaled_model(MODEL, scale=SCALE)
    # Speculative: the target's weights scaled less (it agrees often, not always: drafts are both
    # accepted and rejected), k fixed.
    draft = scaled_model(MODEL, scale=2.0) if spec == "draft" else None
    paged = dict(page_size=16) if spec == "paged" else {}  # "paged": plain decoding from a paged cache
    return make_runner(model, num_slots=SLOTS, max_len=MAX_LEN, placement=placement_for_mesh(load_mesh_config(MESH)),
                       spec_method="draft" if spec == "draft" else "none", draft=draft, num_speculative_tokens=2,
                       **paged)


def _generate(runner) -> tuple[list[list[int]], list[int]]:
    """Greedy tokens of every prompt, and (speculative) how many drafts were proposed / accepted."""
    from jaxspec.engine import Engine
    from jaxspec.sampling import SamplingParams
    from jaxspec.tokenizer import ByteTokenizer

    engine = Engine(runner, ByteTokenizer(), eos_ids=[])
    done = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    stats = engine.spec_stats
    drafts = [stats.num_draft_tokens, stats.num_accepted_tokens] if stats is not None else [0, 0]
    return [c.token_ids for c in done], drafts


def _worker(process_id: int, port: int, out: str, spec: str) -> int:
    import jax

    from jaxspec import distributed

    info = distributed.initialize(f"127.0.0.1:{port}", 2, process_id, timeout_s=120)
    jax.config.update("jax_default_matmul_precision", "highest")  # as conftest sets for the reference
    assert info.global_devices == 8 and info.local_devices == 4, info
    from serving.multihost import BroadcastingRunner, follow

    runner = _build_runner(spec)
    channel = distributed.StepChannel()
    if not info.is_leader:
        return follow(runner, channel, idle_timeout_s=TIMEOUT_S)
    leader = BroadcastingRunner(runner, channel)
    try:
        tokens, drafts = _generate(leader)
    finally:
        leader.stop()
    Path(out).write_text(json.dumps({"tokens": tokens, "drafts": drafts, "calls": channel.seq}))
    return 0


def _serve_worker(process_id: int, port: int, grpc_port: int, metrics_port: int | None = None) -> int:
    """One process of ``python -m jaxspec.serve --coordinator ...`` (serving.multihost.run)."""
    from jaxspec import distributed

    info = distributed.initialize(f"127.0.0.1:{port}", 2, process_id, timeout_s=120, heartbeat_timeout_s=60)
    from serving.build import EngineOptions
    from serving.multihost import run
    from serving.server import ServerOptions

    engine = EngineOptions(model=MODEL, mesh=MESH, slots=SLOTS, max_len=MAX_LEN, kernel_selftest=False)
    # One machine: only the follower takes --metrics-port (on separate hosts every process can).
    metrics = metrics_port if process_id == 1 else None
    return run(info, engine, ServerOptions(port=grpc_port, grace_period=5.0, metrics_port=metrics), stall_s=10.0)


def _save_models(root: Path) -> None:
    """The scaled target and draft of ``_build_runner`` as model directories (what serve loads)."""
    from helpers import scaled_model
    from jaxspec.checkpoint import save_model
    from jaxspec.tokenizer import ByteTokenizer

    save_model(root / "target", scaled_model(MODEL, scale=SCALE), ByteTokenizer())
    save_model(root / "draft", scaled_model(MODEL, scale=2.0), ByteTokenizer())


def _spec_options(root: Path, spec: str):
    """``--spec-method spec`` as serve runs it by default: adaptive k (up to 2 here), measured costs."""
    from serving.build import EngineOptions

    return EngineOptions(model=str(root / "target"), draft=str(root / "draft") if spec == "draft" else None,
                         spec_method=spec, num_speculative_tokens=2, mesh=MESH, slots=SLOTS, max_len=MAX_LEN,
                         kernel_selftest=False)


def _serve_spec_worker(process_id: int, port: int, grpc_port: int, metrics_port: int, root: str, spec: str) -> int:
    """One process of ``python -m jaxspec.serve --model DIR [--draft DIR] --spec-method spec --coordinator ...``."""
    from jaxspec import distributed

    info = distributed.initialize(f"127.0.0.1:{port}", 2, process_id, timeout_s=120, heartbeat_timeout_s=60)
    from serving.multihost import run
    from serving.server import ServerOptions

    metrics = metrics_port if process_id == 1 else None
    return run(info, _spec_options(Path(root), spec),
               ServerOptions(port=grpc_port, grace_period=5.0, metrics_port=metrics), stall_s=30.0)


# ------------------------------------------------- the protocol, in one process (fast)
class _Store:
    """The key-value store's methods StepChannel uses, in memory."""

    def __init__(self):
        self.data: dict[str, bytes] = {}

    def key_value_set_bytes(self, key, value, allow_overwrite=False):
        assert allow_overwrite or key not in self.data, key
        self.data[key] = value

    def blocking_key_value_get_bytes(self, key, timeout_in_ms):
        if key not in self.data:
            raise RuntimeError("DEADLINE_EXCEEDED: no such key yet")
        return self.data[key]

    def key_value_try_get_bytes(self, key):
        if key not in self.data:
            raise RuntimeError("NOT_FOUND")
        return self.data[key]

    def key_value_delete(self, key):
        self.data.pop(key, None)


class _Recorder:
    """A StepRunner that records what it is asked to run (and can fail one call)."""

    cfg = type("Cfg", (), {"vocab_size": 259, "eos_ids": ()})()
    num_slots, max_len, max_prefill_rows = 4, 64, 4
    reuses_prefix, prefix_key_tokens, lookahead, prefill_chunk, decode_steps = True, 0, 0, None, 1

    def __init__(self, fail_on: str | None = None, kb: int = 0):
        self.calls, self.fail_on, self.kb = [], fail_on, kb

    def _log(self, *entry):
        self.calls.append(entry)
        if entry[0] == self.fail_on:
            raise RuntimeError(f"{entry[0]} failed")

    def prefill_batch(self, chunks, slots):
        self._log("prefill_batch", [(c.slot, c.request.prompt_ids, c.start, c.end) for c in chunks],
                  slots.temperature.tolist())
        return [7] * len(chunks)

    def decode(self, slots, plan):
        from jaxspec.engine.step import StepResult

        self._log("decode", plan.slots.tolist(), slots.last_token.tolist(), slots.num_generated.tolist())
        import dataclasses

        # kb: the proposal length this replica ran
        return dataclasses.replace(StepResult.plain(plan.slots, [8] * len(plan.slots)), kb=self.kb)

    def release(self, slot):
        self._log("release", slot)

    def assign_pages(self, slot, pages):
        self._log("assign_pages", slot, pages)

    def speculation(self):
        return None

    def paging(self):
        return None

    def padded_length(self, n):
        return 16


def _pair(store, ack_every=2):
    from jaxspec.distributed import StepChannel

    lead = StepChannel(store, num_processes=2, process_id=0, ack_every=ack_every)
    return lead, StepChannel(store, num_processes=2, process_id=1, ack_every=ack_every)


def test_follower_replays_the_leaders_calls_and_stops():
    from jaxspec.engine import Engine
    from jaxspec.sampling import SamplingParams
    from jaxspec.tokenizer import ByteTokenizer
    from serving.multihost import BroadcastingRunner, follow

    store = _Store()
    lead_ch, follow_ch = _pair(store)
    leader, replica = _Recorder(), _Recorder()
    runner = BroadcastingRunner(leader, lead_ch)
    assert runner.pipelined is False
    engine = Engine(runner, ByteTokenizer(), eos_ids=[], overlap=True)
    assert not engine.overlap  # the engine's overlap mode stays off for a broadcasting runner
    engine.generate([[1, 2, 3], [4, 5]], [SamplingParams(max_tokens=3, temperature=0.5),
                                          SamplingParams(max_tokens=2, temperature=0.0)])
    runner.stop()
    assert follow(replica, follow_ch, idle_timeout_s=5) == 0
    assert replica.calls == leader.calls and len(leader.calls) >= 4


def test_follower_health_counts_replayed_calls_and_the_leaders_heartbeat():
    from jaxspec.engine.slots import SlotTable
    from jaxspec.engine.step import DecodePlan
    from serving.follower_health import FollowerStatus
    from serving.multihost import BroadcastingRunner, follow

    lead_ch, follow_ch = _pair(_Store())
    runner = BroadcastingRunner(_Recorder(), lead_ch)
    for _ in range(3):
        runner.decode(SlotTable(4), DecodePlan.plain(np.array([0])))
    runner.release(0)
    time.sleep(1.5)  # the leader's watchdog beats once a second
    runner.stop()
    status = FollowerStatus(1)
    assert not status.healthy() and status.health()["state"] == "LOADING"
    seen = []

    class Probed(_Recorder):  # what the health endpoint says while a call replays
        def release(self, slot):
            seen.append(status.health())

    assert follow(Probed(), follow_ch, idle_timeout_s=5, status=status) == 0
    h = status.health()
    assert h["state"] == "STOPPED" and h["status"] == "NOT_SERVING"  # the job is over
    assert (h["replayed_calls"], h["last_record"]) == (4, 4) and h["seconds_since_last_call"] >= 0
    assert status.calls.labels("decode")._value.get() == 3 and status.calls.labels("release")._value.get() == 1
    assert lead_ch.beat_of(0) is not None  # the leader beat, and the follower saw it while following
    assert [(s["state"], s["status"], s["replayed_calls"]) for s in seen] == [("FOLLOWING", "SERVING", 3)]


def test_follower_health_endpoint_reports_a_silent_leader():
    import json as _json
    import urllib.error
    import urllib.request

    from serving import follower_health
    from serving.follower_health import FOLLOWING, FollowerStatus

    now = [100.0]
    status = FollowerStatus(3, clock=lambda: now[0])
    port = status.serve_http("127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}"
    try:
        with pytest.raises(urllib.error.HTTPError) as loading:
            urllib.request.urlopen(f"{url}/health", timeout=5)
        assert loading.value.code == 503 and _json.loads(loading.value.read())["state"] == "LOADING"
        status.set_state(FOLLOWING)
        status.leader_beat(7)
        status.replayed("decode", 12, 0.25, ok=True)
        status.replayed("decode", 13, 0.5, ok=False)
        status.decoded(2)
        now[0] += 2.0
        body = _json.loads(urllib.request.urlopen(f"{url}/health", timeout=5).read())
        assert body == {"status": "SERVING", "state": "FOLLOWING", "process_id": 3, "replayed_calls": 2,
                        "last_record": 13, "decode_steps_by_kb": {"2": 1}, "seconds_since_last_call": 2.0,
                        "leader_heartbeat_age_s": 2.0}
        metrics = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
        for line in ('jaxspec_follower_replayed_calls_total{call="decode"} 2.0',
                     'jaxspec_follower_failed_calls_total{call="decode"} 1.0', "jaxspec_follower_last_record 13.0",
                     "jaxspec_follower_last_call_duration_seconds 0.5",
                     "jaxspec_follower_leader_heartbeat_age_seconds 2.0", "jaxspec_follower_up 1.0",
                     'jaxspec_follower_decode_steps_total{kb="2"} 1.0'):
            assert line in metrics, line
        now[0] += follower_health.LEADER_SILENT_S  # the leader's count stopped moving
        status.leader_beat(7)
        with pytest.raises(urllib.error.HTTPError) as silent:
            urllib.request.urlopen(f"{url}/health", timeout=5)
        assert silent.value.code == 503 and _json.loads(silent.value.read())["leader_heartbeat_age_s"] == 12.0
        assert "jaxspec_follower_up 0.0" in urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    finally:
        status.shutdown()


def test_records_every_follower_acknowledged_are_deleted():
    store = _Store()
    lead, follower = _pair(store, ack_every=2)
    for i in range(2):
        lead.publish(b"%d" % i)
    assert [follower.receive(timeout_s=1) for _ in range(2)] == [b"0", b"1"]
    follower.ack()  # every 2nd record
    lead.publish(b"2")
    lead.publish(b"3")  # the 4th record prunes what the follower acknowledged
    assert sorted(k for k in store.data if k.startswith("jaxspec/step/")) == ["jaxspec/step/3", "jaxspec/step/4"]
    assert follower.receive(timeout_s=1) == b"2"
    with pytest.raises(TimeoutError):
        _pair(store)[1].receive(timeout_s=0.1, poll_s=0.05)  # record 1 is gone: a late joiner waits


def test_follower_that_fails_a_call_the_leader_ran_exits_non_zero():
    from serving.multihost import EXIT_DIVERGED, BroadcastingRunner, follow
    from jaxspec.engine.slots import SlotTable
    from jaxspec.engine.step import DecodePlan

    lead_ch, follow_ch = _pair(_Store())
    runner = BroadcastingRunner(_Recorder(), lead_ch)
    runner.decode(SlotTable(4), DecodePlan.plain(np.array([0])))
    runner.release(0)
    assert follow(_Recorder(fail_on="decode"), follow_ch, idle_timeout_s=5) == EXIT_DIVERGED


def test_a_follower_whose_decode_ran_another_kb_exits_non_zero():
    """Each record carries what the leader's previous decode ran (kb, tokens); a follower that ran
    another proposal length there exits at the next record."""
    from jaxspec.engine.slots import SlotTable
    from jaxspec.engine.step import DecodePlan
    from serving.follower_health import FollowerStatus
    from serving.multihost import EXIT_DIVERGED, BroadcastingRunner, follow

    for replica_kb, want in ((2, 0), (0, EXIT_DIVERGED)):
        lead_ch, follow_ch = _pair(_Store())
        runner = BroadcastingRunner(_Recorder(kb=2), lead_ch)
        runner.decode(SlotTable(4), DecodePlan.plain(np.array([0])))
        runner.stop()  # the stop record carries the last decode's summary too
        assert dict(runner.decode_kb) == {2: 1}
        status = FollowerStatus(1)
        assert follow(_Recorder(kb=replica_kb), follow_ch, idle_timeout_s=5, status=status) == want
        assert status.health()["decode_steps_by_kb"] == {str(replica_kb): 1}


def test_adaptive_cost_measurement_outside_warmup_is_replayed_by_followers():
    """Without warm-up, adaptive k measures a batch bucket's costs when it first plans there: the
    leader publishes that measurement (timed steps on the mesh) as a call, the follower runs the
    same steps, then every decode with the kb the leader chose (its kb and tokens checked)."""
    from jaxspec.engine import Engine
    from jaxspec.engine.factory import make_runner
    from jaxspec.loading import load_any
    from jaxspec.sampling import SamplingParams
    from jaxspec.tokenizer import ByteTokenizer
    from serving.follower_health import FollowerStatus
    from jaxspec.speculative.adaptive import KPolicy
    from serving.multihost import BroadcastingRunner, decode_record, follow

    model, _ = load_any(MODEL, seed=0)
    build = lambda: make_runner(model, num_slots=2, max_len=32, spec_method="ngram",  # noqa: E731
                                num_speculative_tokens="auto", k_max=2)
    store = _Store()
    lead_ch, follow_ch = _pair(store, ack_every=10_000)  # keep every record to read them back
    leader_inner = build()
    leader_inner.policy = KPolicy(leader_inner.buckets, probe_every=1)  # probes: kb > 0 steps for sure
    # Plan without asking the lookup first (this model's outputs never repeat a token, so every
    # lookup finds nothing): the probes are planned kb > 0 and the lookups then run kb = 0.
    leader_inner.spec.would_propose = None
    leader = BroadcastingRunner(leader_inner, lead_ch)
    engine = Engine(leader, ByteTokenizer(), eos_ids=[])
    # 12 tokens: a batch bucket's first steps are plain until their period is known (_plain_first).
    engine.generate([[3, 4, 5, 3, 4, 5, 3, 4]], SamplingParams(max_tokens=12, temperature=0.0))
    leader.stop()
    records = [decode_record(store.data[f"jaxspec/step/{i}"]) for i in range(1, lead_ch.seq + 1)]
    calls = [r["call"] for r in records]
    assert "measure_costs" in calls and "warmup" not in calls
    # The leader's policy drafted (its plan's kb > 0); a lookup that found nothing ran kb = 0 instead.
    planned = [r["args"]["plan"][2] for r in records if r["call"] == "decode"]
    assert any(kb > 0 for kb in planned), planned
    assert calls.index("measure_costs") < calls.index("decode")
    status = FollowerStatus(1)
    replica = build()
    assert follow(replica, follow_ch, idle_timeout_s=5, status=status) == 0
    assert status.calls.labels("measure_costs")._value.get() == 1
    assert status.health()["decode_steps_by_kb"] == {str(kb): n for kb, n in sorted(leader.decode_kb.items())}
    assert not replica.spec.cost_models  # the follower plans nothing: its timings were dropped
    assert leader_inner.spec.cost_models


def test_a_call_both_sides_fail_is_not_divergence():
    import threading

    from jaxspec.engine.slots import SlotTable
    from jaxspec.engine.step import DecodePlan
    from serving.multihost import BroadcastingRunner, _beat, follow

    lead_ch, follow_ch = _pair(_Store())
    lost, done = [], threading.Event()
    beater = threading.Thread(target=_beat, args=(follow_ch, done), daemon=True)
    beater.start()  # the follower is alive: the failure is the call's own
    runner = BroadcastingRunner(_Recorder(fail_on="release"), lead_ch, on_lost=lost.append)
    try:
        with pytest.raises(RuntimeError, match="release failed"):
            runner.release(1)
        runner.decode(SlotTable(4), DecodePlan.plain(np.array([0])))  # the job carries on
    finally:
        done.set()
    runner.stop()
    assert follow(_Recorder(fail_on="release"), follow_ch, idle_timeout_s=5) == 0
    assert not lost


def test_a_failed_call_with_a_silent_follower_loses_the_job():
    from serving.multihost import BroadcastingRunner, FollowerLost

    lead_ch, follow_ch = _pair(_Store())
    follow_ch.beat(0)  # one beat, then silence: the follower died
    lost = []
    runner = BroadcastingRunner(_Recorder(fail_on="decode"), lead_ch, dead_after_s=0.5, on_lost=lost.append)
    from jaxspec.engine.slots import SlotTable
    from jaxspec.engine.step import DecodePlan

    with pytest.raises(FollowerLost, match=r"follower process\(es\) \[1\] left the job during decode"):
        runner.decode(SlotTable(4), DecodePlan.plain(np.array([0])))
    assert len(lost) == 1
    with pytest.raises(FollowerLost):  # nothing runs any more, nothing is published
        runner.release(0)
    assert lead_ch.seq == 1


def test_distributed_arguments_are_checked_before_anything_starts():
    import argparse

    from jaxspec import distributed
    from jaxspec.startup import multiprocess_requested

    p = argparse.ArgumentParser()
    distributed.add_arguments(p)
    assert not distributed.wanted(p.parse_args([]))
    assert distributed.wanted(p.parse_args(["--coordinator", "h:1", "--num-processes", "2", "--process-id", "1"]))
    with pytest.raises(distributed.DistributedError, match="--num-processes and --process-id"):
        distributed.initialize("h:1", None, None)
    with pytest.raises(distributed.DistributedError, match="outside 0..1"):
        distributed.initialize("h:1", 2, 2)
    assert multiprocess_requested(["--coordinator=h:1"]) and not multiprocess_requested(["--model", "x"])


@pytest.mark.parametrize("mesh", [None, "cpu-8"])
def test_a_job_needs_a_mesh_over_all_its_devices(mesh, caplog):
    from jaxspec.distributed import ProcessInfo
    from serving.build import EngineOptions
    from serving.multihost import run
    from serving.server import ServerOptions

    job = ProcessInfo(process_id=1, num_processes=2, local_devices=8, global_devices=16)  # cpu-8 covers 8 of 16
    assert run(job, EngineOptions(model=MODEL, mesh=mesh), ServerOptions()) == 2
    assert "needs --mesh over all 16 devices" in caplog.text


@pytest.mark.parametrize("mesh", ["tpu-v5e-16", "tpu-v5p-32", "gpu-2x8xh100"])
def test_multihost_meshes_span_16_devices_and_split_mixtral(mesh):
    from jaxspec.config import load_config
    from jaxspec.mesh import load_mesh_config

    cfg, model = load_mesh_config(mesh), load_config("mixtral-8x7b")
    assert cfg.num_devices == 16
    # Every weight dimension the rules split divides evenly (nothing silently stays replicated).
    assert model.num_experts % cfg.axes["expert"] == 0 and model.moe_mlp_dim % cfg.axes["tensor"] == 0
    assert model.num_kv_heads % cfg.axes["tensor"] == 0


# ------------------------------------------------------------------------------ the tests
class _Job:
    """Two worker processes, killed in any case when the test ends."""

    def __init__(self, tmp_path: Path, mode: str, *args: str):
        root = Path(__file__).resolve().parents[1]
        import jax
        from helpers import xla_flags

        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(4),
               "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
        # The run's compilation cache: these jobs compile the same steps (each one, in two processes).
        if jax.config.jax_compilation_cache_dir:
            env[_CACHE_ENV] = str(jax.config.jax_compilation_cache_dir)
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


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["none", "draft", "paged"])
def test_two_processes_generate_what_one_process_does(tmp_path, spec):
    out = tmp_path / "leader.json"
    job = _Job(tmp_path, "worker", str(free_port()), str(out), spec)
    try:
        codes = job.wait(TIMEOUT_S)  # a hang fails the test instead of blocking the suite
    finally:
        job.kill()
    assert codes == [0, 0], f"exit codes {codes}\n{job.tails()}"
    got = json.loads(out.read_text())

    # The reference: this process (8 virtual devices, see conftest), same config, weights and mesh.
    want, drafts = _generate(_build_runner(spec))
    assert got["tokens"] == want and got["drafts"] == drafts
    assert all(len(t) == MAX_TOKENS for t in want)
    if spec == "draft":  # drafts were verified, and the draft's other weights were not always right
        assert 0 < drafts[1] < drafts[0], drafts
    # Every prefill and decode went through the channel: a prefill, each request's release, the
    # stop record, and (plain decoding) MAX_TOKENS - 1 decode steps at least.
    assert got["calls"] >= 1 + len(PROMPTS) + 1 + (1 if spec == "draft" else MAX_TOKENS - 1)


def _settled_health(port: int, timeout: float = 30.0) -> dict:
    """The follower's /health once its replayed calls stop moving: the leader may still queue a step
    ahead after the last reply (the engine's overlap), which the follower replays a moment later."""
    read = lambda: json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).read())  # noqa: E731
    health, deadline = read(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        again = read()
        if again["replayed_calls"] == health["replayed_calls"]:
            return again
        health = again
    raise AssertionError(f"the follower's replayed calls kept moving: {health}")


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

    grpc_port, metrics_port = free_port(), free_port()
    job = _Job(tmp_path, "serve", str(free_port()), str(grpc_port), str(metrics_port))
    try:
        with JaxSpecClient(f"127.0.0.1:{grpc_port}", timeout=TIMEOUT_S) as client:
            _wait_serving(client, job, TIMEOUT_S)
            got = [list(client.generate(p, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True).token_ids)
                   for p in PROMPTS]
        # The follower's own endpoint: it replayed every decode step of both requests.
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/health", timeout=10).read())
        assert health["status"] == "SERVING" and health["process_id"] == 1, health
        assert health["leader_heartbeat_age_s"] < 5 and health["replayed_calls"] >= len(PROMPTS) * MAX_TOKENS
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        decodes = re.search(r'jaxspec_follower_replayed_calls_total\{call="decode"\} ([\d.]+)', metrics)
        assert decodes and float(decodes.group(1)) >= len(PROMPTS) * (MAX_TOKENS - 1), metrics
        job.procs[0].send_signal(signal.SIGTERM)  # the leader drains, then stops the follower
        codes = job.wait(120)
        assert codes == [0, 0], f"exit codes {codes}\n{job.tails()}"
    finally:
        job.kill()
    assert got == _serve_reference()


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["draft", "ngram"])
def test_leader_serves_speculative_decoding_with_adaptive_k(tmp_path, spec):
    """The serving default for a draft model (and prompt lookup): adaptive k. The leader's warm-up
    measures the step costs (the follower replays the timed steps), the leader's policy alone picks
    each step's kb, and the follower runs exactly that kb: its decode steps by kb equal the leader's
    (each record also checks the previous decode's kb and tokens). Greedy tokens through the
    leader's gRPC port equal a single-process 8-device run of the same options. The requests are
    long enough that, whatever costs this machine measures, the policy's probes run kb > 0 steps."""
    from serving.client import JaxSpecClient

    _save_models(tmp_path)
    grpc_port, metrics_port = free_port(), free_port()
    job = _Job(tmp_path, "serve-spec", str(free_port()), str(grpc_port), str(metrics_port), str(tmp_path), spec)
    try:
        with JaxSpecClient(f"127.0.0.1:{grpc_port}", timeout=TIMEOUT_S) as client:
            _wait_serving(client, job, TIMEOUT_S)
            got = [list(client.generate(p, max_tokens=SPEC_TOKENS, temperature=0.0, ignore_eos=True).token_ids)
                   for p in PROMPTS]
        health = _settled_health(metrics_port)
        job.procs[0].send_signal(signal.SIGTERM)
        codes = job.wait(120)
        assert codes == [0, 0], f"exit codes {codes}\n{job.tails()}"  # 4: the follower diverged
    finally:
        job.kill()
    leader_log = job.logs[0].read_text()
    assert "warm-up compiled every shape" in leader_log
    ran = re.search(r"decode steps by proposal length kb: (\{.*\})", leader_log)
    assert ran, job.tails()
    leader_kb = {str(kb): n for kb, n in sorted(ast.literal_eval(ran.group(1)).items())}
    assert health["decode_steps_by_kb"] == leader_kb, (health, leader_kb)
    assert sum(leader_kb.values()) >= len(PROMPTS) * (SPEC_TOKENS - 1) // (1 + max(map(int, leader_kb)))
    assert any(int(kb) > 0 for kb in leader_kb), leader_kb  # steps that verified drafts were replayed

    # The reference: this process, 8 devices, the same directories and options (adaptive k, its
    # costs measured here when first needed); each prompt alone, as the client sent them.
    from serving.build import load_engine
    from jaxspec.sampling import SamplingParams

    engine = load_engine(_spec_options(tmp_path, spec)).engine
    want = [engine.generate([p], SamplingParams(max_tokens=SPEC_TOKENS, temperature=0.0))[0].token_ids
            for p in PROMPTS]
    assert got == want and all(len(t) == SPEC_TOKENS for t in want)


@pytest.mark.slow
def test_follower_killed_fails_requests_and_the_leader_exits_non_zero(tmp_path):
    import grpc

    from serving.client import JaxSpecClient
    from serving.multihost import EXIT_FOLLOWER_LOST
    from serving.pb import jaxspec_pb2 as pb

    grpc_port = free_port()
    job = _Job(tmp_path, "serve", str(free_port()), str(grpc_port))
    failures = []
    try:
        with JaxSpecClient(f"127.0.0.1:{grpc_port}", timeout=TIMEOUT_S) as client:
            _wait_serving(client, job, TIMEOUT_S)
            # Killed after the first streamed token; should the request win the race and finish, the
            # next one meets the dead follower instead.
            for attempt in range(2):
                try:
                    for i, msg in enumerate(client.generate_stream(PROMPTS[0], max_tokens=MAX_LEN - 8,
                                                                   temperature=0.0, ignore_eos=True)):
                        if i == 0 and attempt == 0:
                            job.procs[1].kill()
                        if msg.finished and msg.finish_reason != pb.FINISH_REASON_LENGTH:
                            failures.append(msg.finish_reason)
                except grpc.RpcError as e:
                    failures.append(e.code())
                if failures:
                    break
        codes = job.wait(180)
        assert codes[0] == EXIT_FOLLOWER_LOST, f"exit codes {codes}\n{job.tails()}"
    finally:
        job.kill()
    assert failures, "no request failed after the follower died"
    assert "follower process(es) [1]" in job.logs[0].read_text()


if __name__ == "__main__" and len(sys.argv) >= 2 and sys.argv[1] in ("worker", "serve", "serve-spec"):
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if os.environ.get(_CACHE_ENV):
        from serving.build import enable_compilation_cache

        enable_compilation_cache(os.environ[_CACHE_ENV])
    if sys.argv[1] == "worker":
        sys.exit(_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]))
    if sys.argv[1] == "serve-spec":
        sys.exit(_serve_spec_worker(*(int(a) for a in sys.argv[2:6]), sys.argv[6], sys.argv[7]))
    sys.exit(_serve_worker(*(int(a) for a in sys.argv[2:])))
