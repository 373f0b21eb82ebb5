"""tools/roofline.py: the analytic bound by hand, its trends, and a smoke run of the CLI (no timing asserts)."""

import importlib.util
import json
from pathlib import Path

import pytest

from jaxspec.config import ModelConfig, load_config
from jaxspec.speculative.adaptive import Roofline

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("tool_roofline", REPO / "tools" / "roofline.py")
roofline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(roofline)

# Layer 0 dense, layer 1 MoE: small enough to count every weight by hand.
HAND = ModelConfig(name="hand", vocab_size=10, d_model=4, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=2,
                   mlp_dim=8, num_experts=4, num_experts_per_tok=2, moe_mlp_dim=3, dense_layers=(0,))


def test_bound_matches_hand_count():
    # 2 rows x 3 tokens over 5 positions; 3 distinct experts routed to in the MoE layer.
    out = roofline.forward_bound(HAND, 2, 3, 5, [0, 3], 4, peak_flops=1e4, bandwidth=1e3)
    attn = 4 * 2 * (2 * 2 + 2 * 1)  # d x head_dim x (2 heads + 2 kv heads) = 48 per layer
    dense = 3 * 4 * 8  # 96
    expert = 3 * 4 * 3  # 36
    router = 4 * 4  # 16
    head = 10 * 4  # 40
    embed_rows = 6 * 4  # 6 tokens x d
    kv = 2 * 5 * 2 * 2 * 1 * 2  # rows x context x layers x (k, v) x kv heads x head_dim = 80
    assert out["bytes"] == (2 * attn + dense + 3 * expert + router + head + embed_rows + kv) * 4 == 1840
    per_token = 2 * attn + dense + 2 * expert + router + head  # top-2 experts per token = 320
    attention = 2 * 4 * 6 * 5 * 2 * 2  # layers x 4 x tokens x context x heads x head_dim = 960
    assert out["flops"] == 2 * 6 * per_token + attention == 4800
    assert out["bytes_s"] == pytest.approx(1.84) and out["flops_s"] == pytest.approx(0.48)
    assert out["bound_s"] == pytest.approx(1.84) and out["bound_by"] == "bytes"
    # One count for every MoE layer is the same as the per-layer list.
    assert roofline.forward_bound(HAND, 2, 3, 5, 3, 4, 1e4, 1e3)["bytes"] == 1840


def test_bytes_grow_with_experts_touched():
    cfg = roofline.mixtral_config(512)
    got = [roofline.forward_bound(cfg, 1, 5, 256, [e] * cfg.num_layers, 4, 1e11, 2.6e10)["bytes"]
           for e in range(1, cfg.num_experts + 1)]
    step = cfg.num_layers * 3 * cfg.d_model * cfg.moe_mlp_dim * 4  # one more expert in every layer
    assert all(b - a == step for a, b in zip(got, got[1:]))


def test_bound_flips_from_bytes_to_flops_with_tokens():
    cfg = load_config("builtin-target")
    small = roofline.forward_bound(cfg, 1, 1, 256, 2, 4, 1e11, 2.6e10)
    large = roofline.forward_bound(cfg, 256, 8, 256, cfg.num_experts, 4, 1e11, 2.6e10)
    assert small["bound_by"] == "bytes" and small["bound_s"] == small["bytes_s"]
    assert large["bound_by"] == "flops" and large["bound_s"] == large["flops_s"]


def test_consistent_with_adaptive_roofline():
    # With expected routing (None) the bound is Roofline.forward_s without its overhead, up to the
    # router's FLOPs and the embedding rows, which Roofline leaves out.
    hw = Roofline(bandwidth=2.6e10, peak_flops=1e11, overhead_s=0.0, bytes_per_param=2)
    cfg = load_config("qwen3-30b-a3b")
    for rows, t in [(1, 1), (1, 9), (64, 4)]:
        ours = roofline.forward_bound(cfg, rows, t, 512, None, 2, hw.peak_flops, hw.bandwidth)["bound_s"]
        assert ours == pytest.approx(hw.forward_s(cfg, rows, t, 512), rel=1e-2)


@pytest.mark.parametrize("kv_len", [True, False])
def test_cli_smoke(tmp_path, capsys, kv_len):
    path = tmp_path / "rows.json"
    rows = roofline.main(["--models", "tiny-moe", "--batch", "1", "2", "--tokens", "1", "3", "--context", "16",
                          "--max-len", "32", "--reps", "1", "--peak-gflops", "10", "--bandwidth-gbs", "10",
                          "--json", str(path), *([] if kv_len else ["--full-cache"])])
    assert [(r["B"], r["T"]) for r in rows] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    for r in rows:
        assert set(roofline.COLUMNS) <= set(r)
        assert r["measured_ms"] > 0 and r["bound_ms"] > 0 and r["bound_by"] in ("bytes", "flops")
        assert r["context"] == (16 if kv_len else 32)  # the bound counts what was attended
        assert len(r["experts_touched"]) == 2 and all(1 <= e <= 4 for e in r["experts_touched"])
    assert rows[0]["experts_touched"] == [2, 2]  # one token, top-2
    assert all(r["call_ms"] > 0 for r in rows if r["T"] == 1)  # a step inside a decode call of 4
    assert not any("call_ms" in r for r in rows if r["T"] > 1)
    written = json.loads(path.read_text())
    assert written["rows"] == rows and written["kv_len_used"] is kv_len
    out = capsys.readouterr().out
    assert "| tiny-moe | 2 | 3 |" in out and "measured t(T)/t(1)" in out
    assert "in a decode call: ms a step" in out
