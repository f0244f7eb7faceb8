"""FHIR resources (raw JSON dicts) → typed clinical facts. Pure: no Flask, no requests, no clock.

Every resource is read defensively: one that cannot be read is skipped and reported in
``Facts.issues`` (never with patient data), and never stops other resources from being read, so a
malformed entry cannot hide a contraindication.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from functools import cached_property
from typing import Any

from d3k2.quantities import Interval, format_interval, format_number
from d3k2.terminology import LOINC, Terminology, normalise_system

# A medication classifier maps a medication CodeableConcept to (category, name, matched_by) triples.
MedicationClassifier = Callable[[object], Sequence[tuple[str, str, str]]]

_COMPARATOR_STRING = re.compile(r"^\s*(<=|>=|<|>|=)?\s*([0-9]+(?:[.,][0-9]+)?)\s*([^\s0-9].*)?$")


class Unreadable(Exception):
    """One resource (or one field the rules need) cannot be read; the message names no patient data."""


@dataclass(frozen=True)
class LabConfig:
    name: str
    label: str
    canonical_unit: str
    units: Mapping[str, float]
    stale_days: int
    primary: tuple[str, ...] = ()
    fallback: tuple[str, ...] = ()
    total: tuple[str, ...] = ()
    d3_fraction: tuple[str, ...] = ()
    d2_fraction: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    never: tuple[str, ...] = ()
    range_only: tuple[str, ...] = ()
    default_unit_by_code: Mapping[str, str] = field(default_factory=dict)
    default_upper_limit: float | None = None
    source: str = ""
    decimals: int = 2


@dataclass(frozen=True)
class FactsConfig:
    accepted_status: tuple[str, ...]
    fallback_status: tuple[str, ...]
    labs: Mapping[str, LabConfig]
    pregnancy_observation: tuple[str, ...]
    pregnant_answers: tuple[str, ...]
    pregnancy_conditions: tuple[str, ...]
    active_clinical_status: tuple[str, ...]
    ignored_verification_status: tuple[str, ...]
    condition_facts: Mapping[str, tuple[str, ...]]
    statement_current: tuple[str, ...]
    request_current: tuple[str, ...]
    # Texts a measurement carries to the card: preliminary, d3_only, d3_plus_d2, legacy_equation.
    notes: Mapping[str, str]


@dataclass(frozen=True)
class Measurement:
    analyte: str
    value: Interval  # in the canonical unit
    unit: str  # canonical unit
    reported: str  # as sent, e.g. "45 nmol/L" or "<5 ng/mL"
    when: date
    status: str
    source: str  # "Observation/<id>"
    code: str
    stale: bool
    age_days: int
    notes: tuple[str, ...] = ()
    upper_limit: float | None = None  # canonical unit; the lab's range when given

    @property
    def shown(self) -> str:
        canonical = format_interval(self.value, self.unit)
        return self.reported if canonical == self.reported else f"{self.reported} ({canonical})"


@dataclass(frozen=True)
class Evidence:
    concept: str
    text: str
    source: str
    when: date | None = None


@dataclass(frozen=True)
class MedicationFact:
    category: str
    name: str
    status: str
    source: str
    matched_by: str  # "code" | "name"


@dataclass(frozen=True)
class Facts:
    today: date
    vitd: Measurement | None = None
    egfr: Measurement | None = None
    calcium: Measurement | None = None
    pregnancy: tuple[Evidence, ...] = ()
    conditions: Mapping[str, tuple[Evidence, ...]] = field(default_factory=dict)
    medications: tuple[MedicationFact, ...] = ()
    issues: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    incomplete: tuple[str, ...] = ()  # required data (medications, conditions, labs) that could not be had

    def meds(self, category: str) -> tuple[MedicationFact, ...]:
        return tuple(m for m in self.medications if m.category == category)


# ---------------------------------------------------------------- small readers


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _ref(resource: Mapping[str, Any]) -> str:
    rtype = _str(resource.get("resourceType")) or "Resource"
    rid = _str(resource.get("id"))
    return f"{rtype}/{rid}" if rid else f"{rtype}/(no id)"


def parse_date(value: object) -> date | None:
    """A FHIR date/dateTime/instant → its calendar date; partial dates take their first day."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    try:
        if len(text) == 4:
            return date(int(text), 1, 1)
        if len(text) == 7:
            return date(int(text[:4]), int(text[5:7]), 1)
        if len(text) == 10:
            return date.fromisoformat(text)
        return datetime.fromisoformat(text.replace("Z", "+00:00")).date()
    except ValueError:
        return None


