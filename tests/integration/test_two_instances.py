"""Several instances, one database (issue 25): two d3k2 instances as production runs them (gunicorn with
docker/gunicorn.conf.py, two workers each, JWT required), each with its own data directory, both behind one
public name and on one PostgreSQL database. A token accepted by one is refused by the other; hook calls and
feedback sent to both appear in one `d3k2 feedback report`; one stopped with SIGTERM loses nothing it
acknowledged, neither the cards it served (written after each answer, so queued when the stop comes) nor
feedback (tests/ledger.py).

The jti store itself (claims shared in PostgreSQL, the local file while PostgreSQL fails) is tested in
test_jti_shared.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from builders import SERVICE, TODAY, hook_request
from edge import gunicorn
from jwt_keys import BASE_URL, es384, write_trust
from ledger import Ledger, send

HOOK = f"/cds-services/{SERVICE}"
FEEDBACK = f"{HOOK}/feedback"


def bearer(path: str, token: str | None = None) -> dict[str, str]:
    """A fresh token for ``path`` (the audience is the public URL called), unless one is given."""
    if token is None:
        now = int(time.time())
        token = es384().sign(aud=f"{BASE_URL}{path}", iat=now - 5, exp=now + 240)
    return {"Authorization": f"Bearer {token}", "X-D3K2-Today": TODAY.isoformat()}


def patient_view(n: int) -> dict[str, Any]:
    """The sandbox's patient-view call as another visit (its own hookInstance and patient): its own cards."""
    request = hook_request()
    request["hookInstance"] = str(uuid.uuid4())
    request["context"] = {**request["context"], "patientId": f"two-instances-{n}"}
    return request


def call(base: str, n: int, ledger: Ledger) -> list[str]:
    status, answer = send(base, HOOK, patient_view(n), bearer(HOOK))
    assert status == 200, (base, status)
    ledger.hook_answer(status, answer)
    return [card["uuid"] for card in answer["cards"]]


def give_feedback(base: str, card: str, ledger: Ledger) -> None:
    body = {
        "feedback": [
            {
                "card": card,
                "outcome": "overridden",
                "outcomeTimestamp": f"{TODAY.isoformat()}T19:11:44Z",
                "overrideReason": {"reason": {"code": "patient-refused"}},
            }
        ]
    }
    status, _answer = send(base, FEEDBACK, body, bearer(FEEDBACK))
    assert status == 200, (base, status)
    ledger.feedback_answer(status, body)


def report(url: str, tmp_path: Path) -> dict[str, Any]:
    env = {**os.environ, "D3K2_DATABASE_URL": url, "D3K2_DATA_DIR": str(tmp_path / "report")}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "d3k2"), "feedback", "report", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_two_instances_share_one_database(postgres_url: str, tmp_path: Path) -> None:
    trust = write_trust(tmp_path / "trust.json")
    env = {
        "D3K2_DATABASE_URL": postgres_url,
        "D3K2_AUTH": "required",
        "D3K2_TRUST_FILE": str(trust),
        "D3K2_PUBLIC_BASE_URL": BASE_URL,  # both behind one public name, as behind a load balancer
    }
    for name in ("a", "b"):
        (tmp_path / name).mkdir()  # each its own data directory (and jti file, unused: PostgreSQL is shared)
    ledger = Ledger()
    with gunicorn(tmp_path / "b", workers=2, env=env) as (second, _):
        with gunicorn(tmp_path / "a", workers=2, env=env, check_exit=True) as (first, _):
            token = bearer(HOOK)["Authorization"].removeprefix("Bearer ")
            status, answer = send(first, HOOK, patient_view(0), bearer(HOOK, token))
            assert status == 200
            ledger.hook_answer(status, answer)
            assert send(second, HOOK, patient_view(0), bearer(HOOK, token))[0] == 401  # replayed elsewhere
            assert send(first, HOOK, patient_view(0), bearer(HOOK, token))[0] == 401

            cards = {base: call(base, n, ledger) for n, base in enumerate((first, second), start=1)}
            assert cards[first] and cards[second]
            # Feedback to the instance that served the card and to the other one.
            give_feedback(first, cards[first][0], ledger)
            give_feedback(second, cards[second][0], ledger)
            give_feedback(second, cards[first][-1], ledger)
            give_feedback(first, cards[second][-1], ledger)
            # Served just before the stop: still queued in the first instance's workers when SIGTERM comes.
            for n in range(3, 9):
                call(first, n, ledger)
        # The first instance is stopped (SIGTERM, graceful exit checked); the second keeps answering.
        call(second, 9, ledger)
        give_feedback(second, ledger.served[-1], ledger)

    lost = ledger.lost(postgres_url)
    assert not lost, lost
    rules = report(postgres_url, tmp_path)["rules"]
    assert sum(rule["overridden"] for rule in rules) == len(ledger.feedback) == 5
    assert sum(rule["served"] for rule in rules) == len(ledger.served)
    assert all(rule["rule"] is not None for rule in rules)  # every card's rule known, whichever served it
