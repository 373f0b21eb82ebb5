"""python -m jaxspec.bench: statistics against hand-computed values, configurations, workloads, the load
generators against a stub server (failures counted, nothing lost), the reports, and a tiny end-to-end run."""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxspec.bench import report, stats, stub
from jaxspec.bench.cli import interleaved_order, main as bench_main
from jaxspec.bench.configs import BenchConfig, baseline_of, parse_config
from jaxspec.bench.load import SendOptions, Target, closed_loop, open_loop
from jaxspec.bench.workloads import BenchRequest, make_workload, tokenizer_for
from jaxspec.tokenizer import ByteTokenizer


# ------------------------------------------------------------------------------------------- statistics
def _rec(latency, tokens=8, ok=True, max_tokens=8, status=None, **extra):
    return dict(ok=ok, latency_s=latency, completion_tokens=tokens if ok else 0, max_tokens=max_tokens,
                status=status or ("LENGTH" if ok else "ERROR"), **extra)


def test_percentile_interpolates_like_numpy():
    values = [0.5, 0.1, 0.4, 0.2, 0.3, 2.0, 0.25]
    for q in (0, 50, 90, 95, 99, 100):
        assert stats.percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert stats.percentile([1.0, 2.0], 50) == 1.5 and stats.percentile([3.0], 99) == 3.0
    assert stats.percentile([], 50) is None


def test_poisson_arrivals_seeded_and_exponential():
    rng = random.Random(7)
    want = [0.0]
    for _ in range(4):
        want.append(want[-1] + rng.expovariate(2.0))
    assert stats.poisson_arrivals(2.0, 5, seed=7) == pytest.approx(want)
    assert stats.poisson_arrivals(2.0, 5, seed=7) != stats.poisson_arrivals(2.0, 5, seed=8)
    times = stats.poisson_arrivals(4.0, 20001, seed=0)
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03) and gaps.std() == pytest.approx(0.25, rel=0.05)
    with pytest.raises(ValueError, match="rate"):
        stats.poisson_arrivals(0, 3, 0)


def test_summary_arithmetic():
    records = [
        _rec(1.0, ttft_s=0.2, itl_s=[0.1] * 7, server_e2e_s=0.9, server_ttft_s=0.15, num_drafts=4,
             num_draft_tokens=16, num_accepted_tokens=8, accepted_per_position=[4, 3, 1, 0],
             drafted_per_position=[4, 4, 4, 4]),
        _rec(2.0, ttft_s=0.4, itl_s=[0.2] * 7, server_e2e_s=1.8, num_drafts=2, num_draft_tokens=8,
             num_accepted_tokens=4, accepted_per_position=[2, 2], drafted_per_position=[2, 2]),
        _rec(3.0, tokens=5, ttft_s=1.0, itl_s=[0.5] * 4),  # stopped early: counted, and "short"
        _rec(9.0, ok=False, status="RESOURCE_EXHAUSTED"),  # refused: in no rate or latency
        _rec(9.0, ok=False, status="DEADLINE"),
    ]
    s = stats.summarize(records, wall_s=4.0, slo_e2e=2.5, price_per_hour=3.6)
    assert (s["requests"], s["ok"], s["failed"], s["short"], s["tokens"]) == (5, 3, 2, 1, 21)
    assert s["failures"] == {"DEADLINE": 1, "RESOURCE_EXHAUSTED": 1}
    assert s["tok_s"] == pytest.approx(21 / 4) and s["req_s"] == pytest.approx(3 / 4)
    assert s["e2e_p50"] == pytest.approx(2.0) and s["e2e_p90"] == pytest.approx(2.8)
    assert s["e2e_p99"] == pytest.approx(2.98) and s["e2e_mean"] == pytest.approx(2.0)
    assert s["ttft_source"] == "client" and s["ttft_p50"] == pytest.approx(0.4)
    assert s["itl_p50"] == pytest.approx(0.2) and s["itl_mean"] == pytest.approx((0.7 + 1.4 + 2.0) / 18)
    # TPOT = (e2e - ttft) / (tokens - 1): 0.8/7, 1.6/7, 2.0/4
    assert s["tpot_p50"] == pytest.approx(1.6 / 7)
    assert s["client_overhead_p50"] == pytest.approx(0.15) and s["server_e2e_p50"] == pytest.approx(1.35)
    # Goodput: ok and within 2.5 s -> the first two of five requests, over 4 s.
    assert s["goodput_req_s"] == pytest.approx(0.5) and s["slo_attainment"] == pytest.approx(0.4)
    # 12 accepted of 24 drafted over 6 verification steps: 1 + 12 / 6 tokens per step.
    assert s["mean_acceptance_length"] == pytest.approx(3.0) and s["acceptance_rate"] == pytest.approx(0.5)
    assert s["acceptance_per_position"] == pytest.approx([1.0, 5 / 6, 0.25, 0.0])
    # $3.6 per hour = $0.001 per second, at 5.25 tokens/s.
    assert s["cost_per_mtok"] == pytest.approx(0.001 / 5.25 * 1e6)
    plain = stats.summarize([_rec(1.0, server_ttft_s=0.3)], wall_s=0.5)
    assert plain["mean_acceptance_length"] is None and plain["tok_s"] == 16 and "goodput_req_s" not in plain
    assert plain["ttft_source"] == "server" and plain["ttft_p99"] == pytest.approx(0.3)


