"""Facts + rule set → findings (pure). Conditions use three-valued logic: a value given with a
comparator (`<40`) that straddles a threshold answers "cannot tell", and a rule fires only on True.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from d3k2.facts import Facts, Measurement, calcium_high, describe_limit
from d3k2.orders import DraftOrder, DraftReading, IngredientDose
from d3k2.quantities import Interval, format_number
from d3k2.ruleset import AllOf, AnyOf, Condition, FactTest, NotOf, Profile, Ref, Rule, RuleSet

FactValue = bool | str | float | Interval | None

# Medication categories (cards/medications.toml) → the fact that says one is current.
_MED_FACTS = {
    "vka": "vka.active",
    "doac": "doac.active",
    "vitamin-k2": "k2.active",
    "vitamin-d": "vitamin_d.active",
    "vitamin-d-analog": "vitamin_d_analog.active",
}


@dataclass(frozen=True)
class Finding:
    rule: Rule
    indicator: str
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
    """The band that holds every possible value, or None when a comparator straddles two bands."""
    for band in profile.bands:
        if value.within(band.lower, band.upper, band.lower_open, band.upper_open):
            return band.id
    return None


def _band_label(band: str | None, profile: Profile) -> str:
    for b in profile.bands:
        if b.id == band:
            return b.label
    return "band uncertain (value given as a range)"


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
    values["calcium.high"] = (
        calcium_high(facts.calcium, ruleset.facts.labs["calcium"]) if facts.calcium else False
    )
    for category, name in _MED_FACTS.items():
        values[name] = bool(facts.meds(category))
    values["pregnant"] = bool(facts.pregnancy)
    for condition in ruleset.facts.condition_facts:
        values[f"condition.{condition}"] = bool(facts.conditions.get(condition))
    values["data.issues"] = bool(facts.issues or facts.missing)
    values["data.incomplete"] = bool(facts.incomplete)
    return values


def _names(facts: Facts, category: str) -> str:
    names = sorted({m.name for m in facts.meds(category)})
    return ", ".join(names) if names else "none"


def _evidence(facts: Facts, *concepts: str) -> str:
    items = [e for c in concepts for e in facts.conditions.get(c, ())]
    return "; ".join(sorted({f"{e.text} ({e.source})" for e in items})) or "none"


def _measurement_fields(m: Measurement | None) -> SimpleNamespace:
    if m is None:
        return SimpleNamespace(shown="not on record", date="no date", stale="", notes="", age="", status="")
    stale = f" (stale: {m.age_days} days old)" if m.stale else ""
    notes = f" ({'; '.join(m.notes)})" if m.notes else ""
    return SimpleNamespace(
        shown=m.shown, date=m.when.isoformat(), stale=stale, notes=notes, age=str(m.age_days), status=m.status
    )


def template_fields(
    ruleset: RuleSet, facts: Facts, profile_name: str, values: Mapping[str, FactValue]
) -> dict[str, SimpleNamespace]:
    profile = ruleset.profiles[profile_name]
    vitd = _measurement_fields(facts.vitd)
    band = values.get("vitd.band")
    vitd.band = _band_label(band if isinstance(band, str) else None, profile)
    calcium = _measurement_fields(facts.calcium)
    calcium.limit = describe_limit(facts.calcium, ruleset.facts.labs["calcium"]) if facts.calcium else ""
    pregnancy = "; ".join(sorted({f"{e.text} ({e.source})" for e in facts.pregnancy})) or "none"
    problems = list(facts.missing) + list(facts.issues)
    return {
        "profile": SimpleNamespace(name=profile_name, title=profile.title),
        "vitd": vitd,
        "egfr": _measurement_fields(facts.egfr),
        "calcium": calcium,
        "vka": SimpleNamespace(
            names=_names(facts, "vka"), sources=", ".join(sorted({m.source for m in facts.meds("vka")}))
        ),
        "k2": SimpleNamespace(names=_names(facts, "vitamin-k2")),
        "doac": SimpleNamespace(names=_names(facts, "doac")),
        "evidence": SimpleNamespace(
            ckd=_evidence(facts, "ckd_advanced"),
            granulomatous=_evidence(facts, "sarcoidosis", "granulomatous"),
            pregnancy=pregnancy,
            hypercalcemia=_evidence(facts, "hypercalcemia"),
        ),
        "data": SimpleNamespace(issues="; ".join(problems) if problems else "none"),
    }


# ---------------------------------------------------------------- conditions


_NUMBER_TESTS: dict[str, Callable[[float, float], bool]] = {
    "lt": float.__lt__,
    "le": float.__le__,
    "gt": float.__gt__,
    "ge": float.__ge__,
}


def _test(test: FactTest, value: FactValue) -> bool | None:
    if "present" in test.model_fields_set:
        return (value is not None and value is not False) == test.present
    if value is None:
        return False
    if isinstance(value, Interval):
        for op in ("lt", "le", "gt", "ge"):
            if op in test.model_fields_set:
                bound = getattr(test, op)
                result: bool | None = getattr(value, op)(bound)
                return result
        if "eq" in test.model_fields_set and isinstance(test.eq, float | int):
            return value.ge(float(test.eq)) if value.le(float(test.eq)) else False
        return False
    if "eq" in test.model_fields_set:
        return value == test.eq
    if "ne" in test.model_fields_set:
        return value != test.ne
    if "in_" in test.model_fields_set:
        return isinstance(value, str) and value in (test.in_ or [])
    if isinstance(value, int | float) and not isinstance(value, bool):
        # present, eq, ne and in are answered above, and a FactTest has exactly one operator.
        (op,) = test.model_fields_set & _NUMBER_TESTS.keys()
        return _NUMBER_TESTS[op](float(value), float(getattr(test, op)))
    return False


def evaluate_condition(
    condition: Condition,
    values: Mapping[str, FactValue],
    named: Mapping[str, Condition],
    reasons: list[str] | None,
    memo: dict[str, bool | None] | None = None,
) -> bool | None:
    """Three-valued evaluation. With `reasons` every leaf is evaluated and explained (for explain and
    the preview); without, evaluation short-circuits and named conditions are computed once (`memo`)."""
    if isinstance(condition, FactTest):
        value = values.get(condition.fact)
        result = _test(condition, value)
        if reasons is not None:
            op = next(iter(sorted(condition.model_fields_set - {"fact"})))
            expected = getattr(condition, op)
            shown = value if not isinstance(value, Interval) else _interval_text(value)
            reasons.append(f"{condition.fact} {op.rstrip('_')} {expected!r}: {shown!r} → {_tv(result)}")
        return result
    if isinstance(condition, AllOf | AnyOf):
        children = condition.all if isinstance(condition, AllOf) else condition.any
        decisive = isinstance(condition, AnyOf)  # any: a True decides; all: a False decides
        results: list[bool | None] = []
        for child in children:
            result = evaluate_condition(child, values, named, reasons, memo)
            if result is decisive and reasons is None:
                return decisive
            results.append(result)
        if decisive in results:
            return decisive
        return None if None in results else not decisive
    if isinstance(condition, NotOf):
        inner = evaluate_condition(condition.not_, values, named, reasons, memo)
        return None if inner is None else not inner
    if isinstance(condition, Ref):
        if reasons is None:
            if memo is not None and condition.ref in memo:
                return memo[condition.ref]
            result = evaluate_condition(named[condition.ref], values, named, None, memo)
            if memo is not None:
                memo[condition.ref] = result
            return result
        result = evaluate_condition(named[condition.ref], values, named, [], memo)
        reasons.append(f"{condition.ref} → {_tv(result)}")
        return result
    raise TypeError(f"unknown condition {type(condition).__name__}")


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


def _draft_fields(draft: DraftOrder, ingredient: IngredientDose) -> SimpleNamespace:
    daily = (
        f"{format_number(ingredient.daily)} {ingredient.unit}/day"
        if ingredient.daily is not None and ingredient.unit
        else "unknown dose"
    )
    return SimpleNamespace(
        name=draft.medication_text or ingredient.name,
        arithmetic=ingredient.arithmetic,
        daily=daily,
        basis=ingredient.basis,
    )


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
    fields = template_fields(ruleset, facts, profile, values)
    findings: list[Finding] = []
    traces: list[Trace] = []
    memo: dict[str, bool | None] = {}
    for rule in ruleset.rules_for(hook):
        if rule.scope == "patient":
            reasons: list[str] | None = [] if trace else None
            fired = evaluate_condition(rule.when, values, ruleset.conditions, reasons, memo)
            if reasons is not None:
                traces.append(Trace(rule.id, fired, tuple(reasons)))
            if fired:
                findings.append(Finding(rule, rule.indicator_for(hook), fields, values))
            continue
        for draft in drafts.orders if drafts else ():
            for ingredient in draft.ingredients:
                scoped = {**values, **_draft_values(draft, ingredient)}
                reasons = [] if trace else None
                fired = evaluate_condition(rule.when, scoped, ruleset.conditions, reasons)
                if reasons is not None:
                    traces.append(
                        Trace(rule.id, fired, tuple(reasons), f"{draft.reference} {ingredient.name}")
                    )
                if fired:
                    scoped_fields = {**fields, "draft": _draft_fields(draft, ingredient)}
                    findings.append(
                        Finding(rule, rule.indicator_for(hook), scoped_fields, scoped, draft, ingredient)
                    )
    return Evaluation(hook, profile, facts, values, tuple(findings), tuple(traces))


def values_snapshot(values: Mapping[str, Any]) -> dict[str, Any]:
    """Fact values as JSON-friendly data (for explain output)."""
    return {k: (_interval_text(v) if isinstance(v, Interval) else v) for k, v in sorted(values.items())}
