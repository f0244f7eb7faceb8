"""Repeatable cost per call, for comparing a change before and after on a loaded machine.

Wall-clock time is noisy when other programs share the cores; instruction counts are not. ``ir MODE N``
runs one mode under callgrind (valgrind) and counts the instructions (Ir) of N calls only, not start-up:

    cd bench && ../.venv/bin/python profile_core.py ir core-typical 20
    cd bench && ../.venv/bin/python profile_core.py ir edge-typical 20
    cd bench && ../.venv/bin/python profile_core.py ir history 1

Instructions leave out the kernel (page faults, system calls) and cache misses: a change that only moves
those is measured under load (``make bench``), not here.

``run MODE N`` (what callgrind runs) makes N calls after two warm-up calls (every cache warm, as in a
worker that has answered before). Modes:

- core-typical: ``call_service`` on the typical patient-view body, parsed once (request model → cards)
- edge-typical: the typical body POSTed through the WSGI app (``d3k2.http.wsgi:app``, auth off): the whole
  answer, Flask, hooks, log line, metrics, cards-served hand-off and JSON included
- core-order-sign: ``call_service`` on the order-sign body
- facts-typical, rules-typical, cards-typical: one stage of core-typical (cards-typical: rules and cards,
  so subtract rules-typical)
- history: the 7.4 MB history body read as the edge reads it (depth bound, orjson, entry count) and answered
  by ``call_service``
- history-parse: only the reading of the history body (depth bound, orjson, entry count): what history
  costs beyond it is the core's
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import scenarios

SERVICE = "d3k2-patient-view"
TODAY = scenarios.TODAY
PATIENT = scenarios.PATIENT


def _app_env(data_dir: str) -> None:
    os.environ.update(
        {
            "D3K2_ENV": "dev",
            "D3K2_AUTH": "off",
            "D3K2_DATA_DIR": data_dir,
            "D3K2_LOG_LEVEL": "INFO",
            "D3K2_MAX_BODY_BYTES": str(32 * 1024 * 1024),
        }
    )


def _runner(mode: str, data_dir: str) -> Callable[[], object]:
    _app_env(data_dir)
    sys.stderr = Path(os.devnull).open("w")  # noqa: SIM115 - the log lines go nowhere, as written
    from d3k2.core.limits import json_too_deep, prefetch_entries
    from d3k2.http.web import runtime
    from d3k2.http.wsgi import app  # the worker's app: gc.freeze and the collector threshold applied
    from d3k2.service import call_service

    with app.app_context():
        rt = runtime()
    ruleset, profile = rt.ruleset, rt.profile

    if mode in ("facts-typical", "rules-typical", "cards-typical"):
        return _stage(mode, ruleset, profile)

    if mode in ("core-typical", "core-order-sign"):
        body = scenarios.typical() if mode == "core-typical" else scenarios.order_sign()
        raw = json.dumps(body, separators=(",", ":")).encode()
        service = SERVICE if mode == "core-typical" else "d3k2-order-sign"
        import orjson

        payload = orjson.loads(raw)

        def core() -> object:
            return call_service(ruleset, service, payload, today=TODAY, profile=profile, fetcher=None)

        return core

    if mode == "history-parse":
        import orjson

        raw = json.dumps(scenarios.history(), separators=(",", ":")).encode()

        def parse() -> object:
            assert not json_too_deep(raw, 64)
            return prefetch_entries(orjson.loads(raw))

        return parse

    if mode == "history":
        import orjson

        raw = json.dumps(scenarios.history(), separators=(",", ":")).encode()

        def history() -> object:
            assert not json_too_deep(raw, 64)
            payload = orjson.loads(raw)
            prefetch_entries(payload)
            return call_service(ruleset, SERVICE, payload, today=TODAY, profile=profile, fetcher=None)

        return history

    if mode == "edge-typical":
        raw = json.dumps(scenarios.typical(), separators=(",", ":")).encode()
        environ = {
            "REQUEST_METHOD": "POST",
            "SCRIPT_NAME": "",
            "PATH_INFO": f"/cds-services/{SERVICE}",
            "QUERY_STRING": "",
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8080",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1",
            "CONTENT_TYPE": "application/json",
            "CONTENT_LENGTH": str(len(raw)),
            "HTTP_HOST": "127.0.0.1:8080",
            "HTTP_X_D3K2_TODAY": TODAY.isoformat(),
            "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": False,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "wsgi.version": (1, 0),
        }
        statuses: list[str] = []

        def start_response(status: str, headers: object, exc_info: object = None) -> None:
            statuses.append(status)

        def edge() -> object:
            answer = b"".join(app({**environ, "wsgi.input": io.BytesIO(raw)}, start_response))
            assert statuses.pop() == "200 OK", answer
            return answer

        return edge

    raise SystemExit(f"unknown mode {mode!r}")


def _stage(mode: str, ruleset: Any, profile: str) -> Callable[[], object]:
    """One stage of the typical call_service, the stages before it run once."""
    import orjson

    from d3k2.core.cards import OFFLINE_CARD_KEY, build_cards
    from d3k2.core.engine import evaluate
    from d3k2.core.hooks import parse_request
    from d3k2.fhir.prefetch import resolve
    from d3k2.service import facts_for

    payload = orjson.loads(json.dumps(scenarios.typical()))
    request = parse_request(payload)
    resolved = resolve(ruleset.services[SERVICE].prefetch, request, None, ruleset.texts)
    facts = facts_for(ruleset, resolved.resources, TODAY, resolved)
    if mode == "facts-typical":
        return lambda: facts_for(ruleset, resolved.resources, TODAY, resolved)
    if mode == "rules-typical":
        return lambda: evaluate(ruleset, facts, hook=request.hook, profile=profile)

    def cards() -> object:  # a fresh evaluation each time: its template fields are made when read
        evaluation = evaluate(ruleset, facts, hook=request.hook, profile=profile)
        return build_cards(
            ruleset, evaluation, hook=request.hook, patient_id=PATIENT, card_key=OFFLINE_CARD_KEY
        )

    return cards


def run(mode: str, calls: int) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        once = _runner(mode, data_dir)
        for _ in range(2):
            once()
        # The measured calls, the only ones inside functools.reduce: callgrind counts within it alone.
        functools.reduce(lambda _done, _index: once(), range(calls), None)


def _instructions(mode: str, calls: int) -> int:
    with tempfile.TemporaryDirectory() as out:
        target = Path(out) / "callgrind.out"
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--collect-atstart=no",
                "--toggle-collect=functools_reduce",
                f"--callgrind-out-file={target}",
                sys.executable,
                __file__,
                "run",
                mode,
                str(calls),
            ],
            capture_output=True,
            text=True,
            check=True,
            # Set and dict orders, and so the instructions run, depend on string hashes: fixed.
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        found = re.search(r"Collected : (\d+)", done.stderr)
        if not found:
            raise SystemExit(done.stderr[-2000:])
        return int(found.group(1))


def ir(mode: str, calls: int) -> None:
    """Instructions per call, counted in ``calls`` calls after two warm-up calls."""
    total = _instructions(mode, calls)
    print(f"{mode}: {total / max(calls, 1):,.0f} Ir per call ({calls} calls, {total:,} Ir)", flush=True)


if __name__ == "__main__":
    command, mode, *counts = sys.argv[1:]
    if command == "run":
        run(mode, int(counts[0]))
    elif command == "ir":
        ir(mode, int(counts[0]))
    else:
        raise SystemExit(__doc__)
