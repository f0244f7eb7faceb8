"""Facts layer: units, comparators, statuses, newest result, fractions, conditions and medications."""

from __future__ import annotations

import math
from datetime import date
from typing import Any

import pytest

from builders import TODAY, ruleset
from d3k2.core.calcium import calcium_high
from d3k2.core.engine import band_of
from d3k2.core.facts import Facts
from d3k2.core.quantities import Interval
from d3k2.core.readers import parse_date
from d3k2.service import facts_for

LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"


def obs(
    code: str, when: str = "2026-11-01", status: str = "final", oid: str = "o1", **value: Any
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": status,
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "effectiveDateTime": when,
    }
    resource.update(value)
    return resource


def qty(value: Any, unit: str, comparator: str | None = None) -> dict[str, Any]:
    q: dict[str, Any] = {"value": value, "unit": unit, "code": unit, "system": "http://unitsofmeasure.org"}
    if comparator:
        q["comparator"] = comparator
    return {"valueQuantity": q}


def facts(*resources: dict[str, Any], today: date = TODAY) -> Facts:
    return facts_for(ruleset(), list(resources), today)


# ---------------------------------------------------------------- 25(OH)D


def test_ng_per_ml_is_canonical() -> None:
    vitd = facts(obs("62292-8", **qty(18, "ng/mL"))).vitd
    assert vitd is not None and vitd.value == Interval.exact(18) and vitd.unit == "ng/mL"
    assert vitd.shown == "18 ng/mL" and vitd.source == "Observation/o1" and vitd.when == date(2026, 11, 1)


@pytest.mark.parametrize(
    ("value", "expected", "shown"), [(45, 18.028845, "18"), (75, 30.048075, "30"), (375, 150.240375, "150.2")]
)
def test_nmol_per_litre_converts_with_2_496(value: float, expected: float, shown: str) -> None:
    vitd = facts(obs("62292-8", **qty(value, "nmol/L"))).vitd
    assert vitd is not None
    # The rules decide on the value converted, unrounded; the card shows it rounded beside the reported one.
    assert vitd.value.lo == pytest.approx(expected, abs=1e-9)
    assert vitd.shown == f"{value} nmol/L ({shown} ng/mL)"


def test_round_trip_ng_nmol() -> None:
    units = ruleset().facts.labs["vitd"].units
    for ng in (5.0, 18.0, 30.0, 150.0):
        nmol = ng / units["nmol/L"]
        assert nmol * units["nmol/L"] == pytest.approx(ng)
        assert nmol == pytest.approx(ng * 2.496, rel=1e-4)


@pytest.mark.parametrize(
    "value",
    [{"valueString": "<5"}, {"valueString": " < 5 ng/mL"}, qty(5, "ng/mL", "<")],
)
def test_less_than_five_is_below_five_never_exactly_five(value: dict[str, Any]) -> None:
    vitd = facts(obs("62292-8", **value)).vitd
    assert vitd is not None
    assert vitd.value.hi == 5 and vitd.value.hi_open and math.isinf(vitd.value.lo)
    assert vitd.value.lt(5) is True
    for profile in ruleset().profiles.values():
        assert band_of(vitd.value, profile) == "deficient"


@pytest.mark.parametrize(
    ("comparator", "value", "profile", "band"),
    [
        # Certainly above every boundary up to the value: the highest band whose lower bound it reaches.
        (">", 100, "seed", "very-high"),
        (">=", 150, "seed", "very-high"),  # may be exactly 150: not certainly above 150
        (">", 150, "seed", "toxicity"),
        (">", 100, "endocrine-2011", "high"),
        (">", 100, "iom-2011", "very-high"),
        (">", 35, "seed", "insufficient"),
        # Below a value: certainly above no boundary but minus infinity.
        ("<", 40, "seed", "deficient"),
        ("<=", 30, "seed", "deficient"),
        ("<", 35, "iom-2011", "deficient"),
    ],
)
def test_a_straddling_comparator_gets_the_highest_band_it_certainly_reaches(
    comparator: str, value: float, profile: str, band: str
) -> None:
    vitd = facts(obs("62292-8", **qty(value, "ng/mL", comparator))).vitd
    assert vitd is not None
    assert band_of(vitd.value, ruleset().profiles[profile]) == band


