"""Prefetch keys that failed at the EHR (an OperationOutcome, alone or inside a Bundle): the data that did
arrive is used, what failed is named, and 412 is answered only when nothing the rules read arrived at all."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import pytest

from builders import FIXTURES, TODAY, ruleset, topics
from d3k2.core.errors import PrefetchUnavailable
from d3k2.core.hooks import parse_request
from d3k2.core.texts import FETCH
from d3k2.fhir.client import FetchOutcome
from d3k2.fhir.prefetch import resolve
from d3k2.service import call_service

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SERVICE = "d3k2-patient-view"
TIMEOUT = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout"}]}
WARFARIN = {
    "resourceType": "MedicationStatement",
    "id": "w",
    "status": "active",
    "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "855332"}], "text": "warfarin"},
}
VITD = {
    "resourceType": "Observation",
    "id": "v",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "62292-8"}]},
    "effectiveDateTime": "2026-11-01",
    "valueQuantity": {"value": 12, "unit": "ng/mL"},
}


def bundle(*resources: Mapping[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


def request(**prefetch: Any) -> dict[str, Any]:
    """A patient-view request: every key 'no data' unless given; a key given as ... is left out."""
    keys = dict.fromkeys(ruleset().services[SERVICE].prefetch, bundle())
    keys["patient"] = {"resourceType": "Patient", "id": "p1"}
    keys.update(prefetch)
    return {
        "hook": "patient-view",
        "hookInstance": "d8a7bb4e-7cbd-4a49-b2e0-2f2b1b0a0b01",
        "context": {"userId": "Practitioner/x", "patientId": "p1"},
        "prefetch": {k: copy.deepcopy(v) for k, v in keys.items() if v is not ...},
    }


def answer(body: dict[str, Any]) -> dict[str, Any]:
    outcome = call_service(ruleset(), SERVICE, body, today=TODAY, profile="seed", fetcher=None)
    return outcome.response


def data_card(response: dict[str, Any]) -> str:
    card = next(c for c in response["cards"] if c["source"]["topic"]["code"] == "data-incomplete")
    return str(card["detail"])


@pytest.mark.parametrize("failed", [TIMEOUT, bundle(TIMEOUT), ...], ids=["outcome", "bundle", "absent"])
def test_warfarin_still_warns_when_the_25ohd_key_failed(failed: Any) -> None:
    response = answer(request(vitd=failed, medstatements=bundle(WARFARIN, TIMEOUT), medrequests=...))
    assert "vka-k2" in topics(response)
    assert not {"vitd-deficient", "vitd-insufficient", "vitd-test-needed", "k2-with-d3"} & set(
        topics(response)
    )
    detail = data_card(response)
    reason = "not prefetched" if failed is ... else "the EHR sent "
    assert f"25(OH)D results ({reason}" in detail
    assert "medication statements (only in part: the EHR sent an error (timeout) in the Bundle;" in detail
    assert "medication requests (not prefetched; no FHIR server to ask)" in detail


def test_the_other_entries_of_a_bundle_with_an_error_are_used() -> None:
    resolved = resolve(
        ruleset().services[SERVICE].prefetch,
        parse_request(request(vitd=bundle(TIMEOUT, VITD), calcium=TIMEOUT)),
        None,
        ruleset().texts,
    )
    assert VITD in resolved.resources
    assert resolved.incomplete == ["25(OH)D results"]
    assert resolved.missing == [
        "calcium results (the EHR sent an OperationOutcome; no FHIR server to ask)",
        "25(OH)D results (only in part: the EHR sent an error (timeout) in the Bundle;"
        " no FHIR server to ask)",
    ]


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        (
            {"vitd": ..., "medstatements": TIMEOUT, "conditions": bundle(TIMEOUT)},
            ["vitd", "medstatements", "conditions"],
        ),
        # Only what no rule reads arrived beside the error (the Patient, a Basic).
        ({"vitd": bundle(TIMEOUT, {"resourceType": "Basic", "id": "b"})}, ["vitd"]),
        # A resourceType that is no string (a list, an object) names nothing the rules read: 412, not 500.
        ({"vitd": bundle(TIMEOUT, {"resourceType": ["Observation"], "id": "l"})}, ["vitd"]),
        ({"vitd": bundle(TIMEOUT, {"resourceType": {"a": 1}, "id": "o"})}, ["vitd"]),
    ],
)
def test_nothing_the_rules_read_arrived_is_412_naming_the_keys(
    keys: dict[str, Any], named: list[str]
) -> None:
    with pytest.raises(PrefetchUnavailable) as raised:
        resolve(ruleset().services[SERVICE].prefetch, parse_request(request(**keys)), None, ruleset().texts)
    assert raised.value.extra["keys"] == named


class Fetcher:
    """Answers every query with one outcome, as the FHIR client would."""

    def __init__(self, resource: dict[str, Any] | None, error: str | None) -> None:
        self.resource, self.error = resource, error

    def fetch_many(
        self, base_url: str, queries: Mapping[str, str], access_token: str | None
    ) -> dict[str, FetchOutcome]:
        return {key: FetchOutcome(key, self.resource, self.error, 1, 0.0) for key in queries}


@pytest.mark.parametrize(
    ("fetcher", "used", "reason"),
    [
        (Fetcher(None, "HTTP 500"), WARFARIN, "HTTP 500; the part that arrived was used"),
        (
            Fetcher(bundle(TIMEOUT), None),
            WARFARIN,
            "the FHIR server sent an error (timeout) in the Bundle; the part",
        ),
        (Fetcher(None, None), WARFARIN, "the FHIR server sent nothing; the part that arrived was used"),
        # What the server sent beside its error is used, and preferred to the EHR's part.
        (
            Fetcher(bundle(TIMEOUT, VITD), None),
            VITD,
            "the FHIR server sent an error (timeout) in the Bundle; the",
        ),
    ],
)
def test_a_failed_fetch_uses_the_part_that_arrived(fetcher: Fetcher, used: Any, reason: str) -> None:
    body = request(medstatements=bundle(WARFARIN, TIMEOUT))
    body["fhirServer"] = "https://ehr.example/fhir"
    resolved = resolve(ruleset().services[SERVICE].prefetch, parse_request(body), fetcher, ruleset().texts)
    assert used in resolved.resources
    assert resolved.incomplete == ["medication statements"]
    assert resolved.missing[0].startswith(f"medication statements (could not be fetched: {reason}")


DEFICIENT = json.loads((FIXTURES / "patient-view" / "deficient" / "request.json").read_text())


def _deficient_with(**keys: Any) -> dict[str, Any]:
    body = copy.deepcopy(DEFICIENT)
    body["prefetch"].update(copy.deepcopy(keys))
    return body


@pytest.mark.parametrize("failed", [TIMEOUT, "bundle"], ids=["outcome", "error-in-bundle"])
def test_a_pregnancy_status_that_could_not_be_had_withholds_dosing_and_k2(failed: Any) -> None:
    """Pregnancy unknown: it could be a pregnancy, so neither the D3 course nor K2 is suggested."""
    if failed == "bundle":
        failed = copy.deepcopy(DEFICIENT["prefetch"]["pregnancy"])
        failed.setdefault("entry", []).append({"resource": TIMEOUT})
    assert "vitd-deficient" in topics(answer(_deficient_with()))
    response = answer(_deficient_with(pregnancy=failed))
    assert not {"vitd-deficient", "k2-with-d3"} & set(topics(response))
    assert "pregnancy and breastfeeding status (" in data_card(response)


def test_calcium_that_could_not_be_had_withholds_dosing() -> None:
    response = answer(_deficient_with(calcium=TIMEOUT))
    assert "vitd-deficient" not in topics(response)
    assert "calcium results (the EHR sent an OperationOutcome; no FHIR server to ask)" in data_card(response)


def test_a_failed_pregnancy_fetch_is_unknown() -> None:
    body = _deficient_with()
    del body["prefetch"]["pregnancy"]
    body["fhirServer"] = "https://ehr.example/fhir"
    resolved = resolve(
        ruleset().services[SERVICE].prefetch, parse_request(body), Fetcher(None, "timed out"), ruleset().texts
    )
    assert resolved.unknown == ["pregnancy.unknown"]


PAGED = {
    "resourceType": "Bundle",
    "type": "searchset",
    "total": 150,
    "link": [{"relation": "next", "url": "https://ehr.example/fhir/MedicationStatement?page=2"}],
    "entry": [],
}


@pytest.mark.parametrize(
    ("paged", "named"),
    [
        (PAGED, "only a first page (0 of 150 results)"),
        ({**PAGED, "total": None}, "only a first page;"),
        ({k: v for k, v in PAGED.items() if k != "link"}, "only a first page (0 of 150 results)"),
        (
            {**PAGED, "entry": [{"resource": TIMEOUT}]},
            "an error (timeout) in the Bundle and only a first page",
        ),
    ],
    ids=["next-and-total", "next-only", "total-only", "with-error"],
)
def test_a_first_page_of_medications_is_incomplete_and_blocks_k2(paged: Any, named: str) -> None:
    """The other pages may hold a warfarin: no card may say none is on record, K2 is not suggested."""
    response = answer(_deficient_with(medstatements=paged))
    assert "k2-with-d3" not in topics(response)
    assert f"medication statements (the EHR sent {named}" in data_card(response)


def test_a_searchset_holding_all_its_results_is_complete() -> None:
    complete = {
        **PAGED,
        "total": 1,
        "link": [{"relation": "self", "url": "x"}],
        "entry": [{"resource": VITD}],
    }
    resolved = resolve(
        ruleset().services[SERVICE].prefetch,
        parse_request(_deficient_with(vitd=complete)),
        None,
        ruleset().texts,
    )
    assert resolved.missing == [] and resolved.incomplete == []


class _Truncated(Fetcher):
    def fetch_many(
        self, base_url: str, queries: Mapping[str, str], access_token: str | None
    ) -> dict[str, FetchOutcome]:
        return {key: FetchOutcome(key, bundle(VITD), None, 5, 0.0, True) for key in queries}


def test_every_fetch_text_reaches_the_data_card_from_the_file() -> None:
    """Each [fetch] text of cards/texts.toml marked: each mark shows where a key was not had in full."""
    rs = ruleset()
    marked = {
        key: f"«{key}»" + "".join(f"{{{name}}}" for name in sorted(names)) for key, names in FETCH.items()
    }
    texts = dataclasses.replace(rs.texts, fetch=marked)
    keys = rs.services[SERVICE].prefetch
    error_no_code = {"resourceType": "OperationOutcome", "issue": [{"severity": "error"}]}
    paged = {**bundle(WARFARIN), "link": [{"relation": "next", "url": "https://ehr.example/fhir?page=2"}]}
    counted = {**bundle(WARFARIN), "total": 3}
    offline = request(
        vitd=TIMEOUT,  # an OperationOutcome instead of the data
        medstatements=bundle(WARFARIN, TIMEOUT),  # an error with a code beside data
        medrequests={**paged, "entry": [*paged["entry"], {"resource": error_no_code}]},  # error and pages
        conditions=counted,  # a first page of three results
        calcium=[1],  # not a FHIR resource
        pregnancy=...,  # not prefetched
    )
    resolved = resolve(keys, parse_request(offline), None, texts)
    online = request(medstatements=bundle(WARFARIN, TIMEOUT), medrequests=...)
    online["fhirServer"] = "https://ehr.example/fhir"
    fetched = resolve(keys, parse_request(online), Fetcher(None, None), texts)
    truncated = resolve(keys, parse_request(online), _Truncated(None, None), texts)
    seen = "\n".join([*resolved.missing, *resolved.issues, *fetched.missing, *truncated.issues])
    assert [key for key in FETCH if f"«{key}»" not in seen] == []
    assert "prefetch '" not in seen and "'calcium'" not in seen  # a key's label, not its internal name
    # The shipped wording: a value that is no FHIR resource is named by its label.
    plain = resolve(keys, parse_request(offline), None, rs.texts)
    assert "calcium results (what the EHR sent is not a FHIR resource)" in plain.issues
