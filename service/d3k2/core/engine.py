"""Facts + rule set → findings (pure). Conditions use three-valued logic: a value given with a
comparator (`<40`) that straddles a threshold answers "cannot tell", and a rule fires only on True.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import methodcaller
from types import SimpleNamespace
from typing import Any

from d3k2.core.facts import Facts, Measurement, calcium_grade, calcium_high, describe_limit
from d3k2.core.orders import DraftOrder, DraftReading, IngredientDose
from d3k2.core.quantities import Banded, Interval, certain_band, format_number, possible_bands
from d3k2.core.ruleset import AllOf, AnyOf, Condition, FactTest, Indicator, NotOf, Profile, Ref, Rule, RuleSet

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
    for category, name in _MED_FACTS.items():
        values[name] = bool(facts.meds(category))
    values["pregnant"] = bool(facts.pregnancy)
    for condition in ruleset.facts.condition_facts:
        values[f"condition.{condition}"] = bool(facts.conditions.get(condition))
    # Whole months at "today"; None (and band "unknown") without a usable birthDate.
    values["age.months"] = facts.age.months
    values["age.band"] = facts.age.band
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


@dataclass(frozen=True)
class _FieldContext:
    ruleset: RuleSet
    facts: Facts
    profile_name: str
    values: Mapping[str, FactValue]


def _profile_fields(c: _FieldContext) -> SimpleNamespace:
    return SimpleNamespace(name=c.profile_name, title=c.ruleset.profiles[c.profile_name].title)


def _with_note(fields: SimpleNamespace, m: Measurement | None, note: str) -> SimpleNamespace:
    if m is not None and note:
        fields.notes = f" ({'; '.join((*m.notes, note))})"
    return fields


def _vitd_fields(c: _FieldContext) -> SimpleNamespace:
    m = c.facts.vitd
    if m is None:
        vitd = _measurement_fields(m)
        vitd.band = "no band (no result)"
        return vitd
    bands = c.ruleset.profiles[c.profile_name].bands
    vitd = _with_note(_measurement_fields(m), m, _range_note(m.value, bands))
    vitd.band = _bands_label(m.value, bands)
    return vitd


def _egfr_fields(c: _FieldContext) -> SimpleNamespace:
    m = c.facts.egfr
    bands = c.ruleset.facts.labs["egfr"].bands
    if m is None or len(possible_bands(m.value, bands)) < 2:
        return _measurement_fields(m)
    return _with_note(_measurement_fields(m), m, f"could be {_bands_label(m.value, bands)}")


def _calcium_fields(c: _FieldContext) -> SimpleNamespace:
    m = c.facts.calcium
    calcium = _measurement_fields(m)
    calcium.limit = ""
    calcium.grade = ""
    if m is None:
        return calcium
    lab = c.ruleset.facts.labs["calcium"]
    # Total, albumin-corrected and ionized calcium are different measurements: the card names which.
    calcium.shown = f"{m.kind} {m.shown}" if m.kind else m.shown
    calcium.limit = describe_limit(m, lab)
    grade = c.values.get("calcium.grade")
    labels = {g.id: g.label for g in lab.grades}
    if grade in labels:
        calcium.grade = f" Severity: {labels[str(grade)]}, Minisola 2015."
    elif grade == "ungraded":
        calcium.grade = f" Severity: not graded for {m.kind} calcium."
    return calcium


def _evidence_fields(c: _FieldContext) -> SimpleNamespace:
    facts = c.facts
    return SimpleNamespace(
        ckd=_evidence(facts, "ckd_advanced"),
        granulomatous=_evidence(facts, "sarcoidosis", "granulomatous"),
        pregnancy="; ".join(sorted({f"{e.text} ({e.source})" for e in facts.pregnancy})) or "none",
        hypercalcemia=_evidence(facts, "hypercalcemia"),
    )


def _data_fields(c: _FieldContext) -> SimpleNamespace:
    problems = list(c.facts.missing) + list(c.facts.issues)
    return SimpleNamespace(issues="; ".join(problems) if problems else "none")


# Each namespace of the template fields, in the order `template_fields` lists them.
_FIELD_MAKERS: dict[str, Callable[[_FieldContext], SimpleNamespace]] = {
    "profile": _profile_fields,
    "vitd": _vitd_fields,
    "egfr": _egfr_fields,
    "calcium": _calcium_fields,
    "vka": lambda c: SimpleNamespace(
        names=_names(c.facts, "vka"), sources=", ".join(sorted({m.source for m in c.facts.meds("vka")}))
    ),
    "k2": lambda c: SimpleNamespace(names=_names(c.facts, "vitamin-k2")),
    "doac": lambda c: SimpleNamespace(names=_names(c.facts, "doac")),
    "evidence": _evidence_fields,
    "data": _data_fields,
}


class _Fields(dict[str, SimpleNamespace]):
    """The template fields of one answer, each namespace made when a card first reads it and then kept
    (like a defaultdict): an answer renders a few cards, and most namespaces are never read. A dict, so
    that `str.format_map` reads the namespaces already made at C speed."""

    __slots__ = ("_context",)

    def __init__(self, context: _FieldContext) -> None:
        super().__init__()
        self._context = context

    def __missing__(self, key: str) -> SimpleNamespace:
        made = self[key] = _FIELD_MAKERS[key](self._context)
        return made


class _DraftFields(dict[str, SimpleNamespace]):
    """The answer's template fields and `draft`, the order a draft-scoped card is about."""

    __slots__ = ("_base",)

    def __init__(self, base: Mapping[str, SimpleNamespace], draft: SimpleNamespace) -> None:
        super().__init__(draft=draft)
        self._base = base

    def __missing__(self, key: str) -> SimpleNamespace:
        made = self[key] = self._base[key]
        return made


