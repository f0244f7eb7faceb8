"""Current vitamin D products (active statements and requests of the vitamin-d category) are a fact with
their name and daily dose, read by the dose arithmetic of draft orders (CLINICAL.md 5)."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from builders import TODAY, ruleset
from d3k2.core.engine import fact_values
from d3k2.core.facts import Facts, extract_facts
from d3k2.core.fields import template_fields
from d3k2.core.quantities import Interval
from d3k2.service import facts_for

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
D3_5000 = {
    "coding": [{"system": RXNORM, "code": "857466", "display": "Cholecalciferol 5000 UNT Oral Tablet"}]
}
D3_50000 = {"coding": [{"system": RXNORM, "code": "1291276"}], "text": "Vitamin D3 50,000 IU tablet"}
D3K2 = {"text": "Vitamin D3 1000 IU + Vitamin K2 100 mcg capsule"}
DAILY = [
    {
        "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
        "doseAndRate": [{"doseQuantity": {"value": 1, "unit": "tablet"}}],
    }
]
WEEKLY = [{"text": "1 tablet once weekly"}]


def record(
    kind: str, rid: str, medication: Any, dosage: Any = None, status: str = "active"
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": kind,
        "id": rid,
        "status": status,
        "medicationCodeableConcept": medication,
    }
    if dosage is not None:
        resource["dosage" if kind == "MedicationStatement" else "dosageInstruction"] = dosage
    return resource


def current(*resources: Any) -> tuple[Facts, Any, Any]:
    found = facts_for(ruleset(), list(resources), TODAY)
    values = fact_values(ruleset(), found, "seed")
    fields = template_fields(ruleset(), found, "seed", values)["current_d"]
    return found, values["vitamin_d.current_daily"], fields


def test_an_active_statement_gives_name_and_daily_dose() -> None:
    found, daily, fields = current(record("MedicationStatement", "s", D3_5000, DAILY))
    (fact,) = found.meds("vitamin-d")
    assert (fact.product, fact.daily) == ("Cholecalciferol 5000 UNT Oral Tablet", 5000.0)
    assert daily == Interval.exact(5000)
    assert (fields.names, fields.daily) == ("Cholecalciferol 5000 UNT Oral Tablet", "5,000 IU/day")


def test_an_active_request_counts_and_a_weekly_dose_is_shown_weekly() -> None:
    _found, daily, fields = current(record("MedicationRequest", "r", D3_50000, WEEKLY))
    assert daily is not None and daily.lo == pytest.approx(50000 / 7)
    assert (fields.names, fields.daily) == ("Vitamin D3 50,000 IU tablet", "50,000 IU/week")


def test_products_add_up_and_one_intake_on_two_records_counts_once() -> None:
    statement = record("MedicationStatement", "s", D3_5000, DAILY)
    request = record(
        "MedicationRequest", "r", D3_5000, DAILY
    )  # the prescription of what the statement records
    combination = record("MedicationStatement", "c", D3K2, [{"text": "1 capsule daily"}])
    _found, daily, fields = current(statement, request, combination)
    assert daily == Interval.exact(6000)
    assert (
        fields.names
        == "Cholecalciferol 5000 UNT Oral Tablet, Vitamin D3 1000 IU + Vitamin K2 100 mcg capsule"
    )
    assert fields.daily == "6,000 IU/day in all (1,000 IU/day + 5,000 IU/day)"


def test_a_dose_that_cannot_be_read_makes_the_daily_intake_unknown() -> None:
    _found, daily, fields = current(record("MedicationStatement", "s", D3_5000))
    assert daily is None
    assert fields.daily == "dose unknown: no dosage instruction"
    _found, daily, fields = current(
        record("MedicationStatement", "s", D3_5000), record("MedicationRequest", "r", D3_50000, WEEKLY)
    )
    assert daily is None
    assert fields.daily == "unknown (50,000 IU/week; dose unknown: no dosage instruction)"


@pytest.mark.parametrize("status", ["stopped", "completed", "entered-in-error", "unknown"])
def test_a_product_not_current_is_not_taken(status: str) -> None:
    _found, daily, fields = current(record("MedicationStatement", "s", D3_5000, DAILY, status))
    assert daily == Interval.exact(0)
    assert (fields.names, fields.daily) == ("none", "none")


def test_without_a_dose_reader_the_dose_is_named_unknown() -> None:
    rs = ruleset()
    found = extract_facts(
        [record("MedicationStatement", "s", D3_5000, DAILY)],
        today=TODAY,
        config=rs.facts,
        terminology=rs.terminology,
        classify=rs.medications.concepts,
    )
    (fact,) = found.meds("vitamin-d")
    assert (fact.daily, fact.dose) == (None, "dose unknown: not read")


def test_other_medications_carry_no_dose() -> None:
    warfarin = record("MedicationStatement", "w", {"coding": [{"system": RXNORM, "code": "855332"}]}, DAILY)
    found, _daily, _fields = current(warfarin)
    assert [(m.category, m.product, m.daily, m.dose) for m in found.medications] == [("vka", "", None, "")]


@pytest.mark.parametrize(
    "name",
    [
        "Calcium 600 mg + Vitamin D3 400 IU tablet",
        "Calcium carbonate 600 mg, vitamin D3 400 IU tablet",
        "Calcium 600 mg with Vitamin D3 400 IU tablet",
    ],
)
def test_an_uncoded_combination_names_its_vitamin_d_and_strength(name: str) -> None:
    """The calcium's strength comes first in the name: each ingredient is read from its own part."""
    found, daily, _fields = current(
        record("MedicationStatement", "s", {"text": name}, [{"text": "1 tab BID"}])
    )
    (fact,) = found.meds("vitamin-d")
    assert (fact.name, fact.matched_by, fact.daily) == ("cholecalciferol", "name", 800.0)
    assert daily == Interval.exact(800)


