"""Cards that fit the patient (CLINICAL.md 3, 3a, 3b): every suggested vitamin D dose, as a daily
equivalent, stays within the upper intake for the patient's age and pregnancy unless its own text says it is a
time-limited course; no K2 under 18 or in pregnancy; no second vitamin D product;
the value is always shown."""

from __future__ import annotations

import itertools
import re
from datetime import date, timedelta
from typing import Any

import pytest

from builders import TODAY, fixtures, ruleset
from d3k2.core.cards import OFFLINE_CARD_KEY, build_cards
from d3k2.core.engine import evaluate
from d3k2.core.terminology import LOINC
from d3k2.service import call_service, facts_for

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"
# IOM 2011 tolerable upper intake in IU/day by age in whole months (CLINICAL.md 3a); 4,000 from 9 years,
# and in pregnancy and lactation (3b).
CEILINGS = ((6, 1000), (12, 1500), (48, 2500), (108, 3000))
ADULT_UL = 4000
# Ages in whole months for each band, and None for no birthDate.
AGES = {
    "infant-4mo": 4,
    "infant-9mo": 9,
    "toddler": 30,
    "child": 64,
    "adolescent": 180,
    "adult": 480,
    "none": None,
}


def ceiling(months: int | None) -> int:
    if months is None:
        return CEILINGS[0][1]  # unknown age: the lowest, so any suggestion would have to fit an infant
    return next((ul for below, ul in CEILINGS if months < below), ADULT_UL)


def daily_iu(resource: dict[str, Any]) -> float | None:
    """IU/day of a vitamin D MedicationRequest: the strength of its RxNorm product (`5000 UNT`) × dose ×
    frequency per period; None for anything that is not an IU product."""
    coding = resource.get("medicationCodeableConcept", {}).get("coding", [{}])[0]
    strength = re.search(r"(\d+) UNT", coding.get("display", ""))
    if resource["resourceType"] != "MedicationRequest" or strength is None:
        return None
    dosage = resource["dosageInstruction"][0]
    dose = dosage["doseAndRate"][0]["doseQuantity"]["value"]
    repeat = dosage["timing"]["repeat"]
    days = repeat["period"] * {"d": 1, "wk": 7}[repeat["periodUnit"]]
    return int(strength.group(1)) * dose * repeat["frequency"] / days


def resources_of(card: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        action["resource"]
        for suggestion in card.get("suggestions", [])
        for action in suggestion["actions"]
        if "resource" in action
    ]


def is_course(resource: dict[str, Any]) -> bool:
    return "time-limited course" in resource["dosageInstruction"][0]["text"]


