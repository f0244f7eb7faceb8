"""The words cards put around the data (cards/texts.toml), read and checked once at startup (pure).

Every key is required and no other is allowed, and a text may use only the {placeholders} named here: a
missing key or a stray placeholder stops startup naming the file and the key, not the first card using it.
"""

from __future__ import annotations

import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d3k2.core.errors import RuleSetError


@dataclass(frozen=True)
class Texts:
    none: str  # an empty list of names, evidence or data problems
    not_on_record: str  # a measurement's value when there is none
    no_date: str  # ... and its date
    stale: str  # after a stale measurement's date; {days}
    daily_dose: str  # a draft's daily dose; {amount} {unit}
    weekly_dose: str  # ... a weekly one; {amount} {unit}
    unknown_dose: str
    lab_limit: str  # where the calcium upper limit came from: the lab's range
    default_limit: str  # ... or the default
    thresholds: str  # appended to the detail of a card that reads 25(OH)D; {title} of the profile
    vitd_line: str  # {vitd.line}: the newest 25(OH)D in one phrase; {shown} {date} {notes} {band} {stale}
    vitd_none: str  # ... when there is none
    evidence_dated: str  # a condition or observation on record with its date; {text} {date}
    from_statement: str  # where a medication is on record: a MedicationStatement
    from_request: str  # ... a MedicationRequest
    by_name: str  # a medication recognised by its name only, not a code (CLINICAL.md 5); {name}
    line: str  # {egfr.line}, {calcium.line}: a measurement in one phrase; {shown} {date} {stale} {notes}
    line_none: str  # ... when there is none
    brief: str  # {*.brief}: the same for a summary; {shown} {date}
    brief_none: str
    vitd_no_band: str  # {vitd.band} when there is no result
    above_range: str  # why a band is not certain: the lab reported a bound (">100"), not a number
    below_range: str
    could_be: str  # an eGFR that straddles bands; {bands}
    grade: str  # {calcium.grade}; {label} of the hypercalcemia grade
    ungraded: str  # ... a kind of calcium the grades are not for; {kind}
    current_unknown: str  # {current_d.daily} of several products, one dose unknown; {doses}
    current_total: str  # ... all known; {total} {doses}
    data_not_used: str  # the data card: what was not used; {problems}
    data_copies: str  # ... records sent as different copies; {records}
    data_unknown: str  # ... medications of unknown kind; {medications}
    unknown_medication: str  # one of them; {name} {where} {reason}
    unnamed_medication: str  # ... without a name
    data_skipped: str  # ... the checks not made; {checks}
    smart_link: str  # the label of a card's link to the "Why this card?" SMART app
    # Words for data problems the fact readers name on the data card ([notes]).
    notes: Mapping[str, str]
    # A prefetch key (services.toml) → the check not made without it ([skipped]); checked by the loader.
    skipped: Mapping[str, str]
    # UCUM code of a suggested dose → the unit word of its doseQuantity (other codes are shown as they are).
    units: Mapping[str, str]
    # Why prefetch data could not be had, on the data card ([fetch]; keys and placeholders: FETCH).
    fetch: Mapping[str, str]
    # The words of an order set's vitamin D ([doses]; keys and placeholders: DOSES).
    doses: Mapping[str, str]
    # The words of a dose's arithmetic and of why it is unknown ([dosage]; keys and placeholders: DOSAGE).
    dosage: Mapping[str, str]
    # {age.ceiling}: Holick 2011's supervised treatment ceiling for the patient's age band ([ceilings]; keys:
    # the age bands of facts.toml and "unknown").
    ceilings: Mapping[str, str]


# [ceilings] keys: every value of the fact age.band (cards/vocabulary.toml).
CEILINGS = ("infant", "child", "adolescent", "adult", "unknown")

# [cards] key → the placeholders its text must use.
PLACEHOLDERS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "not_on_record": frozenset(),
    "no_date": frozenset(),
    "stale": frozenset({"days"}),
    "daily_dose": frozenset({"amount", "unit"}),
    "weekly_dose": frozenset({"amount", "unit"}),
    "unknown_dose": frozenset(),
    "lab_limit": frozenset(),
    "default_limit": frozenset({"kind"}),
    "thresholds": frozenset({"title"}),
    "vitd_line": frozenset({"shown", "date", "notes", "band", "stale"}),
    "vitd_none": frozenset(),
    "evidence_dated": frozenset({"text", "date"}),
    "from_statement": frozenset(),
    "by_name": frozenset({"name"}),
    "from_request": frozenset(),
    "line": frozenset({"shown", "date", "stale", "notes"}),
    "line_none": frozenset(),
    "brief": frozenset({"shown", "date"}),
    "brief_none": frozenset(),
    "vitd_no_band": frozenset(),
    "above_range": frozenset(),
    "below_range": frozenset(),
    "could_be": frozenset({"bands"}),
    "grade": frozenset({"label"}),
    "ungraded": frozenset({"kind"}),
    "current_unknown": frozenset({"doses"}),
    "current_total": frozenset({"total", "doses"}),
    "data_not_used": frozenset({"problems"}),
    "data_copies": frozenset({"records"}),
    "data_unknown": frozenset({"medications"}),
    "unknown_medication": frozenset({"name", "where", "reason"}),
    "unnamed_medication": frozenset(),
    "data_skipped": frozenset({"checks"}),
    "smart_link": frozenset(),
}

