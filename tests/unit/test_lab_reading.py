"""Labs read right: eGFR codes and same-specimen pairs, calcium kinds, exact digits, plausibility."""

from __future__ import annotations

import itertools
import math
import re
from datetime import date
from typing import Any

import pytest

from builders import TODAY, lab_observation, ruleset
from d3k2.core.engine import fact_values
from d3k2.core.facts import Facts
from d3k2.core.fields import template_fields
from d3k2.core.terminology import LOINC
from d3k2.service import facts_for

EGFR_UNIT = "mL/min/{1.73_m2}"
MDRD_NON_BLACK, MDRD_BLACK, EPI_NON_BLACK, EPI_BLACK = "48642-3", "48643-1", "88294-4", "88293-6"
EPI_2021, MDRD = "98979-8", "33914-3"


obs = lab_observation


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


@pytest.mark.parametrize(("code", "coefficient"), [(MDRD_BLACK, 1.212), (EPI_BLACK, 1.159)])
def test_an_among_blacks_egfr_is_its_value_without_the_race_coefficient_as_a_legacy_one(
    code, coefficient
) -> None:
    alone = facts(egfr(code, 40, "black"))
    assert alone.egfr is not None and alone.issues == () and alone.egfr.value.lo == 40 / coefficient
    assert alone.egfr.code == code and alone.egfr.converted
    # A race-free result of the same day is the same specimen by the current equation: it is used.
    same_day = facts(egfr(code, 34, "black"), egfr(EPI_2021, 45, "free", when="2026-11-01T08:00:00Z")).egfr
    assert same_day is not None and same_day.code == EPI_2021 and same_day.notes == ()
    # An older race-free result does not hide a newer legacy one.
    newer = facts(egfr(code, 34, "black"), egfr(EPI_2021, 45, "free", when="2026-06-01")).egfr
    assert newer is not None and newer.code == code and newer.value.lt(30) is True
    # One specimen by both legacy equations: the lowest value, the "among blacks" one without its coefficient.
    paired = facts(egfr(code, 34, "black"), egfr(MDRD_NON_BLACK, 28, "non-black")).egfr
    assert paired is not None and paired.code == MDRD_NON_BLACK and paired.value.lo == 28
    lower = facts(egfr(code, 33, "black"), egfr(EPI_NON_BLACK, 29, "non-black")).egfr
    assert lower is not None and lower.code == code and lower.value.lo == 33 / coefficient
    without = f"{round(33 / coefficient)} mL/min/1.73 m²"  # 27 (÷ 1.212) or 28 (÷ 1.159): no threshold near
    assert lower.shown == f"33 mL/min/1.73 m² ({without})"
    # The specimen's results as compared: the raised value with the value it stands for.
    assert lower.notes[1] == (
        f"lowest of the specimen's results: 33 mL/min/1.73 m², {without} without its race coefficient "
        f"({code}), 29 mL/min/1.73 m² ({EPI_NON_BLACK})"
    )


def test_every_race_coefficient_names_a_known_source() -> None:
    lab = ruleset().facts.labs["egfr"]
    assert set(lab.race_coefficients) == {MDRD_BLACK, EPI_BLACK}
    assert lab.race_coefficients_source in ruleset().sources


def test_a_race_free_result_beats_a_legacy_one_of_the_same_day_but_not_a_newer_one() -> None:
    same_day = facts(egfr(EPI_2021, 40, "free", when="2026-11-01"), egfr(MDRD_NON_BLACK, 25, "legacy")).egfr
    assert same_day is not None and same_day.code == EPI_2021 and same_day.notes == ()
    result = facts(egfr(EPI_2021, 40, "free", when="2026-06-01"), egfr(MDRD_NON_BLACK, 25, "legacy")).egfr
    assert result is not None and result.code == MDRD_NON_BLACK
    assert result.notes == ("legacy sex/race-specific equation",)


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


# ---------------------------------------------------------------- calcium


TOTAL, CORRECTED, IONIZED, IONIZED_MMOL, ALBUMIN = "17861-6", "29265-6", "17863-2", "1995-0", "1751-7"


def calcium_values(*resources: dict[str, Any]) -> dict[str, Any]:
    rs = ruleset()
    values = fact_values(rs, facts(*resources), rs.default_profile)
    return {k: values[k] for k in ("calcium.kind", "calcium.high", "calcium.grade")}


@pytest.mark.parametrize(
    ("code", "kind"), [(TOTAL, "total"), (CORRECTED, "albumin-corrected"), (IONIZED, "ionized")]
)
def test_each_kind_of_calcium_is_named(code: str, kind: str) -> None:
    unit = "mmol/L" if code == CORRECTED else "mg/dL"
    result = facts(obs(code, 2.4 if code == CORRECTED else 4.9, unit)).calcium
    assert result is not None and result.kind == kind


