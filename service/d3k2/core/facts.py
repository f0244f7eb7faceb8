"""FHIR resources (raw JSON dicts) → typed clinical facts. Pure: no Flask, no requests, no clock.

Every resource is read defensively: one that cannot be read is skipped and reported in
``Facts.issues`` (never with patient data), and never stops other resources from being read, so a
malformed entry cannot hide a contraindication.

Lab results are read in two stages (see "observations" below): every one is triaged (what it is,
when, whether it can be read at all), and only the newest per lab and role is read in full.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from operator import itemgetter
from typing import Any

from d3k2.core.age import NOT_ON_RECORD, Age, AgeConfig, read_age
from d3k2.core.copies import canonical, unique_resources
from d3k2.core.dosage import IngredientDose
from d3k2.core.quantities import Interval, LabBand, certain_band, format_exact, format_interval
from d3k2.core.terminology import LOINC, Terminology, normalise_system, spellings

# A medication classifier maps a medication CodeableConcept to (category, name, matched_by) triples.
MedicationClassifier = Callable[[object], Sequence[tuple[str, str, str]]]
# A dose reader maps (medication CodeableConcept, dosage instructions) to the daily dose of each ingredient.
MedicationDoser = Callable[[object, object], Sequence[IngredientDose]]
# Categories whose current products carry their daily dose (CLINICAL.md 5: a current vitamin D product).
_DOSED = frozenset({"vitamin-d"})

_COMPARATOR_STRING = re.compile(r"^\s*(<=|>=|<|>|=)?\s*([0-9]+(?:[.,][0-9]+)?)\s*([^\s0-9].*)?$")
# Every system text that means LOINC (checked on each coding of each Observation).
_LOINC_SPELLINGS = spellings(LOINC)


class Unreadable(Exception):
    """One resource (or one field the rules need) cannot be read; the message names no patient data."""


@dataclass(frozen=True)
class AlbuminCorrection:
    """corrected = measured + coefficient × (normal − albumin), albumin of the same day (Payne)."""

    lab: str  # the albumin lab
    coefficient: float
    normal: float  # albumin, in that lab's canonical unit
    applies_to: str  # the kind corrected ("total")
    kind: str  # the kind of the result ("albumin-corrected")
    note: str


@dataclass(frozen=True)
class Plausible:
    """What a body can have, in the canonical unit: above `above` (zero and negative values are no
    result) and at most `most`. A result certainly outside is not used, and named."""

    above: float
    most: float
    reason: str


@dataclass(frozen=True)
class LabConfig:
    name: str
    label: str
    canonical_unit: str
    units: Mapping[str, float]
    stale_days: int
    plausible: Plausible  # every lab says what a body can have
    primary: tuple[str, ...] = ()
    fallback: tuple[str, ...] = ()
    total: tuple[str, ...] = ()
    d3_fraction: tuple[str, ...] = ()
    d2_fraction: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    never: tuple[str, ...] = ()
    default_unit_by_code: Mapping[str, str] = field(default_factory=dict)
    # value set → the kind of measurement it is, named on the card (calcium: total, ionized, …).
    kinds: Mapping[str, str] = field(default_factory=dict)
    # kind → upper limit (canonical unit) when the lab sends no range.
    kind_limits: Mapping[str, float] = field(default_factory=dict)
    # Severity grades above the limit, ascending, for the kinds they are defined for.
    grades: tuple[LabBand, ...] = ()
    graded_kinds: tuple[str, ...] = ()
    correction: AlbuminCorrection | None = None
    source: str = ""
    decimals: int = 2
    # Categories of the value (eGFR: KDIGO G1–G5), ascending.
    bands: tuple[LabBand, ...] = ()
    # Several results of one specimen (several equations): the lowest is used, and the card says so.
    same_specimen_lowest: bool = False


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
    # Texts a measurement carries to the card: preliminary, d3_only, d3_plus_d2, legacy_equation,
    # same_specimen_lowest.
    notes: Mapping[str, str]
    # {evidence.<name>} → the condition facts whose evidence it lists.
    evidence: Mapping[str, tuple[str, ...]]
    age: AgeConfig
    # A result dated more than this many days after "today" is not used (clock skew allowed for).
    future_days: int
    # A pregnancy status or condition older than this is not a current pregnancy.
    pregnancy_days: int
    # MedicationStatement statuses that say nothing about whether it is taken: a medication of unknown kind.
    statement_unknown: tuple[str, ...] = ("unknown",)


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
    kind: str = ""  # calcium: "total", "albumin-corrected" or "ionized"

    @property
    def shown(self) -> str:
        """As reported, with the value the rules used beside it when converted; neither rounded further."""
        canonical = format_interval(self.value, self.unit, None)
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
    # A dosed category (`_DOSED`) only: the product as the record names it, and its daily dose (in the
    # category's unit; None when the dose cannot be read) with the arithmetic or the reason.
    product: str = ""
    daily: float | None = None
    dose: str = ""


@dataclass(frozen=True)
class UnknownMedication:
    """A medication on record whose kind cannot be told (CLINICAL.md 5): it may be a vitamin K antagonist."""

    name: str  # as the record names it; "" when it names none
    reason: str
    source: str


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
    copies: tuple[str, ...] = ()  # "<type>/<id>" of records sent as different copies, all of them read
    unknown_medications: tuple[UnknownMedication, ...] = ()
    age: Age = NOT_ON_RECORD

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
    """A sortable moment (in UTC) of a result on `day`: its time when given, else midnight; a time
    without an offset is taken as UTC."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return datetime(day.year, day.month, day.day, tzinfo=UTC)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _loinc_codes(resource: Mapping[str, Any]) -> tuple[str, ...]:
    code = resource.get("code")
    codings = code.get("coding") if type(code) is dict or isinstance(code, Mapping) else None
    if not isinstance(codings, list):
        return ()
    found: tuple[str, ...] = ()
    for coding in codings:
        if type(coding) is dict or isinstance(coding, Mapping):
            value = coding.get("code")
            if isinstance(value, str):
                system = coding.get("system", "")
                if (
                    system in _LOINC_SPELLINGS
                    if type(system) is str
                    else normalise_system(str(system)) == LOINC
                ):
                    found += (value,)
    return found