def template_fields(
    ruleset: RuleSet, facts: Facts, profile_name: str, values: Mapping[str, FactValue]
) -> dict[str, SimpleNamespace]:
    context = _FieldContext(ruleset, facts, profile_name, values)
    return {name: make(context) for name, make in _FIELD_MAKERS.items()}


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


# ---------------------------------------------------------------- compiled conditions

# A condition made into a function once per rule set: the same three-valued answer as
# `evaluate_condition(condition, values, named, None, memo)`, without walking the models on every call.
# `memo` keeps the answers of named conditions for one set of values.
Test = Callable[[Mapping[str, FactValue], dict[str, bool | None]], bool | None]

_OPERATORS = ("eq", "ne", "in_", "lt", "le", "gt", "ge", "present")


def _compile_fact_test(test: FactTest) -> Test:
    fact = test.fact
    ops = [op for op in _OPERATORS if op in test.model_fields_set]
    op = ops[0] if len(ops) == 1 else None
    bound = getattr(test, op) if op else None
    if op == "present":
        wanted = test.present

        def present(values: Mapping[str, FactValue], memo: dict[str, bool | None]) -> bool | None:
            value = values.get(fact)
            return (value is not None and value is not False) == wanted

        return present
    if op in _NUMBER_TESTS and isinstance(bound, float | int):
        compare, number, interval_test = _NUMBER_TESTS[op], float(bound), methodcaller(str(op), bound)

        def ordered(values: Mapping[str, FactValue], memo: dict[str, bool | None]) -> bool | None:
            value = values.get(fact)
            if value is None:
                return False
            if isinstance(value, Interval):
                result: bool | None = interval_test(value)
                return result
            if isinstance(value, int | float) and not isinstance(value, bool):
                return compare(float(value), number)
            return False

        return ordered
    if op == "eq":
        expected = test.eq
        numeric = isinstance(expected, float | int)
        point = float(expected) if isinstance(expected, float | int) else 0.0

        def equal(values: Mapping[str, FactValue], memo: dict[str, bool | None]) -> bool | None:
            value = values.get(fact)
            if value is None:
                return False
            if isinstance(value, Interval):
                return (value.ge(point) if value.le(point) else False) if numeric else False
            return value == expected

        return equal
    if op == "ne":
        unwanted = test.ne

        def unequal(values: Mapping[str, FactValue], memo: dict[str, bool | None]) -> bool | None:
            value = values.get(fact)
            return value is not None and not isinstance(value, Interval) and value != unwanted

        return unequal
    if op == "in_":
        members = frozenset(test.in_ or ())

        def one_of(values: Mapping[str, FactValue], memo: dict[str, bool | None]) -> bool | None:
            value = values.get(fact)
            return isinstance(value, str) and value in members

        return one_of

    # Anything a validated FactTest cannot hold: answered as evaluate_condition answers it.
    def other(values: Mapping[str, FactValue], memo: dict[str, bool | None]) -> bool | None:
        return _test(test, values.get(fact))

    return other


