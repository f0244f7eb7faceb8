"""The patient's age at the request's "today", from Patient.birthDate. Pure: no clock.

Sections 3 and 6 of CLINICAL.md are adult advice; children have lower ceilings. A patient whose age
cannot be known is "unknown", never "adult", so that no adult dose reaches a child by default.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

UNKNOWN = "unknown"


@dataclass(frozen=True)
class AgeConfig:
    # (band id, youngest age in whole months), ascending by age.
    bands: tuple[tuple[str, int], ...]
    # Older than any person has lived: the birthDate is taken as wrong, not as a very old adult.
    max_years: int


@dataclass(frozen=True)
class Age:
    band: str
    months: int | None = None
    birth_date: str | None = None  # as sent
    why_unknown: str = ""


NOT_ON_RECORD = Age(UNKNOWN, why_unknown="no birth date on record")


def whole_months(birth: date, today: date) -> int:
    """Completed months from `birth` to `today` (a month completes on the same day of the month, or on
    the month's last day when it has no such day)."""
    months = (today.year - birth.year) * 12 + (today.month - birth.month)
    last_day = calendar.monthrange(today.year, today.month)[1]
    if today.day < min(birth.day, last_day):
        months -= 1
    return months


def _possible_days(text: str) -> tuple[date, date] | None:
    """(earliest, latest) day a FHIR date can mean: "1990" is any day of 1990."""
    try:
        if len(text) == 4:
            year = int(text)
            return date(year, 1, 1), date(year, 12, 31)
        if len(text) == 7 and text[4] == "-":
            year, month = int(text[:4]), int(text[5:7])
            return date(year, month, 1), date(year, month, calendar.monthrange(year, month)[1])
        if len(text) == 10:
            day = date.fromisoformat(text)
            return day, day
    except ValueError:
        return None
    return None


def band_of_months(months: int, config: AgeConfig) -> str:
    band = UNKNOWN
    for name, youngest in config.bands:
        if months >= youngest:
            band = name
    return band


def read_age(patients: Iterable[Mapping[str, Any]], today: date, config: AgeConfig) -> Age:
    """The age of the request's patient. A partial birthDate gives the youngest age it allows: a dose
    safe for the younger age is safe for the older one."""
    sent = sorted({p["birthDate"] for p in patients if isinstance(p.get("birthDate"), str)})
    if not sent:
        return NOT_ON_RECORD
    if len(sent) > 1:
        return Age(UNKNOWN, why_unknown="birth dates on record disagree")
    text = sent[0]
    days = _possible_days(text.strip())
    if days is None:
        return Age(UNKNOWN, birth_date=text, why_unknown="birth date cannot be read")
    earliest, latest = days
    if earliest > today:
        return Age(UNKNOWN, birth_date=text, why_unknown="birth date is in the future")
    months = whole_months(min(latest, today), today)
    if months >= config.max_years * 12:
        return Age(UNKNOWN, birth_date=text, why_unknown="birth date is implausibly long ago")
    return Age(band_of_months(months, config), months, text)
