"""The pure core's speed-ups answer exactly what the plain code answers (issue 11).

- one evaluator: a trace or a memo of named conditions never changes a condition's three-valued answer,
  which is Kleene's logic over the fact tests;
- template fields made on first use equal the ones `template_fields` makes all at once;
- medication classification and draft doses remembered per rule set: equal results, bounded, not shared;
- suggested resources validated once each (by value), and at startup; card ids are still uuid5;
- prefetch reading in one pass keeps the four states of a key.
"""

from __future__ import annotations

import copy
import dataclasses
import hmac
import uuid
from collections.abc import Iterator, Mapping
from datetime import date, timedelta
from functools import partial
from typing import Any

import pytest
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.servicerequest import ServiceRequest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from builders import TODAY, fixtures, ruleset
from d3k2.core.cards import (
    OFFLINE_CARD_KEY,
    build_cards,
    card_uuid,
    medication_request,
    service_request,
    validated_resource,
)
from d3k2.core.drafts import read_draft_orders
from d3k2.core.engine import FactValue, evaluate, evaluate_condition, fact_values
from d3k2.core.errors import BadRequest
from d3k2.core.facts import Facts
from d3k2.core.fields import FIELD_MAKERS, FieldContext, Fields, template_fields
from d3k2.core.hooks import parse_feedback, parse_request
from d3k2.core.medication_reader import MedicationReader
from d3k2.core.medications import classify_medication
from d3k2.core.quantities import Interval
from d3k2.core.ruleset import AllOf, AnyOf, Condition, FactTest, NotOf, Ref, RuleSet
from d3k2.core.terminology import RXNORM
from d3k2.fhir.prefetch import resolve, resources_of, unresolved_medications, usable_resources
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


def _kleene(
    condition: Condition, values: Mapping[str, FactValue], named: Mapping[str, Condition]
) -> bool | None:
    """The answer by definition: all = the least of its parts and any = the greatest, with False < cannot
    tell < True; a leaf is one fact test."""
    order: list[bool | None] = [False, None, True]
    if isinstance(condition, FactTest):
        return evaluate_condition(condition, values, {})
    if isinstance(condition, AllOf):
        return min((_kleene(c, values, named) for c in condition.all), key=order.index, default=True)
    if isinstance(condition, AnyOf):
        return max((_kleene(c, values, named) for c in condition.any), key=order.index, default=False)
    if isinstance(condition, NotOf):
        inner = _kleene(condition.not_, values, named)
        return None if inner is None else not inner
    assert isinstance(condition, Ref)
    return _kleene(named[condition.ref], values, named)


@PROPERTY
@given(CONDITIONS, NAMED, st.fixed_dictionaries(dict.fromkeys(FACTS, VALUES)))
def test_neither_a_trace_nor_a_memo_changes_the_answer(
    condition: Condition, named: dict[str, Condition], values: dict[str, FactValue]
) -> None:
    expected = _kleene(condition, values, named)
    assert evaluate_condition(condition, values, named) is expected
    trace: list[str] = []
    assert evaluate_condition(condition, values, named, trace) is expected
    memo: dict[str, bool | None] = {}
    assert evaluate_condition(condition, values, named, None, memo) is expected
    assert evaluate_condition(condition, values, named, [], memo) is expected  # again, from the memo
    assert set(memo) <= set(NAMES)


def test_a_trace_explains_every_leaf_and_names_a_named_condition_once() -> None:
    named = {"n": AnyOf(any=[FactTest(fact="a", eq=True), FactTest(fact="b", eq=True)])}
    condition = AnyOf(any=[FactTest(fact="a", eq=True), Ref(ref="n"), FactTest(fact="c", lt=3.0)])
    trace: list[str] = []
    assert evaluate_condition(condition, {"a": True, "c": 5.0}, named, trace) is True
    assert trace == ["a eq True: True → true", "n → true", "c lt 3.0: 5.0 → false"]


class _Counted(dict[str, Condition]):
    def __init__(self, named: Mapping[str, Condition]) -> None:
        super().__init__(named)
        self.reads: list[str] = []

    def __getitem__(self, key: str) -> Condition:
        self.reads.append(key)
        return super().__getitem__(key)


