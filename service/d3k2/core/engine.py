"""Facts + rule set → findings (pure). Conditions use three-valued logic: a value given with a
comparator (`<40`) that straddles a threshold answers "cannot tell", and a rule fires only on True.
"""

from __future__ import annotations

import math
from collections import ChainMap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from d3k2.core.dosage import IngredientDose
from d3k2.core.drafts import DraftOrder, DraftReading
from d3k2.core.facts import Facts
from d3k2.core.labs import Measurement, calcium_grade, calcium_high, describe_limit
from d3k2.core.quantities import Banded, Interval, certain_band, format_number, possible_bands
from d3k2.core.record import MedicationFact
from d3k2.core.ruleset import AllOf, AnyOf, Condition, FactTest, NotOf, Profile, Ref, Rule, RuleSet
from d3k2.core.texts import Texts

FactValue = bool | str | float | Interval | None


@dataclass(frozen=True)
class Finding:
    rule: Rule
    indicator: str
    # The template fields (`template_fields`, and `draft` for a draft rule), each namespace made when it
    # is first read: index it by name; iterating it lists only the namespaces read so far.
    fields: Mapping[str, SimpleNamespace]
    values: Mapping[str, FactValue]
    draft: DraftOrder | None = None
    ingredient: IngredientDose | None = None


@dataclass(frozen=True)
class Trace:
    rule: str
    fired: bool | None
    reasons: tuple[str, ...]
    draft: str | None = None


@dataclass(frozen=True)
class Evaluation:
    hook: str
    profile: str
    facts: Facts
    values: Mapping[str, FactValue]
    findings: tuple[Finding, ...]
    traces: tuple[Trace, ...] = field(default=())


def band_of(value: Interval, profile: Profile) -> str | None:
    """The band of every possible value, or the highest band a straddling comparator certainly reaches."""
    band = certain_band(value, profile.bands)
    return band.id if band else None


def _bands_label(value: Interval, bands: Sequence[Banded]) -> str:
    """The band's label; a value that straddles bands names each band it may be in."""
    return " or ".join(b.label for b in possible_bands(value, bands))


def _range_note(value: Interval, bands: Sequence[Banded]) -> str:
    """Why the band is not certain: the lab reported a bound (`>100`), not a number."""
    if len(possible_bands(value, bands)) < 2:
        return ""
    return "above the assay's range" if math.isinf(value.hi) else "below the assay's range"


def fact_values(ruleset: RuleSet, facts: Facts, profile_name: str) -> dict[str, FactValue]:
    profile = ruleset.profiles[profile_name]
    values: dict[str, FactValue] = {}
    vitd = facts.vitd
    values["vitd.present"] = vitd is not None
    values["vitd.value"] = vitd.value if vitd else None
    values["vitd.band"] = band_of(vitd.value, profile) if vitd else None
    values["vitd.stale"] = vitd.stale if vitd else None
    values["vitd.usable"] = vitd is not None and not vitd.stale
    for name, measurement in (("egfr", facts.egfr), ("calcium", facts.calcium)):
        values[f"{name}.present"] = measurement is not None
        values[f"{name}.value"] = measurement.value if measurement else None
        values[f"{name}.stale"] = measurement.stale if measurement else None
    egfr_band = certain_band(facts.egfr.value, ruleset.facts.labs["egfr"].bands) if facts.egfr else None
    values["egfr.band"] = egfr_band.id if egfr_band else None
    # Only a value certainly above the limit is high: `<11` is not, `>12` is.
    calcium_lab = ruleset.facts.labs["calcium"]
    values["calcium.high"] = calcium_high(facts.calcium, calcium_lab) is True
    values["calcium.kind"] = facts.calcium.kind if facts.calcium else None
    values["calcium.grade"] = calcium_grade(facts.calcium, calcium_lab)
    for category in ruleset.catalog.by_category.values():
        if category.fact is not None:
            values[category.fact] = bool(facts.meds(category.id))
    values["pregnant"] = bool(facts.pregnancy)
    for condition in ruleset.facts.condition_facts:
        values[f"condition.{condition}"] = bool(facts.conditions.get(condition))
    # Whole months at "today"; None (and band "unknown") without a usable birthDate.
    values["age.months"] = facts.age.months
    values["age.band"] = facts.age.band
    values["meds.unknown"] = bool(facts.unknown_medications)
    daily = _current_daily(_current_d(facts))
    values["vitamin_d.current_daily"] = Interval.exact(daily) if daily is not None else None
    values["data.issues"] = bool(facts.issues or facts.missing or facts.copies or facts.unknown_medications)
    values["data.incomplete"] = bool(facts.incomplete)
    for service in ruleset.services.values():
        for spec in service.prefetch.values():
            if spec.unknown is not None:
                values[spec.unknown] = spec.unknown in facts.unknown
    return values