def test_slo_on_ttft_needs_a_first_token_time():
    assert stats.meets_slo(_rec(1.0, ttft_s=0.1), 2.0, 0.2)
    assert not stats.meets_slo(_rec(1.0, ttft_s=0.3), 2.0, 0.2)
    assert not stats.meets_slo(_rec(1.0), None, 0.2)  # nothing to judge the TTFT by
    assert not stats.meets_slo(_rec(1.0, ok=False), None, None)


def test_same_as_baseline_compares_per_prompt_and_level():
    def r(config, index, ids, level=1):
        return dict(workload="w", config=config, load="concurrency", level=level, index=index, ok=True, token_ids=ids)

    records = [r("none", 0, [1, 2]), r("none", 1, [3, 4]), r("ngram:k=2", 0, [1, 2]), r("ngram:k=2", 1, [3, 5]),
               r("ngram:k=2", 0, [1, 2], level=2)]  # no plain record at level 2: not compared
    assert stats.same_as_baseline(records, {"ngram:k=2": "none"}) == {("w", "ngram:k=2", "concurrency", 1): 0.5}


# ----------------------------------------------------------------------------------------- configs
def test_config_parser():
    assert parse_config("none").serve_flags() == ["--spec-method", "none"]
    assert parse_config("draft:k=4").serve_flags() == ["--spec-method", "draft", "--num-speculative-tokens", "4"]
    assert parse_config("eagle3:k=3").serve_flags() == ["--spec-method", "eagle3", "--num-speculative-tokens", "3"]
    assert parse_config("ngram:auto,max=8").serve_flags() == [
        "--spec-method", "ngram", "--num-speculative-tokens", "auto", "--max-speculative-tokens", "8"]
    dense = parse_config("dense-k4=draft:k=4 --model builtin-dense --slots 16")
    assert dense.name == "dense-k4" and dense.model == "builtin-dense"
    assert dense.serve_flags()[:4] == ["--model", "builtin-dense", "--slots", "16"]
    assert parse_config("none --model=x").model == "x" and parse_config("draft:auto").model is None
    assert parse_config("none").request_options() == {"speculation": False}
    assert parse_config("draft:k=3").request_options() == {"num_speculative_tokens": 3}
    assert parse_config("draft:auto").request_options() == {}
    for bad in ("eagle:k=2", "draft", "draft:k=0", "draft:k=x", "none:k=2", "ngram:auto,max=0", "draft:k=4,max=8",
                "", "draft:k=2 --spec-method none", "x=draft:k=2 --num-speculative-tokens=3"):
        with pytest.raises(ValueError, match="bad config"):
            parse_config(bad)


