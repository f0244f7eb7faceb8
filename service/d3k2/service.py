"""One CDS Hooks call from parsed JSON to the response: request model → prefetch/fetch → facts →
rules → cards. No Flask here, so the CLI (replay, explain) runs exactly the same path as HTTP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Any

from d3k2.core.cards import OFFLINE_CARD_KEY, build_cards, prepare_cards
from d3k2.core.drafts import DraftReading, read_draft_orders
from d3k2.core.engine import Evaluation, evaluate
from d3k2.core.errors import BadRequest, UnknownService
from d3k2.core.facts import Facts, extract_facts
from d3k2.core.hooks import CdsRequest, parse_request
from d3k2.core.medication_reader import medication_doses
from d3k2.core.record import MedicationClassifier, MedicationDoser
from d3k2.core.ruleset import ORDER_HOOKS, RuleSet, Service
from d3k2.fhir.prefetch import Fetcher, Resolved, fetch_medications, resolve

# Changes the resources between reading them and extracting facts (what-if overrides of `d3k2 explain`).
Adjust = Callable[[list[dict[str, Any]], CdsRequest], list[dict[str, Any]]]


@dataclass(frozen=True)
class Outcome:
    request: CdsRequest
    response: dict[str, Any]
    evaluation: Evaluation
    resolved: Resolved
    drafts: DraftReading | None


def classifier(ruleset: RuleSet) -> MedicationClassifier:
    """Remembered per distinct CodeableConcept by the rule set (`RuleSet.medications`)."""
    return ruleset.medications.concepts


def dose_reader(ruleset: RuleSet) -> MedicationDoser:
    """The daily doses of a medication on record, by the rule set's `MedicationReader` (remembered)."""
    medications = ruleset.medications
    return lambda codeable, dosages: medication_doses(medications, codeable, dosages)


def prepare(ruleset: RuleSet) -> RuleSet:
    """Validate the suggested resources now (at startup), not on the first call that suggests them."""
    prepare_cards(ruleset)
    return ruleset


def discovery(ruleset: RuleSet) -> dict[str, Any]:
    return {
        "services": [
            {
                "hook": svc.hook,
                "id": svc.id,
                "title": svc.title,
                "description": svc.description,
                "prefetch": {key: spec.query for key, spec in svc.prefetch.items()},
            }
            for svc in ruleset.services.values()
        ]
    }


def find_service(ruleset: RuleSet, service_id: str) -> Service:
    service = ruleset.services.get(service_id)
    if service is None:
        raise UnknownService(f"no CDS service with id {service_id!r}", service=service_id)
    return service


def facts_for(
    ruleset: RuleSet, resources: list[dict[str, Any]], today: date, resolved: Resolved | None = None
) -> Facts:
    return extract_facts(
        resources,
        today=today,
        config=ruleset.facts,
        terminology=ruleset.terminology,
        classify=classifier(ruleset),
        doses=dose_reader(ruleset),
        missing=resolved.missing if resolved else (),
        missing_keys=resolved.missing_keys if resolved else (),
        incomplete=resolved.incomplete if resolved else (),
        issues=resolved.issues if resolved else (),
        unknown=resolved.unknown if resolved else (),
    )


def drafts_of(ruleset: RuleSet, request: CdsRequest) -> DraftReading | None:
    if request.hook not in ORDER_HOOKS:
        return None
    context = request.context
    orders = context.draftOrders if context.draftOrders is not None else context.medications
    selections = context.selections if request.hook == "order-select" else None
    return read_draft_orders(orders, selections, ruleset.medications)


def call_service(
    ruleset: RuleSet,
    service_id: str,
    payload: Any,
    *,
    today: date,
    profile: str,
    fetcher: Fetcher | None,
    adjust: Adjust | None = None,
    trace: bool = False,
    card_key: bytes = OFFLINE_CARD_KEY,
    smart_url: str | None = None,
) -> Outcome:
    """``card_key`` keys the card uuids (d3k2.core.cards.card_uuid): the HTTP service passes its
    deployment's secret; offline tools (replay, explain, the preview) keep the public default."""
    service = find_service(ruleset, service_id)
    request = parse_request(payload)
    if request.hook != service.hook:
        raise BadRequest(f"service {service_id!r} answers hook {service.hook!r}, not {request.hook!r}")
    resolved = resolve(service.prefetch, request, fetcher, ruleset.texts)
    fetch_medications(resolved, request, fetcher)
    resources = adjust(resolved.resources, request) if adjust else resolved.resources
    facts = facts_for(ruleset, resources, today, resolved)
    drafts = drafts_of(ruleset, request)
    evaluation = evaluate(ruleset, facts, hook=request.hook, profile=profile, drafts=drafts, trace=trace)
    cards = build_cards(
        ruleset,
        evaluation,
        hook=request.hook,
        patient_id=request.context.patientId,
        card_key=card_key,
        smart_url=smart_url,
    )
    return Outcome(request, {"cards": cards, "systemActions": []}, evaluation, resolved, drafts)
