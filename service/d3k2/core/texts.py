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
    unknown_dose: str
    lab_limit: str  # where the calcium upper limit came from: the lab's range
    default_limit: str  # ... or the default
    thresholds: str  # appended to the detail of a card that reads 25(OH)D; {title} of the profile
    vitd_line: str  # {vitd.line}: the newest 25(OH)D in one phrase; {shown} {date} {notes} {band} {stale}
    vitd_none: str  # ... when there is none
    evidence_dated: str  # a condition or observation on record with its date; {text} {date}
    from_statement: str  # where a medication is on record: a MedicationStatement
    from_request: str  # ... a MedicationRequest
    smart_link: str  # the label of a card's link to the "Why this card?" SMART app
    # UCUM code of a suggested dose → the unit word of its doseQuantity (other codes are shown as they are).
    units: Mapping[str, str]


# [cards] key → the placeholders its text must use.
PLACEHOLDERS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "not_on_record": frozenset(),
    "no_date": frozenset(),
    "stale": frozenset({"days"}),
    "daily_dose": frozenset({"amount", "unit"}),
    "unknown_dose": frozenset(),
    "lab_limit": frozenset(),
    "default_limit": frozenset({"kind"}),
    "thresholds": frozenset({"title"}),
    "vitd_line": frozenset({"shown", "date", "notes", "band", "stale"}),
    "vitd_none": frozenset(),
    "evidence_dated": frozenset({"text", "date"}),
    "from_statement": frozenset(),
    "from_request": frozenset(),
    "smart_link": frozenset(),
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
    _table(doc, path, "", {"cards", "units"})
    cards = _table(doc["cards"], path, "cards", set(PLACEHOLDERS))
    units = {
        str(code): _text(word, path, f"units.{code}", frozenset())
        for code, word in _table(doc["units"], path, "units").items()
    }
    texts = {key: _text(cards[key], path, f"cards.{key}", wanted) for key, wanted in PLACEHOLDERS.items()}
    return Texts(**texts, units=units)
