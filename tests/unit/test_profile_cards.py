"""Cards that follow the profile and the data (CLINICAL.md 2, 3, 5, 6a): K2 with D3 only as the seed profile's
practice and said so, its source labelled for what it is cited; the test-needed card under guideline profiles
only with a reason to test; hypercalcemia graded; cards by indicator, then rule priority."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from test_cards_fit import CURRENT_D3, PREGNANCY, answer  # the same patients and call path

from builders import TODAY, lab_observation, ruleset

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"
PROFILES = sorted(ruleset().profiles)
GUIDELINE_PROFILES = [p for p in PROFILES if p != "seed"]
ADULT, CHILD = "1970-01-01", "2016-01-01"


def patient(born: str | None = ADULT) -> dict[str, Any]:
    found: dict[str, Any] = {"resourceType": "Patient", "id": "p1"}
    if born is not None:
        found["birthDate"] = born
    return found


def vitd(value: float, days_old: int = 20) -> dict[str, Any]:
    when = (TODAY - timedelta(days=days_old)).isoformat()
    return lab_observation("62292-8", value, "ng/mL", oid="v", when=when)


def calcium(value: float) -> dict[str, Any]:
    return lab_observation("17861-6", value, "mg/dL", oid="ca", when=(TODAY - timedelta(days=5)).isoformat())


def topics(cards: list[dict[str, Any]]) -> list[str]:
    return [c["source"]["topic"]["code"] for c in cards]


def k2_cards(cards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cards with a K2 suggestion."""
    return [
        c
        for c in cards
        for s in c.get("suggestions", [])
        for a in s["actions"]
        if "K2" in a.get("resource", {}).get("medicationCodeableConcept", {}).get("text", "")
    ]


# ---------------------------------------------------------------- honest K2


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("value", [5, 15, 25, 35])
def test_k2_is_suggested_only_under_seed_and_says_it_is_not_a_guideline(profile: str, value: float) -> None:
    cards = answer([patient(), vitd(value)], profile)
    with_k2 = k2_cards(cards)
    if profile != "seed":
        assert with_k2 == [], "guideline profiles do not suggest K2 by default"
        return
    assert len(with_k2) == 1, "every low value under seed is deficient or insufficient"
    (card,) = with_k2
    assert "not a guideline" in card["summary"]
    assert "no guideline recommends it, nor does NIH ODS" in card["detail"]
    # The card's source (what the CDS client shows as where it comes from) says what it is cited for.
    assert card["source"]["label"].endswith("it does not recommend K2 with D3)")
    assert all(link["url"].startswith("https://ods.od.nih.gov/") for link in card["links"])


def test_no_rule_cites_nih_ods_as_the_source_of_a_k2_suggestion() -> None:
    rs = ruleset()
    for rule in rs.rules:
        if any(s.product and "vitamin-k2" in rs.products[s.product].categories for s in rule.suggestions):
            assert "nih-ods-vitk" not in rule.sources, rule.id
            assert "not a guideline" in rule.summary and "no guideline recommends it" in rule.detail


# ---------------------------------------------------------------- the test-needed card follows the profile

ALL_PROFILES = frozenset(PROFILES)
# Who is a reason to test, under which guideline profiles (seed always tests). Pregnancy: Holick 2011
# (endocrine-2011) screens pregnant women as at risk; Demay 2024 advises against routine testing in pregnancy
# and ACOG 495 against screening every pregnant woman, so iom-2011 does not.
REASONS = {
    "healthy adult": ([patient()], frozenset()),
    "no date of birth": ([patient(None)], frozenset()),
    "stale result, healthy adult": ([patient(), vitd(35, days_old=500)], frozenset()),
    "child": ([patient(CHILD)], ALL_PROFILES),
    "pregnant": ([patient(), PREGNANCY], frozenset({"endocrine-2011"})),
    "on vitamin D": ([patient(), CURRENT_D3], ALL_PROFILES),
}


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("who", REASONS)
def test_test_needed_card_follows_the_profile(profile: str, who: str) -> None:
    resources, reason = REASONS[who]
    shown = "vitd-test-needed" in topics(answer(resources, profile))
    # seed keeps the article's "test, don't guess"; the guideline profiles test only with a reason (Endocrine
    # Society 2024 advises against routine testing in healthy adults).
    assert shown == (profile == "seed" or profile in reason), (profile, who)


@pytest.mark.parametrize("profile", PROFILES)
def test_test_needed_card_is_info(profile: str) -> None:
    (card,) = [
        c for c in answer([patient(CHILD)], profile) if c["source"]["topic"]["code"] == "vitd-test-needed"
    ]
    assert card["indicator"] == "info"


# ---------------------------------------------------------------- hypercalcemia graded

GRADES = {
    # calcium mg/dL, extra resources, indicator
    "mild, no vitamin D": (11.2, [], "warning"),
    "moderate, no vitamin D": (13.0, [], "warning"),
    "severe": (14.5, [], "critical"),
    "mild, on vitamin D": (11.2, [CURRENT_D3], "critical"),
    "mild, 25(OH)D in the possible-toxicity band": (11.2, [vitd(160)], "critical"),
    "mild, 25(OH)D low": (11.2, [vitd(18)], "warning"),
}


@pytest.mark.parametrize("case", GRADES)
def test_hypercalcemia_is_critical_only_when_severe_or_with_vitamin_d(case: str) -> None:
    value, extra, indicator = GRADES[case]
    cards = answer([patient(), calcium(value), *extra], "seed")
    (card,) = [c for c in cards if c["source"]["topic"]["code"] == "hypercalcemia"]
    assert card["indicator"] == indicator, case
    assert "Severity: " in card["detail"]
    # The vitamin D to hold is named.
    assert ("Current vitamin D: Cholecalciferol" in card["detail"]) == (CURRENT_D3 in extra)


def test_hypercalcemia_on_the_problem_list_without_a_calcium_result_stays_critical() -> None:
    condition = {
        "resourceType": "Condition",
        "id": "hc",
        "clinicalStatus": {"coding": [{"code": "active"}]},
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "E83.52"}]},
    }
    (card,) = [
        c for c in answer([patient(), condition], "seed") if c["source"]["topic"]["code"] == "hypercalcemia"
    ]
    assert card["indicator"] == "critical", "an unknown grade is not downgraded"


# ---------------------------------------------------------------- order


@pytest.mark.parametrize("profile", PROFILES)
def test_cards_come_by_indicator_then_rule_priority_in_every_profile(profile: str) -> None:
    rs = ruleset()
    ranks = {"critical": 0, "warning": 1, "info": 2}
    priorities = {r.topic.code: r.priority for r in rs.rules}
    for resources in (
        [patient(), vitd(12)],
        [patient(), vitd(12), calcium(11.2)],
        [patient(), vitd(200), calcium(14.5), PREGNANCY],
        [patient(CHILD), vitd(12)],
        [patient(), PREGNANCY, vitd(14)],
    ):
        found = [(c["indicator"], c["source"]["topic"]["code"]) for c in answer(resources, profile)]
        assert found == sorted(found, key=lambda o: (ranks[o[0]], priorities[o[1]])), found