# [notes] key → its placeholders: what the fact readers say about a value or a record they did not use.
NOTES: dict[str, frozenset[str]] = {
    "preliminary": frozenset(),
    "d3_only": frozenset(),
    "d3_plus_d2": frozenset(),
    "legacy_equation": frozenset(),
    "same_specimen_lowest": frozenset(),
    "conflicting_copies": frozenset(),
    "race_coefficient_removed": frozenset({"coefficient"}),
    "race_coefficient_listed": frozenset({"reported", "value"}),
    "pregnancy_stale": frozenset({"what", "date", "days"}),
    "pregnancy_superseded": frozenset({"date", "newer"}),
    "pregnancy_status": frozenset(),
    "pregnancy_status_evidence": frozenset(),
    "lactation_stale": frozenset({"what", "date", "days"}),
    "lactation_superseded": frozenset({"date", "newer"}),
    "lactation_status": frozenset(),
    "lactation_status_evidence": frozenset(),
    "condition_named": frozenset({"text"}),
    "condition_unnamed": frozenset(),
    "dated": frozenset({"what", "date"}),
    "condition_dated": frozenset({"what", "date"}),
    "future": frozenset({"what"}),
    "implausible": frozenset({"what", "shown", "reason"}),
    "not_used": frozenset({"what", "reason"}),
    "undated_result": frozenset({"lab"}),
    "record_observation": frozenset(),
    "record_condition": frozenset(),
    "record_medicationstatement": frozenset(),
    "record_medicationrequest": frozenset(),
    "record_patient": frozenset(),
    "record_other": frozenset(),
    "no_date": frozenset(),
    "unreadable": frozenset(),
    "value_not_number": frozenset(),
    "no_unit": frozenset(),
    "ambiguous_number": frozenset(),
    "no_value": frozenset(),
    "comparator_unknown": frozenset({"detail"}),
    "unit_unknown": frozenset({"detail"}),
    "medication_not_found": frozenset(),
    "medication_no_code": frozenset(),
    "status_unknown": frozenset(),
    "dose_not_read": frozenset(),
}


# [fetch] key → its placeholders: a prefetch key not had in full, as the data card names it
# (d3k2.fhir.prefetch).
FETCH: dict[str, frozenset[str]] = {
    "no_server": frozenset({"label", "reason"}),
    "not_fetched": frozenset({"label", "reason"}),
    "not_prefetched": frozenset(),
    "ehr_sent": frozenset({"failure"}),
    "server_sent": frozenset({"failure"}),
    "in_part": frozenset({"reason"}),
    "part_used": frozenset({"reason"}),
    "nothing": frozenset(),
    "operation_outcome": frozenset(),
    "bundle_error": frozenset(),
    "bundle_error_codes": frozenset({"codes"}),
    "and_pages": frozenset({"error", "pages"}),
    "first_page": frozenset(),
    "first_page_of": frozenset({"count", "total"}),
    "not_resource": frozenset({"label"}),
    "first_pages_read": frozenset({"label"}),
}

# [doses] key → its placeholders: an order set's vitamin D in all (d3k2.core.orderset).
DOSES: dict[str, frozenset[str]] = {
    "in_all": frozenset({"total"}),
    "at_least": frozenset({"total"}),
    "set_total": frozenset({"total", "parts"}),
    "set_part": frozenset({"name", "dose"}),
    "set_on_record": frozenset({"name", "dose"}),
}


_NONE: frozenset[str] = frozenset()

