"""Two resources with one type and id are copies of one record (CLINICAL.md 5, "Copies"): the newer version
wins when versions say which; otherwise every copy is read, so that no copy removes a caution."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from builders import TODAY, ruleset
from d3k2.core.cards import OFFLINE_CARD_KEY, build_cards
from d3k2.core.engine import evaluate
from d3k2.core.facts import Facts
from d3k2.core.terminology import LOINC, SNOMED
from d3k2.service import facts_for

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SUBSETTED = {"tag": [{"code": "SUBSETTED"}]}


def facts(*resources: Any, today: date = TODAY) -> Facts:
    return facts_for(ruleset(), list(resources), today)


def warfarin(status: str = "active", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "MedicationStatement",
        "id": "w",
        "status": status,
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "855332"}], "text": "warfarin"},
        **extra,
    }


def sarcoidosis(clinical: str = "active", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": "s",
        "clinicalStatus": {"coding": [{"code": clinical}]},
        "code": {"coding": [{"system": SNOMED, "code": "31541009"}], "text": "Sarcoidosis"},
        **extra,
    }


def vka(found: Facts) -> list[str]:
    return [m.source for m in found.meds("vka")]


def both_orders(first: dict[str, Any], second: dict[str, Any]) -> list[Facts]:
    return [facts(first, second), facts(second, first)]


@pytest.mark.parametrize(
    "copy",
    [
        {"resourceType": "MedicationStatement", "id": "w", "meta": SUBSETTED},
        {"resourceType": "MedicationStatement", "id": "w"},
        warfarin("stopped"),
        warfarin("entered-in-error"),
        # A SUBSETTED copy never wins by version: what it lacks says nothing.
        warfarin("stopped", meta={**SUBSETTED, "versionId": "9"}),
    ],
)
def test_a_copy_without_a_newer_version_keeps_warfarin_active(copy: dict[str, Any]) -> None:
    original = warfarin(meta={"versionId": "3"}) if "versionId" in copy.get("meta", {}) else warfarin()
    for found in both_orders(original, copy):
        assert vka(found) == ["MedicationStatement/w"]
        assert found.copies == ("MedicationStatement/w",)


@pytest.mark.parametrize(
    "copy",
    [
        {"resourceType": "Condition", "id": "s"},
        {"resourceType": "Condition", "id": "s", "meta": SUBSETTED},
        sarcoidosis("resolved"),
        sarcoidosis(verificationStatus={"coding": [{"code": "refuted"}]}),
    ],
)
def test_a_copy_without_a_newer_version_keeps_sarcoidosis(copy: dict[str, Any]) -> None:
    for found in both_orders(sarcoidosis(), copy):
        assert [e.source for e in found.conditions["sarcoidosis"]] == ["Condition/s"]
        assert found.copies == ("Condition/s",)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ({"versionId": "2"}, {"versionId": "10"}),  # numbers, not text: 10 is newer than 2
        ({"lastUpdated": "2026-01-01T10:00:00Z"}, {"lastUpdated": "2026-01-01T10:00:00-01:00"}),
        # versionIds that are not numbers say nothing about order: lastUpdated does.
        ({"versionId": "b", "lastUpdated": "2026-01-01"}, {"versionId": "a", "lastUpdated": "2026-02-01"}),
    ],
)
def test_the_newer_version_wins(old: dict[str, str], new: dict[str, str]) -> None:
    for found in both_orders(warfarin(meta=old), warfarin("stopped", meta=new)):
        assert vka(found) == [] and found.copies == ()
    for found in both_orders(warfarin("stopped", meta=old), warfarin(meta=new)):
        assert vka(found) == ["MedicationStatement/w"] and found.copies == ()


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"versionId": "2"}, {}),  # one copy without a version: cannot tell which is newer
        ({"versionId": "a"}, {"versionId": "b"}),
        ({"versionId": "2"}, {"versionId": "2"}),  # one version, two contents
        ({"versionId": "٣"}, {"versionId": "2"}),  # a digit, but not an ASCII number
        ({"lastUpdated": "2026-01-01"}, {"lastUpdated": "not a date"}),
        ({"lastUpdated": "2026-01-01"}, {"lastUpdated": "0001-01-01T00:00:00+01:00"}),  # before year 1 in UTC
        ({"lastUpdated": "2026-01-01"}, {"lastUpdated": 20260101}),
        ({"lastUpdated": "2026-01-01"}, {"lastUpdated": "2026-01-01T00:00:00Z"}),
    ],
)
def test_copies_whose_order_is_unknown_are_all_read(first: dict[str, str], second: dict[str, str]) -> None:
    for found in both_orders(warfarin(meta=first), warfarin("stopped", meta=second)):
        assert vka(found) == ["MedicationStatement/w"]
        assert found.copies == ("MedicationStatement/w",)


def test_identical_copies_are_one_record_and_no_conflict() -> None:
    found = facts(warfarin(), warfarin(), warfarin())
    assert vka(found) == ["MedicationStatement/w"] and found.copies == ()
    assert len(found.medications) == 1


def test_only_subsetted_copies_are_all_read() -> None:
    bare = {"resourceType": "MedicationStatement", "id": "w", "meta": SUBSETTED}
    for found in both_orders(warfarin(meta=SUBSETTED), bare):
        assert vka(found) == ["MedicationStatement/w"]


def test_a_referenced_medication_sent_as_two_copies_is_what_either_says() -> None:
    statement = {
        "resourceType": "MedicationStatement",
        "id": "st",
        "status": "active",
        "medicationReference": {"reference": "Medication/m"},
    }
    full = {
        "resourceType": "Medication",
        "id": "m",
        "code": {"coding": [{"system": RXNORM, "code": "855332"}]},
    }
    bare = {"resourceType": "Medication", "id": "m", "meta": SUBSETTED}
    for found in (facts(statement, full, bare), facts(bare, statement, full)):
        assert vka(found) == ["MedicationStatement/st"]
        assert found.copies == ("Medication/m",)


def test_a_pregnancy_status_copy_does_not_remove_the_pregnancy() -> None:
    pregnant = {
        "resourceType": "Observation",
        "id": "p",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "82810-3"}]},
        "effectiveDateTime": "2026-11-01",
        "valueCodeableConcept": {"coding": [{"code": "LA15173-0"}]},
    }
    bare = {"resourceType": "Observation", "id": "p", "status": "final", "meta": SUBSETTED}
    for found in both_orders(pregnant, bare):
        assert [e.source for e in found.pregnancy] == ["Observation/p"]


def test_copies_of_one_lab_result_do_not_depend_on_order() -> None:
    low = {
        "resourceType": "Observation",
        "id": "v",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "62292-8"}]},
        "effectiveDateTime": "2026-11-01",
        "valueQuantity": {"value": 10, "unit": "ng/mL"},
    }
    high = {**low, "valueQuantity": {"value": 80, "unit": "ng/mL"}}
    first, second = both_orders(low, high)
    assert first == second and first.copies == ("Observation/v",)


def test_the_data_card_names_the_copies() -> None:
    rs = ruleset()
    found = facts(warfarin(), warfarin("stopped"), sarcoidosis(), sarcoidosis("resolved"))
    evaluation = evaluate(rs, found, hook="patient-view", profile=rs.default_profile)
    cards = build_cards(rs, evaluation, hook="patient-view", patient_id="p1", card_key=OFFLINE_CARD_KEY)
    data = next(c for c in cards if c["source"]["topic"]["code"] == "data-incomplete")
    assert data["detail"].startswith(
        "Two different copies of the same record were sent: Sarcoidosis, warfarin. "
        "Cautions from either are kept.\n\n"
    )
    assert "Not used" not in data["detail"]
    # Both cautions are kept: warfarin stays active (its card shows when K2 is at stake, not beside the
    # granulomatous card that blocks dosing) and the granulomatous card shows.
    assert evaluation.values["vka.active"] is True
    assert "granulomatous" in {c["source"]["topic"]["code"] for c in cards}
