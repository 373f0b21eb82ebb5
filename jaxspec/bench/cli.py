"""``python -m jaxspec.bench``: latency distributions under load, per speculation configuration.

    # self-contained: one server per configuration, the same requests replayed against each
    python -m jaxspec.bench --configs none draft:k=2 draft:k=4 draft:auto ngram:k=4 \\
        --workload code edit --concurrency 1 2 4 8 16 --out bench-results/cpu
    # MoE vs dense: serve flags per configuration
    python -m jaxspec.bench --configs none "draft:auto" "dense=none --model builtin-dense" \\
        "dense-auto=draft:auto --model builtin-dense" --workload code
    # a running deployment (TLS, token): configurations become per-request speculation options
    python -m jaxspec.bench --server tpu-vm:50051 --tls --auth-token-file token.txt \\
        --configs none draft:k=2 draft:k=4 --rate 0.5 1 2 4 --stream --slo-e2e 2.0
    # accelerators on paper
    python -m jaxspec.bench predict --model mixtral-8x7b --mesh tpu-v5e-8 --acceptance 0.7

Each level is closed-loop (``--concurrency``: that many clients, each sending its next request when
its last one returns) or open-loop (``--rate``: Poisson arrivals at that many requests/s, sent
whatever the server's state), bounded by ``--requests`` and ``--time-limit``; warm-up requests are
not counted. Every request gets a record, failures included (by gRPC status or finish reason).

Configurations run one after another by default (one server at a time). On a shared or thermally
limited machine the speed drifts over a run, and a ratio between two configurations measured minutes
apart carries that drift: ``--interleave`` starts every configuration's server first and runs each
level against all of them in turn, the order rotated each pass, and ``--rounds R`` repeats each level
R times (pooled), so the drift falls on every configuration alike.

Writes to ``--out``: ``results.json`` (every request's record, every level's summary, the run's
settings and machine), ``report.md`` (the tables) and PNG plots (with matplotlib installed:
``pip install jaxspec[bench]``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

from jaxspec.bench import report, stats
from jaxspec.bench.configs import USAGE, BenchConfig, baseline_of, parse_config
from jaxspec.bench.load import SendOptions, Target, closed_loop, open_loop, warm
from jaxspec.bench.workloads import WORKLOAD_USAGE, context_length, make_workload, tokenizer_for


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxspec.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    w = p.add_argument_group("what runs")
    w.add_argument("--configs", nargs="+", default=None, metavar="CONFIG",
                   help=f"{USAGE}. Default: none draft:k=2 draft:k=4 draft:auto (with --server: the server's "
                        "own setting)")
    w.add_argument("--model", default="builtin", help="--model for the servers (and the tokenizer of the prompts)")
    w.add_argument("--serve-args", default="", help="flags for every server (a configuration's own come after)")
    w.add_argument("--server", default=None, metavar="HOST:PORT", help="measure this running server instead")
    w.add_argument("--tls", action="store_true", help="--server speaks TLS (system roots unless --root-certificates)")
    w.add_argument("--root-certificates", default=None, metavar="PEM")
    w.add_argument("--server-name-override", default=None, metavar="NAME")
    w.add_argument("--auth-token-file", default=None, metavar="FILE", help="send 'authorization: Bearer <token>'")
    t = p.add_argument_group("traffic")
    t.add_argument("--workload", nargs="+", default=["code"], help=WORKLOAD_USAGE)
    t.add_argument("--concurrency", type=int, nargs="*", default=None, metavar="C",
                   help="closed-loop levels (default 1 2 4 8 16 unless --rate is given)")
    t.add_argument("--rate", type=float, nargs="*", default=None, metavar="R", help="open-loop levels, requests/s")
    t.add_argument("--requests", type=int, default=32, help="requests per level (closed loop: at least the level)")
    t.add_argument("--time-limit", type=float, default=300.0, help="seconds a level may send for")
    t.add_argument("--rounds", type=int, default=1,
                   help="passes of each level per configuration, pooled in its row (walls added)")
    t.add_argument("--interleave", action="store_true",
                   help="start every configuration's server first, then run each level against all of them in "
                        "turn, the order rotated each pass: a drift in the machine's speed (another process, "
                        "the clock) then falls on every configuration alike. Needs memory (and an accelerator "
                        "that processes can share) for all the servers at once")
    t.add_argument("--warmup", type=int, default=2, help="uncounted requests per configuration and workload")
    t.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (code, edit, jsonl default)")
    t.add_argument("--temperature", type=float, default=0.0)
    t.add_argument("--stream", action="store_true", help="streaming RPCs: client-side TTFT and inter-token latency")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--corpus", default="stdlib", help="where code/edit/long prompts come from (its held-out split)")
    t.add_argument("--max-inflight", type=int, default=256, help="open loop: requests in flight at most")
    r = p.add_argument_group("reports")
    r.add_argument("--out", default=None, metavar="DIR", help="default: bench-results/<UTC time>")
    r.add_argument("--slo-e2e", type=float, default=None, metavar="S", help="goodput: requests done within S s")
    r.add_argument("--slo-ttft", type=float, default=None, metavar="S", help="goodput: and first token within S s")
    r.add_argument("--price-per-hour", type=float, default=None, metavar="USD", help="cost per million output tokens")
    r.add_argument("--no-plots", action="store_true")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--no-records", action="store_true", help="leave token ids out of results.json")
    s = p.add_argument_group("servers started by the bench")
    s.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to be SERVING")
    s.add_argument("--compilation-cache-dir", default=None, metavar="DIR")
    args = p.parse_args(argv)
    if args.configs is not None:
        try:
            args.configs = [parse_config(c) for c in args.configs]
        except ValueError as e:
            p.error(f"--configs: {e}")
        if len({c.name for c in args.configs}) != len(args.configs):
            p.error("--configs: two configurations have the same name (give one a LABEL=)")
        if args.server and any(c.serve_args for c in args.configs):
            p.error("--configs: serve flags need a server the bench starts; --server measures a running one")
    elif not args.server:
        args.configs = [parse_config(c) for c in ("none", "draft:k=2", "draft:k=4", "draft:auto")]
    if args.concurrency is None and args.rate is None:
        args.concurrency = [1, 2, 4, 8, 16]
    args.concurrency = sorted(set(args.concurrency or []))
    args.rate = sorted(set(args.rate or []))
    if any(c < 1 for c in args.concurrency) or any(x <= 0 for x in args.rate):
        p.error("--concurrency levels must be >= 1 and --rate levels > 0")
    if args.requests < 1 or args.max_tokens < 1 or args.warmup < 0 or args.max_inflight < 1 or args.rounds < 1:
        p.error("--requests, --max-tokens, --max-inflight and --rounds must be >= 1, --warmup >= 0")
    if (args.tls or args.root_certificates or args.auth_token_file) and not args.server:
        p.error("--tls, --root-certificates and --auth-token-file are for --server")
    return args


def levels(args) -> list[tuple[str, float]]:
    return [("concurrency", c) for c in args.concurrency] + [("rate", r) for r in args.rate]


def machine() -> dict:
    from importlib.metadata import version

    return dict(platform=platform.platform(), python=platform.python_version(), cpus=os.cpu_count(),
                jax=version("jax"), loadavg=os.getloadavg(), argv=sys.argv,
                utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


class Progress:
    """A progress bar per level (tqdm, on stderr), or nothing."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()

    def level(self, desc: str, total: int):
        if not self.enabled:
            return None, None
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr)
        return bar, (lambda rec: bar.update(1))


