"""The pure core's speed-ups answer exactly what the plain code answers (issue 11).

- compiled conditions agree with `evaluate_condition` on any condition and any fact values;
- template fields made on first use equal the ones `template_fields` makes all at once;
- medication classification and draft doses remembered per rule set: equal results, bounded, not shared;
- fixed card parts and suggested resources made once per rule set; card ids are still uuid5;
- prefetch reading in one pass keeps the four states of a key.
"""

from __future__ import annotations

import copy
import dataclasses
import uuid
from collections.abc import Iterator, Mapping
from datetime import date, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builders import TODAY, fixtures, ruleset
from d3k2.core.cards import _CardParts, build_cards, card_uuid, medication_request, service_request
from d3k2.core.engine import (
    _FIELD_MAKERS,
    FactValue,
    Test,
    _DraftFields,
    _FieldContext,
    _Fields,
    compile_condition,
    evaluate,
    evaluate_condition,
    fact_values,
    program,
    template_fields,
)
from d3k2.core.facts import Facts
from d3k2.core.hooks import parse_request
from d3k2.core.orders import MedicationReader, classify_medication, read_draft_orders
from d3k2.core.quantities import Interval
from d3k2.core.ruleset import AllOf, AnyOf, Condition, FactTest, NotOf, Ref, RuleSet
from d3k2.core.terminology import RXNORM
from d3k2.fhir.prefetch import _unresolved_medications, _usable, resolve, resources_of
from d3k2.service import call_service, classifier, drafts_of, facts_for, prepare

PROPERTY = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# ---------------------------------------------------------------- compiled conditions

FACTS = ("a", "b", "c")
NAMES = ("n1", "n2")
NUMBERS = st.sampled_from([-1.0, 0.0, 1.0, 2.5, 30.0, 40])
VALUES: st.SearchStrategy[FactValue] = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(["high", "target", "toxicity", ""]),
    NUMBERS,
    st.integers(-2, 50),
    st.builds(
        lambda lo, width, lo_open, hi_open: Interval(lo, lo + width, lo_open, hi_open),
        NUMBERS,
        st.sampled_from([0.0, 1.0, 10.0, float("inf")]),
        st.booleans(),
        st.booleans(),
    ),
    st.builds(Interval.from_comparator, NUMBERS, st.sampled_from(["<", "<=", ">", ">=", "="])),
)
OPERANDS: dict[str, st.SearchStrategy[Any]] = {
    "eq": st.one_of(st.booleans(), NUMBERS, st.sampled_from(["high", "target"]), st.none()),
    "ne": st.one_of(st.booleans(), NUMBERS, st.sampled_from(["high", "target"])),
    "in": st.lists(st.sampled_from(["high", "target", "toxicity"]), max_size=3),
    "lt": NUMBERS,
    "le": NUMBERS,
    "gt": NUMBERS,
    "ge": NUMBERS,
    "present": st.booleans(),
}
FACT_TESTS = st.sampled_from(sorted(OPERANDS)).flatmap(
    lambda op: st.builds(
        lambda fact, operand: FactTest.model_validate({"fact": fact, op: operand}),
        st.sampled_from(FACTS),
        OPERANDS[op],
    )
)
CONDITIONS: st.SearchStrategy[Condition] = st.recursive(
    st.one_of(FACT_TESTS, st.builds(Ref, ref=st.sampled_from(NAMES))),
    lambda inner: st.one_of(
        st.builds(lambda c: AllOf(all=c), st.lists(inner, max_size=4)),
        st.builds(lambda c: AnyOf(any=c), st.lists(inner, max_size=4)),
        st.builds(lambda c: NotOf.model_validate({"not": c}), inner),
    ),
    max_leaves=8,
)
# Named conditions refer to facts only, so that they never refer to themselves.
NAMED = st.fixed_dictionaries(
    {
        name: st.recursive(
            FACT_TESTS, lambda inner: st.builds(lambda c: AnyOf(any=c), st.lists(inner, max_size=3))
        )
        for name in NAMES
    }
)


