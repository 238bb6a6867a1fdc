"""Running the gateway: uvicorn on a socket bound here (so port 0 works and the real port is known)."""

from __future__ import annotations

import signal
import socket
import threading
import time
from dataclasses import dataclass
from types import FrameType

import uvicorn

from services.web.app import create_app
from services.web.config import WebSettings
from services.web.gateway import Gateway


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, with SIGTERM a clean stop (exit 0, as the gRPC services do): uvicorn itself
    re-raises a caught signal after shutting down, so the process would end killed by it."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for open requests
        else:
            self.should_exit = True


def _server(settings: WebSettings, gateway: Gateway) -> uvicorn.Server:
    if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
        raise ValueError("HTTPS: give both --tls-cert-file and --tls-key-file, or neither")
    config = uvicorn.Config(
        create_app(settings, gateway), log_level=settings.log_level.lower(), access_log=False,
        ssl_certfile=str(settings.tls_cert_file) if settings.tls_cert_file else None,
        ssl_keyfile=str(settings.tls_key_file) if settings.tls_key_file else None,
        timeout_graceful_shutdown=5, server_header=False)
    return _Server(config)


def url(settings: WebSettings, port: int) -> str:
    """The page's address."""
    scheme = "https" if settings.tls_cert_file else "http"
    host = settings.host if settings.host not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"{scheme}://{host}:{port}/"


def serve(settings: WebSettings) -> int:
    """Serves until SIGTERM / Ctrl-C (uvicorn finishes open requests, then returns)."""
    gateway = Gateway(settings)
    sock = bind(settings.host, settings.port)
    print(f"web gateway listening on {url(settings, sock.getsockname()[1])}", flush=True)
    try:
        _server(settings, gateway).run(sockets=[sock])
    finally:
        gateway.close()
        sock.close()
    return 0


@dataclass
class RunningGateway:
    """A gateway served from a thread of this process (tests, embedding)."""

    server: uvicorn.Server
    thread: threading.Thread
    gateway: Gateway
    port: int
    url: str

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.gateway.close()


def start_in_thread(settings: WebSettings, timeout: float = 20.0) -> RunningGateway:
    """Starts the gateway in a background thread and waits until it accepts requests."""
    gateway = Gateway(settings)
    sock = bind(settings.host, settings.port)
    server = _server(settings, gateway)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="web-gateway", daemon=True)
    thread.start()
    end = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > end:
            raise RuntimeError("the web gateway did not start")
        time.sleep(0.05)
    port = int(sock.getsockname()[1])
    return RunningGateway(server, thread, gateway, port, url(settings, port))