def test_a_named_condition_is_computed_once_per_memo() -> None:
    named = _Counted({"n": FactTest(fact="a", eq=True)})
    memo: dict[str, bool | None] = {}
    twice = AllOf(all=[Ref(ref="n"), Ref(ref="n")])
    assert evaluate_condition(twice, {"a": True}, named, None, memo) is True
    assert evaluate_condition(twice, {"a": True}, named, ["traced"], memo) is True
    assert named.reads == ["n"] and memo == {"n": True}
    assert evaluate_condition(twice, {"a": True}, named) is True  # without a memo: computed each time
    assert named.reads == ["n", "n", "n"]


def test_a_fact_test_without_an_operator_is_a_bug() -> None:
    with pytest.raises(ValueError, match="without an operator"):
        evaluate_condition(FactTest.model_construct(fact="a", _fields_set={"fact"}), {"a": 1.0}, {})


def test_an_unknown_hook_has_no_rules() -> None:
    assert evaluate(ruleset(), Facts(today=TODAY), hook="no-such-hook", profile="seed").findings == ()


# Fixtures answered with an error (412, 400) reach no evaluation: there is nothing to compare.
ANSWERED = [f for f in fixtures() if "status" not in f.expected or f.expected["status"] == 200]


@pytest.mark.parametrize("fixture", ANSWERED, ids=lambda f: f.id)
def test_traced_and_untraced_evaluation_find_the_same(fixture: Any) -> None:
    rs = ruleset()
    request = parse_request(fixture.request)
    service = rs.services[fixture.expected["service"]]
    resolved = resolve(service.prefetch, request, None, rs.texts)
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


def test_medication_facts_are_named_by_the_catalog() -> None:
    rs = ruleset()
    categories = dict(rs.catalog.by_category)
    categories["vka"] = dataclasses.replace(categories["vka"], fact="antagonist.current")
    categories["vitamin-k1"] = dataclasses.replace(categories["vitamin-k1"], fact="k1.active")
    renamed = dataclasses.replace(rs, catalog=dataclasses.replace(rs.catalog, by_category=categories))
    values = fact_values(renamed, _facts_with_everything(), "seed")
    assert values["antagonist.current"] is True and "vka.active" not in values
    assert values["k1.active"] is False
    assert fact_values(rs, _facts_with_everything(), "seed")["vka.active"] is True


# ---------------------------------------------------------------- template fields


def _facts_with_everything() -> Facts:
    fixture = next(f for f in fixtures() if f.name == "warfarin-with-k2")
    request = parse_request(fixture.request)
    resolved = resolve(ruleset().services["d3k2-patient-view"].prefetch, request, None, ruleset().texts)
    return facts_for(ruleset(), resolved.resources, TODAY, resolved)


@pytest.mark.parametrize("facts", [Facts(today=TODAY), _facts_with_everything()], ids=["none", "some"])
def test_fields_made_on_first_use_equal_the_fields_made_at_once(facts: Facts) -> None:
    rs = ruleset()
    values = fact_values(rs, facts, "seed")
    eager = template_fields(rs, facts, "seed", values)
    lazy = Fields(FieldContext(rs, facts, "seed", values))
    assert len(lazy) == 0
    for name in reversed(list(eager)):
        assert vars(lazy[name]) == vars(eager[name])
        assert lazy[name] is lazy[name]  # made once
    assert list(eager) == list(FIELD_MAKERS)
    assert "{vitd.shown} / {vka.names}".format_map(lazy) == "{vitd.shown} / {vka.names}".format_map(eager)
    with pytest.raises(KeyError):
        lazy["nope"]


def test_draft_fields_add_the_draft_to_the_answers_fields() -> None:
    rs = ruleset()
    fixture = next(f for f in fixtures() if f.request["hook"] == "order-sign" and "sandbox" in f.name)
    request = parse_request(fixture.request)
    resolved = resolve(rs.services["d3k2-order-sign"].prefetch, request, None, rs.texts)
    facts = facts_for(rs, resolved.resources, TODAY, resolved)
    found = evaluate(rs, facts, hook="order-sign", profile="seed", drafts=drafts_of(rs, request)).findings
    scoped = [f for f in found if f.draft is not None]
    assert len(scoped) >= 2
    assert len({id(f.fields["egfr"]) for f in found}) == 1  # the answer's namespaces, made once
    for finding in scoped:
        assert finding.ingredient is not None
        assert finding.fields["draft"].arithmetic == finding.ingredient.arithmetic
        assert "{draft.daily} / {egfr.shown}".format_map(finding.fields).startswith(
            finding.fields["draft"].daily + " / "
        )


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
    reader = MedicationReader(rs.terminology, rs.catalog, rs.texts.dosage, maxsize=3)
    for n in range(10):
        reader.concepts({"text": f"vitamin d3 {n} unit"})
    reader_drafts = read_draft_orders([_d3_order(n) for n in range(1, 8)], None, reader)
    assert len(reader_drafts.orders) == 7
    assert reader.cached() == (3, 3)


