"""Cards link to the "Why this card?" SMART app only when its launch URL is given: a link of type smart
whose appContext names the card's rule (CDS Hooks 2.0 Link), on cards of patient rules patient-view runs."""

from __future__ import annotations

import json
from datetime import date

import pytest

from builders import fixtures, ruleset
from d3k2.config import ConfigError, from_env
from d3k2.service import call_service

LAUNCH = "https://cds.example.org/smart/launch"


def _answer(case: str, smart_url: str | None) -> list[dict]:
    fixture = next(f for f in fixtures() if f.id == case)
    outcome = call_service(
        ruleset(),
        fixture.expected["service"],
        fixture.request,
        today=date.fromisoformat(fixture.expected["today"]),
        profile=fixture.expected["profile"],
        fetcher=None,
        smart_url=smart_url,
    )
    return outcome.response["cards"]


def test_each_patient_view_card_names_its_rule() -> None:
    cards = _answer("patient-view/deficient", LAUNCH)
    assert cards
    for card in cards:
        smart = [link for link in card["links"] if link["type"] == "smart"]
        assert len(smart) == 1, card["summary"]
        assert smart[0]["url"] == LAUNCH and smart[0]["label"] == ruleset().texts.smart_link
        assert set(json.loads(smart[0]["appContext"])) == {"rule", "patient"}
        assert json.loads(smart[0]["appContext"])["patient"] == "pt-deficient"  # checked at the callback
    rules = {
        json.loads(link["appContext"])["rule"] for c in cards for link in c["links"] if "appContext" in link
    }
    assert "vitd-deficient" in rules


def test_no_link_without_a_launch_url() -> None:
    assert all(
        link["type"] == "absolute" for c in _answer("patient-view/deficient", None) for link in c["links"]
    )


def test_draft_order_cards_have_no_smart_link() -> None:
    """The app re-runs patient-view: a card about a draft order is not one it can explain."""
    case = next(
        f.id
        for f in fixtures()
        if f.id.startswith("order-sign/")
        and f.expected.get("status", 200) == 200
        and f.expected["response"]["cards"]
    )
    cards = _answer(case, LAUNCH)
    draft_rules = {r.id for r in ruleset().rules if r.scope == "draft"}
    # The case has a card about a draft order: it carries no smart link.
    assert any(all(link["type"] != "smart" for link in card["links"]) for card in cards)
    for card in cards:
        linked = [json.loads(link["appContext"])["rule"] for link in card["links"] if link["type"] == "smart"]
        assert not (set(linked) & draft_rules)


def test_configuration() -> None:
    on = from_env({"D3K2_SMART_APP_URL": "https://cds.example.org/smart/"})
    assert on.smart_enabled and on.smart_launch_url == LAUNCH
    off = from_env({"D3K2_SMART_APP_URL": "https://cds.example.org/smart", "D3K2_SMART": "off"})
    assert not off.smart_enabled and off.smart_launch_url is None
    assert from_env({}).smart_launch_url is None
    framed = from_env({"D3K2_SMART_APP_URL": LAUNCH, "D3K2_SMART_FRAME_ANCESTORS": "https://ehr.example.org"})
    assert framed.smart_frame_ancestors == "https://ehr.example.org"
    for env, message in (
        ({"D3K2_SMART": "on"}, "requires D3K2_SMART_APP_URL"),
        ({"D3K2_SMART": "yes"}, "on or off"),
        ({"D3K2_SMART_APP_URL": "ftp://x"}, "http(s) URL"),
        ({"D3K2_SMART_FRAME_ANCESTORS": "'unsafe-inline'"}, "http(s) origins"),
        (
            {
                "D3K2_ENV": "production",
                "D3K2_PUBLIC_BASE_URL": "https://cds.example.org",
                "D3K2_SMART_APP_URL": "https://cds.example.org/smart",
            },
            "D3K2_SMART_SECRET",
        ),
    ):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            from_env(env)