def _compiled(named: Mapping[str, Condition]) -> dict[str, Test]:
    tests: dict[str, Test] = {}
    for name, condition in named.items():
        tests[name] = compile_condition(condition, tests)
    return tests


@PROPERTY
@given(CONDITIONS, NAMED, st.fixed_dictionaries(dict.fromkeys(FACTS, VALUES)))
def test_a_compiled_condition_answers_as_evaluate_condition(
    condition: Condition, named: dict[str, Condition], values: dict[str, FactValue]
) -> None:
    expected = evaluate_condition(condition, values, named, None, {})
    assert evaluate_condition(condition, values, named, []) is expected
    assert evaluate_condition(condition, values, named, None) is expected  # without a memo
    tests = _compiled(named)
    memo: dict[str, bool | None] = {}
    assert compile_condition(condition, tests)(values, memo) is expected
    assert compile_condition(condition, tests)(values, memo) is expected  # again, from the memo


def test_a_named_condition_is_computed_once_per_memo() -> None:
    calls: list[str] = []

    def counted(values: Mapping[str, FactValue], memo: dict[str, bool | None]) -> bool | None:
        calls.append("n")
        return True

    test = compile_condition(AllOf(all=[Ref(ref="n"), Ref(ref="n")]), {"n": counted})
    memo: dict[str, bool | None] = {}
    assert test({}, memo) is True
    assert test({}, memo) is True
    assert calls == ["n"] and memo == {"n": True}


def test_fact_tests_a_validated_model_cannot_hold_are_answered_as_evaluate_condition() -> None:
    two = FactTest.model_construct(fact="a", eq=1.0, lt=2.0, _fields_set={"fact", "eq", "lt"})
    no_bound = FactTest.model_construct(fact="a", lt=None, _fields_set={"fact", "lt"})
    for test in (two, no_bound):
        for value in (None, "x", False):
            assert compile_condition(test, {})({"a": value}, {}) is evaluate_condition(
                test, {"a": value}, {}, None
            )


def test_an_unknown_condition_type_cannot_be_compiled() -> None:
    with pytest.raises(TypeError, match="unknown condition str"):
        compile_condition("nope", {})  # type: ignore[arg-type]


def test_the_program_is_made_once_per_rule_set_and_covers_every_hook() -> None:
    rs = ruleset()
    made = rs.derived(program)
    assert rs.derived(program) is made
    assert set(made.rules_by_hook) == {hook for rule in rs.rules for hook in rule.hooks}
    for hook, entries in made.rules_by_hook.items():
        assert [rule for rule, _test, _indicator in entries] == list(rs.rules_for(hook))
        assert [indicator for rule, _test, indicator in entries] == [
            r.indicator_for(hook) for r in rs.rules_for(hook)
        ]


def test_a_condition_from_elsewhere_is_compiled_when_asked_for() -> None:
    made = ruleset().derived(program)
    rule = ruleset().rules[0]
    assert made.test(rule.when) is made.test(rule.when)
    foreign = rule.when.model_copy()  # equal, but not the rule set's object
    assert made.test(foreign) is not made.test(rule.when)
    stranger = FactTest(fact="pregnant", eq=True)
    assert made.test(stranger)({"pregnant": True}, {}) is True


def test_an_unknown_hook_has_no_rules() -> None:
    assert evaluate(ruleset(), Facts(today=TODAY), hook="no-such-hook", profile="seed").findings == ()


# Fixtures answered with an error (412, 400) reach no evaluation: there is nothing to compare.
ANSWERED = [f for f in fixtures() if "status" not in f.expected or f.expected["status"] == 200]


@pytest.mark.parametrize("fixture", ANSWERED, ids=lambda f: f.id)
def test_traced_and_compiled_evaluation_find_the_same(fixture: Any) -> None:
    rs = ruleset()
    request = parse_request(fixture.request)
    service = rs.services[fixture.expected["service"]]
    resolved = resolve(service.prefetch, request, None)
    today = date.fromisoformat(fixture.expected["today"])
    profile = fixture.expected.get("profile", "seed")
    facts = facts_for(rs, resolved.resources, today, resolved)
    drafts = drafts_of(rs, request)
    fast = evaluate(rs, facts, hook=request.hook, profile=profile, drafts=drafts)
    traced = evaluate(rs, facts, hook=request.hook, profile=profile, drafts=drafts, trace=True)

    def seen(findings: Any) -> list[Any]:
        return [(f.rule.id, f.indicator, f.draft, f.ingredient, dict(f.values)) for f in findings]

    assert seen(fast.findings) == seen(traced.findings)
    fired = {(t.rule, t.draft) for t in traced.traces if t.fired}
    assert len(fired) == len(traced.findings)