def _codeable_text(codeable: Mapping[str, Any]) -> str:
    """Text of a CodeableConcept a value set matched: it is an object and its `coding` a list."""
    text = _str(codeable.get("text"))
    if text:
        return text
    for coding in codeable["coding"]:
        if isinstance(coding, Mapping) and _str(coding.get("display")):
            return str(coding["display"])
    return ""


def _medication_text(codeable: object) -> str:
    """The name a medication CodeableConcept gives itself: its text, else a coding's display."""
    if not isinstance(codeable, Mapping):
        return ""
    codings = codeable.get("coding")
    displays = (
        [c.get("display") for c in codings if isinstance(c, Mapping)] if isinstance(codings, list) else []
    )
    return next((t for t in (codeable.get("text"), *displays) if isinstance(t, str) and t), "")


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
#
# A lab history can hold thousands of results of which only the newest per lab and role is ever
# shown, so Observations are read in two stages:
#
# 1. Triage (every Observation): its LOINC codes → lab and role (looked up once per code list), its
#    status, its date and time, and every check that makes a result unreadable (number, unit,
#    comparator, date). An unreadable result is reported whatever its age, exactly as if it had
#    been read in full. What is kept of a readable one is a light `_Candidate` tuple.
# 2. Selection (a few candidates): `_newest` picks the newest per lab and role; only the picked
#    ones are read in full (value interval in the canonical unit, reported text, source).

# (at, id, when, status, role, upper limit, resource): `at` and `id` first, as the newest result is
# the one with the greatest (at, "Observation/<id>") and every source of a candidate starts with
# "Observation/"; `id` is "(no id)" for a result without one, as in its source.
_Candidate = tuple[datetime, str, date, str, "_Role", float | None, Mapping[str, Any]]
_NEWEST_KEY = itemgetter(0, 1)
_ERRORS = (Unreadable, TypeError, ValueError, AttributeError, KeyError, OverflowError)
# Code lists remembered per rule set: more would be a request sending ever new codes.
_MAX_ROLES = 4096


class _Role:
    """What one code list means: a role of one lab (e.g. eGFR "primary") and the code that says so."""

    __slots__ = ("accepted", "code", "fallback", "kind", "lab", "role")

    def __init__(self, lab: LabConfig, role: str, code: str, kind: str = "") -> None:
        self.lab = lab
        self.role = role
        self.code = code
        self.kind = kind
        # Where its candidates go: results of an accepted status, and of a fallback status.
        self.accepted = (lab.name, role, True)
        self.fallback = (lab.name, role, False)