def test_groups_pick_their_own_baseline():
    configs = [parse_config(c) for c in ("none", "draft:k=4", "dense=none --model d", "dk=draft:k=4 --model d")]
    assert baseline_of(configs[1], configs).name == "none"
    assert baseline_of(configs[3], configs).name == "dense"
    assert baseline_of(parse_config("draft:k=2 --slots 2"), configs) is None
    assert baseline_of(parse_config("draft:k=2 --model d --draft e"), configs).name == "dense"  # the draft is the spec


def test_bars_from_rows():
    def row(config, conc, tok_s, p99, acc=None, w="code"):
        return dict(workload=w, config=config, load="concurrency", level=conc, tok_s=tok_s, e2e_p99=p99,
                    mean_acceptance_length=acc)

    configs = [parse_config(c) for c in ("none", "draft:k=4", "draft:auto", "ngram:k=4")]
    rows = [row("none", 4, 100, 1.0), row("draft:k=4", 4, 140, 1.0), row("draft:auto", 4, 135, 1.1),
            row("none", 1, 50, 0.5, w="edit"), row("ngram:k=4", 1, 80, 0.4, acc=3.6, w="edit")]
    got = {(b["bar"], b["workload"]): (round(b["value"], 4), b["met"]) for b in report.bars(rows, configs)}
    assert got == {
        ("draft:auto >= 1.3x plain tok/s", "code"): (1.35, True),
        ("draft:auto >= 0.97x best of plain and fixed k", "code"): (round(135 / 140, 4), False),
        ("draft:auto P99 <= 1.05x plain's", "code"): (1.1, False),
        ("ngram:k=4 >= 1.5x plain tok/s on edit", "edit"): (1.6, True),
        ("ngram:k=4 mean acceptance length >= 3.5 on edit", "edit"): (3.6, True),
    }
    assert "**not met**" in report.bars_text(report.bars(rows, configs))


# --------------------------------------------------------------------------------------- workloads
def _tokenizers():
    toks = [ByteTokenizer()]
    try:
        toks.append(tokenizer_for("builtin"))
    except Exception:  # an install without the trained assets
        pass
    return toks


@pytest.mark.parametrize("tok", _tokenizers(), ids=lambda t: type(t).__name__)
def test_workloads_deterministic(tok):
    for spec in ("code", "edit", "long:in=200,out=8", "synthetic:in=12,out=5", "synthetic:in=40,out=5,text=repeat"):
        a = make_workload(spec, tok, 6, 32, seed=3, context=256)
        assert a.requests == make_workload(spec, tok, 6, 32, seed=3, context=256).requests
        assert a.requests != make_workload(spec, tok, 6, 32, seed=4, context=256).requests
        assert len(a.requests) == 6 and len(a.warmup) == 2
        assert not {r.prompt for r in a.warmup} & {r.prompt for r in a.requests} or spec == "edit"
    long = make_workload("long", tok, 4, 32, 0, context=256)
    assert all(0.9 * 232 <= len(r.prompt) <= 232 and r.max_tokens == 16 for r in long.requests)
    rep = make_workload("synthetic:in=40,out=5,text=repeat", tok, 2, 32, 0).requests[0].prompt
    assert rep[:16] == rep[16:32] and len(rep) == 40
    assert all(100 <= len(r.prompt) <= 200 for r in make_workload("code", tok, 8, 32, 0).requests)
    for bad in ("synthetic:in=4", "synthetic:in=4,out=2,text=zip", "long:in=300,out=8", "nope", "jsonl:"):
        with pytest.raises(ValueError, match="bad workload"):
            make_workload(bad, tok, 2, 8, 0, context=256)


