"""Lab results (Observations) → Measurements: vitamin D, eGFR, calcium (and the albumin that corrects it).
Pure: no Flask, no requests, no clock.

A lab history can hold thousands of results of which only the newest per lab and role is ever
shown, so Observations are read in two stages:

1. Triage (every Observation, `d3k2.core.facts`): its LOINC codes → lab and role (looked up once per
   code list), its status, its date and time, and every check that makes a result unreadable (number,
   unit, comparator, date). An unreadable result is reported whatever its age, exactly as if it had
   been read in full. What is kept of a readable one is a light `Candidate` tuple.
2. Selection (a few candidates): `_newest` picks the newest per lab and role; only the picked
   ones are read in full (value interval in the canonical unit, reported text, source).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from d3k2.core.copies import canonical
from d3k2.core.quantities import Interval, LabBand, Mark, format_exact, format_interval
from d3k2.core.readers import Unreadable, instant, nonempty_str, parse_date, ref_of
from d3k2.core.terminology import LOINC, Terminology

if TYPE_CHECKING:  # the config of the whole reading, of which the labs are part
    from d3k2.core.facts import FactsConfig

_THOUSANDS = re.compile(r"^[0-9]+,[0-9]{3}$")
_COMPARATOR_STRING = re.compile(r"^\s*(<=|>=|<|>|=)?\s*([0-9]+(?:[.,][0-9]+)?)\s*([^\s0-9].*)?$")


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
    # A higher floor for some kinds (total calcium: a mmol/L number sent as mg/dL sits where only an
    # ionized calcium can be).
    above_by_kind: Mapping[str, float] = field(default_factory=dict)


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
    # Codes whose value a published race coefficient multiplied ("among blacks" eGFR) → that coefficient: the
    # value divided by it is the same equation's value without it, read as a `fallback` (legacy) result.
    race_coefficients: Mapping[str, float] = field(default_factory=dict)
    race_coefficients_source: str = ""
    default_unit_by_code: Mapping[str, str] = field(default_factory=dict)
    # value set → the kind of measurement it is, named on the card (calcium: total, ionized, …).
    kinds: Mapping[str, str] = field(default_factory=dict)
    # kind → upper limit (canonical unit) when the lab sends no range.
    kind_limits: Mapping[str, float] = field(default_factory=dict)
    # unit → kind → the same limit as its source states it in that unit, for results reported in it.
    limits_in: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
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
    # Which of disagreeing copies of one result is the cautious one: "highest" (25(OH)D, calcium: the
    # toxicity and hypercalcemia cards) or "lowest" (eGFR: the kidney card; albumin: the higher correction).
    cautious: str = "highest"
    # unit → every threshold a rule holds a value reported in it against (canonical unit; the loader collects
    # them): a converted value is shown with the digits that keep it on its side of each (`format_beside`).
    marks: Mapping[str, tuple[Mark, ...]] = field(default_factory=dict)


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
    # How the value was reported (the unit as sent) and shown: the value the rules use is converted from it
    # unrounded; shown beside the reported one with the lab's decimals, or more near a threshold (`marks`).
    reported_unit: str = field(default="", compare=False)
    converted: bool = field(default=False, compare=False)
    decimals: int = field(default=2, compare=False)
    marks: tuple[Mark, ...] = field(default=(), compare=False)

    @property
    def shown(self) -> str:
        """As reported; a converted value beside it, never shown across a threshold from where it is."""
        if not self.converted:
            return self.reported
        return f"{self.reported} ({format_interval(self.value, self.unit, self.decimals, self.marks)})"


# (at, id, when, status, role, upper limit, resource): `at` and `id` first, as the newest result is
# the one with the greatest (at, "Observation/<id>") and every source of a candidate starts with
# "Observation/"; `id` is `NO_ID` for a result without one, as in its source.
Candidate = tuple[datetime, str, date, str, "Role", float | None, Mapping[str, Any]]
_NEWEST_KEY = itemgetter(0, 1)


class Role:
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


def quantity_parts(resource: Mapping[str, Any], lab: LabConfig, code: str) -> tuple[float, str | None, str]:
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
            raise Unreadable("value_not_number")
        comparator = quantity.get("comparator")
        if comparator is not None:
            comparator = nonempty_str(comparator)
        unit = quantity.get("code")
        if not (isinstance(unit, str) and unit):
            unit = nonempty_str(quantity.get("unit"))
        if unit is None:
            raise Unreadable("no_unit")
        if unit not in lab.units and nonempty_str(quantity.get("unit")) in lab.units:
            unit = str(quantity["unit"])
        value = float(raw)
    elif isinstance(resource.get("valueString"), str):
        match = _COMPARATOR_STRING.match(resource["valueString"])
        if not match:
            raise Unreadable("value_not_number")
        comparator = match.group(1)
        number = match.group(2)
        # "12,5" is a decimal comma, but "1,220" is 1.22 in one country and 1,220 in another: a thousand
        # times apart, either side of every threshold. Never guessed; not used, and named.
        if _THOUSANDS.match(number):
            raise Unreadable("ambiguous_number")
        value = float(number.replace(",", "."))
        unit = (match.group(3) or "").strip() or lab.default_unit_by_code.get(code)
        if unit is None:
            raise Unreadable("no_unit")
    else:
        raise Unreadable("no_value")
    if comparator is not None and comparator not in ("<", "<=", ">", ">=", "="):
        raise Unreadable("comparator_unknown", repr(comparator))
    if unit not in lab.units:
        raise Unreadable("unit_unknown", repr(unit))
    return value, comparator, unit


def _read(resource: Mapping[str, Any], lab: LabConfig, code: str) -> tuple[Interval, str, str]:
    """(interval in the canonical unit, reported text, unit) of a result triage found readable. Converted,
    never rounded: the rules decide on the value reported (374.5 nmol/L is above 150 ng/mL). A value a race
    coefficient multiplied is divided by it (`LabConfig.race_coefficients`)."""
    value, comparator, unit = quantity_parts(resource, lab, code)
    factor = lab.units[unit]
    reported_interval = Interval.from_comparator(value, comparator)
    display_unit = lab.canonical_unit if factor == 1.0 else unit
    converted = reported_interval if factor == 1.0 else reported_interval.scaled(factor)
    coefficient = lab.race_coefficients.get(code)
    if coefficient is not None:
        converted = Interval(
            converted.lo / coefficient, converted.hi / coefficient, converted.lo_open, converted.hi_open
        )
    return converted, format_interval(reported_interval, display_unit, None), unit


def _quantity(resource: Mapping[str, Any], lab: LabConfig, code: str) -> tuple[Interval, str]:
    """(interval in the canonical unit, reported text) of a result triage found readable."""
    value, reported, _unit = _read(resource, lab, code)
    return value, reported


def upper_limit(resource: Mapping[str, Any], lab: LabConfig, unit: str | None = None) -> float | None:
    """The lab's upper limit in the canonical unit: a high without a unit is in the result's own `unit`;
    of several ranges (a child's and an adult's), the lowest high, the cautious one."""
    ranges = resource.get("referenceRange")
    if not isinstance(ranges, list):
        return None
    limits = []
    for rng in ranges:
        high = rng.get("high") if isinstance(rng, Mapping) else None
        if isinstance(high, Mapping) and isinstance(high.get("value"), int | float):
            high_unit = nonempty_str(high.get("code")) or nonempty_str(high.get("unit")) or unit
            factor = lab.units.get(high_unit or "")
            if factor is not None:
                # Converted as a result is (unrounded), so that a result equal to the limit is never above it.
                limit = float(high["value"])
                limits.append(limit if factor == 1.0 else limit * factor)
    return min(limits, default=None)


def lab_role(codes: Sequence[str], terminology: Terminology, lab: LabConfig) -> tuple[str, str] | None:
    # A race-specific code says what the value is, whatever other code the result also carries (an "among
    # blacks" eGFR coded with a race-free code too is still the raised value): legacy, divided when read.
    for code in codes:
        if code in lab.race_coefficients:
            return "fallback", code
    for code in codes:
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


def moment_of(text: str) -> tuple[str, date, datetime | None] | None:
    """(text, date, sortable instant) of a date text: `parse_date` and `instant` with one parse.
    No instant when working it out fails: it is then worked out again where reading the result
    would have failed, to report the same reason."""
    stripped = text.strip()
    if len(stripped) in (4, 7, 10):  # a date without a time: parse_date's own ways
        when = parse_date(text)
        if when is None:
            return None
        return text, when, instant(text, when)
    try:
        moment = datetime.fromisoformat(stripped.replace("Z", "+00:00"))
    except ValueError:
        return None
    zone = moment.tzinfo
    if zone is UTC:  # as `instant` would give, without its second parse
        return text, moment.date(), moment
    if zone is None:
        return text, moment.date(), moment.replace(tzinfo=UTC)
    try:
        return text, moment.date(), moment.astimezone(UTC)
    except OverflowError:
        return text, moment.date(), None


# ---------------------------------------------------------------- stage 2: the newest results


NO_ID = "(no id)"


def _newest(
    accepted: list[Candidate], fallback: list[Candidate], lab: LabConfig, config: FactsConfig
) -> tuple[Candidate | None, tuple[str, ...]]:
    """Newest by time; final beats preliminary; never by Bundle order. Copies of one record (same id, which
    `unique_resources` keeps when it cannot tell which is newer), whatever their date or status, and results
    without an id at the same moment: the most cautious of them (`LabConfig.cautious`), and the card names
    the disagreement, so that no copy removes a caution another supports."""
    candidates = accepted or fallback
    if not candidates:
        return None, ()
    best = max(candidates, key=_NEWEST_KEY)
    rid = best[1]
    copies = [c for c in (*accepted, *fallback) if c[1] == rid and (rid != NO_ID or c[0] == best[0])]
    if len(copies) == 1:
        return best, ()
    read = [(_quantity(c[6], c[4].lab, c[4].code), c) for c in copies]
    if lab.cautious == "lowest":
        read.sort(key=lambda item: (item[0][0].lo, item[0][0].hi, canonical(item[1][6])))
    else:
        read.sort(key=lambda item: (-item[0][0].hi, -item[0][0].lo, canonical(item[1][6])))
    pick = read[0][1]
    if len({value for (value, _text), _c in read}) < 2:
        return pick, ()
    listed = ", ".join(dict.fromkeys(f"{text} on {c[2].isoformat()}" for (_value, text), c in read))
    return pick, (f"{config.notes['conflicting_copies']}: {listed}",)


def _measurement(
    candidate: Candidate,
    lab: LabConfig,
    config: FactsConfig,
    today: date,
    notes: tuple[str, ...],
    summed: tuple[Interval, str] | None = None,
) -> Measurement:
    """Stage 2: the picked result read in full (or its value and text `summed` with another's)."""
    _at, _id, when, status, found, upper, resource = candidate
    extra: tuple[str, ...] = ()
    if summed is None:
        value, reported, unit = _read(resource, found.lab, found.code)
        coefficient = found.lab.race_coefficients.get(found.code)
        converted = found.lab.units[unit] != 1.0 or coefficient is not None
        if coefficient is not None:
            extra = (config.notes["race_coefficient_removed"].format(coefficient=format_exact(coefficient)),)
    else:
        (value, reported), upper, unit, converted = summed, None, lab.canonical_unit, True
    age = (today - when).days
    extra += (config.notes["preliminary"],) if status == "preliminary" else ()
    return Measurement(
        analyte=lab.name,
        value=value,
        unit=lab.canonical_unit,
        reported=reported,
        when=when,
        status=status,
        source=ref_of(resource),
        code=found.code,
        stale=age > lab.stale_days,
        age_days=age,
        notes=notes + extra,
        upper_limit=upper,
        kind=found.kind,
        reported_unit=unit,
        converted=converted,
        decimals=lab.decimals,
        marks=(*lab.marks.get(unit, ()), *(() if upper is None else ((upper, False),))),
    )


Candidates = dict[tuple[str, str, bool], list[Candidate]]


def _group(candidates: Candidates, lab: LabConfig, role: str) -> tuple[list[Candidate], list[Candidate]]:
    """(accepted-status, fallback-status) results of one lab and role."""
    return candidates.get((lab.name, role, True), []), candidates.get((lab.name, role, False), [])


def read_vitd(candidates: Candidates, lab: LabConfig, config: FactsConfig, today: date) -> Measurement | None:
    """Total first; the D3 fraction (plus a same-day D2 fraction) only for a date without a total."""
    totals = _group(candidates, lab, "total")
    total_dates = {c[2] for group in totals for c in group}
    d3_accepted, d3_fallback = _group(candidates, lab, "d3")
    best_total, total_notes = _newest(*totals, lab, config)
    best_d3, d3_notes = _newest(
        [c for c in d3_accepted if c[2] not in total_dates],
        [c for c in d3_fallback if c[2] not in total_dates],
        lab,
        config,
    )
    if best_d3 is None or (best_total is not None and best_total[2] >= best_d3[2]):
        return _measurement(best_total, lab, config, today, total_notes) if best_total else None
    day = best_d3[2]
    d2_accepted, d2_fallback = _group(candidates, lab, "d2")
    d2, d2_notes = _newest(
        [c for c in d2_accepted if c[2] == day], [c for c in d2_fallback if c[2] == day], lab, config
    )
    if d2 is None:
        return _measurement(best_d3, lab, config, today, (config.notes["d3_only"], *d3_notes))
    d3_value, d3_reported = _quantity(best_d3[6], best_d3[4].lab, best_d3[4].code)
    d2_value, d2_reported = _quantity(d2[6], d2[4].lab, d2[4].code)
    combined = Interval(
        d3_value.lo + d2_value.lo,
        d3_value.hi + d2_value.hi,
        d3_value.lo_open or d2_value.lo_open,
        d3_value.hi_open or d2_value.hi_open,
    )
    summed = (combined, f"{d3_reported} + D2 {d2_reported}")
    notes = (config.notes["d3_plus_d2"], *d3_notes, *d2_notes)
    return _measurement(best_d3, lab, config, today, notes, summed)


def _specimen(resource: Mapping[str, Any]) -> str | None:
    specimen = resource.get("specimen")
    return nonempty_str(specimen.get("reference")) if isinstance(specimen, Mapping) else None


def _lowest_of_specimen(
    best: Candidate, group: tuple[list[Candidate], list[Candidate]], config: FactsConfig
) -> tuple[Candidate, tuple[str, ...]]:
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
    listed = ", ".join(f"{_as_compared(value, text, c, config)} ({c[4].code})" for (value, text), c in read)
    return read[0][1], (f"{config.notes['same_specimen_lowest']}: {listed}",)


def _as_compared(value: Interval, reported: str, candidate: Candidate, config: FactsConfig) -> str:
    """A result as reported, and as compared when that differs (an "among blacks" eGFR without its race
    coefficient, never shown across a threshold)."""
    lab, code = candidate[4].lab, candidate[4].code
    if code not in lab.race_coefficients:
        return reported
    shown = format_interval(value, lab.canonical_unit, lab.decimals, lab.marks.get(lab.canonical_unit, ()))
    return config.notes["race_coefficient_listed"].format(reported=reported, value=shown)


def read_simple_lab(
    candidates: Candidates, lab: LabConfig, config: FactsConfig, today: date
) -> Measurement | None:
    group = _group(candidates, lab, "primary")
    best, notes = _newest(*group, lab, config)
    legacy_group = _group(candidates, lab, "fallback")
    legacy, legacy_notes = _newest(*legacy_group, lab, config)
    # The newest result wins whatever its equation: a legacy one yields to a race-free one of the same day
    # (the same specimen by another equation) only, so that an old race-free eGFR never hides a new one.
    if legacy is not None and (best is None or legacy[2] > best[2]):
        best, group = legacy, legacy_group
        notes = (config.notes["legacy_equation"], *legacy_notes)
    if best is not None and lab.same_specimen_lowest:
        best, choice = _lowest_of_specimen(best, group, config)
        notes += choice
    if best is None:
        return None
    measured = _measurement(best, lab, config, today, notes)
    return _albumin_corrected(measured, lab.correction, candidates, config) if lab.correction else measured


def _albumin_corrected(
    measured: Measurement, correction: AlbuminCorrection, candidates: Candidates, config: FactsConfig
) -> Measurement:
    """A total calcium corrected by an albumin of the same day; exact numbers only (a comparator never
    becomes one)."""
    albumin_lab = config.labs.get(correction.lab)
    if measured.kind != correction.applies_to or not measured.value.is_exact or albumin_lab is None:
        return measured
    accepted, fallback = _group(candidates, albumin_lab, "primary")
    albumin, _notes = _newest(
        [c for c in accepted if c[2] == measured.when],
        [c for c in fallback if c[2] == measured.when],
        albumin_lab,
        config,
    )
    if albumin is None:
        return measured
    value, reported = _quantity(albumin[6], albumin_lab, albumin[4].code)
    if not value.is_exact:
        return measured
    lab = config.labs[measured.analyte]
    upper = () if measured.upper_limit is None else ((measured.upper_limit, False),)
    marks = (*lab.marks.get(lab.canonical_unit, ()), *upper)
    corrected = Interval.exact(measured.value.lo + correction.coefficient * (correction.normal - value.lo))
    basis = f"{correction.note}: measured total {measured.shown}, albumin {reported} of the same day"
    return replace(
        measured,
        value=corrected,
        # Computed, not reported: shown as a converted value is, never across a threshold.
        reported=format_interval(corrected, measured.unit, measured.decimals, marks),
        kind=correction.kind,
        notes=(*measured.notes, basis),
        reported_unit=measured.unit,
        converted=False,
        marks=marks,
    )
