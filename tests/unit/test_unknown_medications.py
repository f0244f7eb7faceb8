"""A medication of unknown kind (a reference that cannot be resolved, a MedicationStatement with status
`unknown`) could be a vitamin K antagonist: K2 is not suggested while one is on record, no card says that no
vitamin K antagonist is on record, and the data card names it (CLINICAL.md 5)."""

from __future__ import annotations

from typing import Any

import pytest

from builders import TODAY, ruleset
from d3k2.core.cards import OFFLINE_CARD_KEY, build_cards
from d3k2.core.engine import evaluate, fact_values
from d3k2.core.facts import Facts
from d3k2.core.record import UnknownMedication
from d3k2.core.terminology import LOINC
from d3k2.service import facts_for

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
DEFICIENT = {
    "resourceType": "Observation",
    "id": "v",
    "status": "final",
    "code": {"coding": [{"system": LOINC, "code": "62292-8"}]},
    "effectiveDateTime": "2026-11-01",
    "valueQuantity": {"value": 12, "unit": "ng/mL"},
}


# An adult: the D3 and K2 cards these tests look at are adult regimens (CLINICAL.md 3a).
ADULT = {"resourceType": "Patient", "id": "p1", "birthDate": "1970-05-01"}


def statement(status: str = "active", **medication: Any) -> dict[str, Any]:
    return {"resourceType": "MedicationStatement", "id": "s", "status": status, **medication}


def facts(*resources: Any) -> Facts:
    return facts_for(ruleset(), [ADULT, DEFICIENT, *resources], TODAY)


def cards(found: Facts) -> list[dict[str, Any]]:
    rs = ruleset()
    evaluation = evaluate(rs, found, hook="patient-view", profile=rs.default_profile)
    return build_cards(rs, evaluation, hook="patient-view", card_key=OFFLINE_CARD_KEY, patient_id="p1")


WARFARIN = {"coding": [{"system": RXNORM, "code": "855332", "display": "warfarin 5 MG"}]}


@pytest.mark.parametrize(
    ("resource", "unknown"),
    [
        (
            statement(medicationReference={"reference": "Medication/not-sent"}),
            UnknownMedication("", "medication not found", "MedicationStatement/s"),
        ),
        (
            statement(
                medicationReference={"reference": "Medication/not-sent", "display": "Metformin 500 mg"}
            ),
            UnknownMedication("Metformin 500 mg", "medication not found", "MedicationStatement/s"),
        ),
        (
            statement(medicationReference={"reference": "#gone"}, contained=[{"resourceType": "Medication"}]),
            UnknownMedication("", "medication not found", "MedicationStatement/s"),
        ),
        (
            {**statement(), "resourceType": "MedicationRequest", "medicationReference": {"reference": "x"}},
            UnknownMedication("", "medication not found", "MedicationRequest/s"),
        ),
        (statement(), UnknownMedication("", "medication not found", "MedicationStatement/s")),
        (
            statement("unknown", medicationCodeableConcept=WARFARIN),
            UnknownMedication("warfarin", "status unknown", "MedicationStatement/s"),
        ),
        (
            statement(
                "unknown", medicationCodeableConcept={"coding": [{"code": "x", "display": "Vitamin B12"}]}
            ),
            UnknownMedication("Vitamin B12", "status unknown", "MedicationStatement/s"),
        ),
        (
            statement("unknown", medicationCodeableConcept={"text": "", "coding": ["odd", {"display": ""}]}),
            UnknownMedication("", "status unknown", "MedicationStatement/s"),
        ),
        (
            statement("unknown", medicationCodeableConcept=5),
            UnknownMedication("", "status unknown", "MedicationStatement/s"),
        ),
        (
            statement("unknown", medicationReference={"reference": "Medication/gone", "display": "Coumadin"}),
            UnknownMedication("Coumadin", "medication not found", "MedicationStatement/s"),
        ),
        (
            {**statement("unknown", medicationCodeableConcept=WARFARIN), "resourceType": "MedicationRequest"},
            UnknownMedication("warfarin", "status unknown", "MedicationRequest/s"),
        ),
        (
            {k: v for k, v in statement(medicationCodeableConcept=WARFARIN).items() if k != "status"},
            UnknownMedication("warfarin", "status unknown", "MedicationStatement/s"),
        ),
        (
            statement(medicationCodeableConcept={}),
            UnknownMedication("", "medication has no code or name", "MedicationStatement/s"),
        ),
        (
            statement(medicationCodeableConcept={"coding": [{"system": RXNORM, "code": ""}], "text": ""}),
            UnknownMedication("", "medication has no code or name", "MedicationStatement/s"),
        ),
        (
            statement(
                medicationReference={"reference": "#m"}, contained=[{"resourceType": "Medication", "id": "m"}]
            ),
            UnknownMedication("", "medication has no code or name", "MedicationStatement/s"),
        ),
    ],
)
def test_a_medication_of_unknown_kind_blocks_k2_and_is_named(resource: dict[str, Any], unknown: Any) -> None:
    found = facts(resource)
    assert unknown in found.unknown_medications
    assert fact_values(ruleset(), found, "seed")["meds.unknown"] is True
    answer = cards(found)
    shown = {c["source"]["topic"]["code"] for c in answer}
    assert "vitd-deficient" in shown, "D3 dosing is not what an unknown medication blocks"
    assert "k2-with-d3" not in shown
    assert not any("no vitamin k antagonist" in (c["summary"] + c["detail"]).lower() for c in answer)
    data = next(c for c in answer if c["source"]["topic"]["code"] == "data-incomplete")
    # Named by the kind of record, not its id (CLINICAL.md 6a).
    kinds = {"MedicationStatement": "medication list", "MedicationRequest": "prescription"}
    kind = kinds[unknown.source.split("/")[0]]
    assert f"{unknown.name or 'a medication without a name'} ({kind}: {unknown.reason})" in data["detail"]


def test_a_statement_of_unknown_status_is_not_a_current_medication() -> None:
    found = facts(statement("unknown", medicationCodeableConcept=WARFARIN))
    assert found.medications == ()
    assert "vka-k2" not in {c["source"]["topic"]["code"] for c in cards(found)}


def test_a_display_that_names_warfarin_is_still_warfarin() -> None:
    found = facts(statement(medicationReference={"reference": "Medication/gone", "display": "warfarin"}))
    assert [m.category for m in found.medications] == ["vka"]
    assert "vka-k2" in {c["source"]["topic"]["code"] for c in cards(found)}


def test_without_one_k2_is_suggested() -> None:
    found = facts(statement(medicationCodeableConcept={"coding": [{"system": RXNORM, "code": "6809"}]}))
    assert found.unknown_medications == ()
    assert fact_values(ruleset(), found, "seed")["meds.unknown"] is False
    assert "k2-with-d3" in {c["source"]["topic"]["code"] for c in cards(found)}


def test_marevan_is_warfarin_by_name() -> None:
    found = facts(statement(medicationCodeableConcept={"text": "Marevan 3 mg"}))
    assert [(m.category, m.name, m.matched_by) for m in found.medications] == [("vka", "warfarin", "name")]
    assert "vka-k2" in {c["source"]["topic"]["code"] for c in cards(found)}