def send_options(cfg: BenchConfig, args) -> SendOptions:
    return SendOptions(stream=args.stream, temperature=args.temperature,
                       request=tuple(cfg.request_options().items()) if args.server else (),
                       timeout_s=args.time_limit + 300)


def warm_config(cfg: BenchConfig, target: Target, wl, args) -> None:
    warm_recs = warm(target, wl.warmup, send_options(cfg, args))
    if warm_recs and not any(r["ok"] for r in warm_recs):
        print(f"  warning: {cfg.name}: every warm-up request failed: {warm_recs[0].get('status')} "
              f"{warm_recs[0].get('error', '')}", flush=True)


def run_level(cfg: BenchConfig, target: Target, wl, load: str, lv: float, args, progress: Progress
              ) -> tuple[list, float]:
    """One pass of one level against one configuration: (records, wall seconds)."""
    opts = send_options(cfg, args)
    n = max(args.requests, int(lv)) if load == "concurrency" else args.requests
    bar, cb = progress.level(f"{cfg.name} {wl.name} {report.level_name(load, lv)}", n)
    if load == "concurrency":
        recs, wall = closed_loop(target, wl.requests, int(lv), n, args.time_limit, opts, cb)
    else:
        recs, wall = open_loop(target, wl.requests, lv, n, args.time_limit, opts, args.seed, args.max_inflight, cb)
    if bar is not None:
        bar.close()
    for rec in recs:
        rec.update(workload=wl.name, config=cfg.name, load=load, level=lv)
    return recs, wall


