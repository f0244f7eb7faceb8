"""d3k2 with its core memoised: the whole HTTP edge (body checks, parsing, logs, metrics, JWT hook,
cards-served recording, response) runs as in d3k2.http.wsgi, but ``call_service`` answers each distinct
(service, hookInstance) from a memo after its first call. What this app costs over the bare app is
the edge's share of d3k2's cost; what d3k2 costs over this app is the core's (request model,
prefetch, facts, rules, cards). A measuring instrument only: the service never memoises answers.
"""

from __future__ import annotations

from typing import Any

import d3k2.http.api
from d3k2.http.wsgi import app

_real = d3k2.http.api.call_service
_memo: dict[tuple[str, Any], Any] = {}


def _memoised(ruleset: Any, service_id: str, payload: Any, **options: Any) -> Any:
    key = (service_id, payload.get("hookInstance") if isinstance(payload, dict) else None)
    if key not in _memo:
        _memo[key] = _real(ruleset, service_id, payload, **options)
    return _memo[key]


d3k2.http.api.call_service = _memoised  # type: ignore[assignment]

__all__ = ["app"]