def _effective_text(resource: Mapping[str, Any]) -> str | None:
    """The first usable of effective[x] (period: its end) and issued, as sent."""
    period = resource.get("effectivePeriod")
    period = period if isinstance(period, Mapping) else {}
    for value in (
        resource.get("effectiveDateTime"),
        resource.get("effectiveInstant"),
        period.get("end"),
        period.get("start"),
        resource.get("issued"),
    ):
        if parse_date(value) is not None:
            return str(value)
    return None


def observation_date(resource: Mapping[str, Any]) -> date | None:
    return parse_date(_effective_text(resource))


def _instant(text: str, day: date) -> datetime:
    """A sortable moment (UTC, naive) of a result on `day`: its time when given, else midnight."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return datetime(day.year, day.month, day.day)
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment


def _canonical(resource: Mapping[str, Any]) -> str:
    """Orders otherwise equal resources the same way whatever their order in the Bundle."""
    return json.dumps(resource, sort_keys=True, default=str)


def _loinc_codes(resource: Mapping[str, Any]) -> list[str]:
    code = resource.get("code")
    codings = code.get("coding") if isinstance(code, Mapping) else None
    if not isinstance(codings, list):
        return []
    return [
        c["code"]
        for c in codings
        if isinstance(c, Mapping)
        and isinstance(c.get("code"), str)
        and normalise_system(str(c.get("system", ""))) == LOINC
    ]


def _codeable_text(codeable: Mapping[str, Any]) -> str:
    """Text of a CodeableConcept a value set matched: it is an object and its `coding` a list."""
    text = _str(codeable.get("text"))
    if text:
        return text
    for coding in codeable["coding"]:
        if isinstance(coding, Mapping) and _str(coding.get("display")):
            return str(coding["display"])
    return ""


def _status_code(codeable: object) -> str | None:
    """R4 CodeableConcept status (Condition.clinicalStatus); also the R3/DSTU2 plain string."""
    if isinstance(codeable, str):
        return codeable
    if isinstance(codeable, Mapping):
        codings = codeable.get("coding")
        if isinstance(codings, list):
            for coding in codings:
                if isinstance(coding, Mapping) and isinstance(coding.get("code"), str):
                    return str(coding["code"])
    return None


# ---------------------------------------------------------------- observations


@dataclass(frozen=True)
class _Reading:
    analyte: str
    role: str  # "total" | "d3" | "d2" | "primary" | "fallback" | "range_only"
    value: Interval
    reported: str
    when: date
    status: str
    source: str
    code: str
    upper_limit: float | None
    at: datetime
    raw: Mapping[str, Any] = field(compare=False, repr=False)


def _quantity(resource: Mapping[str, Any], lab: LabConfig, code: str) -> tuple[Interval, str, str]:
    """(interval in the canonical unit, reported text, reported unit) or Unreadable."""
    quantity = resource.get("valueQuantity")
    if isinstance(quantity, Mapping):
        raw = quantity.get("value")
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise Unreadable("valueQuantity.value is not a number")
        comparator = _str(quantity.get("comparator"))
        unit = _str(quantity.get("code")) or _str(quantity.get("unit"))
        if unit is None:
            raise Unreadable("valueQuantity has no unit")
        if unit not in lab.units and _str(quantity.get("unit")) in lab.units:
            unit = str(quantity["unit"])
        value = float(raw)
    elif isinstance(resource.get("valueString"), str):
        match = _COMPARATOR_STRING.match(resource["valueString"])
        if not match:
            raise Unreadable("valueString is not a number")
        comparator = match.group(1)
        value = float(match.group(2).replace(",", "."))
        unit = (match.group(3) or "").strip() or lab.default_unit_by_code.get(code)
        if unit is None:
            raise Unreadable("valueString has no unit")
    else:
        raise Unreadable("no valueQuantity or valueString")
    if comparator not in (None, "<", "<=", ">", ">=", "="):
        raise Unreadable(f"comparator {comparator!r} not understood")
    factor = lab.units.get(unit)
    if factor is None:
        raise Unreadable(f"unit {unit!r} not understood for {lab.label}")
    reported_interval = Interval.from_comparator(value, comparator)
    display_unit = lab.canonical_unit if factor == 1.0 else unit
    converted = reported_interval if factor == 1.0 else reported_interval.scaled(factor).rounded(lab.decimals)
    return converted, format_interval(reported_interval, display_unit), unit


def _upper_limit(resource: Mapping[str, Any], lab: LabConfig) -> float | None:
    ranges = resource.get("referenceRange")
    if not isinstance(ranges, list):
        return None
    for rng in ranges:
        high = rng.get("high") if isinstance(rng, Mapping) else None
        if isinstance(high, Mapping) and isinstance(high.get("value"), int | float):
            unit = _str(high.get("code")) or _str(high.get("unit"))
            factor = lab.units.get(unit or "")
            if factor is not None:
                return float(high["value"]) * factor
    return None


def _lab_role(codes: list[str], terminology: Terminology, lab: LabConfig) -> tuple[str, str] | None:
    for code in codes:
        if code in lab.never:
            continue
        concepts = terminology.concepts(LOINC, code)
        if concepts & set(lab.exclude):
            continue
        for role, sets in (
            ("total", lab.total),
            ("d3", lab.d3_fraction),
            ("d2", lab.d2_fraction),
            ("primary", lab.primary),
            ("fallback", lab.fallback),
            ("range_only", lab.range_only),
        ):
            if concepts & set(sets):
                return role, code
    return None


# ---------------------------------------------------------------- the extractor


@dataclass
class _Collector:
    config: FactsConfig
    terminology: Terminology
    classify: MedicationClassifier
    today: date
    issues: list[str] = field(default_factory=list)
    readings: list[_Reading] = field(default_factory=list)
    pregnancy: list[Evidence] = field(default_factory=list)
    conditions: dict[str, list[Evidence]] = field(default_factory=dict)
    medications: list[MedicationFact] = field(default_factory=list)
    index: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    # A long lab history repeats a handful of code lists: each is looked up in the value sets once.
    roles: dict[tuple[str, ...], tuple[LabConfig, str, str] | None] = field(default_factory=dict)

    def report(self, resource: Mapping[str, Any], reason: str) -> None:
        self.issues.append(f"{_ref(resource)} skipped: {reason}")

    @cached_property
    def pregnancy_codes(self) -> frozenset[str]:
        """Once per call, not per Observation: listing a value set's codes scans the whole terminology."""
        return frozenset(self._codes_of(self.config.pregnancy_observation))

    def lab_role(self, codes: list[str]) -> tuple[LabConfig, str, str] | None:
        key = tuple(codes)
        if key not in self.roles:
            self.roles[key] = None
            for lab in self.config.labs.values():
                found = _lab_role(codes, self.terminology, lab)
                if found is not None:
                    self.roles[key] = (lab, *found)
                    break
        return self.roles[key]

    def observation(self, resource: Mapping[str, Any]) -> None:
        codes = _loinc_codes(resource)
        if not codes:
            return
        status = _str(resource.get("status")) or ""
        if not self.pregnancy_codes.isdisjoint(codes):
            self._pregnancy_status(resource, status)
            return
        found = self.lab_role(codes)
        if found is None:
            return
        lab, role, code = found
        if status not in self.config.accepted_status + self.config.fallback_status:
            return
        effective = _effective_text(resource)
        when = parse_date(effective)
        if effective is None or when is None:
            self.report(resource, f"{lab.label} result has no date")
            return
        if resource.get("dataAbsentReason") is not None and "valueQuantity" not in resource:
            return
        try:
            value, reported, _unit = _quantity(resource, lab, code)
        except Unreadable as exc:
            self.report(resource, str(exc))
            return
        self.readings.append(
            _Reading(
                lab.name,
                role,
                value,
                reported,
                when,
                status,
                _ref(resource),
                code,
                _upper_limit(resource, lab),
                _instant(effective, when),
                resource,
            )
        )

    def _codes_of(self, valuesets: tuple[str, ...]) -> list[str]:
        return [code for vs in valuesets for _system, code in self.terminology.codes_in(vs)]

    def _pregnancy_status(self, resource: Mapping[str, Any], status: str) -> None:
        if status not in self.config.accepted_status + self.config.fallback_status:
            return
        answer = resource.get("valueCodeableConcept")
        codings = answer.get("coding") if isinstance(answer, Mapping) else None
        if not isinstance(codings, list):
            return
        for coding in codings:
            if isinstance(coding, Mapping) and coding.get("code") in self.config.pregnant_answers:
                self.pregnancy.append(
                    Evidence(
                        "pregnancy", "pregnancy status: pregnant", _ref(resource), observation_date(resource)
                    )
                )
                return

    def condition(self, resource: Mapping[str, Any]) -> None:
        verification = _status_code(resource.get("verificationStatus"))
        if verification in self.config.ignored_verification_status:
            return
        clinical = _status_code(resource.get("clinicalStatus"))
        if clinical is not None and clinical not in self.config.active_clinical_status:
            return
        concepts = self.terminology.concepts_of(resource.get("code"))
        if not concepts:
            return
        text = _codeable_text(resource["code"]) or "condition"
        when = parse_date(resource.get("onsetDateTime")) or parse_date(resource.get("recordedDate"))
        for fact, valuesets in self.config.condition_facts.items():
            if concepts & set(valuesets):
                self.conditions.setdefault(fact, []).append(Evidence(fact, text, _ref(resource), when))
        if concepts & set(self.config.pregnancy_conditions):
            self.pregnancy.append(Evidence("pregnancy", text, _ref(resource), when))

    def medication(self, resource: Mapping[str, Any]) -> None:
        status = _str(resource.get("status")) or ""
        current = (
            self.config.statement_current
            if resource.get("resourceType") == "MedicationStatement"
            else self.config.request_current
        )
        if status not in current:
            return
        codeable = resource.get("medicationCodeableConcept")
        if codeable is None:
            reference = resource.get("medicationReference")
            target = reference.get("reference") if isinstance(reference, Mapping) else None
            medication = self._resolve(resource, target) if isinstance(target, str) else None
            if medication is None:
                display = reference.get("display") if isinstance(reference, Mapping) else None
                if isinstance(display, str) and display:
                    codeable = {"text": display}
                else:
                    self.report(
                        resource, "medication reference could not be resolved (vitamin K antagonist unknown)"
                    )
                    return
            else:
                codeable = medication.get("code")
        for category, name, matched_by in self.classify(codeable):
            self.medications.append(MedicationFact(category, name, status, _ref(resource), matched_by))

    def _resolve(self, resource: Mapping[str, Any], target: str) -> Mapping[str, Any] | None:
        if target.startswith("#"):
            contained = resource.get("contained")
            if isinstance(contained, list):
                for item in contained:
                    if isinstance(item, Mapping) and item.get("id") == target[1:]:
                        return item
            return None
        key = target.rsplit("/", 2)
        short = "/".join(key[-2:]) if len(key) >= 2 else target
        return self.index.get(short)


