"""What the "Why this card?" app draws: lab results over time, vitamin D products on the same time axis,
and the geometry of the inline SVG charts (d3k2.http.smart renders them; templates/smart.html draws them).

Read from the resources the hook pipeline itself read (``Resolved.resources``), with the rule set's own
readers (codes, units, dates), so a point on the chart is the value the facts would read. Nothing is kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date
from typing import Any

from d3k2.core.facts import implausible
from d3k2.core.labs import LabConfig, lab_role, quantity_parts
from d3k2.core.readers import Unreadable, loinc_codes, medication_text, observation_date, parse_date, ref_of
from d3k2.core.ruleset import Band, RuleSet
from d3k2.service import classifier
from d3k2.whatif import Explanation, _medication_codeable

_FRACTIONS = ("d3", "d2")
WIDTH, HEIGHT = 720.0, 240.0
LEFT, RIGHT, TOP, BOTTOM = 56.0, 180.0, 12.0, 28.0
LANE = 26.0


@dataclass(frozen=True)
class Point:
    when: date
    value: float  # the lab's canonical unit
    shown: str  # as reported, e.g. "45 nmol/L"
    unit: str
    role: str
    kind: str
    source: str  # "Observation/<id>"
    status: str

    plotted: bool = True  # False: listed only (ionized calcium; a fraction on a day with a total result)
    # Why the facts do not use it either ("" when they do): a value no body can have, or a date after today.
    unused: str = ""

    @property
    def used(self) -> bool:
        return not self.unused


@dataclass(frozen=True)
class Span:
    name: str
    start: date
    end: date | None  # None: ongoing
    status: str
    daily: str
    source: str


def _ref(resource: Mapping[str, Any]) -> str:
    return f"{resource.get('resourceType')}/{resource.get('id', '(no id)')}"


def lab_points(
    resources: Sequence[Mapping[str, Any]], ruleset: RuleSet, name: str, today: date
) -> list[Point]:
    """Every readable result of one lab, oldest first; copies of one result once. A result the facts do not
    use (no body can have it, or dated after today beyond the clock skew allowed) is listed, never drawn."""
    lab = ruleset.facts.labs[name]
    statuses = {*ruleset.facts.accepted_status, *ruleset.facts.fallback_status}
    found: dict[tuple[str, date, float], Point] = {}
    for resource in resources:
        if resource.get("resourceType") != "Observation" or resource.get("status") not in statuses:
            continue
        role = lab_role(loinc_codes(resource), ruleset.terminology, lab)
        when = observation_date(resource)
        if role is None or when is None:
            continue
        try:
            value, comparator, unit = quantity_parts(resource, lab, role[1])
        except (Unreadable, TypeError, ValueError):
            continue
        concepts = ruleset.terminology.concepts("http://loinc.org", role[1])
        kind = next((k for vs, k in lab.kinds.items() if vs in concepts), "")
        canonical = round(value * lab.units[unit], lab.decimals)
        shown = f"{comparator or ''}{value:g} {unit}"
        point = Point(
            when,
            canonical,
            shown,
            lab.canonical_unit,
            role[0],
            kind,
            ref_of(resource),
            resource["status"],
            unused=_unused(lab, value, comparator, unit, kind, when, today, ruleset.facts.future_days),
        )
        found.setdefault((point.source, when, canonical), point)
    # A D3 or D2 fraction is drawn when it is the day's only 25(OH)D result (the facts then read it too).
    totals = {p.when for p in found.values() if p.role not in _FRACTIONS}
    return [
        replace(p, plotted=p.used and p.kind != "ionized" and not (p.role in _FRACTIONS and p.when in totals))
        for p in sorted(found.values(), key=lambda p: (p.when, p.source))
    ]


def _unused(
    lab: LabConfig,
    value: float,
    comparator: str | None,
    unit: str,
    kind: str,
    when: date,
    today: date,
    future: int,
) -> str:
    if (when - today).days > future:
        return "not used: dated after today"
    if implausible(lab, value, comparator, unit, kind):
        return "not used: no body can have it"
    return ""


def _start_end(resource: Mapping[str, Any]) -> tuple[date | None, date | None]:
    period = resource.get("effectivePeriod")
    if resource.get("resourceType") == "MedicationRequest":
        dispense = resource.get("dispenseRequest")
        period = dispense.get("validityPeriod") if isinstance(dispense, Mapping) else None
    if isinstance(period, Mapping):
        start, end = parse_date(period.get("start")), parse_date(period.get("end"))
    else:
        start, end = None, None
    start = start or parse_date(resource.get("effectiveDateTime")) or parse_date(resource.get("authoredOn"))
    start = start or parse_date(resource.get("dateAsserted"))
    return start, end


def vitamin_d_spans(
    resources: Sequence[Mapping[str, Any]], ruleset: RuleSet, daily: Mapping[str, str]
) -> list[Span]:
    """Vitamin D products on record with the time they cover (`daily`: source → daily dose as shown)."""
    spans: list[Span] = []
    for resource in resources:
        if resource.get("resourceType") not in ("MedicationStatement", "MedicationRequest"):
            continue
        codeable = _medication_codeable(resource, resources)
        if not any(category == "vitamin-d" for category, _n, _b in classifier(ruleset)(codeable)):
            continue
        start, end = _start_end(resource)
        if start is None:
            continue
        status = resource.get("status")
        source = ref_of(resource)
        spans.append(
            Span(
                medication_text(codeable) or "vitamin D",
                start,
                end,
                status if isinstance(status, str) else "",
                daily.get(source, ""),
                source,
            )
        )
    return sorted(spans, key=lambda s: (s.start, s.source))


# ---------------------------------------------------------------- chart geometry


@dataclass(frozen=True)
class Axis:
    start: date
    end: date

    def x(self, day: date) -> float:
        span = max((self.end - self.start).days, 1)
        return round(LEFT + (WIDTH - LEFT - RIGHT) * (day - self.start).days / span, 1)

    def ticks(self) -> list[tuple[float, str]]:
        years = range(self.start.year + 1, self.end.year + 1)
        if len(years) > 1:
            return [(self.x(date(y, 1, 1)), str(y)) for y in years]
        return [(self.x(self.start), self.start.isoformat()), (self.x(self.end), self.end.isoformat())]


def time_axis(days: Sequence[date], today: date) -> Axis:
    start = min((*days, today))
    return Axis(date(start.year, 1, 1) if start.year < today.year else start.replace(day=1), today)


@dataclass(frozen=True)
class Chart:
    """An SVG line chart of one lab: bands (rectangles with labels), points (x, y, label) and y ticks."""

    label: str
    unit: str
    top: float
    bands: list[dict[str, Any]]
    points: list[dict[str, Any]]
    path: str
    yticks: list[tuple[float, str]]
    xticks: list[tuple[float, str]]
    height: float = HEIGHT
    width: float = WIDTH


def _y(value: float, top: float) -> float:
    return round(HEIGHT - BOTTOM - (HEIGHT - TOP - BOTTOM) * min(value, top) / top, 1)


def _nice_top(values: Sequence[float], floor: float) -> float:
    top = max((*values, floor)) * 1.1
    step = 10 ** math.floor(math.log10(top))
    return float(math.ceil(top / step) * step)


def chart(label: str, unit: str, points: Sequence[Point], axis: Axis, bands: Sequence[Band] = ()) -> Chart:
    plotted = [p for p in points if p.plotted]
    highest = max((p.value for p in plotted), default=1.0)
    # Up to the first band limit at twice the highest value, so the bands around the values show.
    limits = sorted(b.upper for b in bands if math.isfinite(b.upper))
    top = _nice_top([highest], next((u for u in limits if u >= 2 * highest), limits[-1] if limits else 1.0))
    drawn_bands = []
    for band in bands:
        low, high = max(band.lower, 0.0), min(band.upper, top)
        if low >= top:
            continue
        y_high, y_low = _y(high, top), _y(low, top)
        drawn_bands.append(
            {
                "id": band.id,
                "label": band.label,
                "y": y_high,
                "h": round(y_low - y_high, 1),
                "mid": (y_high + y_low) / 2,
            }
        )
    drawn = [
        {
            "x": axis.x(p.when),
            "y": _y(p.value, top),
            "text": f"{p.value:g}",
            "title": f"{p.shown} on {p.when.isoformat()}",
        }
        for p in plotted
    ]
    path = " ".join(f"{'M' if i == 0 else 'L'}{d['x']},{d['y']}" for i, d in enumerate(drawn))
    yticks = [(_y(top * i / 4, top), f"{top * i / 4:g}") for i in range(5)]
    return Chart(label, unit, top, drawn_bands, drawn, path, yticks, axis.ticks())


def lanes(spans: Sequence[Span], axis: Axis) -> list[dict[str, Any]]:
    """One horizontal bar per vitamin D product on the chart's time axis (ongoing ones reach today)."""
    drawn = []
    # A product that starts after today is listed (the table under the chart), not drawn: a bar at today would
    # read as taken now.
    for i, span in enumerate(s for s in spans if s.start <= axis.end):
        x0 = axis.x(max(span.start, axis.start))
        x1 = axis.x(min(span.end or axis.end, axis.end))
        until = span.end.isoformat() if span.end else "ongoing"
        drawn.append(
            {
                "x": x0,
                "w": max(x1 - x0, 3.0),
                "y": 4 + i * LANE,
                "text": f"{span.name} {span.daily}".strip(),
                "title": f"{span.name}: {span.start.isoformat()} to {until} ({span.status})",
            }
        )
    return drawn


