"""The prepared accelerator check: one command, about 10 minutes, results written under docs/device/.

    pip install -e ".[gpu,test]"     # or ".[tpu,test]": the documented extras, nothing else by hand
    python tools/device_check.py     # --out DIR (default docs/device/<device>-<date>), --quick

Stages, each bounded by its own timeout so that one slow stage cannot eat the others' time:
  1. kernels   the Pallas kernel tests, compiled for this accelerator (JAXSPEC_KERNELS_COMPILED=1;
               the other backend's variants stay in the interpreter)
  2. kernels   tools/bench_kernels.py at full size (Pallas vs XLA grouped matmul, verification kernels)
  3. predict   python -m jaxspec.bench predict --validate for the mid-size MoE (measured vs roofline)
  4. decode    tools/bench_decode.py on that MoE: one jitted step at batch 1/8/32 and 1 or 5 tokens
               (a k=4 verification) beside the bytes it must read, XLA ragged_dot vs the Pallas dispatch
  5. serving   python -m jaxspec.bench on a random 334M-parameter MoE (configs/models/bench-moe-330m.json,
               bfloat16, 108M active) with a random 2M draft: plain, draft k=2/4, adaptive, n-gram k=4, at
               concurrency 1, 4 and 16. Random weights: acceptance is near zero, so this measures what a
               step costs (and whether adaptive k turns speculation off), not a speed-up.
  6. builtin   the same sweep on the built-in code model and its draft (trained here: real acceptance),
               plain, draft k=4, adaptive draft, EAGLE-3 k=4 and n-gram k=4, at concurrency 1 and 8.
A summary (summary.md, summary.json) lists each stage's outcome, time and the figures it produced.
Runs on CPU too (``--allow-cpu``, with tiny sizes) so that the script itself is tested here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("kernel-tests", "kernel-bench", "predict", "decode", "serving", "builtin")
KERNEL_TESTS = ["tests/test_kernel_gmm.py", "tests/test_kernel_rejection.py", "tests/test_kernel_attention.py",
                "tests/test_kernel_paged_attention.py", "tests/test_kernel_gmm_int8.py"]


def stage(name: str, cmd: list[str], timeout: float, log: Path, env: dict | None = None) -> dict:
    print(f"== {name}: {' '.join(cmd)} (timeout {timeout:.0f}s)", flush=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        # Its own process group: on a timeout the stage's children (the bench's servers) go with it.
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, **(env or {})))
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # the bench stops its server and writes what it measured
            try:
                proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = "timeout"
    took = time.perf_counter() - t
    tail = log.read_text(errors="replace").splitlines()[-15:]
    print(f"   -> {rc} in {took:.0f}s\n   " + "\n   ".join(tail[-5:]), flush=True)
    return dict(stage=name, cmd=cmd, returncode=rc, seconds=round(took, 1), log=log.name, tail=tail)


def chip_name() -> str:
    """This host's accelerator in the predictor's chip table (jaxspec/bench/chips.py)."""
    import jax

    kind = jax.devices()[0].device_kind.lower()
    for needle, name in (("h200", "h200"), ("h100", "h100"), ("v5p", "tpu-v5p"), ("v5 lite", "tpu-v5e"),
                         ("v5e", "tpu-v5e")):
        if needle in kind:
            return name
    raise SystemExit(f"no chip-table entry for {kind!r}: add one to jaxspec/bench/chips.py")


def device_name() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}-{d.device_kind}".lower().replace(" ", "-")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="smaller stages (about 3 minutes)")
    p.add_argument("--allow-cpu", action="store_true", help="run on a CPU with tiny sizes (tests the script)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--timeout", nargs="+", default=[], metavar="STAGE=SECONDS",
                   help="override a stage's time limit (to fit a short accelerator lease)")
    args = p.parse_args(argv)
    limits = {}
    for item in args.timeout:
        name, _, sec = item.partition("=")
        if name not in STAGES or not sec.replace(".", "", 1).isdigit():
            p.error(f"--timeout {item!r}: expected STAGE=SECONDS with STAGE one of {', '.join(STAGES)}")
        limits[name] = float(sec)
    import jax

    platform = jax.default_backend()
    if platform == "cpu" and not args.allow_cpu:
        print("no accelerator: this check is for a GPU/TPU host (--allow-cpu runs it with tiny sizes)")
        return 2
    cpu = platform == "cpu"
    out = Path(args.out or ROOT / "docs" / "device" / f"{device_name()}-{datetime.date.today().isoformat()}")
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    model, draft = ("tiny-moe", "tiny-dense") if cpu else ("bench-moe-330m", "bench-draft-2m")
    small = cpu or args.quick
    stages = []
    # The TPU variants stay in the interpreter on a GPU (CI runs them there already), and vice versa.
    other = "tpu" if platform == "gpu" else "gpu"
    kernel_tests = [py, "-m", "pytest", "-v", "-p", "no:cacheprovider", *KERNEL_TESTS] + (
        ["-m", "not slow"] if small else []) + ([] if cpu else ["-k", f"not {other}"])
    run = set(args.stages)
    if "kernel-tests" in run:
        stages.append(stage("kernel tests (compiled)", kernel_tests, limits.get("kernel-tests", 150 if small else 200), out / "kernel_tests.log",
                        # tests/conftest.py defaults JAX_PLATFORMS to cpu: name this accelerator instead.
                        {"JAXSPEC_KERNELS_COMPILED": "1", "JAX_PLATFORMS": {"gpu": "cuda"}.get(platform, platform)}))
    bench_k = [py, "tools/bench_kernels.py", "--json", str(out / "kernels.json")]
    bench_k += ["--scale", "16", "--interpret", "--iters", "2"] if cpu else ["--iters", "5" if small else "10"]
    if "kernel-bench" in run:
        stages.append(stage("kernel benchmark", bench_k, limits.get("kernel-bench", 120), out / "kernels.log"))
    # Measured forwards of the mid-size MoE and its draft beside the roofline's prediction for this chip.
    predict = [py, "-m", "jaxspec.bench", "predict", "--validate", "--validate-models", model, draft,
               "--reps", "5" if small else "20", "--json", str(out / "predict.json")]
    if not cpu:
        predict += ["--chip", chip_name()]
    if "predict" in run:
        stages.append(stage("roofline prediction vs measured", predict, limits.get("predict", 90), out / "predict.log"))
    decode = [py, "tools/bench_decode.py", "--model", model, "--batch", *(["1", "4"] if cpu else ["1", "8", "32"]),
              "--tokens", "1", "5", "--backends", "ragged", "pallas", "--prefill", "64" if cpu else "512",
              "--iters", "3" if cpu else "20"]
    if "decode" in run:
        stages.append(stage("decode step cost", decode, limits.get("decode", 120), out / "decode.log"))
    # 8 slots and a 512-token context keep the compiled shapes (row buckets x spans x k) few enough to
    # compile within the stage's time; the bench's compilation cache carries the shared ones across servers.
    serve = ["--slots", "4" if cpu else "8"] + ([] if cpu else ["--max-len", "512", "--dtype", "bfloat16"])
    levels = ["1", "4"] if small else ["1", "4", "8"]
    bench = [py, "-m", "jaxspec.bench", "--model", model, "--configs", "none", f"draft-k2=draft:k=2 --draft {draft}",
             f"draft-k4=draft:k=4 --draft {draft}", f"draft-auto=draft:auto --draft {draft}", "ngram:k=4",
             "--serve-args", " ".join(serve),
             "--workload",
             "synthetic:in=256,out=64,text=repeat" if not cpu else "synthetic:in=16,out=8,text=repeat",
             "--concurrency", *levels, "--requests", "8" if small else "16", "--out", str(out / "serving"),
             "--no-progress", "--start-timeout", "240", "--time-limit", "60"]
    if "serving" in run:
        shutil.rmtree(out / "serving", ignore_errors=True)  # never report an earlier run's figures
        stages.append(stage("served decode + speculation sweep", bench, limits.get("serving", 240 if small else 330), out / "serving.log"))
    # The built-in pair was trained here, so its acceptance is real: whether speculation pays on this chip.
    builtin = [py, "-m", "jaxspec.bench", "--model", "builtin", "--configs", "none", "draft:k=4", "draft:auto",
               "eagle3:k=4", "ngram:k=4", "--serve-args", "--slots 8", "--workload", "code",
               "--max-tokens", "16" if cpu else "64", "--concurrency", *(["1"] if cpu else ["1", "8"]),
               "--requests", "4" if cpu else "16", "--out", str(out / "builtin"), "--no-progress",
               "--start-timeout", "240", "--time-limit", "60"]
    if "builtin" in run:
        shutil.rmtree(out / "builtin", ignore_errors=True)
        stages.append(stage("built-in pair, served", builtin, limits.get("builtin", 300), out / "builtin.log"))
    summary = dict(device=device_name(), jax=jax.__version__, utc=datetime.datetime.now(datetime.timezone.utc)
                   .isoformat(timespec="seconds"), stages=stages)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = [f"# Device check: {summary['device']}", "", f"{summary['utc']}, jax {summary['jax']}; "
             f"`python tools/device_check.py{' --quick' if args.quick else ''}`", "",
             "| stage | result | seconds | log |", "|---|---|---:|---|"]
    lines += [f"| {s['stage']} | {'ok' if s['returncode'] == 0 else s['returncode']} | {s['seconds']} | "
              f"`{s['log']}` |" for s in stages]
    for s in stages:
        lines += ["", f"## {s['stage']}", "", "```", *s["tail"], "```"]
    for name in ("serving", "builtin"):
        report = out / name / "report.md"
        if report.exists():
            lines += ["", f"## {name} report", "", report.read_text().replace("](", f"]({name}/")]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'summary.md'}")
    return 0 if all(s["returncode"] == 0 for s in stages) else 1


if __name__ == "__main__":
    raise SystemExit(main())