# ---------------------------------------------------------------- template fields


def _facts_with_everything() -> Facts:
    fixture = next(f for f in fixtures() if f.name == "warfarin-with-k2")
    request = parse_request(fixture.request)
    resolved = resolve(ruleset().services["d3k2-patient-view"].prefetch, request, None)
    return facts_for(ruleset(), resolved.resources, TODAY, resolved)


@pytest.mark.parametrize("facts", [Facts(today=TODAY), _facts_with_everything()], ids=["none", "some"])
def test_fields_made_on_first_use_equal_the_fields_made_at_once(facts: Facts) -> None:
    rs = ruleset()
    values = fact_values(rs, facts, "seed")
    eager = template_fields(rs, facts, "seed", values)
    lazy = _Fields(_FieldContext(rs, facts, "seed", values))
    assert len(lazy) == 0
    for name in reversed(list(eager)):
        assert vars(lazy[name]) == vars(eager[name])
        assert lazy[name] is lazy[name]  # made once
    assert list(eager) == list(_FIELD_MAKERS)
    assert "{vitd.shown} / {vka.names}".format_map(lazy) == "{vitd.shown} / {vka.names}".format_map(eager)
    with pytest.raises(KeyError):
        lazy["nope"]


def test_draft_fields_add_the_draft_to_the_answers_fields() -> None:
    rs = ruleset()
    facts = Facts(today=TODAY)
    base = _Fields(_FieldContext(rs, facts, "seed", fact_values(rs, facts, "seed")))
    draft = template_fields(rs, facts, "seed", {})["k2"]
    scoped = _DraftFields(base, draft)
    assert scoped["draft"] is draft
    assert scoped["vitd"] is base["vitd"]
    assert "{draft.names} {egfr.shown}".format_map(scoped) == "none not on record"


# ---------------------------------------------------------------- medications

WARFARIN = {"coding": [{"system": RXNORM, "code": "855332", "display": "warfarin sodium 5 MG Oral Tablet"}]}
D3 = {"text": "Cholecalciferol 2000 UNT Oral Capsule"}


def _d3_order(value: int = 2) -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "id": f"d3-{value}",
        "status": "draft",
        "medicationCodeableConcept": D3,
        "dosageInstruction": [
            {
                "doseAndRate": [{"doseQuantity": {"value": value, "unit": "capsule"}}],
                "timing": {"code": {"text": "QD"}},
            }
        ],
    }


def _fresh(rs: RuleSet | None = None) -> RuleSet:
    return dataclasses.replace(rs or ruleset())


def test_a_remembered_classification_equals_a_fresh_one() -> None:
    rs = _fresh()
    reader = rs.medications
    for codeable in (WARFARIN, D3, {"coding": "x"}, {"text": "metformin"}, None, ["x"]):
        first = reader.concepts(codeable)
        again = reader.concepts(copy.deepcopy(codeable))
        plain = classify_medication(codeable, rs.terminology, rs.catalog)
        assert first == again == tuple((i.concept, i.name, i.matched_by) for i in plain)
    assert reader.cached()[0] == 4  # None and a list are not concepts: nothing to remember
    assert classifier(rs)(WARFARIN) == reader.concepts(WARFARIN)


def test_concepts_that_read_alike_share_an_entry() -> None:
    reader = _fresh().medications
    reader.concepts(WARFARIN)
    reader.concepts({**WARFARIN, "id": "m1", "extension": [{"url": "x"}]})
    reader.concepts({"coding": [{**WARFARIN["coding"][0], "version": "2024"}], "text": "  "})
    assert reader.cached()[0] == 1


