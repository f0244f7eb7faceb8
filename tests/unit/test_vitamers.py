"""Current vitamin D2 products → the facts and fields of the D2 → D3 rules: one intake per product and
dose, amounts summed, and no amount (so no suggestion) when any dose cannot be read."""

from __future__ import annotations

from builders import TODAY
from d3k2.core.facts import Facts
from d3k2.core.quantities import Interval
from d3k2.core.record import MedicationFact
from d3k2.core.vitamers import d2_fields, d2_values


def d2(product: str, daily: float | None, dose: str, source: str = "MedicationStatement/a") -> MedicationFact:
    return MedicationFact("vitamin-d", "ergocalciferol", "active", source, "code", product, daily, dose)


D3 = MedicationFact(
    "vitamin-d",
    "cholecalciferol",
    "active",
    "MedicationStatement/c",
    "code",
    "D3 1000",
    1000.0,
    "1,000 IU/day: x",
)
WEEKLY = d2("Ergocalciferol 50000 UNT Oral Capsule", 50000 / 7, "50,000 IU/week: 1 capsule once weekly")
DAILY = d2(
    "Ergocalciferol 400 UNT Oral Tablet", 400.0, "400 IU/day: 1 tablet once daily", "MedicationRequest/b"
)
UNREAD = d2("Ergocalciferol drops", None, "dose unknown: not read", "MedicationStatement/u")


def facts(*medications: MedicationFact) -> Facts:
    return Facts(today=TODAY, medications=medications)


def test_no_d2_gives_no_amount_and_none_for_the_card() -> None:
    assert d2_values(facts(D3)) == {"vitamin_d2.daily": None, "vitamin_d2.weekly": None}
    shown = d2_fields(facts(D3))
    assert (shown.names, shown.daily) == ("none", "none")


def test_weekly_d2_is_50000_a_week_to_the_hundredth() -> None:
    values = d2_values(facts(WEEKLY, D3))
    assert values == {
        "vitamin_d2.daily": Interval.exact(7142.86),
        "vitamin_d2.weekly": Interval.exact(50000.0),
    }
    assert d2_fields(facts(WEEKLY)).daily == "50,000 IU/week"


def test_one_product_on_two_records_is_one_intake() -> None:
    twice = (WEEKLY, d2(WEEKLY.product, WEEKLY.daily, WEEKLY.dose, "MedicationRequest/w"))
    assert d2_values(facts(*twice))["vitamin_d2.weekly"] == Interval.exact(50000.0)


def test_two_products_are_summed_and_both_named() -> None:
    values = d2_values(facts(WEEKLY, DAILY))
    assert values["vitamin_d2.daily"] == Interval.exact(7542.86)
    shown = d2_fields(facts(WEEKLY, DAILY))
    assert shown.names == "Ergocalciferol 400 UNT Oral Tablet, Ergocalciferol 50000 UNT Oral Capsule"
    assert shown.daily == "7,542.9 IU/day in all (400 IU/day + 50,000 IU/week)"


def test_an_unreadable_dose_gives_no_amount_and_says_why() -> None:
    assert d2_values(facts(DAILY, UNREAD)) == {"vitamin_d2.daily": None, "vitamin_d2.weekly": None}
    assert d2_fields(facts(DAILY, UNREAD)).daily == "unknown (400 IU/day; dose unknown: not read)"
