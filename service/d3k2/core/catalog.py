"""The medication catalog (cards/medications.toml): which value set means which ingredient, unit
spellings and conversions, dosing periods and timing codes. Loaded and checked once at startup.

Pure: no Flask, no requests. The clinical data lives in the TOML file; the readers of medications and doses
(``medications``, ``dosage``) hold only the grammar.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from d3k2.core.errors import RuleSetError
from d3k2.core.terminology import Terminology


@dataclass(frozen=True)
class Conversion:
    factor: Decimal
    source: str


@dataclass(frozen=True)
class Category:
    id: str
    label: str
    unit: str
    names: Mapping[str, tuple[str, ...]]
    convert: Mapping[str, Conversion]
    fact: str | None = None  # the rules' fact that is true while one is current ("vka.active")


@dataclass(frozen=True)
class TimingCode:
    frequency: Decimal
    period: Decimal
    period_unit: str


@dataclass(frozen=True)
class MedicationCatalog:
    valuesets: Mapping[str, tuple[str, ...]]
    by_category: Mapping[str, Category]
    units: Mapping[str, str]
    count_units: Mapping[str, str]
    period_hours: Mapping[str, Decimal]
    timing_codes: Mapping[str, TimingCode]
    # (pattern, category id, ingredient name), longest pattern first so "vitamin d3" beats "vitamin d".
    name_patterns: tuple[tuple[re.Pattern[str], str, str], ...]

    def categories(self) -> tuple[str, ...]:
        """Category ids in file order ("vitamin-d", "vitamin-k2", ...)."""
        return tuple(self.by_category)

    def factor(self, category: str, unit: str) -> Decimal | None:
        """Factor from `unit` (already normalised, e.g. "mcg") into the category's canonical unit."""
        cat = self.by_category[category]
        if unit == cat.unit:
            return Decimal(1)
        conversion = cat.convert.get(unit)
        return conversion.factor if conversion else None

    def unit_of(self, spelling: str) -> str | None:
        return self.units.get(spelling.strip().lower())

    def count_noun(self, spelling: str) -> str | None:
        return self.count_units.get(spelling.strip().lower())

    def match_name(self, words: str) -> tuple[str, str] | None:
        """(category, ingredient name) for the ingredient words of a product name, or None."""
        lowered = words.lower()
        for pattern, category, name in self.name_patterns:
            if pattern.search(lowered):
                return category, name
        return None


_TOP_KEYS = {"valuesets", "categories", "units", "count_units", "period_units", "timing_codes"}
_CATEGORY_KEYS = {"label", "unit", "names", "convert"}
_CATEGORY_OPTIONAL = {"fact"}
_CONVERSION_KEYS = {"factor", "source"}
_TIMING_KEYS = {"frequency", "period", "period_unit"}


