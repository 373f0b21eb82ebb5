"""tools/bench_serving.py: statistics on hand-made records, the config parser, the workloads, and a smoke run."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxspec.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("tool_bench_serving", REPO / "tools" / "bench_serving.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look their module up by name
_spec.loader.exec_module(bench)


def _rec(latency, tokens=8, ok=True, max_tokens=8, **spec):
    return dict(ok=ok, latency_s=latency, completion_tokens=tokens if ok else 0, max_tokens=max_tokens, **spec)


def test_percentile_interpolates_like_numpy():
    values = [0.5, 0.1, 0.4, 0.2, 0.3, 2.0, 0.25]
    for q in (0, 50, 90, 99, 100):
        assert bench.percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert bench.percentile([1.0, 2.0], 50) == 1.5 and bench.percentile([3.0], 99) == 3.0
    assert bench.percentile([], 50) is None


def test_summary_arithmetic():
    records = [
        _rec(1.0, num_drafts=4, num_draft_tokens=16, num_accepted_tokens=8),
        _rec(2.0, num_drafts=2, num_draft_tokens=8, num_accepted_tokens=4),
        _rec(3.0, tokens=5),  # stopped early: counted, and "short"
        _rec(9.0, ok=False),  # failed: in no rate or latency
    ]
    s = bench.summarize(records, wall_s=4.0)
    assert (s["requests"], s["failed"], s["short"], s["tokens"]) == (4, 1, 1, 21)
    assert s["tok_s"] == pytest.approx(21 / 4) and s["req_s"] == pytest.approx(3 / 4)
    assert s["p50_s"] == pytest.approx(2.0) and s["p90_s"] == pytest.approx(2.8) and s["p99_s"] == pytest.approx(2.98)
    # 12 accepted of 24 drafted over 6 verification steps: 1 + 12 / 6 tokens per step.
    assert s["mean_acceptance_length"] == pytest.approx(3.0) and s["acceptance_rate"] == pytest.approx(0.5)
    plain = bench.summarize([_rec(1.0)], wall_s=0.5)
    assert plain["mean_acceptance_length"] is None and plain["acceptance_rate"] is None and plain["tok_s"] == 16


def test_same_as_plain_compares_per_prompt():
    def r(config, index, ids, conc=1):
        return dict(workload="w", config=config, concurrency=conc, index=index, ok=True, token_ids=ids)

    records = [r("none", 0, [1, 2]), r("none", 1, [3, 4]), r("ngram:k=2", 0, [1, 2]), r("ngram:k=2", 1, [3, 5]),
               r("ngram:k=2", 0, [1, 2], conc=2)]  # no plain record at concurrency 2: not compared
    assert bench.same_as_plain(records) == {("w", "ngram:k=2", 1): 0.5}


def test_bars_from_rows(capsys):
    def row(config, conc, tok_s, p99, acc=None, w="code"):
        return dict(workload=w, config=config, concurrency=conc, tok_s=tok_s, p99_s=p99, mean_acceptance_length=acc)

    configs = [bench.parse_config(c) for c in ("none", "draft:k=4", "draft:auto", "ngram:k=4")]
    rows = [row("none", 4, 100, 1.0), row("draft:k=4", 4, 140, 1.0), row("draft:auto", 4, 135, 1.1),
            row("none", 1, 50, 0.5, w="edit"), row("ngram:k=4", 1, 80, 0.4, acc=3.6, w="edit")]
    got = {(b["bar"], b["workload"]): (round(b["value"], 4), b["met"]) for b in bench.bars(rows, configs)}
    assert got == {
        ("draft:auto >= 1.3x none tok/s", "code"): (1.35, True),
        ("draft:auto >= 0.97x best of none and fixed k", "code"): (round(135 / 140, 4), False),
        ("draft:auto P99 <= 1.05x none's", "code"): (1.1, False),
        ("ngram:k=4 >= 1.5x none tok/s on edit", "edit"): (1.6, True),
        ("ngram:k=4 edit workload mean acceptance length >= 3.5", "edit"): (3.6, True),
    }
    assert "NOT met" in capsys.readouterr().out


def test_config_parser():
    assert bench.parse_config("none").serve_flags() == ["--spec-method", "none"]
    assert bench.parse_config("draft:k=4").serve_flags() == ["--spec-method", "draft", "--num-speculative-tokens", "4"]
    assert bench.parse_config("draft:auto").serve_flags() == ["--spec-method", "draft", "--num-speculative-tokens",
                                                              "auto"]
    assert bench.parse_config("ngram:k=2").serve_flags()[1] == "ngram"
    assert bench.parse_config("ngram:auto,max=8").serve_flags() == [
        "--spec-method", "ngram", "--num-speculative-tokens", "auto", "--max-speculative-tokens", "8"]
    for bad in ("eagle:k=2", "draft", "draft:k=0", "draft:k=x", "none:k=2", "ngram:auto,max=0", "draft:k=4,max=8", ""):
        with pytest.raises(ValueError, match="bad config"):
            bench.parse_config(bad)
    with pytest.raises(SystemExit):
        bench.parse_args(["--configs", "draft:k=two"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--configs", "none", "none"])


def _tokenizers():
    toks = [ByteTokenizer()]
    try:
        toks.append(bench.tokenizer_for("builtin"))
    except Exception:  # an install without the trained assets
        pass
    return toks


@pytest.mark.parametrize("tok", _tokenizers(), ids=lambda t: type(t).__name__)
def test_workloads_deterministic_and_edit_prompts_repeat_the_first_line(tok):
    for spec in ("code", "edit", "synthetic:in=12,out=5"):
        a = bench.make_workload(spec, tok, 6, 32, seed=3)
        assert a.prompts == bench.make_workload(spec, tok, 6, 32, seed=3).prompts and len(a.prompts) == 6
        assert a.prompts != bench.make_workload(spec, tok, 6, 32, seed=4).prompts
    assert bench.make_workload("synthetic:in=12,out=5", tok, 2, 32, 0).max_tokens == 5
    assert all(len(p) == 12 for p in bench.make_workload("synthetic:in=12,out=5", tok, 3, 32, 0).prompts)
    assert all(100 <= len(p) <= 200 for p in bench.make_workload("code", tok, 8, 32, 0).prompts)
    for ids in bench.make_workload("edit", tok, 8, 32, 0).prompts:
        text = tok.decode(ids)
        head, marker, first = text.rpartition(bench.EDIT_MARKER + "\n")
        assert marker and first.lstrip().startswith(("def ", "async def ")) and first.endswith("\n")
        assert head.startswith(first)  # the prompt opens with the line it ends on: a copy follows
        assert len(tok.encode(head)) >= 32 + 16
    with pytest.raises(ValueError, match="bad workload"):
        bench.make_workload("synthetic:in=4", tok, 2, 8, 0)


@pytest.mark.slow
def test_smoke_run_tiny_model(tmp_path, capsys):
    out = tmp_path / "bench.json"
    summary = bench.main(["--model", "tiny-moe", "--configs", "none", "ngram:k=2", "--concurrency", "1", "2",
                          "--requests", "2", "--max-tokens", "8", "--workload", "synthetic:in=16,out=8",
                          "--serve-args", "--slots 4 --max-len 64", "--time-limit", "120", "--json", str(out)])
    text = capsys.readouterr().out
    assert summary["config_errors"] == {}
    assert len(summary["levels"]) == 4 and all(r["failed"] == 0 and r["tokens"] == 16 for r in summary["levels"])
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].split(" | ")[:6] == ["| conc", "none tok/s", "none p99 s", "ngram:k=2 tok/s", "ngram:k=2 p99 s",
                                         "ngram:k=2 x none"]
    assert any(line.startswith("| 1 |") for line in table) and any(line.startswith("| 2 |") for line in table)
    assert any(line.startswith("| ngram:k=2 | 2 |") for line in table)
    data = json.loads(out.read_text())
    assert len(data["records"]) == 8 and all(r["ok"] and len(r["token_ids"]) == 8 for r in data["records"])
