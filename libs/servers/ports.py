"""TCP ports and addresses for the servers we run: a free port, a port kept across restarts.

Every embedded server (Postgres, NATS, Mosquitto, an instance) listens on a port chosen here,
never on one of the machine's standard ports, where the machine's own servers live.
"""

from __future__ import annotations

import socket
import threading

from libs.servers.process import EmbeddedServerError

# The machine's own servers live on the standard ports; an embedded server must never take them.
STANDARD_PORTS = frozenset({4222, 5432, 6222, 8222})
LOOPBACK = "127.0.0.1"

_handed_out_ports: set[int] = set()
_ports_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now, never one this process has handed out before.

    Remembering earlier answers keeps two servers built back to back from getting the same
    port when the kernel hands a just-released port out again.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with _ports_lock:
        for _ in range(100):
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port: int = sock.getsockname()[1]
            if port not in _handed_out_ports and port not in STANDARD_PORTS:
                _handed_out_ports.add(port)
                return port
    raise EmbeddedServerError(f"no free TCP port found on {host}")


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now.

    Binds the way servers do (``SO_REUSEADDR``, as uvicorn, Postgres, NATS and Mosquitto
    set it), so the closed connections of a server that just stopped (TIME_WAIT) do not count
    as a listener; only a socket listening there does.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def kept_port(port: int | None, host: str = "127.0.0.1") -> int:
    """``port`` if it is given and free now, else a new free port."""
    if port is not None and port_is_free(host, port):
        return port
    return free_port(host)


def connect_host(host: str) -> str:
    """Where a client on this machine reaches a server listening on ``host``."""
    if host in ("", "*", "0.0.0.0"):  # noqa: S104
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def url_host(host: str) -> str:
    """``host`` as it goes in a URL (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


def host_port(host: str, port: int) -> str:
    """``host:port`` as a server's configuration or a URL writes it."""
    return f"{url_host(host)}:{port}"


def accepts_tcp(host: str, port: int) -> bool:
    """Whether something accepts a TCP connection on ``host:port`` within a second."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False
