"""Small readers of FHIR JSON shared by the lab and record readers: texts, references, dates and codes.
Pure: no Flask, no requests, no clock."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime
from typing import Any

from d3k2.core.terminology import LOINC, normalise_system, spellings

# Every system text that means LOINC (checked on each coding of each Observation).
_LOINC_SPELLINGS = spellings(LOINC)


class Unreadable(Exception):
    """One resource (or one field the rules need) cannot be read: `key` names why (a texts.toml [notes]
    key), `detail` what was not understood (a unit, a comparator); never patient data."""

    def __init__(self, key: str, detail: str = "") -> None:
        super().__init__(f"{key}: {detail}" if detail else key)
        self.key = key
        self.detail = detail


def nonempty_str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def ref_of(resource: Mapping[str, Any]) -> str:
    rtype = nonempty_str(resource.get("resourceType")) or "Resource"
    rid = nonempty_str(resource.get("id"))
    return f"{rtype}/{rid}" if rid else f"{rtype}/(no id)"


def parse_date(value: object) -> date | None:
    """A FHIR date/dateTime/instant → its calendar date; partial dates take their first day."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    try:
        if len(text) == 4:
            return date(int(text), 1, 1)
        if len(text) == 7:
            return date(int(text[:4]), int(text[5:7]), 1)
        if len(text) == 10:
            return date.fromisoformat(text)
        return datetime.fromisoformat(text.replace("Z", "+00:00")).date()
    except ValueError:
        return None


def effective_text(resource: Mapping[str, Any]) -> str | None:
    """The first usable of effective[x] (period: its end) and issued, as sent."""
    period = resource.get("effectivePeriod")
    period = period if isinstance(period, Mapping) else {}
    for value in (
        resource.get("effectiveDateTime"),
        resource.get("effectiveInstant"),
        period.get("end"),
        period.get("start"),
        resource.get("issued"),
    ):
        if parse_date(value) is not None:
            return str(value)
    return None


def observation_date(resource: Mapping[str, Any]) -> date | None:
    return parse_date(effective_text(resource))


def instant(text: str, day: date) -> datetime:
    """A sortable moment (in UTC) of a result on `day`: its time when given, else midnight; a time
    without an offset is taken as UTC."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return datetime(day.year, day.month, day.day, tzinfo=UTC)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def loinc_codes(resource: Mapping[str, Any]) -> tuple[str, ...]:
    code = resource.get("code")
    codings = code.get("coding") if type(code) is dict or isinstance(code, Mapping) else None
    if not isinstance(codings, list):
        return ()
    found: tuple[str, ...] = ()
    for coding in codings:
        if type(coding) is dict or isinstance(coding, Mapping):
            value = coding.get("code")
            if isinstance(value, str):
                system = coding.get("system", "")
                if (
                    system in _LOINC_SPELLINGS
                    if type(system) is str
                    else normalise_system(str(system)) == LOINC
                ):
                    found += (value,)
    return found


def codeable_text(codeable: Mapping[str, Any]) -> str:
    """Text of a CodeableConcept a value set matched: it is an object and its `coding` a list."""
    text = nonempty_str(codeable.get("text"))
    if text:
        return text
    for coding in codeable["coding"]:
        if isinstance(coding, Mapping) and nonempty_str(coding.get("display")):
            return str(coding["display"])
    return ""


def medication_text(codeable: object) -> str:
    """The name a medication CodeableConcept gives itself: its text, else a coding's display."""
    if not isinstance(codeable, Mapping):
        return ""
    codings = codeable.get("coding")
    displays = (
        [c.get("display") for c in codings if isinstance(c, Mapping)] if isinstance(codings, list) else []
    )
    return next((t for t in (codeable.get("text"), *displays) if isinstance(t, str) and t), "")


def status_code(codeable: object) -> str | None:
    """R4 CodeableConcept status (Condition.clinicalStatus); also the R3/DSTU2 plain string."""
    if isinstance(codeable, str):
        return codeable
    if isinstance(codeable, Mapping):
        codings = codeable.get("coding")
        if isinstance(codings, list):
            for coding in codings:
                if isinstance(coding, Mapping) and isinstance(coding.get("code"), str):
                    return str(coding["code"])
    return None
