"""Regenerate the checked-in gRPC/protobuf stubs under serving/pb from serving/proto.

    python tools/gen_protos.py           # rewrite serving/pb/*_pb2*.py[i]
    python tools/gen_protos.py --check   # exit 1 if the checked-in stubs are stale

The .proto files keep their canonical path (``jaxspec/v1/jaxspec.proto``) so that
other languages and reflection clients see the usual package layout. protoc would
make the Python service stub import ``jaxspec.v1.jaxspec_pb2``, which collides with
this repository's ``jaxspec`` package, so the stubs are flattened into
``serving/pb`` and that one import is rewritten to a relative one.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.resources
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "serving" / "proto"
PROTOS = ("jaxspec/v1/jaxspec.proto",)
OUT_DIR = REPO / "serving" / "pb"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

# `from jaxspec.v1 import jaxspec_pb2 as ...` -> `from . import jaxspec_pb2 as ...`
_ABS_IMPORT = re.compile(r"^from jaxspec\.v1 import (\w+_pb2)\b", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Run protoc for every proto and write the flattened stubs into ``out_dir``."""
    from grpc_tools import protoc

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *PROTOS,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        for proto in PROTOS:
            gen_dir = Path(tmp) / Path(proto).parent
            for src in sorted(gen_dir.iterdir()):
                if not src.name.endswith(GENERATED_SUFFIXES):
                    continue
                text = src.read_text()
                if src.name.endswith("_pb2_grpc.py"):
                    text, n = _ABS_IMPORT.subn(r"from . import \1", text)
                    if n == 0:
                        raise RuntimeError(f"{src.name}: protoc's import line changed; update tools/gen_protos.py")
                dest = out_dir / src.name
                dest.write_text(text)
                written.append(dest)
    return written


def stale_files(checked_in: Path = OUT_DIR) -> list[str]:
    """Names of stubs that differ from a fresh generation (or are missing/extra)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name for p in generate(Path(tmp))}
        present = {p.name for p in checked_in.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}
        stale = sorted(present ^ fresh)
        stale += sorted(n for n in fresh & present if not filecmp.cmp(Path(tmp) / n, checked_in / n, shallow=False))
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if serving/pb is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale stubs in {OUT_DIR}: {', '.join(stale)}; run python tools/gen_protos.py", file=sys.stderr)
            return 1
        print("stubs are up to date")
        return 0
    for path in generate(OUT_DIR):
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
