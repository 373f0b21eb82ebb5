"""The checked-in stubs (serving/pb) match a fresh generation from serving/proto."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _gen_protos():
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "tools" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checked_in_stubs_are_current():
    stale = _gen_protos().stale_files()
    assert not stale, f"regenerate with `python tools/gen_protos.py`; stale: {stale}"


def test_staleness_check_catches_edits_and_missing_files(tmp_path):
    gen = _gen_protos()
    copy = tmp_path / "pb"
    shutil.copytree(REPO / "serving" / "pb", copy)
    assert gen.stale_files(copy) == []
    grpc_stub = copy / "jaxspec_pb2_grpc.py"
    grpc_stub.write_text(grpc_stub.read_text().replace("GenerateStream", "GenerateStreem"))
    (copy / "jaxspec_pb2.pyi").unlink()
    assert gen.stale_files(copy) == ["jaxspec_pb2.pyi", "jaxspec_pb2_grpc.py"]


def test_check_mode_exit_code():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "gen_protos.py"), "--check"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_stubs_import_without_the_jaxspec_v1_path():
    """The service stub imports its messages relatively (no clash with the jaxspec package)."""
    text = (REPO / "serving" / "pb" / "jaxspec_pb2_grpc.py").read_text()
    assert "from . import jaxspec_pb2" in text and "from jaxspec.v1" not in text
    from serving.pb import SERVICE_NAME, jaxspec_pb2_grpc

    assert SERVICE_NAME == "jaxspec.v1.JaxSpec" and hasattr(jaxspec_pb2_grpc, "JaxSpecStub")