# ---------------------------------------------------------------- the page


LABS = ("vitd", "egfr", "calcium")


def page_context(
    report: dict[str, Any], explanation: Explanation, ruleset: RuleSet, profile_name: str, today: date
) -> dict[str, Any]:
    """What templates/smart.html shows: the charts, their table equivalents and the explain report."""
    resources = explanation.resolved.resources
    series = {name: lab_points(resources, ruleset, name, today) for name in LABS}
    daily = {m["source"]: m["daily"] or "" for m in report["facts"]["medications"]}
    spans = vitamin_d_spans(resources, ruleset, daily)
    drawn = [p.when for points in series.values() for p in points if p.plotted]
    axis = time_axis(drawn + [s.start for s in spans], today)
    profile = ruleset.profiles[profile_name]
    labs = ruleset.facts.labs
    charts = [
        chart(labs["vitd"].label, labs["vitd"].canonical_unit, series["vitd"], axis, profile.bands),
        chart(labs["egfr"].label, labs["egfr"].canonical_unit, series["egfr"], axis),
        chart(labs["calcium"].label, labs["calcium"].canonical_unit, series["calcium"], axis),
    ]
    return {
        "report": report,
        "today": today.isoformat(),
        "profile": profile,
        "profile_name": profile_name,
        "charts": charts,
        "series": [(labs[name].label, series[name]) for name in LABS],
        "lanes": lanes(spans, axis),
        "spans": spans,
        "chart_width": WIDTH,
        "lane_height": LANE * max(len(spans), 1) + 8,
        "labs": [
            (name, labs[name].label, sorted(labs[name].units), labs[name].canonical_unit) for name in LABS
        ],
    }