def test_the_medication_caches_are_bounded() -> None:
    rs = ruleset()
    reader = MedicationReader(rs.terminology, rs.catalog, maxsize=3)
    for n in range(10):
        reader.concepts({"text": f"vitamin d3 {n} unit"})
    reader_drafts = read_draft_orders(
        [_d3_order(n) for n in range(1, 8)], None, rs.terminology, rs.catalog, reader
    )
    assert len(reader_drafts.orders) == 7
    assert reader.cached() == (3, 3)


def test_rule_sets_do_not_share_what_they_remember() -> None:
    one, two = _fresh(), _fresh()
    assert one.medications is not two.medications
    one.medications.concepts(WARFARIN)
    assert one.medications.cached()[0] == 1
    assert two.medications.cached()[0] == 0
    assert one.derived(program) is not two.derived(program)
    assert one.derived(_CardParts) is not two.derived(_CardParts)


def test_remembered_draft_doses_equal_fresh_ones() -> None:
    rs = _fresh()
    orders = [_d3_order(2), _d3_order(2), _d3_order(3)]
    remembered = read_draft_orders(orders, None, rs.terminology, rs.catalog, rs.medications)
    plain = read_draft_orders(orders, None, rs.terminology, rs.catalog)
    assert remembered == plain
    assert remembered.orders[0].ingredients is remembered.orders[1].ingredients
    assert rs.medications.cached() == (1, 2)
    assert remembered.orders[2].ingredients[0].daily == 6000


# ---------------------------------------------------------------- cards


@PROPERTY
@given(st.text(min_size=1), st.lists(st.text(), max_size=3))
def test_card_ids_are_uuid5(hook_instance: str, parts: list[str]) -> None:
    name = "d3k2:" + ":".join((hook_instance, *parts))
    try:
        expected = str(uuid.uuid5(uuid.NAMESPACE_URL, name))
    except UnicodeEncodeError:
        with pytest.raises(UnicodeEncodeError):
            card_uuid(hook_instance, *parts)
        return
    assert card_uuid(hook_instance, *parts) == expected


def test_suggested_resources_are_made_once_per_product_and_day() -> None:
    rs = _fresh()
    parts = rs.derived(_CardParts)
    tests = [name for name, p in rs.products.items() if p.kind == "test" and p.occurrence_weeks]
    medications = [name for name, p in rs.products.items() if p.kind == "medication"]
    assert tests and medications
    later = TODAY + timedelta(days=3)
    for name in medications:
        assert parts.suggested(name, TODAY) is parts.suggested(name, later)
        assert medication_request(rs.products[name], "p1") == _patient(parts.suggested(name, TODAY), "p1")
    for name in tests:
        assert parts.suggested(name, TODAY) != parts.suggested(name, later)
        for day in (TODAY, later):
            assert service_request(rs.products[name], "p1", day) == _patient(parts.suggested(name, day), "p1")


def _patient(resource: bytes, patient_id: str) -> dict[str, Any]:
    import orjson

    found: dict[str, Any] = orjson.loads(resource)
    found["subject"]["reference"] = f"Patient/{patient_id}"
    return found


def test_a_rule_from_elsewhere_gets_its_own_card_parts() -> None:
    rs = ruleset()
    parts = rs.derived(_CardParts)
    rule = rs.rules[0]
    assert parts.rule(rule).rule is rule
    changed = rule.model_copy(update={"sources": list(reversed(rule.sources)) or rule.sources})
    assert parts.rule(changed).rule is changed
    assert parts.rule(changed).links == tuple(
        (rs.sources[s].label, rs.sources[s].url) for s in changed.sources
    )


def test_answers_never_share_card_objects() -> None:
    rs = ruleset()
    fixture = next(f for f in fixtures() if f.request["hook"] == "order-sign" and "sandbox" in f.name)
    first = call_service(rs, "d3k2-order-sign", fixture.request, today=TODAY, profile="seed", fetcher=None)
    second = call_service(rs, "d3k2-order-sign", fixture.request, today=TODAY, profile="seed", fetcher=None)
    assert first.response == second.response

    def objects(value: Any) -> Iterator[int]:
        if isinstance(value, dict | list):
            yield id(value)
            for item in value.values() if isinstance(value, dict) else value:
                yield from objects(item)

    assert not set(objects(first.response["cards"])) & set(objects(second.response["cards"]))
    cards = build_cards(rs, first.evaluation, hook_instance="x", patient_id="p")
    assert any("overrideReasons" in card for card in cards)