def _quantity_parts(resource: Mapping[str, Any], lab: LabConfig, code: str) -> tuple[float, str | None, str]:
    """(value, comparator, unit) as reported, the unit one `lab` understands; else Unreadable."""
    quantity = resource.get("valueQuantity")
    if type(quantity) is dict or isinstance(quantity, Mapping):
        raw: Any = quantity.get("value")
        kind = type(raw)
        if (
            kind is not float
            and kind is not int
            and (isinstance(raw, bool) or not isinstance(raw, int | float))
        ):
            raise Unreadable("valueQuantity.value is not a number")
        comparator = quantity.get("comparator")
        if comparator is not None:
            comparator = _str(comparator)
        unit = quantity.get("code")
        if not (isinstance(unit, str) and unit):
            unit = _str(quantity.get("unit"))
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
    if comparator is not None and comparator not in ("<", "<=", ">", ">=", "="):
        raise Unreadable(f"comparator {comparator!r} not understood")
    if unit not in lab.units:
        raise Unreadable(f"unit {unit!r} not understood for {lab.label}")
    return value, comparator, unit


def _quantity(resource: Mapping[str, Any], lab: LabConfig, code: str) -> tuple[Interval, str]:
    """(interval in the canonical unit, reported text) of a result triage found readable."""
    value, comparator, unit = _quantity_parts(resource, lab, code)
    factor = lab.units[unit]
    reported_interval = Interval.from_comparator(value, comparator)
    display_unit = lab.canonical_unit if factor == 1.0 else unit
    converted = reported_interval if factor == 1.0 else reported_interval.scaled(factor).rounded(lab.decimals)
    return converted, format_interval(reported_interval, display_unit, None)


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
                # Converted as a result is, so that a result equal to the limit is never above it.
                limit = float(high["value"])
                return limit if factor == 1.0 else round(limit * factor, lab.decimals)
    return None


def _lab_role(codes: Sequence[str], terminology: Terminology, lab: LabConfig) -> tuple[str, str] | None:
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
        ):
            if concepts & set(sets):
                return role, code
    return None


def _moment(text: str) -> tuple[str, date, datetime | None] | None:
    """(text, date, sortable instant) of a date text: `parse_date` and `_instant` with one parse.
    No instant when working it out fails: it is then worked out again where reading the result
    would have failed, to report the same reason."""
    stripped = text.strip()
    if len(stripped) in (4, 7, 10):  # a date without a time: parse_date's own ways
        when = parse_date(text)
        if when is None:
            return None
        return text, when, _instant(text, when)
    try:
        moment = datetime.fromisoformat(stripped.replace("Z", "+00:00"))
    except ValueError:
        return None
    zone = moment.tzinfo
    if zone is UTC:  # as `_instant` would give, without its second parse
        return text, moment.date(), moment
    if zone is None:
        return text, moment.date(), moment.replace(tzinfo=UTC)
    try:
        return text, moment.date(), moment.astimezone(UTC)
    except OverflowError:
        return text, moment.date(), None


class _Lookup:
    """What stays the same from call to call for one rule set: status classes, pregnancy codes and
    what each code list means. Neither the config nor the terminology is changed once loaded."""

    __slots__ = ("config", "pregnancy_codes", "roles", "statuses", "terminology")

    def __init__(self, config: FactsConfig, terminology: Terminology) -> None:
        self.config = config
        self.terminology = terminology
        # Listing a value set's codes scans the whole terminology: once per rule set.
        self.pregnancy_codes = frozenset(
            code for vs in config.pregnancy_observation for _system, code in terminology.codes_in(vs)
        )
        # status → accepted (True) or fallback (False); any other status is not used.
        self.statuses = dict.fromkeys(config.fallback_status, False) | dict.fromkeys(
            config.accepted_status, True
        )
        self.roles: dict[tuple[str, ...], _Role | None] = {}

    def role(self, codes: tuple[str, ...]) -> _Role | None:
        try:
            return self.roles[codes]
        except KeyError:
            pass
        found = None
        for lab in self.config.labs.values():
            role = _lab_role(codes, self.terminology, lab)
            if role is not None:
                concepts = self.terminology.concepts(LOINC, role[1])
                kind = next((k for vs, k in lab.kinds.items() if vs in concepts), "")
                found = _Role(lab, *role, kind)
                break
        if len(self.roles) >= _MAX_ROLES:
            self.roles.clear()
        self.roles[codes] = found
        return found


