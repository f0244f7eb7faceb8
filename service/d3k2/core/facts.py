"""FHIR resources (raw JSON dicts) → typed clinical facts. Pure: no Flask, no requests, no clock.

Every resource is read defensively: one that cannot be read is skipped and reported in
``Facts.issues`` (never with patient data), and never stops other resources from being read, so a
malformed entry cannot hide a contraindication.

Lab results are read in two stages (see `d3k2.core.labs`): every one is triaged here (what it is,
when, whether it can be read at all), and only the newest per lab and role is read in full there.
Conditions, pregnancy, lactation and medications are read by `d3k2.core.record`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from d3k2.core.age import NOT_ON_RECORD, Age, AgeConfig, read_age
from d3k2.core.copies import unique_resources
from d3k2.core.labs import (
    Candidate,
    LabConfig,
    Measurement,
    Role,
    lab_role,
    moment_of,
    quantity_parts,
    read_simple_lab,
    read_vitd,
    upper_limit,
)
from d3k2.core.quantities import Interval, format_interval
from d3k2.core.readers import (
    Unreadable,
    effective_text,
    instant,
    loinc_codes,
    medication_text,
    observation_date,
    parse_date,
    ref_of,
)
from d3k2.core.record import (
    STATES,
    Evidence,
    MedicationClassifier,
    MedicationDoser,
    MedicationFact,
    RecordReader,
    StateConfig,
    UnknownMedication,
    evidence_order,
)
from d3k2.core.terminology import LOINC, Terminology


@dataclass(frozen=True)
class FactsConfig:
    accepted_status: tuple[str, ...]
    fallback_status: tuple[str, ...]
    labs: Mapping[str, LabConfig]
    active_clinical_status: tuple[str, ...]
    ignored_verification_status: tuple[str, ...]
    condition_facts: Mapping[str, tuple[str, ...]]
    statement_current: tuple[str, ...]
    request_current: tuple[str, ...]
    # Texts a measurement carries to the card: preliminary, d3_only, d3_plus_d2, legacy_equation,
    # same_specimen_lowest, conflicting_copies, race_coefficient_removed; and the data card's
    # <state>_stale ({what}, {date}, {days}) and <state>_superseded ({date}, {newer}).
    notes: Mapping[str, str]
    # {evidence.<name>} → the condition facts whose evidence it lists.
    evidence: Mapping[str, tuple[str, ...]]
    age: AgeConfig
    # A result dated more than this many days after "today" is not used (clock skew allowed for).
    future_days: int
    # "pregnancy" and "lactation" (facts.toml): how each is read from status Observations and Conditions.
    states: Mapping[str, StateConfig]
    # MedicationStatement statuses that say nothing about whether it is taken: a medication of unknown kind.
    statement_unknown: tuple[str, ...] = ("unknown",)
    # MedicationRequest statuses that say nothing about whether it is current: a medication of unknown kind.
    request_unknown: tuple[str, ...] = ("unknown",)


@dataclass(frozen=True)
class Facts:
    today: date
    vitd: Measurement | None = None
    egfr: Measurement | None = None
    calcium: Measurement | None = None
    pregnancy: tuple[Evidence, ...] = ()
    lactation: tuple[Evidence, ...] = ()  # breastfeeding on record
    conditions: Mapping[str, tuple[Evidence, ...]] = field(default_factory=dict)
    medications: tuple[MedicationFact, ...] = ()
    issues: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    missing_keys: tuple[str, ...] = ()  # the prefetch keys (services.toml) that `missing` names
    incomplete: tuple[str, ...] = ()  # required data (medications, conditions, labs) that could not be had
    copies: tuple[str, ...] = ()  # "<type>/<id>" of records sent as different copies, all of them read
    copy_names: tuple[str, ...] = ()  # ... named for the card: by name and date, never by id
    unknown_medications: tuple[UnknownMedication, ...] = ()
    age: Age = NOT_ON_RECORD
    # Facts of data that could not be had in full (`PrefetchKey.unknown`, e.g. "pregnancy.unknown").
    unknown: tuple[str, ...] = ()

    def meds(self, category: str) -> tuple[MedicationFact, ...]:
        return tuple(m for m in self.medications if m.category == category)


_ERRORS = (Unreadable, TypeError, ValueError, AttributeError, KeyError, OverflowError)
# Code lists remembered per rule set: more would be a request sending ever new codes.
MAX_ROLES = 4096


class _Lookup:
    """What stays the same from call to call for one rule set: status classes, pregnancy and lactation status
    codes and what each code list means. Neither the config nor the terminology is changed once loaded."""

    __slots__ = ("config", "roles", "state_codes", "statuses", "terminology")

    def __init__(self, config: FactsConfig, terminology: Terminology) -> None:
        self.config = config
        self.terminology = terminology
        # Listing a value set's codes scans the whole terminology: once per rule set.
        # Status Observation code → the state (pregnancy, lactation) it tells.
        self.state_codes = {
            code: state
            for state, one in config.states.items()
            for vs in one.observation
            for _system, code in terminology.codes_in(vs)
        }
        # status → accepted (True) or fallback (False); any other status is not used.
        self.statuses = dict.fromkeys(config.fallback_status, False) | dict.fromkeys(
            config.accepted_status, True
        )
        self.roles: dict[tuple[str, ...], Role | None] = {}

    def role(self, codes: tuple[str, ...]) -> Role | None:
        try:
            return self.roles[codes]
        except KeyError:
            pass
        found = None
        for lab in self.config.labs.values():
            role = lab_role(codes, self.terminology, lab)
            if role is not None:
                concepts = self.terminology.concepts(LOINC, role[1])
                kind = next((k for vs, k in lab.kinds.items() if vs in concepts), "")
                found = Role(lab, *role, kind)
                break
        if len(self.roles) >= MAX_ROLES:
            self.roles.clear()
        self.roles[codes] = found
        return found


# (id(config), id(terminology)) → lookup. An entry holds both objects, so neither id can be reused
# by another object while it exists; a handful of rule sets (tests load several) are kept.
LOOKUPS: dict[tuple[int, int], _Lookup] = {}
MAX_LOOKUPS = 8


def _lookup(config: FactsConfig, terminology: Terminology) -> _Lookup:
    key = (id(config), id(terminology))
    found = LOOKUPS.get(key)
    if found is None:
        if len(LOOKUPS) >= MAX_LOOKUPS:
            LOOKUPS.clear()
        found = LOOKUPS[key] = _Lookup(config, terminology)
    return found


class _Collector(RecordReader):
    def __init__(
        self,
        config: FactsConfig,
        terminology: Terminology,
        classify: MedicationClassifier,
        unique: list[Mapping[str, Any]],
        issues: list[str],
        today: date,
        doses: MedicationDoser | None = None,
    ) -> None:
        self.lookup = _lookup(config, terminology)
        super().__init__(config, terminology, classify, unique, today, self.lookup.statuses, doses)
        self.issues = issues
        # (lab name, role, accepted status?) → the triaged results, in Bundle order.
        self.candidates: dict[tuple[str, str, bool], list[Candidate]] = {}
        # date text → `moment_of`: results of one draw (or one day) share their date text.
        self.moments: dict[str, tuple[str, date, datetime | None] | None] = {}
        self.patients: list[Mapping[str, Any]] = []

    def report(self, resource: Mapping[str, Any], reason: str, what: str | None = None) -> None:
        """A record not used, named for the data card by what it is and its date, never by its id."""
        notes = self.config.notes
        self.issues.append(notes["not_used"].format(what=what or self.name_of(resource), reason=reason))

    def name_of(self, resource: Mapping[str, Any], lab: str | None = None) -> str:
        """A lab result by its lab and date, a condition or medication by its name, else by its kind."""
        return self.named(resource, lab)[0]

    def named(self, resource: Mapping[str, Any], lab: str | None = None) -> tuple[str, bool]:
        """`name_of`, and whether it names the record itself (not only its kind)."""
        notes = self.config.notes
        rtype = resource.get("resourceType")
        kind = rtype.lower() if isinstance(rtype, str) else ""
        name, when, dated = "", None, notes["dated"]
        if rtype == "Observation":
            found = None if lab else self.lookup.role(loinc_codes(resource))
            name, when = lab or (found.lab.label if found else ""), observation_date(resource)
        elif rtype == "Condition":
            name, dated = medication_text(resource.get("code")), notes["condition_dated"]
            when = parse_date(resource.get("onsetDateTime")) or parse_date(resource.get("recordedDate"))
        elif rtype in ("MedicationStatement", "MedicationRequest"):
            name = medication_text(resource.get("medicationCodeableConcept"))
        what = name or notes.get(f"record_{kind}", notes["record_other"])
        return (dated.format(what=what, date=when.isoformat()) if when else what), bool(name)

    def copy_names(self, copies: Sequence[str]) -> tuple[str, ...]:
        """Each record sent as different copies by one name: the first copy that names it, by name."""
        named: dict[str, list[tuple[bool, str]]] = {}
        for resource in self.unique:
            ref = ref_of(resource)
            if ref in copies:
                name, specific = self.named(resource)
                named.setdefault(ref, []).append((not specific, name))
        return tuple(sorted({min(names)[1] for names in named.values()}))

    def observation(self, resource: Mapping[str, Any]) -> None:
        """Stage 1 for a lab result: triage (see above); a pregnancy or breastfeeding status is read whole."""
        codes = loinc_codes(resource)
        if not codes:
            return
        status = resource.get("status")
        if not isinstance(status, str):
            status = ""
        lookup = self.lookup
        state = next((lookup.state_codes[c] for c in codes if c in lookup.state_codes), None)
        if state is not None:
            self.state_status(state, resource, status)
            return
        found = lookup.roles.get(codes) or lookup.role(codes)
        if found is None:
            return
        accepted = lookup.statuses.get(status)
        if accepted is None:
            return
        # Usually the first candidate, effectiveDateTime, is the date: straight to its memo.
        effective = resource.get("effectiveDateTime")
        moment = None
        if type(effective) is str:
            moments = self.moments
            if effective in moments:
                moment = moments[effective]
            else:
                moment = moments[effective] = moment_of(effective)
        if moment is None:  # no usable effectiveDateTime: the other places a date can be
            text = effective_text(resource)
            moment = moment_of(text) if text is not None else None
        if moment is None:
            what = self.config.notes["undated_result"].format(lab=found.lab.label)
            self.report(resource, self.config.notes["no_date"], what)
            return
        if resource.get("dataAbsentReason") is not None and "valueQuantity" not in resource:
            return
        try:
            value, comparator, unit = quantity_parts(resource, found.lab, found.code)
        except Unreadable as exc:
            reason = self.config.notes[exc.key].format(detail=exc.detail)
            self.report(resource, reason, self.name_of(resource, found.lab.label))
            return
        text, when, at = moment
        if not self._usable(found.lab, value, comparator, unit, when, found.kind):
            return
        upper = upper_limit(resource, found.lab, unit) if "referenceRange" in resource else None
        if at is None:
            at = instant(text, when)  # fails again, now: reported as it always was
        rid = resource.get("id")
        candidate = (
            at,
            rid if isinstance(rid, str) and rid else "(no id)",
            when,
            status,
            found,
            upper,
            resource,
        )
        key = found.accepted if accepted else found.fallback
        group = self.candidates.get(key)
        if group is None:
            self.candidates[key] = [candidate]
        else:
            group.append(candidate)

    def _usable(
        self, lab: LabConfig, value: float, comparator: str | None, unit: str, when: date, kind: str
    ) -> bool:
        """Dated at most `future_days` after today, and certainly possible for a body; else named on the
        data card (by lab and date, never by id) and not used, so that an older usable result is."""
        notes = self.config.notes
        if (when - self.today).days > self.config.future_days:
            what = notes["dated"].format(what=lab.label, date=when.isoformat())
            self.issues.append(notes["future"].format(what=what))
            return False
        if implausible(lab, value, comparator, unit, kind):
            shown = format_interval(Interval.from_comparator(value, comparator), unit, None)
            what = notes["dated"].format(what=lab.label, date=when.isoformat())
            reason = lab.plausible.reason
            self.issues.append(notes["implausible"].format(what=what, shown=shown, reason=reason))
            return False
        return True


def implausible(lab: LabConfig, value: float, comparator: str | None, unit: str, kind: str) -> bool:
    """Whether a result is certainly outside what a body can have (then it is not used, and named)."""
    floor = lab.plausible.above_by_kind.get(kind, lab.plausible.above)
    factor = lab.units[unit]
    if comparator is None:  # most results: one number, compared as its exact Interval would be
        canonical = value * factor
        return canonical <= floor or canonical > lab.plausible.most
    bounds = Interval.from_comparator(value, comparator).scaled(factor)
    return bounds.le(floor) is True or bounds.gt(lab.plausible.most) is True


def extract_facts(
    resources: Iterable[Mapping[str, Any]],
    *,
    today: date,
    config: FactsConfig,
    terminology: Terminology,
    classify: MedicationClassifier,
    missing: Sequence[str] = (),
    missing_keys: Sequence[str] = (),
    incomplete: Sequence[str] = (),
    issues: Sequence[str] = (),
    doses: MedicationDoser | None = None,
    unknown: Sequence[str] = (),
) -> Facts:
    """Read every resource once; unreadable ones are reported, never fatal. Observations in two
    stages: every one triaged, the newest per lab and role read in full (see above)."""
    unique, copies = unique_resources(resources)
    collector = _Collector(config, terminology, classify, unique, list(issues), today, doses)
    observation = collector.observation
    for resource in unique:
        rtype = resource.get("resourceType")
        try:
            if rtype == "Observation":
                observation(resource)
            elif rtype == "Condition":
                collector.condition(resource)
            elif rtype in ("MedicationStatement", "MedicationRequest"):
                collector.medication(resource)
            elif rtype == "Patient":
                collector.patients.append(resource)
        # OverflowError: an integer past float range (Python's json parses any size; orjson refuses it).
        except _ERRORS:
            collector.report(resource, config.notes["unreadable"])
    # Names what a newer status superseded: before the issues.
    pregnancy, lactation = (collector.current(state) for state in STATES)
    labs = config.labs
    found = collector.candidates
    vitd = read_vitd(found, labs["vitd"], config, today) if "vitd" in labs else None
    egfr = read_simple_lab(found, labs["egfr"], config, today) if "egfr" in labs else None
    calcium = read_simple_lab(found, labs["calcium"], config, today) if "calcium" in labs else None
    return Facts(
        today=today,
        vitd=vitd,
        egfr=egfr,
        calcium=calcium,
        # Copies of one record (`unique_resources`) may say the same thing twice: said once.
        pregnancy=tuple(sorted(set(pregnancy), key=evidence_order)),
        lactation=tuple(sorted(set(lactation), key=evidence_order)),
        conditions={
            k: tuple(sorted(set(v), key=evidence_order)) for k, v in sorted(collector.conditions.items())
        },
        medications=tuple(
            sorted(
                set(collector.medications),
                key=lambda m: (m.category, m.source, m.name, m.matched_by, m.status),
            )
        ),
        issues=tuple(sorted(set(collector.issues))),
        missing=tuple(missing),
        missing_keys=tuple(missing_keys),
        incomplete=tuple(incomplete),
        copies=tuple(sorted(copies)),
        copy_names=collector.copy_names(copies) if copies else (),
        unknown_medications=tuple(sorted(set(collector.unknown), key=lambda u: (u.source, u.reason, u.name))),
        age=read_age(collector.patients, today, config.age),
        unknown=tuple(sorted(set(unknown))),
    )
