"""Findings → CDS Hooks cards with suggestions built as valid R4 resources (pure)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import date, timedelta
from functools import lru_cache
from typing import Any

import orjson
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.servicerequest import ServiceRequest

from d3k2.engine import Evaluation, Finding, evaluate_condition
from d3k2.ruleset import Product, RuleSet, Suggestion
from d3k2.terminology import UCUM

TOPIC_SYSTEM = "https://d3k2.dev/fhir/CodeSystem/card-topic"
SUMMARY_LIMIT = 140
_INDICATOR_ORDER = {"critical": 0, "warning": 1, "info": 2}
_UCUM_UNIT_NAMES = {"{tbl}": "tablet", "{capsule}": "capsule", "{drop}": "drop", "[iU]": "IU", "ug": "mcg"}
# Suggested resources are validated with the patient reference set to this id, then given the real one:
# any FHIR id (what hooks.HookContext admits) makes an equally valid reference string.
_ANY_PATIENT = "d3k2-any-patient"


def card_uuid(hook_instance: str, *parts: str) -> str:
    """Stable across replays of the same request, distinct per rule (and per draft order)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "d3k2:" + ":".join((hook_instance, *parts))))


def _render(template: str, fields: Mapping[str, Any]) -> str:
    return template.format_map(fields).strip()


def _summary(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) < SUMMARY_LIMIT else text[: SUMMARY_LIMIT - 2].rstrip() + "…"


def medication_request(product: Product, patient_id: str) -> dict[str, Any]:
    dosage = product.dosage
    instruction: dict[str, Any] = {"text": f"{product.text}: {product.dose_text}"}
    if product.patient_instruction:
        instruction["patientInstruction"] = product.patient_instruction
    if dosage is not None:
        repeat: dict[str, Any] = {
            "frequency": dosage.frequency,
            "period": dosage.period,
            "periodUnit": dosage.period_unit,
        }
        if dosage.duration_weeks:
            repeat["boundsDuration"] = {
                "value": dosage.duration_weeks,
                "unit": "weeks",
                "system": UCUM,
                "code": "wk",
            }
        instruction["timing"] = {"repeat": repeat}
        instruction["doseAndRate"] = [
            {
                "doseQuantity": {
                    "value": dosage.dose_value,
                    "unit": _UCUM_UNIT_NAMES.get(dosage.dose_unit, dosage.dose_unit),
                    "system": UCUM,
                    "code": dosage.dose_unit,
                }
            }
        ]
    resource = {
        "resourceType": "MedicationRequest",
        "status": "draft",
        "intent": "proposal",
        "subject": {"reference": f"Patient/{_ANY_PATIENT}"},
        "medicationCodeableConcept": _concept(product),
        "dosageInstruction": [instruction],
    }
    return _for_patient(_validated(orjson.dumps(resource)), patient_id)


def _concept(product: Product) -> dict[str, Any]:
    """Coded and with text: the sandbox applies a suggestion only when both are there."""
    code = product.code
    return {
        "coding": [{"system": code.system, "code": code.code, "display": code.display}],
        "text": product.text,
    }


def service_request(product: Product, patient_id: str, today: date) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "draft",
        "intent": "proposal",
        "subject": {"reference": f"Patient/{_ANY_PATIENT}"},
        "code": _concept(product),
    }
    if product.occurrence_weeks:
        resource["occurrenceDateTime"] = (today + timedelta(weeks=product.occurrence_weeks)).isoformat()
    if product.note:
        resource["note"] = [{"text": product.note}]
    return _for_patient(_validated(orjson.dumps(resource)), patient_id)


@lru_cache(maxsize=512)
def _validated(resource: bytes) -> bytes:
    """Each distinct resource is validated with the R4B model once, not on every answer (≈ 0.5 ms each)."""
    raw = orjson.loads(resource)
    if raw["resourceType"] == "MedicationRequest":
        return orjson.dumps(MedicationRequest.model_validate(raw).model_dump(mode="json", exclude_none=True))
    return orjson.dumps(ServiceRequest.model_validate(raw).model_dump(mode="json", exclude_none=True))


