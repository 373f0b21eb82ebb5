"""tools/compare_transformers.py end to end on a tiny Mixtral: every row, the gRPC server included."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parent.parent


def load_tool():
    path = REPO / "tools" / "compare_transformers.py"
    spec = importlib.util.spec_from_file_location("tool_compare_transformers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~1-2 min on 2 CPU cores: a server subprocess starts and compiles
def test_compare_transformers_with_server(tmp_path):
    out = tmp_path / "rows.json"
    rows = load_tool().main([
        "--layers", "2", "--hidden", "64", "--expert-dim", "128", "--vocab", "300", "--heads", "4", "--kv-heads", "2",
        "--new-tokens", "8", "--prompt-len-min", "10", "--prompt-len-max", "20", "--requests", "4",
        "--repeats", "1", "--batch-sizes", "1", "2", "--json", str(out),
    ])
    by_key = {(r["impl"], r["batch"]): r for r in rows}
    for impl in ("transformers", "jaxspec loop", "jaxspec engine", "jaxspec server"):
        for batch in (1, 2):
            row = by_key[(impl, batch)]
            assert row["tok_s"] > 0 and row["tokens"] == 4 * 8, row
    for batch in (1, 2):
        server = by_key[("jaxspec server", batch)]
        # Both are jaxspec float32 greedy through the same engine code: identical tokens.
        assert server["same_engine"] == 1.0, server
        assert server["vs_transformers"] > 0 and server["vs_bare"] > 0
        assert server["p99_s"] >= server["p50_s"] > 0
        assert "wait_s" in server and "reply_s" in server
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == len(rows) == 8
    assert {b["bar"] for b in saved["bars"]} == {"served >= 2x transformers", "served >= 80% of bare"}
