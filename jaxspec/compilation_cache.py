"""The persistent XLA compilation cache of ``python -m jaxspec.generate`` and ``python -m jaxspec.serve``.

On by default: a second run loads its executables instead of compiling them. The cache holds
executables the process will run, so its directory must be private: created 0700, and refused when
it is owned by another user or writable by group or others.

Concurrent processes: jax 0.10's ``LRUCache`` writes an entry with a plain ``write_bytes`` (no
rename), so without a size limit a process could read another's half-written entry (jax then warns
and compiles instead). With a size limit (``MAX_BYTES``) every read and write holds a ``filelock``
lock on the directory, which also evicts least recently used entries past the limit.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

log = logging.getLogger("jaxspec")

MAX_BYTES = 4 * 2**30

# jax options this module sets (restored by ``enabled``).
_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes", "jax_compilation_cache_max_size")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/jaxspec/xla``, else ``~/.cache/jaxspec/xla``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "jaxspec" / "xla"


def private_dir(directory: str | os.PathLike | None = None) -> Path:
    """``directory`` (default: ``default_cache_dir()``), created 0700 if missing; raises
    PermissionError if it is not a directory owned by this user and closed to group and others' writes."""
    path = Path(directory).expanduser() if directory is not None else default_cache_dir()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise PermissionError(
            f"compilation cache {path} must be owned by this user and not group/world-writable "
            f"(owner uid {st.st_uid}, mode {st.st_mode & 0o777:o}); fix it or pass --no-compilation-cache")
    return path


def enable(directory: str | os.PathLike | None = None, max_bytes: int | None = MAX_BYTES) -> Path:
    """Persist every compiled executable under ``directory`` (see ``private_dir``). Call before
    the first compilation of the process. ``max_bytes=None``: no size limit and no lock."""
    import jax

    path = private_dir(directory)
    if max_bytes is not None:
        try:
            import filelock  # noqa: F401  jax needs it for the size limit (and its lock)
        except ImportError:
            max_bytes = None
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Cache every executable, however quick to compile: a step is many small ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", -1 if max_bytes is None else int(max_bytes))
    log.info("persistent compilation cache at %s", path)
    return path


@contextlib.contextmanager
def enabled(directory: str | os.PathLike | None = None, max_bytes: int | None = MAX_BYTES) -> Iterator[Path]:
    """``enable`` for a block, then the previous settings (a CLI's ``main`` called in-process)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    previous = {name: getattr(jax.config, name) for name in _OPTIONS}
    path = enable(directory, max_bytes)
    try:
        yield path
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def cli_cache(no_cache: bool, directory: str | None) -> contextlib.AbstractContextManager:
    """The CLIs' ``--no-compilation-cache`` / ``--compilation-cache-dir`` as a context manager."""
    if no_cache:
        return contextlib.nullcontext(None)
    return enabled(directory)


def add_arguments(parser) -> None:
    """``--compilation-cache-dir`` and ``--no-compilation-cache``, the same for every CLI."""
    parser.add_argument("--compilation-cache-dir", default=None, metavar="DIR",
                        help="persistent compilation cache: later runs skip most compiling (default: "
                        "$XDG_CACHE_HOME/jaxspec/xla or ~/.cache/jaxspec/xla; must be private to this user)")
    parser.add_argument("--no-compilation-cache", action="store_true", help="compile everything afresh, keep nothing")