def test_the_newest_calcium_of_any_kind_wins() -> None:
    total = obs(TOTAL, 11.0, "mg/dL", oid="total", when="2026-11-01")
    ionized = obs(IONIZED_MMOL, 1.25, "mmol/L", oid="ionized", when="2026-11-02")
    assert facts(total, ionized).calcium.source == "Observation/ionized"  # type: ignore[union-attr]
    newer_total = obs(TOTAL, 11.0, "mg/dL", oid="total", when="2026-11-03")
    assert facts(newer_total, ionized).calcium.source == "Observation/total"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "albumin", [obs(ALBUMIN, 2.6, "g/dL", oid="alb"), obs(ALBUMIN, 26, "g/L", oid="alb")]
)
def test_a_same_day_albumin_corrects_a_total_calcium(albumin: dict[str, Any]) -> None:
    total = obs(TOTAL, 9.8, "mg/dL", oid="ca", when="2026-11-01T08:00:00Z")
    result = facts(total, albumin | {"effectiveDateTime": "2026-11-01T10:00:00Z"}).calcium
    assert result is not None and result.kind == "albumin-corrected" and result.source == "Observation/ca"
    assert result.value.lo == pytest.approx(10.92)  # 9.8 + 0.8 × (4.0 − 2.6)
    assert result.notes[-1].startswith("corrected by d3k2 for albumin (Payne): measured total 9.8 mg/dL")
    assert calcium_values(total, albumin)["calcium.high"] is True


@pytest.mark.parametrize(
    "resources",
    [
        # another day, a comparator on either side, an ionized or a lab-corrected calcium
        [obs(TOTAL, 9.8, "mg/dL"), obs(ALBUMIN, 2.6, "g/dL", oid="alb", when="2026-10-31")],
        [obs(TOTAL, 9.8, "mg/dL"), obs(ALBUMIN, 2.6, "g/dL", oid="alb") | {"valueString": "<2.6 g/dL"}],
        [
            obs(TOTAL, 9.8, "mg/dL")
            | {"valueQuantity": {"value": 9.8, "comparator": ">", "unit": "mg/dL", "code": "mg/dL"}},
            obs(ALBUMIN, 2.6, "g/dL", oid="alb"),
        ],
        [obs(IONIZED, 4.9, "mg/dL"), obs(ALBUMIN, 2.6, "g/dL", oid="alb")],
        [obs(CORRECTED, 2.45, "mmol/L"), obs(ALBUMIN, 2.6, "g/dL", oid="alb")],
    ],
)
def test_only_an_exact_total_calcium_and_an_exact_albumin_of_one_day_are_corrected(resources) -> None:
    if "valueString" in resources[1]:
        del resources[1]["valueQuantity"]
    result = facts(*resources).calcium
    assert result is not None and result.source == "Observation/o1"
    assert not any("Payne" in note for note in result.notes)
    assert result.kind != "albumin-corrected" or result.code == CORRECTED


@pytest.mark.parametrize(
    ("value", "comparator", "grade"),
    [
        (10.4, None, "none"),
        (10.6, None, "mild"),
        (11.99, None, "mild"),
        (12, None, "moderate"),
        (13.99, None, "moderate"),
        (14, None, "severe"),
        (13, ">", "moderate"),  # certainly above 13: at least moderate
        (11, ">", "mild"),
        (11, "<", "none"),  # may be below the limit: not high
    ],
)
def test_hypercalcemia_grade(value: float, comparator: str | None, grade: str) -> None:
    quantity: dict[str, Any] = {"value": value, "unit": "mg/dL", "code": "mg/dL"}
    if comparator:
        quantity["comparator"] = comparator
    assert calcium_values(obs(TOTAL, value, "mg/dL", valueQuantity=quantity))["calcium.grade"] == grade


def test_ionized_calcium_is_not_graded_and_no_calcium_has_no_grade() -> None:
    assert calcium_values(obs(IONIZED_MMOL, 1.6, "mmol/L")) == {
        "calcium.kind": "ionized",
        "calcium.high": True,
        "calcium.grade": "ungraded",
    }
    assert calcium_values() == {"calcium.kind": None, "calcium.high": False, "calcium.grade": None}


# ---------------------------------------------------------------- values as reported


