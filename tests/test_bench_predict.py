"""jaxspec.bench.predict: the roofline step-time / speculative speed-up predictor.

Expected values are derived by hand (or by simulation) in the tests, never copied from the
predictor's own output.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from jaxspec.bench import predict as P
from jaxspec.config import ModelConfig, load_config


# ----------------------------------------------------------------------------- routing
@pytest.mark.parametrize("num_experts,top_k,tokens", [(8, 2, 1), (8, 2, 5), (8, 2, 40), (64, 8, 16), (128, 8, 3)])
def test_distinct_experts_matches_monte_carlo(num_experts, top_k, tokens):
    rng = np.random.default_rng(0)
    trials = 3000
    # Each token picks top_k DISTINCT experts uniformly: the top_k smallest of E random keys.
    keys = rng.random((trials, tokens, num_experts))
    picks = np.argsort(keys, axis=-1)[..., :top_k]  # [trials, tokens, k]
    hit = np.zeros((trials, num_experts), bool)
    np.put_along_axis(hit, picks.reshape(trials, -1), True, axis=1)
    counts = hit.sum(axis=1)
    sim, se = counts.mean(), counts.std() / math.sqrt(trials)
    formula = P.expected_distinct_experts(tokens, num_experts, top_k)
    assert abs(formula - sim) <= 4 * se + 1e-9, (formula, sim, se)


def test_distinct_experts_limits_and_uniform_loads():
    assert P.expected_distinct_experts(1, 8, 2) == pytest.approx(2.0)  # one token: exactly its k experts
    assert P.expected_distinct_experts(10_000, 8, 2) == pytest.approx(8.0)  # many tokens: all of them
    assert P.expected_distinct_experts(7, 0, 0) == 0.0  # dense model
    # Uniform measured loads give the uniform formula; counts are normalised.
    assert P.distinct_from_loads(5, [3] * 8, 2) == pytest.approx(P.expected_distinct_experts(5, 8, 2))


def test_distinct_from_skewed_loads_matches_simulation():
    # top-1 routing with skewed loads: a token picks expert e with probability p_e exactly.
    loads = np.array([0.5, 0.3, 0.1, 0.1, 0.0, 0.0])
    rng = np.random.default_rng(1)
    tokens, trials = 4, 20_000
    picks = rng.choice(len(loads), size=(trials, tokens), p=loads)
    distinct = np.array([len(set(row)) for row in picks])
    assert P.distinct_from_loads(tokens, loads, 1) == pytest.approx(distinct.mean(), abs=4 * distinct.std() /
                                                                    math.sqrt(trials))
    # Hand value at N = 1: exactly one expert.
    assert P.distinct_from_loads(1, loads, 1) == pytest.approx(1.0)
    # Skew reaches fewer experts than uniform routing of the same k.
    assert P.distinct_from_loads(4, loads, 1) < P.expected_distinct_experts(4, 6, 1)


def test_routing_stats_file(tmp_path):
    path = tmp_path / "routing.json"
    path.write_text(json.dumps({"expert_load": [[1, 1, 0, 0], [2, 0, 0, 2]]}))
    assert P.load_routing_stats(str(path)) == [[1.0, 1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 2.0]]
    path.write_text(json.dumps({"nothing": 1}))
    with pytest.raises(ValueError):
        P.load_routing_stats(str(path))


# ----------------------------------------------------------------------------- acceptance
def test_expected_tokens_hand_values(tmp_path):
    assert P.expected_tokens([0.5], 0) == 1.0  # plain decoding: the verified token only
    assert P.expected_tokens([0.5], 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert P.expected_tokens([1.0], 4) == pytest.approx(5.0)
    assert P.expected_tokens([0.0], 4) == pytest.approx(1.0)
    # Per-position: 1 + 0.9 + 0.9*0.5 + 0.9*0.5*0.5 (the last value repeats).
    assert P.expected_tokens([0.9, 0.5], 3) == pytest.approx(1 + 0.9 + 0.45 + 0.225)
    # Geometric closed form (1 - a^(k+1)) / (1 - a).
    assert P.expected_tokens([0.7], 4) == pytest.approx((1 - 0.7 ** 5) / 0.3)
    path = tmp_path / "acc.json"
    path.write_text(json.dumps({"acceptance": [0.8, 0.6]}))
    assert P.load_acceptance_profile(str(path)) == [0.8, 0.6]
    path.write_text(json.dumps([0.8, 1.5]))
    with pytest.raises(ValueError):
        P.load_acceptance_profile(str(path))
    # The engine's / bench's measurement is cumulative (accepted / drafted at position j = all of
    # drafts 0..j accepted): 0.8, 0.48 means a_0 = 0.8, a_1 = 0.48 / 0.8 = 0.6, and E[2] = 1 + 0.8 + 0.48.
    path.write_text(json.dumps({"rows": [{"acceptance_per_position": []},
                                         {"acceptance_per_position": [0.8, 0.48]}]}))
    profile = P.load_acceptance_profile(str(path))
    assert profile == pytest.approx([0.8, 0.6])
    assert P.expected_tokens(profile, 2) == pytest.approx(2.28)


# ----------------------------------------------------------------------------- bytes and FLOPs
FAKE = P.Chip("fake", peak_flops=1e12, bandwidth=1e11, memory_bytes=1e9, link_bandwidth=1e10,
              step_overhead_s=0.0, op_overhead_s=0.0)


def _tiny_dense() -> ModelConfig:
    return ModelConfig(name="hand", vocab_size=100, d_model=8, num_layers=2, num_heads=2, num_kv_heads=1,
                       head_dim=4, mlp_dim=16)


def test_bytes_and_flops_per_step_by_hand():
    step = P.Predictor(_tiny_dense(), FAKE, dtype_bytes=2).step(rows=2, tokens=3, context=10)
    # n = 6 tokens. Per layer: attention 8*4*(2*2 + 2*1) = 192 params, MLP 3*8*16 = 384.
    # LM head 100*8 = 800 (read whole), embedding rows 6*8 = 48.
    # KV read: 2 rows * 10 positions * 2 layers * (K and V) * 1 kv head * 4 = 320 elements.
    assert step.bytes == pytest.approx((800 + 48 + 2 * (192 + 384) + 320) * 2)
    # FLOPs: 2 * 6 * (800 + 2 * (192 + 384)) + attention 4 * 6 * 10 * 2 heads * 4 * 2 layers.
    assert step.flops == pytest.approx(2 * 6 * 1952 + 3840)
    assert step.bound == "bytes"
    assert step.time_s == pytest.approx(step.compute_s)  # no overhead, no collectives on this chip


def test_moe_bytes_count_distinct_experts():
    cfg = ModelConfig(name="hand-moe", vocab_size=100, d_model=8, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=4, mlp_dim=16, num_experts=4, num_experts_per_tok=2, moe_mlp_dim=8)
    pred = P.Predictor(cfg, FAKE, dtype_bytes=1)
    one = pred.step(1, 1, 1)
    # One token: exactly 2 experts of 3*8*8 = 192 params, router 8*4 = 32, attention 192, head 800,
    # embedding row 8, KV 1*1*1*2*1*4 = 8.
    assert one.bytes == pytest.approx(800 + 8 + 192 + 32 + 2 * 192 + 8)
    four = pred.step(1, 4, 1)  # 4 tokens reach 4 * (1 - 0.5^4) = 3.75 experts on average
    assert four.bytes - one.bytes == pytest.approx((3.75 - 2) * 192 + 3 * 8)
    assert four.experts_per_layer == pytest.approx(3.75)


def test_bound_is_bytes_for_small_batches_and_flops_for_large():
    cfg = load_config("mixtral-8x7b")
    pred = P.Predictor(cfg, P.CHIPS["h100"], dtype_bytes=2)
    small = pred.step(1, 1, 16)
    big = pred.step(4096, 1, 16)
    assert small.bound == "bytes"
    assert big.bound == "flops"
    # Sanity of scale: decoding one token reads about the active parameters (12.9B) in bf16.
    active = cfg.param_counts()["active"]
    assert 0.9 * active * 2 < small.bytes < 1.2 * active * 2
    assert small.time_s > small.bytes / P.CHIPS["h100"].bandwidth


# ----------------------------------------------------------------------------- chips and meshes
def test_chip_table_sanity():
    for name, chip in P.CHIPS.items():
        assert chip.name == name
        assert 1e14 < chip.peak_flops < 2e15, name
        assert 5e11 < chip.bandwidth < 1e13, name
        assert 1e10 < chip.memory_bytes < 2e11, name
        assert 50 < chip.peak_flops / chip.bandwidth < 1000, name  # ridge point, FLOP per byte
        assert chip.source
    assert P.CHIPS["h200"].bandwidth > P.CHIPS["h100"].bandwidth
    assert P.CHIPS["h200"].peak_flops == P.CHIPS["h100"].peak_flops
    assert P.CHIPS["tpu-v5p"].peak_flops > P.CHIPS["tpu-v5e"].peak_flops
    assert P.CHIPS["tpu-v5p"].memory_bytes > P.CHIPS["tpu-v5e"].memory_bytes


def test_measured_rates_interpolate_and_cache_bandwidth_applies_to_small_steps():
    chip = P.Chip("probe", 99.0, 10.0, 0.0, 0.0, 0.0, 0.0, cache_bytes=32e6, cache_bandwidth=40.0,
                  matmul_rates=((8, 64, 10.0), (8, 256, 20.0), (32, 64, 30.0), (32, 256, 40.0)))
    assert chip.peak_at(8, 64) == pytest.approx(10.0)
    # Halfway in log2 on both axes: the mean of the four corners.
    assert chip.peak_at(16, 128) == pytest.approx(25.0)
    assert chip.peak_at(1, 4096) == pytest.approx(20.0)  # clamped to the grid's edge
    assert P.CHIPS["h100"].peak_at(1, 64) == P.CHIPS["h100"].peak_flops  # no grid: the datasheet peak
    assert chip.stream_bandwidth(10e6) == 40.0 and chip.stream_bandwidth(20e6) == 10.0  # half the cache


def test_mesh_split_reduces_per_chip_bytes_and_adds_collectives():
    split, chip = P.load_split("tpu-v5e-8")
    assert (split.data, split.expert, split.tensor, split.chips) == (1, 2, 4, 8)
    assert chip == "tpu-v5e"
    assert P.load_split("gpu-8xh100")[1] == "h100"
    cfg = load_config("mixtral-8x7b")
    one = P.Predictor(cfg, P.CHIPS["tpu-v5e"], P.Split(), 2)
    eight = P.Predictor(cfg, P.CHIPS["tpu-v5e"], split, 2)
    # Every weight is split over 4 or 8 chips (the router is replicated): per chip between 1/8 and 1/4.
    total = one.weight_bytes_per_chip()
    assert total / 8 <= eight.weight_bytes_per_chip() < total / 4
    a, b = one.step(8, 1, 1024), eight.step(8, 1, 1024)
    assert b.bytes < a.bytes / 4
    assert one.collective_s(8) == 0.0 and eight.collective_s(8) > 0.0
    assert b.time_s < a.time_s
    with pytest.raises(Exception):
        P.load_split("no-such-mesh")


# ----------------------------------------------------------------------------- HLO counting
HLO = """HloModule m

