"""Lenient reading of CDS Hooks ``draftOrders``: the medication orders to judge, their ingredients and
daily doses, and what could not be used.

Pure: no Flask, no requests. The CDS Hooks sandbox and real EHRs send invalid FHIR (see
shared/sandbox/README.md, "Quirks"), so the reader accepts any JSON-shaped value and reports what it
could not use instead of raising.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from d3k2.core.dosage import IngredientDose, read_dosage
from d3k2.core.lenient import as_list, dicts, is_map, nonblank, quote
from d3k2.core.medication_reader import MedicationReader
from d3k2.core.medications import medication_codeable, sorted_codings
from d3k2.core.terminology import RXNORM, normalise_system


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
    # order-select: the drafts not selected. They are not judged, but the judged ones are judged beside them.
    unselected: tuple[DraftOrder, ...] = ()


_JUDGED = {"MedicationRequest", "MedicationOrder"}  # MedicationOrder: DSTU2 (sandbox against a DSTU2 server)
_DATE = re.compile(r"\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?")


def _date_problems(dosages: list[Mapping[str, Any]]) -> list[str]:
    """Dates do not change the dose; they are checked only so the card can say what was ignored."""
    problems = []
    for dosage in dosages:
        timing = dosage.get("timing")
        repeat = timing.get("repeat") if is_map(timing) else None
        bounds = repeat.get("boundsPeriod") if is_map(repeat) else None
        if not is_map(bounds):
            continue
        for key in ("start", "end"):
            value = bounds.get(key)
            if value is None:
                continue
            if not isinstance(value, str) or not _DATE.fullmatch(value):
                problems.append(f"boundsPeriod.{key} {quote(value)} ignored")
            elif int(value[:4]) < 1900:
                problems.append(f"boundsPeriod.{key} {quote(value)} implausible, ignored")
    return problems


def _read_order(resource: Mapping[str, Any], reference: str, medications: MedicationReader) -> DraftOrder:
    catalog = medications.catalog
    problems: list[str] = []
    status = resource.get("status")
    if status not in ("draft", "active"):
        problems.append(f"status {quote(status)} (not draft/active): judged anyway")
    codeable, problem = medication_codeable(resource)
    if problem:
        problems.append(problem)
    product = medications.product(codeable)
    if codeable is not None and not product.ingredients:
        problems.append("medication not recognised")
    raw_dosages = as_list(resource.get("dosageInstruction"))
    dosages = tuple(read_dosage(d, catalog, medications.words) for d in raw_dosages)
    problems += _date_problems(dicts(raw_dosages))
    rxnorm = None
    text = None
    if codeable is not None:
        codings = sorted_codings(codeable)
        rxnorm = next(
            (
                nonblank(c.get("code"))
                for c in codings
                if normalise_system(nonblank(c.get("system")) or "") == RXNORM and nonblank(c.get("code"))
            ),
            None,
        )
        text = nonblank(codeable.get("text")) or next(
            (nonblank(c.get("display")) for c in codings if c.get("display")), None
        )
    return DraftOrder(
        reference=reference,
        resource_type=str(resource.get("resourceType")),
        id=nonblank(resource.get("id")),
        medication_text=text,
        rxnorm_code=rxnorm,
        ingredients=medications.doses(product, dosages),
        problems=tuple(problems),
    )


def _entries(draft_orders: object) -> tuple[list[tuple[object, str | None]], list[str]]:
    """(resource, fullUrl) pairs from a Bundle, a list of resources or entries, or a single resource."""
    if is_map(draft_orders):
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
        if is_map(item) and "resource" in item and "resourceType" not in item:
            result.append((item["resource"], nonblank(item.get("fullUrl"))))
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
    medications: MedicationReader,
) -> DraftReading:
    """The medication drafts to judge, read leniently; never raises for JSON-shaped input. `medications`
    (the rule set's) reads them against its terminology and catalog, and remembers classifications."""
    if isinstance(selections, str):
        selections = [selections]
    wanted = [s for s in selections if isinstance(s, str) and s] if isinstance(selections, Sequence) else []
    entries, skipped = _entries(draft_orders)
    orders: list[DraftOrder] = []
    unselected: list[DraftOrder] = []
    for index, (resource, full_url) in enumerate(entries):
        if not is_map(resource):
            skipped.append(f"entry {index}: not a resource")
            continue
        resource_type = nonblank(resource.get("resourceType"))
        if resource_type is None:
            skipped.append(f"entry {index}: no resourceType")
            continue
        if resource_type not in _JUDGED:
            skipped.append(f"entry {index}: {quote(resource_type)} is not a medication order")
            continue
        resource_id = nonblank(resource.get("id"))
        reference = (
            f"{resource_type}/{resource_id}"
            if resource_id
            else full_url or f"{resource_type} (entry {index})"
        )
        if wanted and not _selected(reference, full_url, wanted):
            skipped.append(f"entry {index}: {quote(reference)} not in selections")
            unselected.append(_read_order(resource, reference, medications))
            continue
        orders.append(_read_order(resource, reference, medications))
    return DraftReading(tuple(orders), tuple(skipped), tuple(unselected))
