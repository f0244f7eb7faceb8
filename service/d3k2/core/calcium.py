"""Whether a calcium result is high, how high, and the limit the card names (pure)."""

from __future__ import annotations

import math

from d3k2.core.labs import LabConfig, Measurement
from d3k2.core.quantities import certain_band, format_beside, format_exact


def _stated(calcium: Measurement, lab: LabConfig) -> tuple[float, str] | None:
    """The default limit of the result's kind as its source states it in the unit the result was reported in
    (2.62 mmol/L, not 10.5 mg/dL converted: 2.62 mmol/L is at the limit, not 0.001 mg/dL above it)."""
    factor = lab.units.get(calcium.reported_unit)
    for unit, limits in lab.limits_in.items():
        if factor is not None and lab.units.get(unit) == factor and calcium.kind in limits:
            return limits[calcium.kind], unit
    return None


def upper_limit_of(calcium: Measurement, lab: LabConfig) -> float | None:
    """The limit in the canonical unit: the lab's range, else the default of its kind, in the result's unit
    when its source states one (converted exactly as the result is), else in the canonical unit."""
    if calcium.upper_limit is not None:
        return calcium.upper_limit
    stated = _stated(calcium, lab)
    if stated is not None:
        return stated[0] * lab.units[stated[1]]
    return lab.kind_limits.get(calcium.kind)


def calcium_high(calcium: Measurement | None, lab: LabConfig) -> bool | None:
    """Above the lab's upper limit, else above the default limit of its kind (total, ionized, …)."""
    if calcium is None:
        return None
    limit = upper_limit_of(calcium, lab)
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
    which may name the calcium `{kind}`): a stated default in its own unit, any other in the canonical unit,
    never shown on the other side of the value from where it is."""
    origin = lab_limit if calcium.upper_limit is not None else default_limit.format(kind=calcium.kind)
    stated = _stated(calcium, lab) if calcium.upper_limit is None else None
    if stated is not None:
        return f"{format_exact(stated[0])} {stated[1]} ({origin})"
    limit = upper_limit_of(calcium, lab) or 0.0
    value = calcium.value
    # A limit on the value is not below it (the value is not above the limit).
    marks = [(bound, True) for bound in (value.lo, value.hi) if not math.isinf(bound)]
    return f"{format_beside(limit, lab.decimals, marks)} {lab.canonical_unit} ({origin})"
