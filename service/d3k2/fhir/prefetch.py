"""Prefetch resolution: the four states of a key (CDS Hooks 2.0 "Prefetch"), then fallback fetching.

1. key absent → fetch from fhirServer (with the bearer token when given);
2. key null → the EHR has no data: nothing fetched;
3. OperationOutcome (alone or an error inside the Bundle) → failed at the EHR: fetch if possible; else the
   Bundle's other entries are used;
4. needed, not given and no fhirServer to ask → PrefetchUnavailable (HTTP 412) naming the keys, but only when
   no resource the rules read arrived under any key: otherwise the cards the arrived data supports are
   answered (contraindications included), as they would be if the key's fetch had failed.
A key that cannot be had in full is named on the answer (and blocks dosing suggestions when required). A
searchset with a `next` link or a `total` above its entries is a first page only: not had in full either.
What the data card says about a key not had in full is worded by cards/texts.toml [fetch].
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeGuard

from d3k2.core.errors import PrefetchUnavailable
from d3k2.core.hooks import FHIR_ID, CdsRequest
from d3k2.core.ruleset import PrefetchKey
from d3k2.core.texts import Texts
from d3k2.fhir.client import FetchOutcome

_TOKEN = re.compile(r"\{\{\s*([A-Za-z0-9_.]+)\s*\}\}")
# Medications referenced but not sent are read one by one: bounded so a long list cannot stall the call.
MAX_MEDICATION_READS = 20
# What the rules read (d3k2.core.facts): one of these arriving makes a missing required key a gap, not a 412.
_READ_BY_RULES = frozenset({"Observation", "Condition", "MedicationStatement", "MedicationRequest"})


class Fetcher(Protocol):
    def fetch_many(
        self, base_url: str, queries: Mapping[str, str], access_token: str | None
    ) -> dict[str, FetchOutcome]: ...


@dataclass
class Resolved:
    resources: list[dict[str, Any]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # "<label> (<reason>)" for the card
    incomplete: list[str] = field(default_factory=list)  # labels of required keys without data
    missing_keys: list[str] = field(default_factory=list)  # the keys `missing` names, in its order
    unknown: list[str] = field(default_factory=list)  # `PrefetchKey.unknown` facts of keys not had in full
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


def _outcome_codes(outcome: Mapping[str, Any]) -> list[str]:
    """The issue codes of an OperationOutcome (a fixed FHIR code list: never patient data)."""
    issues = outcome.get("issue")
    return [
        i["code"]
        for i in (issues if isinstance(issues, list) else [])
        if _is_map(i) and i.get("severity") in ("error", "fatal") and isinstance(i.get("code"), str)
    ]


def usable_resources(value: Mapping[str, Any], texts: Texts) -> tuple[list[dict[str, Any]], str | None]:
    """(`resources_of(value)`, None), or what arrived and why the rest did not when the EHR or the server
    failed (an OperationOutcome, alone or an error inside the Bundle) or sent only some pages of a search.
    One pass over the entries."""
    kind = value.get("resourceType")
    if kind == "OperationOutcome":
        return [], texts.fetch["operation_outcome"]
    if kind != "Bundle":
        return [dict(value)], None
    resources = []
    codes: list[str] = []
    failed = False
    for resource in _entries(value):
        if resource.get("resourceType") == "OperationOutcome":
            if _error_outcome(resource):
                failed = True
                codes += _outcome_codes(resource)
            continue
        resources.append(resource)
    # Entries, not the resources read from them: a malformed entry is named where it is read, not here.
    entries = value.get("entry")
    more = _more_pages(value, len(entries) if isinstance(entries, list) else 0, texts)
    if not failed:
        return resources, more
    error = (
        texts.fetch["bundle_error_codes"].format(codes=", ".join(sorted(set(codes))))
        if codes
        else texts.fetch["bundle_error"]
    )
    return resources, texts.fetch["and_pages"].format(error=error, pages=more) if more else error


def _more_pages(bundle: Mapping[str, Any], count: int, texts: Texts) -> str | None:
    """Why a searchset holds only part of the results: a `next` link (the EHR sent a first page only) or a
    `total` above the entries that arrived. What the other pages hold is unknown, so the key is incomplete."""
    links = bundle.get("link")
    has_next = isinstance(links, list) and any(_is_map(x) and x.get("relation") == "next" for x in links)
    total = bundle.get("total")
    short = type(total) is int and total > count
    if not (has_next or short):
        return None
    return (
        texts.fetch["first_page_of"].format(count=count, total=total) if short else texts.fetch["first_page"]
    )


def resources_of(value: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A Bundle's entry resources (OperationOutcomes left out), or the resource itself."""
    if value.get("resourceType") == "Bundle":
        return [r for r in _entries(value) if r.get("resourceType") != "OperationOutcome"]
    return [dict(value)]


