"""Facts + rule set → findings (pure). Conditions use three-valued logic: a value given with a
comparator (`<40`) that straddles a threshold answers "cannot tell", and a rule fires only on True.
"""

from __future__ import annotations

import math
from collections import ChainMap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from d3k2.core.calcium import calcium_grade, calcium_high
from d3k2.core.dosage import IngredientDose
from d3k2.core.drafts import DraftOrder, DraftReading
from d3k2.core.facts import Facts
from d3k2.core.fields import FactValue, FieldContext, Fields, current_d, current_daily
from d3k2.core.orderset import OrderSet, draft_fields, order_set, set_values
from d3k2.core.quantities import Interval, certain_band, format_number, possible_bands
from d3k2.core.ruleset import AllOf, AnyOf, Condition, FactTest, NotOf, Profile, Ref, Rule, RuleSet
from d3k2.core.vitamers import d2_values


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
    # Minus infinity is always "reached": `>25` would get the lowest band, "deficient", and its dosing card,
    # though it may be in the target band or above. Only a value without a lower bound (`<35`), or in one
    # band, gets the lowest; any other straddling it gets none (the band-uncertain card names them).
    if (
        band is not None
        and math.isinf(band.lower)
        and not math.isinf(value.lo)
        and len(possible_bands(value, profile.bands)) > 1
    ):
        return None
    return band.id if band else None


def fact_values(ruleset: RuleSet, facts: Facts, profile_name: str) -> dict[str, FactValue]:
    profile = ruleset.profiles[profile_name]
    values: dict[str, FactValue] = {}
    vitd = facts.vitd
    values["vitd.present"] = vitd is not None
    values["vitd.value"] = vitd.value if vitd else None
    values["vitd.band"] = band_of(vitd.value, profile) if vitd else None
    # `>25`: no band it certainly reaches, so no dosing band either (`certain_band`).
    values["vitd.band_certain"] = values["vitd.band"] is not None
    values["vitd.stale"] = vitd.stale if vitd else None
    values["vitd.usable"] = vitd is not None and not vitd.stale
    for name, measurement in (("egfr", facts.egfr), ("calcium", facts.calcium)):
        values[f"{name}.present"] = measurement is not None
        values[f"{name}.value"] = measurement.value if measurement else None
        values[f"{name}.stale"] = measurement.stale if measurement else None
    # KDIGO categories, ascending: `<30` may be G4 or G5, so it has no category (never "G5"), and its lowest
    # possible one is G5: the kidney caution shows for every value that may be below 30.
    egfr = possible_bands(facts.egfr.value, ruleset.facts.labs["egfr"].bands) if facts.egfr else []
    values["egfr.band"] = egfr[0].id if len(egfr) == 1 else None
    values["egfr.lowest_band"] = egfr[0].id if egfr else None
    values["egfr.highest_band"] = egfr[-1].id if egfr else None  # `<30`: G4, so certainly below 30
    # Only a value certainly above the limit is high: `<11` is not, `>12` is.
    calcium_lab = ruleset.facts.labs["calcium"]
    values["calcium.high"] = calcium_high(facts.calcium, calcium_lab) is True
    values["calcium.kind"] = facts.calcium.kind if facts.calcium else None
    values["calcium.grade"] = calcium_grade(facts.calcium, calcium_lab)
    on_record = {m.category for m in facts.medications}
    for category in ruleset.catalog.by_category.values():
        if category.fact is not None:
            values[category.fact] = category.id in on_record
    values["pregnant"] = bool(facts.pregnancy)
    values["lactating"] = bool(facts.lactation)
    for condition in ruleset.facts.condition_facts:
        values[f"condition.{condition}"] = bool(facts.conditions.get(condition))
    # Whole months at "today"; None (and band "unknown") without a usable birthDate.
    values["age.months"] = facts.age.months
    values["age.band"] = facts.age.band
    values["meds.unknown"] = bool(facts.unknown_medications)
    # Some practice differs by profile: K2 pairing and testing without a reason are the seed article's.
    values["profile"] = profile_name
    products = current_d(facts)
    daily = current_daily(products)
    values["vitamin_d.current_daily"] = Interval.exact(daily) if daily is not None else None
    # IU/week when every current vitamin D product is taken once a week (to 0.01 IU, so that 50,000 IU once
    # weekly is 50,000): Holick 2011's weekly course is judged as a course (CLINICAL.md 3a), as at order time.
    weekly = bool(products) and all(m.weekly for m in products)
    values["vitamin_d.current_weekly"] = (
        Interval.exact(round(daily * 7, 2)) if weekly and daily is not None else None
    )
    # ... and for how many days the longest of them has been taken, when every record of them says when it
    # started (one intake on two records: the earlier start): the course has a length (6 to 8 weeks), and one
    # that runs on is no longer a course.
    records = facts.meds("vitamin-d")
    starts = [m.since for m in records if m.since is not None]
    values["vitamin_d.current_weekly_days"] = (
        Interval.exact(float((facts.today - min(starts)).days))
        if weekly and len(starts) == len(records)
        else None
    )
    values.update(d2_values(facts))
    values["data.issues"] = bool(facts.issues or facts.missing or facts.copies or facts.unknown_medications)
    values["data.incomplete"] = bool(facts.incomplete)
    for unknown in ruleset.unknown_facts:
        values[unknown] = unknown in facts.unknown
    return values


