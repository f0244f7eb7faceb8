"""The ceiling: a bare Flask app that reads and parses the same body and answers fixed cards.

``BARE_PARSER=orjson`` (default, the parser d3k2 uses at its edge) or ``json`` (the standard library,
which the issue's budget for the 10,000-Observation history is defined against).
"""

from __future__ import annotations

import json
import os
from typing import Any

import orjson
from flask import Flask, Response, request

CARDS = {
    "cards": [
        {
            "uuid": "5d0f2f5e-2d6b-5c56-9a77-6a4f3f0c9b10",
            "summary": "25(OH)D 14 ng/mL on 2026-11-21 is deficient (< 30 ng/mL)",
            "indicator": "warning",
            "detail": "Vitamin D3 supplementation is suggested.",
            "source": {"label": "bench", "topic": {"code": "bench"}},
        }
    ],
    "systemActions": [],
}


def create_app() -> Flask:
    loads: Any = json.loads if os.environ.get("BARE_PARSER", "orjson") == "json" else orjson.loads
    body = orjson.dumps(CARDS)
    app = Flask("bare")

    @app.post("/cds-services/<service_id>")
    def service(service_id: str) -> Response:
        payload = loads(request.get_data(cache=False))
        if not isinstance(payload, dict):
            return Response(b'{"error":"bad-request"}', status=400, mimetype="application/json")
        return Response(body, mimetype="application/json")

    return app
