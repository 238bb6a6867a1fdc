"""The local stack: encoder, search and evaluator as separate processes on the embedded defaults, and
the web gateway (the search page) in front of them.

Used by ``retrieval up`` (runs until Ctrl-C / SIGTERM) and by ``retrieval demo`` (the README's job).
Each process logs to its own file; one that dies during start-up is reported with its log.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from services.common.clients import ClientTLS, channel, wait_serving

SERVICES = ("encoder", "search", "evaluator")
WEB = "web"  # the HTTP gateway: a process of the stack, not a gRPC service
HEALTH_NAMES = {"encoder": "retrieval.v1.EncoderService", "search": "retrieval.v1.SearchService",
                "evaluator": "retrieval.v1.EvaluatorService"}


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for tests and demos that must not clash with a running stack)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class StackConfig:
    """Where the stack listens and what it loads.

    Attributes:
        ports: gRPC port per service; metrics_ports likewise.
        data_dir: the search service's Qdrant Edge directory.
        models: encoder models preloaded before the stack reports ready.
        log_dir: one ``<service>.log`` per service.
        output_dir, cache_dir: the evaluator's reports and embedding cache.
        allowed_roots: directories the evaluator may read datasets from.
        auth_token: when set, every service requires it and the evaluator sends it upstream.
        tls_cert_file, tls_key_file: when set, every service serves TLS with them.
        tls_ca_file: the CA that signed that certificate (the evaluator and the stack verify with it).
        adapters_dir: the encoder's adapters directory (models ``<base>+<name>``), when set.
        web: whether to start the web gateway (the search page) too; web_port is its HTTP port. It
            serves images of the datasets under allowed_roots and the reports in output_dir.
    """

    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=lambda: {"encoder": 50051, "search": 50052, "evaluator": 50053})
    metrics_ports: dict[str, int] = field(default_factory=lambda: {"encoder": 9101, "search": 9102,
                                                                  "evaluator": 9103})
    data_dir: Path = Path(".cache/retrieval/qdrant")
    models: tuple[str, ...] = ("efficientnet-lite0",)
    log_dir: Path = Path(".cache/retrieval/logs")
    output_dir: Path = Path("reports")
    cache_dir: Path = Path(".cache/retrieval/embeddings")
    allowed_roots: tuple[Path, ...] = (Path.cwd(),)
    auth_token: str | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    adapters_dir: Path | None = None
    web: bool = True
    web_port: int = 8080

    @classmethod
    def on_free_ports(cls, **kwargs: object) -> StackConfig:
        config = cls(**kwargs)  # type: ignore[arg-type]
        config.ports = {s: free_port(config.host) for s in SERVICES}
        config.metrics_ports = {s: free_port(config.host) for s in SERVICES}
        config.web_port = free_port(config.host)
        return config

    def address(self, service: str) -> str:
        return f"{self.host}:{self.ports[service]}"

    @property
    def web_url(self) -> str:
        """The search page's address."""
        return f"{'https' if self.tls_cert_file else 'http'}://{self.host}:{self.web_port}/"

    @property
    def processes(self) -> tuple[str, ...]:
        """What the stack starts, in order."""
        return (*SERVICES, WEB) if self.web else SERVICES

    @property
    def client_tls(self) -> ClientTLS | None:
        """How a client verifies the stack's servers (None: plaintext)."""
        if self.tls_cert_file is None:
            return None
        return ClientTLS(ca_file=self.tls_ca_file or self.tls_cert_file)


