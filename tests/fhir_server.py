"""A real local FHIR R4 server (sekmet-fhir) for tests, started once per session.

``fhir_server`` is open; ``fhir_server_auth`` answers 401 unless ``Authorization: Bearer <token>`` is sent.
Both share nothing: each has its own port, SQLite file and settings. Data persists for the whole session,
so give the resources you load ids that no other test uses.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from builders import STARTUP_SECONDS, stop


@dataclass(frozen=True)
class FhirServer:
    base_url: str
    token: str | None = None

    def load(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """POST one transaction Bundle to the base; return the transaction-response or fail the test."""
        headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(
            self.base_url, data=json.dumps(bundle).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                answer: dict[str, Any] = json.loads(response.read())
                return answer
        except urllib.error.HTTPError as exc:
            with exc:
                pytest.fail(
                    f"transaction rejected with HTTP {exc.code}: {exc.read().decode(errors='replace')}"
                )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _sekmet_command() -> str:
    script = Path(sys.executable).parent / "sekmet"
    if not script.exists():
        pytest.fail(f"sekmet not found next to {sys.executable}; install the dev extras (sekmet-fhir)")
    return str(script)


def _wait_ready(process: subprocess.Popen[bytes], metadata_url: str, stderr_path: Path) -> None:
    end = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < end:
        if process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(metadata_url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    state = f"exited with {process.returncode}" if process.poll() is not None else "did not answer"
    pytest.fail(
        f"sekmet FHIR server {state} within {STARTUP_SECONDS:g} s ({metadata_url});"
        f" stderr:\n{stderr_path.read_text(errors='replace')}"
    )


def _run_sekmet(workdir: Path, settings: dict[str, Any], token: str | None) -> Iterator[FhirServer]:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/fhir"
    config = workdir / "settings.yaml"
    # JSON is YAML: no YAML writer needed.
    config.write_text(json.dumps({"simulator": {"enabled": False}, "log_inbound": False, **settings}))
    env = {**os.environ, "SEKMET_BASE_URL": base_url, "SEKMET_DB": str(workdir / "sekmet.db")}
    stdout_path, stderr_path = workdir / "stdout.log", workdir / "stderr.log"
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [_sekmet_command(), "serve", "-c", str(config), "--host", "127.0.0.1", "--port", str(port)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
        try:
            _wait_ready(process, f"{base_url}/metadata", stderr_path)
            yield FhirServer(base_url=base_url, token=token)
        finally:
            stop(process)


@pytest.fixture(scope="session")
def fhir_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirServer]:
    yield from _run_sekmet(tmp_path_factory.mktemp("sekmet"), {}, token=None)


@pytest.fixture(scope="session")
def fhir_server_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirServer]:
    token = secrets.token_urlsafe(24)
    settings = {"server_auth": {"types": ["bearer"], "tokens": [token]}}
    yield from _run_sekmet(tmp_path_factory.mktemp("sekmet-auth"), settings, token=token)
