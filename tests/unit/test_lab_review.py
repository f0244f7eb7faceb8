"""Clinical review of the lab reading: copies, number text, legacy and "among blacks" eGFR, comparators,
unrounded decisions, plausibility floors, reference ranges (one test per finding, or more)."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from builders import TODAY, lab_observation, ruleset
from d3k2.core.engine import fact_values
from d3k2.core.facts import Facts
from d3k2.core.terminology import LOINC
from d3k2.service import facts_for

EGFR_UNIT = "mL/min/{1.73_m2}"
VITD, CALCIUM, EPI_2021 = "62292-8", "17861-6", "98979-8"


obs = lab_observation


def text_obs(code: str, text: str, *, oid: str = "o1", when: str = "2026-11-01") -> dict[str, Any]:
    resource = obs(code, 0, "", oid=oid, when=when)
    del resource["valueQuantity"]
    resource["valueString"] = text
    return resource


def facts(*resources: dict[str, Any], today: date = TODAY) -> Facts:
    return facts_for(ruleset(), list(resources), today)


def values(result: Facts) -> dict[str, Any]:
    return fact_values(ruleset(), result, "seed")


# ---------------------------------------------------------------- 1: copies of one result


@pytest.mark.parametrize("order", [(170, 20), (20, 170)])
def test_disagreeing_copies_of_a_25ohd_keep_the_toxic_one_and_say_so(order) -> None:
    result = facts(*(obs(VITD, v, "ng/mL", oid="v") for v in order))
    assert result.vitd is not None and result.vitd.value.lo == 170
    assert result.copies == ("Observation/v",)
    assert values(result)["vitd.band"] == "toxicity"
    assert result.vitd.notes == (
        "copies of this result disagree, the most cautious is used: "
        "170 ng/mL on 2026-11-01, 20 ng/mL on 2026-11-01",
    )


def test_an_older_copy_with_a_caution_is_not_hidden_by_a_newer_copy() -> None:
    result = facts(obs(VITD, 170, "ng/mL", oid="v", when="2026-10-01"), obs(VITD, 20, "ng/mL", oid="v"))
    assert result.vitd is not None and result.vitd.value.lo == 170
    calcium = facts(
        obs(CALCIUM, 11.5, "mg/dL", oid="c", when="2026-10-01"), obs(CALCIUM, 9.5, "mg/dL", oid="c")
    )
    assert values(calcium)["calcium.high"] is True


def test_disagreeing_egfr_copies_keep_the_lowest() -> None:
    result = facts(
        obs(EPI_2021, 25, EGFR_UNIT, oid="e"), obs(EPI_2021, 60, EGFR_UNIT, oid="e", when="2026-11-02")
    )
    assert result.egfr is not None and result.egfr.value.lo == 25
    assert values(result)["egfr.band"] == "G4"


def test_results_without_an_id_at_one_moment_keep_the_cautious_one_and_equal_copies_say_nothing() -> None:
    first, second = obs(CALCIUM, 11.5, "mg/dL"), obs(CALCIUM, 9.5, "mg/dL")
    del first["id"], second["id"]
    result = facts(second, first)
    assert result.calcium is not None and result.calcium.value.lo == 11.5
    same = facts(obs(VITD, 20, "ng/mL", oid="v"), obs(VITD, 20, "ng/mL", oid="v", note=[{"text": "x"}]))
    assert same.vitd is not None and same.vitd.notes == ()


def test_a_lab_names_its_cautious_direction_or_the_rule_set_does_not_load() -> None:
    from d3k2.core.loader import cautious_direction

    assert cautious_direction("lowest") == "lowest"
    with pytest.raises(ValueError, match="cautious"):
        cautious_direction("middle")


# ---------------------------------------------------------------- 2: thousands or decimal comma


@pytest.mark.parametrize("text", ["1,220 nmol/L", "1,220", "<1,220 nmol/L", "1 220 nmol/L"])
def test_a_comma_before_three_digits_or_a_spaced_number_is_never_guessed(text) -> None:
    result = facts(text_obs(VITD, text, oid="v"), obs(VITD, 170, "ng/mL", oid="old", when="2026-01-01"))
    assert result.vitd is not None and result.vitd.source == "Observation/old"
    assert len(result.issues) == 1 and result.issues[0].startswith("25(OH)D of 2026-11-01 (the value is ")


def test_a_decimal_comma_is_still_read() -> None:
    result = facts(text_obs(VITD, "12,5 ng/mL"), text_obs(VITD, "45,25 nmol/L", oid="b", when="2026-10-01"))
    assert result.vitd is not None and result.vitd.value.lo == 12.5


# ---------------------------------------------------------------- 3: newest eGFR across equations


def test_an_old_race_free_egfr_never_hides_a_newer_legacy_one() -> None:
    result = facts(
        obs(EPI_2021, 45, EGFR_UNIT, oid="a", when="2024-06-01"),
        obs("48642-3", 22, EGFR_UNIT, oid="b", when="2026-10-15"),
    )
    assert result.egfr is not None and result.egfr.source == "Observation/b"
    assert values(result)["egfr.band"] == "G4"


# ---------------------------------------------------------------- 4: a valueString without a unit


def test_egfr_and_calcium_text_without_a_unit_take_the_unit_of_their_code() -> None:
    kidney = facts(text_obs(EPI_2021, "<15"))
    assert kidney.issues == () and values(kidney)["egfr.band"] == "G5"
    # `>60` may be G2 or G1: no category, and the lowest it may be in is G2.
    assert values(facts(text_obs(EPI_2021, ">60")))["egfr.band"] is None
    assert values(facts(text_obs(EPI_2021, ">60")))["egfr.lowest_band"] == "G2"
    calcium = facts(text_obs(CALCIUM, ">15.0"))
    assert calcium.issues == () and values(calcium)["calcium.grade"] == "severe"
    moles = facts(text_obs("2000-8", ">3.6"))
    assert moles.calcium is not None and values(moles)["calcium.grade"] == "severe"


# ---------------------------------------------------------------- 5: an "among blacks" eGFR


@pytest.mark.parametrize(
    ("codes", "shown"),
    [
        (["88293-6"], "34 mL/min/1.73 m² (29 mL/min/1.73 m²)"),  # 34 / 1.159 = 29.34
        (["48643-1"], "34 mL/min/1.73 m² (28 mL/min/1.73 m²)"),  # 34 / 1.212 = 28.05
        (["48643-1", "33914-3"], "34 mL/min/1.73 m² (28 mL/min/1.73 m²)"),
        (["33914-3", "48643-1"], "34 mL/min/1.73 m² (28 mL/min/1.73 m²)"),
    ],
)
def test_an_among_blacks_egfr_is_read_without_its_race_coefficient_and_keeps_the_kidney_card(
    codes, shown
) -> None:
    """34 "among blacks" is below 30 without the coefficient (CKD G4): the kidney caution never disappears."""
    resource = obs(codes[0], 34, EGFR_UNIT, when="2026-10-15")
    resource["code"] = {"coding": [{"system": LOINC, "code": code} for code in codes]}
    result = facts(resource, obs(EPI_2021, 60, EGFR_UNIT, oid="old", when="2026-01-01"))
    assert result.egfr is not None and result.egfr.shown == shown and result.egfr.value.lt(30) is True
    assert values(result)["egfr.band"] == "G4" and values(result)["data.issues"] is False
    coefficient = "1.159" if codes[0] == "88293-6" else "1.212"
    assert result.egfr.notes == (
        "legacy sex/race-specific equation",
        f'by an "among blacks" equation, shown without its race coefficient (÷ {coefficient})',
    )


def test_an_among_blacks_egfr_is_never_shown_across_a_threshold() -> None:
    # 35.9 / 1.212 = 29.62: below 30, so never rounded to "30"; 36.36 / 1.212 = 30 exactly: G3b.
    near = facts(obs("48643-1", 35.9, EGFR_UNIT, when="2026-10-15")).egfr
    assert near is not None and near.shown == "35.9 mL/min/1.73 m² (29.6 mL/min/1.73 m²)"
    assert near.value.lt(30) is True
    on = facts(obs("48643-1", 36.36, EGFR_UNIT, when="2026-10-15"))
    assert on.egfr is not None and on.egfr.shown == "36.36 mL/min/1.73 m² (30 mL/min/1.73 m²)"
    assert values(on)["egfr.band"] == "G3b"


def test_an_among_blacks_egfr_with_a_comparator_stays_an_interval() -> None:
    result = facts(text_obs("48643-1", "<30", when="2026-10-15")).egfr
    assert result is not None and result.value.lt(30) is True and result.value.is_exact is False


# ---------------------------------------------------------------- 6: a ">" value below every band's floor


def test_a_greater_than_value_below_the_second_band_gets_no_band_and_no_dosing() -> None:
    gt25 = obs(VITD, 25, "ng/mL", valueQuantity={"value": 25, "comparator": ">", "unit": "ng/mL"})
    assert values(facts(gt25))["vitd.band"] is None
    gt35 = obs(VITD, 35, "ng/mL", valueQuantity={"value": 35, "comparator": ">", "unit": "ng/mL"})
    assert values(facts(gt35))["vitd.band"] == "insufficient"
    lt35 = obs(VITD, 35, "ng/mL", valueQuantity={"value": 35, "comparator": "<", "unit": "ng/mL"})
    assert values(facts(lt35))["vitd.band"] == "deficient"
    gt25_egfr = text_obs(EPI_2021, ">25")
    # `>25` may be G4 to G1: no category, G4 at the lowest, so the kidney caution shows (it may be below 30).
    assert values(facts(gt25_egfr))["egfr.band"] is None
    assert values(facts(gt25_egfr))["egfr.lowest_band"] == "G4"


# ---------------------------------------------------------------- 10: plausibility floors


def test_a_near_zero_or_mmol_as_mg_newest_value_never_hides_an_older_caution() -> None:
    for tiny in (obs(VITD, 0.1, "ng/mL", oid="new"), obs(VITD, 1, "nmol/L", oid="new")):
        result = facts(tiny, obs(VITD, 170, "ng/mL", oid="old", when="2026-10-01"))
        assert values(result)["vitd.band"] == "toxicity" and len(result.issues) == 1
    calcium = facts(
        obs(CALCIUM, 2.65, "mg/dL", oid="new"), obs(CALCIUM, 11.8, "mg/dL", oid="old", when="2026-10-01")
    )
    assert values(calcium)["calcium.high"] is True and len(calcium.issues) == 1
    ionized = facts(obs("17863-2", 2.65, "mg/dL"))
    assert ionized.calcium is not None and ionized.issues == ()


# ---------------------------------------------------------------- 14: the lab's reference range


def test_a_unitless_range_is_in_the_results_unit_and_the_lowest_high_is_used() -> None:
    unitless = obs(CALCIUM, 10.4, "mg/dL", referenceRange=[{"high": {"value": 10.2}}])
    result = facts(unitless)
    assert result.calcium is not None and result.calcium.upper_limit == 10.2
    assert values(result)["calcium.high"] is True
    two = obs(
        CALCIUM,
        11,
        "mg/dL",
        referenceRange=[{"high": {"value": 12, "unit": "mg/dL"}}, {"high": {"value": 10.2, "unit": "mg/dL"}}],
    )
    assert values(facts(two))["calcium.high"] is True
    mmol = obs("2000-8", 2.7, "mmol/L", referenceRange=[{"high": {"value": 2.6}}])
    assert facts(mmol).calcium.upper_limit == 2.6 * 4.008  # type: ignore[union-attr]  # unrounded, as results


# ---------------------------------------------------------------- 15: an old calcium is named as old


def test_the_hypercalcemia_card_names_an_old_calcium_as_old() -> None:
    from d3k2.core.cards import OFFLINE_CARD_KEY, build_cards
    from d3k2.core.engine import evaluate

    rs = ruleset()
    evaluation = evaluate(
        rs, facts(obs(CALCIUM, 11.5, "mg/dL", when="2024-01-01")), hook="patient-view", profile="seed"
    )
    cards = build_cards(rs, evaluation, hook="patient-view", patient_id="p1", card_key=OFFLINE_CARD_KEY)
    card = next(c for c in cards if c["source"]["topic"]["code"] == "hypercalcemia")
    assert "on 2024-01-01 (stale: 1058 days old)" in card["detail"]