def test_edit_prompts_repeat_their_first_line():
    from jaxspec.bench.workloads import EDIT_MARKER

    tok = ByteTokenizer()
    for r in make_workload("edit", tok, 8, 32, 0).requests:
        text = tok.decode(list(r.prompt))
        head, marker, first = text.rpartition(EDIT_MARKER + "\n")
        assert marker and first.lstrip().startswith(("def ", "async def ")) and first.endswith("\n")
        assert head.startswith(first)  # the prompt opens with the line it ends on: a copy follows
    one = make_workload("edit", tok, 4, 32, 0, context=512).requests
    two = make_workload("edit:copies=2", tok, 4, 32, 0, context=512).requests
    for a, b in zip(one, two):
        text, shown = tok.decode(list(b.prompt)), tok.decode(list(a.prompt))
        body, _, first = shown.rpartition(EDIT_MARKER + "\n")
        # The function and the marker twice, then the first line: a copy is shown before one is asked.
        assert text.count(EDIT_MARKER) == 2 and text == body + EDIT_MARKER + "\n" + body + EDIT_MARKER + "\n" + first
        assert len(b.prompt) + b.max_tokens <= 512
    for bad in ("edit:copies=0", "edit:copy=2"):
        with pytest.raises(ValueError, match="bad workload"):
            make_workload(bad, tok, 2, 32, 0, context=512)
    with pytest.raises(ValueError, match="do not fit the context"):
        make_workload("edit:copies=4", tok, 2, 32, 0, context=256)


def test_jsonl_prompts_and_sharegpt(tmp_path):
    tok = ByteTokenizer()
    path = tmp_path / "p.jsonl"
    lines = [{"prompt": "def f():", "max_tokens": 4}, {"prompt": "x = 1"},
             {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi there"},
                                {"from": "gpt", "value": "hello!"}]},
             {"conversations": [{"from": "gpt", "value": "no prompt"}]},  # skipped
             {"prompt": "y" * 100, "max_tokens": 4}]  # too long for a context of 64: left out, counted
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    wl = make_workload(f"jsonl:{path}", tok, 3, 9, seed=0, context=64, warmup=0)
    got = sorted((tok.decode(list(r.prompt)), r.max_tokens) for r in wl.requests)
    assert got == sorted([("def f():", 4), ("x = 1", 9), ("hi there", len(tok.encode("hello!")))])
    assert wl.dropped == 1 and "1 prompts too long" in wl.describe()
    path.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: not JSON"):
        make_workload(f"jsonl:{path}", tok, 1, 8, 0)
    path.write_text('{"prompt": "a", "max_tokens": 0}\n')
    with pytest.raises(ValueError, match="max_tokens"):
        make_workload(f"jsonl:{path}", tok, 1, 8, 0)


# ------------------------------------------------------------------------------ load against a stub
@pytest.fixture(scope="module")
def stub_server():
    servers = []

    def start(fail_every=0):
        server, port, servicer = stub.start(0, fail_every)
        servers.append(server)
        target = Target(f"127.0.0.1:{port}")
        target.__dict__["servicer"] = servicer  # frozen dataclass: the test reads what the stub saw
        return target

    yield start
    for s in servers:
        s.stop(0)


REQS = [BenchRequest(i, (5, 6, 7, i + 8), 3) for i in range(5)]


@pytest.mark.parametrize("stream", [False, True])
def test_closed_loop_loses_nothing(stub_server, stream):
    recs, wall = closed_loop(stub_server(), REQS, 8, 64, 60, SendOptions(stream=stream))
    assert len(recs) == 64 and [r["seq"] for r in recs] == list(range(64)) and wall > 0
    assert all(r["ok"] and r["completion_tokens"] == 3 and r["token_ids"] == [5, 5, 5] for r in recs)
    assert [r["index"] for r in recs[:6]] == [0, 1, 2, 3, 4, 0]  # requests are reused in order
    assert all(r["server_e2e_s"] >= 0 for r in recs)
    if stream:
        assert all(r["ttft_s"] is not None and len(r["itl_s"]) == 2 for r in recs)


