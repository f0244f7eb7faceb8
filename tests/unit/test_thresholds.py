"""Values next to a threshold: the rules decide on the value as reported, converted but never rounded, and no
number on the card lies on the other side of a threshold from where the rules put the value.

The property test reads its example count as tests/unit/test_properties.py does (200 in `make test`,
D3K2_PROPERTY_EXAMPLES=3000 in `make fuzz`).
"""

from __future__ import annotations

import os
import re
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from builders import TODAY, lab_observation, ruleset
from d3k2.core.calcium import calcium_high, describe_limit
from d3k2.core.engine import evaluate
from d3k2.core.facts import Facts
from d3k2.core.loader import with_profile_marks
from d3k2.core.quantities import LabBand, format_beside
from d3k2.service import facts_for

EXAMPLES = int(os.environ.get("D3K2_PROPERTY_EXAMPLES", "200"))
PROPERTY = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
EGFR_UNIT = "mL/min/{1.73_m2}"
# (lab, kind) → LOINC code by the unit it is reported in.
CODES = {
    ("vitd", ""): {"ng/mL": "62292-8", "nmol/L": "62292-8"},
    ("egfr", ""): {EGFR_UNIT: "98979-8", "mL/min/1.73m2": "98979-8"},
    ("calcium", "total"): {"mg/dL": "17861-6", "mmol/L": "2000-8"},
    ("calcium", "ionized"): {"mg/dL": "17863-2", "mmol/L": "1995-0"},
    ("calcium", "albumin-corrected"): {"mg/dL": "29265-6", "mmol/L": "29265-6"},
}
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _facts(code: str, value: float, unit: str, comparator: str | None = None) -> Facts:
    resource = lab_observation(code, value, unit)
    if comparator:
        resource["valueQuantity"]["comparator"] = comparator
    return facts_for(ruleset(), [resource], TODAY)


def _values(read: Facts, profile: str = "seed") -> dict[str, Any]:
    return dict(evaluate(ruleset(), read, hook="patient-view", profile=profile).values)


def _topics(read: Facts, profile: str = "seed") -> set[str]:
    return {f.rule.id for f in evaluate(ruleset(), read, hook="patient-view", profile=profile).findings}


# ---------------------------------------------------------------- the three values of the clinical review


def test_374_5_nmol_per_litre_is_above_150_ng_per_ml_the_toxicity_band() -> None:
    # Rounded to one decimal it was 150.0 ng/mL: "very high", not the toxicity band (> 150).
    read = _facts("62292-8", 374.5, "nmol/L")
    assert read.vitd is not None and read.vitd.shown == "374.5 nmol/L (150.04 ng/mL)"
    assert _values(read)["vitd.band"] == "toxicity" and "vitd-toxicity" in _topics(read)
    assert _values(_facts("62292-8", 374.4, "nmol/L"))["vitd.band"] == "very-high"  # 149.99999 ng/mL


def test_74_87_nmol_per_litre_is_below_30_ng_per_ml() -> None:
    # Rounded it was 30.0 ng/mL: "target" (30–100) under endocrine-2011, "insufficient" under seed.
    read = _facts("62292-8", 74.87, "nmol/L")
    assert read.vitd is not None and read.vitd.shown == "74.87 nmol/L (29.996 ng/mL)"
    assert _values(read, "endocrine-2011")["vitd.band"] == "insufficient"
    assert _values(read, "seed")["vitd.band"] == "deficient"


