"""Checkpoint loading reads only each host's shards.

A model directory loaded onto a mesh is read per shard (``orbax_io.read_sharded``): every
tensorstore read is recorded here and must be exactly the distinct boxes the process's own devices
hold, each once, and the loaded arrays must equal a whole load. In one process (8 virtual CPU
devices, see conftest) that is every device's shard; in a 2-process job (2 x 4 CPU devices, gloo)
each process reads only its half of the expert weights, and the engine both processes build from
the directories with ``serving.build.load_engine`` (target and draft) generates the same greedy
tokens as one process. A Hugging Face folder: each process reads only its own experts' tensors
(every other tensor whole).

This file is also the worker both processes run (``python tests/test_multihost_loading.py worker ...``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ports import free_port

PROMPTS = [[5, 17, 42, 99, 7], [200, 3, 3, 80], list(range(30, 52))]
MAX_TOKENS = 8
SLOTS, MAX_LEN = 4, 64
TIMEOUT_S = 480
# data 1: no host holds a whole replica, so each process's expert weights are half the model's.
EP4_TP2 = {"platform": "cpu", "axes": {"data": 1, "expert": 4, "tensor": 2}, "rules": "ep_tp",
           "description": "tests: 4 experts x 2 tensor shards over 8 CPU devices, weights not replicated"}


# ---------------------------------------------------------------------------- helpers
class ReadLog:
    """Records every box ``orbax_io.read_sharded`` reads: {params dir: {array path: [box, ...]}}
    and the bytes read; and every tensor a Hugging Face folder's load reads."""

    def __init__(self):
        self.boxes: dict[str, dict[tuple, list]] = {}
        self.nbytes: dict[str, int] = {}
        self.tensors: list[str] = []  # Hugging Face safetensors read (by name)

    def install(self, setattr_) -> None:
        from jaxspec.checkpoint import orbax_io

        read_sharded, read_box = orbax_io.read_sharded, orbax_io.read_box
        current: list[str] = []

        def recording_read_sharded(params_dir, target):
            current[:] = [Path(params_dir).parent.name]
            self.boxes.setdefault(current[0], {})
            self.nbytes.setdefault(current[0], 0)
            return read_sharded(params_dir, target)

        def recording_read_box(store, box, path=None):
            self.boxes[current[0]].setdefault(path, []).append(box)
            future = read_box(store, box, path)
            result = future.result()  # (done reading; the caller's .result() is then immediate)
            self.nbytes[current[0]] += result.nbytes
            return future

        setattr_(orbax_io, "read_sharded", recording_read_sharded)
        setattr_(orbax_io, "read_box", recording_read_box)

        from jaxspec.checkpoint import hf_loader

        read_tensor = hf_loader.SafetensorsFiles.read

        def recording_read_tensor(files, name):
            self.tensors.append(name)
            return read_tensor(files, name)

        setattr_(hf_loader.SafetensorsFiles, "read", recording_read_tensor)

    def to_json(self) -> dict:
        return {"nbytes": self.nbytes, "tensors": self.tensors,
                "boxes": {d: {".".join(p): b for p, b in arrays.items()} for d, arrays in self.boxes.items()}}


def _save_pair(root: Path) -> tuple[Path, Path, Path]:
    """The scaled tiny MoE target and draft of tests/test_multihost.py saved as model directories,
    and the EP4_TP2 mesh config."""
    from helpers import scaled_model
    from jaxspec.checkpoint import save_model
    from jaxspec.tokenizer import ByteTokenizer

    target = save_model(root / "target", scaled_model("tiny-moe", scale=3.0), ByteTokenizer())
    draft = save_model(root / "draft", scaled_model("tiny-moe", scale=2.0), ByteTokenizer())
    mesh = root / "cpu-ep4-tp2.json"
    mesh.write_text(json.dumps(EP4_TP2))
    return target, draft, mesh


