"""Pregnancy evidence on record: older than a pregnancy lasts is not used and is named on the data card
(CLINICAL.md 5, review finding 12); of several pregnancy statuses the newest wins (finding 15)."""

from __future__ import annotations

from typing import Any

import pytest

from builders import TODAY, ruleset
from d3k2.core.facts import Facts
from d3k2.core.terminology import LOINC
from d3k2.service import facts_for

PREGNANT = "LA15173-0"
NOT_PREGNANT = "LA26683-5"


def facts(*resources: dict[str, Any]) -> Facts:
    return facts_for(ruleset(), list(resources), TODAY)


def status(when: str | None, answer: str = PREGNANT, oid: str = "preg") -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "82810-3"}]},
        "valueCodeableConcept": {"coding": [{"system": LOINC, "code": answer}]},
    }
    if when:
        resource["effectiveDateTime"] = when
    return resource


def condition(onset: str | None, recorded: str | None = None) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Condition",
        "id": "preg-c",
        "clinicalStatus": {"coding": [{"code": "active"}]},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "77386006"}], "text": "Pregnancy"},
    }
    if onset:
        resource["onsetDateTime"] = onset
    if recorded:
        resource["recordedDate"] = recorded
    return resource


@pytest.mark.parametrize(
    ("resource", "named"),
    [
        (
            status("2026-01-27"),
            "pregnancy status 'pregnant' of 2026-01-27: older than a pregnancy lasts (300 days),"
            " not a current pregnancy",
        ),
        (
            condition("2024-01-01", recorded="2026-11-01"),
            "condition 'Pregnancy' of 2024-01-01: older than a pregnancy lasts (300 days),"
            " not a current pregnancy",
        ),
    ],
)
def test_stale_pregnancy_evidence_is_named(resource: dict[str, Any], named: str) -> None:
    found = facts(resource)
    assert found.pregnancy == ()
    assert found.issues == (named,)


@pytest.mark.parametrize("resource", [status("2026-01-28"), status(None), condition(None)])
def test_current_or_undated_pregnancy_evidence_is_used_and_not_named(resource: dict[str, Any]) -> None:
    found = facts(resource)
    assert len(found.pregnancy) == 1
    assert found.issues == ()


@pytest.mark.parametrize(
    ("older", "newer", "pregnant"),
    [
        (status("2026-03-01"), status("2026-11-01", NOT_PREGNANT, "np"), False),
        (status("2026-11-01"), status("2026-03-01", NOT_PREGNANT, "np"), True),  # the newer says pregnant
        (status("2026-11-01"), status("2026-11-01", NOT_PREGNANT, "np"), True),  # same day: the caution
        (status(None), status("2026-11-01", NOT_PREGNANT, "np"), True),  # undated: never dropped
        (status("2026-03-01"), status(None, NOT_PREGNANT, "np"), True),  # undated "not pregnant": not newer
        (status("2026-03-01"), status("2026-11-01", "LA4489-6", "np"), True),  # "unknown" supersedes nothing
        (condition("2026-03-01"), status("2026-11-01", NOT_PREGNANT, "np"), True),  # a condition stays
    ],
)
def test_the_newest_pregnancy_status_wins(older: Any, newer: Any, pregnant: bool) -> None:
    found = facts(older, newer)
    assert bool(found.pregnancy) is pregnant
    superseded = "pregnancy status 'pregnant' of 2026-03-01: superseded by 'not pregnant' of 2026-11-01"
    assert (superseded in found.issues) is not pregnant
