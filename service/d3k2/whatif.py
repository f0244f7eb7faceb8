"""What-if evaluation for `d3k2 explain` (and later the preview page): build a CDS Hooks request from a
plain FHIR Bundle, change a patient's data with overrides such as ``vitd=18ng/mL`` or ``warfarin=off``,
and explain the evaluation (facts with their source resources, every rule's verdict, the cards).

Pure: no Flask, no requests, no clock. I/O comes in only through the Fetcher the caller passes.
An override works on FHIR resources, not on facts, so the facts extractor and the rules run exactly
as they do for a real request.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from d3k2.core.engine import Evaluation, values_snapshot
from d3k2.core.errors import BadRequest
from d3k2.core.hooks import CdsRequest
from d3k2.core.labs import LabConfig, Measurement
from d3k2.core.quantities import format_interval
from d3k2.core.record import Evidence
from d3k2.core.ruleset import ORDER_HOOKS, RuleSet
from d3k2.core.terminology import LOINC, RXNORM, SNOMED, UCUM
from d3k2.fhir.prefetch import Fetcher, Resolved, resources_of
from d3k2.service import call_service, classifier

WHATIF_PREFIX = "whatif-"
WARFARIN_RXNORM = "855332"
K2_RXNORM = "1537458"
PREGNANCY_SNOMED = "77386006"
_LABS = ("vitd", "egfr", "calcium")
_SWITCHES = {"warfarin": ("on", "off"), "k2": ("on", "off"), "pregnant": ("yes", "no")}
_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(\S.*)?$")
# The UCUM code sent for a lab's canonical unit when an override gives none.
_UCUM_CODE = {"mL/min/1.73 m²": "mL/min/{1.73_m2}"}


class OverrideError(BadRequest):
    """An override (``--set``) that cannot be understood."""

    code = "override-invalid"


# ---------------------------------------------------------------- requests from plain bundles


def bundle_patient_ids(bundle: Mapping[str, Any]) -> list[str]:
    return sorted(
        {
            str(r["id"])
            for r in resources_of(bundle)
            if r.get("resourceType") == "Patient" and isinstance(r.get("id"), str)
        }
    )


def request_from_bundle(
    bundle: Mapping[str, Any],
    *,
    hook: str,
    patient_id: str | None,
    prefetch_keys: Sequence[str],
    content: bytes,
) -> dict[str, Any]:
    """A CDS Hooks request carrying one patient's Bundle.

    The whole Bundle goes under the first prefetch key and every other key is sent as null ("the EHR has
    no data"): facts read every resource whatever key it came under, and nothing is fetched. For order
    hooks the Bundle's draft MedicationRequests become the draft orders (and leave the record). The
    hookInstance is derived from the file's bytes, so card uuids are the same on every run.
    """
    if bundle.get("resourceType") != "Bundle":
        raise BadRequest("not a FHIR Bundle (resourceType must be 'Bundle')")
    if not prefetch_keys:
        raise BadRequest(f"the service for {hook!r} declares no prefetch keys to carry the Bundle")
    patients = bundle_patient_ids(bundle)
    if patient_id is None:
        if len(patients) != 1:
            found = ", ".join(patients) or "none"
            raise BadRequest(f"pass --patient: the Bundle holds {len(patients)} Patient resources ({found})")
        patient_id = patients[0]
    elif patients and patient_id not in patients:
        raise BadRequest(f"the Bundle has no Patient/{patient_id} (it has {', '.join(patients)})")
    if len(patients) > 1:
        raise BadRequest(f"the Bundle holds {len(patients)} patients; replay one patient's data at a time")
    entry_list = bundle.get("entry")
    entries: list[Any] = entry_list if isinstance(entry_list, list) else []
    drafts: list[dict[str, Any]] = []
    record: list[Any] = []
    for entry in entries:
        resource = entry.get("resource") if isinstance(entry, Mapping) else None
        is_draft = (
            isinstance(resource, Mapping)
            and resource.get("resourceType") == "MedicationRequest"
            and resource.get("status") == "draft"
        )
        if hook in ORDER_HOOKS and is_draft:
            drafts.append(dict(resource))  # type: ignore[arg-type]
        else:
            record.append(entry)
    first, *others = prefetch_keys
    data = {**bundle, "entry": record}
    context: dict[str, Any] = {"patientId": patient_id}
    if hook in ORDER_HOOKS:
        orders = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": d} for d in drafts]}
        if hook == "medication-prescribe":
            context["medications"] = orders
        else:
            context["draftOrders"] = orders
        if hook == "order-select":
            context["selections"] = [f"MedicationRequest/{d.get('id')}" for d in drafts]
    digest = hashlib.sha256(content).hexdigest()
    return {
        "hook": hook,
        "hookInstance": str(uuid.uuid5(uuid.NAMESPACE_URL, f"d3k2-replay:{digest}")),
        "context": context,
        "prefetch": {first: data, **dict.fromkeys(others)},
    }


# ---------------------------------------------------------------- overrides


@dataclass(frozen=True)
class Override:
    name: str  # vitd | egfr | calcium | warfarin | k2 | pregnant
    text: str  # as given, e.g. "vitd=18ng/mL"
    value: float | None = None
    unit: str | None = None
    on: bool | None = None


@dataclass(frozen=True)
class Applied:
    override: str
    added: str | None
    removed: tuple[str, ...]


def parse_override(text: str, ruleset: RuleSet) -> Override:
    """``vitd=18ng/mL``, ``vitd=45nmol/L``, ``egfr=25``, ``calcium=11.2mg/dL``, ``warfarin=on|off``,
    ``k2=on|off``, ``pregnant=yes|no``."""
    name, sep, raw = text.partition("=")
    name, raw = name.strip().lower(), raw.strip()
    known = ", ".join((*_LABS, *_SWITCHES))
    if not sep or not raw:
        raise OverrideError(f"override {text!r}: expected NAME=VALUE ({known})")
    if name in _SWITCHES:
        yes, no = _SWITCHES[name]
        if raw.lower() not in (yes, no):
            raise OverrideError(f"override {text!r}: {name} takes {yes} or {no}")
        return Override(name, text, on=raw.lower() == yes)
    if name not in _LABS or name not in ruleset.facts.labs:
        raise OverrideError(f"override {text!r}: unknown name {name!r} (known: {known})")
    lab = ruleset.facts.labs[name]
    match = _QUANTITY.match(raw)
    if not match:
        raise OverrideError(f"override {text!r}: {name} takes a number with an optional unit, e.g. 25")
    unit = (match.group(2) or "").strip() or lab.canonical_unit
    if unit not in lab.units:
        units = ", ".join(sorted(lab.units))
        raise OverrideError(f"override {text!r}: unit {unit!r} not understood for {lab.label} ({units})")
    return Override(name, text, value=float(match.group(1)), unit=unit)


def _lab_valuesets(lab: LabConfig) -> set[str]:
    return {
        *lab.total,
        *lab.d3_fraction,
        *lab.d2_fraction,
        *lab.primary,
        *lab.fallback,
    }


def _loinc_concepts(resource: Mapping[str, Any], ruleset: RuleSet) -> frozenset[str]:
    return ruleset.terminology.concepts_of(resource.get("code"))


def _lab_code(lab: LabConfig, ruleset: RuleSet) -> tuple[str, str]:
    """The first LOINC code the facts extractor reads as this lab's main result."""
    main = (lab.total or lab.primary)[0]
    for system, code in ruleset.terminology.codes_in(main):
        concepts = ruleset.terminology.concepts(system, code)
        if system == LOINC and code not in lab.race_coefficients and not concepts & set(lab.exclude):
            return system, code
    raise OverrideError(f"the rule set's value set {main!r} has no usable LOINC code")


def _ref(resource: Mapping[str, Any]) -> str:
    return f"{resource.get('resourceType')}/{resource.get('id', '(no id)')}"


def _lab_observation(override: Override, ruleset: RuleSet, today: date, patient_id: str) -> dict[str, Any]:
    lab = ruleset.facts.labs[override.name]
    system, code = _lab_code(lab, ruleset)
    coding = {"system": system, "code": code}
    display = ruleset.terminology.display(system, code)
    if display:
        coding["display"] = display
    unit = override.unit or lab.canonical_unit
    return {
        "resourceType": "Observation",
        "id": f"{WHATIF_PREFIX}{override.name}",
        "status": "final",
        "code": {
            "coding": [coding],
            "text": f"{lab.label} (what-if)",
        },
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": today.isoformat(),
        "valueQuantity": {
            "value": override.value,
            "unit": unit,
            "system": UCUM,
            "code": _UCUM_CODE.get(unit, unit),
        },
    }


def _statement(name: str, rxnorm: str, ruleset: RuleSet, today: date, patient_id: str) -> dict[str, Any]:
    display = ruleset.terminology.display(RXNORM, rxnorm) or name
    return {
        "resourceType": "MedicationStatement",
        "id": f"{WHATIF_PREFIX}{name}",
        "status": "active",
        "medicationCodeableConcept": {
            "coding": [{"system": RXNORM, "code": rxnorm, "display": display}],
            "text": display,
        },
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": today.isoformat(),
    }


def _pregnancy(ruleset: RuleSet, today: date, patient_id: str) -> dict[str, Any]:
    display = ruleset.terminology.display(SNOMED, PREGNANCY_SNOMED) or "Pregnancy"
    clinical = "http://terminology.hl7.org/CodeSystem/condition-clinical"
    verification = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
    return {
        "resourceType": "Condition",
        "id": f"{WHATIF_PREFIX}pregnant",
        "clinicalStatus": {"coding": [{"system": clinical, "code": "active"}]},
        "verificationStatus": {"coding": [{"system": verification, "code": "confirmed"}]},
        "code": {
            "coding": [{"system": SNOMED, "code": PREGNANCY_SNOMED, "display": display}],
            "text": display,
        },
        "subject": {"reference": f"Patient/{patient_id}"},
        "onsetDateTime": today.isoformat(),
    }


def _medication_codeable(resource: Mapping[str, Any], everything: Sequence[Mapping[str, Any]]) -> Any:
    if "medicationCodeableConcept" in resource:
        return resource["medicationCodeableConcept"]
    reference = resource.get("medicationReference")
    target = reference.get("reference") if isinstance(reference, Mapping) else None
    if isinstance(target, str):
        pool = resource.get("contained") if target.startswith("#") else everything
        wanted = target.removeprefix("#").rsplit("/", 1)[-1]
        for item in pool if isinstance(pool, list | tuple) else ():
            if (
                isinstance(item, Mapping)
                and item.get("resourceType") == "Medication"
                and item.get("id") == wanted
            ):
                return item.get("code")
    display = reference.get("display") if isinstance(reference, Mapping) else None
    return {"text": display} if isinstance(display, str) else None


def _matches(
    resource: Mapping[str, Any], override: Override, ruleset: RuleSet, everything: Sequence[Any]
) -> bool:
    """Is this resource of the kind the override replaces (or removes)?"""
    rtype = resource.get("resourceType")
    if override.name in _LABS:
        lab = ruleset.facts.labs[override.name]
        return rtype == "Observation" and bool(_loinc_concepts(resource, ruleset) & _lab_valuesets(lab))
    if override.name in ("warfarin", "k2"):
        if rtype not in ("MedicationStatement", "MedicationRequest"):
            return False
        category = "vka" if override.name == "warfarin" else "vitamin-k2"
        codeable = _medication_codeable(resource, everything)
        return any(found == category for found, _name, _by in classifier(ruleset)(codeable))
    pregnancy = ruleset.facts.states["pregnancy"]
    if rtype == "Condition":
        return bool(ruleset.terminology.concepts_of(resource.get("code")) & set(pregnancy.conditions))
    if rtype == "Observation":
        return bool(_loinc_concepts(resource, ruleset) & set(pregnancy.observation))
    return False


def apply_overrides(
    resources: Iterable[Mapping[str, Any]],
    overrides: Sequence[Override],
    ruleset: RuleSet,
    *,
    today: date,
    patient_id: str,
) -> tuple[list[dict[str, Any]], list[Applied]]:
    """Each override removes the resources of its kind, then (for a value, on, yes) adds one dated today,
    so the synthetic resource is the one the facts extractor reads."""
    current = [dict(r) for r in resources]
    applied: list[Applied] = []
    for override in overrides:
        kept = [r for r in current if not _matches(r, override, ruleset, current)]
        removed = tuple(_ref(r) for r in current if r not in kept)
        added: dict[str, Any] | None = None
        if override.name in _LABS:
            added = _lab_observation(override, ruleset, today, patient_id)
        elif override.on and override.name == "warfarin":
            added = _statement("warfarin", WARFARIN_RXNORM, ruleset, today, patient_id)
        elif override.on and override.name == "k2":
            added = _statement("k2", K2_RXNORM, ruleset, today, patient_id)
        elif override.on and override.name == "pregnant":
            added = _pregnancy(ruleset, today, patient_id)
        current = [*kept, added] if added else kept
        applied.append(Applied(override.text, _ref(added) if added else None, removed))
    return current, applied


# ---------------------------------------------------------------- explanation


@dataclass(frozen=True)
class Explanation:
    service: str
    request: CdsRequest
    today: date
    resolved: Resolved
    evaluation: Evaluation
    response: dict[str, Any]
    applied: tuple[Applied, ...]


def explain(
    ruleset: RuleSet,
    service_id: str,
    payload: Any,
    *,
    today: date,
    profile: str,
    fetcher: Fetcher | None,
    overrides: Sequence[Override] = (),
) -> Explanation:
    """call_service with the overrides applied between reading the resources and extracting facts."""
    if profile not in ruleset.profiles:
        raise BadRequest(f"unknown profile {profile!r} (known: {', '.join(sorted(ruleset.profiles))})")
    applied: list[Applied] = []

    def adjust(resources: list[dict[str, Any]], request: CdsRequest) -> list[dict[str, Any]]:
        changed, done = apply_overrides(
            resources, overrides, ruleset, today=today, patient_id=request.context.patientId
        )
        applied.extend(done)
        return changed

    outcome = call_service(
        ruleset, service_id, payload, today=today, profile=profile, fetcher=fetcher, adjust=adjust, trace=True
    )
    return Explanation(
        service_id,
        outcome.request,
        today,
        outcome.resolved,
        outcome.evaluation,
        outcome.response,
        tuple(applied),
    )


def verdict(fired: bool | None) -> str:
    return "fired" if fired else ("silent" if fired is False else "cannot tell")


def _measurement(m: Measurement | None) -> dict[str, Any] | None:
    if m is None:
        return None
    return {
        "value": format_interval(m.value, m.unit, m.decimals, m.marks),  # never across a threshold
        "reported": m.reported,
        "unit": m.unit,
        "date": m.when.isoformat(),
        "age_days": m.age_days,
        "stale": m.stale,
        "status": m.status,
        "code": m.code,
        "source": m.source,
        "notes": list(m.notes),
        "kind": m.kind or None,
    }


def _evidence(items: Iterable[Evidence]) -> list[dict[str, Any]]:
    return [
        {"text": e.text, "source": e.source, "date": e.when.isoformat() if e.when else None} for e in items
    ]


def report(explanation: Explanation, ruleset: RuleSet) -> dict[str, Any]:
    """The explanation as JSON-friendly data (``d3k2 explain --format json``, the preview page)."""
    evaluation = explanation.evaluation
    facts = evaluation.facts
    traces: dict[str, list[dict[str, Any]]] = {}
    for trace in evaluation.traces:
        traces.setdefault(trace.rule, []).append(
            {"verdict": verdict(trace.fired), "draft": trace.draft, "reasons": list(trace.reasons)}
        )
    rules: list[dict[str, Any]] = []
    for rule in ruleset.rules_for(evaluation.hook):
        evaluated = traces.get(rule.id, [])
        if not evaluated:
            evaluated = [{"verdict": "not evaluated", "draft": None, "reasons": ["no draft orders to judge"]}]
        rules.extend({"rule": rule.id, "title": rule.title, "scope": rule.scope, **t} for t in evaluated)
    return {
        "service": explanation.service,
        "hook": evaluation.hook,
        "patient": explanation.request.context.patientId,
        "today": explanation.today.isoformat(),
        "profile": evaluation.profile,
        "overrides": [
            {"override": a.override, "added": a.added, "removed": list(a.removed)}
            for a in explanation.applied
        ],
        "facts": {
            "vitd": _measurement(facts.vitd),
            "egfr": _measurement(facts.egfr),
            "calcium": _measurement(facts.calcium),
            "age": {
                "band": facts.age.band,
                "months": facts.age.months,
                "birth_date": facts.age.birth_date,
                "why_unknown": facts.age.why_unknown or None,
            },
            "medications": [
                {
                    "category": m.category,
                    "name": m.name,
                    "status": m.status,
                    "source": m.source,
                    "matched_by": m.matched_by,
                    "product": m.product,
                    "daily": m.daily,
                    "dose": m.dose,
                }
                for m in facts.medications
            ],
            "conditions": {name: _evidence(items) for name, items in facts.conditions.items()},
            "pregnancy": _evidence(facts.pregnancy),
            "lactation": _evidence(facts.lactation),
            "issues": list(facts.issues),
            "missing": list(facts.missing),
            "incomplete": list(facts.incomplete),
            "copies": list(facts.copies),
            "unknown_medications": [
                {"name": m.name, "reason": m.reason, "source": m.source} for m in facts.unknown_medications
            ],
            "fetched": dict(sorted(explanation.resolved.fetched.items())),
        },
        "values": values_snapshot(evaluation.values),
        "rules": rules,
        "cards": [
            {
                "indicator": card["indicator"],
                "topic": card["source"]["topic"]["code"],
                "summary": card["summary"],
                "uuid": card["uuid"],
            }
            for card in explanation.response["cards"]
        ],
        "response": explanation.response,
    }