def _build_hf_moe(directory: Path):
    """A tiny Qwen2-MoE (4 experts, a shared expert, a dense layer) saved by transformers."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_hf_checkpoints import _build_hf

    _build_hf("qwen2_moe", directory, seed=8)
    return directory


def _expert_reads(tensors: list[str]) -> dict[str, set[int]]:
    """{HF expert weight name with the expert index as *: experts read}."""
    import re

    out: dict[str, set[int]] = {}
    for name in tensors:
        m = re.match(r"(.*\.experts\.)(\d+)(\..*)", name)
        if m:
            out.setdefault(m.group(1) + "*" + m.group(3), set()).add(int(m.group(2)))
    return out


def _engine_options(target: Path, draft: Path, mesh: Path):
    from serving.build import EngineOptions

    return EngineOptions(model=str(target), draft=str(draft), spec_method="draft", num_speculative_tokens=2,
                         adaptive_k=False, mesh=str(mesh), slots=SLOTS, max_len=MAX_LEN, kernel_selftest=False)


def _load_runner(opts, wrap=None):
    """``load_engine(opts)``'s step runner, before the engine's wrapping (``wrap`` sees it first),
    and its tokenizer."""
    from serving.build import load_engine

    holder = []

    def keep(runner):
        holder.append(runner)
        return wrap(runner) if wrap is not None else runner

    bundle = load_engine(opts, keep)
    return holder[0], bundle.tokenizer


def _generate(runner, tokenizer) -> tuple[list[list[int]], list[int]]:
    from jaxspec.engine import Engine
    from jaxspec.sampling import SamplingParams

    engine = Engine(runner, tokenizer, eos_ids=[])
    done = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    stats = engine.spec_stats
    return [c.token_ids for c in done], [stats.num_draft_tokens, stats.num_accepted_tokens] if stats else [0, 0]


def _expected_boxes(sharding, shape, devices=None) -> set:
    """The distinct boxes of ``shape`` that ``devices`` (default: this process's) hold."""
    from jaxspec.checkpoint.orbax_io import _box

    indices = sharding.devices_indices_map(shape)
    devices = sharding.addressable_devices if devices is None else devices
    return {_box(indices[d], shape) for d in devices}


def _flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, (*prefix, str(k))) if isinstance(v, dict) else {(*prefix, str(k)): v})
    return out


