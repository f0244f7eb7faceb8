"""Properties of the dose grammar (CLINICAL.md 6, issue 23): the daily amount read from a dose never
decreases when the count, the strength or the frequency increases, and a text that cannot be read is
"unknown", never 0."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from builders import ruleset
from d3k2.core.dosage import ingredient_dose, read_dosage

PROPERTY = settings(max_examples=150, deadline=None, derandomize=True, database=None)
# Every schedule the grammar reads, from least to most often in a given form: (text, times a day).
FREQUENCIES = [
    ("every other week", 1 / 14),
    ("q week", 1 / 7),
    ("qwk", 1 / 7),
    ("q7d", 1 / 7),
    ("once weekly", 1 / 7),
    ("every other day", 1 / 2),
    ("daily", 1),
    ("BID", 2),
    ("TID", 3),
    ("QID", 4),
]
STRENGTHS = [400, 1000, 2000, 5000, 10000, 50000]


def _daily(strength: int, text: str) -> float | None:
    rs = ruleset()
    name = f"Cholecalciferol {strength:,} IU tablet"
    product = rs.medications.product({"text": name})
    (ingredient,) = product.ingredients
    return ingredient_dose(
        ingredient,
        product,
        [read_dosage({"text": text}, rs.catalog, rs.texts.dosage)],
        rs.catalog,
        rs.texts.dosage,
    ).daily


counts = st.integers(min_value=1, max_value=12)
strengths = st.sampled_from(STRENGTHS)
frequencies = st.integers(min_value=0, max_value=len(FREQUENCIES) - 1)


@PROPERTY
@given(counts, counts, strengths, strengths, frequencies, frequencies)
def test_daily_amount_never_decreases_with_count_strength_or_frequency(c1, c2, s1, s2, f1, f2) -> None:
    (c1, c2), (s1, s2), (f1, f2) = sorted((c1, c2)), sorted((s1, s2)), sorted((f1, f2))
    low = _daily(s1, f"{c1} tablets {FREQUENCIES[f1][0]}")
    high = _daily(s2, f"{c2} tablets {FREQUENCIES[f2][0]}")
    assert low is not None and high is not None
    assert low <= high
    assert low == c1 * s1 * FREQUENCIES[f1][1] or abs(low - c1 * s1 * FREQUENCIES[f1][1]) < 1e-6


@PROPERTY
@given(st.integers(min_value=1, max_value=99), st.integers(min_value=0, max_value=999), st.booleans())
def test_thousands_separators_read_as_one_number(thousands, rest, space) -> None:
    amount = thousands * 1000 + rest
    shown = f"{thousands}{' ' if space else ','}{rest:03d} IU daily"
    dosage = read_dosage({"text": shown}, ruleset().catalog, ruleset().texts.dosage)
    assert not isinstance(dosage, str)
    assert dosage.dose.value == amount


@PROPERTY
@given(
    st.text(alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyz ,.;:/-0123456789"), max_size=40), strengths
)
def test_a_dose_text_is_read_or_unknown_never_zero(text, strength) -> None:
    daily = _daily(strength, text)
    assert daily is None or daily > 0


def test_unreadable_forms_are_unknown_not_zero() -> None:
    for text in (
        "take as directed",
        "1 capsule",
        "Vitamin D3 5,000 IU softgel",
        "0 tablets daily",
        "1 tab q0d",
    ):
        assert _daily(5000, text) is None, text


def test_the_product_name_strength_keeps_its_thousands() -> None:
    rs = ruleset()
    for name, strength in (
        ("Vitamin D3 5,000 IU softgel", 5000),
        ("Vitamin D3 50 000 IU capsule", 50000),
        ("Cholecalciferol 1000 UNT Oral Tablet", 1000),
    ):
        (ingredient,) = rs.medications.product({"text": name}).ingredients
        assert ingredient.strength == strength, name
    # A space groups thousands only before an IU unit: "K 2 100 MCG" is 100 mcg, not 2,100.
    (k2,) = rs.medications.product({"text": "Vitamin K 2 100 MCG capsule"}).ingredients
    assert k2.strength == 100
