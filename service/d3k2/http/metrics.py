"""Prometheus metrics (prometheus-client), served at ``/metrics``.

Under gunicorn every worker is a process: with PROMETHEUS_MULTIPROC_DIR set (before the first import of
prometheus_client) values go to files in that directory and ``/metrics`` aggregates all workers'. The
gunicorn config marks a dead worker's files (docker/gunicorn.conf.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from d3k2.fhir.client import FetchOutcome
from d3k2.fhir.prefetch import Fetcher
from d3k2.store.served import WRITE_ERROR, Listener

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_ENDPOINTS = {
    "cds.get_discovery": "discovery",
    "cds.post_service": "service",
    "cds.post_feedback": "feedback",
}


class Metrics:
    """The service's series, in a registry of their own (one per app, so tests do not share counts)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "d3k2_requests", "HTTP requests answered", ["service", "endpoint", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "d3k2_request_seconds",
            "Time to answer an HTTP request",
            ["service", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.cards = Counter("d3k2_cards", "Cards served", ["rule", "indicator"], registry=r)
        self._card_children: dict[tuple[str, str], Any] = {}  # labels() looked up once per pair
        self.fhir_fetches = Counter(
            "d3k2_fhir_fetch", "Fallback FHIR queries (one per prefetch key)", ["outcome"], registry=r
        )
        self.fhir_seconds = Histogram(
            "d3k2_fhir_fetch_seconds",
            "Time per fallback FHIR query, all pages",
            ["outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.feedback = Counter("d3k2_feedback", "Feedback items received", ["outcome", "result"], registry=r)
        self.store_errors = Counter(
            "d3k2_store_errors", "Feedback database operations that failed", ["operation"], registry=r
        )
        self.cards_record_seconds = Histogram(
            "d3k2_cards_record_seconds",
            "Time a hook answer spends recording its cards",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )

    def count_cards(self, cards: Sequence[Mapping[str, Any]]) -> None:
        for card in cards:
            source = card.get("source")
            topic = source.get("topic") if isinstance(source, Mapping) else None
            rule = topic.get("code") if isinstance(topic, Mapping) else None
            key = (str(rule or "unknown"), str(card.get("indicator") or "unknown"))
            child = self._card_children.get(key)
            if child is None:
                # Bounded: cards are d3k2's own, so rules and indicators come from the rule set.
                child = self._card_children[key] = self.cards.labels(*key)
            child.inc()

    def served_listener(self) -> Listener:
        """The cards-served writer's events (d3k2.store.served.ServedWriter) as metrics: a failed batch
        write (retried) counts once under ``record_cards``; dropped rows count one each under
        ``record_cards_dropped``."""
        failed = self.store_errors.labels("record_cards")
        dropped = self.store_errors.labels("record_cards_dropped")

        def listen(kind: str, rows: int) -> None:
            if kind == WRITE_ERROR:
                failed.inc()
            else:
                dropped.inc(rows)

        return listen

    def exposition(self) -> bytes:
        path = os.environ.get(MULTIPROC_ENV)
        if path:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)


class InstrumentedFetcher:
    """Counts and times each fallback FHIR query of the wrapped fetcher (the FHIR client stays as it is)."""

    def __init__(self, inner: Fetcher, metrics: Metrics) -> None:
        self._inner = inner
        self._metrics = metrics

    def fetch_many(
        self, base_url: str, queries: Mapping[str, str], access_token: str | None
    ) -> dict[str, FetchOutcome]:
        outcomes = self._inner.fetch_many(base_url, queries, access_token)
        for outcome in outcomes.values():
            label = fetch_label(outcome)
            self._metrics.fhir_fetches.labels(label).inc()
            self._metrics.fhir_seconds.labels(label).observe(outcome.elapsed_ms / 1000)
        return outcomes


def fetch_label(outcome: FetchOutcome) -> str:
    if outcome.error is None:
        return "truncated" if outcome.truncated else "ok"
    return "timeout" if "timed out" in outcome.error else "error"


def metrics_of(app: Flask) -> Metrics:
    metrics: Metrics = app.extensions["d3k2.http.metrics"]
    return metrics


class RequestMetrics:
    """Time and count every request. Unknown service ids share one label value so that a caller cannot
    grow the series without bound; the labelled children are looked up once per label values."""

    def __init__(self, metrics: Metrics, services: Sequence[str]) -> None:
        self._metrics = metrics
        self._known = frozenset(services)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def start(self) -> None:
        g.d3k2_metrics_started = time.perf_counter()

    def observe(self, response: Response) -> None:
        """Count the request's answer and time it (d3k2.http.app's after-request step)."""
        service_id = (request.view_args or {}).get("service_id")
        service = "-" if service_id is None else service_id if service_id in self._known else "unknown"
        endpoint, status = request.endpoint or "none", response.status_code
        key = (service, endpoint, status)
        children = self._children.get(key)
        if children is None:
            label = _ENDPOINTS.get(endpoint, endpoint.rsplit(".", 1)[-1])
            children = (
                self._metrics.requests.labels(service, label, str(status)),
                self._metrics.request_seconds.labels(service, label),
            )
            self._children[key] = children
        children[0].inc()
        started = g.pop("d3k2_metrics_started", None)
        if started is not None:
            children[1].observe(time.perf_counter() - started)


def init_app(app: Flask, metrics: Metrics, services: Sequence[str]) -> RequestMetrics:
    """Serve ``/metrics``; the returned RequestMetrics is called by d3k2.http.app around every request."""
    app.extensions["d3k2.http.metrics"] = metrics

    def _metrics_view() -> Response:
        return Response(metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.add_url_rule("/metrics", "metrics", _metrics_view, methods=["GET"])
    return RequestMetrics(metrics, services)
