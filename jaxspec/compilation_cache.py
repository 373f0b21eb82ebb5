"""The persistent XLA compilation cache of ``python -m jaxspec.generate`` and ``python -m jaxspec.serve``.

On by default: a second run loads its executables instead of compiling them. The cache holds
executables the process will run, so its directory must be private: created 0700, and refused when
it is owned by another user or writable by group or others.

Size: ``enable`` trims the directory to ``max_bytes`` (default ``MAX_BYTES``) once, least recently
used entries first, and jax then runs without a limit. jax 0.10's own limit re-lists and stats every
entry under a directory lock on each write, so a cache of thousands of entries made every compile
slower (a test compiling 640 small programs: 15 s with an empty cache, 159 s beside 5,500 entries).
A long run can exceed the limit by what it compiles itself; the next start trims it.

Concurrent processes: jax writes an entry with a plain ``write_bytes`` (no rename), so a process
may read another's half-written entry; jax then warns and compiles instead.
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
# File names of jax 0.10's cache: an executable, and the last-use stamp jax keeps beside it when it
# enforces a size limit itself.
_ENTRY, _STAMP = "-cache", "-atime"


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


def _stamp(entry: Path) -> Path:
    """The last-use stamp jax keeps beside ``entry`` when it enforces a size limit itself."""
    return entry.with_name(entry.name[: -len(_ENTRY)] + _STAMP)


def _last_use(entry: Path, st: os.stat_result) -> int:
    """When ``entry`` was last used, in ns: its file times, or jax's stamp where newer."""
    used = max(st.st_atime_ns, st.st_mtime_ns)
    with contextlib.suppress(OSError, ValueError):
        used = max(used, int.from_bytes(_stamp(entry).read_bytes(), "little"))
    return used


def trim(directory: str | os.PathLike, max_bytes: int) -> int:
    """Delete least recently used executables under ``directory`` until the rest take at most
    ``max_bytes``; returns the bytes freed. Under the limit it only lists the directory."""
    entries = []
    for f in Path(directory).glob(f"*{_ENTRY}"):
        with contextlib.suppress(FileNotFoundError):  # another process trimmed it
            entries.append((f, f.stat()))
    total = sum(st.st_size for _, st in entries)
    if total <= max_bytes:
        return 0
    freed = 0
    for _, f, st in sorted((_last_use(f, st), f, st) for f, st in entries):
        if total - freed <= max_bytes:
            break
        for victim in (f, _stamp(f)):
            with contextlib.suppress(FileNotFoundError):
                victim.unlink()
        freed += st.st_size
    log.info("compilation cache: trimmed %d MiB of least recently used executables", freed >> 20)
    return freed


def enable(directory: str | os.PathLike | None = None, max_bytes: int | None = MAX_BYTES) -> Path:
    """Persist every compiled executable under ``directory`` (see ``private_dir``), trimmed to
    ``max_bytes`` first (``None``: no limit). Call before the first compilation of the process."""
    import jax

    path = private_dir(directory)
    if max_bytes is not None:
        trim(path, int(max_bytes))
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Cache every executable, however quick to compile: a step is many small ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # No limit inside jax: its eviction scans the whole directory on every write (see above).
    jax.config.update("jax_compilation_cache_max_size", -1)
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