def compile_condition(condition: Condition, named: Mapping[str, Test]) -> Test:
    """`named` is looked up when the test runs, so named conditions may be compiled in any order."""
    if isinstance(condition, FactTest):
        return _compile_fact_test(condition)
    if isinstance(condition, AllOf | AnyOf):
        children = tuple(
            compile_condition(c, named)
            for c in (condition.all if isinstance(condition, AllOf) else condition.any)
        )
        decisive = isinstance(condition, AnyOf)  # any: a True decides; all: a False decides

        def combined(values: Mapping[str, FactValue], memo: dict[str, bool | None]) -> bool | None:
            undecided = False
            for child in children:
                result = child(values, memo)
                if result is decisive:
                    return decisive
                if result is None:
                    undecided = True
            return None if undecided else not decisive

        return combined
    if isinstance(condition, NotOf):
        inner = compile_condition(condition.not_, named)

        def negated(values: Mapping[str, FactValue], memo: dict[str, bool | None]) -> bool | None:
            result = inner(values, memo)
            return None if result is None else not result

        return negated
    if isinstance(condition, Ref):
        name = condition.ref

        def reference(values: Mapping[str, FactValue], memo: dict[str, bool | None]) -> bool | None:
            if name in memo:
                return memo[name]
            result = memo[name] = named[name](values, memo)
            return result

        return reference
    raise TypeError(f"unknown condition {type(condition).__name__}")


@dataclass(frozen=True)
class Program:
    """The rule set's conditions compiled, and its rules by hook (`RuleSet.derived(program)`)."""

    rules_by_hook: Mapping[str, tuple[tuple[Rule, Test, Indicator], ...]]
    # id() of every rule's and suggestion's `when` → (that condition, its test); the condition is kept
    # so that an id is never taken for another object's.
    tests: Mapping[int, tuple[Condition, Test]]
    named: Mapping[str, Test]

    def test(self, condition: Condition) -> Test:
        """The compiled test of a condition of this rule set (any other condition is compiled now)."""
        found = self.tests.get(id(condition))
        if found is not None and found[0] is condition:
            return found[1]
        return compile_condition(condition, self.named)


def program(ruleset: RuleSet) -> Program:
    named: dict[str, Test] = {}
    for name, condition in ruleset.conditions.items():
        named[name] = compile_condition(condition, named)
    tests: dict[int, tuple[Condition, Test]] = {}
    for rule in ruleset.rules:
        for condition in (rule.when, *(s.when for s in rule.suggestions if s.when is not None)):
            tests[id(condition)] = (condition, compile_condition(condition, named))
    hooks = dict.fromkeys(hook for rule in ruleset.rules for hook in rule.hooks)
    rules_by_hook: dict[str, tuple[tuple[Rule, Test, Indicator], ...]] = {
        hook: tuple(
            (rule, tests[id(rule.when)][1], rule.indicator_for(hook)) for rule in ruleset.rules_for(hook)
        )
        for hook in hooks
    }
    return Program(rules_by_hook, tests, named)


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
    compiled = ruleset.derived(program)
    values = fact_values(ruleset, facts, profile)
    fields = _Fields(_FieldContext(ruleset, facts, profile, values))
    findings: list[Finding] = []
    traces: list[Trace] = []
    memo: dict[str, bool | None] = {}
    scopes: list[_DraftScope] | None = None
    for rule, test, indicator in compiled.rules_by_hook.get(hook, ()):
        if rule.scope == "patient":
            if trace:
                reasons: list[str] = []
                fired = evaluate_condition(rule.when, values, ruleset.conditions, reasons, memo)
                traces.append(Trace(rule.id, fired, tuple(reasons)))
            else:
                fired = test(values, memo)
            if fired:
                findings.append(Finding(rule, indicator, fields, values))
            continue
        if scopes is None:
            scopes = _draft_scopes(drafts, values)
        for scope in scopes:
            draft, ingredient = scope.draft, scope.ingredient
            if trace:
                reasons = []
                fired = evaluate_condition(rule.when, scope.values, ruleset.conditions, reasons)
                traces.append(Trace(rule.id, fired, tuple(reasons), f"{draft.reference} {ingredient.name}"))
            else:
                fired = test(scope.values, scope.memo)
            if fired:
                if scope.fields is None:
                    scope.fields = _DraftFields(fields, _draft_fields(draft, ingredient))
                findings.append(Finding(rule, indicator, scope.fields, scope.values, draft, ingredient))
    return Evaluation(hook, profile, facts, values, tuple(findings), tuple(traces))


def values_snapshot(values: Mapping[str, Any]) -> dict[str, Any]:
    """Fact values as JSON-friendly data (for explain output)."""
    return {k: (_interval_text(v) if isinstance(v, Interval) else v) for k, v in sorted(values.items())}