# ------------------------------------------------------------------ one process, 8 devices
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_each_device_reads_only_its_shard_and_the_load_equals_a_whole_one(tmp_path, monkeypatch, quantize):
    import jax
    from flax import nnx

    from helpers import scaled_model
    from jaxspec.checkpoint import load_model, save_model
    from jaxspec.mesh import load_mesh_config, placement_for_mesh
    from jaxspec.models.quant import quantize_model
    from jaxspec.tokenizer import ByteTokenizer

    model = scaled_model("tiny-moe", scale=3.0)
    if quantize:
        model = quantize_model(model, quantize)
    save_model(tmp_path / "m", model, ByteTokenizer())
    whole, _ = load_model(tmp_path / "m")  # one device: every array read whole
    (tmp_path / "mesh.json").write_text(json.dumps(EP4_TP2))
    placement = placement_for_mesh(load_mesh_config(tmp_path / "mesh.json"))

    log = ReadLog()
    log.install(monkeypatch.setattr)
    sharded, _ = load_model(tmp_path / "m", mesh=placement.mesh, rules=placement.rules)
    reads = log.boxes["m"]

    want = _flat(nnx.to_pure_dict(nnx.state(sharded)))
    shardings = _flat(nnx.to_pure_dict(placement.state_shardings(nnx.state(whole))))
    assert set(reads) == set(want)
    split = 0
    for path, array in want.items():
        assert array.sharding == shardings[path], path
        boxes = _expected_boxes(array.sharding, array.shape)
        # Exactly the devices' distinct boxes, each read once: no whole read of a split array.
        assert sorted(reads[path]) == sorted(boxes), path
        split += len(boxes) > 1
        for shard in array.addressable_shards:  # each device got its own box's values
            assert shard.data.shape == array.sharding.shard_shape(array.shape)
    assert split >= 8, "the expert and tensor-parallel weights are split"
    for a, b in zip(jax.tree.leaves(nnx.state(whole)), jax.tree.leaves(nnx.state(sharded))):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Bytes read: each distinct shard once, far less than every device reading the whole model.
    whole_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(whole)))
    assert log.nbytes["m"] == sum(
        int(np.prod([b - a for a, b in box])) * arr.dtype.itemsize
        for arr in want.values() for box in _expected_boxes(arr.sharding, arr.shape))
    assert log.nbytes["m"] < 8 * whole_bytes

    # A read window smaller than any array: one array's boxes in flight at a time, same result.
    from jaxspec.checkpoint import orbax_io

    monkeypatch.setattr(orbax_io, "READ_WINDOW_BYTES", 1)
    again, _ = load_model(tmp_path / "m", mesh=placement.mesh, rules=placement.rules)
    for a, b in zip(jax.tree.leaves(nnx.state(sharded)), jax.tree.leaves(nnx.state(again))):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_one_hosts_devices_read_only_their_shards(tmp_path, monkeypatch):
    """What one of two 4-device hosts reads: ``read_sharded`` of a target whose shardings span
    8 devices, asked only for the boxes of devices 0-3 (as ``addressable_devices_indices_map``
    answers on that host), reads the expert weights of experts 0 and 1 only."""
    import jax
    from flax import nnx

    from helpers import scaled_model
    from jaxspec.checkpoint import orbax_io, save_model
    from jaxspec.mesh import load_mesh_config, placement_for_mesh
    from jaxspec.tokenizer import ByteTokenizer

    model = scaled_model("tiny-moe", scale=3.0)
    save_model(tmp_path / "m", model, ByteTokenizer())
    (tmp_path / "mesh.json").write_text(json.dumps(EP4_TP2))
    placement = placement_for_mesh(load_mesh_config(tmp_path / "mesh.json"))
    state = nnx.state(model)
    shardings = placement.state_shardings(state)
    host = set(jax.devices()[:4])
    monkeypatch.setattr(orbax_io, "shard_boxes", lambda sharding, shape: {
        d: orbax_io._box(i, shape) for d, i in sharding.devices_indices_map(shape).items() if d in host})
    log = ReadLog()
    log.install(monkeypatch.setattr)
    target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                          nnx.to_pure_dict(state), nnx.to_pure_dict(shardings))
    # Only the boxes asked for are read; building arrays over all 8 devices then needs the rest,
    # which this "host" does not have: make_array_from_callback fails, and read_sharded says None.
    with pytest.raises(KeyError):
        orbax_io.read_sharded(tmp_path / "m" / "params", target)
    reads = log.boxes["m"]
    flat_target = _flat(target)
    total = sum(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in flat_target.values())
    for path, t in flat_target.items():
        assert sorted(reads[path]) == sorted(_expected_boxes(t.sharding, tuple(t.shape), host)), path
    moe = [p for p in flat_target if "moe" in ".".join(p) and "router" not in ".".join(p)]
    assert moe and all(len(flat_target[p].shape) == 3 for p in moe)
    for p in moe:  # experts 0 and 1 of 4
        assert {box[0] for box in reads[p]} <= {(0, 1), (1, 2)}, (p, reads[p])
    assert log.nbytes["m"] < total


def test_load_engine_reads_target_and_draft_into_their_placements(tmp_path, monkeypatch):
    """``load_engine`` builds the mesh before reading: the target and the draft directories are
    read per shard, straight into the shardings the runner and the draft proposer use (the draft,
    small, replicated: each of its arrays read once, whole)."""
    import jax

    from jaxspec.checkpoint.orbax_io import _box

    target, draft, mesh = _save_pair(tmp_path)
    log = ReadLog()
    log.install(monkeypatch.setattr)
    runner, _ = _load_runner(_engine_options(target, draft, mesh))
    assert set(log.boxes) == {"target", "draft"}
    t_state = runner.target.state
    for path, array in _flat(t_state).items():  # runners hold their parameters as a nested dict
        assert sorted(log.boxes["target"][path]) == sorted(_expected_boxes(array.sharding, array.shape)), path
    proposer = runner.proposer
    d_state = proposer.state
    for path, array in _flat(d_state).items():
        assert array.sharding.is_fully_replicated
        assert log.boxes["draft"][path] == [_box((slice(None),) * array.ndim, array.shape)], path
    assert log.nbytes["target"] < 8 * sum(x.nbytes for x in jax.tree.leaves(t_state))