def test_refused_and_unreachable_requests_are_counted(stub_server):
    recs, _ = closed_loop(stub_server(fail_every=3), REQS, 4, 30, 60, SendOptions())
    s = stats.summarize(recs, 1.0)
    assert s["requests"] == 30 and s["failures"] == {"RESOURCE_EXHAUSTED": 10} and s["ok"] == 20
    dead = Target("127.0.0.1:1")  # nothing listens on port 1
    recs, _ = closed_loop(dead, REQS, 2, 4, 60, SendOptions(timeout_s=5))
    assert len(recs) == 4 and all(r["status"] == "UNAVAILABLE" and not r["ok"] for r in recs)


def test_open_loop_follows_the_schedule(stub_server):
    recs, wall = open_loop(stub_server(), REQS, 200.0, 40, 60, SendOptions(), seed=1)
    sched = stats.poisson_arrivals(200.0, 40, 1)
    assert [r["scheduled_s"] for r in recs] == pytest.approx(sched) and all(r["ok"] for r in recs)
    assert all(r["start_s"] >= r["scheduled_s"] for r in recs) and wall >= sched[-1]
    recs, _ = open_loop(stub_server(), REQS, 10.0, 100, 0.5, SendOptions(), seed=1)
    assert 0 < len(recs) < 100 and all(r["scheduled_s"] < 0.5 for r in recs)  # the time limit stops sends


def test_cli_against_a_running_server_writes_every_report(stub_server, tmp_path):
    target = stub_server(fail_every=7)
    out = tmp_path / "run"
    summary = bench_main(["--server", target.address, "--model", "tiny-moe", "--configs", "none", "draft:k=2",
                          "--workload", "synthetic:in=8,out=3", "--concurrency", "1", "4", "--rate", "50",
                          "--requests", "14", "--stream", "--slo-e2e", "1.0", "--price-per-hour", "2.0",
                          "--out", str(out), "--no-progress"])
    assert summary["config_errors"] == {}
    assert {(r["config"], r["load"], r["level"]) for r in summary["levels"]} == {
        (c, load, lv) for c in ("none", "draft:k=2") for load, lv in (("concurrency", 1), ("concurrency", 4),
                                                                      ("rate", 50))}
    for r in summary["levels"]:
        assert r["requests"] == 14 and r["failures"].get("RESOURCE_EXHAUSTED", 0) >= 1
        assert r["goodput_req_s"] > 0 and r["cost_per_mtok"] > 0 and r["ttft_source"] == "client"
    data = json.loads((out / "results.json").read_text())
    assert len(data["records"]) == 6 * 14 and data["settings"]["configs"] == ["none", "draft:k=2"]
    # Against a running server a configuration is per-request options: none turns speculation off.
    assert target.servicer.seen == {"off": 3 * 14 + 2, "k=2": 3 * 14 + 2}  # levels + warm-up
    md = (out / "report.md").read_text()
    for col in ("e2e P50", "P90", "P95", "P99", "TTFT P50", "TTFT P99", "ITL P50", "ITL P95", "acc len",
                "goodput req/s", "$/M tok"):
        assert f" {col} |" in md
    assert "| none | 4 conc |" in md and "| draft:k=2 | 50 req/s |" in md
    # The comparison tables: a column per configuration, ratios against plain in brackets.
    assert md.count("| level | none | draft:k=2 |") == 4  # tokens/s and P99, closed and open loop
    assert re.search(r"\| 4 conc \| [\d.]+ \| [\d.]+ \([\d.]+x\) \|", md)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["latency_synthetic_in_8_out_3_concurrency.png", "latency_synthetic_in_8_out_3_rate.png"]
    assert all((out / p).stat().st_size > 10_000 for p in pngs)