# ---------------------------------------------------------------- conditions


_NUMBER_TESTS: dict[str, Callable[[float, float], bool]] = {
    "lt": float.__lt__,
    "le": float.__le__,
    "gt": float.__gt__,
    "ge": float.__ge__,
}


def _test(test: FactTest, value: FactValue) -> bool | None:
    op = test.operator
    if op == "present":
        return (value is not None and value is not False) == test.present
    if value is None:
        return False
    if isinstance(value, Interval):
        if op in _NUMBER_TESTS:
            result: bool | None = getattr(value, op)(test.operand)
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
        return _NUMBER_TESTS[op](float(value), float(test.operand))
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
            shown = value if not isinstance(value, Interval) else _interval_text(value)
            trace.append(
                f"{condition.fact} {condition.operator.rstrip('_')} {condition.operand!r}: {shown!r}"
                f" → {_tv(result)}"
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
    """As the rules compared it: converted values are not rounded (29.995992 is below 30, not "30")."""
    if value.is_exact:
        return format_number(value.lo, _DIGITS)
    low = "(" if value.lo_open else "["
    high = ")" if value.hi_open else "]"
    return f"{low}{format_number(value.lo, _DIGITS)}, {format_number(value.hi, _DIGITS)}{high}"


_DIGITS = 6


# ---------------------------------------------------------------- evaluation


def _draft_values(draft: DraftOrder, ingredient: IngredientDose) -> dict[str, FactValue]:
    return {
        "draft.concept": ingredient.concept,
        "draft.ingredient": ingredient.name,
        "draft.has_vitamin_d": any(i.concept == "vitamin-d" for i in draft.ingredients),
        "draft.daily": Interval.exact(ingredient.daily) if ingredient.daily is not None else None,
        "draft.weekly": Interval.exact(ingredient.weekly) if ingredient.weekly is not None else None,
        "draft.dose_known": ingredient.daily is not None,
        "draft.strength": Interval.exact(ingredient.strength) if ingredient.strength is not None else None,
    }


@dataclass(slots=True)
class _DraftScope:
    """One ingredient of one draft order: the fact values draft rules see, read once for every rule."""

    draft: DraftOrder
    ingredient: IngredientDose
    values: dict[str, FactValue]
    memo: dict[str, bool | None]
    fields: Mapping[str, SimpleNamespace] | None = None


def _draft_scopes(
    drafts: DraftReading | None, values: Mapping[str, FactValue], the_set: OrderSet
) -> list[_DraftScope]:
    return [
        _DraftScope(
            draft,
            ingredient,
            {**values, **_draft_values(draft, ingredient), **set_values(the_set, draft, ingredient)},
            {},
        )
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
        if rule.scope == "patient":
            reasons: list[str] | None = [] if trace else None
            fired = evaluate_condition(rule.when, values, ruleset.conditions, reasons, memo)
            if reasons is not None:
                traces.append(Trace(rule.id, fired, tuple(reasons)))
            if fired:
                indicator = _indicator(rule, values, ruleset.conditions, memo)
                findings.append(Finding(rule, indicator, fields, values))
            continue
        if scopes is None:
            the_set = order_set(
                drafts.orders if drafts else (), drafts.unselected if drafts else (), current_d(facts)
            )
            scopes = _draft_scopes(drafts, values, the_set)
        for scope in scopes:
            draft, ingredient = scope.draft, scope.ingredient
            reasons = [] if trace else None
            fired = evaluate_condition(rule.when, scope.values, ruleset.conditions, reasons, scope.memo)
            if reasons is not None:
                traces.append(Trace(rule.id, fired, tuple(reasons), f"{draft.reference} {ingredient.name}"))
            if fired:
                if scope.fields is None:
                    scope.fields = ChainMap(
                        {"draft": draft_fields(draft, ingredient, ruleset.texts, the_set)}, fields
                    )
                indicator = _indicator(rule, scope.values, ruleset.conditions, scope.memo)
                findings.append(Finding(rule, indicator, scope.fields, scope.values, draft, ingredient))
    return Evaluation(hook, profile, facts, values, tuple(findings), tuple(traces))


def _indicator(
    rule: Rule,
    values: Mapping[str, FactValue],
    named: Mapping[str, Condition],
    memo: dict[str, bool | None],
) -> str:
    for case in rule.indicator_when:
        if evaluate_condition(case.when, values, named, None, memo) is True:
            return case.indicator
    return rule.indicator


def values_snapshot(values: Mapping[str, Any]) -> dict[str, Any]:
    """Fact values as JSON-friendly data (for explain output)."""
    return {k: (_interval_text(v) if isinstance(v, Interval) else v) for k, v in sorted(values.items())}