%f (p0: f32[4]) -> f32[4] {
  %p0 = f32[4]{0} parameter(0)
  ROOT %n = f32[4]{0} negate(%p0)
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]) parameter(0)
  %g = f32[4]{0} get-tuple-element(%p), index=1
  %a = f32[4]{0} fusion(%g), kind=kLoop, calls=%f
  %b = f32[4]{0} add(%a, %a)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[4]) tuple(%i, %b)
}

%cond (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %c = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%off (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  ROOT %o = f32[4]{0} negate(%x)
}

%on (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %dynamic-slice_fusion = f32[16]{0} fusion(%x), kind=kLoop, calls=%f
  %e = f32[4]{0} multiply(%x, %x)
  ROOT %r = f32[4]{0} add(%e, %x)
}

ENTRY %main (x: f32[4], pr: pred[]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %pr = pred[] parameter(1)
  %cp = f32[8,2]{1,0} copy(%x)
  %init = (s32[], f32[4]) tuple(%pr, %x)
  %w = (s32[], f32[4]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %k = f32[4]{0} conditional(%pr, %x, %x), branch_computations={%off, %on}
  ROOT %out = f32[4]{0} add(%k, %x)
}
"""


def test_count_hlo_ops_by_hand():
    counts = P.count_hlo_ops(HLO)
    # Entry: copy, while, conditional, add = 4. While: 3 trips x (body: fusion + add = 2; cond: compare = 1) = 9.
    # Conditional: 'off' (expert not chosen) runs 1 op; 'on' runs 3 (a dynamic-slice fusion, multiply, add).
    assert counts.ops == (4 + 9 + 1, 3 - 1)
    # The copy (f32[8,2] = 64 bytes) always moves data, written and read back; the dynamic-slice
    # fusion (f32[16] = 64 bytes, a contiguous slice) only when its branch runs. The body's fusion
    # moves nothing.
    assert counts.moved_bytes == (128.0, 0.0)
    assert counts.sliced_bytes == (0.0, 128.0)
    assert counts.at(0.5) == (14 + 1.0, 128.0, 64.0)


def test_count_hlo_ops_on_a_compiled_step():
    moe = P.count_hlo_ops(P.step_hlo(load_config("tiny-moe"), 1, 1, 16, 16))
    dense = P.count_hlo_ops(P.step_hlo(load_config("tiny-dense"), 1, 1, 16, 16))
    assert moe.ops[0] > 20 and dense.ops[0] > 20
    assert moe.ops[1] > 0  # the MoE dispatch skips unchosen experts: more work when more are chosen
    assert dense.ops[1] == 0


# ----------------------------------------------------------------------------- the CLI
def test_cli_table_and_json(tmp_path, capsys):
    out = tmp_path / "pred.json"
    result = P.main(["--model", "mixtral-8x7b", "--draft", "small-draft", "--mesh", "tpu-v5e-8", "--batch", "1", "8",
                     "--k", "1", "2", "--acceptance", "0.8", "--json", str(out)])
    text = capsys.readouterr().out
    assert "| B | plain ms | bound |" in text
    assert "speed-up k=2" in text
    assert sum(line.startswith("| 1 |") or line.startswith("| 8 |") for line in text.splitlines()) == 2
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert data["chip"]["name"] == "tpu-v5e" and data["mesh"]["tensor"] == 4
    for row in data["rows"]:
        k2 = row["speedup"]["2"]
        # speed-up = E[k] / (verify + k drafts) x plain, with E[2] = 1 + 0.8 + 0.64.
        assert row["tokens_per_step"]["2"] == pytest.approx(2.44)
        assert k2 == pytest.approx(2.44 / row["spec_ms"]["2"] * row["plain_ms"])
        assert row["spec_ms"]["2"] > row["verify_ms"]["2"]  # the draft model costs time
        assert row["best_k"] in (0, 1, 2)


def test_cli_profile_routing_and_no_draft(tmp_path, capsys):
    acc = tmp_path / "acc.json"
    acc.write_text(json.dumps([0.0]))
    routing = tmp_path / "routing.json"
    routing.write_text(json.dumps([[1] + [0] * 7] * 32))  # every token to one expert (top-2: capped)
    result = P.main(["--model", "mixtral-8x7b", "--chip", "h100", "--batch", "4", "--k", "1", "3",
                     "--acceptance-profile", str(acc), "--routing-stats", str(routing), "--json", "-"])
    row = result["rows"][0]
    # Nothing is ever accepted: speculation only costs (verification is never cheaper than decode).
    assert row["best_k"] == 0 and row["speedup"][1] <= 1.0
    assert result["routing"] == "measured" and result["draft"] is None
    assert json.loads(capsys.readouterr().out)["rows"][0]["batch"] == 4


def test_cli_cpu_with_given_rates_on_a_tiny_model(capsys):
    result = P.main(["--model", "tiny-moe", "--chip", "cpu", "--peak-gflops", "50", "--bandwidth-gbs", "10",
                     "--op-overhead-us", "1", "--step-overhead-us", "10", "--batch", "1", "--k", "1",
                     "--context", "16"])
    assert result["chip"]["peak_flops"] == 50e9 and result["dtype_bytes"] == 4  # the model's float32
    assert result["rows"][0]["plain_ms"] > 0.01  # at least ~20 kernels x 1 us + the call


def test_validation_table_flags_misses():
    rows = [{"model": "m", "B": 1, "T": 1, "measured_ms": 1.0, "predicted_ms": 1.4, "roofline_ms": 0.2,
             "overhead_ms": 0.5, "bound": "bytes", "error_pct": 40.0},
            {"model": "m", "B": 8, "T": 1, "measured_ms": 2.0, "predicted_ms": 1.9, "roofline_ms": 0.5,
             "overhead_ms": 0.5, "bound": "bytes", "error_pct": -5.0}]
    lines = P.format_validation(rows).splitlines()
    assert "**no**" in lines[2] and "+40%" in lines[2]
    assert "| yes |" in lines[3]
