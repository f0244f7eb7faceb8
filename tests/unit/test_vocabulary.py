"""cards/vocabulary.toml and the engine agree both ways: every fact and template field the engine makes
for any fixture is declared, with a value of its declared type, and every declared one is made. A fact
added in code without a declaration, or declared without code behind it, fails here."""

from __future__ import annotations

from collections import defaultdict
from datetime import date
from functools import cache
from typing import Any

from builders import fixtures, ruleset
from d3k2.core.errors import D3K2Error
from d3k2.core.fields import template_fields
from d3k2.core.quantities import Interval
from d3k2.core.ruleset import FactSpec
from d3k2.service import call_service


@cache
def produced() -> tuple[dict[str, dict[str, list[Any]]], dict[str, set[str]]]:
    """scope → fact → every value seen; scope → template fields seen."""
    rs = ruleset()
    facts: dict[str, dict[str, list[Any]]] = {"patient": defaultdict(list), "draft": defaultdict(list)}
    fields: dict[str, set[str]] = {"patient": set(), "draft": set()}
    for fixture in fixtures():
        try:
            outcome = call_service(
                rs,
                fixture.expected["service"],
                fixture.request,
                today=date.fromisoformat(fixture.expected["today"]),
                profile=fixture.expected["profile"],
                fetcher=None,
            )
        except D3K2Error:
            continue  # a fixture that needs the FHIR fallback: the others make every fact
        evaluation = outcome.evaluation
        for name, value in evaluation.values.items():
            facts["patient"][name].append(value)
        made = template_fields(rs, evaluation.facts, evaluation.profile, evaluation.values)
        fields["patient"] |= {f"{ns}.{attr}" for ns, space in made.items() for attr in vars(space)}
        for finding in evaluation.findings:
            if finding.draft is None:
                continue
            for name, value in finding.values.items():
                if name not in evaluation.values:
                    facts["draft"][name].append(value)
            fields["draft"] |= {f"draft.{attr}" for attr in vars(finding.fields["draft"])}
    return facts, fields


def declared(scope: str) -> dict[str, FactSpec]:
    return {name: spec for name, spec in ruleset().vocabulary.facts.items() if spec.scope == scope}


def fits(value: Any, spec: FactSpec) -> bool:
    if value is None:
        return True  # no data: every test but `present` is false
    if spec.type == "bool":
        return isinstance(value, bool)
    if spec.type == "number":
        return isinstance(value, Interval | float | int) and not isinstance(value, bool)
    return value in spec.values


def test_every_fact_the_engine_makes_is_declared_and_every_declared_fact_is_made() -> None:
    facts, _ = produced()
    for scope in ("patient", "draft"):
        made, wanted = set(facts[scope]), set(declared(scope))
        assert not made - wanted, (
            f"{scope} facts made but not in cards/vocabulary.toml: {sorted(made - wanted)}"
        )
        assert not wanted - made, f"{scope} facts declared but never made: {sorted(wanted - made)}"


def test_every_fact_value_has_its_declared_type() -> None:
    facts, _ = produced()
    for scope in ("patient", "draft"):
        for name, spec in declared(scope).items():
            wrong = [v for v in facts[scope][name] if not fits(v, spec)]
            assert not wrong, f"{name} is declared {spec.type} {spec.values or ''} but was {wrong[:3]}"


def test_every_band_is_made_by_some_fixture() -> None:
    # A declared band no fixture reaches is a typo or a path the goldens do not cover.
    facts, _ = produced()
    for name, spec in declared("patient").items():
        if spec.type == "band":
            assert {v for v in facts["patient"][name] if v is not None} == set(spec.values), name


def test_every_template_field_the_engine_makes_is_declared_and_every_declared_one_is_made() -> None:
    _, fields = produced()
    vocabulary = ruleset().vocabulary
    assert fields["patient"] == set(vocabulary.fields.patient)
    assert fields["draft"] == set(vocabulary.fields.draft)


def test_every_profile_defines_only_declared_bands() -> None:
    bands = ruleset().vocabulary.bands()
    for profile in ruleset().profiles.values():
        assert {band.id for band in profile.bands} <= bands
