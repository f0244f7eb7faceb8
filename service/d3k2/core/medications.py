"""Which medication: the ingredients (and their strengths) of a medication CodeableConcept or reference.

Pure: no Flask, no requests. An ingredient is known from its value-set code when there is one, else read
from the product's name (RxNorm-style "Cholecalciferol 1000 UNT Oral Capsule"); the catalog
(cards/medications.toml) says which value set and which name pattern mean which ingredient.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from d3k2.core.catalog import MedicationCatalog
from d3k2.core.lenient import dicts, is_map, nonblank, quote
from d3k2.core.terminology import RXNORM, Terminology, normalise_system


@dataclass(frozen=True)
class Ingredient:
    """One ingredient of a medication, without any dose (also used for the patient's medication list)."""

    concept: str
    name: str
    strength: float | None
    unit: str
    matched_by: str


@dataclass(frozen=True)
class ProductIngredient:
    """An ingredient as classification found it; the strength in its category's unit."""

    category: str
    name: str
    strength: Decimal | None
    matched_by: str


@dataclass(frozen=True)
class Product:
    """The ingredients of a medication (none: not one this service judges)."""

    ingredients: tuple[ProductIngredient, ...]
    form: str | None  # dose-form noun from the product name ("tablet"), used in the arithmetic text


NO_PRODUCT = Product((), None)


# "<ingredient words> <number> <unit>": the number must stand alone (not the 3 of "D3", the 2 of "K 2" is
# rejected because no unit follows it) and the unit must not start a ratio ("2 MG/ML" is a concentration).
# Thousands separators: "5,000 IU" is 5,000, never the "000 IU" after the comma; a space separates thousands
# ("50 000 IU") only before an IU unit, so that "Vitamin K 2 100 MCG" stays 100 mcg.
_STRENGTH = re.compile(
    r"(?<![\w.,])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d{1,3}(?:[ \u00a0\u202f]\d{3})+(?=\s*(?:iu|units?|unt)\b)"
    r"|\d+(?:\.\d+)?)\s*([a-zµμ\[][a-zµμ\[\]]*)(?![\w\]]|\s*/)",
    re.IGNORECASE,
)


def _number(text: str) -> Decimal:
    return Decimal(re.sub(r"[,\s\u00a0\u202f]", "", text))


# Ingredient parts of a product name: RxNorm's " / ", and the "+", "," and "with"/"and" of uncoded names
# ("Calcium 600 mg + Vitamin D3 400 IU tablet"): each part is read for its own ingredient and strength.
_PARTS = re.compile(r"\s+/\s+|\s*\+\s*|,\s+|\s+(?:with|and|&)\s+", re.IGNORECASE)


def _parts(text: str) -> list[str]:
    return _PARTS.split(text)


def _parse_part(part: str, catalog: MedicationCatalog) -> tuple[str, str | None, Decimal | None]:
    """(ingredient words, unit, strength) of one " / " part of an RxNorm-style name."""
    for match in _STRENGTH.finditer(part):
        unit = catalog.unit_of(match.group(2))
        if unit is not None:
            return part[: match.start()].strip(), unit, _number(match.group(1))
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


def _product_by_code(categories: Sequence[str], texts: Sequence[str], catalog: MedicationCatalog) -> Product:
    """Ingredients known from the value sets; strengths from the first name that states them."""
    strengths: dict[str, tuple[str, Decimal | None]] = {}
    form: str | None = None
    for text in texts:
        form = form or _form_of(text, catalog)
        parts = [_parse_part(p, catalog) for p in _parts(text)]
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
            ProductIngredient(category, name or catalog.by_category[category].label, strength, "code")
        )
    return Product(tuple(ingredients), form)


def _product_by_name(texts: Sequence[str], catalog: MedicationCatalog) -> Product:
    for text in texts:
        ingredients: list[ProductIngredient] = []
        for part in _parts(text):
            words, unit, value = _parse_part(part, catalog)
            matched = catalog.match_name(words)
            if matched and all(i.category != matched[0] for i in ingredients):
                strength = _canonical_strength(matched[0], unit, value, catalog)
                ingredients.append(ProductIngredient(matched[0], matched[1], strength, "name"))
        if ingredients:
            return Product(tuple(ingredients), _form_of(text, catalog))
    return NO_PRODUCT


def sorted_codings(codeable: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    codings = dicts(codeable.get("coding"))
    # RxNorm first: it is the code system the value sets and the strength parser are built for.
    return sorted(codings, key=lambda c: normalise_system(nonblank(c.get("system")) or "") != RXNORM)


# What classification reads of a CodeableConcept: its text and each coding's (system, code, display), every
# one a non-blank string or None. Equal keys classify alike, so a key is what the classification is cached by.
_CodingKey = tuple[str | None, str | None, str | None]
MedicationKey = tuple[str | None, tuple[_CodingKey, ...]]


def medication_key(codeable: Mapping[str, Any]) -> MedicationKey:
    return (
        nonblank(codeable.get("text")),
        tuple(
            (nonblank(c.get("system")), nonblank(c.get("code")), nonblank(c.get("display")))
            for c in dicts(codeable.get("coding"))
        ),
    )


def _rxnorm_first(coding: _CodingKey) -> bool:
    return normalise_system(coding[0] or "") != RXNORM


def classify_by_key(key: MedicationKey, terminology: Terminology, catalog: MedicationCatalog) -> Product:
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


def _classify(codeable: object, terminology: Terminology, catalog: MedicationCatalog) -> Product:
    if not is_map(codeable):
        return NO_PRODUCT
    return classify_by_key(medication_key(codeable), terminology, catalog)


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


def medication_codeable(resource: object) -> tuple[Mapping[str, Any] | None, str | None]:
    """The medication CodeableConcept of a MedicationRequest/-Order/-Statement, and a problem if none.

    A reference is resolved only to a `contained` Medication: others would need a FHIR read, which the
    caller decides about.
    """
    if not is_map(resource):
        return None, "not a resource"
    concept = resource.get("medicationCodeableConcept")
    reference = resource.get("medicationReference")
    medication = resource.get("medication")  # R5 CodeableReference
    if is_map(medication):
        concept = concept or medication.get("concept")
        reference = reference or medication.get("reference")
    if is_map(concept):
        return concept, None
    if is_map(reference):
        target = nonblank(reference.get("reference"))
        if target and target.startswith("#"):
            for contained in dicts(resource.get("contained")):
                if contained.get("resourceType") == "Medication" and contained.get("id") == target[1:]:
                    code = contained.get("code")
                    if is_map(code):
                        return code, None
                    return None, f"contained Medication {quote(target)} has no code"
            return None, f"medicationReference {quote(target)} not found in contained"
        return None, f"medicationReference {quote(target) if target else '(empty)'} not resolved"
    return None, "no medication"
