"""A follower's own health and metrics endpoint (``--metrics-port`` on processes 1..N-1).

Followers serve no gRPC, yet an orchestrator probes every pod and a dashboard wants to see
that every host keeps up with the leader. ``FollowerStatus`` counts the calls this process
replays and serves, on one HTTP port:

  GET /health   200 while following with a live leader, else 503; JSON body
                {"status", "process_id", "replayed_calls", "last_record", "decode_steps_by_kb",
                 "seconds_since_last_call",
                 "leader_heartbeat_age_s"}
  GET /metrics  Prometheus text, ``jaxspec_follower_`` metrics (below)

The leader beats in the key-value store every second, as followers do for it; a follower whose
leader has been silent for ``LEADER_SILENT_S`` reports 503 (the job is broken; JAX's own
heartbeat will end it).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

LEADER_SILENT_S = 10.0

LOADING, FOLLOWING, STOPPED, FAILED = "LOADING", "FOLLOWING", "STOPPED", "FAILED"


class FollowerStatus:
    """What a follower has replayed and when it last heard from the leader. Thread-safe: the
    replay loop, the heartbeat thread and the HTTP server's threads all touch it."""

    def __init__(self, process_id: int, clock=time.monotonic):
        self.process_id = process_id
        self.clock = clock
        self.state = LOADING
        self._lock = threading.Lock()
        self._last_call: float | None = None
        self._replayed = 0
        self._seq = 0
        self._leader_beat: tuple[int, float] | None = None  # (count, when it last changed)
        self._started = clock()
        self._http: ThreadingHTTPServer | None = None
        r = self.registry = CollectorRegistry()
        self.calls = Counter("jaxspec_follower_replayed_calls", "Leader calls replayed on this process, by call",
                             ["call"], registry=r)
        self.failures = Counter("jaxspec_follower_failed_calls", "Replayed calls that raised on this process, by call",
                                ["call"], registry=r)
        self.last_record = Gauge("jaxspec_follower_last_record", "Sequence number of the last record received",
                                 registry=r)
        self.decode_steps = Counter("jaxspec_follower_decode_steps",
                                    "Decode steps replayed, by the proposal length kb they ran (the leader's plan)",
                                    ["kb"], registry=r)
        self._decode_kb: dict[int, int] = {}
        self.call_seconds = Gauge("jaxspec_follower_last_call_duration_seconds", "Wall time of the last replayed call",
                                  registry=r)
        Gauge("jaxspec_follower_seconds_since_last_call", "Seconds since the last replayed call ended (-1: none yet)",
              registry=r).set_function(lambda: self.seconds_since_last_call() or -1.0)
        Gauge("jaxspec_follower_leader_heartbeat_age_seconds",
              "Seconds since the leader's heartbeat last moved (since following began, before the first)",
              registry=r).set_function(self.leader_heartbeat_age)
        Gauge("jaxspec_follower_up", "1 while following with a live leader, else 0",
              registry=r).set_function(lambda: 1.0 if self.healthy() else 0.0)

    # ------------------------------------------------------------- updates
    def set_state(self, state: str) -> None:
        with self._lock:
            self.state = state
            if state == FOLLOWING:
                self._started = self.clock()

    def replayed(self, call: str, seq: int, seconds: float, ok: bool) -> None:
        self.calls.labels(call).inc()
        if not ok:
            self.failures.labels(call).inc()
        self.last_record.set(seq)
        self.call_seconds.set(seconds)
        with self._lock:
            self._last_call = self.clock()
            self._replayed += 1
            self._seq = seq

    def decoded(self, kb: int) -> None:
        """A replayed decode step ran proposal length ``kb`` (0: no drafts verified)."""
        self.decode_steps.labels(str(kb)).inc()
        with self._lock:
            self._decode_kb[kb] = self._decode_kb.get(kb, 0) + 1

    def leader_beat(self, count: int) -> None:
        with self._lock:
            if self._leader_beat is None or self._leader_beat[0] != count:
                self._leader_beat = (count, self.clock())

    # -------------------------------------------------------------- reads
    def seconds_since_last_call(self) -> float | None:
        with self._lock:
            return None if self._last_call is None else self.clock() - self._last_call

    def leader_heartbeat_age(self) -> float:
        with self._lock:
            since = self._started if self._leader_beat is None else self._leader_beat[1]
            return self.clock() - since

    def healthy(self) -> bool:
        return self.state == FOLLOWING and self.leader_heartbeat_age() <= LEADER_SILENT_S

    def health(self) -> dict:
        since = self.seconds_since_last_call()
        return {
            "status": ("SERVING" if self.healthy() else "NOT_SERVING"), "state": self.state,
            "process_id": self.process_id,
            "replayed_calls": self._replayed, "last_record": self._seq,
            "decode_steps_by_kb": {str(kb): n for kb, n in sorted(self._decode_kb.items())},
            "seconds_since_last_call": None if since is None else round(since, 3),
            "leader_heartbeat_age_s": round(self.leader_heartbeat_age(), 3),
        }

    # --------------------------------------------------------------- HTTP
    def serve_http(self, host: str, port: int) -> int:
        """Serve /health and /metrics on a daemon thread; returns the bound port (0: a free one)."""
        status = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802  (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/health":
                    body = json.dumps(status.health()).encode()
                    code, ctype = (200 if status.healthy() else 503), "application/json"
                elif path == "/metrics":
                    body, code, ctype = generate_latest(status.registry), 200, CONTENT_TYPE_LATEST
                else:
                    body, code, ctype = b"not found: /health or /metrics\n", 404, "text/plain"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # probes every few seconds: not worth a log line each
                pass

        self._http = ThreadingHTTPServer((host, port), Handler)
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, name="jaxspec-follower-http", daemon=True).start()
        return int(self._http.server_address[1])

    def shutdown(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
