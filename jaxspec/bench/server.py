"""A ``python -m jaxspec.serve`` subprocess per benchmark configuration."""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from jaxspec import compilation_cache
from jaxspec.bench.load import Target, wait_serving

ROOT = Path(__file__).resolve().parents[2]


def default_cache_dir() -> Path:
    """The servers' own default (per user, private): warm-up compiles once across configurations and runs."""
    return compilation_cache.private_dir()


class ServerProcess:
    """The server on a free loopback port (``--port 0``); its output is kept (last lines) by a thread,
    since a full pipe would block the server's logging."""

    def __init__(self, serve_flags: list[str], cache_dir: str | None = None):
        cache = cache_dir or str(default_cache_dir())
        self.cmd = [sys.executable, "-m", "jaxspec.serve", "--host", "127.0.0.1", "--port", "0",
                    "--compilation-cache-dir", cache, *serve_flags]
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=300)
        self._bound = threading.Event()

    def tail(self, n: int = 40) -> str:
        return "".join(list(self.lines)[-n:])

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if self.port is None and (m := re.search(r"listening on \S+:(\d+) \(", line)):
                self.port = int(m.group(1))
                self._bound.set()
        self._bound.set()  # exited: stop waiting for a port

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float) -> Target:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, errors="replace")
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._bound.wait(timeout) or self.port is None:
            self.stop()
            raise RuntimeError(f"server did not bind a port (exit code {self.proc.returncode}):\n{self.tail()}")
        target = Target(f"127.0.0.1:{self.port}")
        try:
            wait_serving(target, timeout, self.alive)
        except (RuntimeError, TimeoutError) as e:
            self.stop()
            raise RuntimeError(f"{e}:\n{self.tail()}") from None
        return target

    def stop(self, timeout: float = 30.0) -> None:
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)  # drains: anything still in flight gets the grace period
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
