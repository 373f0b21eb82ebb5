"""First minutes: the private persistent compilation cache, a quiet start, and the one-shot CLI's
lazy compilation (issue 18)."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxspec import compilation_cache, generate
from jaxspec.speculative.adaptive import CostModel
from jaxspec.startup import NOISE, filtered_fd2

ROOT = Path(__file__).resolve().parents[1]

# The model's kernel adapters bind a kernel on first use: bind the real ones before the tests here
# patch kernels, or every later test in the process would run the patched one.
import jaxspec.models.moe_pallas  # noqa: E402,F401
from jaxspec.speculative.verify import get_backend  # noqa: E402

get_backend("pallas")


def test_private_dir_is_created_0700_under_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = compilation_cache.private_dir()
    assert path == tmp_path / "xdg" / "jaxspec" / "xla"
    assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_private_dir_refuses_group_or_world_writable(tmp_path):
    for mode in (0o770, 0o707):
        d = tmp_path / f"open{mode:o}"
        d.mkdir()
        d.chmod(mode)
        with pytest.raises(PermissionError, match="group/world-writable"):
            compilation_cache.private_dir(d)


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root")
def test_private_dir_refuses_another_users_directory(tmp_path):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 12345, 12345)
    with pytest.raises(PermissionError, match="owned by this user"):
        compilation_cache.private_dir(d)


def test_enabled_sets_then_restores_jax_options(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    with compilation_cache.enabled(tmp_path / "c") as path:
        assert jax.config.jax_compilation_cache_dir == str(path)
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        # No limit inside jax: its eviction scans the directory on every write (enable trims instead).
        assert jax.config.jax_compilation_cache_max_size == -1
    assert jax.config.jax_compilation_cache_dir == before


def test_enable_trims_least_recently_used_executables_to_the_limit(tmp_path):
    d = tmp_path / "c"
    d.mkdir(mode=0o700)
    for i, name in enumerate(["old", "mid", "new"]):
        f = d / f"jit_step-{name}-cache"
        f.write_bytes(b"x" * 1000)
        os.utime(f, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))
    (d / "jit_step-old-atime").write_bytes((10**18 + 5 * 10**9).to_bytes(8, "little"))  # jax's stamp: used last
    (d / "moe-dispatch-x.json").write_text("{}")  # not an executable: never trimmed
    with compilation_cache.enabled(d, max_bytes=2000):
        pass
    assert sorted(p.name for p in d.iterdir()) == ["jit_step-new-cache", "jit_step-old-atime", "jit_step-old-cache",
                                                   "moe-dispatch-x.json"]
    assert compilation_cache.trim(d, 0) == 2000
    assert sorted(p.name for p in d.iterdir()) == ["moe-dispatch-x.json"]


def test_filtered_fd2_drops_plugin_noise_only(capfd):
    with filtered_fd2():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
        os.write(2, b"I0000 00:00:1796039522.599172    3747 cudart_stub.cc:31] Could not find cuda drivers on your "
                    b"machine, GPU will not be used.\n")
        os.write(2, b"a real error\n")
    err = capfd.readouterr().err
    assert err == "a real error\n"
    assert NOISE.search("x cudart_stub.cc:31] Could not find cuda drivers on your machine")


def test_accelerator_detection_by_device_node_or_tpu_environment(monkeypatch):
    from jaxspec import startup

    for name in ("TPU_NAME", "TPU_ACCELERATOR_TYPE", "COLAB_TPU_ADDR", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(startup.glob, "glob", lambda pattern: [])
    assert not startup.accelerator_present()  # then quiet_start selects the CPU
    monkeypatch.setattr(startup.glob, "glob", lambda pattern: ["/dev/accel0"] if "accel" in pattern else [])
    assert startup.accelerator_present()
    monkeypatch.setattr(startup.glob, "glob", lambda pattern: [])
    monkeypatch.setenv("COLAB_TPU_ADDR", "10.0.0.2:8470")
    assert startup.accelerator_present()


def _costs() -> generate.LazyCosts:
    prior = CostModel({0: 0.0, 1: 1.0, 4: 2.0}, {0: 1.0, 1: 2.0, 4: 3.0}, source="analytic")
    return generate.LazyCosts(prior)


def test_lazy_costs_skip_a_buckets_first_step_then_scale_untimed_buckets():
    costs = _costs()
    assert costs.step_cost(0) == 1.0 and costs.step_cost(4) == 5.0  # the prior until something is timed
    costs.observe(4, 0.0, 50.0)  # the first step compiled: not a cost
    assert costs.step_cost(4) == 5.0
    costs.observe(4, 1.0, 9.0)  # 10 where the prior said 5: every untimed bucket costs twice its prior
    assert costs.step_cost(4) == pytest.approx(10.0)
    assert costs.step_cost(0) == pytest.approx(2.0)
    costs.observe(0, 0.0, 7.0)
    costs.observe(0, 0.0, 1.5)
    assert costs.step_cost(0) == pytest.approx(1.5)  # timed now: its own figure
    assert costs.step_cost(1) == pytest.approx(3.0 * 1.75)  # median of the ratios (2, 1.5)


def test_one_shot_cli_does_not_measure_costs_before_the_first_token(monkeypatch):
    from jaxspec.speculative.runner import SpeculativeRunner

    def refuse(*args, **kwargs):
        raise AssertionError("the one-shot CLI timed every bucket")

    monkeypatch.setattr(SpeculativeRunner, "measure_costs", refuse)
    monkeypatch.setattr(SpeculativeRunner, "warmup", refuse)
    args = generate.build_parser().parse_args(["--model", "tiny-moe", "--draft", "tiny-moe", "--max-len", "64", "x"])
    engine = generate.build_engine(args)
    assert isinstance(engine.runner.cost_model, generate.LazyCosts)


def _cli_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


@pytest.mark.slow
def test_generate_is_quiet_and_caches_compiled_steps(tmp_path):
    """No accelerator-plugin lines on a CPU machine; the first run says it compiles once, the second
    finds everything in the default per-user cache."""
    cmd = [sys.executable, "-m", "jaxspec.generate", "--spec-method", "none", "--max-tokens", "4", "--json", "def f(x):"]
    runs = [subprocess.run(cmd, cwd=tmp_path, env=_cli_env(tmp_path), capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert "cudart_stub" not in run.stderr and "absl::InitializeLog" not in run.stderr, run.stderr
        assert "Jax plugin configuration error" not in run.stderr and "TPU" not in run.stderr, run.stderr
        assert len(json.loads(run.stdout)["token_ids"]) == 4
    cache = tmp_path / "xdg" / "jaxspec" / "xla"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700 and any(cache.glob("*-cache"))
    assert runs[0].stderr.startswith("compiling (once: kept in"), runs[0].stderr
    assert runs[1].stderr == "", runs[1].stderr


@pytest.mark.slow
def test_one_shot_cli_compiles_only_the_shapes_it_runs(tmp_path):
    """Every executable the process compiles lands in its (empty) cache directory: a request of
    a short prompt and 4 tokens compiles one target prefill (of 3 prompt buckets) and at most one
    step function per step it ran (of 4 proposal buckets plus the plain decode a warm-up compiles)."""
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "jaxspec.generate", "--model", "tiny-moe", "--draft", "tiny-moe", "--max-len", "64",
           "--max-tokens", "4", "--ignore-eos", "--json", "--compilation-cache-dir", str(cache), "def f(x):"]
    run = subprocess.run(cmd, cwd=tmp_path, env=_cli_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    steps = json.loads(run.stdout)["spec"]["num_steps"]
    compiled = [p.name.split("-")[0] for p in cache.glob("*-cache")]
    assert compiled.count("jit__prefill_impl") == 1, compiled
    step_fns = [name for name in compiled if name in ("jit_step", "jit__decode_impl", "jit_loop", "jit_verify")]
    assert 1 <= len(step_fns) <= steps, (compiled, steps)


def test_generate_refuses_an_unsafe_cache_dir(tmp_path, capsys):
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    assert generate.main(["--compilation-cache-dir", str(d), "--model", "tiny-moe", "x"]) == 2
    assert "group/world-writable" in capsys.readouterr().err


# --------------------------------------------------------------- a one-shot CLI's start and exit
def _one_device_target(cfg):
    from flax import nnx

    from jaxspec.models import abstract_model

    _, state = nnx.split(abstract_model(cfg))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device), nnx.to_pure_dict(state))


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_local_reader_reads_what_orbax_restores(dtype):
    """The built-in target read with tensorstore directly equals orbax's restore, leaf for leaf
    (values, dtype after the cast, device)."""
    import numpy as np

    from jaxspec import builtin
    from jaxspec.checkpoint import orbax_io
    from jaxspec.config import ModelConfig

    d = builtin.asset_dir("target")
    cfg = ModelConfig.from_dict(json.loads((d / "config.json").read_text()))
    target = _one_device_target(cfg.replace(dtype=dtype) if dtype else cfg)
    fast, slow = orbax_io.read_local(d / "params", target), orbax_io._orbax_restore(d, target)
    assert fast is not None
    assert jax.tree.structure(fast) == jax.tree.structure(slow)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(slow)):
        assert a.dtype == b.dtype == np.dtype(dtype or "float32") and a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_local_reader_reads_a_quantized_save_and_leaves_mismatches_to_orbax(tmp_path):
    import numpy as np
    from flax import nnx

    from jaxspec.checkpoint import CheckpointError, load_model, orbax_io, save_model
    from jaxspec.loading import load_any

    model, tokenizer = load_any("tiny-moe", quantize="int8")
    save_model(tmp_path / "m", model, tokenizer)
    target = _one_device_target(model.cfg)
    fast = orbax_io.read_local(tmp_path / "m" / "params", target)
    assert fast is not None
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(nnx.state(model))):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Another model's shapes: not read here; orbax reports the mismatch.
    other = _one_device_target(model.cfg.replace(d_model=2 * model.cfg.d_model))
    assert orbax_io.read_local(tmp_path / "m" / "params", other) is None
    bad = tmp_path / "m" / "config.json"
    bad.write_text(json.dumps({**json.loads(bad.read_text()), "d_model": 2 * model.cfg.d_model}))
    with pytest.raises(CheckpointError, match="do not match config.json"):
        load_model(tmp_path / "m")


def test_loading_the_builtin_pair_does_not_import_orbax(tmp_path):
    code = ("import sys; from jaxspec.loading import load_any; load_any('builtin'); load_any('builtin', role='draft'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'orbax'))")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_cli_env(tmp_path), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_fast_exit_flushes_and_keeps_the_status(tmp_path):
    code = ("import logging, sys; from jaxspec.startup import fast_exit; "
            "logging.basicConfig(stream=sys.stderr); logging.getLogger('x').warning('logged'); "
            "sys.stdout.write('partial line'); fast_exit(3)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stdout) == (3, "partial line") and "logged" in run.stderr


def test_generate_cli_exit_status_is_mains(tmp_path):
    run = subprocess.run([sys.executable, "-m", "jaxspec.generate", "--model", "no-such-model", "x"], cwd=tmp_path,
                         env=_cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.startswith("error:") and run.stdout == "", run.stderr


# --------------------------------------------------------------- Pallas kernels on a first accelerator run
def test_gmm_check_passes_the_real_kernel_in_the_interpreter():
    from jaxspec import kernels

    result = kernels.check_gmm(num_experts=4, d_model=16, mlp_dim=32, top_k=2, token_counts=[3], interpret=True)
    assert result.ok, result.detail


def _tiny_moe_runner(moe_backend: str):
    from jaxspec.config import load_config
    from jaxspec.engine.model_runner import ModelRunner
    from jaxspec.models import Transformer
    from flax import nnx

    return ModelRunner(Transformer(load_config("tiny-moe"), rngs=nnx.Rngs(0)), 1, 64, moe_backend=moe_backend)


def test_selftest_falls_back_to_xla_when_the_kernel_disagrees(monkeypatch, caplog):
    import pallas_kernels.gmm
    from pallas_kernels.gmm_reference import gmm_reference

    from jaxspec import kernels

    def wrong_gmm(lhs, rhs, group_sizes, **kwargs):
        return gmm_reference(lhs, rhs, group_sizes) * 1.01

    monkeypatch.setattr(pallas_kernels.gmm, "gmm", wrong_gmm)
    runner = _tiny_moe_runner("pallas")
    assert kernels.selftest(runner) == []  # a CPU: nothing compiled to check (the interpreter runs there)
    with caplog.at_level("INFO", logger="jaxspec"):
        (result,) = kernels.selftest(runner, interpret=True, force=True)
    assert not result.ok and "relative error 0.01" in result.detail
    assert runner.moe_backend == "ragged" and runner.statics.moe_backend == "ragged"
    (record,) = [r for r in caplog.records if "self-test" in r.getMessage()]
    assert record.levelname == "WARNING" and "Pallas gmm on cpu disagrees" in record.getMessage()


def test_selftest_falls_back_when_the_kernel_does_not_compile(monkeypatch, caplog):
    import pallas_kernels.gmm

    from jaxspec import kernels

    def broken_gmm(*args, **kwargs):
        raise RuntimeError("Mosaic failed to compile TPU kernel: Bad lhs type\nmore detail")

    monkeypatch.setattr(pallas_kernels.gmm, "gmm", broken_gmm)
    runner = _tiny_moe_runner("pallas")
    with caplog.at_level("WARNING", logger="jaxspec"):
        (result,) = kernels.selftest(runner, force=True)
    assert not result.ok and result.detail == "RuntimeError: Mosaic failed to compile TPU kernel: Bad lhs type"
    assert runner.moe_backend == "ragged" and "Bad lhs type" in caplog.text


def test_selftest_keeps_a_kernel_that_agrees(monkeypatch):
    import pallas_kernels.gmm
    from pallas_kernels.gmm_reference import gmm_reference

    from jaxspec import kernels

    monkeypatch.setattr(pallas_kernels.gmm, "gmm", lambda lhs, rhs, gs, **kw: gmm_reference(lhs, rhs, gs))
    runner = _tiny_moe_runner("pallas")
    (result,) = kernels.selftest(runner, interpret=True, force=True)
    assert result.ok and runner.moe_backend == "pallas"
    assert kernels.selftest(_tiny_moe_runner("auto"), force=True) == []  # auto on a CPU: no Pallas to check


def test_selftest_checks_the_opt_in_attention_and_sampler_kernels(monkeypatch, caplog):
    import pallas_kernels.rejection_sampling
    import pallas_kernels.verify_attention
    from pallas_kernels.rejection_sampling_reference import rejection_sample
    from pallas_kernels.verify_attention_reference import verify_attention_reference

    from jaxspec import kernels
    from jaxspec.config import load_config
    from jaxspec.engine.model_runner import ModelRunner
    from jaxspec.models import Transformer
    from jaxspec.speculative import SpeculativeRunner, make_proposer
    from flax import nnx

    def wrong_attention(q, k, v, pos, sliding_window=None, **kwargs):
        return verify_attention_reference(q, k, v, pos + 1, sliding_window)  # sees one key too many

    def wrong_sampler(p, q, drafts, num_draft, uniforms, noise, **kwargs):
        tokens, accepted = rejection_sample(p, q, drafts, num_draft, uniforms, noise)
        return tokens, accepted * 0  # rejects everything

    monkeypatch.setattr(pallas_kernels.verify_attention, "verify_attention", wrong_attention)
    monkeypatch.setattr(pallas_kernels.rejection_sampling, "rejection_sample", wrong_sampler)
    model = Transformer(load_config("tiny-dense"), rngs=nnx.Rngs(0))
    target = ModelRunner(model, 1, 128, attention_backend="pallas")
    runner = SpeculativeRunner(target, make_proposer("ngram", None, target=model), num_speculative_tokens=2,
                               k_max=2, verify_backend="pallas")
    with caplog.at_level("WARNING", logger="jaxspec"):
        results = kernels.selftest(runner, interpret=True, force=True)
    assert [(r.kernel, r.ok) for r in results] == [("verify_attention", False), ("rejection_sampling", False)]
    assert target.statics.attention_backend == "xla" and runner.verify_backend == "xla"
    assert len([r for r in caplog.records if "self-test" in r.getMessage()]) == 2


def test_attention_and_sampler_checks_pass_the_real_kernels_in_the_interpreter():
    from jaxspec import kernels

    result = kernels.check_attention(4, 2, 16, rows=[2], tokens=[3], kv_len=32, interpret=True)
    assert result.ok, result.detail
    result = kernels.check_rejection(50, rows=[3], ks=[2], interpret=True)
    assert result.ok, result.detail
