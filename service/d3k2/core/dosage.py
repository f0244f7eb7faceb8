"""How much: the dose grammar (structured dose and timing, or the dosage text) and the daily-dose
arithmetic of each ingredient, with the line that shows it.

Pure: no Flask, no requests. Every reader accepts any JSON-shaped value and says, instead of raising, why a
dose is unknown. Units, conversions and timing codes are the catalog's (cards/medications.toml); the words
of the arithmetic and of every reason are cards/texts.toml's [dosage] (`words`, d3k2.core.texts.DOSAGE).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from d3k2.core.catalog import MedicationCatalog
from d3k2.core.lenient import dicts, fmt, is_map, nonblank, positive_number, quote
from d3k2.core.medications import Product, ProductIngredient

# cards/texts.toml [dosage]: key → text.
Words = Mapping[str, str]


@dataclass(frozen=True)
class IngredientDose:
    concept: str
    name: str
    strength: float | None
    unit: str | None
    daily: float | None
    weekly: float | None
    arithmetic: str
    basis: str
    matched_by: str
    # What the arithmetic leads with ("4,000 IU/day", "50,000 IU/week"; "" when the dose is unknown), and
    # the period it is per: "wk" for a dose that stays weekly (CLINICAL.md 6a).
    lead: str = ""
    lead_period: str = ""


@dataclass(frozen=True)
class _Dose:
    kind: Literal["count", "amount"]
    value: Decimal
    unit: str  # count: noun ("tablet"); amount: normalised unit ("IU", "mcg", "mg")
    note: str | None = None


@dataclass(frozen=True)
class _Schedule:
    frequency: Decimal
    period: Decimal
    unit: str  # a key of period_units
    note: str | None = None


@dataclass(frozen=True)
class Dosage:
    dose: _Dose
    schedule: _Schedule
    basis: str  # "structured" or "text" (read from the dosage text): [dosage] basis_<basis> on the cards


_TIMES = {1: "once", 2: "twice", 3: "thrice", 4: "four_times"}  # → the [dosage] key of its words


def _times(frequency: Decimal, words: Words) -> str:
    if frequency == frequency.to_integral_value() and int(frequency) in _TIMES:
        return words[_TIMES[int(frequency)]]
    return words["times"].format(count=fmt(frequency))


def _noun(unit: str, words: Words) -> str:
    return words.get(f"noun_{unit}", unit)


def _schedule_words(schedule: _Schedule, words: Words) -> str:
    noun = _noun(schedule.unit, words)
    times = _times(schedule.frequency, words)
    if schedule.period == 1:
        adverb = words.get(f"adverb_{schedule.unit}") or words["per_period"].format(noun=noun)
        said = words["each_period"].format(times=times, adverb=adverb)
    elif schedule.frequency == 1:
        said = words["every_periods"].format(period=fmt(schedule.period), noun=noun)
    else:
        said = words["times_every_periods"].format(times=times, period=fmt(schedule.period), noun=noun)
    return f"{said} {schedule.note}" if schedule.note else said


def _dose_in(value: Decimal, spelling: str, catalog: MedicationCatalog) -> _Dose | None:
    """A dose of `value` counted in units (tablets) or measured in an amount (IU, mcg), by its spelling."""
    noun = catalog.count_noun(spelling)
    if noun is not None:
        return _Dose("count", value, noun)
    unit = catalog.unit_of(spelling)
    return _Dose("amount", value, unit) if unit is not None else None


def _read_dose(quantity: object, catalog: MedicationCatalog, words: Words) -> _Dose | str:
    if not is_map(quantity):
        return words["quantity_not_readable"]
    value = positive_number(quantity.get("value"))
    if value is None:
        return words["value_not_understood"].format(value=quote(quantity.get("value")))
    spellings = [s for s in (nonblank(quantity.get("code")), nonblank(quantity.get("unit"))) if s]
    if not spellings:
        return words["quantity_no_unit"]
    for spelling in spellings:
        dose = _dose_in(value, spelling, catalog)
        if dose is not None:
            return dose
    return words["unit_not_understood"].format(unit=quote(spellings[0]))


def _structured_dose(
    dosage: Mapping[str, Any], catalog: MedicationCatalog, words: Words
) -> _Dose | str | None:
    """R4 doseAndRate[].dose[x]; STU3/DSTU2 put dose[x] on the dosage itself."""
    holders = [*dicts(dosage.get("doseAndRate")), dosage]
    for holder in holders:
        if "doseQuantity" in holder:
            return _read_dose(holder["doseQuantity"], catalog, words)
        if "doseRange" in holder:
            dose_range = holder["doseRange"]
            high = dose_range.get("high") if is_map(dose_range) else None
            if not is_map(high):
                return words["range_no_high"]
            dose = _read_dose(high, catalog, words)
            if isinstance(dose, str):
                return dose
            low_quantity = dose_range.get("low")
            low = positive_number(low_quantity.get("value")) if is_map(low_quantity) else None
            if low is not None:
                shown = words["range_between"].format(low=fmt(low), high=fmt(dose.value))
            else:
                shown = words["range_up_to"].format(high=fmt(dose.value))
            return _Dose(dose.kind, dose.value, dose.unit, words["range_used"].format(range=shown))
    return None


def _schedule_from_code(code: str, catalog: MedicationCatalog) -> _Schedule | None:
    entry = catalog.timing_codes.get(code.strip().upper())
    return _Schedule(entry.frequency, entry.period, entry.period_unit) if entry else None


def _structured_schedule(
    dosage: Mapping[str, Any], catalog: MedicationCatalog, words: Words
) -> _Schedule | str | None:
    timing = dosage.get("timing")
    if not is_map(timing):
        return None
    repeat = timing.get("repeat")
    repeat = repeat if is_map(repeat) else {}
    period_unit = repeat.get("periodUnit", repeat.get("periodUnits"))  # periodUnits: DSTU2
    if period_unit is not None:
        if not isinstance(period_unit, str) or period_unit not in catalog.period_hours:
            return words["period_unit_not_understood"].format(unit=quote(period_unit))
        frequency = positive_number(repeat.get("frequency", 1))
        if frequency is None:
            return words["frequency_not_understood"].format(value=quote(repeat.get("frequency")))
        period = positive_number(repeat.get("period", 1))
        if period is None:
            return words["period_not_understood"].format(value=quote(repeat.get("period")))
        note = None
        frequency_max = positive_number(repeat.get("frequencyMax"))
        # An "up to N times" order is judged at its maximum: a high-dose card must not be missed.
        if frequency_max is not None and frequency_max > frequency:
            note = words["frequency_max_used"].format(times=fmt(frequency_max))
            frequency = frequency_max
        return _Schedule(frequency, period, period_unit, note)
    code = timing.get("code")
    if is_map(code):
        for coding in dicts(code.get("coding")):
            found = nonblank(coding.get("code"))
            schedule = _schedule_from_code(found, catalog) if found else None
            if schedule:
                return schedule
        text = nonblank(code.get("text"))
        schedule = _schedule_from_code(text, catalog) if text else None
        return schedule or words["timing_code_not_understood"]
    if "frequency" in repeat or "period" in repeat:
        return words["timing_no_period_unit"]
    return None


# Timing codes that are also ordinary words or abbreviations in free text ("1 tablet am and pm" is twice
# daily, not AM): honoured in Timing.code only.
_PLAIN_WORD_CODES = {"AM", "PM", "BED", "WK", "MO"}
_COUNT_WORDS = {"once": "1", "twice": "2", "thrice": "3"}
_NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8}
# Thousands separators: a comma, or a space before an IU unit only ("50 000 IU"; "2 500 mcg" is not one).
_NUM = (
    r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d{1,3}(?:[ \u00a0\u202f]\d{3})+(?=\s*(?:iu|units?|unt)\b)"
    r"|\d+(?:\.\d+)?|(?:" + "|".join(_NUMBER_WORDS) + r")\b"
)
_TEXT_AMOUNT = re.compile(rf"(?<![\w.,])({_NUM})\s*([a-zµμ\[{{][^\s,;:()]*)")
_SCHEDULE_ADVERBS = frozenset({"daily", "weekly", "monthly", "nightly"})
_TIME_WORDS = re.compile(r"(times?|x|hours?|hrs?|h|days?|weeks?|wks?|months?|years?)\.?$")
_UNIT_WORDS = {
    "hour": "h", "hours": "h", "hr": "h", "hrs": "h", "h": "h",
    "day": "d", "days": "d", "daily": "d",
    "week": "wk", "weeks": "wk", "wk": "wk", "wks": "wk", "weekly": "wk",
    "month": "mo", "months": "mo", "monthly": "mo",
}  # fmt: skip
_UNIT_ALT = "|".join(sorted(_UNIT_WORDS, key=len, reverse=True))
_TEXT_EVERY_N = re.compile(rf"\bevery\s+({_NUM})\s+({_UNIT_ALT})\b")
# "q week", "qwk", "q7d", "q 2 weeks", "q1w": every N periods (QD, QID, QOD... are timing codes, tried first).
_Q_UNITS = {**_UNIT_WORDS, "d": "d", "w": "wk"}
_TEXT_Q = re.compile(r"\bq\.?\s*(\d+)?\s*(" + "|".join(sorted(_Q_UNITS, key=len, reverse=True)) + r")\b")
_TEXT_TIMES = re.compile(
    rf"\b(once|twice|thrice|(?:{_NUM})\s*(?:times|x))\s*(?:a|per|each|every|/|in\s+a)?\s*({_UNIT_ALT})\b"
)
# Daily is tried first: when a text names both ("daily for 8 weeks, then weekly"), the higher reading is the
# one a high-dose card must see. "a week" alone is left out: it is usually a duration ("for a week").
_TEXT_ONCE_PER = [
    (re.compile(r"\bevery\s+other\s+day\b"), ("1", "2", "d")),
    (
        re.compile(
            r"\b(daily|every\s+day|each\s+day|a\s+day|per\s+day|nightly|at\s+bedtime|every\s+(morning|evening))\b"
        ),
        ("1", "1", "d"),
    ),
    (re.compile(r"\bevery\s+other\s+week\b"), ("1", "2", "wk")),
    (re.compile(r"\b(weekly|every\s+week|per\s+week)\b"), ("1", "1", "wk")),
    (re.compile(r"\b(monthly|every\s+month|per\s+month)\b"), ("1", "1", "mo")),
]


def _text_number(text: str) -> Decimal:
    return Decimal(_NUMBER_WORDS[text]) if text in _NUMBER_WORDS else Decimal(re.sub(r"[,\s]", "", text))


def _text_dose(text: str, catalog: MedicationCatalog, words: Words) -> _Dose | str:
    for match in _TEXT_AMOUNT.finditer(text):
        spelling = match.group(2).rstrip(".")
        if _TIME_WORDS.match(spelling):
            continue
        value = _text_number(match.group(1))
        if value <= 0:
            return words["text_zero_dose"]
        if spelling in _SCHEDULE_ADVERBS:  # "1 daily": one of the product's units (tablet, capsule, ...)
            return _Dose("count", value, words["count_unit"])
        return _dose_in(value, spelling, catalog) or words["unit_not_understood"].format(unit=quote(spelling))
    return words["text_no_dose"]


def _text_schedule(text: str, catalog: MedicationCatalog, words: Words) -> _Schedule | str:
    # A zero in the frequency is a mistyped order, not a cue to read the rest ("0 times a day" is not
    # "a day"): the dose is unknown, as it is for "0 tablets daily".
    match = _TEXT_EVERY_N.search(text)
    if match:
        period = _text_number(match.group(1))
        if period <= 0:
            return words["text_zero_interval"]
        return _Schedule(Decimal(1), period, _UNIT_WORDS[match.group(2)])
    match = _TEXT_TIMES.search(text)
    if match:
        count = match.group(1)
        raw = _COUNT_WORDS.get(count) or re.sub(r"\s*(times|x)$", "", count)
        frequency = _text_number(raw)
        if frequency <= 0:
            return words["text_zero_frequency"]
        return _Schedule(frequency, Decimal(1), _UNIT_WORDS[match.group(2)])
    for word in re.findall(r"[a-z0-9]+", text.replace(".", "")):  # "q.d." is QD
        schedule = _schedule_from_code(word, catalog) if word.upper() not in _PLAIN_WORD_CODES else None
        if schedule:
            return schedule
    match = _TEXT_Q.search(text)
    if match:
        period = Decimal(match.group(1) or 1)
        if period <= 0:
            return words["text_zero_interval"]
        unit = _Q_UNITS[match.group(2)]
        if unit == "d" and period == 7:  # q7d is weekly: "50,000 IU/week", not "7,142.86 IU/day"
            return _Schedule(Decimal(1), Decimal(1), "wk")
        return _Schedule(Decimal(1), period, unit)
    for pattern, (times, every, unit) in _TEXT_ONCE_PER:
        if pattern.search(text):
            return _Schedule(Decimal(times), Decimal(every), unit)
    return words["text_no_frequency"]


def _per_hour(schedule: _Schedule, catalog: MedicationCatalog) -> Decimal:
    return schedule.frequency / (schedule.period * catalog.period_hours[schedule.unit])


def read_dosage(dosage: object, catalog: MedicationCatalog, words: Words) -> Dosage | str:
    if not is_map(dosage):
        return words["dosage_not_readable"]
    dose = _structured_dose(dosage, catalog, words)
    schedule = _structured_schedule(dosage, catalog, words)
    text = nonblank(dosage.get("text"))
    said = _text_schedule(text.lower(), catalog, words) if text and isinstance(schedule, _Schedule) else None
    # "1 tablet daily" with a weekly Timing: either may be the error, and the daily reading is seven times the
    # other. Neither is chosen: the dose is unknown, and the conflict is named.
    if (
        isinstance(said, _Schedule)
        and isinstance(schedule, _Schedule)
        and _per_hour(said, catalog) != _per_hour(schedule, catalog)
    ):
        return words["text_timing_conflict"].format(
            text=_schedule_words(said, words), timing=_schedule_words(schedule, words)
        )
    if isinstance(dose, _Dose) and isinstance(schedule, _Schedule):
        return Dosage(dose, schedule, "structured")
    if text:
        # Whatever the structured fields lack is read from the text (a coded dose with "twice daily").
        lowered = text.lower()
        final_dose = dose if isinstance(dose, _Dose) else _text_dose(lowered, catalog, words)
        final_schedule = (
            schedule if isinstance(schedule, _Schedule) else _text_schedule(lowered, catalog, words)
        )
        if isinstance(final_dose, _Dose) and isinstance(final_schedule, _Schedule):
            return Dosage(final_dose, final_schedule, "text")
        # The structured reason is the more precise one when both fail. One of the final pair is a reason
        # (a text reading is a _Dose/_Schedule or a reason), so there is always one to return.
        return next(r for r in (dose, schedule, final_dose, final_schedule) if isinstance(r, str))
    if isinstance(dose, str):
        return dose
    if isinstance(schedule, str):
        return schedule
    if dose is None:
        return words["no_dose_quantity"]
    return words["no_timing"]


@dataclass(frozen=True)
class _Amount:
    per_period: Decimal
    daily: Decimal
    lead: str  # "IU/day", "IU/week", ...
    period: str  # what `lead` is per: "d", "wk", "mo" or "a"
    detail: str


def _amount(
    ingredient: ProductIngredient, product: Product, dosage: Dosage, catalog: MedicationCatalog, words: Words
) -> _Amount | str:
    category = catalog.by_category[ingredient.category]
    dose, schedule = dosage.dose, dosage.schedule
    if dose.kind == "count":
        if ingredient.strength is None:
            return words["strength_unknown"].format(name=ingredient.name)
        # EHRs say "capsule" or "{pill}" for any solid unit, so the product's own dose form names it; a
        # drop is a different kind of unit, and a per-tablet strength says nothing about a drop.
        if product.form and "drop" in (dose.unit, product.form) and dose.unit != product.form:
            return words["form_mismatch"].format(unit=dose.unit, form=product.form)
        per_dose = dose.value * ingredient.strength
        detail = words["count_one" if dose.value == 1 else "count_many"].format(
            count=fmt(dose.value),
            noun=product.form or dose.unit,
            strength=fmt(ingredient.strength),
            unit=category.unit,
        )
    else:
        factor = catalog.factor(ingredient.category, dose.unit)
        if factor is None:
            return words["unit_not_for"].format(unit=quote(dose.unit), label=category.label)
        # A dose in an amount unit names one ingredient only; for a combination it is that ingredient's
        # dose only if no other ingredient could also be measured in it (IU: vitamin D; mcg: ambiguous).
        others = [i for i in product.ingredients if i is not ingredient]
        if any(catalog.factor(o.category, dose.unit) is not None for o in others):
            return words["combination_split"].format(unit=dose.unit)
        per_dose = dose.value * factor
        if dose.unit != category.unit:
            detail = words["amount_converted"].format(
                amount=fmt(dose.value), unit=dose.unit, converted=fmt(per_dose), canonical=category.unit
            )
        else:
            detail = words["amount"].format(amount=fmt(dose.value), unit=dose.unit)
    if dose.note:
        detail += f" {dose.note}"
    detail += f" {_schedule_words(schedule, words)}"
    per_period = per_dose * schedule.frequency
    daily = per_period * 24 / (schedule.period * catalog.period_hours[schedule.unit])
    period = schedule.unit if schedule.period == 1 and schedule.unit in ("wk", "mo", "a") else "d"
    if period == "d":
        per_period = daily
    lead = words["lead"].format(unit=category.unit, period=_noun(period, words))
    return _Amount(per_period, daily, lead, period, detail)


def ingredient_dose(
    ingredient: ProductIngredient,
    product: Product,
    dosages: Sequence[Dosage | str],
    catalog: MedicationCatalog,
    words: Words,
) -> IngredientDose:
    unit = catalog.by_category[ingredient.category].unit
    strength = float(ingredient.strength) if ingredient.strength is not None else None

    def result(
        daily: Decimal | None, arithmetic: str, basis: str, lead: str = "", period: str = ""
    ) -> IngredientDose:
        return IngredientDose(
            concept=ingredient.category,
            name=ingredient.name,
            strength=strength,
            unit=unit,
            daily=float(daily) if daily is not None else None,
            weekly=float(daily * 7) if daily is not None else None,
            arithmetic=arithmetic,
            basis=basis,
            matched_by=ingredient.matched_by,
            lead=lead,
            lead_period=period,
        )

    if not dosages:
        return result(None, words["unknown"].format(reason=words["no_dosage"]), "unknown")
    amounts: list[_Amount] = []
    for i, dosage in enumerate(dosages):
        found = dosage if isinstance(dosage, str) else _amount(ingredient, product, dosage, catalog, words)
        if isinstance(found, str):
            reason = words["of_several"].format(number=i + 1, reason=found) if len(dosages) > 1 else found
            return result(None, words["unknown"].format(reason=reason), "unknown")
        amounts.append(found)
    bases = {d.basis for d in dosages if isinstance(d, Dosage)}
    basis = "text" if "text" in bases else "structured"
    if len(amounts) == 1:
        only = amounts[0]
        lead = f"{fmt(only.per_period)} {only.lead}"
        arithmetic = words["arithmetic"].format(
            amount=fmt(only.per_period), lead=only.lead, detail=only.detail
        )
        return result(only.daily, arithmetic, basis, lead, only.period)
    # Several dosage instructions are summed. FHIR may mean them in sequence (a loading course, then
    # maintenance); the sum is the highest possible daily intake, so a high-dose card errs on the safe side.
    daily = sum((a.daily for a in amounts), Decimal(0))
    parts = " + ".join(
        words["summed_part"].format(daily=fmt(a.daily), unit=unit, detail=a.detail) for a in amounts
    )
    lead = words["lead"].format(unit=unit, period=_noun("d", words))
    arithmetic = words["summed"].format(total=fmt(daily), unit=unit, parts=parts)
    return result(daily, arithmetic, basis, f"{fmt(daily)} {lead}", "d")
