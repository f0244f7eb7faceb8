"""Age from Patient.birthDate at the request's "today": whole months and the band; "unknown", never
"adult", when the birth date is missing, unreadable, in the future or implausible."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from builders import TODAY, ruleset
from d3k2.core.age import whole_months
from d3k2.core.engine import fact_values
from d3k2.service import facts_for


def patient(birth: Any = None, pid: str = "p1") -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Patient", "id": pid}
    if birth is not None:
        resource["birthDate"] = birth
    return resource


def age_values(*resources: Any, today: date = TODAY) -> tuple[Any, Any]:
    rs = ruleset()
    values = fact_values(rs, facts_for(rs, list(resources), today), rs.default_profile)
    return values["age.band"], values["age.months"]


@pytest.mark.parametrize(
    ("birth", "today", "months"),
    [
        (date(2026, 4, 10), date(2026, 11, 24), 7),
        (date(2026, 4, 24), date(2026, 11, 24), 7),  # the month completes on the same day
        (date(2026, 4, 25), date(2026, 11, 24), 6),
        (date(2026, 1, 31), date(2026, 2, 28), 1),  # February has no 31st: its last day completes it
        (date(2024, 2, 29), date(2025, 2, 28), 12),
        (date(2024, 2, 29), date(2025, 2, 27), 11),
        (date(2026, 11, 24), date(2026, 11, 24), 0),
    ],
)
def test_whole_months(birth: date, today: date, months: int) -> None:
    assert whole_months(birth, today) == months


@pytest.mark.parametrize(
    ("birth", "band", "months"),
    [
        ("2026-11-24", "infant", 0),
        ("2025-11-25", "infant", 11),
        ("2025-11-24", "child", 12),  # first birthday today
        ("2017-11-25", "child", 107),
        ("2017-11-24", "adolescent", 108),  # ninth birthday today
        ("2008-11-25", "adolescent", 215),
        ("2008-11-24", "adult", 216),  # eighteenth birthday today
        ("1970-01-01", "adult", 682),
        ("2008-11-24T10:00:00Z", "unknown", None),  # a birthDate is a date, not a dateTime
    ],
)
def test_age_band_at_each_boundary(birth: str, band: str, months: int | None) -> None:
    assert age_values(patient(birth)) == (band, months)


@pytest.mark.parametrize(
    ("birth", "band", "months"),
    [
        # A partial date gives the youngest age it allows: "2008" may be 31 December 2008.
        ("2008", "adolescent", 214),
        ("2008-11", "adolescent", 215),
        ("2007", "adult", 226),
        # Born this year or this month, possibly later than today: as young as can be.
        ("2026", "infant", 0),
        ("2026-11", "infant", 0),
    ],
)
def test_a_partial_birth_date_gives_the_youngest_possible_age(birth: str, band: str, months: int) -> None:
    assert age_values(patient(birth)) == (band, months)


@pytest.mark.parametrize(
    ("resources", "why"),
    [
        ([], "no birth date on record"),
        ([patient()], "no birth date on record"),
        ([patient(19700101)], "no birth date on record"),
        ([patient("")], "birth date cannot be read"),
        ([patient("1970-13-01")], "birth date cannot be read"),
        ([patient("1970/01")], "birth date cannot be read"),
        ([patient("19700")], "birth date cannot be read"),
        ([patient("2026-11-25")], "birth date is in the future"),
        ([patient("2027")], "birth date is in the future"),
        ([patient("1890-01-01")], "birth date is implausibly long ago"),
        ([patient("1970-01-01"), patient("2020-01-01", "p2")], "birth dates on record disagree"),
    ],
)
def test_unknown_age_is_never_adult(resources: list[Any], why: str) -> None:
    facts = facts_for(ruleset(), resources, TODAY)
    assert facts.age.band == "unknown"
    assert facts.age.months is None
    assert facts.age.why_unknown == why
    assert age_values(*resources) == ("unknown", None)


def test_the_same_birth_date_twice_is_one_age() -> None:
    assert age_values(patient("1970-01-01"), patient("1970-01-01", "p2")) == ("adult", 682)


def test_age_is_read_at_the_requests_today_not_the_clock() -> None:
    assert age_values(patient("2008-11-24"), today=date(2026, 11, 23)) == ("adolescent", 215)
    assert age_values(patient("2008-11-24"), today=date(2026, 11, 24)) == ("adult", 216)
