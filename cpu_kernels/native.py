"""Build a kernel's C++ source into a shared library for this host, once, and register its XLA FFI handlers.

The library is compiled with ``-march=native`` (the kernels are written for the vector unit of the
machine that runs them), so it is cached per source (and the headers beside it), compiler, jaxlib (whose FFI headers it
includes) and processor: ``$JAXSPEC_NATIVE_CACHE``, else ``~/.cache/jaxspec/native``. A build
writes a temporary file and renames it into place, so concurrent processes never load half a file.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jaxlib

SOURCE_DIR = Path(__file__).resolve().parent
# -ffp-contract=fast: a*b+c is one fused multiply-add whatever the compiler's default.
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=fast", "-w")
BUILD_TIMEOUT_S = 300


class BuildError(RuntimeError):
    """The kernel could not be built or loaded here (the message says why)."""


def compiler() -> str | None:
    """The C++ compiler: ``$CXX``, else ``g++``, ``c++`` or ``clang++`` on PATH."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return next((path for name in ("g++", "c++", "clang++") if (path := shutil.which(name))), None)


def cache_dir() -> Path:
    if os.environ.get("JAXSPEC_NATIVE_CACHE"):
        return Path(os.environ["JAXSPEC_NATIVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxspec" / "native"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _build_key(source: Path, cxx: str) -> str:
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    h = hashlib.sha256()
    headers = [p.read_bytes() for p in sorted(source.parent.glob("*.h"))]
    for part in (source.read_bytes(), *headers, cxx.encode(), version.encode(), " ".join(FLAGS).encode(),
                 jaxlib.__version__.encode(), _cpu_flags().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def build(name: str) -> Path:
    """``<name>.cc`` beside this module compiled for this host (or the cached library); raises
    ``BuildError`` saying why not."""
    source = SOURCE_DIR / f"{name}.cc"
    if not source.exists():
        raise BuildError(f"kernel source {source} is missing")
    cxx = compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found ($CXX, g++, c++ or clang++ on PATH)")
    target = cache_dir() / f"{name}-{_build_key(source, cxx)}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        directory = target.parent
    except OSError:
        directory = Path(tempfile.gettempdir())
        target = directory / target.name
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{source.parent}", str(source), "-o", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if r.returncode != 0:
            raise BuildError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"building {source.name} failed: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


_lock = threading.Lock()
_registered: dict[str, str | None] = {}  # library name -> None when registered, else why not


def register(name: str, symbols: tuple[str, ...]) -> str | None:
    """Build and load ``<name>.cc`` once per process and register each handler symbol as an XLA FFI
    target of the same name on the CPU. Returns None when registered, else the reason it is not."""
    with _lock:
        if name not in _registered:
            try:
                lib = ctypes.cdll.LoadLibrary(str(build(name)))
                for symbol in symbols:
                    jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
                _registered[name] = None
            except (BuildError, OSError, AttributeError) as e:
                _registered[name] = str(e)
        return _registered[name]