def _for_patient(validated: bytes, patient_id: str) -> dict[str, Any]:
    resource: dict[str, Any] = orjson.loads(validated)
    resource["subject"]["reference"] = f"Patient/{patient_id}"
    return resource


def _suggestion(
    suggestion: Suggestion,
    finding: Finding,
    ruleset: RuleSet,
    *,
    card_id: str,
    patient_id: str,
    today: date,
) -> dict[str, Any]:
    label = _render(suggestion.label, finding.fields)
    result: dict[str, Any] = {"label": label, "uuid": card_uuid(card_id, "suggestion", label)}
    if suggestion.recommended:
        result["isRecommended"] = True
    if suggestion.delete_draft:
        assert finding.draft is not None
        result["actions"] = [
            {"type": "delete", "description": label, "resourceId": finding.draft.reference},
        ]
        return result
    assert suggestion.product is not None
    product = ruleset.products[suggestion.product]
    if product.kind == "medication":
        resource = medication_request(product, patient_id)
    else:
        resource = service_request(product, patient_id, today)
    result["actions"] = [{"type": "create", "description": label, "resource": resource}]
    return result


def _offered(
    suggestion: Suggestion, finding: Finding, ruleset: RuleSet, profile: str, blocked: set[str]
) -> bool:
    """Profile-specific, conditional, and never a product another card on the answer warns against."""
    if suggestion.profiles is not None and profile not in suggestion.profiles:
        return False
    if suggestion.product and set(ruleset.products[suggestion.product].categories) & blocked:
        return False
    if suggestion.when is not None:
        return evaluate_condition(suggestion.when, finding.values, ruleset.conditions, None) is True
    return True


def build_cards(
    ruleset: RuleSet,
    evaluation: Evaluation,
    *,
    hook_instance: str,
    patient_id: str,
) -> list[dict[str, Any]]:
    blocked = {category for f in evaluation.findings for category in f.rule.blocks}
    cards: list[dict[str, Any]] = []
    for finding in evaluation.findings:
        rule = finding.rule
        parts = [rule.id] if finding.draft is None else [rule.id, finding.draft.reference]
        if finding.ingredient is not None:
            parts.append(finding.ingredient.concept)
        card_id = card_uuid(hook_instance, *parts)
        primary = ruleset.sources[rule.sources[0]]
        suggestions = [
            _suggestion(
                s, finding, ruleset, card_id=card_id, patient_id=patient_id, today=evaluation.facts.today
            )
            for s in rule.suggestions
            if _offered(s, finding, ruleset, evaluation.profile, blocked)
        ]
        detail = _render(rule.detail, finding.fields)
        if "vitd" in rule.reads:
            profile = ruleset.profiles[evaluation.profile]
            detail += f"\n\nThresholds: profile `{evaluation.profile}` ({profile.title})."
        card: dict[str, Any] = {
            "uuid": card_id,
            "summary": _summary(_render(rule.summary, finding.fields)),
            "indicator": finding.indicator,
            "detail": detail,
            "source": {
                "label": primary.label,
                "url": primary.url,
                "topic": {"system": TOPIC_SYSTEM, "code": rule.topic.code, "display": rule.topic.display},
            },
            "links": [
                {"label": ruleset.sources[s].label, "url": ruleset.sources[s].url, "type": "absolute"}
                for s in rule.sources
            ],
        }
        if suggestions:
            card["suggestions"] = suggestions
            card["selectionBehavior"] = "at-most-one"
        if rule.override_reasons:
            card["overrideReasons"] = [c.model_dump() for c in rule.override_reasons]
        cards.append(card)
    cards.sort(key=lambda c: (_INDICATOR_ORDER[c["indicator"]], c["source"]["topic"]["code"], c["uuid"]))
    return cards
