"""tools/quant_logits_error.py on a tiny random Mixtral: the float32 load matches transformers, and
int4 weights err more than int8 (the figures the README reports come from this tool)."""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tool():
    sys.path.insert(0, str(REPO / "tools"))
    spec = importlib.util.spec_from_file_location("tool_quant_logits_error", REPO / "tools" / "quant_logits_error.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quantized_logits_error_on_a_tiny_mixtral(capsys):
    tool = _tool()
    args = tool.parse_args(["--vocab", "512", "--hidden", "64", "--expert-dim", "128", "--layers", "2",
                            "--heads", "4", "--kv-heads", "2", "--experts", "4"])
    err_hf, rows = tool.measure(args, batch=2, tokens=16)
    assert err_hf < 1e-4
    by = {name: (max_abs, rms, agree) for name, max_abs, rms, agree in rows}
    assert by["float32"] == (0.0, 0.0, 1.0)
    assert 0 < by["int8"][1] < by["int4"][1] < 1.0
    assert by["int8"][2] >= by["int4"][2]
