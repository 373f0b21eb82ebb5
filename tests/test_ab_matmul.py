"""tools/ab_matmul.py --forwards: a smoke run (no timing asserts) over a tiny model."""

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))  # the tool imports its neighbours (roofline, ab_engine)
_spec = importlib.util.spec_from_file_location("tool_ab_matmul", REPO / "tools" / "ab_matmul.py")
ab_matmul = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ab_matmul)


def test_forwards_smoke(tmp_path, capsys):
    from helpers import require_cpu_kernel
    from cpu_kernels import dense_matmul

    require_cpu_kernel(dense_matmul)
    path = tmp_path / "rows.json"
    assert ab_matmul.main(["--forwards", "tiny-moe", "tiny-dense", "--shapes", "1x1", "2x3", "--reps", "2",
                           "--context", "16", "--max-len", "32", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["forwards"]
    assert [(r["model"], r["B"], r["T"]) for r in rows] == [
        ("tiny-moe", 1, 1), ("tiny-moe", 2, 3), ("tiny-dense", 1, 1), ("tiny-dense", 2, 3)]
    assert all(r["xla_ms"] > 0 and r["cpu_ms"] > 0 and r["ratio"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "| tiny-dense | 2 | 3 |" in out and "t(T)/t(1) cpu" in out
