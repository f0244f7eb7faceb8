"""d3k2 as production runs it, for tests of the edge: gunicorn with docker/gunicorn.conf.py, optionally
Debian's nginx with docker/nginx.conf in front, each on a free loopback port; raw HTTP requests (bytes the
http client libraries refuse to send) and slow clients that never finish their headers.

Used by tests/integration/test_edge.py and tests/http/test_attack.py; ``measure()`` gives the numbers
in README.md ("Slow clients").
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from builders import REPO, STARTUP_SECONDS, gunicorn_env, stop
from fhir_server import free_port

DOCKER = REPO / "docker"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def _wait_up(base: str, process: subprocess.Popen[bytes], log: Path) -> None:
    end = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < end and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    raise RuntimeError(f"{base} did not come up:\n{log.read_text(errors='replace')}")


@contextmanager
def gunicorn(
    tmp_path: Path, workers: int = 3, env: Mapping[str, str] | None = None, check_exit: bool = False
) -> Iterator[tuple[str, Path]]:
    """gunicorn serving d3k2.http.wsgi:app on a free port: its base URL and its log file. `check_exit`: the
    stop at the end must be graceful (exit status 0)."""
    port = free_port()
    environment = {**gunicorn_env(tmp_path, port, workers=workers), **(env or {})}
    log_path = tmp_path / f"gunicorn-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "gunicorn"),
                "-c",
                str(DOCKER / "gunicorn.conf.py"),
                "d3k2.http.wsgi:app",
            ],
            cwd=tmp_path,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_up(base, process, log_path)
            yield base, log_path
        finally:
            stop(process, timeout=20)
    if check_exit:
        assert process.returncode == 0, log_path.read_text(errors="replace")


def nginx_config(listen: int, upstream: str, prefix: Path) -> str:
    """docker/nginx.conf with the test's ports and its own pid and temporary files."""
    text = (DOCKER / "nginx.conf").read_text()
    for default, mine in (
        ("listen 8443", f"listen 127.0.0.1:{listen}"),
        ("server 127.0.0.1:8080", f"server {upstream}"),
    ):
        assert default in text, default
        text = text.replace(default, mine)
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return text.replace("http {", "http {\n" + temp, 1)


@contextmanager
def nginx(tmp_path: Path, upstream_base: str) -> Iterator[str]:
    """Debian's nginx with docker/nginx.conf in front of ``upstream_base``: its base URL."""
    if NGINX is None:
        raise RuntimeError("nginx is not installed (Debian: apt-get install nginx; .ci/run installs it)")
    port = free_port()
    prefix = tmp_path / f"nginx-{port}"
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_config(port, upstream_base.removeprefix("http://"), prefix))
    # As root nginx's workers would switch to an unprivileged user that cannot enter pytest's tmp_path.
    user = "user root;" if os.geteuid() == 0 else ""
    log_path = prefix / "nginx.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                NGINX,
                "-p",
                str(prefix),
                "-c",
                str(conf),
                "-e",
                "stderr",
                "-g",
                f"daemon off; pid {prefix / 'nginx.pid'}; {user}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_up(base, process, log_path)
            yield base
        finally:
            stop(process, timeout=10)


def raw(base: str, data: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send ``data`` as it is to ``base``; the status and the whole answer (``data`` asks the server to
    close the connection after answering)."""
    host, _, port = base.removeprefix("http://").partition(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        # No half-close: nginx reads the client's EOF as an abort (499) and answers nothing.
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    answer = b"".join(chunks)
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0
    return status, answer


class SlowClients:
    """``count`` connections that send a request line and then one header byte per ``interval`` seconds,
    never ending their headers (the slow-header, "slowloris", client)."""

    def __init__(self, base: str, count: int, interval: float = 0.5) -> None:
        self._host, _, port = base.removeprefix("http://").partition(":")
        self._port = int(port)
        self._count = count
        self._interval = interval
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _drip(self) -> None:
        while not self._stop.is_set():
            try:
                with socket.create_connection((self._host, self._port), timeout=5) as sock:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: d3k2\r\nX-Slow: ")
                    while not self._stop.wait(self._interval):
                        sock.sendall(b"a")
            except OSError:
                self._stop.wait(self._interval)  # closed by the server: come back, as an attacker would

    def __enter__(self) -> SlowClients:
        for _ in range(self._count):
            thread = threading.Thread(target=self._drip, daemon=True)
            thread.start()
            self._threads.append(thread)
        time.sleep(self._interval * 2)  # let every slow client reach the server first
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)


@dataclass(frozen=True)
class Probes:
    sent: int
    answered: int

    @property
    def share(self) -> float:
        return self.answered / self.sent


def probe(base: str, count: int = 8, timeout: float = 2.0) -> Probes:
    """``count`` GET /healthz, one after the other, each given ``timeout`` seconds to answer."""
    answered = 0
    for _ in range(count):
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=timeout) as response:
                answered += response.status == 200
        except (urllib.error.URLError, OSError):
            pass
    return Probes(count, answered)


def measure(tmp_path: Path, clients: tuple[int, ...] = (3, 6), workers: int = 3) -> dict[str, float]:
    """Share of probes answered while N slow clients hold connections: gunicorn alone, then behind nginx."""
    results: dict[str, float] = {}
    with gunicorn(tmp_path, workers=workers) as (direct, _log):
        for n in clients:
            with SlowClients(direct, n):
                results[f"gunicorn alone, {n} slow clients"] = probe(direct).share
        with nginx(tmp_path, direct) as proxied:
            for n in clients:
                with SlowClients(proxied, n):
                    results[f"nginx in front, {n} slow clients"] = probe(proxied).share
    return results


if __name__ == "__main__":  # pragma: no cover - `python tests/edge.py`: the README's measurement
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        for what, share in measure(Path(directory)).items():
            print(f"{what}: {share:.0%} of probes answered")