def test_rule_sets_do_not_share_what_they_remember() -> None:
    one, two = _fresh(), _fresh()
    assert one.medications is not two.medications
    one.medications.concepts(WARFARIN)
    assert one.medications.cached()[0] == 1
    assert two.medications.cached()[0] == 0


def test_remembered_draft_doses_equal_fresh_ones() -> None:
    rs = _fresh()
    orders = [_d3_order(2), _d3_order(2), _d3_order(3)]
    remembered = read_draft_orders(orders, None, rs.medications)
    plain = read_draft_orders(
        orders, None, MedicationReader(rs.terminology, rs.catalog, rs.texts.dosage, maxsize=0)
    )
    assert remembered == plain
    assert remembered.orders[0].ingredients is remembered.orders[1].ingredients
    assert rs.medications.cached() == (1, 2)
    assert remembered.orders[2].ingredients[0].daily == 6000


# ---------------------------------------------------------------- cards


CARD = {"patient": "pt-1", "hook": "order-select", "rule": "k2-warfarin", "draft": "d1", "day": TODAY}


def test_a_card_uuid_is_the_same_for_the_same_inputs_and_an_rfc9562_version_8_uuid() -> None:
    first = card_uuid(b"k" * 32, **CARD)
    assert first == card_uuid(b"k" * 32, **CARD)
    parsed = uuid.UUID(first)
    assert (str(parsed), parsed.version, parsed.variant) == (first, 8, uuid.RFC_4122)


@pytest.mark.parametrize(
    "change",
    [
        {"patient": "pt-2"},
        {"hook": "order-sign"},
        {"rule": "d3-deficiency"},
        {"draft": "d2"},
        {"draft": ""},
        {"day": TODAY + timedelta(days=1)},
    ],
    ids=lambda change: next(iter(change)),
)
def test_each_input_and_the_key_change_a_card_uuid(change: dict[str, Any]) -> None:
    assert card_uuid(b"k" * 32, **CARD) != card_uuid(b"k" * 32, **(CARD | change))
    assert card_uuid(b"k" * 32, **CARD) != card_uuid(b"j" * 32, **CARD)


def test_a_card_uuid_is_the_hmac_of_its_inputs_with_the_version_and_variant_bits_set() -> None:
    message = b'["pt-1","order-select","k2-warfarin","d1","2026-11-24"]'
    expected = bytearray(hmac.new(b"k" * 32, message, "sha256").digest()[:16])
    expected[6] = (expected[6] & 0x0F) | 0x80
    expected[8] = (expected[8] & 0x3F) | 0x80
    assert uuid.UUID(card_uuid(b"k" * 32, **CARD)).bytes == bytes(expected)


def test_repeated_calls_of_one_order_session_give_the_same_uuids_and_other_days_new_ones() -> None:
    """The sandbox fires order-select on every keystroke, each with a new hookInstance and new dates."""
    rs = ruleset()
    fixture = next(f for f in fixtures() if f.request["hook"] == "order-select" and "sandbox" in f.name)
    typed = copy.deepcopy(fixture.request) | {"hookInstance": "8aa14886-1d28-447d-86aa-5363c4a5649f"}
    draft = typed["context"]["draftOrders"]["entry"][0]["resource"]
    draft["dosageInstruction"][0]["timing"]["repeat"]["boundsPeriod"]["start"] = "0202-12-01"
    call = partial(call_service, rs, "d3k2-order-select", profile="seed", fetcher=None, card_key=b"k" * 32)
    first = call(fixture.request, today=TODAY).response["cards"]
    assert first
    assert [c["uuid"] for c in call(typed, today=TODAY).response["cards"]] == [c["uuid"] for c in first]
    tomorrow = {c["uuid"] for c in call(fixture.request, today=TODAY + timedelta(days=1)).response["cards"]}
    assert not tomorrow & {c["uuid"] for c in first}
    other_key = call_service(
        rs,
        "d3k2-order-select",
        fixture.request,
        today=TODAY,
        profile="seed",
        fetcher=None,
        card_key=b"j" * 32,
    )
    assert not {c["uuid"] for c in other_key.response["cards"]} & {c["uuid"] for c in first}


