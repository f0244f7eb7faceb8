"""Findings → CDS Hooks cards with suggestions built as valid R4 resources (pure)."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Mapping
from datetime import date, timedelta
from functools import lru_cache
from typing import Any

import orjson
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.servicerequest import ServiceRequest

from d3k2.core.engine import Evaluation, Finding, evaluate_condition
from d3k2.core.ruleset import Product, RuleSet, Suggestion
from d3k2.core.terminology import UCUM

TOPIC_SYSTEM = "https://d3k2.dev/fhir/CodeSystem/card-topic"
SUMMARY_LIMIT = 140
_INDICATOR_ORDER = {"critical": 0, "warning": 1, "info": 2}
# Suggested resources are validated with the patient reference set to this id, then given the real one:
# any FHIR id (what hooks.HookContext admits) makes an equally valid reference string.
_ANY_PATIENT = "d3k2-any-patient"
_NAMESPACE = uuid.NAMESPACE_URL.bytes


# A public key for offline tools (replay, explain, the preview, the goldens): their uuids are stable across
# runs and machines. The service keys its uuids with the deployment's secret instead (FeedbackStore.card_key).
OFFLINE_CARD_KEY = b"d3k2-offline-card-uuid-key"


def card_uuid(key: bytes, *, patient: str, hook: str, rule: str, draft: str, day: date) -> str:
    """The card's uuid: the same for the same patient, hook, rule and draft on the same (UTC) day, so that
    the cards an EHR asks for again and again (order-select fires on every keystroke) are one card in the
    feedback report. An HMAC-SHA256 keyed with the deployment's secret, so that the uuid (stored, logged,
    seen by the EHR) never lets the patient id be read back or guessed without that key. Formatted as an
    RFC 9562 version 8 (custom) uuid.

    CDS Hooks 2.0 allows a uuid to come back on later calls: a card's ``uuid`` is "Unique identifier of the
    card. MAY be used for auditing and logging cards and SHALL be included in any subsequent calls to the CDS
    service's feedback endpoint", and "the feedback endpoint may be called for multiple hook instances ...
    or even multiple times for a card or suggestion"; nothing asks for a new uuid per hookInstance
    (https://cds-hooks.hl7.org/2.0/#card-attributes, https://cds-hooks.hl7.org/2.0/#feedback).
    """
    message = orjson.dumps([patient, hook, rule, draft, day.isoformat()])
    digest = bytearray(hmac.new(key, message, hashlib.sha256).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x80  # version 8
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 9562 variant
    return _uuid_text(digest)


def draft_digest(finding: Finding) -> str:
    """The draft order a card is about, canonically: its reference, its medication and the ingredient
    judged; "" for a card about the patient. Dates and doses are left out: they change while the
    clinician fills in the order (a call per keystroke), and it is still the same order."""
    draft = finding.draft
    if draft is None:
        return ""
    ingredient = finding.ingredient.concept if finding.ingredient is not None else None
    canonical = orjson.dumps([draft.reference, draft.rxnorm_code, draft.medication_text, ingredient])
    return hashlib.sha256(canonical).hexdigest()


def suggestion_uuid(card_id: str, label: str) -> str:
    """uuid5 of the card's uuid and the suggestion's label: as stable as its card.

    `str(uuid.uuid5(uuid.NAMESPACE_URL, name))`, spelt out: the UUID object costs more than the hash.
    """
    name = f"d3k2:{card_id}:suggestion:{label}"
    digest = bytearray(hashlib.sha1(_NAMESPACE + name.encode(), usedforsecurity=False).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    return _uuid_text(digest)


def _uuid_text(digest: bytearray) -> str:
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _render(template: str, fields: Mapping[str, Any]) -> str:
    return template.format_map(fields).strip()


def _summary(text: str) -> str:
    text = " ".join(text.split())
    # A summary starts with a capital even when it opens with a field ("warfarin with vitamin K2 ...").
    if text[:1].islower() and not text[1:2].isupper():  # "warfarin ..." → "Warfarin ...", "eGFR" stays
        text = text[:1].upper() + text[1:]
    return text if len(text) < SUMMARY_LIMIT else text[: SUMMARY_LIMIT - 2].rstrip() + "…"


def medication_request(product: Product, patient_id: str, units: Mapping[str, str]) -> dict[str, Any]:
    """`units`: UCUM code → the unit word of the dose (cards/texts.toml [units])."""
    return _for_patient(_medication_resource(product, units), patient_id)


def _medication_resource(product: Product, units: Mapping[str, str]) -> bytes:
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
                    "unit": units.get(dosage.dose_unit, dosage.dose_unit),
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
    return validated_resource(orjson.dumps(resource))


def _concept(product: Product) -> dict[str, Any]:
    """Coded and with text: the sandbox applies a suggestion only when both are there."""
    code = product.code
    return {
        "coding": [{"system": code.system, "code": code.code, "display": code.display}],
        "text": product.text,
    }


def service_request(product: Product, patient_id: str, today: date) -> dict[str, Any]:
    return _for_patient(_service_resource(product, today), patient_id)


def _service_resource(product: Product, today: date) -> bytes:
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
    return validated_resource(orjson.dumps(resource))


@lru_cache(maxsize=512)
def validated_resource(resource: bytes) -> bytes:
    """Each distinct resource is validated with the R4B model once, not on every answer (≈ 0.5 ms each)."""
    raw = orjson.loads(resource)
    if raw["resourceType"] == "MedicationRequest":
        return orjson.dumps(MedicationRequest.model_validate(raw).model_dump(mode="json", exclude_none=True))
    return orjson.dumps(ServiceRequest.model_validate(raw).model_dump(mode="json", exclude_none=True))


def _for_patient(validated: bytes, patient_id: str) -> dict[str, Any]:
    resource: dict[str, Any] = orjson.loads(validated)
    resource["subject"]["reference"] = f"Patient/{patient_id}"
    return resource


def _resource(ruleset: RuleSet, name: str, today: date) -> bytes:
    product = ruleset.products[name]
    if product.kind == "medication":
        return _medication_resource(product, ruleset.texts.units)
    return _service_resource(product, today)


def prepare_cards(ruleset: RuleSet) -> None:
    """Validate every product a suggestion may create now: one that is not valid R4 stops startup rather
    than the first answer suggesting it (and the first answers need not validate them)."""
    for name in ruleset.products:
        _resource(ruleset, name, date.min)


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
    result: dict[str, Any] = {"label": label, "uuid": suggestion_uuid(card_id, label)}
    if suggestion.recommended:
        result["isRecommended"] = True
    actions: list[dict[str, Any]] = []
    if suggestion.delete_draft:
        assert finding.draft is not None
        actions.append({"type": "delete", "description": label, "resourceId": finding.draft.reference})
    if suggestion.product is not None:
        resource = _for_patient(_resource(ruleset, suggestion.product, today), patient_id)
        actions.append({"type": "create", "description": label, "resource": resource})
    result["actions"] = actions
    return result


def _offered(
    suggestion: Suggestion, finding: Finding, ruleset: RuleSet, profile: str, blocked: set[str]
) -> bool:
    """Profile-specific, conditional, and never a product another card on the answer warns against."""
    if suggestion.profiles is not None and profile not in suggestion.profiles:
        return False
    if (
        suggestion.product
        and blocked
        and not blocked.isdisjoint(ruleset.products[suggestion.product].categories)
    ):
        return False
    if suggestion.when is not None:
        return evaluate_condition(suggestion.when, finding.values, ruleset.conditions) is True
    return True


def build_cards(
    ruleset: RuleSet,
    evaluation: Evaluation,
    *,
    hook: str,
    patient_id: str,
    card_key: bytes,
    smart_url: str | None = None,
) -> list[dict[str, Any]]:
    """`smart_url`: the "Why this card?" SMART app's launch URL; each card of a patient rule that
    patient-view evaluates (what the app re-runs) then links to it, naming its rule and the patient in
    `appContext`."""
    blocked = {category for f in evaluation.findings for category in f.rule.blocks}
    today = evaluation.facts.today
    ranked: list[tuple[int, int, str, dict[str, Any]]] = []
    for finding in evaluation.findings:
        rule = finding.rule
        sources = [ruleset.sources[s] for s in rule.sources]
        card_id = card_uuid(
            card_key, patient=patient_id, hook=hook, rule=rule.id, draft=draft_digest(finding), day=today
        )
        suggestions = [
            _suggestion(s, finding, ruleset, card_id=card_id, patient_id=patient_id, today=today)
            for s in rule.suggestions
            if _offered(s, finding, ruleset, evaluation.profile, blocked)
        ]
        detail = _render(rule.detail, finding.fields)
        if "vitd" in rule.reads:
            profile = ruleset.profiles[evaluation.profile]
            detail += ruleset.texts.thresholds.format(name=evaluation.profile, title=profile.title)
        card: dict[str, Any] = {
            "uuid": card_id,
            "summary": _summary(_render(rule.summary, finding.fields)),
            "indicator": finding.indicator,
            "detail": detail,
            "source": {
                "label": sources[0].label,
                "url": sources[0].url,
                "topic": {"system": TOPIC_SYSTEM, "code": rule.topic.code, "display": rule.topic.display},
            },
            "links": [{"label": s.label, "url": s.url, "type": "absolute"} for s in sources],
        }
        if smart_url is not None and rule.scope == "patient" and "patient-view" in rule.hooks:
            card["links"].append(
                {
                    "label": ruleset.texts.smart_link,
                    "url": smart_url,
                    "type": "smart",
                    # The patient too: the app refuses a launch whose token names another patient.
                    "appContext": orjson.dumps({"rule": rule.id, "patient": patient_id}).decode(),
                }
            )
        if suggestions:
            card["suggestions"] = suggestions
            card["selectionBehavior"] = "at-most-one"
        if rule.override_reasons:
            card["overrideReasons"] = [reason.model_dump() for reason in rule.override_reasons]
        ranked.append((_INDICATOR_ORDER[finding.indicator], rule.priority, card_id, card))
    # Most urgent first, then the rule set's own order (a deficiency card with its order stands above the
    # K2 card that pairs with it); the uuid only breaks ties between draft-order cards of one rule.
    ranked.sort(key=lambda r: r[:3])
    return [r[3] for r in ranked]
