"""Statistics of a benchmark level from its per-request records (pure Python: hand-checkable).

A record is a dict written by ``jaxspec.bench.load``; the fields used here:
``ok`` (finished with LENGTH/STOP/EOS), ``status`` (finish reason or gRPC code of a failure),
``latency_s`` (client end-to-end), ``ttft_s`` (client time to first token, streaming only),
``itl_s`` (client gaps between tokens, streaming only: a message carrying n tokens after a gap g
counts n gaps of g/n), ``server_e2e_s`` / ``server_ttft_s`` (from the response's timestamps),
``completion_tokens``, ``max_tokens`` and the speculation counters.
"""

from __future__ import annotations

import collections
import math
import random
from typing import Iterable, Sequence

PERCENTILES = (50, 90, 95, 99)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def distribution(values: Sequence[float], prefix: str) -> dict:
    out = {f"{prefix}_mean": sum(values) / len(values) if values else None}
    out.update({f"{prefix}_p{q}": percentile(values, q) for q in PERCENTILES})
    return out


def poisson_arrivals(rate: float, n: int, seed: int) -> list[float]:
    """Send times (seconds from the level's start) of ``n`` requests arriving as a Poisson process of
    ``rate`` per second: the first at 0, then exponential gaps of mean 1/rate."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    rng = random.Random(seed)
    times, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        times.append(t)
    return times


def meets_slo(r: dict, slo_e2e: float | None, slo_ttft: float | None) -> bool:
    if not r["ok"]:
        return False
    if slo_e2e is not None and r["latency_s"] > slo_e2e:
        return False
    ttft = r.get("ttft_s") if r.get("ttft_s") is not None else r.get("server_ttft_s")
    return not (slo_ttft is not None and (ttft is None or ttft > slo_ttft))


def acceptance_per_position(records: Iterable[dict]) -> list[float]:
    """Accepted / drafted at each draft position, summed over requests."""
    acc: list[int] = []
    drafted: list[int] = []
    for r in records:
        for name, into in (("accepted_per_position", acc), ("drafted_per_position", drafted)):
            for i, v in enumerate(r.get(name) or ()):
                if i >= len(into):
                    into.append(0)
                into[i] += v
    return [a / d for a, d in zip(acc, drafted) if d]


def summarize(records: Sequence[dict], wall_s: float, *, slo_e2e: float | None = None,
              slo_ttft: float | None = None, price_per_hour: float | None = None) -> dict:
    """One level's figures. Failed requests count in no latency or rate, only in ``failures``."""
    ok = [r for r in records if r["ok"]]
    tokens = sum(r["completion_tokens"] for r in ok)
    failures = collections.Counter(r.get("status", "UNKNOWN") for r in records if not r["ok"])
    per_s = (lambda x: x / wall_s) if wall_s > 0 else (lambda x: 0.0)
    out = dict(requests=len(records), ok=len(ok), failed=len(records) - len(ok), failures=dict(sorted(failures.items())),
               short=sum(r["completion_tokens"] < r["max_tokens"] for r in ok), tokens=tokens, wall_s=wall_s,
               tok_s=per_s(tokens), req_s=per_s(len(ok)))
    out.update(distribution([r["latency_s"] for r in ok], "e2e"))
    client_ttft = [r["ttft_s"] for r in ok if r.get("ttft_s") is not None]
    out["ttft_source"] = "client" if client_ttft else "server"
    out.update(distribution(client_ttft or [r["server_ttft_s"] for r in ok if r.get("server_ttft_s") is not None],
                            "ttft"))
    out.update(distribution([g for r in ok for g in r.get("itl_s") or ()], "itl"))
    tpot = [(r["latency_s"] - r["ttft_s"]) / (r["completion_tokens"] - 1) for r in ok
            if r.get("ttft_s") is not None and r["completion_tokens"] > 1]
    out.update(distribution(tpot, "tpot"))
    # Client minus server end-to-end: network, (de)serialisation and queueing before the server's arrival stamp.
    overhead = [r["latency_s"] - r["server_e2e_s"] for r in ok if r.get("server_e2e_s") is not None]
    out.update(server_e2e_p50=percentile([r["server_e2e_s"] for r in ok if r.get("server_e2e_s") is not None], 50),
               client_overhead_p50=percentile(overhead, 50))
    good = [r for r in records if meets_slo(r, slo_e2e, slo_ttft)]
    if slo_e2e is not None or slo_ttft is not None:
        out.update(goodput_req_s=per_s(len(good)), slo_attainment=len(good) / len(records) if records else None)
    drafts, drafted, accepted = (sum(r.get(key, 0) for r in ok)
                                 for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"))
    out.update(num_drafts=drafts, num_draft_tokens=drafted, num_accepted_tokens=accepted,
               mean_acceptance_length=1 + accepted / drafts if drafts else None,
               acceptance_rate=accepted / drafted if drafted else None,
               acceptance_per_position=acceptance_per_position(ok))
    if price_per_hour is not None:
        out["cost_per_mtok"] = price_per_hour / 3600.0 / out["tok_s"] * 1e6 if out["tok_s"] else math.inf
    return out


def same_as_baseline(records: Sequence[dict], baseline: dict[str, str]) -> dict[tuple, float]:
    """(workload, config, load, level) -> share of requests whose tokens equal the baseline config's for the
    same prompt at the same level (greedy speculation must not change them). ``baseline`` maps a
    config name to its group's ``none`` config."""
    ref = {(r["workload"], r["config"], r["load"], r["level"], r["index"]): r.get("token_ids")
           for r in records if r["ok"]}
    pairs = collections.defaultdict(list)
    for r in records:
        base = baseline.get(r["config"])
        if base is None or base == r["config"] or not r["ok"]:
            continue
        want = ref.get((r["workload"], base, r["load"], r["level"], r["index"]))
        if want is not None:
            pairs[r["workload"], r["config"], r["load"], r["level"]].append(r.get("token_ids") == want)
    return {key: sum(v) / len(v) for key, v in pairs.items()}