def test_suggested_resources_are_validated_once_each_and_equal_fresh_ones() -> None:
    rs = ruleset()
    later = TODAY + timedelta(days=3)
    for product in rs.products.values():
        if product.kind == "medication":
            made = medication_request(product, "p1", rs.texts.units)
            assert made == medication_request(product, "p1", rs.texts.units)
            assert MedicationRequest.model_validate(made).model_dump(mode="json", exclude_none=True) == made
        else:
            made = service_request(product, "p1", TODAY)
            assert ServiceRequest.model_validate(made).model_dump(mode="json", exclude_none=True) == made
            if product.occurrence_weeks:
                assert service_request(product, "p1", later) != made
    before = validated_resource.cache_info()
    for product in rs.products.values():
        if product.kind == "medication":
            medication_request(product, "p2", rs.texts.units)
    after = validated_resource.cache_info()
    assert after.misses == before.misses and after.hits > before.hits  # by value: any patient, any call


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
    cards = build_cards(rs, first.evaluation, hook="order-sign", patient_id="p", card_key=OFFLINE_CARD_KEY)
    assert any("overrideReasons" in card for card in cards)


# ---------------------------------------------------------------- rule set


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
    assert usable_resources(value, ruleset().texts) == (usable, failure)
    if failure is None:
        assert resources_of(value) == usable


def test_medication_references_are_looked_for_only_when_there_are_some() -> None:
    statement = {"resourceType": "MedicationStatement", "medicationReference": {"reference": "Medication/m1"}}
    assert unresolved_medications([PATIENT, {"resourceType": "MedicationStatement"}]) == []
    assert unresolved_medications([statement]) == ["Medication/m1"]
    assert unresolved_medications([statement, {"resourceType": "Medication", "id": "m1"}]) == []
    odd = {"resourceType": "MedicationRequest", "medicationReference": {"reference": "Medication/a b"}}
    assert unresolved_medications([odd]) == []


def test_prepare_makes_what_the_first_call_would() -> None:
    rs = prepare(_fresh())
    assert prepare(rs) is rs
    fixture = next(f for f in fixtures() if f.request["hook"] == "order-sign" and "sandbox" in f.name)
    prepared = call_service(rs, "d3k2-order-sign", fixture.request, today=TODAY, profile="seed", fetcher=None)
    plain = call_service(
        _fresh(), "d3k2-order-sign", fixture.request, today=TODAY, profile="seed", fetcher=None
    )
    assert prepared.response == plain.response


def test_prepare_stops_on_a_product_that_is_not_valid_r4() -> None:
    rs = ruleset()
    product = next(p for p in rs.products.values() if p.kind == "medication")
    bad = product.model_copy(update={"code": product.code.model_copy(update={"code": " spaced"})})
    with pytest.raises(ValidationError, match=r"coding\.0\.code"):
        prepare(dataclasses.replace(rs, products={**rs.products, "bad": bad}))


@pytest.mark.parametrize(
    "payload",
    [
        {"feedback": [{"card": "c1", "outcome": "accepted", "note\x00": 1}]},
        {"feedback": [{"card": "c1", "outcome": "accepted", "acceptedSuggestions": ["a", "b\x00"]}]},
        {"card": "c1", "outcome": "overridden", "overrideReason": {"userComment": "x\x00"}},
    ],
    ids=["key", "list", "single-item"],
)
def test_feedback_with_a_nul_anywhere_is_refused(payload: dict[str, Any]) -> None:
    with pytest.raises(BadRequest, match="NUL"):
        parse_feedback(payload)


def test_feedback_numbers_and_nulls_are_no_nul() -> None:
    parsed = parse_feedback({"feedback": [{"card": "c1", "outcome": "accepted", "extra": [1, None, 2.5]}]})
    assert parsed.feedback[0].card == "c1"