def test_hf_folder_reads_each_expert_once_and_one_host_only_its_experts(tmp_path, monkeypatch):
    """A Hugging Face folder onto the mesh: every expert tensor read once (not once per device)
    and the model equals a one-device load; as one host of two (devices 0-3), only experts 0
    and 1 are read."""
    import jax
    from flax import nnx

    from jaxspec.checkpoint import load_hf, orbax_io
    from jaxspec.mesh import load_mesh_config, placement_for_mesh

    hf = _build_hf_moe(tmp_path / "hf")
    whole, _ = load_hf(hf, dtype="float32")
    (tmp_path / "mesh.json").write_text(json.dumps(EP4_TP2))
    placement = placement_for_mesh(load_mesh_config(tmp_path / "mesh.json"))
    log = ReadLog()
    log.install(monkeypatch.setattr)
    sharded, _ = load_hf(hf, dtype="float32", mesh=placement.mesh, rules=placement.rules)
    assert len(log.tensors) == len(set(log.tensors))
    experts = _expert_reads(log.tensors)
    assert experts and all(e == {0, 1, 2, 3} for e in experts.values()), experts
    for a, b in zip(jax.tree.leaves(nnx.state(whole)), jax.tree.leaves(nnx.state(sharded))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    w = sharded.layers[0].moe.w_gate[...]
    assert w.sharding.spec[0] == "expert" and w.addressable_shards[0].data.shape[0] == 1

    log.tensors.clear()
    host = set(jax.devices()[:4])
    monkeypatch.setattr(orbax_io, "shard_boxes", lambda sharding, shape: {
        d: orbax_io._box(i, shape) for d, i in sharding.devices_indices_map(shape).items() if d in host})
    with pytest.raises(KeyError):  # the other host's experts are not here to build the global array
        load_hf(hf, dtype="float32", mesh=placement.mesh, rules=placement.rules)
    experts = _expert_reads(log.tensors)
    assert experts and all(e == {0, 1} for e in experts.values()), experts


# --------------------------------------------------------------- 2 processes x 4 devices
def _job_options(root: Path, kind: str):
    """What both processes (and the one-process reference) load: "orbax": the target and draft
    model directories (speculative, k = 2); "hf": the Hugging Face Qwen2-MoE folder (plain)."""
    from serving.build import EngineOptions

    mesh = root / "cpu-ep4-tp2.json"
    if kind == "orbax":
        return _engine_options(root / "target", root / "draft", mesh)
    return EngineOptions(model=str(root / "hf"), dtype="float32", mesh=str(mesh), slots=SLOTS, max_len=MAX_LEN,
                         kernel_selftest=False)


def _worker(process_id: int, port: int, out: str, root: str, kind: str) -> int:
    import jax

    from jaxspec import distributed

    info = distributed.initialize(f"127.0.0.1:{port}", 2, process_id, timeout_s=120)
    jax.config.update("jax_default_matmul_precision", "highest")
    assert info.global_devices == 8 and info.local_devices == 4, info

    class _Patch:
        def setattr(self, obj, name, value):
            setattr(obj, name, value)

    log = ReadLog()
    log.install(_Patch().setattr)
    from serving.multihost import BroadcastingRunner, follow

    channel = distributed.StepChannel()
    opts = _job_options(Path(root), kind)
    if not info.is_leader:
        runner, _ = _load_runner(opts)
        Path(f"{out}.p{process_id}.json").write_text(json.dumps({"reads": log.to_json()}))
        return follow(runner, channel, idle_timeout_s=TIMEOUT_S)
    leaders: list = []
    _, tokenizer = _load_runner(opts, wrap=lambda r: leaders.append(BroadcastingRunner(r, channel)) or leaders[0])
    result = {"reads": log.to_json()}
    try:
        result["tokens"], result["drafts"] = _generate(leaders[0], tokenizer)
    finally:
        leaders[0].stop()
    Path(f"{out}.p{process_id}.json").write_text(json.dumps(result))
    return 0


def _run_job(tmp_path: Path, kind: str) -> list[dict]:
    """Both processes' results: what each read, and the leader's tokens."""
    from helpers import xla_flags

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(4),
           "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    port = free_port()
    logs = [tmp_path / f"worker-p{i}.log" for i in range(2)]
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, __file__, "worker", str(i), str(port), str(out), str(tmp_path), kind],
                              env=env, stdout=open(logs[i], "w"), stderr=subprocess.STDOUT) for i in range(2)]
    try:
        deadline = time.monotonic() + TIMEOUT_S  # a hang fails the test instead of blocking the suite
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    tails = "\n".join(f"--- process {i}:\n{log.read_text()[-3000:]}" for i, log in enumerate(logs))
    assert codes == [0, 0], f"exit codes {codes}\n{tails}"
    return [json.loads(Path(f"{out}.p{i}.json").read_text()) for i in range(2)]


