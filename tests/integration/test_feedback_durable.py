"""The attack of issue 24, class 7 and its "zero acknowledged-but-lost feedback": feedback is posted without a
pause to d3k2 as production runs it (gunicorn, two workers, PostgreSQL) while PostgreSQL is frozen (SIGSTOP),
then stopped and started again, and while one worker is stopped with SIGTERM and another killed with SIGKILL.
Every feedback item answered 2xx must be in the database afterwards (tests/ledger.py); the ones refused
meanwhile (503, or no answer from a killed worker) may or may not be.

Bounded for `make test`; `make attack` (D3K2_ATTACK_EXAMPLES) holds each phase longer. The durations are
bounds on a hang, not speed claims.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_database_stall import frozen

from builders import SERVICE, make_app
from d3k2.store.feedback import FeedbackStore, Stored
from edge import gunicorn
from ledger import Ledger, send
from postgres import running_postgres

EXAMPLES = int(os.environ.get("D3K2_ATTACK_EXAMPLES", "15"))
PHASE = 1.0 if EXAMPLES <= 15 else 4.0  # seconds each phase of the attack lasts
HANG = 60.0
FEEDBACK = f"/cds-services/{SERVICE}/feedback"


def item(card: str) -> dict[str, object]:
    return {
        "card": card,
        "outcome": "overridden",
        "outcomeTimestamp": "2026-11-24T19:11:44Z",
        "overrideReason": {"reason": {"code": "patient-refused"}, "userComment": "durable"},
    }


@contextmanager
def senders(base: str, ledger: Ledger, threads: int = 2) -> Iterator[None]:
    """``threads`` clients posting feedback one after the other, each item naming a card of its own."""
    stop = threading.Event()
    counter = iter(range(10**9))
    lock = threading.Lock()

    def run(name: int) -> None:
        while not stop.is_set():
            with lock:
                n = next(counter)
            body = {"feedback": [item(f"durable-{name}-{n}")]}
            status, _answer = send(base, FEEDBACK, body, timeout=HANG)
            ledger.feedback_answer(status, body)
            if status == 0:
                stop.wait(0.05)  # a worker being replaced: no busy loop against a closed port

    running = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(threads)]
    for thread in running:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in running:
            thread.join(HANG)


def more_acknowledged(ledger: Ledger, than: int) -> int:
    """Wait (bounded) until feedback is acknowledged again: the service came back."""
    deadline = time.monotonic() + HANG
    while ledger.acknowledged() <= than:
        assert time.monotonic() < deadline, "no feedback acknowledged since the phase began"
        time.sleep(0.05)
    return ledger.acknowledged()


def workers(log: Path) -> list[int]:
    """The live workers of the gunicorn whose log this is (their boot lines; pids of ended ones skipped)."""
    text = log.read_text(errors="replace")
    master = int(re.search(r"Listening at: \S+ \((\d+)\)", text).group(1))  # type: ignore[union-attr]
    alive = []
    for pid in map(int, re.findall(r"Booting worker with pid: (\d+)", text)):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == master:
            alive.append(pid)
    return alive


def test_no_acknowledged_feedback_is_lost_through_outages_and_killed_workers(tmp_path: Path) -> None:
    with running_postgres() as server:
        url = server.create_database()
        ledger = Ledger()
        with (
            gunicorn(tmp_path, workers=2, env={"D3K2_DATABASE_URL": url}) as (base, log),
            senders(base, ledger),
        ):
            seen = more_acknowledged(ledger, 0)
            time.sleep(PHASE)

            refused = ledger.refused
            with frozen(server):  # posts in flight hang in their transaction; new ones time out: 503
                time.sleep(PHASE * 3)
            seen = more_acknowledged(ledger, seen)

            server.stop()
            time.sleep(PHASE)
            server.start()
            seen = more_acknowledged(ledger, seen)
            assert ledger.refused > refused  # the outages were felt

            first, second = workers(log)[:2]
            os.kill(first, signal.SIGTERM)  # graceful: its request in flight is answered first
            time.sleep(PHASE)
            seen = more_acknowledged(ledger, seen)
            os.kill(second, signal.SIGKILL)  # its request in flight is never answered
            time.sleep(PHASE)
            seen = more_acknowledged(ledger, seen)
            assert first not in workers(log) and second not in workers(log)

        lost = ledger.lost(url)
        assert not lost.feedback, f"{len(lost.feedback)} of {seen} acknowledged lost: {lost.feedback[:5]}"


def test_the_check_finds_feedback_acknowledged_and_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger's check can fail: a store that acknowledges each POST's last item without writing it."""
    app = make_app(tmp_path)
    real = FeedbackStore.record_feedback

    def dropping(self: FeedbackStore, service_id: str, items: list, received_at: object = None) -> Stored:
        kept = real(self, service_id, items[:-1])
        return Stored((*kept.new, True))

    ledger = Ledger()
    client = app.test_client()
    try:
        for n in range(3):
            body = {"feedback": [item(f"kept-{n}"), item(f"dropped-{n}")]}
            if n == 2:
                monkeypatch.setattr(FeedbackStore, "record_feedback", dropping)
            answer = client.post(FEEDBACK, json=body)
            ledger.feedback_answer(answer.status_code, body)
        lost = ledger.lost(app.extensions["d3k2.store"].engine)
        assert lost.feedback == [("dropped-2", "overridden")]
        assert ledger.acknowledged() == 6
    finally:
        app.extensions["d3k2.store"].close()
