"""The recorded sandbox order requests: what issue 13 says each must produce."""

from __future__ import annotations

import json

from builders import FIXTURES


def _cards(name: str, hook: str) -> list[dict]:
    expected = json.loads((FIXTURES / hook / name / "expected.json").read_text())
    return expected["response"]["cards"]


def _by_topic(cards: list[dict]) -> dict[str, dict]:
    return {card["source"]["topic"]["code"]: card for card in cards}


def _created_products(cards: list[dict]) -> list[str]:
    return [
        action["resource"]["resourceType"]
        for card in cards
        for suggestion in card.get("suggestions", [])
        for action in suggestion["actions"]
        if action["type"] == "create" and action["resource"]["resourceType"] == "MedicationRequest"
    ]


def test_order_sign_k2_with_warfarin_is_critical_and_kidney_and_sarcoidosis_warn() -> None:
    cards = _by_topic(_cards("sandbox-order-sign", "order-sign"))
    k2 = cards["order-k2-vka"]
    assert k2["indicator"] == "critical"
    assert "warfarin" in k2["summary"] + k2["detail"]
    # 2 tablets twice daily of 90 mcg K2 = 360 mcg/day; of 1,000 IU D3 = 4,000 IU/day.
    assert "360 mcg/day: 2 tablets of 90 mcg twice daily" in k2["detail"]
    assert cards["order-vitd-kidney"]["indicator"] == "warning"
    assert cards["order-vitd-granulomatous"]["indicator"] == "warning"
    assert "4,000 IU/day: 2 tablets of 1,000 IU twice daily" in cards["order-vitd-kidney"]["detail"]
    deletes = [
        action
        for card in cards.values()
        for suggestion in card.get("suggestions", [])
        for action in suggestion["actions"]
        if action["type"] == "delete"
    ]
    assert deletes and all(a["resourceId"] == "MedicationRequest/request-123" for a in deletes)
    assert _created_products(list(cards.values())) == [], "no suggestion creates a vitamin D or K product"


def test_order_select_k2_with_warfarin_is_critical() -> None:
    # CLINICAL.md 4: critical when a K2 order is drafted (order-select) or signed, not only at signing.
    cards = _by_topic(_cards("sandbox-order-select", "order-select"))
    assert cards["order-k2-vka"]["indicator"] == "critical"
    drafted = _by_topic(_cards("k2-selected-warfarin-unselected", "order-select"))
    assert drafted["order-k2-vka-drafted"]["indicator"] == "critical"


def test_first_order_select_without_medication_has_no_card_about_the_draft() -> None:
    cards = _cards("sandbox-order-select-no-medication", "order-select")
    assert [c["source"]["topic"]["code"] for c in cards] == ["data-incomplete"]


def test_invalid_date_gives_the_same_order_cards() -> None:
    def strip(cards: list[dict]) -> list[tuple]:
        return [(c["source"]["topic"]["code"], c["indicator"], c["summary"]) for c in cards]

    assert strip(_cards("sandbox-order-select-invalid-date", "order-select")) == strip(
        _cards("sandbox-order-select", "order-select")
    )


def test_after_suggestion_kidney_and_sarcoidosis_still_warn() -> None:
    for hook, name in (
        ("order-select", "sandbox-order-select-after-suggestion"),
        ("order-sign", "sandbox-order-sign-after-suggestion"),
    ):
        cards = _by_topic(_cards(name, hook))
        assert {"order-vitd-kidney", "order-vitd-granulomatous"} <= set(cards)
        assert "8,000 IU/day: 2 tablets of 2,000 IU twice daily" in cards["order-vitd-kidney"]["detail"]
        assert "order-k2-vka" not in cards


def test_unselected_risky_draft_is_not_judged() -> None:
    assert _cards("k2-with-vka-not-selected", "order-select") == []


def test_missing_data_is_named_not_fatal() -> None:
    card = _by_topic(_cards("sandbox-order-sign", "order-sign"))["data-incomplete"]
    assert "calcium results (could not be fetched: connection refused)" in card["detail"]


def test_active_analog_dose_is_shown_with_its_own_digits() -> None:
    # Calcitriol 0.25 mcg once daily: the summary said "0.2 mcg/day" (rounded to one decimal); CLINICAL.md 6a
    # wants active analogs in mcg with their own digits.
    for name in ("calcitriol-deficiency-egfr-20", "calcitriol-hypercalcemia"):
        cards = _cards(name, "order-sign")
        assert cards, name
        for card in cards:
            assert "0.25 mcg/day" in card["summary"], card["summary"]
            assert "0.2 mcg/day" not in card["summary"] + card["detail"]