class _Loader:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, message: str) -> RuleSetError:
        return RuleSetError(f"{self.path.name}: {where}: {message}", file=str(self.path), field=where)

    def table(
        self, value: object, where: str, keys: set[str] | None = None, optional: set[str] | None = None
    ) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, "must be a table")
        if keys is not None:
            unknown = sorted(set(value) - keys - (optional or set()))
            if unknown:
                raise self.fail(f"{where}.{unknown[0]}", "unknown key")
            missing = sorted(keys - set(value))
            if missing:
                raise self.fail(f"{where}.{missing[0]}", "missing")
        return value

    def text(self, value: object, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, "must be a non-empty string")
        return value

    def number(self, value: object, where: str) -> Decimal:
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise self.fail(where, "must be a positive number")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(where, "must be a positive number")
        return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)

    def text_list(self, value: object, where: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(where, "must be a non-empty list of strings")
        return tuple(self.text(item, f"{where}[{i}]") for i, item in enumerate(value))

    def spellings(self, value: object, where: str) -> dict[str, str]:
        """A spelling → value table whose keys are compared case-insensitively."""
        result: dict[str, str] = {}
        for key, target in self.table(value, where).items():
            target_text = self.text(target, f"{where}.{key}")
            folded = key.strip().lower()
            if not folded or folded in result:
                raise self.fail(f"{where}.{key}", "empty or duplicate spelling (keys are case-insensitive)")
            result[folded] = target_text
        return result

    def load(self) -> MedicationCatalog:
        try:
            doc = tomllib.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise self.fail("(file)", f"not readable TOML: {exc}") from exc
        self.table(doc, "(top level)", _TOP_KEYS)

        units = self.spellings(doc["units"], "units")
        unit_values = set(units.values())
        count_units = self.spellings(doc["count_units"], "count_units")
        overlap = sorted(set(units) & set(count_units))
        if overlap:
            raise self.fail(f"count_units.{overlap[0]}", "also listed under units")

        period_hours = {
            key: self.number(value, f"period_units.{key}")
            for key, value in self.table(doc["period_units"], "period_units").items()
        }

        timing_codes: dict[str, TimingCode] = {}
        for code, raw in self.table(doc["timing_codes"], "timing_codes").items():
            where = f"timing_codes.{code}"
            entry = self.table(raw, where, _TIMING_KEYS)
            period_unit = self.text(entry["period_unit"], f"{where}.period_unit")
            if period_unit not in period_hours:
                raise self.fail(f"{where}.period_unit", "must be a key of period_units")
            if code.upper() in timing_codes:
                raise self.fail(where, "duplicate code (codes are case-insensitive)")
            timing_codes[code.upper()] = TimingCode(
                self.number(entry["frequency"], f"{where}.frequency"),
                self.number(entry["period"], f"{where}.period"),
                period_unit,
            )

        categories: dict[str, Category] = {}
        patterns: list[tuple[str, str, str]] = []
        seen_patterns: dict[str, str] = {}
        seen_facts: dict[str, str] = {}
        for cat_id, raw in self.table(doc["categories"], "categories").items():
            where = f"categories.{cat_id}"
            entry = self.table(raw, where, _CATEGORY_KEYS, _CATEGORY_OPTIONAL)
            fact = self.text(entry["fact"], f"{where}.fact") if "fact" in entry else None
            if fact is not None:
                if fact in seen_facts:
                    raise self.fail(f"{where}.fact", f"also the fact of {seen_facts[fact]}")
                seen_facts[fact] = where
            unit = self.text(entry["unit"], f"{where}.unit")
            if unit not in unit_values:
                raise self.fail(f"{where}.unit", "must be one of the values of [units]")
            names: dict[str, tuple[str, ...]] = {}
            for name, raw_patterns in self.table(entry["names"], f"{where}.names").items():
                found = self.text_list(raw_patterns, f"{where}.names.{name}")
                for i, pattern in enumerate(found):
                    if pattern != pattern.lower():
                        raise self.fail(f"{where}.names.{name}[{i}]", "patterns must be lower case")
                    if pattern in seen_patterns:
                        raise self.fail(
                            f"{where}.names.{name}[{i}]", f"also listed under {seen_patterns[pattern]}"
                        )
                    seen_patterns[pattern] = f"{where}.names.{name}"
                    patterns.append((pattern, cat_id, name))
                names[name] = found
            convert: dict[str, Conversion] = {}
            for from_unit, raw_conv in self.table(entry["convert"], f"{where}.convert").items():
                conv_where = f"{where}.convert.{from_unit}"
                if from_unit not in unit_values or from_unit == unit:
                    raise self.fail(conv_where, "must be a value of [units] other than the category's unit")
                conv = self.table(raw_conv, conv_where, _CONVERSION_KEYS)
                convert[from_unit] = Conversion(
                    self.number(conv["factor"], f"{conv_where}.factor"),
                    self.text(conv["source"], f"{conv_where}.source"),
                )
            categories[cat_id] = Category(
                cat_id, self.text(entry["label"], f"{where}.label"), unit, names, convert, fact
            )

        valuesets: dict[str, tuple[str, ...]] = {}
        for vs_id, raw in self.table(doc["valuesets"], "valuesets").items():
            cats = self.text_list(raw, f"valuesets.{vs_id}")
            for i, cat in enumerate(cats):
                if cat not in categories:
                    raise self.fail(f"valuesets.{vs_id}[{i}]", f"unknown category {cat!r}")
            valuesets[vs_id] = cats

        patterns.sort(key=lambda p: -len(p[0]))
        return MedicationCatalog(
            valuesets=valuesets,
            by_category=categories,
            units=units,
            count_units=count_units,
            period_hours=period_hours,
            timing_codes=timing_codes,
            name_patterns=tuple(
                (re.compile(rf"(?<![a-z0-9]){re.escape(p)}(?![a-z0-9])"), cat, name)
                for p, cat, name in patterns
            ),
        )


def load_medication_catalog(path: Path, terminology: Terminology | None = None) -> MedicationCatalog:
    """Parse cards/medications.toml once at startup; with `terminology`, also check the value-set ids."""
    catalog = _Loader(path).load()
    if terminology is not None:
        for vs_id in catalog.valuesets:
            if vs_id not in terminology.valuesets:
                raise _Loader(path).fail(f"valuesets.{vs_id}", "no such value set in cards/valuesets")
    return catalog