def _current_d(facts: Facts) -> list[MedicationFact]:
    """Current vitamin D products, one per product and dose: the same product at the same dose on two records
    (a request, and the statement that records taking it) is one intake, not two."""
    return list({(m.product, m.dose, m.daily): m for m in facts.meds("vitamin-d")}.values())


def _current_daily(products: list[MedicationFact]) -> float | None:
    """IU/day from current vitamin D products: 0 without any, None when a dose cannot be read."""
    doses = [m.daily for m in products]
    return None if None in doses else sum(d for d in doses if d is not None)


def _current_d_fields(c: FieldContext) -> SimpleNamespace:
    products = _current_d(c.facts)
    if not products:
        return SimpleNamespace(names="none", daily="none")
    names = ", ".join(sorted({m.product for m in products}))
    # Each product's own lead ("5,000 IU/day", "50,000 IU/week") or why its dose is unknown.
    leads = sorted(m.dose.split(":", 1)[0] if m.daily is not None else m.dose for m in products)
    total = _current_daily(products)
    if len(products) == 1:
        daily = leads[0]
    elif total is None:
        daily = "unknown (" + "; ".join(leads) + ")"
    else:
        daily = f"{format_number(total)} IU/day in all ({' + '.join(leads)})"
    return SimpleNamespace(names=names, daily=daily)


def _names(facts: Facts, category: str, texts: Texts) -> str:
    names = sorted({m.name for m in facts.meds(category)})
    return ", ".join(names) if names else texts.none


def _evidence(facts: Facts, texts: Texts, *concepts: str) -> str:
    items = [e for c in concepts for e in facts.conditions.get(c, ())]
    return "; ".join(sorted({f"{e.text} ({e.source})" for e in items})) or texts.none


def _measurement_fields(m: Measurement | None, texts: Texts) -> SimpleNamespace:
    if m is None:
        return SimpleNamespace(
            shown=texts.not_on_record, date=texts.no_date, stale="", notes="", age="", status=""
        )
    stale = texts.stale.format(days=m.age_days) if m.stale else ""
    notes = f" ({'; '.join(m.notes)})" if m.notes else ""
    return SimpleNamespace(
        shown=m.shown, date=m.when.isoformat(), stale=stale, notes=notes, age=str(m.age_days), status=m.status
    )


@dataclass(frozen=True)
class FieldContext:
    ruleset: RuleSet
    facts: Facts
    profile_name: str
    values: Mapping[str, FactValue]


def _profile_fields(c: FieldContext) -> SimpleNamespace:
    return SimpleNamespace(name=c.profile_name, title=c.ruleset.profiles[c.profile_name].title)


def _with_note(fields: SimpleNamespace, m: Measurement | None, note: str) -> SimpleNamespace:
    if m is not None and note:
        fields.notes = f" ({'; '.join((*m.notes, note))})"
    return fields


def _vitd_fields(c: FieldContext) -> SimpleNamespace:
    m = c.facts.vitd
    if m is None:
        vitd = _measurement_fields(m, c.ruleset.texts)
        vitd.band = "no band (no result)"
        return vitd
    bands = c.ruleset.profiles[c.profile_name].bands
    vitd = _with_note(_measurement_fields(m, c.ruleset.texts), m, _range_note(m.value, bands))
    vitd.band = _bands_label(m.value, bands)
    return vitd


def _egfr_fields(c: FieldContext) -> SimpleNamespace:
    m = c.facts.egfr
    bands = c.ruleset.facts.labs["egfr"].bands
    if m is None or len(possible_bands(m.value, bands)) < 2:
        return _measurement_fields(m, c.ruleset.texts)
    return _with_note(_measurement_fields(m, c.ruleset.texts), m, f"could be {_bands_label(m.value, bands)}")


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
    calcium.limit = describe_limit(m, lab, texts.lab_limit, texts.default_limit)
    grade = c.values.get("calcium.grade")
    labels = {g.id: g.label for g in lab.grades}
    if grade in labels:
        calcium.grade = f" Severity: {labels[str(grade)]}, Minisola 2015."
    elif grade == "ungraded":
        calcium.grade = f" Severity: not graded for {m.kind} calcium."
    return calcium


def _evidence_fields(c: FieldContext) -> SimpleNamespace:
    facts, texts = c.facts, c.ruleset.texts
    groups = {name: _evidence(facts, texts, *concepts) for name, concepts in c.ruleset.facts.evidence.items()}
    pregnancy = "; ".join(sorted({f"{e.text} ({e.source})" for e in facts.pregnancy})) or texts.none
    return SimpleNamespace(**groups, pregnancy=pregnancy)