def test_2_621_mmol_per_litre_calcium_is_above_the_limit_and_2_62_at_it() -> None:
    # Rounded it was 10.50 mg/dL: at the limit, no hypercalcemia card.
    lab = ruleset().facts.labs["calcium"]
    above = _facts("2000-8", 2.621, "mmol/L")
    assert above.calcium is not None and above.calcium.shown == "2.621 mmol/L (10.505 mg/dL)"
    assert calcium_high(above.calcium, lab) is True and "hypercalcemia" in _topics(above)
    assert describe_limit(above.calcium, lab, "lab", "default") == "2.62 mmol/L (default)"
    # 2.62 mmol/L is the limit as CLINICAL.md states it (10.5 mg/dL / 2.62 mmol/L): at it, not above it.
    at = _facts("2000-8", 2.62, "mmol/L")
    assert at.calcium is not None and calcium_high(at.calcium, lab) is False
    assert at.calcium.shown == "2.62 mmol/L (10.5 mg/dL)" and "hypercalcemia" not in _topics(at)
    # The same in mg/dL: 10.5 is at the default limit, 10.51 above it.
    assert calcium_high(_facts("17861-6", 10.5, "mg/dL").calcium, lab) is False
    assert calcium_high(_facts("17861-6", 10.51, "mg/dL").calcium, lab) is True


def test_ionized_calcium_limits_are_the_sources_in_either_unit() -> None:
    lab = ruleset().facts.labs["calcium"]
    assert calcium_high(_facts("1995-0", 1.32, "mmol/L").calcium, lab) is False
    assert calcium_high(_facts("1995-0", 1.321, "mmol/L").calcium, lab) is True
    assert calcium_high(_facts("17863-2", 5.28, "mg/dL").calcium, lab) is False
    assert calcium_high(_facts("17863-2", 5.29, "mg/dL").calcium, lab) is True


def test_a_number_beside_a_threshold_gets_the_digits_that_keep_its_side() -> None:
    limit = [(10.5, False)]  # above 10.5 is high; 10.5 itself is not
    assert format_beside(10.504968, 2, limit) == "10.505"
    assert format_beside(10.4951, 2, limit) == "10.5"  # at the limit is on the side of 10.4951: not high
    assert format_beside(10.5, 2, limit) == "10.5"
    band = [(30.0, True)]  # 30 itself is in the band above
    assert format_beside(29.995991670000002, 1, band) == "29.996"
    assert format_beside(30.048075, 1, band) == "30"
    assert format_beside(18.028845, 1, band) == "18"
    assert format_beside(1 / 3, 1, [(1 / 3, True)]) == "0.3333333333333333"  # on the mark: as it is


# ---------------------------------------------------------------- eGFR reported with a comparator


@pytest.mark.parametrize(
    ("comparator", "value", "band", "lowest", "kidney"),
    [
        ("<", 30, None, "G5", "kidney-advanced"),  # G4 or G5: certainly below 30, never labelled G5
        ("<", 15, "G5", "G5", "kidney-advanced"),
        ("<", 60, None, "G5", "kidney-possible"),  # may be below 30: the caution stays, said as such
        (">", 90, "G1", "G1", None),
        (">", 60, None, "G2", None),
        (None, 29, "G4", "G4", "kidney-advanced"),
        (None, 30, "G3b", "G3b", None),
    ],
)
def test_an_egfr_category_only_when_certain_and_the_kidney_caution_when_it_may_be_below_30(
    comparator: str | None, value: float, band: str | None, lowest: str, kidney: str | None
) -> None:
    read = _facts("98979-8", value, EGFR_UNIT, comparator)
    values = _values(read)
    assert (values["egfr.band"], values["egfr.lowest_band"]) == (band, lowest)
    shown = {"kidney-advanced", "kidney-possible"} & set(_topics(read))
    assert shown == ({kidney} if kidney else set())


# ---------------------------------------------------------------- property: next to every threshold


def _thresholds() -> list[tuple[str, str, str, float, bool]]:
    """(lab, kind, unit, threshold in the canonical unit, a value on it counts as above it)."""
    found = []
    for (lab_name, kind), units in CODES.items():
        lab = ruleset().facts.labs[lab_name]
        for unit in units:
            found += [(lab_name, kind, unit, mark, above) for mark, above in lab.marks[unit]]
    return sorted(set(found))


def _band_of(value: Fraction, bands: list[LabBand] | Any) -> str:
    """The band holding an exact value (bands ascending, as in profiles.toml and facts.toml)."""
    for band in bands:
        low_ok = value > band.lower if band.lower_open else value >= band.lower
        high_ok = value < band.upper if band.upper_open else value <= band.upper
        if low_ok and high_ok:
            return str(band.id)
    raise AssertionError(f"no band for {value}")


