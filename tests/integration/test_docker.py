"""Production packaging: the image builds (where a Docker engine runs), the Dockerfile and compose file
say what production needs, and gunicorn with docker/gunicorn.conf.py serves d3k2.http.wsgi:app with
several sync workers sharing one metrics directory.

Build by hand from the repository root: ``docker build -f docker/Dockerfile -t d3k2 .``
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builders import REPO, SANDBOX, samples, value
from edge import gunicorn as serve

DOCKER = REPO / "docker"


def _docker_unavailable() -> str | None:
    if shutil.which("docker") is None:
        return "the docker command is not installed"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, check=False, timeout=60)
    if info.returncode != 0:
        return f"`docker info` failed (no Docker engine running): {info.stderr.strip()[:200]}"
    return None


def test_docker_build() -> None:
    reason = _docker_unavailable()
    if reason:
        banner = "!" * 100
        sys.__stderr__.write(
            f"\n{banner}\nDOCKER BUILD NOT CHECKED: {reason}.\n"
            f"Check it by hand: docker build -f docker/Dockerfile -t d3k2 .\n{banner}\n"
        )
        pytest.skip(f"docker build not checked LOUDLY: {reason}")
    built = subprocess.run(
        ["docker", "build", "-f", str(DOCKER / "Dockerfile"), "-t", "d3k2:test", str(REPO)],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    user = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "id", "d3k2:test", "-u"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert user.stdout.strip() != "0"


def test_dockerfile_runs_gunicorn_as_a_non_root_user_with_a_healthcheck() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if line and not line[0].isspace()]
    keywords = {parts[0]: parts[1] if len(parts) > 1 else "" for parts in instructions if parts[0].isupper()}
    assert keywords["FROM"] == "python:3.11-slim"
    assert keywords["USER"] not in ("root", "0")
    assert "/healthz" in text.split("HEALTHCHECK", 1)[1]
    assert json.loads(keywords["CMD"]) == [
        "gunicorn",
        "--config",
        "/app/gunicorn.conf.py",
        "d3k2.http.wsgi:app",
    ]
    assert "PROMETHEUS_MULTIPROC_DIR=" in text


def test_compose_runs_d3k2_with_postgres_auth_and_volumes() -> None:
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert services["db"]["image"] == "postgres:16"
    app = services["d3k2"]
    env = app["environment"]
    assert (env["D3K2_ENV"], env["D3K2_AUTH"]) == ("production", "required")
    assert env["D3K2_DATABASE_URL"].startswith("postgresql://d3k2:${D3K2_DB_PASSWORD")
    assert app["depends_on"]["db"]["condition"] == "service_healthy"
    assert any(volume.endswith(":/data") for volume in app["volumes"])
    assert set(compose["volumes"]) == {"pgdata", "d3k2data"}


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def _post(url: str, body: Any) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, json.loads(response.read())


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[str]:
    with serve(tmp_path, workers=3, check_exit=True) as (base, _log):
        yield base


def test_gunicorn_serves_the_app_with_multiprocess_metrics(gunicorn: str) -> None:
    assert _get(f"{gunicorn}/readyz")[0] == 200
    feedback = json.loads((SANDBOX / "feedback-overridden.request.json").read_text())
    for _ in range(3):
        status, body = _post(f"{gunicorn}/cds-services/d3k2-patient-view/feedback", feedback)
        assert status == 200
        assert body["persisted"] is True
    checks = 12
    for _ in range(checks):
        assert _get(f"{gunicorn}/healthz")[0] == 200
    status, exposed = _get(f"{gunicorn}/metrics")
    assert status == 200
    found = samples(exposed.decode())
    # Every worker's requests, whichever worker answers /metrics.
    assert value(found, "d3k2_requests_total", service="-", endpoint="healthz", status="200") >= checks
    fed = "d3k2_feedback_total"
    assert value(found, fed, outcome="overridden", result="stored") == 1
    assert value(found, fed, outcome="overridden", result="duplicate") == 2