def patient(months: int | None) -> dict[str, Any]:
    found: dict[str, Any] = {"resourceType": "Patient", "id": "p1"}
    if months is not None:
        born = date(TODAY.year - (months + 1) // 12 - 1, 1, 1)
        while (TODAY.year - born.year) * 12 + TODAY.month - born.month - (TODAY.day < born.day) > months:
            born += timedelta(days=1)
        found["birthDate"] = born.isoformat()
    return found


def vitd(value: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": "v",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "62292-8"}]},
        "effectiveDateTime": (TODAY - timedelta(days=20)).isoformat(),
        "valueQuantity": {"value": value, "unit": "ng/mL"},
    }


PREGNANCY = {
    "resourceType": "Condition",
    "id": "c",
    "clinicalStatus": {"coding": [{"code": "active"}]},
    "code": {"coding": [{"system": SNOMED, "code": "77386006", "display": "Pregnancy"}]},
}
CURRENT_D3 = {
    "resourceType": "MedicationStatement",
    "id": "s",
    "status": "active",
    "medicationCodeableConcept": {
        "coding": [{"system": RXNORM, "code": "857466", "display": "Cholecalciferol 5000 UNT Oral Tablet"}]
    },
    "dosage": [
        {
            "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
            "doseAndRate": [{"doseQuantity": {"value": 1, "unit": "tablet"}}],
        }
    ],
}


def answer(resources: list[dict[str, Any]], profile: str) -> list[dict[str, Any]]:
    rs = ruleset()
    found = facts_for(rs, resources, TODAY)
    return build_cards(
        rs,
        evaluate(rs, found, hook="patient-view", profile=profile),
        hook="patient-view",
        patient_id="p1",
        card_key=OFFLINE_CARD_KEY,
    )


# Pregnancy with every age from 12 up and without a date of birth.
CASES = [
    case
    for case in itertools.product(AGES, (False, True), (8, 18, 25, 35, 45), sorted(ruleset().profiles))
    if not case[1] or (AGES[case[0]] or 144) >= 144
]


@pytest.mark.parametrize(("age", "pregnant", "value", "profile"), CASES)
def test_every_suggested_dose_fits_the_patient(age: str, pregnant: bool, value: float, profile: str) -> None:
    months = AGES[age]
    cards = answer([patient(months), vitd(value), *([PREGNANCY] if pregnant else [])], profile)
    limit = ceiling(months)
    for card in cards:
        for resource in resources_of(card):
            text = resource.get("medicationCodeableConcept", {}).get("text", "") + resource.get(
                "code", {}
            ).get("text", "")
            # No K2 under 18, without a known age or in pregnancy.
            if months is None or months < 216 or pregnant:
                assert "K2" not in text, (age, pregnant, card["summary"])
            daily = daily_iu(resource)
            if daily is None:
                continue
            # Pregnancy: at most 2,000 IU/day (ACOG 495), never a course.
            if pregnant:
                assert daily <= 2000, card["summary"]
            else:
                assert daily <= limit or is_course(resource), (age, value, profile, card["summary"], daily)
    # The value is on a card whenever it is low, whatever the age.
    if value < 30:
        assert any(f"{value} ng/mL" in c["detail"] for c in cards), (age, pregnant, profile)


@pytest.mark.parametrize("profile", sorted(ruleset().profiles))
def test_current_vitamin_d_gets_no_second_product(profile: str) -> None:
    cards = answer([patient(480), vitd(12), CURRENT_D3], profile)
    assert [daily_iu(r) for c in cards for r in resources_of(c) if daily_iu(r) is not None] == []
    (card,) = [c for c in cards if c["source"]["topic"]["code"] == "vitd-low-on-d"]
    assert "Cholecalciferol" in card["detail"] and "5,000 IU/day" in card["detail"]


# Every hook: order-time replacements must fit the patient too.
FIXTURES = [f for f in fixtures() if f.expected.get("status", 200) == 200]


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.id for f in FIXTURES])
def test_every_golden_suggestion_fits_the_patient(fixture: Any) -> None:
    born = (fixture.request.get("prefetch", {}).get("patient") or {}).get("birthDate")
    today = date.fromisoformat(fixture.expected["today"])
    months = None
    if born and len(born) == 10:
        b = date.fromisoformat(born)
        months = (today.year - b.year) * 12 + today.month - b.month - (today.day < b.day)
    outcome = call_service(
        ruleset(),
        fixture.expected["service"],
        fixture.request,
        today=today,
        profile=fixture.expected["profile"],
        fetcher=None,
    )
    pregnant = outcome.evaluation.values.get("pregnant") is True
    lactating = outcome.evaluation.values.get("lactating") is True
    for card in fixture.expected["response"].get("cards", []):
        for resource in resources_of(card):
            daily = daily_iu(resource)
            if daily is None:
                continue
            if pregnant:  # ACOG 495: at most 2,000 IU/day, never a course (CLINICAL.md 3b)
                assert daily <= 2000, (card["summary"], daily)
            if lactating:  # IOM 2011 UL 4,000 IU/day, no course exception (CLINICAL.md 3b)
                assert daily <= ADULT_UL, (card["summary"], daily)
            assert daily <= ceiling(months) or is_course(resource), (card["summary"], daily)


def test_cards_come_by_indicator_then_rule_priority() -> None:
    # Sorted by topic code the K2 card would stand above the deficiency card that carries the D3 order.
    cards = answer([patient(480), vitd(12)], "seed")
    assert [c["source"]["topic"]["code"] for c in cards] == ["vitd-deficient", "k2-with-d3"]
    rs = ruleset()
    warfarin = {
        **CURRENT_D3,
        "id": "w",
        "medicationCodeableConcept": {
            "coding": [{"system": RXNORM, "code": "855332", "display": "warfarin 5 MG"}]
        },
    }
    found = answer([patient(480), vitd(12), warfarin], "seed")
    order = [(c["indicator"], c["source"]["topic"]["code"]) for c in found]
    ranks = {"critical": 0, "warning": 1, "info": 2}
    priorities = {r.topic.code: r.priority for r in rs.rules}
    assert order == sorted(order, key=lambda o: (ranks[o[0]], priorities[o[1]]))
    assert order[0] == ("warning", "vka-k2")
