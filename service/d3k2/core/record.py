"""Conditions, pregnancy, lactation and medications on record → Evidence and MedicationFacts. Pure: no Flask,
no requests, no clock."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date
from typing import TYPE_CHECKING, Any

from d3k2.core.dosage import IngredientDose
from d3k2.core.readers import (
    codeable_text,
    medication_text,
    nonempty_str,
    observation_date,
    parse_date,
    ref_of,
    status_code,
)
from d3k2.core.terminology import Terminology

if TYPE_CHECKING:  # the config of the whole reading, of which the record is part
    from d3k2.core.facts import FactsConfig

# A medication classifier maps a medication CodeableConcept to (category, name, matched_by) triples.
MedicationClassifier = Callable[[object], Sequence[tuple[str, str, str]]]
# A dose reader maps (medication CodeableConcept, dosage instructions) to the daily dose of each ingredient.
MedicationDoser = Callable[[object, object], Sequence[IngredientDose]]
# Categories whose current products carry their daily dose (CLINICAL.md 5: a current vitamin D product).
DOSED = frozenset({"vitamin-d"})


@dataclass(frozen=True)
class Evidence:
    concept: str
    text: str
    source: str
    when: date | None = None


# The states read like pregnancy, each a section of facts.toml and an Evidence tuple of `Facts`.
STATES = ("pregnancy", "lactation")


@dataclass(frozen=True)
class StateConfig:
    """A state read like pregnancy (facts.toml [pregnancy], [lactation]): a status Observation whose newest
    "no" answer ends older "yes" answers, or an active Condition; evidence older than `max_age_days` is not
    current. Its notes are texts.toml `<name>_stale`, `<name>_superseded`, `<name>_status` and
    `<name>_status_evidence`."""

    observation: tuple[str, ...]  # value sets of the status Observation code
    yes_answers: tuple[str, ...]
    no_answers: tuple[str, ...]
    conditions: tuple[str, ...]  # value sets of the Condition code
    max_age_days: int


@dataclass(frozen=True)
class MedicationFact:
    category: str
    name: str
    status: str
    source: str
    matched_by: str  # "code" | "name"
    # A dosed category (`DOSED`) only: the product as the record names it, and its daily dose (in the
    # category's unit; None when the dose cannot be read) with the arithmetic or the reason.
    product: str = ""
    daily: float | None = None
    dose: str = ""
    weekly: bool = False  # the dose is stated once a week ("50,000 IU/week")
    # When it was started, as the record says (a statement's effective start, a request's validity start or
    # authoring date); None when the record does not say.
    since: date | None = None


@dataclass(frozen=True)
class UnknownMedication:
    """A medication on record whose kind cannot be told (CLINICAL.md 5): it may be a vitamin K antagonist."""

    name: str  # as the record names it; "" when it names none
    reason: str
    source: str


def _named(codeable: object) -> bool:
    """A medication concept with a code or a name; without either nothing tells what it is."""
    if not isinstance(codeable, Mapping):
        return False
    codings = codeable.get("coding")
    coded = isinstance(codings, list) and any(
        isinstance(c, Mapping) and nonempty_str(c.get("code")) for c in codings
    )
    return coded or bool(medication_text(codeable))


def evidence_order(evidence: Evidence) -> tuple[str, str, str]:
    return (evidence.source, evidence.text, evidence.when.isoformat() if evidence.when else "")


class RecordReader:
    """Reads conditions, pregnancy, lactation and medications; `d3k2.core.facts` (the labs) builds on it."""

    def __init__(
        self,
        config: FactsConfig,
        terminology: Terminology,
        classify: MedicationClassifier,
        unique: list[Mapping[str, Any]],
        today: date,
        statuses: Mapping[str, bool],
        doses: MedicationDoser | None = None,
    ) -> None:
        self.config = config
        self.today = today
        self.terminology = terminology
        self.classify = classify
        self.doses = doses
        self.unique = unique
        # Observation status → accepted (True) or fallback (False): a pregnancy status of either counts.
        self.statuses = statuses
        # State (config.states: pregnancy, lactation) → its evidence, and the dates of its "no" statuses.
        self.states: dict[str, list[Evidence]] = {name: [] for name in config.states}
        self.ended: dict[str, list[date]] = {name: [] for name in config.states}
        self.conditions: dict[str, list[Evidence]] = {}
        self.medications: list[MedicationFact] = []
        self.unknown: list[UnknownMedication] = []
        self.issues: list[str] = []  # for the data card, never with patient data beyond names and dates
        self.index: dict[str, list[Mapping[str, Any]]] | None = None

    def _current(self, state: str, when: date | None, what: str) -> bool:
        """Undated evidence counts (a caution is never dropped for a missing date); older evidence is not
        used, and named (CLINICAL.md 5)."""
        days = self.config.states[state].max_age_days
        if when is None or (self.today - when).days <= days:
            return True
        note = self.config.notes[f"{state}_stale"]
        self.issues.append(note.format(what=what, date=when.isoformat(), days=days))
        return False

    def state_status(self, state: str, resource: Mapping[str, Any], status: str) -> None:
        """A pregnancy or breastfeeding status Observation: a coded "yes" is evidence, a dated "no" ends older
        "yes" statuses (`current`); other answers ("unknown") say nothing."""
        if status not in self.statuses:
            return
        answer = resource.get("valueCodeableConcept")
        codings = answer.get("coding") if isinstance(answer, Mapping) else None
        if not isinstance(codings, list):
            return
        config = self.config.states[state]
        for coding in codings:
            code = coding.get("code") if isinstance(coding, Mapping) else None
            if code in config.no_answers:
                when = observation_date(resource)
                if when is not None:  # an undated "no" is not known to be newer than anything
                    self.ended[state].append(when)
                return
            if code in config.yes_answers:
                when = observation_date(resource)
                notes = self.config.notes
                if self._current(state, when, notes[f"{state}_status"]):
                    text = notes[f"{state}_status_evidence"]
                    self.states[state].append(Evidence(state, text, ref_of(resource), when))
                return

    def current(self, state: str) -> list[Evidence]:
        """The state's evidence, without "yes" statuses that a later "no" status superseded (the newest
        status wins; named on the data card). Undated statuses and conditions are kept."""
        evidence = self.states[state]
        if not self.ended[state]:
            return evidence
        newest = max(self.ended[state])
        kept = []
        for one in evidence:
            status = one.source.startswith("Observation/")
            if status and one.when is not None and one.when < newest:
                note = self.config.notes[f"{state}_superseded"]
                self.issues.append(note.format(date=one.when.isoformat(), newer=newest.isoformat()))
            else:
                kept.append(one)
        return kept

    def condition(self, resource: Mapping[str, Any]) -> None:
        verification = status_code(resource.get("verificationStatus"))
        if verification in self.config.ignored_verification_status:
            return
        clinical = status_code(resource.get("clinicalStatus"))
        if clinical is not None and clinical not in self.config.active_clinical_status:
            return
        concepts = self.terminology.concepts_of(resource.get("code"))
        if not concepts:
            return
        text = codeable_text(resource["code"]) or self.config.notes["condition_unnamed"]
        when = parse_date(resource.get("onsetDateTime")) or parse_date(resource.get("recordedDate"))
        for fact, valuesets in self.config.condition_facts.items():
            if not concepts.isdisjoint(valuesets):
                self.conditions.setdefault(fact, []).append(Evidence(fact, text, ref_of(resource), when))
        for state, config in self.config.states.items():
            if not concepts.isdisjoint(config.conditions) and self._current(
                state, when, self.config.notes["condition_named"].format(text=text)
            ):
                self.states[state].append(Evidence(state, text, ref_of(resource), when))

    def medication(self, resource: Mapping[str, Any]) -> None:
        status = nonempty_str(resource.get("status")) or ""
        statement = resource.get("resourceType") == "MedicationStatement"
        # Status is required in FHIR: one missing says as little as "unknown" (CLINICAL.md 5).
        unknown_status = not status or status in (
            self.config.statement_unknown if statement else self.config.request_unknown
        )
        if not unknown_status and status not in (
            self.config.statement_current if statement else self.config.request_current
        ):
            return
        codeable = resource.get("medicationCodeableConcept")
        if codeable is None:
            reference = resource.get("medicationReference")
            target = reference.get("reference") if isinstance(reference, Mapping) else None
            found = self._resolve(resource, target) if isinstance(target, str) else []
            if not found:
                display = reference.get("display") if isinstance(reference, Mapping) else None
                name = display if isinstance(display, str) else ""
                self.unknown.append(
                    UnknownMedication(name, self.config.notes["medication_not_found"], ref_of(resource))
                )
                if not name:
                    return
                # The display is still a name to match (a labelled guess): a warfarin stays a warfarin.
                codeables: list[object] = [{"text": name}]
            else:  # every copy of the Medication (`unique_resources`): what any of them is counts
                codeables = [medication.get("code") for medication in found]
        else:
            codeables = [codeable]
        if not unknown_status and not any(_named(one) for one in codeables):
            # An empty concept or a Medication without code: it could be anything, a warfarin included.
            reason = self.config.notes["medication_no_code"]
            self.unknown.append(UnknownMedication("", reason, ref_of(resource)))
            return
        if unknown_status:
            named = sorted({name for one in codeables for _c, name, _m in self.classify(one)})
            texts = [medication_text(one) for one in codeables]
            name = ", ".join(named) or next((t for t in texts if t), "")
            self.unknown.append(
                UnknownMedication(name, self.config.notes["status_unknown"], ref_of(resource))
            )
            return
        for one in codeables:
            for category, name, matched_by in self.classify(one):
                fact = MedicationFact(category, name, status, ref_of(resource), matched_by)
                if category in DOSED:
                    fact = self._dosed(fact, one, resource)
                self.medications.append(fact)

    def _dosed(self, fact: MedicationFact, codeable: object, resource: Mapping[str, Any]) -> MedicationFact:
        dosages = resource.get(
            "dosage" if resource.get("resourceType") == "MedicationStatement" else "dosageInstruction"
        )
        found = self.doses(codeable, dosages) if self.doses is not None else ()
        dose = next((d for d in found if d.concept == fact.category and d.name == fact.name), None)
        product = medication_text(codeable) or fact.name
        if dose is None:
            return replace(fact, product=product, dose=self.config.notes["dose_not_read"])
        return replace(
            fact,
            product=product,
            daily=dose.daily,
            dose=dose.arithmetic,
            weekly=dose.lead_period == "wk",
            since=_started(resource),
        )

    def _resolve(self, resource: Mapping[str, Any], target: str) -> list[Mapping[str, Any]]:
        if target.startswith("#"):
            contained = resource.get("contained")
            if isinstance(contained, list):
                for item in contained:
                    if isinstance(item, Mapping) and item.get("id") == target[1:]:
                        return [item]
            return []
        if self.index is None:  # built on the first reference: most requests have none
            self.index = {}
            for candidate in self.unique:
                rtype = candidate.get("resourceType")
                rid = candidate.get("id")
                if isinstance(rtype, str) and isinstance(rid, str):
                    self.index.setdefault(f"{rtype}/{rid}", []).append(candidate)
        key = target.rsplit("/", 2)
        short = "/".join(key[-2:]) if len(key) >= 2 else target
        return self.index.get(short, [])


def _started(resource: Mapping[str, Any]) -> date | None:
    """When a medication was started, as its record says: a MedicationStatement's effectivePeriod.start or
    effectiveDateTime; a MedicationRequest's dispenseRequest.validityPeriod.start or authoredOn."""
    if resource.get("resourceType") == "MedicationStatement":
        period = resource.get("effectivePeriod")
        moment = resource.get("effectiveDateTime")
    else:
        dispense = resource.get("dispenseRequest")
        period = dispense.get("validityPeriod") if isinstance(dispense, Mapping) else None
        moment = resource.get("authoredOn")
    start = parse_date(period.get("start")) if isinstance(period, Mapping) else None
    return start or parse_date(moment)
