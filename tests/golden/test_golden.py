"""Every fixture replays to its golden cards; every rule has a fixture where it fires and one where it
stays silent; every suggested resource is valid R4 for two independent validators."""

from __future__ import annotations

import fhirkit
import pytest
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.servicerequest import ServiceRequest

from builders import SANDBOX, TODAY, Fixture, fixtures, ruleset, topics
from d3k2.config import Settings
from d3k2.core.engine import values_snapshot
from d3k2.core.errors import D3K2Error
from d3k2.fhir.client import FhirClient
from d3k2.service import call_service

ALL = fixtures()
MODELS = {"MedicationRequest": MedicationRequest, "ServiceRequest": ServiceRequest}


@pytest.fixture(scope="module")
def client():
    # fixtures() moves the recorded sandbox requests' fhirServer to refused_url(): fetches of the keys they
    # lack fail fast with "connection refused", which the goldens record, whatever listens on this machine.
    with FhirClient(Settings(fhir_budget=2.0)) as c:
        yield c


def _run(fixture: Fixture, client: FhirClient) -> tuple[int, dict]:
    try:
        outcome = call_service(
            ruleset(),
            fixture.expected["service"],
            fixture.request,
            today=TODAY,
            profile=fixture.expected["profile"],
            fetcher=client,
        )
    except D3K2Error as exc:
        return exc.status, exc.body()
    return 200, outcome.response


@pytest.mark.parametrize("fixture", ALL, ids=[f.id for f in ALL])
def test_fixture_matches_golden(fixture: Fixture, client: FhirClient) -> None:
    status, response = _run(fixture, client)
    assert status == fixture.expected.get("status", 200)
    assert response == fixture.expected["response"]
    silent_but_fired = set(fixture.expected["silent"]) & set(topics(response))
    assert not silent_but_fired, f"rules listed as silent fired: {silent_but_fired}"


@pytest.mark.parametrize("fixture", ALL, ids=[f.id for f in ALL])
def test_same_input_same_answer(fixture: Fixture, client: FhirClient) -> None:
    assert _run(fixture, client) == _run(fixture, client)


WITH_VALUES = [f for f in ALL if "values" in f.expected]


@pytest.mark.parametrize("fixture", WITH_VALUES, ids=[f.id for f in WITH_VALUES])
def test_fixture_fact_values_are_as_expected(fixture: Fixture, client: FhirClient) -> None:
    """A golden's `values`: fact values (as `d3k2 explain` shows them) the evaluation must have."""
    outcome = call_service(
        ruleset(),
        fixture.expected["service"],
        fixture.request,
        today=TODAY,
        profile=fixture.expected["profile"],
        fetcher=client,
    )
    shown = values_snapshot(outcome.evaluation.values)
    assert {name: shown[name] for name in fixture.expected["values"]} == fixture.expected["values"]


def test_every_rule_fires_somewhere_and_is_silent_somewhere() -> None:
    fired: set[str] = set()
    silent: set[str] = set()
    for fixture in ALL:
        fired |= set(topics(fixture.expected["response"]))
        silent |= set(fixture.expected["silent"])
    rules = {rule.topic.code for rule in ruleset().rules}
    assert not rules - fired, f"rules without a fixture where they fire: {sorted(rules - fired)}"
    assert not rules - silent, f"rules without a fixture proving them silent: {sorted(rules - silent)}"
    assert not silent - rules, f"fixtures name unknown rules as silent: {sorted(silent - rules)}"


def test_recorded_sandbox_requests_are_copied_unchanged() -> None:
    recorded = sorted(p for p in SANDBOX.glob("*.request.json") if not p.name.startswith("feedback"))
    assert recorded, "the shared sandbox recordings are missing"
    by_name = {f.name: f for f in ALL}
    for source in recorded:
        stem = source.name.removesuffix(".request.json")
        fixture = by_name["sandbox-" + stem.replace(".", "-")]
        assert (fixture.path / "request.json").read_bytes() == source.read_bytes()
        assert fixture.expected["today"] == "2026-11-24"


def _suggested_resources():
    for fixture in ALL:
        for card in fixture.expected["response"].get("cards", []):
            for suggestion in card.get("suggestions", []):
                # One action, or a replacement: the draft deleted, then the product created.
                types = [action["type"] for action in suggestion["actions"]]
                assert types in (["create"], ["delete"], ["delete", "create"]), types
                action = suggestion["actions"][-1]
                if "resource" in action:
                    yield f"{fixture.id}:{suggestion['label']}", action["resource"]


SUGGESTED = list(_suggested_resources())


@pytest.mark.parametrize(("where", "resource"), SUGGESTED, ids=[w for w, _ in SUGGESTED])
def test_suggested_resource_is_valid_r4(where: str, resource: dict) -> None:
    MODELS[resource["resourceType"]].model_validate(resource)
    assert fhirkit.validate(resource) == []
    if resource["resourceType"] == "MedicationRequest":
        concept = resource["medicationCodeableConcept"]
        assert concept["text"] and concept["coding"][0]["code"], "the sandbox needs text and coding[0].code"
        assert resource["dosageInstruction"][0]["text"]


def test_suggested_resources_exist() -> None:
    kinds = {r["resourceType"] for _, r in SUGGESTED}
    assert kinds == {"MedicationRequest", "ServiceRequest"}


def test_cards_follow_the_spec_shape() -> None:
    for fixture in ALL:
        for card in fixture.expected["response"].get("cards", []):
            assert len(card["summary"]) < 140
            assert card["indicator"] in ("info", "warning", "critical")
            assert card["source"]["label"] and card["source"]["url"].startswith("https://")
            if card.get("suggestions"):
                assert card["selectionBehavior"] == "at-most-one"
                assert all(s["label"] for s in card["suggestions"])
            if card["indicator"] != "info":
                assert card.get("overrideReasons"), f"{fixture.id}: warnings carry override reasons"