# (id(config), id(terminology)) → lookup. An entry holds both objects, so neither id can be reused
# by another object while it exists; a handful of rule sets (tests load several) are kept.
_LOOKUPS: dict[tuple[int, int], _Lookup] = {}
_MAX_LOOKUPS = 8


def _lookup(config: FactsConfig, terminology: Terminology) -> _Lookup:
    key = (id(config), id(terminology))
    found = _LOOKUPS.get(key)
    if found is None:
        if len(_LOOKUPS) >= _MAX_LOOKUPS:
            _LOOKUPS.clear()
        found = _LOOKUPS[key] = _Lookup(config, terminology)
    return found


# ---------------------------------------------------------------- the extractor


class _Collector:
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
        self.config = config
        self.today = today
        self.terminology = terminology
        self.classify = classify
        self.doses = doses
        self.unique = unique
        self.issues = issues
        self.lookup = _lookup(config, terminology)
        # (lab name, role, accepted status?) → the triaged results, in Bundle order.
        self.candidates: dict[tuple[str, str, bool], list[_Candidate]] = {}
        # date text → `_moment`: results of one draw (or one day) share their date text.
        self.moments: dict[str, tuple[str, date, datetime | None] | None] = {}
        self.pregnancy: list[Evidence] = []
        self.conditions: dict[str, list[Evidence]] = {}
        self.medications: list[MedicationFact] = []
        self.unknown: list[UnknownMedication] = []
        self.patients: list[Mapping[str, Any]] = []
        self.index: dict[str, list[Mapping[str, Any]]] | None = None

    def report(self, resource: Mapping[str, Any], reason: str) -> None:
        self.issues.append(f"{_ref(resource)} skipped: {reason}")

    def observation(self, resource: Mapping[str, Any]) -> None:
        """Stage 1 for a lab result: triage (see above); pregnancy status is read in full."""
        codes = _loinc_codes(resource)
        if not codes:
            return
        status = resource.get("status")
        if not isinstance(status, str):
            status = ""
        lookup = self.lookup
        if not lookup.pregnancy_codes.isdisjoint(codes):
            self._pregnancy_status(resource, status)
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
                moment = moments[effective] = _moment(effective)
        if moment is None:  # no usable effectiveDateTime: the other places a date can be
            text = _effective_text(resource)
            moment = _moment(text) if text is not None else None
        if moment is None:
            self.report(resource, f"{found.lab.label} result has no date")
            return
        if resource.get("dataAbsentReason") is not None and "valueQuantity" not in resource:
            return
        try:
            value, comparator, unit = _quantity_parts(resource, found.lab, found.code)
        except Unreadable as exc:
            self.report(resource, str(exc))
            return
        text, when, at = moment
        if not self._usable(found.lab, value, comparator, unit, when):
            return
        upper = _upper_limit(resource, found.lab) if "referenceRange" in resource else None
        if at is None:
            at = _instant(text, when)  # fails again, now: reported as it always was
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

    def _usable(self, lab: LabConfig, value: float, comparator: str | None, unit: str, when: date) -> bool:
        """Dated at most `future_days` after today, and certainly possible for a body; else named on the
        data card (by lab and date, never by id) and not used, so that an older usable result is."""
        if (when - self.today).days > self.config.future_days:
            self.issues.append(f"{lab.label} of {when.isoformat()} is dated in the future")
            return False
        plausible = lab.plausible
        reading = Interval.from_comparator(value, comparator)
        canonical = reading.scaled(lab.units[unit])
        if canonical.le(plausible.above) is True or canonical.gt(plausible.most) is True:
            shown = format_interval(reading, unit, None)
            self.issues.append(f"{lab.label} of {when.isoformat()} is {shown}: {plausible.reason}")
            return False
        return True

    def _current_pregnancy(self, when: date | None) -> bool:
        """Undated evidence counts (a caution is never dropped for a missing date)."""
        return when is None or (self.today - when).days <= self.config.pregnancy_days

    def _pregnancy_status(self, resource: Mapping[str, Any], status: str) -> None:
        if status not in self.lookup.statuses:
            return
        answer = resource.get("valueCodeableConcept")
        codings = answer.get("coding") if isinstance(answer, Mapping) else None
        if not isinstance(codings, list):
            return
        for coding in codings:
            if isinstance(coding, Mapping) and coding.get("code") in self.config.pregnant_answers:
                when = observation_date(resource)
                if self._current_pregnancy(when):
                    self.pregnancy.append(
                        Evidence("pregnancy", "pregnancy status: pregnant", _ref(resource), when)
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
            if not concepts.isdisjoint(valuesets):
                self.conditions.setdefault(fact, []).append(Evidence(fact, text, _ref(resource), when))
        if not concepts.isdisjoint(self.config.pregnancy_conditions) and self._current_pregnancy(when):
            self.pregnancy.append(Evidence("pregnancy", text, _ref(resource), when))

    def medication(self, resource: Mapping[str, Any]) -> None:
        status = _str(resource.get("status")) or ""
        statement = resource.get("resourceType") == "MedicationStatement"
        unknown_status = statement and status in self.config.statement_unknown
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
                self.unknown.append(UnknownMedication(name, "medication not found", _ref(resource)))
                if not name:
                    return
                # The display is still a name to match (a labelled guess): a warfarin stays a warfarin.
                codeables: list[object] = [{"text": name}]
            else:  # every copy of the Medication (`unique_resources`): what any of them is counts
                codeables = [medication.get("code") for medication in found]
        else:
            codeables = [codeable]
        if unknown_status:
            named = sorted({name for one in codeables for _c, name, _m in self.classify(one)})
            texts = [_medication_text(one) for one in codeables]
            name = ", ".join(named) or next((t for t in texts if t), "")
            self.unknown.append(UnknownMedication(name, "status unknown", _ref(resource)))
            return
        for one in codeables:
            for category, name, matched_by in self.classify(one):
                fact = MedicationFact(category, name, status, _ref(resource), matched_by)
                if category in _DOSED:
                    fact = self._dosed(fact, one, resource)
                self.medications.append(fact)

    def _dosed(self, fact: MedicationFact, codeable: object, resource: Mapping[str, Any]) -> MedicationFact:
        dosages = resource.get(
            "dosage" if resource.get("resourceType") == "MedicationStatement" else "dosageInstruction"
        )
        found = self.doses(codeable, dosages) if self.doses is not None else ()
        dose = next((d for d in found if d.concept == fact.category and d.name == fact.name), None)
        product = _medication_text(codeable) or fact.name
        if dose is None:
            return replace(fact, product=product, dose="dose unknown: not read")
        return replace(fact, product=product, daily=dose.daily, dose=dose.arithmetic)

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


# ---------------------------------------------------------------- stage 2: the newest results


def _newest(accepted: list[_Candidate], fallback: list[_Candidate]) -> _Candidate | None:
    """Newest by time; final beats preliminary; ties broken by id, then content, never by Bundle order."""
    candidates = accepted or fallback
    if not candidates:
        return None
    best = max(candidates, key=_NEWEST_KEY)
    # Results without an id, and different copies of one result (`unique_resources`), can share (at, id).
    tied = [c for c in candidates if c[0] == best[0] and c[1] == best[1]]
    return tied[0] if len(tied) == 1 else max(tied, key=lambda c: canonical(c[6]))


def _measurement(
    candidate: _Candidate,
    lab: LabConfig,
    config: FactsConfig,
    today: date,
    notes: tuple[str, ...],
    summed: tuple[Interval, str] | None = None,
) -> Measurement:
    """Stage 2: the picked result read in full (or its value and text `summed` with another's)."""
    _at, _id, when, status, found, upper, resource = candidate
    if summed is None:
        value, reported = _quantity(resource, found.lab, found.code)
    else:
        (value, reported), upper = summed, None
    age = (today - when).days
    extra = (config.notes["preliminary"],) if status == "preliminary" else ()
    return Measurement(
        analyte=lab.name,
        value=value,
        unit=lab.canonical_unit,
        reported=reported,
        when=when,
        status=status,
        source=_ref(resource),
        code=found.code,
        stale=age > lab.stale_days,
        age_days=age,
        notes=notes + extra,
        upper_limit=upper,
        kind=found.kind,
    )


_Candidates = dict[tuple[str, str, bool], list[_Candidate]]


def _group(candidates: _Candidates, lab: LabConfig, role: str) -> tuple[list[_Candidate], list[_Candidate]]:
    """(accepted-status, fallback-status) results of one lab and role."""
    return candidates.get((lab.name, role, True), []), candidates.get((lab.name, role, False), [])


def _vitd(candidates: _Candidates, lab: LabConfig, config: FactsConfig, today: date) -> Measurement | None:
    """Total first; the D3 fraction (plus a same-day D2 fraction) only for a date without a total."""
    totals = _group(candidates, lab, "total")
    total_dates = {c[2] for group in totals for c in group}
    d3_accepted, d3_fallback = _group(candidates, lab, "d3")
    best_total = _newest(*totals)
    best_d3 = _newest(
        [c for c in d3_accepted if c[2] not in total_dates],
        [c for c in d3_fallback if c[2] not in total_dates],
    )
    if best_d3 is None or (best_total is not None and best_total[2] >= best_d3[2]):
        return _measurement(best_total, lab, config, today, ()) if best_total else None
    day = best_d3[2]
    d2_accepted, d2_fallback = _group(candidates, lab, "d2")
    d2 = _newest([c for c in d2_accepted if c[2] == day], [c for c in d2_fallback if c[2] == day])
    if d2 is None:
        return _measurement(best_d3, lab, config, today, (config.notes["d3_only"],))
    d3_value, d3_reported = _quantity(best_d3[6], best_d3[4].lab, best_d3[4].code)
    d2_value, d2_reported = _quantity(d2[6], d2[4].lab, d2[4].code)
    combined = Interval(
        d3_value.lo + d2_value.lo,
        d3_value.hi + d2_value.hi,
        d3_value.lo_open or d2_value.lo_open,
        d3_value.hi_open or d2_value.hi_open,
    )
    summed = (combined, f"{d3_reported} + D2 {d2_reported}")
    return _measurement(best_d3, lab, config, today, (config.notes["d3_plus_d2"],), summed)


def _specimen(resource: Mapping[str, Any]) -> str | None:
    specimen = resource.get("specimen")
    return _str(specimen.get("reference")) if isinstance(specimen, Mapping) else None


def _lowest_of_specimen(
    best: _Candidate, group: tuple[list[_Candidate], list[_Candidate]], config: FactsConfig
) -> tuple[_Candidate, tuple[str, ...]]:
    """Of the results of `best`'s specimen (its Specimen, else its moment), the lowest value: labs send
    one specimen's eGFR by several equations. Chosen by value, then code, then content; never by id."""
    specimen = _specimen(best[6])
    same = [
        c
        for c in (group[0] or group[1])
        if c[0] == best[0] or (specimen is not None and _specimen(c[6]) == specimen)
    ]
    if len(same) < 2:
        return best, ()
    read = sorted(
        ((_quantity(c[6], c[4].lab, c[4].code), c) for c in same),
        key=lambda item: (item[0][0].hi, item[0][0].lo, item[1][4].code, canonical(item[1][6])),
    )
    if len({(value, text) for (value, text), _c in read}) < 2:
        return read[0][1], ()
    listed = ", ".join(f"{text} ({c[4].code})" for (_value, text), c in read)
    return read[0][1], (f"{config.notes['same_specimen_lowest']}: {listed}",)


def _simple_lab(
    candidates: _Candidates, lab: LabConfig, config: FactsConfig, today: date
) -> Measurement | None:
    group = _group(candidates, lab, "primary")
    best = _newest(*group)
    notes: tuple[str, ...] = ()
    if best is None:
        group = _group(candidates, lab, "fallback")
        best = _newest(*group)
        notes = (config.notes["legacy_equation"],) if best else ()
    if best is not None and lab.same_specimen_lowest:
        best, choice = _lowest_of_specimen(best, group, config)
        notes += choice
    if best is None:
        return None
    measured = _measurement(best, lab, config, today, notes)
    return _albumin_corrected(measured, lab.correction, candidates, config) if lab.correction else measured


def _albumin_corrected(
    measured: Measurement, correction: AlbuminCorrection, candidates: _Candidates, config: FactsConfig
) -> Measurement:
    """A total calcium corrected by an albumin of the same day; exact numbers only (a comparator never
    becomes one)."""
    albumin_lab = config.labs.get(correction.lab)
    if measured.kind != correction.applies_to or not measured.value.is_exact or albumin_lab is None:
        return measured
    accepted, fallback = _group(candidates, albumin_lab, "primary")
    albumin = _newest(
        [c for c in accepted if c[2] == measured.when], [c for c in fallback if c[2] == measured.when]
    )
    if albumin is None:
        return measured
    value, reported = _quantity(albumin[6], albumin_lab, albumin[4].code)
    if not value.is_exact:
        return measured
    lab = config.labs[measured.analyte]
    corrected = round(
        measured.value.lo + correction.coefficient * (correction.normal - value.lo), lab.decimals
    )
    basis = f"{correction.note}: measured total {measured.shown}, albumin {reported} of the same day"
    return replace(
        measured,
        value=Interval.exact(corrected),
        reported=format_interval(Interval.exact(corrected), lab.canonical_unit, None),
        kind=correction.kind,
        notes=(*measured.notes, basis),
    )


def _evidence_order(evidence: Evidence) -> tuple[str, str, str]:
    return (evidence.source, evidence.text, evidence.when.isoformat() if evidence.when else "")


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
    doses: MedicationDoser | None = None,
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
        except _ERRORS as exc:
            collector.report(resource, f"unreadable ({type(exc).__name__})")
    labs = config.labs
    found = collector.candidates
    vitd = _vitd(found, labs["vitd"], config, today) if "vitd" in labs else None
    egfr = _simple_lab(found, labs["egfr"], config, today) if "egfr" in labs else None
    calcium = _simple_lab(found, labs["calcium"], config, today) if "calcium" in labs else None
    return Facts(
        today=today,
        vitd=vitd,
        egfr=egfr,
        calcium=calcium,
        # Copies of one record (`unique_resources`) may say the same thing twice: said once.
        pregnancy=tuple(sorted(set(collector.pregnancy), key=_evidence_order)),
        conditions={
            k: tuple(sorted(set(v), key=_evidence_order)) for k, v in sorted(collector.conditions.items())
        },
        medications=tuple(
            sorted(
                set(collector.medications),
                key=lambda m: (m.category, m.source, m.name, m.matched_by, m.status),
            )
        ),
        issues=tuple(sorted(set(collector.issues))),
        missing=tuple(missing),
        incomplete=tuple(incomplete),
        copies=tuple(sorted(copies)),
        unknown_medications=tuple(sorted(set(collector.unknown), key=lambda u: (u.source, u.reason, u.name))),
        age=read_age(collector.patients, today, config.age),
    )


def _limit(calcium: Measurement, lab: LabConfig) -> float | None:
    return calcium.upper_limit if calcium.upper_limit is not None else lab.kind_limits.get(calcium.kind)


def calcium_high(calcium: Measurement | None, lab: LabConfig) -> bool | None:
    """Above the lab's upper limit, else above the default limit of its kind (total, ionized, …)."""
    if calcium is None:
        return None
    limit = _limit(calcium, lab)
    if limit is None:
        return None
    return calcium.value.gt(limit)


def calcium_grade(calcium: Measurement | None, lab: LabConfig) -> str | None:
    """ "none" unless certainly high; then the highest grade it certainly reaches, or "ungraded" for a kind
    without verified grades (ionized)."""
    if calcium is None:
        return None
    if calcium_high(calcium, lab) is not True:
        return "none"
    grade = certain_band(calcium.value, lab.grades) if calcium.kind in lab.graded_kinds else None
    return grade.id if grade else "ungraded"


def describe_limit(calcium: Measurement, lab: LabConfig, lab_limit: str, default_limit: str) -> str:
    """The upper limit used, and whether it is the lab's (`lab_limit`) or the default (`default_limit`,
    which may name the calcium `{kind}`)."""
    limit = _limit(calcium, lab)
    origin = lab_limit if calcium.upper_limit is not None else default_limit.format(kind=calcium.kind)
    return f"{format_exact(limit or 0.0)} {lab.canonical_unit} ({origin})"