@pytest.mark.parametrize(
    ("status", "used"),
    [
        ("final", True),
        ("amended", True),
        ("corrected", True),
        ("entered-in-error", False),
        ("cancelled", False),
        ("registered", False),
        ("unknown", False),
    ],
)
def test_observation_status(status: str, used: bool) -> None:
    assert (facts(obs("62292-8", status=status, **qty(18, "ng/mL"))).vitd is not None) is used


def test_preliminary_only_when_nothing_final_and_labelled() -> None:
    only = facts(obs("62292-8", status="preliminary", **qty(18, "ng/mL"))).vitd
    assert only is not None and "preliminary result" in only.notes
    both = facts(
        obs("62292-8", status="preliminary", when="2026-11-10", oid="p", **qty(50, "ng/mL")),
        obs("62292-8", status="final", when="2026-10-01", oid="f", **qty(18, "ng/mL")),
    ).vitd
    assert both is not None and both.source == "Observation/f"


def test_newest_wins_in_any_entry_order() -> None:
    old = obs("62292-8", when="2026-01-01", oid="old", **qty(18, "ng/mL"))
    new = obs("62292-8", when="2026-11-01T08:30:00Z", oid="new", **qty(50, "ng/mL"))
    for order in ((old, new), (new, old)):
        vitd = facts(*order).vitd
        assert vitd is not None and vitd.source == "Observation/new"


def test_effective_period_end_and_issued_give_the_date() -> None:
    by_period = obs("62292-8", **qty(18, "ng/mL"))
    del by_period["effectiveDateTime"]
    by_period["effectivePeriod"] = {"start": "2026-10-01", "end": "2026-10-03"}
    assert facts(by_period).vitd.when == date(2026, 10, 3)  # type: ignore[union-attr]
    by_issued = obs("62292-8", **qty(18, "ng/mL"))
    del by_issued["effectiveDateTime"]
    by_issued["issued"] = "2026-10-05T10:00:00+02:00"
    assert facts(by_issued).vitd.when == date(2026, 10, 5)  # type: ignore[union-attr]


def test_undated_result_is_skipped_and_reported() -> None:
    undated = obs("62292-8", **qty(18, "ng/mL"))
    del undated["effectiveDateTime"]
    result = facts(undated)
    assert result.vitd is None
    assert result.issues == ("a 25(OH)D result (no date)",)


def test_stale_after_365_days() -> None:
    assert facts(obs("62292-8", when="2025-11-24", **qty(18, "ng/mL"))).vitd.stale is False  # type: ignore[union-attr]
    assert facts(obs("62292-8", when="2025-11-23", **qty(18, "ng/mL"))).vitd.stale is True  # type: ignore[union-attr]


def test_d3_fraction_used_only_without_a_total_that_day_and_summed_with_d2() -> None:
    d3_only = facts(obs("1989-3", **qty(22, "ng/mL"))).vitd
    assert d3_only is not None and "25(OH)D3 only" in d3_only.notes[0]
    with_d2 = facts(
        obs("1989-3", oid="d3", **qty(22, "ng/mL")), obs("49054-0", oid="d2", **qty(6, "ng/mL"))
    ).vitd
    assert with_d2 is not None and with_d2.value == Interval.exact(28)
    total_same_day = facts(
        obs("1989-3", oid="d3", **qty(22, "ng/mL")), obs("62292-8", oid="t", **qty(31, "ng/mL"))
    )
    assert total_same_day.vitd is not None and total_same_day.vitd.source == "Observation/t"


@pytest.mark.parametrize("code", ["1649-3", "62290-2", "1990-1"])
def test_dihydroxy_and_d3_itself_are_never_25ohd(code: str) -> None:
    assert facts(obs(code, **qty(40, "pg/mL"))).vitd is None


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (qty("abc", "ng/mL"), "the value is not a number"),
        (qty(18, "furlongs"), "unit 'furlongs' not understood"),
        ({"valueQuantity": {"value": 18}}, "the value has no unit"),
        ({"valueString": "low"}, "the value is not a number"),
        ({"valueBoolean": True}, "no value"),
    ],
)
def test_unusable_values_are_skipped_with_the_reason(value: dict[str, Any], reason: str) -> None:
    result = facts(obs("62292-8", **value))
    assert result.vitd is None
    assert len(result.issues) == 1 and result.issues[0].endswith(f" ({reason})"), result.issues
    assert "Observation/" not in result.issues[0]