def _newest(readings: Iterable[_Reading], config: FactsConfig) -> _Reading | None:
    """Newest by time; final beats preliminary; ties broken by id, then content, never by Bundle order."""
    candidates = [r for r in readings if r.status in config.accepted_status]
    if not candidates:
        candidates = [r for r in readings if r.status in config.fallback_status]
    if not candidates:
        return None
    newest = max((r.at, r.source) for r in candidates)
    tied = [r for r in candidates if (r.at, r.source) == newest]
    return tied[0] if len(tied) == 1 else max(tied, key=lambda r: _canonical(r.raw))


def _measurement(
    reading: _Reading, lab: LabConfig, config: FactsConfig, today: date, notes: tuple[str, ...]
) -> Measurement:
    age = (today - reading.when).days
    extra = (config.notes["preliminary"],) if reading.status == "preliminary" else ()
    return Measurement(
        analyte=lab.name,
        value=reading.value,
        unit=lab.canonical_unit,
        reported=reading.reported,
        when=reading.when,
        status=reading.status,
        source=reading.source,
        code=reading.code,
        stale=age > lab.stale_days,
        age_days=age,
        notes=notes + extra,
        upper_limit=reading.upper_limit,
    )


def _vitd(readings: list[_Reading], lab: LabConfig, config: FactsConfig, today: date) -> Measurement | None:
    """Total first; the D3 fraction (plus a same-day D2 fraction) only for a date without a total."""
    mine = [r for r in readings if r.analyte == lab.name]
    totals = [r for r in mine if r.role == "total"]
    total_dates = {r.when for r in totals}
    d3_only = [r for r in mine if r.role == "d3" and r.when not in total_dates]
    best_total = _newest(totals, config)
    best_d3 = _newest(d3_only, config)
    if best_d3 is None or (best_total is not None and best_total.when >= best_d3.when):
        return _measurement(best_total, lab, config, today, ()) if best_total else None
    d2 = _newest([r for r in mine if r.role == "d2" and r.when == best_d3.when], config)
    if d2 is None:
        return _measurement(best_d3, lab, config, today, (config.notes["d3_only"],))
    combined = Interval(
        best_d3.value.lo + d2.value.lo,
        best_d3.value.hi + d2.value.hi,
        best_d3.value.lo_open or d2.value.lo_open,
        best_d3.value.hi_open or d2.value.hi_open,
    )
    summed = _Reading(
        lab.name,
        "total",
        combined,
        f"{best_d3.reported} + D2 {d2.reported}",
        best_d3.when,
        best_d3.status,
        best_d3.source,
        best_d3.code,
        None,
        best_d3.at,
        best_d3.raw,
    )
    return _measurement(summed, lab, config, today, (config.notes["d3_plus_d2"],))