def _data_fields(c: FieldContext) -> SimpleNamespace:
    facts = c.facts
    problems = list(facts.missing) + list(facts.issues)
    issues = "; ".join(problems) if problems else c.ruleset.texts.none
    paragraphs = [f"Not used: {issues}."] if problems else []
    if facts.copies:
        paragraphs.append(
            f"Two different copies of the same record were sent ({', '.join(facts.copies)}): "
            "cautions from either are kept."
        )
    if facts.unknown_medications:
        unknown = "; ".join(
            f"{m.name or 'a medication without a name'} ({m.source}: {m.reason})"
            for m in facts.unknown_medications
        )
        paragraphs.append(
            f"Medications of unknown kind: {unknown}. Vitamin K2 is not suggested while one is on record: "
            "a vitamin K antagonist cannot be ruled out."
        )
    return SimpleNamespace(issues=issues, text="\n\n".join(paragraphs))


# Each namespace of the template fields, in the order `template_fields` lists them.
FIELD_MAKERS: dict[str, Callable[[FieldContext], SimpleNamespace]] = {
    "profile": _profile_fields,
    "vitd": _vitd_fields,
    "egfr": _egfr_fields,
    "calcium": _calcium_fields,
    "vka": lambda c: SimpleNamespace(
        names=_names(c.facts, "vka", c.ruleset.texts),
        sources=", ".join(sorted({m.source for m in c.facts.meds("vka")})),
    ),
    "k2": lambda c: SimpleNamespace(names=_names(c.facts, "vitamin-k2", c.ruleset.texts)),
    "doac": lambda c: SimpleNamespace(names=_names(c.facts, "doac", c.ruleset.texts)),
    "current_d": _current_d_fields,
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


# ---------------------------------------------------------------- conditions


_NUMBER_TESTS: dict[str, Callable[[float, float], bool]] = {
    "lt": float.__lt__,
    "le": float.__le__,
    "gt": float.__gt__,
    "ge": float.__ge__,
}


def _operator(test: FactTest) -> str:
    """The one operator a validated FactTest has (`in_` for `in`)."""
    # The attribute, not the `model_fields_set` property: a third less time, for every fact test of a call.
    for name in test.__pydantic_fields_set__:
        if name != "fact":
            return name
    raise ValueError("a fact test without an operator")


def _test(test: FactTest, value: FactValue) -> bool | None:
    op = _operator(test)
    if op == "present":
        return (value is not None and value is not False) == test.present
    if value is None:
        return False
    if isinstance(value, Interval):
        if op in _NUMBER_TESTS:
            result: bool | None = getattr(value, op)(getattr(test, op))
            return result
        if op == "eq" and isinstance(test.eq, float | int):
            return value.ge(float(test.eq)) if value.le(float(test.eq)) else False
        return False
    if op == "eq":
        return value == test.eq
    if op == "ne":
        return value != test.ne
    if op == "in_":
        return isinstance(value, str) and value in (test.in_ or [])
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _NUMBER_TESTS[op](float(value), float(getattr(test, op)))
    return False


def evaluate_condition(
    condition: Condition,
    values: Mapping[str, FactValue],
    named: Mapping[str, Condition],
    trace: list[str] | None = None,
    memo: dict[str, bool | None] | None = None,
) -> bool | None:
    """Three-valued evaluation, the one path every rule and suggestion takes. Given a `trace`, each leaf
    appends why it answered as it did, so nothing short-circuits; the answer is the same either way.
    `memo` keeps the answers of named conditions for one set of values: several rules ask for one.
    Conditions are told apart by exact type: isinstance on a pydantic model costs twice as much."""
    if type(condition) is FactTest:
        value = values.get(condition.fact)
        result = _test(condition, value)
        if trace is not None:
            op = _operator(condition)
            shown = value if not isinstance(value, Interval) else _interval_text(value)
            trace.append(
                f"{condition.fact} {op.rstrip('_')} {getattr(condition, op)!r}: {shown!r} → {_tv(result)}"
            )
        return result
    if type(condition) is AllOf:
        return _combined(condition.all, False, values, named, trace, memo)  # a False decides
    if type(condition) is AnyOf:
        return _combined(condition.any, True, values, named, trace, memo)  # a True decides
    if type(condition) is NotOf:
        inner = evaluate_condition(condition.not_, values, named, trace, memo)
        return None if inner is None else not inner
    if type(condition) is Ref:
        if memo is not None and condition.ref in memo:
            result = memo[condition.ref]
        else:
            # A named condition is explained by its name and answer, not by its own leaves.
            result = evaluate_condition(named[condition.ref], values, named, None, memo)
            if memo is not None:
                memo[condition.ref] = result
        if trace is not None:
            trace.append(f"{condition.ref} → {_tv(result)}")
        return result
    raise TypeError(f"unknown condition {type(condition).__name__}")


def _combined(
    children: list[Condition],
    decisive: bool,
    values: Mapping[str, FactValue],
    named: Mapping[str, Condition],
    trace: list[str] | None,
    memo: dict[str, bool | None] | None,
) -> bool | None:
    decided = undecided = False
    for child in children:
        result = evaluate_condition(child, values, named, trace, memo)
        if result is decisive:
            if trace is None:
                return decisive
            decided = True
        elif result is None:
            undecided = True
    if decided:
        return decisive
    return None if undecided else not decisive


def _tv(value: bool | None) -> str:
    return "cannot tell" if value is None else str(value).lower()


def _interval_text(value: Interval) -> str:
    if value.is_exact:
        return format_number(value.lo, 2)
    low = "(" if value.lo_open else "["
    high = ")" if value.hi_open else "]"
    return f"{low}{format_number(value.lo, 2)}, {format_number(value.hi, 2)}{high}"


# ---------------------------------------------------------------- evaluation


def _draft_values(draft: DraftOrder, ingredient: IngredientDose) -> dict[str, FactValue]:
    return {
        "draft.concept": ingredient.concept,
        "draft.has_vitamin_d": any(i.concept == "vitamin-d" for i in draft.ingredients),
        "draft.daily": Interval.exact(ingredient.daily) if ingredient.daily is not None else None,
        "draft.weekly": Interval.exact(ingredient.weekly) if ingredient.weekly is not None else None,
        "draft.dose_known": ingredient.daily is not None,
    }


def _draft_fields(draft: DraftOrder, ingredient: IngredientDose, texts: Texts) -> SimpleNamespace:
    daily = (
        texts.daily_dose.format(amount=format_number(ingredient.daily), unit=ingredient.unit)
        if ingredient.daily is not None and ingredient.unit
        else texts.unknown_dose
    )
    return SimpleNamespace(
        name=draft.medication_text or ingredient.name,
        arithmetic=ingredient.arithmetic,
        daily=daily,
        basis=ingredient.basis,
    )


@dataclass(slots=True)
class _DraftScope:
    """One ingredient of one draft order: the fact values draft rules see, read once for every rule."""

    draft: DraftOrder
    ingredient: IngredientDose
    values: dict[str, FactValue]
    memo: dict[str, bool | None]
    fields: Mapping[str, SimpleNamespace] | None = None


def _draft_scopes(drafts: DraftReading | None, values: Mapping[str, FactValue]) -> list[_DraftScope]:
    return [
        _DraftScope(draft, ingredient, {**values, **_draft_values(draft, ingredient)}, {})
        for draft in (drafts.orders if drafts else ())
        for ingredient in draft.ingredients
    ]


def evaluate(
    ruleset: RuleSet,
    facts: Facts,
    *,
    hook: str,
    profile: str,
    drafts: DraftReading | None = None,
    trace: bool = False,
) -> Evaluation:
    """Every rule of the hook against the facts; `trace` keeps why each fired or stayed silent."""
    values = fact_values(ruleset, facts, profile)
    fields = Fields(FieldContext(ruleset, facts, profile, values))
    findings: list[Finding] = []
    traces: list[Trace] = []
    memo: dict[str, bool | None] = {}
    scopes: list[_DraftScope] | None = None
    for rule in ruleset.rules_for(hook):
        indicator = rule.indicator_for(hook)
        if rule.scope == "patient":
            reasons: list[str] | None = [] if trace else None
            fired = evaluate_condition(rule.when, values, ruleset.conditions, reasons, memo)
            if reasons is not None:
                traces.append(Trace(rule.id, fired, tuple(reasons)))
            if fired:
                findings.append(Finding(rule, indicator, fields, values))
            continue
        if scopes is None:
            scopes = _draft_scopes(drafts, values)
        for scope in scopes:
            draft, ingredient = scope.draft, scope.ingredient
            reasons = [] if trace else None
            fired = evaluate_condition(rule.when, scope.values, ruleset.conditions, reasons, scope.memo)
            if reasons is not None:
                traces.append(Trace(rule.id, fired, tuple(reasons), f"{draft.reference} {ingredient.name}"))
            if fired:
                if scope.fields is None:
                    scope.fields = ChainMap(
                        {"draft": _draft_fields(draft, ingredient, ruleset.texts)}, fields
                    )
                findings.append(Finding(rule, indicator, scope.fields, scope.values, draft, ingredient))
    return Evaluation(hook, profile, facts, values, tuple(findings), tuple(traces))


def values_snapshot(values: Mapping[str, Any]) -> dict[str, Any]:
    """Fact values as JSON-friendly data (for explain output)."""
    return {k: (_interval_text(v) if isinstance(v, Interval) else v) for k, v in sorted(values.items())}
