"""Each rule file names golden fixtures where it fires and where it stays silent (`[tests]`); replayed
here with each fixture's own day and profile, as the golden test replays them."""

from __future__ import annotations

from datetime import date

import pytest

from builders import CARDS, FIXTURES, Fixture, fixtures, ruleset, topics
from d3k2.config import Settings
from d3k2.core.loader import load_ruleset
from d3k2.core.ruleset import Rule
from d3k2.fhir.client import FhirClient
from d3k2.service import call_service

BY_ID = {f.id: f for f in fixtures()}
CASES = [
    (rule, name, fires)
    for rule in ruleset().rules
    for fires, names in ((True, rule.tests.fires), (False, rule.tests.silent))
    for name in names
]


@pytest.fixture(scope="module")
def client():
    # As in test_golden: fetches of keys a recorded request lacks fail fast on a loopback port.
    with FhirClient(Settings(fhir_budget=2.0)) as c:
        yield c


def test_every_rule_names_fixtures_that_exist() -> None:
    rules = load_ruleset(CARDS, FIXTURES).rules  # refuses a rule without both lists, or a missing fixture
    assert all(rule.tests.fires and rule.tests.silent for rule in rules)


def _topics(fixture: Fixture, client: FhirClient) -> list[str]:
    outcome = call_service(
        ruleset(),
        fixture.expected["service"],
        fixture.request,
        today=date.fromisoformat(fixture.expected["today"]),
        profile=fixture.expected["profile"],
        fetcher=client,
    )
    return topics(outcome.response)


@pytest.mark.parametrize(
    ("rule", "name", "fires"),
    CASES,
    ids=[f"{rule.id}-{'fires' if fires else 'silent'}-{name}" for rule, name, fires in CASES],
)
def test_rule_fires_and_stays_silent_where_its_file_says(
    rule: Rule, name: str, fires: bool, client: FhirClient
) -> None:
    shown = rule.topic.code in _topics(BY_ID[name], client)
    assert shown is fires, f"{rule.id} {'did not fire' if fires else 'fired'} in {name}"