@pytest.mark.slow
def test_two_processes_load_their_own_shards_and_generate_what_one_process_does(tmp_path):
    """Target and draft model directories: each process reads its own devices' boxes of the
    target, each once (half the expert weights), and the small replicated draft whole."""
    import jax

    _save_pair(tmp_path)
    got = _run_job(tmp_path, "orbax")

    # The reference: this process (8 devices), the same directories, options and mesh.
    runner, tokenizer = _load_runner(_job_options(tmp_path, "orbax"))
    want, drafts = _generate(runner, tokenizer)
    assert got[0]["tokens"] == want and got[0]["drafts"] == drafts
    assert all(len(t) == MAX_TOKENS for t in want)
    assert 0 < drafts[1] < drafts[0], drafts

    state = _flat(runner.target.state)
    devices = jax.devices()
    whole = sum(x.nbytes for x in state.values())
    for i, g in enumerate(got):
        reads = g["reads"]["boxes"]["target"]
        host = devices[4 * i: 4 * i + 4]
        for path, array in state.items():
            boxes = sorted(tuple(map(tuple, b)) for b in reads[".".join(path)])
            assert boxes == sorted(_expected_boxes(array.sharding, array.shape, host)), (i, path)
        assert g["reads"]["nbytes"]["target"] < whole, (i, g["reads"]["nbytes"], whole)
        # The draft (replicated): every array once, whole, on each process.
        assert all(len(b) == 1 for b in g["reads"]["boxes"]["draft"].values())
    moe = [".".join(p) for p in state if "moe" in ".".join(p) and "router" not in ".".join(p)]
    assert moe
    for p in moe:  # the two processes read disjoint halves of the experts
        halves = [{tuple(b[0]) for b in g["reads"]["boxes"]["target"][p]} for g in got]
        assert halves[0].isdisjoint(halves[1]) and len(halves[0] | halves[1]) == 4, (p, halves)


@pytest.mark.slow
def test_two_processes_load_a_hugging_face_folder_each_reading_its_own_experts(tmp_path):
    _build_hf_moe(tmp_path / "hf")
    (tmp_path / "cpu-ep4-tp2.json").write_text(json.dumps(EP4_TP2))
    got = _run_job(tmp_path, "hf")
    runner, tokenizer = _load_runner(_job_options(tmp_path, "hf"))
    want, _ = _generate(runner, tokenizer)
    assert got[0]["tokens"] == want and all(len(t) == MAX_TOKENS for t in want)
    for i, g in enumerate(got):  # experts 0-1 on process 0, 2-3 on process 1; every other tensor whole
        experts = _expert_reads(g["reads"]["tensors"])
        assert experts and all(e == {2 * i, 2 * i + 1} for e in experts.values()), (i, experts)
        others = [t for t in g["reads"]["tensors"] if ".experts." not in t]
        assert len(others) == len(set(others)) and "model.embed_tokens.weight" in others


if __name__ == "__main__" and len(sys.argv) >= 2 and sys.argv[1] == "worker":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sys.exit(_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]))