def level_row(cfg: BenchConfig, wl, load: str, lv: float, recs: list, wall: float, args) -> dict:
    """A level's summary over every pass of it (``--rounds``: records pooled, walls added)."""
    row = dict(workload=wl.name, config=cfg.name, load=load, level=lv,
               **stats.summarize(recs, wall, slo_e2e=args.slo_e2e, slo_ttft=args.slo_ttft,
                                 price_per_hour=args.price_per_hour))
    fails = f" ({', '.join(f'{k} {v}' for k, v in row['failures'].items())})" if row["failed"] else ""
    print(f"  {cfg.name} {wl.name} {report.level_name(load, lv)}: {row['tok_s']:.1f} tok/s, "
          f"P50 {report.fmt(row['e2e_p50'], '.3f')} s, P99 {report.fmt(row['e2e_p99'], '.3f')} s, "
          f"{row['failed']}/{row['requests']} failed{fails}", flush=True)
    return row


def interleaved_order(names: Sequence[str], turn: int) -> list[str]:
    """The configurations' order at a level's ``turn``-th pass: rotated by one each pass, so none is
    always measured first (a server's first level after another's ran on a machine in another state)."""
    k = turn % len(names) if names else 0
    return list(names[k:]) + list(names[:k])


def error_line(e: str) -> str:
    """The first line of a configuration's error and, for a server's log tail, its last line (the cause)."""
    lines = [x for x in e.splitlines() if x.strip()]
    return lines[0] + (f" ... {lines[-1].strip()}" if len(lines) > 1 else "") if lines else e


def write_reports(out: Path, args, argv, configs, records, rows, errors, servers, workloads, *, final: bool):
    """results.json and report.md from what was measured so far; plots and the printed report when final."""
    baselines = {c.name: b.name for c in configs if (b := baseline_of(c, list(configs)))}
    for key, same in stats.same_as_baseline(records, baselines).items():
        next(r for r in rows if (r["workload"], r["config"], r["load"], r["level"]) == key)["same_as_plain"] = same
    bar_list = report.bars(rows, configs)
    env = machine()
    command = shlex.join(["python", "-m", "jaxspec.bench", *(argv if argv is not None else sys.argv[1:])])
    header = (f"# jaxspec bench\n\n`{command}`\n\n{env['utc']}, {env['cpus']} CPUs, jax {env['jax']}, load average "
              f"{env['loadavg'][0]:.2f} at the end; {args.requests} requests per level; "
              + ("greedy" if args.temperature == 0 else f"temperature {args.temperature}")
              + (", streaming" if args.stream else ", unary") + ("" if final else "; **incomplete run**") + "\n\n")
    servers_md = "\n".join(f"- `{name}`: {s['model_id']} ({s['platform']}, {s['dtype']}), spec {s['spec_method']}"
                           f"{' + ' + s['draft_model_id'] if s['draft_model_id'] else ''}, {s['num_slots']} slots, "
                           f"load {s['load_before']:.2f} before" for name, s in servers.items())
    text = header + servers_md + "\n\n" + report.markdown(
        rows, configs, slo=args.slo_e2e is not None or args.slo_ttft is not None, cost=args.price_per_hour is not None)
    if bar_list:
        text += "\n### speculation bars\n\n" + report.bars_text(bar_list) + "\n"
    for name, e in errors.items():
        text += f"\nconfiguration `{name}` did not complete: {error_line(e)}\n"
    pngs = []
    if final and not args.no_plots and rows:
        try:
            pngs = report.plots(rows, configs, out)
        except ImportError:
            print("plots skipped: matplotlib is not installed (pip install 'jaxspec[bench]')", file=sys.stderr)
        text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n"
    (out / "report.md").write_text(text)
    saved = records
    if args.no_records:
        saved = [{k: v for k, v in rec.items() if k != "token_ids"} for rec in records]
    summary = dict(configs=[c.name for c in configs], levels=rows, bars=bar_list, config_errors=errors,
                   servers=servers, machine=env, workloads={w.name: w.describe() for w in workloads}, complete=final)
    settings = {k: ([c.name for c in v] if k == "configs" and v else v) for k, v in vars(args).items()}
    (out / "results.json").write_text(json.dumps(dict(settings=settings, records=saved, **summary), indent=1))
    if final:
        print("\n" + text)
        print(f"wrote {out / 'results.json'}, {out / 'report.md'}" + (f" and {len(pngs)} plots" if pngs else ""))
    return summary, pngs