def test_dosage_text_and_timing_that_disagree_make_the_dose_unknown_and_say_why() -> None:
    """'1 tablet daily' with a weekly Timing: 5,000 or 714 IU/day; neither is chosen silently."""
    weekly_timing = {"repeat": {"frequency": 1, "period": 1, "periodUnit": "wk"}}
    found, daily, _fields = current(
        record("MedicationStatement", "s", D3_5000, [{"text": "1 tablet daily", "timing": weekly_timing}])
    )
    (fact,) = found.meds("vitamin-d")
    assert (fact.daily, fact.dose) == (
        None,
        "dose unknown: dosage text says once daily but its timing says once weekly",
    )
    assert daily is None
    agreeing = [{**DAILY[0], "text": "1 tablet once daily"}]
    found, daily, _fields = current(record("MedicationStatement", "s", D3_5000, agreeing))
    assert daily == Interval.exact(5000)


@pytest.mark.parametrize(("text", "daily"), [("1 daily", 5000.0), ("2 weekly", 10000 / 7)])
def test_a_bare_count_before_the_schedule_is_one_of_the_products_units(text: str, daily: float) -> None:
    found, _daily, _fields = current(
        record("MedicationStatement", "s", {"text": "Vitamin D3 5000 IU"}, [{"text": text}])
    )
    (fact,) = found.meds("vitamin-d")
    assert fact.daily == pytest.approx(daily)


def test_a_weekly_and_a_daily_product_add_up_to_whole_units_and_only_all_weekly_is_a_weekly_intake() -> None:
    weekly = record("MedicationStatement", "w", D3_50000, WEEKLY)
    daily_one = record("MedicationStatement", "d", D3K2, [{"text": "1 capsule daily"}])
    found, daily, fields = current(weekly, daily_one)
    assert daily is not None and daily.lo == pytest.approx(1000 + 50000 / 7)
    # 8,142.857… IU/day is no dose a clinician orders: shown rounded up, never as "8,142.9".
    assert fields.daily == "about 8,143 IU/day in all (1,000 IU/day + 50,000 IU/week)"
    assert fact_values(ruleset(), found, "seed")["vitamin_d.current_weekly"] is None
    found, _daily, _fields = current(weekly)
    assert fact_values(ruleset(), found, "seed")["vitamin_d.current_weekly"] == Interval.exact(50000)


def test_a_weekly_course_is_counted_from_its_start_as_the_record_gives_it() -> None:
    def days(*resources: Any) -> Any:
        found, _daily, _fields = current(*resources)
        return fact_values(ruleset(), found, "seed")["vitamin_d.current_weekly_days"]

    def since(kind: str, **dates: Any) -> dict[str, Any]:
        return {**record(kind, kind[:1], D3_50000, WEEKLY), **dates}

    started = TODAY.toordinal()
    statement = since("MedicationStatement", effectivePeriod={"start": "2026-10-20"})
    assert days(statement) == Interval.exact(float(started - date(2026, 10, 20).toordinal()))
    moment = since("MedicationStatement", effectiveDateTime="2026-11-10T08:00:00Z")
    assert days(moment) == Interval.exact(float(started - date(2026, 11, 10).toordinal()))
    authored = since("MedicationRequest", authoredOn="2026-09-01")
    assert days(authored) == Interval.exact(float(started - date(2026, 9, 1).toordinal()))
    valid = since(
        "MedicationRequest",
        authoredOn="2026-09-01",
        dispenseRequest={"validityPeriod": {"start": "2026-11-01"}},
    )
    assert days(valid) == Interval.exact(float(started - date(2026, 11, 1).toordinal()))
    # One intake on two records (a statement and its prescription): the earlier start; none when a record of
    # it does not say when it started.
    assert days(statement, authored) == days(authored)
    assert days(statement, record("MedicationRequest", "r2", D3_50000, WEEKLY)) is None
    assert days(record("MedicationStatement", "n", D3_50000, WEEKLY)) is None
