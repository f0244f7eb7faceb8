"""Lenient reading of CDS Hooks ``draftOrders`` and the daily-dose arithmetic behind order cards.

Pure: no Flask, no requests. The CDS Hooks sandbox and real EHRs send invalid FHIR (see
shared/sandbox/README.md, "Quirks"), so every reader here accepts any JSON-shaped value and reports what
it could not use instead of raising. Clinical data (which value set means which ingredient, unit
conversions, timing codes) lives in cards/medications.toml; this module holds only the grammar.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, TypeGuard

from d3k2.core.errors import RuleSetError
from d3k2.core.terminology import RXNORM, Terminology, normalise_system

# --------------------------------------------------------------------------------------------------
# Public result types


@dataclass(frozen=True)
class Ingredient:
    """One ingredient of a medication, without any dose (also used for the patient's medication list)."""

    concept: str
    name: str
    strength: float | None
    unit: str
    matched_by: str


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


@dataclass(frozen=True)
class DraftOrder:
    reference: str
    resource_type: str
    id: str | None
    medication_text: str | None
    rxnorm_code: str | None
    ingredients: tuple[IngredientDose, ...]
    problems: tuple[str, ...]


@dataclass(frozen=True)
class DraftReading:
    orders: tuple[DraftOrder, ...]
    skipped: tuple[str, ...]


# --------------------------------------------------------------------------------------------------
# Catalog (cards/medications.toml)


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
_CONVERSION_KEYS = {"factor", "source"}
_TIMING_KEYS = {"frequency", "period", "period_unit"}


class _Loader:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, message: str) -> RuleSetError:
        return RuleSetError(f"{self.path.name}: {where}: {message}", file=str(self.path), field=where)

    def table(self, value: object, where: str, keys: set[str] | None = None) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, "must be a table")
        if keys is not None:
            unknown = sorted(set(value) - keys)
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
        for cat_id, raw in self.table(doc["categories"], "categories").items():
            where = f"categories.{cat_id}"
            entry = self.table(raw, where, _CATEGORY_KEYS)
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
                cat_id, self.text(entry["label"], f"{where}.label"), unit, names, convert
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


# --------------------------------------------------------------------------------------------------
# Small lenient readers


