"""How cards name what is on record (CLINICAL.md 6a): names and dates, and the kind of a record (the
medication list, a prescription), never a FHIR id (pure)."""

from __future__ import annotations

from d3k2.core.facts import Facts
from d3k2.core.record import Evidence
from d3k2.core.texts import Texts


def names_of(facts: Facts, category: str, texts: Texts) -> str:
    """The ingredients of a category on record; one recognised only by its name is labelled as such (a
    labelled guess, CLINICAL.md 5), unless a coded record names it too."""
    meds = facts.meds(category)
    coded = {m.name for m in meds if m.matched_by == "code"}
    names = sorted({m.name if m.name in coded else texts.by_name.format(name=m.name) for m in meds})
    return ", ".join(names) if names else texts.none


def evidence_text(items: list[Evidence], texts: Texts) -> str:
    """Names and dates a clinician reads, never the record's id (CLINICAL.md 6a)."""
    named = {
        texts.evidence_dated.format(text=e.text, date=e.when.isoformat()) if e.when else e.text for e in items
    }
    return "; ".join(sorted(named)) or texts.none


def evidence_of(facts: Facts, texts: Texts, *concepts: str) -> str:
    return evidence_text([e for c in concepts for e in facts.conditions.get(c, ())], texts)


def record_kind(reference: str, texts: Texts) -> str:
    """Where a record is, in words: "medication list", "prescription", or its resource type in lower case."""
    kind = reference.split("/", 1)[0]
    words = {"MedicationStatement": texts.from_statement, "MedicationRequest": texts.from_request}
    return words.get(kind, kind.lower())
