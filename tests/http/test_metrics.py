"""Prometheus metrics: the named series at /metrics, bounded labels, FHIR fetch counting, and
multi-process mode (several processes writing, one /metrics adding them up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from builders import SERVICE, close, hook_request, make_app, post, samples, sandbox_feedback, value
from d3k2.fhir.client import FetchOutcome
from d3k2.http.metrics import InstrumentedFetcher, Metrics
from fhir_server import FhirServer


def test_metrics_endpoint_exposes_the_named_series(tmp_path: Path, fhir_server: FhirServer) -> None:
    app = make_app(tmp_path)
    try:
        client = app.test_client()
        request = hook_request()
        request["fhirServer"] = fhir_server.base_url
        answer = post(client, f"/cds-services/{SERVICE}", request)
        assert answer.status_code == 200
        cards = answer.get_json()["cards"]
        assert (
            post(client, f"/cds-services/{SERVICE}/feedback", sandbox_feedback("overridden")).status_code
            == 200
        )
        assert (
            post(client, f"/cds-services/{SERVICE}/feedback", sandbox_feedback("overridden")).status_code
            == 200
        )
        assert post(client, "/cds-services/no-such-service-1", request).status_code == 404
        assert post(client, "/cds-services/no-such-service-2", request).status_code == 404

        exposed = client.get("/metrics")
        assert exposed.status_code == 200
        assert exposed.headers["Content-Type"].startswith("text/plain")
        found = samples(exposed.get_data(as_text=True))
    finally:
        close(app)

    assert value(found, "d3k2_requests_total", service=SERVICE, endpoint="service", status="200") == 1
    assert value(found, "d3k2_requests_total", service=SERVICE, endpoint="feedback", status="200") == 2
    # Unknown ids share one label value: callers cannot grow the series.
    assert value(found, "d3k2_requests_total", service="unknown", endpoint="service", status="404") == 2
    assert value(found, "d3k2_request_seconds_count", service=SERVICE, endpoint="service") == 1
    assert value(found, "d3k2_request_seconds_bucket", service=SERVICE, endpoint="service", le="+Inf") == 1
    for card in cards:
        rule, indicator = card["source"]["topic"]["code"], card["indicator"]
        assert value(found, "d3k2_cards_total", rule=rule, indicator=indicator) == 1
    fetched = value(found, "d3k2_fhir_fetch_total", outcome="ok")
    assert fetched is not None and fetched >= 1
    assert value(found, "d3k2_fhir_fetch_seconds_count", outcome="ok") == fetched
    assert value(found, "d3k2_feedback_total", outcome="overridden", result="stored") == 1
    assert value(found, "d3k2_feedback_total", outcome="overridden", result="duplicate") == 1
    assert value(found, "d3k2_cards_record_seconds_count") == 1


class FakeFetcher:
    def fetch_many(self, base_url: str, queries: Any, access_token: str | None) -> dict[str, FetchOutcome]:
        return {
            "a": FetchOutcome("a", {"resourceType": "Bundle"}, None, 1, 12.0),
            "b": FetchOutcome("b", {"resourceType": "Bundle"}, None, 5, 30.0, truncated=True),
            "c": FetchOutcome("c", None, "timed out after 3 s budget", 0, 3000.0),
            "d": FetchOutcome("d", None, "connection refused", 0, 1.0),
        }


def test_fhir_fetches_are_counted_by_outcome() -> None:
    metrics = Metrics()
    outcomes = InstrumentedFetcher(FakeFetcher(), metrics).fetch_many("http://x/fhir", {}, None)
    assert sorted(outcomes) == ["a", "b", "c", "d"]
    found = samples(metrics.exposition().decode())
    for outcome in ("ok", "truncated", "timeout", "error"):
        assert value(found, "d3k2_fhir_fetch_total", outcome=outcome) == 1
    assert value(found, "d3k2_fhir_fetch_seconds_sum", outcome="timeout") == 3.0


WORKER = """
import json, sys
from pathlib import Path
from d3k2.http.app import create_app
from d3k2.config import Settings
sys.path.insert(0, sys.argv[2])
from builders import CARDS, ruleset
app = create_app(Settings(env="test", cards_dir=CARDS, data_dir=Path(sys.argv[1]), auth="off"), ruleset())
client = app.test_client()
for _ in range(int(sys.argv[3])):
    assert client.get("/healthz").status_code == 200
print(json.dumps(client.get("/metrics").get_data(as_text=True)))
app.extensions["d3k2.store"].close()
"""


def test_multiprocess_mode_adds_up_every_process(tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    tests_dir = str(Path(__file__).parents[1])
    outputs = []
    for count in (2, 3):
        done = subprocess.run(
            [sys.executable, "-c", WORKER, str(tmp_path / "data"), tests_dir, str(count)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        outputs.append(json.loads(done.stdout.splitlines()[-1]))
    assert list(metrics_dir.glob("*.db"))
    # The second process reads the first one's files too: 2 + 3 health checks.
    found = samples(outputs[-1])
    assert value(found, "d3k2_requests_total", service="-", endpoint="healthz", status="200") == 5
