"""Prefetch resolution: the four states of a key (CDS Hooks 2.0 "Prefetch"), then fallback fetching.

1. key absent → fetch from fhirServer (with the bearer token when given);
2. key null → the EHR has no data: nothing fetched;
3. OperationOutcome (alone or an error inside the Bundle) → failed at the EHR: fetch if possible;
4. needed, not given and no fhirServer to ask → PrefetchUnavailable (HTTP 412) naming the keys.
A key whose fetch fails is named on the answer (and blocks dosing suggestions when required).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeGuard

from d3k2.core.errors import PrefetchUnavailable
from d3k2.core.hooks import FHIR_ID, CdsRequest
from d3k2.core.ruleset import PrefetchKey
from d3k2.fhir.client import FetchOutcome

_TOKEN = re.compile(r"\{\{\s*([A-Za-z0-9_.]+)\s*\}\}")
# Medications referenced but not sent are read one by one: bounded so a long list cannot stall the call.
MAX_MEDICATION_READS = 20


class Fetcher(Protocol):
    def fetch_many(
        self, base_url: str, queries: Mapping[str, str], access_token: str | None
    ) -> dict[str, FetchOutcome]: ...


@dataclass
class Resolved:
    resources: list[dict[str, Any]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # "<label> (<reason>)" for the card
    incomplete: list[str] = field(default_factory=list)  # labels of required keys without data
    issues: list[str] = field(default_factory=list)
    fetched: dict[str, str] = field(default_factory=dict)  # key → "ok" or the error


def fill_template(query: str, request: CdsRequest) -> str | None:
    """Replace {{context.x}} / {{userPractitionerId}} tokens; None when a token cannot be filled."""
    context = request.context.model_dump(exclude_none=True)
    user = context.get("userId") or ""

    def value(name: str) -> str | None:
        if name.startswith("context."):
            got = context.get(name.removeprefix("context."))
            return got if isinstance(got, str) else None
        if name in ("userPractitionerId", "userPatientId", "userRelatedPersonId"):
            kind = name.removeprefix("user").removesuffix("Id")
            return user.split("/", 1)[1] if user.startswith(kind + "/") else None
        return None

    missing = False

    def replace(match: re.Match[str]) -> str:
        nonlocal missing
        got = value(match.group(1))
        if got is None:
            missing = True
            return ""
        return got

    filled = _TOKEN.sub(replace, query)
    return None if missing else filled


def _is_map(value: object) -> TypeGuard[Mapping[str, Any]]:
    # The exact-dict test first: JSON objects are dicts, and an ABC check costs several times more.
    return type(value) is dict or isinstance(value, Mapping)


def _error_outcome(outcome: Mapping[str, Any]) -> bool:
    issues = outcome.get("issue")
    return isinstance(issues, list) and any(
        _is_map(i) and i.get("severity") in ("error", "fatal") for i in issues
    )


def _entries(bundle: Mapping[str, Any]) -> list[dict[str, Any]]:
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        return []
    resources = []
    for entry in entries:
        if _is_map(entry):
            resource = entry.get("resource")
            if isinstance(resource, dict):
                resources.append(resource)
    return resources


def usable_resources(value: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """`resources_of(value)`, or None when the EHR or the server failed: an OperationOutcome, alone or
    an error inside the Bundle. One pass over the entries."""
    kind = value.get("resourceType")
    if kind == "OperationOutcome":
        return None
    if kind != "Bundle":
        return [dict(value)]
    resources = []
    for resource in _entries(value):
        if resource.get("resourceType") == "OperationOutcome":
            if _error_outcome(resource):
                return None
            continue
        resources.append(resource)
    return resources


def resources_of(value: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A Bundle's entry resources (OperationOutcomes left out), or the resource itself."""
    if value.get("resourceType") == "Bundle":
        return [r for r in _entries(value) if r.get("resourceType") != "OperationOutcome"]
    return [dict(value)]


def resolve(
    keys: Mapping[str, PrefetchKey],
    request: CdsRequest,
    fetcher: Fetcher | None,
) -> Resolved:
    result = Resolved()
    given = request.prefetch or {}
    to_fetch: dict[str, str] = {}
    unobtainable: list[str] = []
    for key, spec in keys.items():
        if key in given:
            value = given[key]
            if value is None:
                continue
            if isinstance(value, dict) and isinstance(value.get("resourceType"), str):
                usable = usable_resources(value)
                if usable is not None:
                    result.resources.extend(usable)
                    continue
            else:
                result.issues.append(f"prefetch '{key}' is not a FHIR resource")
        query = fill_template(spec.query, request)
        if request.fhirServer and query is not None and fetcher is not None:
            to_fetch[key] = query
        elif spec.required:
            unobtainable.append(key)
        else:
            result.missing.append(f"{spec.label} (not prefetched, no FHIR server to ask)")
    if unobtainable:
        raise PrefetchUnavailable(
            "prefetch data the rules need was not sent and cannot be fetched (no fhirServer in the request)",
            keys=unobtainable,
        )
    if to_fetch and fetcher is not None and request.fhirServer:
        token = request.fhirAuthorization.access_token if request.fhirAuthorization else None
        outcomes = fetcher.fetch_many(request.fhirServer, to_fetch, token)
        for key, outcome in outcomes.items():
            spec = keys[key]
            result.fetched[key] = outcome.error or "ok"
            usable = (
                usable_resources(outcome.resource)
                if outcome.error is None and outcome.resource is not None
                else None
            )
            if usable is not None:
                result.resources.extend(usable)
                if outcome.truncated:
                    result.issues.append(f"{spec.label}: only the first pages were read")
                continue
            reason = outcome.error or "the FHIR server answered with an OperationOutcome"
            result.missing.append(f"{spec.label} (could not be fetched: {reason})")
            if spec.required:
                result.incomplete.append(spec.label)
    return result


def unresolved_medications(resources: list[dict[str, Any]]) -> list[str]:
    targets: list[str] = []
    for resource in resources:
        if resource.get("resourceType") not in ("MedicationStatement", "MedicationRequest"):
            continue
        reference = resource.get("medicationReference")
        target = reference.get("reference") if _is_map(reference) else None
        if isinstance(target, str) and target.startswith("Medication/"):
            targets.append(target)
    if not targets:  # the usual case: medications are coded in place
        return []
    known = {f"{r.get('resourceType')}/{r.get('id')}" for r in resources}
    wanted = {t for t in targets if t not in known and FHIR_ID.match(t.removeprefix("Medication/"))}
    return sorted(wanted)[:MAX_MEDICATION_READS]


def fetch_medications(resolved: Resolved, request: CdsRequest, fetcher: Fetcher | None) -> None:
    """Read Medication resources that MedicationStatement/Request point at but nobody sent."""
    wanted = unresolved_medications(resolved.resources)
    if not wanted or fetcher is None or not request.fhirServer:
        return
    token = request.fhirAuthorization.access_token if request.fhirAuthorization else None
    outcomes = fetcher.fetch_many(request.fhirServer, {ref: ref for ref in wanted}, token)
    for ref, outcome in outcomes.items():
        if outcome.error is None and outcome.resource is not None:
            resolved.resources.append(outcome.resource)
        resolved.fetched[ref] = outcome.error or "ok"
