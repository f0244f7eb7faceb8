"""d3k2 with one part of an answer left out (memoised, or skipped), chosen by ``D3K2_LEAVE_OUT``: what
d3k2 costs over this app under load is what that part costs. A measuring instrument for
``bench/leave_out.py`` only; the service never memoises or skips any of these.

Parts: ``none``, ``facts``, ``rules``, ``cards`` (each answered with its first answer from then on),
``model`` (the pydantic request model, memoised the same way), ``depth`` (the JSON depth check),
``record`` (cards served: neither queued nor written), ``log`` (the request line), ``ids`` (card and
suggestion uuid5s replaced by a counter), ``metrics`` (Prometheus counters and histograms).
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import Any

import d3k2.core.cards
import d3k2.http.api
import d3k2.http.metrics
import d3k2.service
from d3k2.http.wsgi import app

PART = os.environ.get("D3K2_LEAVE_OUT", "none")
PARTS = ("none", "facts", "rules", "cards", "model", "depth", "record", "log", "ids", "metrics")
if PART not in PARTS:
    raise SystemExit(f"D3K2_LEAVE_OUT must be one of {', '.join(PARTS)}, not {PART!r}")


def _memoised(name: str) -> None:
    """``d3k2.service.<name>`` answered with its first answer from then on: the leave-out bench sends one
    body over and over, so that answer is the right one for every call."""
    real = getattr(d3k2.service, name)
    first: list[Any] = []

    def memoised(*args: Any, **kwargs: Any) -> Any:
        if not first:
            first.append(real(*args, **kwargs))
        return first[0]

    setattr(d3k2.service, name, memoised)


if PART in ("facts", "rules", "cards", "model"):
    _memoised(
        {"facts": "facts_for", "rules": "evaluate", "cards": "build_cards", "model": "parse_request"}[PART]
    )
elif PART == "depth":
    d3k2.http.api.json_too_deep = lambda raw, limit: False  # type: ignore[assignment]
elif PART == "record":
    d3k2.http.api._record_served = lambda *args: None  # type: ignore[assignment]
elif PART == "log":
    logging.getLogger("d3k2.http").setLevel(logging.WARNING)
elif PART == "ids":
    _count = itertools.count()
    d3k2.core.cards.card_uuid = lambda *parts: f"00000000-0000-5000-8000-{next(_count) % 10**12:012d}"  # type: ignore[assignment]
elif PART == "metrics":

    class _Nothing:
        def observe(self, *args: Any) -> None:
            return None

    d3k2.http.metrics.RequestMetrics.observe = lambda *args, **kwargs: None  # type: ignore[method-assign]
    d3k2.http.metrics.Metrics.count_cards = lambda *args, **kwargs: None  # type: ignore[method-assign]
    app.extensions["d3k2.http.metrics"].cards_record_seconds = _Nothing()

__all__ = ["app"]