def test_interleaved_rounds_rotate_the_configurations_and_pool_each_level(stub_server, tmp_path):
    target = stub_server()
    summary = bench_main(["--server", target.address, "--model", "tiny-moe", "--configs", "none", "draft:k=2",
                          "--workload", "synthetic:in=8,out=3", "--concurrency", "1", "2", "--requests", "3",
                          "--interleave", "--rounds", "2", "--out", str(tmp_path / "run"), "--no-progress",
                          "--no-plots"])
    assert summary["config_errors"] == {}
    # Each level twice per configuration, pooled: 2 x 3 requests a row, walls added.
    rows = {(r["config"], r["level"]): r for r in summary["levels"]}
    assert sorted(rows) == [("draft:k=2", 1), ("draft:k=2", 2), ("none", 1), ("none", 2)]
    assert all(r["requests"] == 6 and r["ok"] == 6 for r in rows.values())
    # Warm-up, then passes of 3 requests whose first configuration changes from pass to pass.
    order = target.servicer.order
    assert order[:4] == ["off", "off", "k=2", "k=2"]
    passes = [order[i] for i in range(4, len(order), 3)]
    assert passes == ["off", "k=2", "k=2", "off", "off", "k=2", "k=2", "off"]
    assert all(len(set(order[i:i + 3])) == 1 for i in range(4, len(order), 3))


def test_interleaved_order_rotates():
    assert [interleaved_order(["a", "b", "c"], t) for t in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert interleaved_order([], 3) == []


def test_bad_arguments_are_named(capsys):
    for argv, what in ((["--configs", "draft:k=two"], "--configs"), (["--configs", "none", "none"], "same name"),
                       (["--server", "h:1", "--configs", "none --slots 2"], "serve flags"),
                       (["--concurrency", "0"], "--concurrency"), (["--tls"], "--tls")):
        with pytest.raises(SystemExit):
            bench_main(argv)
        assert what in capsys.readouterr().err


# ----------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_tiny_model_end_to_end(tmp_path):
    out = tmp_path / "e2e"
    summary = bench_main(["--model", "tiny-moe", "--configs", "none", "ngram:k=2", "--concurrency", "1", "2",
                          "--requests", "2", "--max-tokens", "8", "--workload", "synthetic:in=16,out=8,text=repeat",
                          "--serve-args", "--slots 4 --max-len 64", "--time-limit", "120", "--out", str(out),
                          "--no-progress"])
    assert summary["config_errors"] == {}
    assert len(summary["levels"]) == 4 and all(r["failed"] == 0 and r["tokens"] == 16 for r in summary["levels"])
    spec = [r for r in summary["levels"] if r["config"] == "ngram:k=2"]
    assert all(r["same_as_plain"] == 1.0 and r["num_drafts"] > 0 for r in spec)  # greedy: identical tokens
    assert summary["servers"]["ngram:k=2"]["spec_method"] == "ngram"
    data = json.loads((out / "results.json").read_text())
    assert len(data["records"]) == 8 and all(r["ok"] and len(r["token_ids"]) == 8 for r in data["records"])
    md = (out / "report.md").read_text()
    assert "| ngram:k=2 | 2 conc |" in md and "| level | none | ngram:k=2 |" in md
    assert (out / "latency_synthetic_in_16_out_8_text_repeat_concurrency.png").exists()


# ---------------------------------------------------------------------------------- device check
def test_device_check_needs_an_accelerator_or_allow_cpu(tmp_path):
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "tools/device_check.py", "--out", str(tmp_path)], cwd=root,
                       capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 2 and "no accelerator" in r.stdout


@pytest.mark.slow
def test_device_check_runs_its_predict_stage_on_cpu(tmp_path):
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "tools/device_check.py", "--allow-cpu", "--quick", "--stages", "predict",
                        "--out", str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stdout[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["roofline prediction vs measured"]
    rows = json.loads((tmp_path / "predict.json").read_text())["validation"]
    assert {(r["model"], r["B"], r["T"]) for r in rows} == {(m, b, t) for m in ("tiny-moe", "tiny-dense")
                                                            for b in (1, 8) for t in (1, 5)}
    assert all(r["measured_ms"] > 0 and r["predicted_ms"] > 0 for r in rows)
    assert "| roofline prediction vs measured | ok |" in (tmp_path / "summary.md").read_text()