def test_malformed_resources_never_hide_others() -> None:
    junk: list[Any] = [
        {"resourceType": "Observation"},
        {"resourceType": "Observation", "id": "x", "code": "nope"},
        {"resourceType": "Condition", "id": "c", "code": {"coding": "nope"}},
        {
            "resourceType": "MedicationStatement",
            "id": "m",
            "status": "active",
            "medicationCodeableConcept": 5,
        },
        "text",
        None,
    ]
    warfarin = {
        "resourceType": "MedicationStatement",
        "id": "w",
        "status": "active",
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "855332"}]},
    }
    result = facts_for(ruleset(), [*junk, warfarin], TODAY)  # type: ignore[list-item]
    assert [m.category for m in result.medications] == ["vka"]


# ---------------------------------------------------------------- eGFR and calcium


def test_egfr_comparator_greater_than_sixty_is_not_below_thirty() -> None:
    egfr = facts(obs("98979-8", **qty(60, "mL/min/{1.73_m2}", ">"))).egfr
    assert egfr is not None and egfr.value.lt(30) is False and egfr.shown == ">60 mL/min/1.73 m²"


def test_legacy_race_specific_egfr_only_without_race_free_of_its_day_and_never_the_black_value_as_sent() -> (
    None
):
    legacy = obs("88294-4", oid="legacy", when="2026-11-10", **qty(25, "mL/min/1.73m2"))
    black = obs("48643-1", oid="black", when="2026-11-20", **qty(40, "mL/min/1.73m2"))
    race_free = obs("98979-8", oid="free", when="2026-11-10", **qty(40, "mL/min/1.73m2"))
    assert facts(legacy, race_free).egfr.source == "Observation/free"  # type: ignore[union-attr]
    newest = facts(legacy, black).egfr
    assert newest is not None and newest.source == "Observation/black" and newest.value.lo == 40 / 1.212
    assert "legacy sex/race-specific equation" in newest.notes


@pytest.mark.parametrize(
    ("value", "unit", "high"),
    [
        (10.5, "mg/dL", False),
        (10.6, "mg/dL", True),
        (2.62, "mmol/L", False),
        (2.70, "mmol/L", True),
        (5.4, "mEq/L", True),
    ],
)
def test_calcium_default_limit_and_units(value: float, unit: str, high: bool) -> None:
    calcium = facts(obs("17861-6", **qty(value, unit))).calcium
    assert calcium_high(calcium, ruleset().facts.labs["calcium"]) is high


def test_calcium_uses_the_labs_range_when_given() -> None:
    resource = obs("17861-6", **qty(10.3, "mg/dL"))
    resource["referenceRange"] = [{"high": {"value": 10.2, "unit": "mg/dL", "code": "mg/dL"}}]
    assert calcium_high(facts(resource).calcium, ruleset().facts.labs["calcium"]) is True


def test_ionized_calcium_without_a_range_is_judged_against_the_default_adult_range() -> None:
    lab = ruleset().facts.labs["calcium"]
    assert calcium_high(facts(obs("17863-2", **qty(6.0, "mg/dL"))).calcium, lab) is True
    assert calcium_high(facts(obs("1995-0", **qty(1.32, "mmol/L"))).calcium, lab) is False
    assert calcium_high(facts(obs("1995-0", **qty(1.33, "mmol/L"))).calcium, lab) is True
    # Never against the total-calcium limit: 10 mg/dL ionized is far above its range.
    assert calcium_high(facts(obs("17863-2", **qty(10.0, "mg/dL"))).calcium, lab) is True
    ranged = obs("17863-2", **qty(5.6, "mg/dL"))
    ranged["referenceRange"] = [{"high": {"value": 5.3, "unit": "mg/dL"}}]
    assert calcium_high(facts(ranged).calcium, ruleset().facts.labs["calcium"]) is True


# ---------------------------------------------------------------- conditions and medications


def condition(
    code: str, system: str = SNOMED, clinical: str | None = "active", verification: str | None = None
):
    resource: dict[str, Any] = {
        "resourceType": "Condition",
        "id": f"c-{code}",
        "code": {"coding": [{"system": system, "code": code}]},
    }
    if clinical:
        resource["clinicalStatus"] = {"coding": [{"code": clinical}]}
    if verification:
        resource["verificationStatus"] = {"coding": [{"code": verification}]}
    return resource


