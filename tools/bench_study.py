"""Regenerate docs/benchmarks.md: MoE vs dense built-in targets x {plain, draft k=2, draft k=4, draft
adaptive, n-gram k=4} x concurrency {1, 2, 4, 8, 16} on the code, edit and long workloads.

    python tools/bench_study.py                       # the study (about 30 min on 2 quiet cores)
    python tools/bench_study.py --quick               # 4 requests per level, levels 1 and 4: a smoke run

One ``python -m jaxspec.bench`` run (every configuration's server sees the same requests), its
report and plots under docs/benchmarks/, then docs/benchmarks.md is rewritten around them. The
hand-written reading between the ``reading`` markers of the existing docs/benchmarks.md is kept
(it names the run it was written for; re-read it against the new tables).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
OUT = ROOT / "docs" / "benchmarks"
SPEC = ("none", "draft:k=2", "draft:k=4", "draft:auto", "ngram:k=4")
READING = re.compile(r"<!-- reading -->\n(.*?)<!-- /reading -->", re.S)


def configs(dense: bool) -> list[str]:
    """The MoE configurations by their method names; the dense ones labelled dense-<method>."""
    out = list(SPEC)
    if dense:
        out += [f"dense-{s.replace(':k=', '-k').replace(':', '-')}={s} --model builtin-dense" for s in SPEC]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-dense", action="store_true", help="the MoE pair only")
    args = p.parse_args(argv)
    levels = ["1", "4"] if args.quick else ["1", "2", "4", "8", "16"]
    requests = "4" if args.quick else "16"
    if OUT.exists():
        shutil.rmtree(OUT)
    cmd = [sys.executable, "-m", "jaxspec.bench", "--configs", *configs(not args.no_dense), "--workload", "code",
           "edit", "long", "--concurrency", *levels, "--requests", requests, "--max-tokens", "64",
           "--out", str(OUT), "--no-records"]
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    minutes = (time.perf_counter() - t) / 60
    report = (OUT / "report.md").read_text()
    report = re.sub(r"!\[([^]]*)\]\(([^)]+)\)", r"![\1](benchmarks/\2)", report)  # plots live one level down
    report = report.replace("# jaxspec bench\n", "## The run\n", 1)
    old = DOC.read_text() if DOC.exists() else ""
    m = READING.search(old)
    reading = m.group(1) if m else "(not written yet)\n"
    command = "python tools/bench_study.py" + (" --quick" if args.quick else "") + (
        " --no-dense" if args.no_dense else "")
    DOC.write_text(f"""# Benchmarks on this machine

Regenerate: `{command}` ({minutes:.0f} min in the last run; raw records and plots in
`docs/benchmarks/`).

Built-in MoE target (`builtin`, 3.74M active of 9.05M parameters) against the built-in dense target of
the same active size (`builtin-dense`), each with its distilled draft, through `python -m jaxspec.serve`
(8 slots, the default): plain decoding, the draft at k=2 and k=4, the draft with adaptive k (the serving
default), and n-gram prompt lookup at k=4. Workloads (`jaxspec/bench/workloads.py`): `code` completes
held-out standard-library files, `edit` re-emits a held-out function (copy-heavy), `long` fills the
context with a prompt and asks for 16 tokens. Closed loop at each concurrency; greedy; the same prompts
for every configuration.

## Reading

<!-- reading -->
{reading}<!-- /reading -->

{report}""")
    print(f"wrote {DOC} ({minutes:.1f} min)")


if __name__ == "__main__":
    main()
