"""A stub jaxspec.v1 server that answers at once: it measures the bench's own overhead, and lets tests
check that refused or failing requests are counted rather than fatal.

    python -m jaxspec.bench stub --port 50099 [--fail-every N] &
    python -m jaxspec.bench --server 127.0.0.1:50099 --configs none --workload synthetic:in=8,out=1 \\
        --concurrency 16 --requests 2000 --no-plots

Generate returns ``max_tokens`` copies of token id 5 with finish reason LENGTH and server timestamps;
GenerateStream sends them one message per token. With ``--fail-every N`` every N-th request is
refused with RESOURCE_EXHAUSTED (what a full waiting queue answers).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import threading
import time
from concurrent import futures

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from serving.pb import jaxspec_pb2 as pb
from serving.pb import jaxspec_pb2_grpc as pb_grpc


def _now() -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


class StubServicer(pb_grpc.JaxSpecServicer):
    def __init__(self, fail_every: int = 0, spec_method: str = "none"):
        self.fail_every = fail_every
        self.spec_method = spec_method
        self._count = itertools.count(1)
        self._lock = threading.Lock()
        self.seen = collections.Counter()  # requests by their speculation options
        self.order: list[str] = []  # the same, in arrival order

    def _admit(self, request, context) -> None:
        spec = request.speculation
        key = ("off" if spec.HasField("enabled") and not spec.enabled else
               f"k={spec.num_speculative_tokens}" if spec.HasField("num_speculative_tokens") else "default")
        with self._lock:
            n = next(self._count)
            self.seen[key] += 1
            self.order.append(key)
        if self.fail_every and n % self.fail_every == 0:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "stub: waiting queue is full")

    def Generate(self, request, context):
        self._admit(request, context)
        arrival = _now()
        n = request.stopping.max_tokens or 1
        return pb.GenerateResponse(request_id=request.request_id, token_ids=[5] * n, finished=True,
                                   usage=pb.Usage(prompt_tokens=len(request.token_ids.ids), completion_tokens=n),
                                   finish_reason=pb.FINISH_REASON_LENGTH,
                                   timing=pb.Timing(arrival_time=arrival, first_token_time=_now(),
                                                    last_token_time=_now()))

    def GenerateStream(self, request, context):
        self._admit(request, context)
        arrival = _now()
        n = request.stopping.max_tokens or 1
        for i in range(n):
            last = i == n - 1
            yield pb.GenerateResponse(request_id=request.request_id, token_ids=[5], finished=last,
                                      usage=pb.Usage(prompt_tokens=len(request.token_ids.ids), completion_tokens=i + 1),
                                      finish_reason=pb.FINISH_REASON_LENGTH if last else 0,
                                      timing=pb.Timing(arrival_time=arrival, first_token_time=arrival,
                                                       last_token_time=_now()) if last else None)

    def GetModelInfo(self, request, context):
        return pb.ModelInfo(model_id="stub", context_length=4096, vocab_size=4096, spec_method=self.spec_method,
                            num_slots=1, platform="cpu", dtype="float32")


def start(port: int = 0, fail_every: int = 0, workers: int = 32) -> tuple[grpc.Server, int, StubServicer]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    servicer = StubServicer(fail_every)
    pb_grpc.add_JaxSpecServicer_to_server(servicer, server)
    status = health.HealthServicer()
    status.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(status, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, port, servicer


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m jaxspec.bench stub", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--fail-every", type=int, default=0, metavar="N")
    args = p.parse_args(argv)
    server, port, _ = start(args.port, args.fail_every)
    print(f"stub listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