class Stack:
    """Starts the three services (and the web gateway) as child processes and stops them cleanly."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def _web_command(self) -> list[str]:
        c = self.config
        cmd = [sys.executable, "-m", "services.cli", "web", "serve", "--host", c.host, "--port", str(c.web_port),
               "--encoder-address", c.address("encoder"), "--search-address", c.address("search"),
               "--evaluator-address", c.address("evaluator"), "--reports-dir", str(c.output_dir),
               "--allowed-roots", ",".join(str(r) for r in c.allowed_roots)]
        if c.auth_token:
            cmd += ["--auth-token", c.auth_token]
        if c.tls_cert_file and c.tls_key_file:
            cmd += ["--service-tls-ca-file", str(c.tls_ca_file or c.tls_cert_file),
                    "--tls-cert-file", str(c.tls_cert_file), "--tls-key-file", str(c.tls_key_file)]
        return cmd

    def _command(self, service: str) -> list[str]:
        if service == WEB:
            return self._web_command()
        c = self.config
        cmd = [sys.executable, "-m", "services.cli", service, "serve", "--host", c.host,
               "--port", str(c.ports[service]), "--metrics-port", str(c.metrics_ports[service])]
        if service == "encoder":
            cmd += ["--models", ",".join(c.models), "--default-model", c.models[0]]
            if c.adapters_dir is not None:
                cmd += ["--adapters-dir", str(c.adapters_dir)]
        elif service == "search":
            cmd += ["--data-dir", str(c.data_dir)]
        else:
            cmd += ["--encoder-address", c.address("encoder"), "--search-address", c.address("search"),
                    "--output-dir", str(c.output_dir), "--cache-dir", str(c.cache_dir),
                    "--state-dir", str(c.log_dir.parent / "runs"),
                    "--allowed-roots", ",".join(str(r) for r in c.allowed_roots)]
            if c.auth_token:
                cmd += ["--service-token", c.auth_token]
            if c.tls_cert_file:
                cmd += ["--service-tls-ca-file", str(c.tls_ca_file or c.tls_cert_file)]
        if c.auth_token:
            cmd += ["--auth-token", c.auth_token]
        if c.tls_cert_file and c.tls_key_file:
            cmd += ["--tls-cert-file", str(c.tls_cert_file), "--tls-key-file", str(c.tls_key_file)]
        return cmd

    def start(self, timeout: float = 600.0) -> None:
        """Starts every service and waits until each reports SERVING.

        Raises:
            RuntimeError: a service exited during start-up (its log's tail is in the message).
            TimeoutError: not all SERVING within ``timeout`` seconds.
        """
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        for service in self.config.processes:
            log = (self.config.log_dir / f"{service}.log").open("wb")
            # A process group of its own (a terminal's Ctrl-C reaches the stack, which stops the
            # services in order), but the caller's session: Linux's autogroup schedules each session
            # as one group with an equal CPU share, which let busy services starve an idle one's
            # health checks for up to 250 ms, and made the nice value of anything else ineffective
            # against them (benchmarks/load.py, measured).
            self.processes[service] = subprocess.Popen(self._command(service), stdout=log, stderr=subprocess.STDOUT,
                                                       env=env, process_group=0)
        deadline = time.monotonic() + timeout
        for service in SERVICES:
            with channel(self.config.address(service), tls=self.config.client_tls) as chan:
                while True:
                    self._check_alive(service)
                    try:
                        wait_serving(chan, HEALTH_NAMES[service], timeout=2.0)
                        break
                    except TimeoutError:
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"{service} not SERVING after {timeout:.0f} s; see "
                                               f"{self.config.log_dir / (service + '.log')}") from None
        if self.config.web:
            self._wait_web(deadline)

    def _wait_web(self, deadline: float) -> None:
        """Waits until the gateway serves its page."""
        c = self.config
        context = None
        if c.tls_cert_file:
            context = ssl.create_default_context(cafile=str(c.tls_ca_file or c.tls_cert_file))
        while True:
            self._check_alive(WEB)
            try:
                with urllib.request.urlopen(c.web_url, timeout=2.0, context=context) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the web gateway did not answer at {c.web_url}; see {c.log_dir / 'web.log'}")
            time.sleep(0.2)

    def _check_alive(self, service: str) -> None:
        proc = self.processes[service]
        if proc.poll() is not None:
            log = (self.config.log_dir / f"{service}.log").read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"{service} exited with code {proc.returncode} during start-up:\n" + "\n".join(log))

    def stop(self, grace: float = 15.0) -> dict[str, int | None]:
        """SIGTERM to every service, SIGKILL after ``grace`` seconds; returns their exit codes."""
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for service, proc in self.processes.items():
            try:
                codes[service] = proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[service] = proc.wait()
        return codes

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