def _thresholds() -> list[tuple[str, str, float]]:
    """(lab, LOINC code, threshold) for every lab threshold a rule uses, in the lab's canonical unit."""
    rs = ruleset()
    labs = rs.facts.labs
    found = {("vitd", "62292-8", b.lower) for p in rs.profiles.values() for b in p.bands}
    found |= {("egfr", EPI_2021, b.lower) for b in labs["egfr"].bands}
    found |= {("calcium", TOTAL, labs["calcium"].kind_limits["total"])}
    found |= {("calcium", IONIZED, labs["calcium"].kind_limits["ionized"])}
    found |= {("calcium", TOTAL, g.lower) for g in labs["calcium"].grades}
    return sorted(t for t in found if math.isfinite(t[2]))


NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


def _shown_numbers(lab: str, resource: dict[str, Any]) -> tuple[list[float], Any]:
    rs = ruleset()
    read = facts(resource)
    values = fact_values(rs, read, rs.default_profile)
    shown = template_fields(rs, read, rs.default_profile, values)[lab].shown
    return [float(n.replace(",", "")) for n in NUMBER.findall(shown)], getattr(read, lab)


@pytest.mark.parametrize(("lab", "code", "threshold"), _thresholds())
def test_no_threshold_adjacent_value_is_shown_on_the_other_side(
    lab: str, code: str, threshold: float
) -> None:
    unit = ruleset().facts.labs[lab].canonical_unit
    for delta in (-0.01, -0.005, 0.005, 0.01):
        value = round(threshold + delta, 3)
        numbers, _ = _shown_numbers(lab, obs(code, value, EGFR_UNIT if lab == "egfr" else unit))
        # The lab's digits, nothing rounded (eGFR's unit "mL/min/1.73 m²" holds a number of its own).
        assert numbers[0] == value and len(numbers) == (2 if lab == "egfr" else 1), (lab, value, numbers)


@pytest.mark.parametrize(
    ("lab", "code", "unit", "threshold"),
    [("vitd", "62292-8", "nmol/L", t) for t in (12, 20, 30, 40, 50, 60, 80, 100, 150)]
    + [("calcium", "2000-8", "mmol/L", t) for t in (2.62 * 4.008, 12, 14)]
    + [("calcium", IONIZED_MMOL, "mmol/L", 1.32 * 4.008)],
)
def test_a_converted_value_is_shown_as_reported_and_on_the_side_the_rules_judged(lab, code, unit, threshold):
    config = ruleset().facts.labs[lab]
    factor = config.units[unit]
    # A value exactly on the threshold is in the band above it (a closed lower bound: 25(OH)D ≥ 30) or not
    # (a limit: calcium above 10.5 is high).
    on_is_above = dict(config.marks[unit])[threshold]

    def above(x: float) -> bool:
        return x > threshold or (x == threshold and on_is_above)

    for delta in (-0.01, -0.005, -0.0001, 0, 0.0001, 0.005, 0.01):
        reported = round((threshold + delta) / factor, 4)
        numbers, measured = _shown_numbers(lab, obs(code, reported, unit))
        assert numbers[0] == reported, (lab, reported, numbers)
        converted = numbers[1] if len(numbers) > 1 else numbers[0]
        # The value the rules compared is the reported one converted, unrounded; the one shown beside it is
        # rounded (to the lab's digits, or more) but on the side of the threshold the rules judged.
        assert measured.value.lo == reported * factor
        assert abs(converted - measured.value.lo) <= 0.5 * 10**-config.decimals
        assert above(converted) == above(measured.value.lo), (reported, converted)


def test_two_point_six_five_is_never_two_point_six() -> None:
    numbers, measured = _shown_numbers("calcium", obs("2000-8", 2.65, "mmol/L"))
    assert numbers == [2.65, 10.62] and measured.shown == "2.65 mmol/L (10.62 mg/dL)"


# ---------------------------------------------------------------- plausibility and dates


VITD = "62292-8"