# ---------------------------------------------------------------- rule set


def test_derived_is_made_once_and_anew_for_a_changed_rule_set() -> None:
    rs = _fresh()
    made: list[RuleSet] = []

    def build(r: RuleSet) -> int:
        made.append(r)
        return len(made)

    assert rs.derived(build) == 1
    assert rs.derived(build) == 1
    changed = dataclasses.replace(rs, rules=rs.rules[:1])
    assert changed.derived(build) == 2
    assert made == [rs, changed]
    assert changed.derived(program).rules_by_hook.keys() <= set(rs.rules[0].hooks)


# ---------------------------------------------------------------- prefetch


def _bundle(*resources: Any) -> dict[str, Any]:
    return {"resourceType": "Bundle", "entry": [{"resource": r} for r in resources]}


WARNING = {"resourceType": "OperationOutcome", "issue": [{"severity": "warning"}, "odd"]}
ERROR = {"resourceType": "OperationOutcome", "issue": [{"severity": "warning"}, {"severity": "error"}]}
PATIENT = {"resourceType": "Patient", "id": "p1"}


FATAL = {"resourceType": "OperationOutcome", "issue": [{"severity": "fatal", "code": "timeout"}, {"code": 5}]}


@pytest.mark.parametrize(
    ("value", "usable", "failure"),
    [
        (PATIENT, [PATIENT], None),
        (ERROR, [], "an OperationOutcome"),
        (WARNING, [], "an OperationOutcome"),
        (_bundle(PATIENT, WARNING), [PATIENT], None),
        # The other entries of a Bundle with an error are used; what failed is named.
        (_bundle(PATIENT, ERROR), [PATIENT], "an error in the Bundle"),
        (_bundle(FATAL, PATIENT, ERROR, FATAL), [PATIENT], "an error (timeout) in the Bundle"),
        (_bundle({"resourceType": "OperationOutcome", "issue": "x"}), [], None),
        ({"resourceType": "Bundle", "entry": "x"}, [], None),
        (
            {"resourceType": "Bundle", "entry": ["x", {"resource": "y"}, {"resource": PATIENT}]},
            [PATIENT],
            None,
        ),
    ],
)
def test_a_prefetched_value_is_read_in_one_pass(
    value: dict[str, Any], usable: list[Any], failure: str | None
) -> None:
    assert _usable(value) == (usable, failure)
    if failure is None:
        assert resources_of(value) == usable


def test_medication_references_are_looked_for_only_when_there_are_some() -> None:
    statement = {"resourceType": "MedicationStatement", "medicationReference": {"reference": "Medication/m1"}}
    assert _unresolved_medications([PATIENT, {"resourceType": "MedicationStatement"}]) == []
    assert _unresolved_medications([statement]) == ["Medication/m1"]
    assert _unresolved_medications([statement, {"resourceType": "Medication", "id": "m1"}]) == []
    odd = {"resourceType": "MedicationRequest", "medicationReference": {"reference": "Medication/a b"}}
    assert _unresolved_medications([odd]) == []


def test_prepare_makes_what_the_first_call_would() -> None:
    rs = prepare(_fresh())
    made = rs.derived(program), rs.derived(_CardParts)
    assert prepare(rs) is rs
    assert (rs.derived(program), rs.derived(_CardParts)) == made
    fixture = next(f for f in fixtures() if f.request["hook"] == "order-sign" and "sandbox" in f.name)
    prepared = call_service(rs, "d3k2-order-sign", fixture.request, today=TODAY, profile="seed", fetcher=None)
    plain = call_service(
        _fresh(), "d3k2-order-sign", fixture.request, today=TODAY, profile="seed", fetcher=None
    )
    assert prepared.response == plain.response
