"""Lactation (CLINICAL.md 3b): breastfeeding is read as pregnancy is (a status Observation, newest wins, or an
active Condition), and then no K2 and no vitamin D above the 4,000 IU/day upper intake: never the course."""

from __future__ import annotations

import itertools
from datetime import date
from typing import Any

import pytest
from test_cards_fit import ADULT_UL, AGES, answer, daily_iu, patient, resources_of, vitd

from builders import TODAY, ruleset
from d3k2.core.terminology import LOINC
from d3k2.service import facts_for

SNOMED = "http://snomed.info/sct"
BREASTFEEDING, NOT_BREASTFEEDING, UNKNOWN = "LA29252-6", "LA29253-4", "LA4489-6"


def status(answer_code: str, when: str | None = "2026-11-01", oid: str = "bf") -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "63895-7"}]},
        "valueCodeableConcept": {"coding": [{"system": LOINC, "code": answer_code}]},
    }
    if when is not None:
        resource["effectiveDateTime"] = when
    return resource


def condition(code: str = "169750002", onset: str = "2026-08-10") -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": "c-bf",
        "clinicalStatus": {"coding": [{"code": "active"}]},
        "code": {"coding": [{"system": SNOMED, "code": code}], "text": "Breastfeeding"},
        "onsetDateTime": onset,
    }


def lactation(*resources: dict[str, Any], today: date = TODAY) -> list[str]:
    found = facts_for(ruleset(), list(resources), today)
    assert not found.pregnancy  # breastfeeding is not a pregnancy
    return [e.source for e in found.lactation]


def issues(*resources: dict[str, Any]) -> tuple[str, ...]:
    return facts_for(ruleset(), list(resources), TODAY).issues


def test_a_breastfeeding_status_or_condition_is_lactation() -> None:
    assert lactation(status(BREASTFEEDING)) == ["Observation/bf"]
    assert lactation(condition()) == ["Condition/c-bf"]
    assert lactation(status(BREASTFEEDING, when=None)) == ["Observation/bf"]  # undated: never dropped


@pytest.mark.parametrize("code", [NOT_BREASTFEEDING, UNKNOWN])
def test_not_breastfeeding_or_unknown_is_no_lactation(code: str) -> None:
    assert lactation(status(code)) == []


def test_the_newest_status_wins_and_the_superseded_one_is_named() -> None:
    older, newer = status(BREASTFEEDING, "2026-05-01", "a"), status(NOT_BREASTFEEDING, "2026-11-01", "b")
    assert lactation(older, newer) == []
    assert any(
        "2026-05-01: superseded by 'not currently breastfeeding' of 2026-11-01" in i
        for i in issues(older, newer)
    )
    # An older "not breastfeeding" ends nothing newer; an undated one ends nothing.
    assert lactation(status(NOT_BREASTFEEDING, "2026-05-01", "a"), status(BREASTFEEDING, "2026-11-01", "b"))
    assert lactation(status(NOT_BREASTFEEDING, None, "a"), status(BREASTFEEDING, "2026-05-01", "b"))


def test_a_status_older_than_365_days_is_not_current_and_is_named() -> None:
    assert lactation(status(BREASTFEEDING, "2025-11-24"))  # 365 days
    old = status(BREASTFEEDING, "2025-11-23")  # 366 days
    assert lactation(old) == []
    assert any("2025-11-23: older than 365 days" in i for i in issues(old))
    assert lactation(condition(onset="2025-11-23")) == []


def test_pregnancy_statuses_do_not_make_lactation_and_the_reverse() -> None:
    pregnant = {**status("LA15173-0"), "code": {"coding": [{"system": LOINC, "code": "82810-3"}]}}
    found = facts_for(ruleset(), [pregnant, status(NOT_BREASTFEEDING, oid="n")], TODAY)
    assert found.pregnancy and not found.lactation


@pytest.mark.parametrize(
    ("age", "value", "profile"),
    list(itertools.product(["adolescent", "adult", "none"], (8, 18, 25, 35, 45), sorted(ruleset().profiles))),
)
def test_breastfeeding_gets_no_k2_and_nothing_above_the_upper_intake(
    age: str, value: float, profile: str
) -> None:
    cards = answer([patient(AGES[age]), vitd(value), status(BREASTFEEDING)], profile)
    for card in cards:
        for resource in resources_of(card):
            text = resource.get("medicationCodeableConcept", {}).get("text", "")
            assert "K2" not in text, card["summary"]
            daily = daily_iu(resource)
            # No course exception in lactation (CLINICAL.md 3b): within the UL, whatever the card says.
            assert daily is None or daily <= ADULT_UL, (age, value, profile, card["summary"], daily)
    if value < 30:  # the value is always on a card
        assert any(f"{value} ng/mL" in c["detail"] for c in cards), (age, profile)
    topics = [c["source"]["topic"]["code"] for c in cards]
    assert "k2-with-d3" not in topics and "vitd-deficient" not in topics