def _number(value: object) -> Decimal | None:
    """A finite positive number; numeric strings are accepted because some EHRs quote numbers."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            return None
        result = Decimal(repr(value))
    elif isinstance(value, str) and len(value) <= 30 and re.fullmatch(r"\s*\d+(\.\d+)?\s*", value):
        result = Decimal(value.strip())
    else:
        return None
    return result if result > 0 else None


def _is_map(value: object) -> TypeGuard[Mapping[str, Any]]:
    # The exact-dict test first: JSON objects are dicts, and an ABC check costs several times more.
    return type(value) is dict or isinstance(value, Mapping)


def _as_list(value: object) -> list[object]:
    """FHIR arrays sent as a single object (the sandbox does this for category and reasonCode)."""
    if isinstance(value, list):
        return value
    if value is None:
        return []
    return [value]


def _dicts(value: object) -> list[Mapping[str, Any]]:
    return [item for item in _as_list(value) if _is_map(item)]


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _quote(value: object) -> str:
    """A short, quoted echo of a rejected value (units, dates, codes: never free text)."""
    text = value if isinstance(value, str) else type(value).__name__
    return repr(text[:30] + "…" if len(text) > 30 else text)


def _fmt(value: Decimal) -> str:
    if value == value.to_integral_value():
        return f"{value:,.0f}"
    if abs(value) < Decimal("0.01"):
        return f"{value:.2g}"
    return f"{value:,.2f}".rstrip("0").rstrip(".")


# --------------------------------------------------------------------------------------------------
# Which medication


@dataclass(frozen=True)
class _Ingredient:
    category: str
    name: str
    strength: Decimal | None
    matched_by: str


@dataclass(frozen=True)
class _Product:
    ingredients: tuple[_Ingredient, ...]
    form: str | None  # dose-form noun from the product name ("tablet"), used in the arithmetic text


_NOTHING = _Product((), None)


# "<ingredient words> <number> <unit>": the number must stand alone (not the 3 of "D3", the 2 of "K 2" is
# rejected because no unit follows it) and the unit must not start a ratio ("2 MG/ML" is a concentration).
_STRENGTH = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*([a-zµμ\[][a-zµμ\[\]]*)(?![\w\]]|\s*/)", re.IGNORECASE)


def _parse_part(part: str, catalog: MedicationCatalog) -> tuple[str, str | None, Decimal | None]:
    """(ingredient words, unit, strength) of one " / " part of an RxNorm-style name."""
    for match in _STRENGTH.finditer(part):
        unit = catalog.unit_of(match.group(2))
        if unit is not None:
            return part[: match.start()].strip(), unit, Decimal(match.group(1))
    return part.strip(), None, None


def _form_of(text: str, catalog: MedicationCatalog) -> str | None:
    """The dose-form noun named last in `text` (two different nouns never match at the same place)."""
    lowered = text.lower()
    found = (
        (match.start(), noun)
        for noun in set(catalog.count_units.values()) - {"unit"}
        for match in re.finditer(rf"\b{re.escape(noun)}s?\b", lowered)
    )
    last = max(found, default=None)
    return last[1] if last else None


def _canonical_strength(
    category: str, unit: str | None, value: Decimal | None, catalog: MedicationCatalog
) -> Decimal | None:
    if unit is None or value is None:
        return None
    factor = catalog.factor(category, unit)
    return value * factor if factor is not None else None


def _product_by_code(categories: Sequence[str], texts: Sequence[str], catalog: MedicationCatalog) -> _Product:
    """Ingredients known from the value sets; strengths from the first name that states them."""
    strengths: dict[str, tuple[str, Decimal | None]] = {}
    form: str | None = None
    for text in texts:
        form = form or _form_of(text, catalog)
        parts = [_parse_part(p, catalog) for p in text.split(" / ")]
        for words, unit, value in parts:
            matched = catalog.match_name(words)
            if matched and matched[0] in categories and strengths.get(matched[0], ("", None))[1] is None:
                strengths[matched[0]] = (matched[1], _canonical_strength(matched[0], unit, value, catalog))
        # A single-ingredient product whose name does not say which form of it ("Vitamin K 0.1 MG Oral
        # Capsule" is in the K2 value set): the code already told us the ingredient.
        if len(categories) == 1 and len(parts) == 1 and strengths.get(categories[0], ("", None))[1] is None:
            _, unit, value = parts[0]
            if value is not None:
                name = strengths.get(categories[0], ("", None))[0]
                strengths[categories[0]] = (name, _canonical_strength(categories[0], unit, value, catalog))
        if all(strengths.get(c, ("", None))[1] is not None for c in categories):
            break
    ingredients = []
    for category in categories:
        name, strength = strengths.get(category, ("", None))
        ingredients.append(
            _Ingredient(category, name or catalog.by_category[category].label, strength, "code")
        )
    return _Product(tuple(ingredients), form)


def _product_by_name(texts: Sequence[str], catalog: MedicationCatalog) -> _Product:
    for text in texts:
        ingredients: list[_Ingredient] = []
        for part in text.split(" / "):
            words, unit, value = _parse_part(part, catalog)
            matched = catalog.match_name(words)
            if matched and all(i.category != matched[0] for i in ingredients):
                strength = _canonical_strength(matched[0], unit, value, catalog)
                ingredients.append(_Ingredient(matched[0], matched[1], strength, "name"))
        if ingredients:
            return _Product(tuple(ingredients), _form_of(text, catalog))
    return _NOTHING


def _codings(codeable: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    codings = _dicts(codeable.get("coding"))
    # RxNorm first: it is the code system the value sets and the strength parser are built for.
    return sorted(codings, key=lambda c: normalise_system(_str(c.get("system")) or "") != RXNORM)


# What classification reads of a CodeableConcept: its text and each coding's (system, code, display), every
# one a non-blank string or None. Equal keys classify alike, so a key is what the classification is cached by.
_CodingKey = tuple[str | None, str | None, str | None]
_MedicationKey = tuple[str | None, tuple[_CodingKey, ...]]


def _medication_key(codeable: Mapping[str, Any]) -> _MedicationKey:
    return (
        _str(codeable.get("text")),
        tuple(
            (_str(c.get("system")), _str(c.get("code")), _str(c.get("display")))
            for c in _dicts(codeable.get("coding"))
        ),
    )


def _rxnorm_first(coding: _CodingKey) -> bool:
    return normalise_system(coding[0] or "") != RXNORM


def _classify_key(key: _MedicationKey, terminology: Terminology, catalog: MedicationCatalog) -> _Product:
    text, unsorted = key
    # RxNorm first: it is the code system the value sets and the strength parser are built for.
    codings = sorted(unsorted, key=_rxnorm_first)
    texts = [t for t in [*(display for _, _, display in codings), text] if t]
    for system, code, _display in codings:
        if system is None or code is None:
            continue
        valuesets = terminology.concepts(system, code)
        categories = list(dict.fromkeys(c for vs in sorted(valuesets) for c in catalog.valuesets.get(vs, ())))
        if categories:
            known = terminology.display(system, code)
            return _product_by_code(categories, [known, *texts] if known else texts, catalog)
    return _product_by_name(texts, catalog)


def _classify(codeable: object, terminology: Terminology, catalog: MedicationCatalog) -> _Product:
    if not _is_map(codeable):
        return _NOTHING
    return _classify_key(_medication_key(codeable), terminology, catalog)


def classify_medication(
    codeable: object, terminology: Terminology, catalog: MedicationCatalog
) -> tuple[Ingredient, ...]:
    """Ingredients of a medication CodeableConcept: by value-set code, else read from its name."""
    product = _classify(codeable, terminology, catalog)
    return tuple(
        Ingredient(
            concept=i.category,
            name=i.name,
            strength=float(i.strength) if i.strength is not None else None,
            unit=catalog.by_category[i.category].unit,
            matched_by=i.matched_by,
        )
        for i in product.ingredients
    )


class MedicationReader:
    """Medications read against one terminology and catalog (`RuleSet.medications`), remembered.

    A patient's medication list and the drafts of an order hook name the same few products again and
    again, and reading a product name or a dose costs tens of microseconds. So each distinct
    CodeableConcept (as classification reads it) is classified once, and each (product, dosages) reading
    gets its doses once. The caches belong to this object, one per rule set, hold at most `maxsize`
    entries each and forget the least recently used; what they hold is immutable.
    """

    def __init__(self, terminology: Terminology, catalog: MedicationCatalog, maxsize: int = 2048) -> None:
        self.terminology = terminology
        self.catalog = catalog

        def classify_key(key: _MedicationKey) -> _Product:
            return _classify_key(key, terminology, catalog)

        def doses(product: _Product, dosages: tuple[_Dosage | str, ...]) -> tuple[IngredientDose, ...]:
            return tuple(_ingredient_dose(i, product, dosages, catalog) for i in product.ingredients)

        self._by_key = lru_cache(maxsize=maxsize)(classify_key)
        # Keyed by what was read, not by the request: equal Decimals give equal doses and equal texts.
        self._doses = lru_cache(maxsize=maxsize)(doses)

    def product(self, codeable: object) -> _Product:
        if not _is_map(codeable):
            return _NOTHING
        return self._by_key(_medication_key(codeable))

    def concepts(self, codeable: object) -> tuple[tuple[str, str, str], ...]:
        """(concept, name, matched_by) of each ingredient: what facts.MedicationClassifier answers."""
        return tuple((i.category, i.name, i.matched_by) for i in self.product(codeable).ingredients)

    def doses(self, product: _Product, dosages: tuple[_Dosage | str, ...]) -> tuple[IngredientDose, ...]:
        """The daily dose of each ingredient of `product` taken as `dosages` say (or why it is unknown)."""
        return self._doses(product, dosages)

    def cached(self) -> tuple[int, int]:
        """How many concepts, and how many (product, dosages) pairs, are remembered."""
        return self._by_key.cache_info().currsize, self._doses.cache_info().currsize


def medication_doses(
    medications: MedicationReader, codeable: object, dosages: object
) -> tuple[IngredientDose, ...]:
    """The daily dose of each ingredient of a medication on record as its dosage instructions say
    (MedicationRequest.dosageInstruction, MedicationStatement.dosage): the arithmetic of draft orders."""
    read = tuple(_read_dosage(d, medications.catalog) for d in _as_list(dosages))
    return medications.doses(medications.product(codeable), read)


def medication_codeable(resource: object) -> tuple[Mapping[str, Any] | None, str | None]:
    """The medication CodeableConcept of a MedicationRequest/-Order/-Statement, and a problem if none.

    A reference is resolved only to a `contained` Medication: others would need a FHIR read, which the
    caller decides about.
    """
    if not _is_map(resource):
        return None, "not a resource"
    concept = resource.get("medicationCodeableConcept")
    reference = resource.get("medicationReference")
    medication = resource.get("medication")  # R5 CodeableReference
    if _is_map(medication):
        concept = concept or medication.get("concept")
        reference = reference or medication.get("reference")
    if _is_map(concept):
        return concept, None
    if _is_map(reference):
        target = _str(reference.get("reference"))
        if target and target.startswith("#"):
            for contained in _dicts(resource.get("contained")):
                if contained.get("resourceType") == "Medication" and contained.get("id") == target[1:]:
                    code = contained.get("code")
                    if _is_map(code):
                        return code, None
                    return None, f"contained Medication {_quote(target)} has no code"
            return None, f"medicationReference {_quote(target)} not found in contained"
        return None, f"medicationReference {_quote(target) if target else '(empty)'} not resolved"
    return None, "no medication"


# --------------------------------------------------------------------------------------------------
# How much


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
class _Dosage:
    dose: _Dose
    schedule: _Schedule
    basis: str


_ADVERBS = {"h": "hourly", "d": "daily", "wk": "weekly", "mo": "monthly", "a": "yearly"}
_NOUNS = {"h": "hour", "d": "day", "wk": "week", "mo": "month", "a": "year"}
_TIMES = {1: "once", 2: "twice", 3: "three times", 4: "four times"}


def _times(frequency: Decimal) -> str:
    if frequency == frequency.to_integral_value() and int(frequency) in _TIMES:
        return _TIMES[int(frequency)]
    return f"{_fmt(frequency)} times"


def _schedule_words(schedule: _Schedule) -> str:
    noun = _NOUNS.get(schedule.unit, schedule.unit)
    if schedule.period == 1:
        words = f"{_times(schedule.frequency)} {_ADVERBS.get(schedule.unit, 'per ' + noun)}"
    elif schedule.frequency == 1:
        words = f"every {_fmt(schedule.period)} {noun}s"
    else:
        words = f"{_times(schedule.frequency)} every {_fmt(schedule.period)} {noun}s"
    return f"{words} {schedule.note}" if schedule.note else words


def _read_dose(quantity: object, catalog: MedicationCatalog) -> _Dose | str:
    if not _is_map(quantity):
        return "dose quantity not readable"
    value = _number(quantity.get("value"))
    if value is None:
        return f"dose value {_quote(quantity.get('value'))} not understood"
    spellings = [s for s in (_str(quantity.get("code")), _str(quantity.get("unit"))) if s]
    if not spellings:
        return "dose quantity has no unit"
    for spelling in spellings:
        noun = catalog.count_noun(spelling)
        if noun is not None:
            return _Dose("count", value, noun)
        unit = catalog.unit_of(spelling)
        if unit is not None:
            return _Dose("amount", value, unit)
    return f"unit {_quote(spellings[0])} not understood"


def _structured_dose(dosage: Mapping[str, Any], catalog: MedicationCatalog) -> _Dose | str | None:
    """R4 doseAndRate[].dose[x]; STU3/DSTU2 put dose[x] on the dosage itself."""
    holders = [*_dicts(dosage.get("doseAndRate")), dosage]
    for holder in holders:
        if "doseQuantity" in holder:
            return _read_dose(holder["doseQuantity"], catalog)
        if "doseRange" in holder:
            dose_range = holder["doseRange"]
            high = dose_range.get("high") if _is_map(dose_range) else None
            if not _is_map(high):
                return "dose range has no upper value"
            dose = _read_dose(high, catalog)
            if isinstance(dose, str):
                return dose
            low_quantity = dose_range.get("low")
            low = _number(low_quantity.get("value")) if _is_map(low_quantity) else None
            shown = f"{_fmt(low)}–{_fmt(dose.value)}" if low is not None else f"up to {_fmt(dose.value)}"
            return _Dose(dose.kind, dose.value, dose.unit, f"(upper end of dose range {shown} used)")
    return None


def _schedule_from_code(code: str, catalog: MedicationCatalog) -> _Schedule | None:
    entry = catalog.timing_codes.get(code.strip().upper())
    return _Schedule(entry.frequency, entry.period, entry.period_unit) if entry else None


def _structured_schedule(dosage: Mapping[str, Any], catalog: MedicationCatalog) -> _Schedule | str | None:
    timing = dosage.get("timing")
    if not _is_map(timing):
        return None
    repeat = timing.get("repeat")
    repeat = repeat if _is_map(repeat) else {}
    period_unit = repeat.get("periodUnit", repeat.get("periodUnits"))  # periodUnits: DSTU2
    if period_unit is not None:
        if not isinstance(period_unit, str) or period_unit not in catalog.period_hours:
            return f"period unit {_quote(period_unit)} not understood"
        frequency = _number(repeat.get("frequency", 1))
        if frequency is None:
            return f"timing frequency {_quote(repeat.get('frequency'))} not understood"
        period = _number(repeat.get("period", 1))
        if period is None:
            return f"timing period {_quote(repeat.get('period'))} not understood"
        note = None
        frequency_max = _number(repeat.get("frequencyMax"))
        # An "up to N times" order is judged at its maximum: a high-dose card must not be missed.
        if frequency_max is not None and frequency_max > frequency:
            note = f"(upper end: up to {_fmt(frequency_max)} times)"
            frequency = frequency_max
        return _Schedule(frequency, period, period_unit, note)
    code = timing.get("code")
    if _is_map(code):
        for coding in _dicts(code.get("coding")):
            found = _str(coding.get("code"))
            schedule = _schedule_from_code(found, catalog) if found else None
            if schedule:
                return schedule
        text = _str(code.get("text"))
        schedule = _schedule_from_code(text, catalog) if text else None
        return schedule or "timing code not understood"
    if "frequency" in repeat or "period" in repeat:
        return "timing has no period unit"
    return None


# Timing codes that are also ordinary words or abbreviations in free text ("1 tablet am and pm" is twice
# daily, not AM): honoured in Timing.code only.
_PLAIN_WORD_CODES = {"AM", "PM", "BED", "WK", "MO"}
_NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8}
_NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|(?:" + "|".join(_NUMBER_WORDS) + r")\b"
_TEXT_AMOUNT = re.compile(rf"(?<![\w.,])({_NUM})\s*([a-zµμ\[{{][^\s,;:()]*)")
_TIME_WORDS = re.compile(r"(times?|x|hours?|hrs?|h|days?|weeks?|wks?|months?|years?)\.?$")
_UNIT_WORDS = {
    "hour": "h", "hours": "h", "hr": "h", "hrs": "h", "h": "h",
    "day": "d", "days": "d", "daily": "d",
    "week": "wk", "weeks": "wk", "wk": "wk", "wks": "wk", "weekly": "wk",
    "month": "mo", "months": "mo", "monthly": "mo",
}  # fmt: skip
_UNIT_ALT = "|".join(sorted(_UNIT_WORDS, key=len, reverse=True))
_TEXT_EVERY_N = re.compile(rf"\bevery\s+({_NUM})\s+({_UNIT_ALT})\b")
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
    (re.compile(r"\b(weekly|every\s+week|per\s+week)\b"), ("1", "1", "wk")),
    (re.compile(r"\b(monthly|every\s+month|per\s+month)\b"), ("1", "1", "mo")),
]


def _text_number(text: str) -> Decimal:
    return Decimal(_NUMBER_WORDS[text]) if text in _NUMBER_WORDS else Decimal(text.replace(",", ""))


def _text_dose(text: str, catalog: MedicationCatalog) -> _Dose | str:
    for match in _TEXT_AMOUNT.finditer(text):
        spelling = match.group(2).rstrip(".")
        if _TIME_WORDS.match(spelling):
            continue
        value = _text_number(match.group(1))
        if value <= 0:
            return "dose of zero in dosage text"
        noun = catalog.count_noun(spelling)
        if noun is not None:
            return _Dose("count", value, noun)
        unit = catalog.unit_of(spelling)
        if unit is not None:
            return _Dose("amount", value, unit)
        return f"unit {_quote(spelling)} not understood"
    return "no dose found in dosage text"


def _text_schedule(text: str, catalog: MedicationCatalog) -> _Schedule | str:
    # A zero in the frequency is a mistyped order, not a cue to read the rest ("0 times a day" is not
    # "a day"): the dose is unknown, as it is for "0 tablets daily".
    match = _TEXT_EVERY_N.search(text)
    if match:
        period = _text_number(match.group(1))
        if period <= 0:
            return "interval of zero in dosage text"
        return _Schedule(Decimal(1), period, _UNIT_WORDS[match.group(2)])
    match = _TEXT_TIMES.search(text)
    if match:
        count = match.group(1)
        words = {"once": "1", "twice": "2", "thrice": "3"}
        raw = words.get(count) or re.sub(r"\s*(times|x)$", "", count)
        frequency = _text_number(raw)
        if frequency <= 0:
            return "frequency of zero in dosage text"
        return _Schedule(frequency, Decimal(1), _UNIT_WORDS[match.group(2)])
    for word in re.findall(r"[a-z0-9]+", text.replace(".", "")):  # "q.d." is QD
        schedule = _schedule_from_code(word, catalog) if word.upper() not in _PLAIN_WORD_CODES else None
        if schedule:
            return schedule
    for pattern, (times, every, unit) in _TEXT_ONCE_PER:
        if pattern.search(text):
            return _Schedule(Decimal(times), Decimal(every), unit)
    return "frequency not understood in dosage text"


def _read_dosage(dosage: object, catalog: MedicationCatalog) -> _Dosage | str:
    if not _is_map(dosage):
        return "dosage instruction not readable"
    dose = _structured_dose(dosage, catalog)
    schedule = _structured_schedule(dosage, catalog)
    if isinstance(dose, _Dose) and isinstance(schedule, _Schedule):
        return _Dosage(dose, schedule, "structured")
    text = _str(dosage.get("text"))
    if text:
        # Whatever the structured fields lack is read from the text (a coded dose with "twice daily").
        lowered = text.lower()
        final_dose = dose if isinstance(dose, _Dose) else _text_dose(lowered, catalog)
        final_schedule = schedule if isinstance(schedule, _Schedule) else _text_schedule(lowered, catalog)
        if isinstance(final_dose, _Dose) and isinstance(final_schedule, _Schedule):
            return _Dosage(final_dose, final_schedule, "parsed from text")
        # The structured reason is the more precise one when both fail. One of the final pair is a reason
        # (a text reading is a _Dose/_Schedule or a reason), so there is always one to return.
        return next(r for r in (dose, schedule, final_dose, final_schedule) if isinstance(r, str))
    if isinstance(dose, str):
        return dose
    if isinstance(schedule, str):
        return schedule
    if dose is None:
        return "no dose quantity"
    return "no timing"


@dataclass(frozen=True)
class _Amount:
    per_period: Decimal
    daily: Decimal
    lead: str  # "IU/day", "IU/week", ...
    detail: str


def _amount(
    ingredient: _Ingredient, product: _Product, dosage: _Dosage, catalog: MedicationCatalog
) -> _Amount | str:
    category = catalog.by_category[ingredient.category]
    dose, schedule = dosage.dose, dosage.schedule
    if dose.kind == "count":
        if ingredient.strength is None:
            return f"strength of {ingredient.name} not known"
        # EHRs say "capsule" or "{pill}" for any solid unit, so the product's own dose form names it; a
        # drop is a different kind of unit, and a per-tablet strength says nothing about a drop.
        if product.form and "drop" in (dose.unit, product.form) and dose.unit != product.form:
            return f"a dose in {dose.unit}s does not fit a {product.form} product"
        noun = product.form or dose.unit
        per_dose = dose.value * ingredient.strength
        detail = (
            f"{_fmt(dose.value)} {noun}{'' if dose.value == 1 else 's'} of "
            f"{_fmt(ingredient.strength)} {category.unit}"
        )
    else:
        factor = catalog.factor(ingredient.category, dose.unit)
        if factor is None:
            return f"unit {_quote(dose.unit)} not understood for {category.label}"
        # A dose in an amount unit names one ingredient only; for a combination it is that ingredient's
        # dose only if no other ingredient could also be measured in it (IU: vitamin D; mcg: ambiguous).
        others = [i for i in product.ingredients if i is not ingredient]
        if any(catalog.factor(o.category, dose.unit) is not None for o in others):
            return f"a dose in {dose.unit} cannot be split among the ingredients of a combination product"
        per_dose = dose.value * factor
        detail = f"{_fmt(dose.value)} {dose.unit}"
        if dose.unit != category.unit:
            detail += f" ({_fmt(per_dose)} {category.unit})"
    if dose.note:
        detail += f" {dose.note}"
    detail += f" {_schedule_words(schedule)}"
    per_period = per_dose * schedule.frequency
    daily = per_period * 24 / (schedule.period * catalog.period_hours[schedule.unit])
    if schedule.period == 1 and schedule.unit in ("wk", "mo", "a"):
        lead = f"{category.unit}/{_NOUNS[schedule.unit]}"
    else:
        per_period, lead = daily, f"{category.unit}/day"
    return _Amount(per_period, daily, lead, detail)


def _ingredient_dose(
    ingredient: _Ingredient,
    product: _Product,
    dosages: Sequence[_Dosage | str],
    catalog: MedicationCatalog,
) -> IngredientDose:
    unit = catalog.by_category[ingredient.category].unit
    strength = float(ingredient.strength) if ingredient.strength is not None else None

    def result(daily: Decimal | None, arithmetic: str, basis: str) -> IngredientDose:
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
        )

    if not dosages:
        return result(None, "dose unknown: no dosage instruction", "unknown")
    amounts: list[_Amount] = []
    for i, dosage in enumerate(dosages):
        found = dosage if isinstance(dosage, str) else _amount(ingredient, product, dosage, catalog)
        if isinstance(found, str):
            where = f"dosage {i + 1}: " if len(dosages) > 1 else ""
            return result(None, f"dose unknown: {where}{found}", "unknown")
        amounts.append(found)
    bases = {d.basis for d in dosages if isinstance(d, _Dosage)}
    basis = "parsed from text" if "parsed from text" in bases else "structured"
    if len(amounts) == 1:
        only = amounts[0]
        return result(only.daily, f"{_fmt(only.per_period)} {only.lead}: {only.detail}", basis)
    # Several dosage instructions are summed. FHIR may mean them in sequence (a loading course, then
    # maintenance); the sum is the highest possible daily intake, so a high-dose card errs on the safe side.
    daily = sum((a.daily for a in amounts), Decimal(0))
    parts = " + ".join(f"{_fmt(a.daily)} {unit}/day ({a.detail})" for a in amounts)
    return result(daily, f"{_fmt(daily)} {unit}/day: {parts}", basis)


# --------------------------------------------------------------------------------------------------
# draftOrders


_JUDGED = {"MedicationRequest", "MedicationOrder"}  # MedicationOrder: DSTU2 (sandbox against a DSTU2 server)
_DATE = re.compile(r"\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?")


def _date_problems(dosages: list[Mapping[str, Any]]) -> list[str]:
    """Dates do not change the dose; they are checked only so the card can say what was ignored."""
    problems = []
    for dosage in dosages:
        timing = dosage.get("timing")
        repeat = timing.get("repeat") if _is_map(timing) else None
        bounds = repeat.get("boundsPeriod") if _is_map(repeat) else None
        if not _is_map(bounds):
            continue
        for key in ("start", "end"):
            value = bounds.get(key)
            if value is None:
                continue
            if not isinstance(value, str) or not _DATE.fullmatch(value):
                problems.append(f"boundsPeriod.{key} {_quote(value)} ignored")
            elif int(value[:4]) < 1900:
                problems.append(f"boundsPeriod.{key} {_quote(value)} implausible, ignored")
    return problems


def _read_order(resource: Mapping[str, Any], reference: str, medications: MedicationReader) -> DraftOrder:
    catalog = medications.catalog
    problems: list[str] = []
    status = resource.get("status")
    if status not in ("draft", "active"):
        problems.append(f"status {_quote(status)} (not draft/active): judged anyway")
    codeable, problem = medication_codeable(resource)
    if problem:
        problems.append(problem)
    product = medications.product(codeable)
    if codeable is not None and not product.ingredients:
        problems.append("medication not recognised")
    raw_dosages = _as_list(resource.get("dosageInstruction"))
    dosages = tuple(_read_dosage(d, catalog) for d in raw_dosages)
    problems += _date_problems(_dicts(raw_dosages))
    rxnorm = None
    text = None
    if codeable is not None:
        codings = _codings(codeable)
        rxnorm = next(
            (
                _str(c.get("code"))
                for c in codings
                if normalise_system(_str(c.get("system")) or "") == RXNORM and _str(c.get("code"))
            ),
            None,
        )
        text = _str(codeable.get("text")) or next(
            (_str(c.get("display")) for c in codings if c.get("display")), None
        )
    return DraftOrder(
        reference=reference,
        resource_type=str(resource.get("resourceType")),
        id=_str(resource.get("id")),
        medication_text=text,
        rxnorm_code=rxnorm,
        ingredients=medications.doses(product, dosages),
        problems=tuple(problems),
    )


def _entries(draft_orders: object) -> tuple[list[tuple[object, str | None]], list[str]]:
    """(resource, fullUrl) pairs from a Bundle, a list of resources or entries, or a single resource."""
    if _is_map(draft_orders):
        if draft_orders.get("resourceType") == "Bundle" or "entry" in draft_orders:
            entries = draft_orders.get("entry")
            if entries is None:
                return [], []
            if not isinstance(entries, list):
                return [], ["draftOrders.entry is not a list"]
            items: list[object] = entries
        else:
            items = [draft_orders]
    elif isinstance(draft_orders, list):
        items = draft_orders
    elif draft_orders is None:
        return [], []
    else:
        return [], ["draftOrders is neither a Bundle nor a list"]
    result: list[tuple[object, str | None]] = []
    for item in items:
        if _is_map(item) and "resource" in item and "resourceType" not in item:
            result.append((item["resource"], _str(item.get("fullUrl"))))
        else:
            result.append((item, None))
    return result, []


def _selected(reference: str, full_url: str | None, selections: Sequence[str]) -> bool:
    for selection in selections:
        if selection in (reference, full_url) or selection.endswith("/" + reference):
            return True
    return False


def read_draft_orders(
    draft_orders: object,
    selections: Sequence[str] | None,
    terminology: Terminology,
    catalog: MedicationCatalog,
    medications: MedicationReader | None = None,
) -> DraftReading:
    """The medication drafts to judge, read leniently; never raises for JSON-shaped input.

    `medications` (the rule set's, for the same terminology and catalog) remembers classifications.
    """
    if medications is None:
        medications = MedicationReader(terminology, catalog, maxsize=0)
    if isinstance(selections, str):
        selections = [selections]
    wanted = [s for s in selections if isinstance(s, str) and s] if isinstance(selections, Sequence) else []
    entries, skipped = _entries(draft_orders)
    orders: list[DraftOrder] = []
    for index, (resource, full_url) in enumerate(entries):
        if not _is_map(resource):
            skipped.append(f"entry {index}: not a resource")
            continue
        resource_type = _str(resource.get("resourceType"))
        if resource_type is None:
            skipped.append(f"entry {index}: no resourceType")
            continue
        if resource_type not in _JUDGED:
            skipped.append(f"entry {index}: {_quote(resource_type)} is not a medication order")
            continue
        resource_id = _str(resource.get("id"))
        reference = (
            f"{resource_type}/{resource_id}"
            if resource_id
            else full_url or f"{resource_type} (entry {index})"
        )
        if wanted and not _selected(reference, full_url, wanted):
            skipped.append(f"entry {index}: {_quote(reference)} not in selections")
            continue
        orders.append(_read_order(resource, reference, medications))
    return DraftReading(tuple(orders), tuple(skipped))
