"""The wheel carries what an installed jaxspec needs (configs, built-in assets, every package) and its
CLIs run from any directory (issue 18)."""

import json
import os
import shutil
import site
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy: setuptools builds in the source tree, and a build/ left there would
    # carry files since deleted into later wheels.
    src = tmp_path_factory.mktemp("src") / "jaxspec"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, cwd=out, timeout=600)
    (path,) = out.glob("jaxspec-*.whl")
    return path


@pytest.mark.slow
def test_wheel_holds_configs_assets_and_every_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("jaxspec/configs/models/builtin-target.json", "jaxspec/configs/models/qwen3-30b-a3b.json",
                 "jaxspec/configs/meshes/tpu-v5e-8.json", "jaxspec/configs/targets/h100-sxm-80gb.textproto",
                 "jaxspec/assets/tokenizer/tokenizer.model", "jaxspec/assets/target/config.json",
                 "serving/server.py", "serving/pb/jaxspec_pb2.py", "pallas_kernels/gmm.py",
                 "cpu_kernels/moe_ffn.cc", "cpu_kernels/slot_attention.cc", "cpu_kernels/vec.h"):
        assert name in names, name
    configs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.json")}
    assert {"jaxspec/" + c for c in configs} <= names
    assets = {p.relative_to(ROOT).as_posix() for p in (ROOT / "jaxspec" / "assets").rglob("*") if p.is_file()}
    assert assets <= names


@pytest.mark.slow
def test_installed_wheel_generates_and_serves_from_any_directory(wheel, tmp_path):
    """A fresh virtual environment holding the wheel alone (its dependencies are this environment's,
    reached through a path file, so nothing is downloaded); both CLIs run outside the repository."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # Lines of a .pth file are appended to sys.path; .pth files found there are not run, so this
    # environment's editable hook for the repository stays off.
    Path(purelib, "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, timeout=600)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(tmp_path / "cache"))

    where = subprocess.run([str(python), "-c", "import jaxspec, serving; print(jaxspec.__file__, serving.__file__)"],
                           cwd=work, env=env, check=True, capture_output=True, text=True).stdout
    assert str(ROOT) not in where and where.count(purelib) == 2, where

    run = subprocess.run([str(python), "-m", "jaxspec.generate", "--spec-method", "none", "--max-tokens", "4", "--json",
                          "def f(x):"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert len(json.loads(run.stdout)["token_ids"]) == 4
    run = subprocess.run([str(python), "-m", "jaxspec.generate", "--model", "tiny-moe", "--max-tokens", "2", "x"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr  # a config name: configs/models inside the package

    serve = subprocess.Popen([str(python), "-m", "jaxspec.serve", "--port", "0", "--spec-method", "none",
                              "--slots", "1", "--max-len", "256"], cwd=work, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = serve.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "-> serving" in line.lower():
                break
        assert any("-> serving" in line.lower() for line in lines), "".join(lines[-30:])
        assert not any("cudart_stub" in line or "absl::InitializeLog" in line for line in lines), "".join(lines)
    finally:
        serve.terminate()
        serve.wait(timeout=60)