@pytest.mark.parametrize(
    ("resource", "issue"),
    [
        (
            obs(VITD, 0, "ng/mL", oid="new", when="2026-11-20"),
            "25(OH)D of 2026-11-20 is 0 ng/mL: outside what a body can have",
        ),
        (obs(VITD, -3, "ng/mL", oid="new", when="2026-11-20"), "25(OH)D of 2026-11-20 is -3 ng/mL: outside"),
        (
            obs(VITD, 1200, "ng/mL", oid="new", when="2026-11-20"),
            "25(OH)D of 2026-11-20 is 1,200 ng/mL: outside",
        ),
        (
            obs(VITD, 3000, "nmol/L", oid="new", when="2026-11-20"),
            "25(OH)D of 2026-11-20 is 3,000 nmol/L: outside",
        ),
        (
            obs(
                VITD,
                0,
                "ng/mL",
                oid="new",
                when="2026-11-20",
                valueQuantity={"value": 1000, "comparator": ">", "unit": "ng/mL"},
            ),
            "25(OH)D of 2026-11-20 is >1,000 ng/mL: outside",
        ),
        (
            obs(VITD, 45, "ng/mL", oid="new", when="2026-11-26"),
            "25(OH)D of 2026-11-26 is dated in the future",
        ),
    ],
)
def test_an_implausible_or_future_result_is_named_and_never_hides_an_older_usable_one(
    resource, issue
) -> None:
    older = obs(VITD, 18, "ng/mL", oid="old", when="2026-10-01")
    result = facts(resource, older)
    assert result.vitd is not None and result.vitd.source == "Observation/old"
    assert len(result.issues) == 1 and result.issues[0].startswith(issue)
    alone = facts(resource)
    assert alone.vitd is None and alone.issues == result.issues


@pytest.mark.parametrize(
    "resource",
    [
        obs(VITD, 1.5, "ng/mL"),
        obs(VITD, 1000, "ng/mL"),
        obs(VITD, 0, "ng/mL", valueQuantity={"value": 5, "comparator": "<", "unit": "ng/mL"}),
        obs(VITD, 45, "ng/mL", when="2026-11-25"),  # one day of clock skew
        obs(VITD, 45, "ng/mL", when="2026-11-25T23:00:00+10:00"),
        egfr(EPI_2021, 250, "e"),
        egfr(EPI_2021, 0, "e", valueQuantity={"value": 200, "comparator": ">", "unit": EGFR_UNIT}),
        obs(TOTAL, 3.1, "mg/dL"),
        obs(TOTAL, 25, "mg/dL"),
        obs(IONIZED_MMOL, 0.8, "mmol/L"),
    ],
)
def test_plausible_results_are_used(resource) -> None:
    result = facts(resource)
    assert result.issues == ()
    assert result.vitd or result.egfr or result.calcium


@pytest.mark.parametrize(
    "resource",
    [
        egfr(EPI_2021, 0, "e"),
        egfr(EPI_2021, 251, "e"),
        egfr(EPI_2021, 0, "e", valueQuantity={"value": 250, "comparator": ">", "unit": EGFR_UNIT}),
        obs(TOTAL, 1.9, "mg/dL"),
        obs(TOTAL, 25.5, "mg/dL"),
        obs("2000-8", 0.4, "mmol/L"),
        obs(IONIZED, 0, "mg/dL", valueQuantity={"value": 2, "comparator": "<=", "unit": "mg/dL"}),
    ],
)
def test_implausible_egfr_and_calcium_are_not_used(resource) -> None:
    result = facts(resource)
    assert result.egfr is None and result.calcium is None
    assert len(result.issues) == 1 and "outside what a body can have" in result.issues[0]


def test_an_implausible_albumin_corrects_nothing() -> None:
    result = facts(obs(TOTAL, 9.8, "mg/dL"), obs(ALBUMIN, 0, "g/dL", oid="alb"))
    assert result.calcium is not None and result.calcium.kind == "total"
    assert result.issues == (
        "Albumin of 2026-11-01 is 0 g/dL: outside what a body can have (above 0, at most 8 g/dL)",
    )


# ---------------------------------------------------------------- pregnancy that is current


def pregnancy_status(when: str | None) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": "preg",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "82810-3"}]},
        "valueCodeableConcept": {"coding": [{"system": LOINC, "code": "LA15173-0"}]},
    }
    if when:
        resource["effectiveDateTime"] = when
    return resource


def pregnancy_condition(onset: str | None) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Condition",
        "id": "preg-c",
        "clinicalStatus": {"coding": [{"code": "active"}]},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "77386006"}], "text": "Pregnancy"},
    }
    if onset:
        resource["onsetDateTime"] = onset
    return resource


@pytest.mark.parametrize(
    ("make", "when", "pregnant"),
    [
        (pregnancy_status, "2026-01-28", True),  # 300 days before today
        (pregnancy_status, "2026-01-27", False),  # 301 days: longer than a pregnancy lasts
        (pregnancy_status, None, True),  # undated: never drop a caution for a missing date
        (pregnancy_condition, "2026-01-28", True),
        (pregnancy_condition, "2025-06-01", False),
        (pregnancy_condition, None, True),
    ],
)
def test_pregnancy_evidence_older_than_300_days_is_not_a_current_pregnancy(make, when, pregnant) -> None:
    assert bool(facts(make(when)).pregnancy) is pregnant