def _side(x: float | Fraction, mark: Fraction, on_is_above: bool) -> bool:
    return x > mark or (x == mark and on_is_above)


@PROPERTY
@given(
    st.sampled_from(_thresholds()),
    st.integers(min_value=-500, max_value=500),  # within ±0.5 %, in steps of 0.001 %
    st.integers(min_value=0, max_value=4),  # digits the lab reports
)
@example(("vitd", "", "nmol/L", 150.0, False), 0, 1)
@example(("calcium", "total", "mmol/L", 2.62 * 4.008, False), 0, 2)
def test_next_to_every_threshold_the_band_is_the_exact_values_and_no_number_shown_crosses_it(
    threshold: tuple[str, str, str, float, bool], step: int, digits: int
) -> None:
    lab_name, kind, unit, mark, on_is_above = threshold
    rs = ruleset()
    lab = rs.facts.labs[lab_name]
    factor = lab.units[unit]
    reported = round(mark / factor * (1 + step / 100_000), digits)
    exact = Fraction(str(reported)) * Fraction(str(factor))  # the value as reported, in decimal arithmetic
    read = _facts(CODES[(lab_name, kind)][unit], reported, unit)
    measured = {"vitd": read.vitd, "egfr": read.egfr, "calcium": read.calcium}[lab_name]
    if measured is None:  # outside what a body can have: not used, and named (test_lab_reading)
        assert read.issues
        return
    assert measured.value.lo == reported * factor  # converted, not rounded
    # The band the exact value is in.
    if lab_name == "vitd":
        for profile in rs.profiles:
            band = _values(read, profile)["vitd.band"]
            assert band == _band_of(exact, rs.profiles[profile].bands), (profile, reported, unit)
    elif lab_name == "egfr":
        assert _values(read)["egfr.band"] == _band_of(exact, lab.bands)
    else:
        # Held against the limit its source states in the result's unit, else the canonical one.
        stated = [s[kind] for u, s in lab.limits_in.items() if lab.units[u] == factor and kind in s]
        if stated:
            high = Fraction(str(reported)) > Fraction(str(stated[0]))
        else:
            high = exact > Fraction(str(lab.kind_limits[kind]))
        values = _values(read)
        assert values["calcium.high"] is high, (reported, unit, kind)
        grade = _band_of(exact, lab.grades) if kind in lab.graded_kinds else "ungraded"
        assert values["calcium.grade"] == (grade if high else "none")
    # No number shown lies across the threshold: the reported one (in its unit) is as sent, and the one shown
    # beside it (or alone, when the unit is the canonical one) is on the exact value's side.
    numbers = [Fraction(n.replace(",", "")) for n in NUMBER.findall(measured.shown.replace("1.73 m²", ""))]
    assert numbers[0] == Fraction(str(reported))
    shown = numbers[-1]
    exact_side = _side(measured.value.lo, Fraction(mark), on_is_above)
    assert _side(shown, Fraction(mark), on_is_above) == exact_side, (measured.shown, mark)
    if lab_name == "calcium":
        # The limit the card names and the value it shows are on the sides the rules judged.
        text = describe_limit(measured, lab, "lab range", "default")
        named = Fraction(NUMBER.findall(text)[0].replace(",", ""))
        ours = numbers[0] if unit in text else shown
        assert (ours > named) is values["calcium.high"], (measured.shown, text)


def test_the_profiles_thresholds_are_marks_of_the_25ohd_lab() -> None:
    rs = ruleset()
    marks = {mark for mark, _ in rs.facts.labs["vitd"].marks["nmol/L"]}
    assert {12, 20, 30, 40, 50, 60, 80, 100, 150} <= marks  # seed, endocrine-2011 and iom-2011
    assert with_profile_marks(rs.facts, "no-such-lab", rs.profiles.values()) is rs.facts
