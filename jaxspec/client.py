"""Talk to a jaxspec gRPC server: ``python -m jaxspec.client "Once upon a time" --max-tokens 32``.

Streams the generated text to stdout as it arrives; --json prints the whole
response (token ids, usage, finish reason, speculation stats, timing) instead.
The prompt is read from stdin when it is omitted or "-".
"""

from __future__ import annotations

import argparse
import sys

import grpc
from google.protobuf import json_format

from serving.auth import load_token
from serving.client import JaxSpecClient
from serving.pb import jaxspec_pb2 as pb


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxspec.client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", default="-", help='prompt text ("-" or omitted: read stdin)')
    p.add_argument("--target", default="127.0.0.1:50051", help="server address HOST:PORT (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the full response as JSON (unary call)")
    p.add_argument("--info", action="store_true", help="print model and server info as JSON and exit")
    s = p.add_argument_group("sampling and stopping (unset: the server's defaults)")
    s.add_argument("--max-tokens", type=int)
    s.add_argument("--temperature", type=float, help="0 = greedy")
    s.add_argument("--top-p", type=float)
    s.add_argument("--top-k", type=int)
    s.add_argument("--min-p", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    s.add_argument("--stop-token-id", action="append", type=int, default=[], metavar="ID", help="(repeatable)")
    s.add_argument("--ignore-eos", action="store_true")
    s.add_argument("--no-speculation", action="store_true", help="plain decoding for this request")
    s.add_argument("--num-speculative-tokens", type=int, metavar="K")
    s.add_argument("--request-id", default="")
    c = p.add_argument_group("connection")
    c.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    c.add_argument("--auth-token-file", metavar="FILE", help="send the bearer token in FILE")
    c.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    c.add_argument("--tls-ca", metavar="PEM", help="use TLS trusting this CA / self-signed certificate")
    c.add_argument("--tls-server-name", metavar="NAME", help="expected certificate name (default: the host)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = JaxSpecClient(
        args.target, auth_token=load_token(args.auth_token_file) if args.auth_token_file else None,
        tls=args.tls, root_certificates=args.tls_ca, server_name_override=args.tls_server_name, timeout=args.timeout,
    )
    try:
        if args.info:
            for msg in (client.model_info(), client.server_info()):
                print(json_format.MessageToJson(msg, preserving_proto_field_name=True))
            return 0
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        kwargs = dict(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            min_p=args.min_p, seed=args.seed, stop=args.stop, stop_token_ids=args.stop_token_id,
            ignore_eos=args.ignore_eos, speculation=False if args.no_speculation else None,
            num_speculative_tokens=args.num_speculative_tokens, request_id=args.request_id,
        )
        if args.json:
            resp = client.generate(prompt, **kwargs)
            print(json_format.MessageToJson(resp, preserving_proto_field_name=True))
            return 0
        last = None
        for last in client.generate_stream(prompt, **kwargs):
            sys.stdout.write(last.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if last is not None and last.finish_reason:
            reason = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
            print(f"[{reason}; {last.usage.completion_tokens} tokens]", file=sys.stderr)
        return 0
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the stream is cancelled with the channel; the server frees the slot
        return 130
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
