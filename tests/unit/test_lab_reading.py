"""Labs read right: eGFR codes and same-specimen pairs, calcium kinds, exact digits, plausibility."""

from __future__ import annotations

import itertools
from datetime import date
from typing import Any

import pytest

from builders import TODAY, ruleset
from d3k2.core.facts import Facts
from d3k2.core.terminology import LOINC
from d3k2.service import facts_for

EGFR_UNIT = "mL/min/{1.73_m2}"
MDRD_NON_BLACK, MDRD_BLACK, EPI_NON_BLACK, EPI_BLACK = "48642-3", "48643-1", "88294-4", "88293-6"
EPI_2021, MDRD = "98979-8", "33914-3"


def obs(code: str, value: float, unit: str, *, oid: str = "o1", when: str = "2026-11-01", **extra: Any):
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": unit, "code": unit, "system": "http://unitsofmeasure.org"},
    }
    resource.update(extra)
    return resource


def egfr(code: str, value: float, oid: str, when: str = "2026-11-01T09:30:00Z", **extra: Any):
    return obs(code, value, EGFR_UNIT, oid=oid, when=when, **extra)


def facts(*resources: dict[str, Any], today: date = TODAY) -> Facts:
    return facts_for(ruleset(), list(resources), today)


# ---------------------------------------------------------------- eGFR codes


@pytest.mark.parametrize("code", [MDRD_NON_BLACK, EPI_NON_BLACK, "50044-7", "70969-1"])
def test_a_legacy_non_race_specific_or_non_black_egfr_is_used_when_no_race_free_result_exists(code) -> None:
    result = facts(egfr(code, 28, "legacy")).egfr
    assert result is not None and result.code == code and result.value.lo == 28
    assert result.notes == ("legacy sex/race-specific equation",)


@pytest.mark.parametrize("code", [MDRD_BLACK, EPI_BLACK])
def test_an_among_blacks_egfr_is_never_used_by_default(code) -> None:
    assert facts(egfr(code, 25, "black")).egfr is None
    paired = facts(egfr(code, 34, "black"), egfr(MDRD_NON_BLACK, 28, "non-black")).egfr
    assert paired is not None and paired.code == MDRD_NON_BLACK and paired.value.lo == 28


def test_a_race_free_result_beats_a_newer_legacy_one() -> None:
    result = facts(egfr(EPI_2021, 40, "free", when="2026-06-01"), egfr(MDRD_NON_BLACK, 25, "legacy")).egfr
    assert result is not None and result.code == EPI_2021 and result.notes == ()


def test_one_specimen_by_two_legacy_equations_gives_the_lower_value_and_says_so() -> None:
    pair = [egfr(MDRD_NON_BLACK, 33, "a"), egfr(EPI_NON_BLACK, 28, "z")]
    for order in itertools.permutations(pair):
        result = facts(*order).egfr
        assert result is not None and result.source == "Observation/z" and result.value.lo == 28
        assert result.notes == (
            "legacy sex/race-specific equation",
            f"lowest of the specimen's results: 28 mL/min/1.73 m² ({EPI_NON_BLACK}), "
            f"33 mL/min/1.73 m² ({MDRD_NON_BLACK})",
        )


def test_the_choice_is_by_value_never_by_resource_id() -> None:
    for low, high in (("a", "z"), ("z", "a")):
        result = facts(egfr(EPI_2021, 28, low), egfr(MDRD, 32, high)).egfr
        assert result is not None and result.source == f"Observation/{low}"


def test_one_specimen_named_by_its_specimen_reference_even_at_another_time() -> None:
    specimen = {"specimen": {"reference": "Specimen/s1"}}
    result = facts(
        egfr(EPI_2021, 35, "late", when="2026-11-01T11:00:00Z", **specimen),
        egfr(MDRD, 29, "early", when="2026-11-01T09:00:00Z", **specimen),
        egfr(MDRD, 20, "other", when="2026-10-01T09:00:00Z", specimen={"reference": "Specimen/s0"}),
    ).egfr
    assert result is not None and result.source == "Observation/early" and result.value.lo == 29


def test_equal_values_of_one_specimen_need_no_note() -> None:
    result = facts(egfr(EPI_2021, 50, "a"), egfr(MDRD, 50, "b")).egfr
    assert result is not None and result.notes == ()
    assert result.source == "Observation/b"  # equal values: the code decides, never the id


def test_a_result_of_another_moment_is_not_the_same_specimen() -> None:
    result = facts(egfr(EPI_2021, 50, "new"), egfr(EPI_2021, 20, "old", when="2026-10-01")).egfr
    assert result is not None and result.source == "Observation/new" and result.notes == ()
