"""Free TCP ports for the servers and rendezvous a job starts (SGLang, torchrun across nodes, Ray)."""

from __future__ import annotations

import random
import socket
import threading

# SGLang derives a gRPC port as its HTTP port + 10000 and rejects results above 65535: stay below 55535.
PORT_SPAN = (20000, 55000)

_claimed: set[int] = set()
_lock = threading.Lock()


def free_ports(count: int = 1, host: str = "", rng: random.Random | None = None,
               span: tuple[int, int] = PORT_SPAN) -> int:
    """Base of `count` consecutive ports in `span` that are free on `host` now and that this process never handed
    out before (two servers started back to back must not get the same port before the first one binds it)."""
    rng = rng or random.Random()
    with _lock:
        for _ in range(200):
            base = rng.randrange(span[0], span[1] - count)
            if _claimed.intersection(range(base, base + count)):
                continue
            socks = []
            try:
                for port in range(base, base + count):
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    socks.append(s)
                    s.bind((host, port))
            except OSError:
                continue
            finally:
                for s in socks:
                    s.close()
            _claimed.update(range(base, base + count))
            return base
    raise OSError(f"no {count} consecutive free ports in {span} on {host or 'any interface'}")