def _simple_lab(
    readings: list[_Reading], lab: LabConfig, config: FactsConfig, today: date
) -> Measurement | None:
    mine = [r for r in readings if r.analyte == lab.name]
    best = _newest([r for r in mine if r.role == "primary"], config)
    notes: tuple[str, ...] = ()
    if best is None:
        best = _newest([r for r in mine if r.role == "fallback"], config)
        notes = (config.notes["legacy_equation"],) if best else ()
    if best is None:
        best = _newest([r for r in mine if r.role == "range_only" and r.upper_limit is not None], config)
    if best is None:
        return None
    return _measurement(best, lab, config, today, notes)


def _evidence_order(evidence: Evidence) -> tuple[str, str, str]:
    return (evidence.source, evidence.text, evidence.when.isoformat() if evidence.when else "")


def _unique(items: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One resource per type/id (the same result sent under two prefetch keys counts once); of two
    different versions with one id, the same one is kept whatever the order."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    unique: list[Mapping[str, Any]] = []
    for resource in items:
        ref = _ref(resource)
        if ref.endswith("(no id)"):
            unique.append(resource)
        else:
            groups.setdefault(ref, []).append(resource)
    for group in groups.values():
        unique.append(group[0] if len(group) == 1 else max(group, key=_canonical))
    return unique


def extract_facts(
    resources: Iterable[Mapping[str, Any]],
    *,
    today: date,
    config: FactsConfig,
    terminology: Terminology,
    classify: MedicationClassifier,
    missing: Sequence[str] = (),
    incomplete: Sequence[str] = (),
    issues: Sequence[str] = (),
) -> Facts:
    """Read every resource once; unreadable ones are reported, never fatal."""
    items = [r for r in resources if isinstance(r, Mapping)]
    collector = _Collector(config, terminology, classify, today, issues=list(issues))
    unique = _unique(items)
    for resource in unique:
        rtype = resource.get("resourceType")
        rid = resource.get("id")
        if isinstance(rtype, str) and isinstance(rid, str):
            collector.index[f"{rtype}/{rid}"] = resource
    for resource in unique:
        rtype = resource.get("resourceType")
        try:
            if rtype == "Observation":
                collector.observation(resource)
            elif rtype == "Condition":
                collector.condition(resource)
            elif rtype in ("MedicationStatement", "MedicationRequest"):
                collector.medication(resource)
        # OverflowError: an integer past float range (Python's json parses any size; orjson refuses it).
        except (Unreadable, TypeError, ValueError, AttributeError, KeyError, OverflowError) as exc:
            collector.report(resource, f"unreadable ({type(exc).__name__})")
    labs = config.labs
    vitd = _vitd(collector.readings, labs["vitd"], config, today) if "vitd" in labs else None
    egfr = _simple_lab(collector.readings, labs["egfr"], config, today) if "egfr" in labs else None
    calcium = _simple_lab(collector.readings, labs["calcium"], config, today) if "calcium" in labs else None
    return Facts(
        today=today,
        vitd=vitd,
        egfr=egfr,
        calcium=calcium,
        pregnancy=tuple(sorted(collector.pregnancy, key=_evidence_order)),
        conditions={
            k: tuple(sorted(v, key=_evidence_order)) for k, v in sorted(collector.conditions.items())
        },
        medications=tuple(sorted(collector.medications, key=lambda m: (m.category, m.source, m.name))),
        issues=tuple(sorted(set(collector.issues))),
        missing=tuple(missing),
        incomplete=tuple(incomplete),
    )


def calcium_high(calcium: Measurement | None, lab: LabConfig) -> bool | None:
    """Above the lab's upper limit, else above the default limit for total calcium."""
    if calcium is None:
        return None
    limit = calcium.upper_limit if calcium.upper_limit is not None else lab.default_upper_limit
    if limit is None:
        return None
    return calcium.value.gt(limit)


def describe_limit(calcium: Measurement, lab: LabConfig) -> str:
    limit = calcium.upper_limit if calcium.upper_limit is not None else lab.default_upper_limit
    origin = "lab range" if calcium.upper_limit is not None else "default limit"
    return f"{format_number(limit or 0.0, 2)} {lab.canonical_unit} ({origin})"
