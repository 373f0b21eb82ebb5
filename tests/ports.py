"""Loopback ports for the tests' servers (no jax import: multi-host workers import it before
``jax.distributed`` starts)."""

from __future__ import annotations


def free_port() -> int:
    """A loopback port free now, picked at random below the range the OS hands out for outgoing
    connections: a port from that range (what binding port 0 returns), free when picked, can be
    taken by another process's connection before the server binds it (seen: a leader's gRPC port)."""
    import random
    import socket

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every pick taken: the OS's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
