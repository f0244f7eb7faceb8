"""Cards speak to clinicians (CLINICAL.md 6a): no FHIR ids, no profile ids, no unformatted template field,
no internal words; summaries that start with a capital and fit, name one ingredient once and write weekly
doses as weekly. Checked on every fixture, golden file and vendored sandbox recording, under every profile."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from builders import SANDBOX, TODAY, fixtures, off_the_network, ruleset
from d3k2.core.errors import D3K2Error
from d3k2.service import call_service

RESOURCE_TYPES = (
    "Patient|Condition|Observation|MedicationStatement|MedicationRequest|Medication|ServiceRequest|Encounter"
    "|AllergyIntolerance|Bundle|OperationOutcome|Practitioner|Specimen"
)
FHIR_ID = re.compile(rf"\b(?:{RESOURCE_TYPES})/[A-Za-z0-9\-\.]{{1,64}}")
FIELD = re.compile(r"\{[A-Za-z_]+(?:\.[A-Za-z_]+)*\}")
PROFILE_IDS = re.compile(r"\b(?:" + "|".join(re.escape(p) for p in sorted(ruleset().profiles)) + r")\b")
INTERNAL = re.compile(r"not on record \(no date\)|no band|\bprofile\b|\bprefetch\b|skipped:", re.IGNORECASE)
# A daily equivalent of a weekly dose ("7,142.9 IU/day"): a fraction of an IU per day.
DAILY_FRACTION = re.compile(r"\d[\d,]*\.\d+ IU/day")
# Ingredient names a summary should say once (case-insensitive; "vitamin K2 (vitamin K2)" is twice).
INGREDIENTS = re.compile(
    r"vitamin K2|vitamin D2|vitamin D3|\bvitamin D\b|cholecalciferol|ergocalciferol", re.IGNORECASE
)


def requests() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(id, service, request): every golden fixture and every recorded sandbox hook call."""
    for f in fixtures():
        yield f.id, f.expected["service"], f.request
    for path in sorted(SANDBOX.glob("*.request.json")) + sorted((SANDBOX / "raw").glob("*.json")):
        body = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(body, dict) and "hook" in body:
            yield f"sandbox/{path.name}", f"d3k2-{body['hook']}", off_the_network(body)


CASES = [
    (rid, service, request, p) for rid, service, request in requests() for p in sorted(ruleset().profiles)
]


def texts_of(card: dict[str, Any]) -> list[str]:
    found = [card["summary"], card.get("detail", ""), card["source"]["label"]]
    found += [link["label"] for link in card.get("links", [])]
    found += [s["label"] for s in card.get("suggestions", [])]
    found += [a.get("description", "") for s in card.get("suggestions", []) for a in s.get("actions", [])]
    return found


def wording_problems(card: dict[str, Any]) -> list[str]:
    problems = []
    for text in texts_of(card):
        for name, pattern in (
            ("FHIR id", FHIR_ID),
            ("profile id", PROFILE_IDS),
            ("template field", FIELD),
            ("internal words", INTERNAL),
            ("daily equivalent of a weekly dose", DAILY_FRACTION),
        ):
            if found := pattern.search(text):
                problems.append(f"{name}: {found.group(0)!r} in {text[:80]!r}")
    summary = card["summary"]
    # Capitalised, except a word that is written with a small letter first ("eGFR").
    if summary[:1].islower() and not summary[1:2].isupper():
        problems.append(f"not capitalised: {summary!r}")
    if len(summary) > 140:
        problems.append(f"longer than 140: {summary!r}")
    named = [m.lower() for m in INGREDIENTS.findall(summary)]
    if len(named) != len(set(named)):
        problems.append(f"an ingredient named twice: {summary!r}")
    return problems


@pytest.mark.parametrize(
    ("rid", "service", "request_", "profile"), CASES, ids=[f"{c[0]}[{c[3]}]" for c in CASES]
)
def test_no_card_text_carries_ids_profile_ids_raw_fields_or_internal_words(
    rid: str, service: str, request_: dict[str, Any], profile: str
) -> None:
    try:
        outcome = call_service(ruleset(), service, request_, today=TODAY, profile=profile, fetcher=None)
    except D3K2Error:
        return  # an error answer has no cards
    problems = [p for card in outcome.response["cards"] for p in wording_problems(card)]
    assert problems == []


def test_the_patterns_catch_what_they_should() -> None:
    card = {
        "summary": "warfarin with vitamin K2 (vitamin K2): check INR" + "." * 120,
        "detail": "Sarcoidosis (Condition/d3k2-sarcoid-1). Thresholds: profile `seed`. On {vka.names}. "
        "Newest calcium: not on record (no date). Vitamin D ordered (7,142.9 IU/day).",
        "source": {"label": "x"},
    }
    problems = " | ".join(wording_problems(card))
    for expected in (
        "FHIR id: 'Condition/d3k2-sarcoid-1'",
        "profile id: 'seed'",
        "template field: '{vka.names}'",
        "internal words: 'profile'",
        "daily equivalent of a weekly dose: '7,142.9 IU/day'",
        "not capitalised",
        "longer than 140",
        "an ingredient named twice",
    ):
        assert expected in problems
    assert (
        wording_problems({"summary": "eGFR 25 mL/min/1.73 m² on 2026-10-15", "source": {"label": "x"}}) == []
    )
    twice = {"summary": "Vitamin D ordered with hypercalcemia: hold vitamin D", "source": {"label": "x"}}
    assert wording_problems(twice) == [f"an ingredient named twice: {twice['summary']!r}"]
    once = {"summary": "Vitamin D2 ordered: vitamin D3 is more potent", "source": {"label": "x"}}
    assert wording_problems(once) == []
