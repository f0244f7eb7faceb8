"""The template fields of an answer: what a card's summary and detail may show ({vitd.shown},
{evidence.ckd}, {data.text}, ...), made from the facts and the fact values, each namespace when a card first
reads it (pure)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

from d3k2.core.calcium import describe_limit
from d3k2.core.facts import Facts
from d3k2.core.labs import Measurement
from d3k2.core.quantities import Banded, Interval, format_total, possible_bands
from d3k2.core.record import MedicationFact
from d3k2.core.ruleset import RuleSet
from d3k2.core.texts import Texts
from d3k2.core.vitamers import d2_fields
from d3k2.core.wording import evidence_of, evidence_text, names_of, record_kind

FactValue = bool | str | float | Interval | None


def _bands_label(value: Interval, bands: Sequence[Banded]) -> str:
    """The band's label; a value that straddles bands names each band it may be in."""
    return " or ".join(b.label for b in possible_bands(value, bands))


def _range_note(value: Interval, bands: Sequence[Banded], texts: Texts) -> str:
    """Why the band is not certain: the lab reported a bound (`>100`), not a number."""
    if len(possible_bands(value, bands)) < 2:
        return ""
    return texts.above_range if math.isinf(value.hi) else texts.below_range


def current_d(facts: Facts) -> list[MedicationFact]:
    """Current vitamin D products, one per product and dose: the same product at the same dose on two records
    (a request, and the statement that records taking it) is one intake, not two."""
    return list({(m.product, m.dose, m.daily): m for m in facts.meds("vitamin-d")}.values())


def current_daily(products: list[MedicationFact]) -> float | None:
    """IU/day from current vitamin D products: 0 without any, None when a dose cannot be read."""
    doses = [m.daily for m in products]
    return None if None in doses else sum(d for d in doses if d is not None)


def _current_d_fields(c: FieldContext) -> SimpleNamespace:
    products = current_d(c.facts)
    texts = c.ruleset.texts
    if not products:
        return SimpleNamespace(names=texts.none, daily=texts.none)
    names = ", ".join(sorted({m.product for m in products}))
    # Each product's own lead ("5,000 IU/day", "50,000 IU/week") or why its dose is unknown.
    leads = sorted(m.dose.split(":", 1)[0] if m.daily is not None else m.dose for m in products)
    total = current_daily(products)
    if len(products) == 1:
        daily = leads[0]
    elif total is None:
        daily = texts.current_unknown.format(doses="; ".join(leads))
    else:
        daily = texts.current_total.format(total=format_total(total), doses=" + ".join(leads))
    return SimpleNamespace(names=names, daily=daily)


def _measurement_fields(m: Measurement | None, texts: Texts) -> SimpleNamespace:
    if m is None:
        return SimpleNamespace(
            shown=texts.not_on_record,
            date=texts.no_date,
            stale="",
            notes="",
            age="",
            status="",
            line=texts.line_none,
            brief=texts.brief_none,
        )
    stale = texts.stale.format(days=m.age_days) if m.stale else ""
    notes = f" ({'; '.join(m.notes)})" if m.notes else ""
    date = m.when.isoformat()
    line = texts.line.format(shown=m.shown, date=date, stale=stale, notes=notes)
    brief = texts.brief.format(shown=m.shown, date=date)
    return SimpleNamespace(
        shown=m.shown,
        date=date,
        stale=stale,
        notes=notes,
        age=str(m.age_days),
        status=m.status,
        line=line,
        brief=brief,
    )


@dataclass(frozen=True)
class FieldContext:
    ruleset: RuleSet
    facts: Facts
    profile_name: str
    values: Mapping[str, FactValue]


def _profile_fields(c: FieldContext) -> SimpleNamespace:
    return SimpleNamespace(name=c.profile_name, title=c.ruleset.profiles[c.profile_name].title)


def _with_note(fields: SimpleNamespace, m: Measurement | None, note: str, texts: Texts) -> SimpleNamespace:
    if m is not None and note:
        fields.notes = f" ({'; '.join((*m.notes, note))})"
        fields.line = texts.line.format(
            shown=fields.shown, date=fields.date, stale=fields.stale, notes=fields.notes
        )
    return fields


def _vitd_fields(c: FieldContext) -> SimpleNamespace:
    m = c.facts.vitd
    texts = c.ruleset.texts
    if m is None:
        vitd = _measurement_fields(m, texts)
        vitd.band = texts.vitd_no_band
        vitd.line = texts.vitd_none
        return vitd
    bands = c.ruleset.profiles[c.profile_name].bands
    vitd = _with_note(_measurement_fields(m, texts), m, _range_note(m.value, bands, texts), texts)
    vitd.band = _bands_label(m.value, bands)
    stale = texts.stale.format(days=m.age_days) if m.stale else ""
    vitd.line = texts.vitd_line.format(
        shown=vitd.shown, date=vitd.date, notes=vitd.notes, band=vitd.band, stale=stale
    )
    return vitd


def _egfr_fields(c: FieldContext) -> SimpleNamespace:
    m = c.facts.egfr
    bands = c.ruleset.facts.labs["egfr"].bands
    texts = c.ruleset.texts
    if m is None or len(possible_bands(m.value, bands)) < 2:
        return _measurement_fields(m, texts)
    note = texts.could_be.format(bands=_bands_label(m.value, bands))
    return _with_note(_measurement_fields(m, texts), m, note, texts)