# [dosage] key → its placeholders: a dose's arithmetic and why it is unknown (d3k2.core.dosage).
DOSAGE: dict[str, frozenset[str]] = {
    "arithmetic": frozenset({"amount", "lead", "detail"}),
    "lead": frozenset({"unit", "period"}),
    "summed": frozenset({"total", "unit", "parts"}),
    "summed_part": frozenset({"daily", "unit", "detail"}),
    "count_one": frozenset({"count", "noun", "strength", "unit"}),
    "count_many": frozenset({"count", "noun", "strength", "unit"}),
    "amount": frozenset({"amount", "unit"}),
    "amount_converted": frozenset({"amount", "unit", "converted", "canonical"}),
    "range_used": frozenset({"range"}),
    "range_between": frozenset({"low", "high"}),
    "range_up_to": frozenset({"high"}),
    "frequency_max_used": frozenset({"times"}),
    "once": _NONE,
    "twice": _NONE,
    "thrice": _NONE,
    "four_times": _NONE,
    "times": frozenset({"count"}),
    "each_period": frozenset({"times", "adverb"}),
    "every_periods": frozenset({"period", "noun"}),
    "times_every_periods": frozenset({"times", "period", "noun"}),
    "per_period": frozenset({"noun"}),
    **{f"{kind}_{unit}": _NONE for kind in ("noun", "adverb") for unit in ("h", "d", "wk", "mo", "a")},
    "count_unit": _NONE,
    "basis_structured": _NONE,
    "basis_text": _NONE,
    "basis_unknown": _NONE,
    "unknown": frozenset({"reason"}),
    "of_several": frozenset({"number", "reason"}),
    "no_dosage": _NONE,
    "dosage_not_readable": _NONE,
    "no_dose_quantity": _NONE,
    "no_timing": _NONE,
    "quantity_not_readable": _NONE,
    "value_not_understood": frozenset({"value"}),
    "quantity_no_unit": _NONE,
    "unit_not_understood": frozenset({"unit"}),
    "range_no_high": _NONE,
    "period_unit_not_understood": frozenset({"unit"}),
    "frequency_not_understood": frozenset({"value"}),
    "period_not_understood": frozenset({"value"}),
    "timing_code_not_understood": _NONE,
    "timing_no_period_unit": _NONE,
    "text_zero_dose": _NONE,
    "text_no_dose": _NONE,
    "text_zero_interval": _NONE,
    "text_zero_frequency": _NONE,
    "text_no_frequency": _NONE,
    "text_timing_conflict": frozenset({"text", "timing"}),
    "strength_unknown": frozenset({"name"}),
    "form_mismatch": frozenset({"unit", "form"}),
    "unit_not_for": frozenset({"unit", "label"}),
    "combination_split": frozenset({"unit"}),
}


def _fail(path: Path, key: str, message: str) -> RuleSetError:
    return RuleSetError(f"{path.name}: {key}: {message}", file=str(path), field=key)


def _table(value: object, path: Path, key: str, keys: set[str] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, key, "missing or not a table")
    if keys is not None:
        for name in sorted(keys - set(value)):
            raise _fail(path, f"{key}.{name}" if key else name, "missing")
        for name in sorted(set(value) - keys):
            raise _fail(path, f"{key}.{name}" if key else name, "unknown key")
    return value


def _texts_of(
    doc: Mapping[str, Any], path: Path, name: str, wanted: Mapping[str, frozenset[str]]
) -> dict[str, str]:
    """The table ``name``: exactly the keys of ``wanted``, each a text with exactly its placeholders."""
    table = _table(doc[name], path, name, set(wanted))
    return {key: _text(table[key], path, f"{name}.{key}", places) for key, places in wanted.items()}


def _text(value: object, path: Path, key: str, placeholders: frozenset[str]) -> str:
    if not isinstance(value, str):
        raise _fail(path, key, "must be a string")
    try:
        used = {name for _lit, name, _spec, _conv in string.Formatter().parse(value) if name is not None}
    except ValueError as exc:
        raise _fail(path, key, f"not a valid text template: {exc}") from exc
    if used != placeholders:
        wanted = ", ".join(f"{{{p}}}" for p in sorted(placeholders)) or "no placeholders"
        raise _fail(path, key, f"must use {wanted}, uses {sorted(used)}")
    return value


def load_texts(path: Path) -> Texts:
    try:
        with path.open("rb") as handle:
            doc = tomllib.load(handle)
    except FileNotFoundError as exc:
        raise RuleSetError(f"{path.name}: file missing", file=str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise RuleSetError(f"{path.name}: not valid TOML: {exc}", file=str(path)) from exc
    _table(doc, path, "", {"cards", "notes", "skipped", "units", "fetch", "doses", "dosage", "ceilings"})
    cards = _table(doc["cards"], path, "cards", set(PLACEHOLDERS))
    notes = _texts_of(doc, path, "notes", NOTES)
    skipped = {
        str(key): _text(text, path, f"skipped.{key}", frozenset())
        for key, text in _table(doc["skipped"], path, "skipped").items()
    }
    units = {
        str(code): _text(word, path, f"units.{code}", frozenset())
        for code, word in _table(doc["units"], path, "units").items()
    }
    fetch = _texts_of(doc, path, "fetch", FETCH)
    doses = _texts_of(doc, path, "doses", DOSES)
    dosage = _texts_of(doc, path, "dosage", DOSAGE)
    ceilings = _texts_of(doc, path, "ceilings", dict.fromkeys(CEILINGS, frozenset()))
    texts = {key: _text(cards[key], path, f"cards.{key}", wanted) for key, wanted in PLACEHOLDERS.items()}
    return Texts(
        **texts,
        notes=notes,
        skipped=skipped,
        units=units,
        fetch=fetch,
        doses=doses,
        dosage=dosage,
        ceilings=ceilings,
    )