def resolve(
    keys: Mapping[str, PrefetchKey],
    request: CdsRequest,
    fetcher: Fetcher | None,
    texts: Texts,
) -> Resolved:
    words = texts.fetch
    result = Resolved()
    given = request.prefetch or {}
    to_fetch: dict[str, str] = {}
    # What the EHR sent beside its error, used when the key cannot be fetched in full.
    partial: dict[str, list[dict[str, Any]]] = {}
    unobtainable: dict[str, str] = {}  # required key → why it is missing
    for key, spec in keys.items():
        reason = words["not_prefetched"]
        if key in given:
            value = given[key]
            if value is None:
                continue
            if isinstance(value, dict) and isinstance(value.get("resourceType"), str):
                resources, failure = usable_resources(value, texts)
                if failure is None:
                    result.resources.extend(resources)
                    continue
                partial[key], reason = resources, words["ehr_sent"].format(failure=failure)
            else:
                result.issues.append(words["not_resource"].format(label=spec.label))
        query = fill_template(spec.query, request)
        if request.fhirServer and query is not None and fetcher is not None:
            to_fetch[key] = query
            continue
        if partial.get(key):
            result.resources.extend(partial[key])
            reason = words["in_part"].format(reason=reason)
        if spec.unknown is not None:
            result.unknown.append(spec.unknown)
        if spec.required:
            unobtainable[key] = reason
        else:
            result.missing.append(words["no_server"].format(label=spec.label, reason=reason))
            result.missing_keys.append(key)
    if to_fetch and fetcher is not None and request.fhirServer:
        token = request.fhirAuthorization.access_token if request.fhirAuthorization else None
        outcomes = fetcher.fetch_many(request.fhirServer, to_fetch, token)
        for key, outcome in outcomes.items():
            spec = keys[key]
            result.fetched[key] = outcome.error or "ok"
            fetched, failure = (
                usable_resources(outcome.resource, texts)
                if outcome.error is None and outcome.resource is not None
                else ([], outcome.error or words["nothing"])
            )
            if failure is None:
                result.resources.extend(fetched)
                if outcome.truncated:
                    result.issues.append(words["first_pages_read"].format(label=spec.label))
                continue
            reason = outcome.error or words["server_sent"].format(failure=failure)
            arrived = fetched or partial.get(key)
            if arrived:
                result.resources.extend(arrived)
                reason = words["part_used"].format(reason=reason)
            result.missing.append(words["not_fetched"].format(label=spec.label, reason=reason))
            result.missing_keys.append(key)
            if spec.unknown is not None:
                result.unknown.append(spec.unknown)
            if spec.required:
                result.incomplete.append(spec.label)
    if unobtainable:
        if not any(_read_by_rules(r) for r in result.resources):
            raise PrefetchUnavailable(
                "prefetch data the rules need was not sent and cannot be fetched"
                " (no fhirServer in the request)",
                keys=list(unobtainable),
            )
        for key, reason in unobtainable.items():
            result.missing.append(words["no_server"].format(label=keys[key].label, reason=reason))
            result.missing_keys.append(key)
            result.incomplete.append(keys[key].label)
    return result


# The fetch key of a Medication read (``medication-1``, ...); ``Resolved.fetched`` names the reference.
MEDICATION_KEY = "medication"


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
    # Keyed by position, not by reference: the fetcher logs its keys, and a resource id is no log's.
    refs = {f"{MEDICATION_KEY}-{n}": ref for n, ref in enumerate(wanted, 1)}
    outcomes = fetcher.fetch_many(request.fhirServer, refs, token)
    for key, outcome in outcomes.items():
        if outcome.error is None and outcome.resource is not None:
            resolved.resources.append(outcome.resource)
        resolved.fetched[refs[key]] = outcome.error or "ok"


def _read_by_rules(resource: Mapping[str, Any]) -> bool:
    """True when a rule reads this type of resource; a `resourceType` that is no string names none."""
    kind = resource.get("resourceType")
    return isinstance(kind, str) and kind in _READ_BY_RULES