def _calcium_fields(c: FieldContext) -> SimpleNamespace:
    m = c.facts.calcium
    calcium = _measurement_fields(m, c.ruleset.texts)
    calcium.limit = ""
    calcium.grade = ""
    if m is None:
        return calcium
    lab = c.ruleset.facts.labs["calcium"]
    # Total, albumin-corrected and ionized calcium are different measurements: the card names which.
    calcium.shown = f"{m.kind} {m.shown}" if m.kind else m.shown
    texts = c.ruleset.texts
    calcium.brief = texts.brief.format(shown=calcium.shown, date=calcium.date)
    calcium.line = texts.line.format(
        shown=calcium.shown, date=calcium.date, stale=calcium.stale, notes=calcium.notes
    )
    calcium.limit = describe_limit(m, lab, texts.lab_limit, texts.default_limit)
    grade = c.values.get("calcium.grade")
    labels = {g.id: g.label for g in lab.grades}
    if grade in labels:
        calcium.grade = texts.grade.format(label=labels[str(grade)])
    elif grade == "ungraded":
        calcium.grade = texts.ungraded.format(kind=m.kind)
    return calcium


def _evidence_fields(c: FieldContext) -> SimpleNamespace:
    facts, texts = c.facts, c.ruleset.texts
    groups = {
        name: evidence_of(facts, texts, *concepts) for name, concepts in c.ruleset.facts.evidence.items()
    }
    pregnancy = evidence_text(list(facts.pregnancy), texts)
    lactation = evidence_text(list(facts.lactation), texts)
    return SimpleNamespace(**groups, pregnancy=pregnancy, lactation=lactation)


def skipped_checks(facts: Facts, texts: Texts) -> list[str]:
    """The checks not made for want of data: a lab without a usable result, and each prefetch key that
    could not be had in full (texts.toml [skipped], one text once)."""
    labs = [name for name in ("vitd", "egfr", "calcium") if getattr(facts, name) is None]
    keys = [k for k in (*labs, *facts.missing_keys) if k in texts.skipped]
    return list(dict.fromkeys(texts.skipped[k] for k in keys))


def _data_fields(c: FieldContext) -> SimpleNamespace:
    facts, texts = c.facts, c.ruleset.texts
    problems = [*facts.missing, *facts.issues]
    paragraphs = [texts.data_not_used.format(problems="; ".join(problems))] if problems else []
    if facts.copy_names:
        paragraphs.append(texts.data_copies.format(records=", ".join(facts.copy_names)))
    if facts.unknown_medications:
        unknown = "; ".join(
            texts.unknown_medication.format(
                name=m.name or texts.unnamed_medication, where=record_kind(m.source, texts), reason=m.reason
            )
            for m in facts.unknown_medications
        )
        paragraphs.append(texts.data_unknown.format(medications=unknown))
    if paragraphs and (checks := skipped_checks(facts, texts)):
        paragraphs.append(texts.data_skipped.format(checks="; ".join(checks)))
    issues = "; ".join(problems) if problems else texts.none
    return SimpleNamespace(issues=issues, text="\n\n".join(paragraphs))


# Each namespace of the template fields, in the order `template_fields` lists them.
FIELD_MAKERS: dict[str, Callable[[FieldContext], SimpleNamespace]] = {
    "profile": _profile_fields,
    "vitd": _vitd_fields,
    "egfr": _egfr_fields,
    "calcium": _calcium_fields,
    "vka": lambda c: SimpleNamespace(
        names=names_of(c.facts, "vka", c.ruleset.texts),
        sources=", ".join(sorted({record_kind(m.source, c.ruleset.texts) for m in c.facts.meds("vka")})),
    ),
    "k2": lambda c: SimpleNamespace(names=names_of(c.facts, "vitamin-k2", c.ruleset.texts)),
    "doac": lambda c: SimpleNamespace(names=names_of(c.facts, "doac", c.ruleset.texts)),
    "analog": lambda c: SimpleNamespace(names=names_of(c.facts, "vitamin-d-analog", c.ruleset.texts)),
    "current_d": _current_d_fields,
    "age": lambda c: SimpleNamespace(ceiling=c.ruleset.texts.ceilings[str(c.values["age.band"])]),
    "current_d2": lambda c: d2_fields(c.facts),
    "evidence": _evidence_fields,
    "data": _data_fields,
}


class Fields(dict[str, SimpleNamespace]):
    """The template fields of one answer, each namespace made when a card first reads it and then kept
    (like a defaultdict): an answer renders a few cards, and most namespaces are never read. A dict, so
    that `str.format_map` reads the namespaces already made at C speed."""

    __slots__ = ("_context",)

    def __init__(self, context: FieldContext) -> None:
        super().__init__()
        self._context = context

    def __missing__(self, key: str) -> SimpleNamespace:
        made = self[key] = FIELD_MAKERS[key](self._context)
        return made


def template_fields(
    ruleset: RuleSet, facts: Facts, profile_name: str, values: Mapping[str, FactValue]
) -> dict[str, SimpleNamespace]:
    context = FieldContext(ruleset, facts, profile_name, values)
    return {name: make(context) for name, make in FIELD_MAKERS.items()}
