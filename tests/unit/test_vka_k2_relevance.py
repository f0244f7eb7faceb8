"""The warfarin/K2 caution at patient-view (CLINICAL.md 4, 6a): never a K2 suggestion beside a vitamin K
antagonist; the caution whenever K2 is on the list or would be suggested without the antagonist, or when data
is missing with which an adult would be suggested K2; no caution when nothing about K2 is at stake; a DOAC
changes nothing."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from builders import TODAY, lab_observation, ruleset, topics
from d3k2.service import call_service

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"
WARFARIN = ("855332", "warfarin sodium 5 MG Oral Tablet")
APIXABAN = ("1364445", "apixaban 5 MG Oral Tablet")
K2 = ("1537458", "Vitamin K 2 0.1 MG Oral Capsule")
KEYS = ("patient", "vitd", "egfr", "calcium", "pregnancy", "medstatements", "medrequests", "conditions")
VKA_CARDS = {"vka-k2", "vka-k2-taking"}


def searchset(*resources: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


def statement(sid: str, medication: tuple[str, str]) -> dict[str, Any]:
    code, name = medication
    return {
        "resourceType": "MedicationStatement",
        "id": sid,
        "status": "active",
        "medicationCodeableConcept": {
            "coding": [{"system": RXNORM, "code": code, "display": name}],
            "text": name,
        },
        "subject": {"reference": "Patient/p1"},
    }


def request(
    *,
    born: str | None,
    vitd: float | None,
    pregnant: bool,
    egfr: float,
    medications: tuple[tuple[str, str], ...],
    missing: str | None,
) -> dict[str, Any]:
    patient: dict[str, Any] = {"resourceType": "Patient", "id": "p1"}
    if born is not None:
        patient["birthDate"] = born
    conditions = []
    if pregnant:
        conditions.append(
            {
                "resourceType": "Condition",
                "id": "preg",
                "clinicalStatus": {"coding": [{"code": "active"}]},
                "code": {"coding": [{"system": SNOMED, "code": "77386006", "display": "Pregnancy"}]},
                "subject": {"reference": "Patient/p1"},
            }
        )
    prefetch: dict[str, Any] = {
        "patient": patient,
        "vitd": searchset(
            *([lab_observation("62292-8", vitd, "ng/mL", oid="v")] if vitd is not None else [])
        ),
        "egfr": searchset(lab_observation("98979-8", egfr, "mL/min/{1.73_m2}", oid="e")),
        "calcium": searchset(lab_observation("17861-6", 9.4, "mg/dL", oid="ca")),
        "pregnancy": searchset(),
        "medstatements": searchset(*(statement(f"m{i}", m) for i, m in enumerate(medications))),
        "medrequests": searchset(),
        "conditions": searchset(*conditions),
    }
    if missing is not None:
        del prefetch[missing]  # not sent and no FHIR server to ask
    return {
        "hook": "patient-view",
        "hookInstance": "hi-vka-k2",
        "context": {"patientId": "p1", "userId": "Practitioner/1"},
        "prefetch": prefetch,
    }


def cards(profile: str, **given: Any) -> list[dict[str, Any]]:
    payload = request(**given)
    outcome = call_service(
        ruleset(), "d3k2-patient-view", payload, today=TODAY, profile=profile, fetcher=None
    )
    found: list[dict[str, Any]] = outcome.response["cards"]
    return found


def suggests_k2(found: list[dict[str, Any]]) -> bool:
    return any(
        "K2" in action["resource"].get("medicationCodeableConcept", {}).get("text", "")
        for card in found
        for suggestion in card.get("suggestions", [])
        for action in suggestion["actions"]
        if "resource" in action
    )


CASES = list(
    itertools.product(
        sorted(ruleset().profiles),
        ("1970-01-01", "2016-01-01", None),  # adult, child, no birthDate
        (12, 25, 45, None),
        (False, True),  # pregnant
        (75, 25),  # eGFR: normal, below 30
        (False, True),  # K2 on the medication list
        (None, "pregnancy", "calcium", "medstatements", "vitd"),  # a key not had
    )
)


@pytest.mark.parametrize(("profile", "born", "vitd", "pregnant", "egfr", "k2", "missing"), CASES)
def test_warfarin_caution_whenever_k2_is_at_stake_and_never_a_k2_suggestion_beside_it(
    profile: str,
    born: str | None,
    vitd: float | None,
    pregnant: bool,
    egfr: float,
    k2: bool,
    missing: str | None,
) -> None:
    listed = (K2,) if k2 else ()
    given = {"born": born, "vitd": vitd, "pregnant": pregnant, "egfr": egfr, "missing": missing}
    # With medications not had, the warfarin on the list is not had either: it cannot be warned about.
    on_warfarin = cards(profile, medications=(WARFARIN, *listed), **given)
    without = cards(profile, medications=listed, **given)
    on_doac = cards(profile, medications=(APIXABAN, *listed), **given)
    case = (profile, born, vitd, pregnant, egfr, k2, missing)
    # The value is always on a card when it is low, whatever else is missing (issue 22).
    target = next(b for b in ruleset().profiles[profile].bands if b.id == "target")
    if vitd is not None and vitd < target.lower and missing != "vitd":
        for found in (on_warfarin, without, on_doac):
            assert any(f"**{vitd} ng/mL**" in c["detail"] for c in found), case
    assert not suggests_k2(on_warfarin), case
    # A DOAC has no vitamin K interaction: the same cards as without it, no caution (CLINICAL.md 4).
    assert topics({"cards": on_doac}) == topics({"cards": without}), case
    assert suggests_k2(on_doac) == suggests_k2(without), case
    if missing == "medstatements":
        return
    shown = VKA_CARDS & set(topics({"cards": on_warfarin}))
    if k2 or suggests_k2(without):
        assert shown, case
    # A caution never disappears because other data is missing: shown whenever an adult with the data had
    # would be suggested K2.
    if missing is not None or born is None:
        had = {**given, "born": born or "1970-01-01", "missing": None}
        if suggests_k2(cards(profile, medications=listed, **had)):
            assert shown, case
    # Alert burden: with every key had, a known age and no K2 about to be suggested or taken, no caution.
    if missing is None and born is not None and not k2 and not suggests_k2(without):
        assert not shown, case
