"""Fixture requests are valid FHIR R4 (two validators), except the recorded sandbox requests, which are
kept exactly as sent, and fixtures that say why they are invalid on purpose."""

from __future__ import annotations

from typing import Any

import fhirkit
import pytest
from fhir.resources.R4B import get_fhir_model_class

from builders import Fixture, fixtures

CHECKED = [f for f in fixtures() if not f.name.startswith("sandbox-") and "invalid_fhir" not in f.expected]


def _fhir_parts(fixture: Fixture) -> list[tuple[str, dict[str, Any]]]:
    parts = [
        (key, value) for key, value in (fixture.request.get("prefetch") or {}).items() if value is not None
    ]
    context = fixture.request["context"]
    parts += [(key, context[key]) for key in ("draftOrders", "medications") if key in context]
    return parts


def test_most_fixtures_are_checked() -> None:
    assert len(CHECKED) >= len(fixtures()) - 10


@pytest.mark.parametrize("fixture", CHECKED, ids=[f.id for f in CHECKED])
def test_fixture_request_is_valid_r4(fixture: Fixture) -> None:
    for key, resource in _fhir_parts(fixture):
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
        assert fhirkit.validate(resource) == [], key


def test_invalid_on_purpose_fixtures_really_are_invalid() -> None:
    invalid = [f for f in fixtures() if "invalid_fhir" in f.expected]
    assert invalid
    for fixture in invalid:
        assert any(fhirkit.validate(resource) for _, resource in _fhir_parts(fixture)), fixture.id
