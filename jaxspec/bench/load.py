"""Load generators: closed-loop concurrency and open-loop Poisson arrivals over gRPC.

Every request gets a record whatever happens: a refused or failed RPC is counted under its gRPC
status, an unfinished one under its finish reason; nothing a server does stops the level.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from jaxspec.bench.stats import poisson_arrivals
from jaxspec.bench.workloads import BenchRequest

OK_FINISH = ("LENGTH", "STOP", "EOS")


@dataclasses.dataclass(frozen=True)
class Target:
    """Where requests go and how: address, TLS/auth like ``serving.client``, per-request options."""
    address: str
    tls: bool = False
    root_certificates: str | None = None
    server_name_override: str | None = None
    auth_token: str | None = None

    def client(self):
        from serving.client import JaxSpecClient

        return JaxSpecClient(self.address, auth_token=self.auth_token, tls=self.tls,
                             root_certificates=self.root_certificates, server_name_override=self.server_name_override)


@dataclasses.dataclass(frozen=True)
class SendOptions:
    stream: bool = False  # streaming: client-side TTFT and inter-token latency
    temperature: float = 0.0
    request: tuple[tuple[str, object], ...] = ()  # extra build_request keywords (speculation options)
    timeout_s: float = 600.0  # RPC deadline: a safety net for a stuck server


def _seconds(ts) -> float:
    return ts.seconds + ts.nanos * 1e-9


def _finish(rec: dict, last, t_send: float) -> dict:
    from serving.pb import jaxspec_pb2 as pb

    rec["status"] = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_")
    rec["ok"] = rec["status"] in OK_FINISH
    rec["completion_tokens"] = last.usage.completion_tokens
    if last.HasField("speculation"):
        s = last.speculation
        rec.update(num_drafts=s.num_drafts, num_draft_tokens=s.num_draft_tokens,
                   num_accepted_tokens=s.num_accepted_tokens, accepted_per_position=list(s.accepted_per_position),
                   drafted_per_position=list(s.drafted_per_position))
    if last.HasField("timing") and last.timing.HasField("arrival_time"):
        t = last.timing
        arrival = _seconds(t.arrival_time)
        rec["server_arrival_s"] = arrival  # the server's clock: comparable across one server's records
        if t.HasField("last_token_time"):
            rec["server_e2e_s"] = _seconds(t.last_token_time) - arrival
        if t.HasField("first_token_time"):
            rec["server_ttft_s"] = _seconds(t.first_token_time) - arrival
    return rec


def send(client, req: BenchRequest, opts: SendOptions, t0: float) -> dict:
    """One request; returns its record (never raises for a server-side failure)."""
    import grpc

    kwargs = dict(max_tokens=req.max_tokens, temperature=opts.temperature, ignore_eos=True, **dict(opts.request))
    rec = dict(index=req.index, prompt_tokens=len(req.prompt), max_tokens=req.max_tokens, ok=False,
               completion_tokens=0)
    t = time.perf_counter()
    rec["start_s"] = t - t0
    try:
        if not opts.stream:
            r = client.generate(list(req.prompt), timeout=opts.timeout_s, **kwargs)
            rec.update(latency_s=time.perf_counter() - t, token_ids=list(r.token_ids))
            return _finish(rec, r, t)
        ids, gaps, last, prev, ttft = [], [], None, t, None
        for msg in client.generate_stream(list(req.prompt), timeout=opts.timeout_s, **kwargs):
            now = time.perf_counter()
            if msg.token_ids:
                if ttft is None:
                    ttft = now - t
                else:  # a message carrying n tokens (speculation) after a gap g: n gaps of g / n
                    gaps += [(now - prev) / len(msg.token_ids)] * len(msg.token_ids)
                prev = now
                ids += msg.token_ids
            last = msg
        rec.update(latency_s=time.perf_counter() - t, ttft_s=ttft, itl_s=gaps, token_ids=ids)
        if last is None:
            rec.update(status="EMPTY_STREAM", error="the stream ended without a message")
            return rec
        return _finish(rec, last, t)
    except grpc.RpcError as e:
        rec.update(latency_s=time.perf_counter() - t, status=e.code().name, error=e.details())
    except Exception as e:  # a client-side bug still gives a record, and the level goes on
        rec.update(latency_s=time.perf_counter() - t, status=type(e).__name__, error=str(e))
    return rec


Progress = Callable[[dict], None]


def closed_loop(target: Target, requests: Sequence[BenchRequest], concurrency: int, n: int, time_limit: float,
                opts: SendOptions, progress: Progress | None = None) -> tuple[list[dict], float]:
    """``concurrency`` independent clients, each sending its next request when its last one returns,
    until ``n`` were sent (none started after ``time_limit``). Request j is ``requests[j % len]``.
    Returns (records sorted by index, wall seconds from the first send to the last reply)."""
    lock, claimed, records = threading.Lock(), [0], []
    t0 = time.perf_counter()
    deadline = t0 + time_limit

    def worker() -> None:
        with target.client() as client:  # a channel each, as independent clients have
            while True:
                with lock:
                    if claimed[0] >= n or time.perf_counter() >= deadline:
                        return
                    j = claimed[0]
                    claimed[0] += 1
                rec = send(client, requests[j % len(requests)], opts, t0)
                rec["seq"] = j
                with lock:
                    records.append(rec)
                if progress:
                    progress(rec)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sorted(records, key=lambda r: r["seq"]), time.perf_counter() - t0


def open_loop(target: Target, requests: Sequence[BenchRequest], rate: float, n: int, time_limit: float,
              opts: SendOptions, seed: int, max_inflight: int = 256,
              progress: Progress | None = None) -> tuple[list[dict], float]:
    """Poisson arrivals at ``rate`` requests/s: request j is sent at its scheduled time whatever the
    server's state (up to ``max_inflight`` at once; later sends are late, and their lateness is
    recorded as ``send_lag_s``, which also measures this client's own overhead)."""
    schedule = [s for s in poisson_arrivals(rate, n, seed) if s < time_limit]
    local = threading.local()
    clients, clients_lock = [], threading.Lock()
    records: list[dict] = []
    t0 = time.perf_counter()

    def run(j: int, when: float) -> None:
        if not hasattr(local, "client"):
            local.client = target.client()
            with clients_lock:
                clients.append(local.client)
        rec = send(local.client, requests[j % len(requests)], opts, t0)
        rec.update(seq=j, scheduled_s=when, send_lag_s=rec["start_s"] - when)
        records.append(rec)  # list.append is atomic
        if progress:
            progress(rec)

    with ThreadPoolExecutor(max_workers=max_inflight) as pool:
        for j, when in enumerate(schedule):
            delay = t0 + when - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(run, j, when)
    for c in clients:
        c.close()
    return sorted(records, key=lambda r: r["seq"]), time.perf_counter() - t0


def warm(target: Target, requests: Sequence[BenchRequest], opts: SendOptions) -> list[dict]:
    """The warm-up requests, two at a time (compiles nothing new on a warmed server; fills caches)."""
    if not requests:
        return []
    recs, _ = closed_loop(target, requests, min(2, len(requests)), len(requests), opts.timeout_s, opts)
    return recs


def wait_serving(target: Target, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Until the server's health is SERVING (it reports so only after warm-up compiled every step)."""
    import grpc

    deadline = time.monotonic() + timeout
    with target.client() as client:
        while time.monotonic() < deadline:
            if not alive():
                raise RuntimeError("the server exited before it was SERVING")
            try:
                if client.health(timeout=2.0) == "SERVING":
                    return
            except grpc.RpcError:  # not listening yet
                pass
            time.sleep(0.25)
    raise TimeoutError(f"{target.address} not SERVING after {timeout:.0f}s")