def server_config(target: Target) -> BenchConfig:
    """The running server's own speculation setting, as the one configuration of a --server run."""
    with target.client() as client:
        info = client.model_info(timeout=30)
    method = info.spec_method or "none"
    return BenchConfig("server", method, "auto" if method != "none" else None)


def stop_on_sigterm() -> None:
    """SIGTERM (a timeout, an orchestrator) unwinds like ^C: the running server is stopped and what
    was measured is kept, instead of the process dying with a server left behind."""
    import signal
    import threading

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


class Run:
    """The configurations' servers (or the running one), what was measured, and what failed."""

    def __init__(self, args, argv, out: Path, configs, workloads, remote: Target | None):
        self.args, self.argv, self.out, self.configs, self.workloads, self.remote = (
            args, argv, out, configs, workloads, remote)
        self.records: list = []
        self.rows: list = []
        self.errors: dict[str, str] = {}
        self.servers: dict[str, dict] = {}
        self.targets: dict[str, tuple[Target, object]] = {}  # name -> (target, ServerProcess or None)

    def start(self, cfg: BenchConfig) -> Target:
        load_before = os.getloadavg()[0]
        server = None
        if self.remote is not None:
            target = self.remote
        else:
            from jaxspec.bench.server import ServerProcess

            # A configuration's own --model (MoE vs dense in one run) replaces the run's.
            flags = ([] if cfg.model else ["--model", self.args.model]) + [*shlex.split(self.args.serve_args),
                                                                           *cfg.serve_flags()]
            server = ServerProcess(flags, self.args.compilation_cache_dir)
            self.targets[cfg.name] = (None, server)  # stopped whatever happens next
            t = time.perf_counter()
            target = server.start(self.args.start_timeout)
            print(f"{cfg.name}: SERVING after {time.perf_counter() - t:.1f}s ({' '.join(flags)})", flush=True)
        self.targets[cfg.name] = (target, server)
        with target.client() as client:
            info = client.model_info(timeout=30)
        self.servers[cfg.name] = dict(model_id=info.model_id, spec_method=info.spec_method,
                                      draft_model_id=info.draft_model_id, num_slots=info.num_slots,
                                      platform=info.platform, dtype=info.dtype, context_length=info.context_length,
                                      max_speculative_tokens=info.max_speculative_tokens, load_before=load_before)
        return target

    def check_alive(self, cfg: BenchConfig) -> None:
        server = self.targets.get(cfg.name, (None, None))[1]
        if server is not None and not server.alive():
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.tail()}")

    def stop(self, name: str) -> None:
        server = self.targets.pop(name, (None, None))[1]
        if server is not None:
            server.stop()

    def stop_servers(self) -> None:
        for name in list(self.targets):
            self.stop(name)

    def failed(self, cfg: BenchConfig, e: Exception) -> bool:
        """Record a configuration's failure (True), or False for an exception that is not one."""
        if isinstance(e, (RuntimeError, TimeoutError, OSError)):
            self.errors[cfg.name] = str(e)
        else:
            import grpc

            if not isinstance(e, grpc.RpcError):
                return False
            self.errors[cfg.name] = f"{e.code().name}: {e.details()}"
        print(f"{cfg.name}: failed: {error_line(self.errors[cfg.name])}", file=sys.stderr, flush=True)
        return True

    def save(self) -> None:
        """The reports so far: a run cut short (a timeout, ^C) keeps what it measured."""
        write_reports(self.out, self.args, self.argv, self.configs, self.completed_records(), self.ordered_rows(),
                      self.errors, self.servers, self.workloads, final=False)

    def completed_records(self) -> list:
        return [r for r in self.records if r["config"] not in self.errors]

    def ordered_rows(self) -> list:
        """Rows of the configurations that completed, configuration by configuration as given."""
        order = {c.name: i for i, c in enumerate(self.configs)}
        return sorted((r for r in self.rows if r["config"] not in self.errors), key=lambda r: order[r["config"]])

    def sequential(self, progress: Progress) -> None:
        """One server at a time: every level of a configuration, then the next configuration."""
        for cfg in self.configs:
            if self._start_or_fail(cfg):
                self.measure([cfg], progress)
            self.stop(cfg.name)
            self.save()

    def interleaved(self, progress: Progress) -> None:
        """Every configuration's server up at once; each level runs against all of them in turn (the
        order rotated from pass to pass), so a change in the machine's speed during the run falls on
        every configuration alike instead of on whichever ran then."""
        self.measure([cfg for cfg in self.configs if self._start_or_fail(cfg)], progress)

    def _start_or_fail(self, cfg: BenchConfig) -> bool:
        try:
            self.start(cfg)
            return True
        except Exception as e:
            if not self.failed(cfg, e):
                raise
            self.stop(cfg.name)
            return False

    def measure(self, live: list, progress: Progress) -> None:
        """Every workload and level against the started configurations ``live``, each level
        ``args.rounds`` passes per configuration, taken in turns (``interleaved_order``). A
        configuration that fails is stopped and left out from then on; the reports are saved after
        every level."""
        live = list(live)

        def attempt(cfg: BenchConfig, fn):
            try:
                return fn()
            except Exception as e:  # this configuration is lost; the others still run
                if not self.failed(cfg, e):
                    raise
                live.remove(cfg)
                self.stop(cfg.name)
                return None

        turn = 0
        for wl in self.workloads:
            for cfg in list(live):
                attempt(cfg, lambda: warm_config(cfg, self.targets[cfg.name][0], wl, self.args))
            for load, lv in levels(self.args):
                got: dict[str, tuple[list, float]] = {}
                for _ in range(self.args.rounds):
                    by_name = {c.name: c for c in live}
                    for name in interleaved_order(list(by_name), turn):
                        cfg = by_name[name]

                        def one_pass():
                            out = run_level(cfg, self.targets[name][0], wl, load, lv, self.args, progress)
                            self.check_alive(cfg)
                            return out

                        if (res := attempt(cfg, one_pass)) is not None:
                            prev = got.get(name, ([], 0.0))
                            got[name] = (prev[0] + res[0], prev[1] + res[1])
                    turn += 1
                for cfg in live:
                    recs, wall = got[cfg.name]
                    self.records += recs
                    self.rows.append(level_row(cfg, wl, load, lv, recs, wall, self.args))
                self.save()


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out or f"bench-results/{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    out.mkdir(parents=True, exist_ok=True)
    remote = None
    if args.server:
        token = Path(args.auth_token_file).read_text().strip() if args.auth_token_file else None
        remote = Target(args.server, tls=args.tls, root_certificates=args.root_certificates,
                        server_name_override=args.server_name_override, auth_token=token)
        with remote.client() as client:
            info = client.model_info(timeout=30)
        context = info.context_length
        configs = args.configs or [server_config(remote)]
    else:
        configs = args.configs
        models = {c.model or args.model for c in configs}
        context = min(context_length(m) for m in models)
        vocab = {tokenizer_for(m).vocab_size for m in models}
        if len(vocab) > 1:
            raise SystemExit("error: the configurations' models have different tokenizers; bench them separately")
    tok = tokenizer_for(args.model if remote is not None else configs[0].model or args.model)
    try:
        workloads = [make_workload(w, tok, args.requests if not args.concurrency else
                                   max(args.requests, max(args.concurrency)), args.max_tokens, args.seed,
                                   context=context, corpus=args.corpus, warmup=args.warmup) for w in args.workload]
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    for wl in workloads:
        print(wl.describe(), flush=True)
    progress = Progress(not args.no_progress)
    run = Run(args, argv, out, configs, workloads, remote)
    try:
        if args.interleave:
            run.interleaved(progress)
        else:
            run.sequential(progress)
    finally:
        run.stop_servers()
    records, rows, errors, servers = run.completed_records(), run.ordered_rows(), run.errors, run.servers
    summary, pngs = write_reports(out, args, argv, configs, records, rows, errors, servers, workloads, final=True)
    return dict(summary, out=str(out), plots=[str(p) for p in pngs])