@pytest.mark.parametrize(
    ("resource", "fact"),
    [
        (condition("31541009"), "sarcoidosis"),
        (condition("D86.0", "http://hl7.org/fhir/sid/icd-10-cm"), "sarcoidosis"),
        (condition("D860", "http://hl7.org/fhir/sid/icd-10-cm"), "sarcoidosis"),
        (condition("A15.0", "http://hl7.org/fhir/sid/icd-10-cm"), "granulomatous"),
        (condition("431857002"), "ckd_advanced"),
        (condition("E83.52", "http://hl7.org/fhir/sid/icd-10-cm"), "hypercalcemia"),
        (condition("31541009", clinical=None), "sarcoidosis"),
        (condition("31541009", clinical="recurrence"), "sarcoidosis"),
    ],
)
def test_conditions_found(resource: dict[str, Any], fact: str) -> None:
    assert facts(resource).conditions[fact]


@pytest.mark.parametrize(
    "resource",
    [
        condition("31541009", clinical="resolved"),
        condition("31541009", clinical="inactive"),
        condition("31541009", verification="refuted"),
        condition("31541009", verification="entered-in-error"),
        condition("433144002"),  # CKD stage 3 is not advanced
        condition("R76.11", "http://hl7.org/fhir/sid/icd-10-cm"),  # latent TB is not granulomatous disease
    ],
)
def test_conditions_ignored(resource: dict[str, Any]) -> None:
    result = facts(resource)
    assert not result.conditions and not result.pregnancy


def test_pregnancy_from_condition_and_status_but_not_postpartum() -> None:
    assert facts(condition("77386006")).pregnancy
    assert facts(condition("O09.512", "http://hl7.org/fhir/sid/icd-10-cm")).pregnancy
    assert not facts(condition("O90.89", "http://hl7.org/fhir/sid/icd-10-cm")).pregnancy
    status = obs("82810-3", valueCodeableConcept={"coding": [{"system": LOINC, "code": "LA15173-0"}]})
    assert facts(status).pregnancy
    not_pregnant = obs("82810-3", valueCodeableConcept={"coding": [{"system": LOINC, "code": "LA26683-5"}]})
    assert not facts(not_pregnant).pregnancy


def med(kind: str, status: str, code: str = "855332", **extra: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": kind, "id": f"{kind}-{status}", "status": status}
    resource["medicationCodeableConcept"] = {"coding": [{"system": RXNORM, "code": code}]}
    resource.update(extra)
    return resource


@pytest.mark.parametrize(
    ("resource", "current"),
    [
        (med("MedicationStatement", "active"), True),
        (med("MedicationStatement", "intended"), True),
        (med("MedicationStatement", "on-hold"), True),
        (med("MedicationStatement", "stopped"), False),
        (med("MedicationStatement", "completed"), False),
        (med("MedicationStatement", "not-taken"), False),
        (med("MedicationStatement", "entered-in-error"), False),
        (med("MedicationRequest", "active"), True),
        (med("MedicationRequest", "draft"), True),
        (med("MedicationRequest", "cancelled"), False),
    ],
)
def test_medication_status(resource: dict[str, Any], current: bool) -> None:
    assert bool(facts(resource).meds("vka")) is current


@pytest.mark.parametrize(
    ("code", "category"),
    [
        ("1364445", "doac"),
        ("1037042", "doac"),
        ("1537458", "vitamin-k2"),
        ("11289", "vka"),
        ("246018", "vka"),
        ("312380", "vka"),
    ],
)
def test_medication_categories(code: str, category: str) -> None:
    assert [m.category for m in facts(med("MedicationStatement", "active", code)).medications] == [category]


def test_unresolved_medication_reference_is_reported() -> None:
    resource = med("MedicationRequest", "active")
    del resource["medicationCodeableConcept"]
    resource["medicationReference"] = {"reference": "Medication/elsewhere"}
    result = facts(resource)
    assert not result.medications and not result.issues
    assert [(m.name, m.reason) for m in result.unknown_medications] == [("", "medication not found")]


def test_dates() -> None:
    assert parse_date("2026") == date(2026, 1, 1)
    assert parse_date("2026-03") == date(2026, 3, 1)
    assert parse_date("Invalid date") is None
    assert parse_date(20261124) is None
