"""Cards speak to clinicians (CLINICAL.md 6a): no FHIR ids, no profile ids, no unformatted template field,
summaries that start with a capital and fit; checked on every golden answer."""

from __future__ import annotations

import re
from typing import Any

import pytest

from builders import fixtures, ruleset

RESOURCE_TYPES = (
    "Patient|Condition|Observation|MedicationStatement|MedicationRequest|Medication|ServiceRequest|Encounter"
    "|AllergyIntolerance|Bundle|OperationOutcome"
)
FHIR_ID = re.compile(rf"\b(?:{RESOURCE_TYPES})/[A-Za-z0-9\-.]+")
FIELD = re.compile(r"\{[a-z_]+(?:\.[a-z_]+)?\}")
PROFILE_IDS = re.compile(r"\b(?:" + "|".join(re.escape(p) for p in sorted(ruleset().profiles)) + r")\b")
ALL = [f for f in fixtures() if f.expected.get("status", 200) == 200]


def texts_of(card: dict[str, Any]) -> list[str]:
    found = [card["summary"], card.get("detail", "")]
    found += [s["label"] for s in card.get("suggestions", [])]
    found += [a.get("description", "") for s in card.get("suggestions", []) for a in s.get("actions", [])]
    return found


@pytest.mark.parametrize("fixture", ALL, ids=[f.id for f in ALL])
def test_no_card_text_carries_ids_profile_ids_or_raw_fields(fixture: Any) -> None:
    for card in fixture.expected["response"].get("cards", []):
        for text in texts_of(card):
            assert not FHIR_ID.search(text), (card["summary"], FHIR_ID.search(text))
            assert not PROFILE_IDS.search(text), (card["summary"], PROFILE_IDS.search(text))
            assert not FIELD.search(text), (card["summary"], FIELD.search(text))
        summary = card["summary"]
        # Capitalised, except a word that is written with a small letter first ("eGFR").
        assert not summary[:1].islower() or summary[1:2].isupper(), summary
        assert len(summary) <= 140, summary


def test_the_patterns_catch_what_they_should() -> None:
    assert FHIR_ID.search("Sarcoidosis (Condition/d3k2-sarcoid-1)")
    assert PROFILE_IDS.search("Thresholds: profile `seed`")
    assert FIELD.search("On {vka.names}")
    assert not FHIR_ID.search("50,000 IU/day")
