"""Property tests (hypothesis) on the pure core: facts, rules, cards.

- any JSON-ish, FHIR-like input gives facts, findings and cards without an exception;
- the result does not depend on the order of Bundle entries;
- adding unrelated or malformed resources, or copies of a record (same type and id: bare, SUBSETTED, with
  another status, without versions), never removes a warning or critical card;
- unit conversions round-trip;
- every suggested resource is valid R4 (fhir.resources R4B and fhirkit).

Deterministic (derandomize) and bounded; `make fuzz` raises the examples with D3K2_PROPERTY_EXAMPLES.
"""

from __future__ import annotations

import copy
import json
import math
import os
from datetime import date
from functools import cache
from typing import Any

import fhirkit
import pytest
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.servicerequest import ServiceRequest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from builders import FIXTURES, TODAY, ruleset
from d3k2.core.cards import OFFLINE_CARD_KEY, SUMMARY_LIMIT, build_cards
from d3k2.core.engine import evaluate
from d3k2.core.facts import Facts
from d3k2.core.quantities import Interval, format_beside, format_interval
from d3k2.core.terminology import LOINC, RXNORM, SNOMED
from d3k2.service import call_service, facts_for

EXAMPLES = int(os.environ.get("D3K2_PROPERTY_EXAMPLES", "200"))
PROPERTY = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MODELS = {"MedicationRequest": MedicationRequest, "ServiceRequest": ServiceRequest}
HOOKS = ("patient-view", "order-select", "order-sign", "medication-prescribe")


# ---------------------------------------------------------------- strategies


@cache
def value_set_codes() -> dict[str, list[str]]:
    """Codes of the rule set's value sets, by system (LOINC, SNOMED, RxNorm, ICD-10-CM)."""
    terminology = ruleset().terminology
    by_system: dict[str, set[str]] = {}
    for vs in terminology.valuesets:
        for system, code in terminology.codes_in(vs):
            by_system.setdefault(system, set()).add(code)
    return {system: sorted(codes) for system, codes in by_system.items()}


@cache
def lab_units() -> list[str]:
    return sorted({unit for lab in ruleset().facts.labs.values() for unit in lab.units})


def codes(system: str) -> st.SearchStrategy[str]:
    return st.sampled_from(value_set_codes()[system])


SYSTEMS = st.sampled_from(sorted(value_set_codes()))
STATUSES = st.sampled_from(
    ["final", "amended", "corrected", "preliminary", "registered", "cancelled", "entered-in-error", "x"]
)
TEXT = st.text(max_size=12)
DATES = st.one_of(
    st.dates(min_value=date(1990, 1, 1), max_value=date(2030, 12, 31)).map(date.isoformat),
    st.sampled_from(["2026", "2026-11", "2026-11-01T10:00:00Z", "2026-11-01T10:00:00+02:00"]),
    st.sampled_from(["Invalid date", "0002-12-01", "", "2026-13-45", "11/01/2026"]),
)
NUMBERS = st.one_of(
    st.integers(-5, 500), st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)
)
JUNK_VALUES = st.one_of(st.none(), st.booleans(), TEXT, st.lists(st.integers(), max_size=2), st.just({}))
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), TEXT),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(TEXT, children, max_size=3)),
    max_leaves=8,
)


def coding(system: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[dict[str, Any]]:
    return (SYSTEMS if system is None else system).flatmap(
        lambda s: st.fixed_dictionaries(
            {"system": st.just(s), "code": codes(s) if s in value_set_codes() else TEXT},
            optional={"display": TEXT},
        )
    )


def codeable(system: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.fixed_dictionaries(
            {"coding": st.lists(coding(system), min_size=1, max_size=2)}, optional={"text": TEXT}
        ),
        JUNK_VALUES,
    )


def quantity(numbers: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"value": st.one_of(numbers, JUNK_VALUES)},
        optional={
            "unit": st.one_of(st.sampled_from(lab_units()), TEXT),
            "code": st.one_of(st.sampled_from(lab_units()), TEXT),
            "comparator": st.sampled_from(["<", "<=", ">", ">=", "=", "~", ""]),
            "system": st.just("http://unitsofmeasure.org"),
        },
    )


def observation(numbers: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"resourceType": st.just("Observation"), "code": codeable(st.just(LOINC))},
        optional={
            "status": STATUSES,
            "effectiveDateTime": DATES,
            "effectivePeriod": st.fixed_dictionaries({}, optional={"start": DATES, "end": DATES}),
            "issued": DATES,
            "valueQuantity": st.one_of(quantity(numbers), JUNK_VALUES),
            "valueString": st.one_of(
                st.sampled_from(["<5 ng/mL", "> 150", "45 nmol/L", "12,5 ng/mL", "positive"]), TEXT
            ),
            "valueCodeableConcept": codeable(st.sampled_from([LOINC, SNOMED])),
            "referenceRange": st.lists(
                st.fixed_dictionaries({}, optional={"high": quantity(numbers)}), max_size=2
            ),
            "dataAbsentReason": codeable(),
        },
    )


QUANTITY = quantity(NUMBERS)
OBSERVATION = observation(NUMBERS)
# What Python's json module (d3k2 replay) can hand over besides: integers past float range, NaN, infinity.
WILD_OBSERVATION = observation(
    st.one_of(NUMBERS, st.integers(min_value=10**300, max_value=10**400), st.floats())
)
CLINICAL = st.sampled_from(["active", "recurrence", "relapse", "inactive", "remission", "resolved", "x"])
CONDITION = st.fixed_dictionaries(
    {"resourceType": st.just("Condition"), "code": codeable()},
    optional={
        "clinicalStatus": st.one_of(CLINICAL, CLINICAL.map(lambda c: {"coding": [{"code": c}]}), JUNK_VALUES),
        "verificationStatus": st.one_of(
            st.sampled_from(["confirmed", "refuted", "entered-in-error", "unconfirmed"]).map(
                lambda c: {"coding": [{"code": c}]}
            ),
            JUNK_VALUES,
        ),
        "onsetDateTime": DATES,
        "recordedDate": DATES,
    },
)
MEDICATION = st.fixed_dictionaries(
    {
        "resourceType": st.sampled_from(["MedicationStatement", "MedicationRequest"]),
        "status": st.sampled_from(["active", "intended", "on-hold", "draft", "stopped", "completed", "x"]),
    },
    optional={
        "medicationCodeableConcept": st.one_of(
            codeable(st.just(RXNORM)),
            st.sampled_from(["warfarin 5 mg", "Vitamin K2 100 mcg", "Cholecalciferol 1000 UNT"]).map(
                lambda t: {"text": t}
            ),
        ),
        "medicationReference": st.one_of(
            st.fixed_dictionaries({}, optional={"reference": TEXT, "display": TEXT}), JUNK_VALUES
        ),
    },
)
RESOURCE = st.one_of(OBSERVATION, CONDITION, MEDICATION)
WILD_RESOURCE = st.one_of(WILD_OBSERVATION, CONDITION, MEDICATION)


def with_ids(resources: list[Any]) -> list[Any]:
    """Unique ids, as a FHIR server's search results have."""
    out = []
    for i, resource in enumerate(resources):
        if isinstance(resource, dict):
            resource = {**resource, "id": f"r{i}"}
        out.append(resource)
    return out


def facts(resources: list[Any], today: date = TODAY) -> Facts:
    return facts_for(ruleset(), resources, today)


def cards_for(resources: list[Any], hook: str = "patient-view", patient: str = "p1", today: date = TODAY):
    rs = ruleset()
    evaluation = evaluate(rs, facts(resources, today), hook=hook, profile=rs.default_profile)
    return build_cards(rs, evaluation, hook=hook, patient_id=patient, card_key=OFFLINE_CARD_KEY)


# ---------------------------------------------------------------- properties


@PROPERTY
@given(st.lists(st.one_of(WILD_RESOURCE, JSON), max_size=12), st.sampled_from(HOOKS))
@example(
    [
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "62292-8"}]},
            "effectiveDateTime": "2026-11-01",
            "valueQuantity": {"value": 10**400, "unit": "ng/mL"},
        }
    ],
    "patient-view",
)
def test_any_fhir_like_input_gives_facts_and_cards_without_exceptions(resources, hook) -> None:
    cards = cards_for(resources, hook)
    for card in cards:
        assert len(card["summary"]) < SUMMARY_LIMIT
        assert card["indicator"] in ("info", "warning", "critical")
    json.dumps(cards)


@PROPERTY
@given(
    st.lists(RESOURCE, max_size=10)
    .map(with_ids)
    .flatmap(lambda rs: st.tuples(st.just(rs), st.permutations(rs)))
)
def test_facts_do_not_depend_on_entry_order(pair) -> None:
    original, shuffled = pair
    assert facts(original) == facts(shuffled)
    assert cards_for(original) == cards_for(shuffled)


@PROPERTY
@given(st.data())
def test_bundle_entry_order_does_not_change_the_answer(data) -> None:
    request = _base("patient-view/everything-at-once")
    for value in request["prefetch"].values():
        if isinstance(value, dict) and isinstance(value.get("entry"), list):
            value["entry"].extend(
                {"resource": r} for r in with_ids(data.draw(st.lists(RESOURCE, max_size=3)))
            )
    shuffled = copy.deepcopy(request)
    for value in shuffled["prefetch"].values():
        if isinstance(value, dict) and isinstance(value.get("entry"), list):
            value["entry"] = data.draw(st.permutations(value["entry"]))
    assert _call(request) == _call(shuffled)


# ---- adding unrelated or malformed resources never removes a contraindication card

CONTRAINDICATED = [
    "patient-view/everything-at-once",
    "patient-view/warfarin-active",
    "patient-view/egfr-below-30",
    "patient-view/sarcoidosis",
    "patient-view/hypercalcemia-lab",
    "patient-view/ckd-stage4-condition",
    "patient-view/pregnancy-status-with-k2",
    "patient-view/copies-warfarin-subsetted",
    "patient-view/copies-sarcoidosis-bare",
    "patient-view/operation-outcome-beside-data",
    "order-sign/sandbox-order-sign",
    "order-sign/calcitriol-hypercalcemia",
    "order-sign/k2-pregnancy",
    "order-select/k2-with-vka-select",
]
SERVICES = {
    "patient-view": "d3k2-patient-view",
    "order-select": "d3k2-order-select",
    "order-sign": "d3k2-order-sign",
    "medication-prescribe": "d3k2-medication-prescribe",
}


def _base(name: str) -> dict[str, Any]:
    """The fixture's request without fhirServer and with every absent key sent as 'no data'."""
    request = json.loads((FIXTURES / name / "request.json").read_text())
    request.pop("fhirServer", None)
    request.pop("fhirAuthorization", None)
    prefetch = request.setdefault("prefetch", {})
    for key in ruleset().services[SERVICES[request["hook"]]].prefetch:
        prefetch.setdefault(key, None)
    return request


def _call(request: dict[str, Any]) -> dict[str, Any]:
    outcome = call_service(
        ruleset(), SERVICES[request["hook"]], request, today=TODAY, profile="seed", fetcher=None
    )
    return outcome.response


def _alerts(response: dict[str, Any]) -> set[str]:
    return {
        c["source"]["topic"]["code"] for c in response["cards"] if c["indicator"] in ("warning", "critical")
    }


def _not_in_value_sets(code: str) -> bool:
    return not ruleset().terminology.concepts(LOINC, code)


UNRELATED_OBSERVATION = st.fixed_dictionaries(
    {
        "resourceType": st.just("Observation"),
        "status": STATUSES,
        "code": st.fixed_dictionaries(
            {
                "coding": st.lists(
                    st.fixed_dictionaries(
                        {"system": st.just(LOINC), "code": TEXT.filter(_not_in_value_sets)}
                    ),
                    min_size=1,
                    max_size=2,
                )
            }
        ),
        "effectiveDateTime": DATES,
        "valueQuantity": QUANTITY,
    }
)


def _unreadable_lab(draw_code: str, kind: int, unit: str, value: Any, when: str) -> dict[str, Any]:
    """An Observation of a lab the rules read that cannot be read: ignored status, no date, a value that
    is not a number, or a unit no lab knows."""
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": draw_code}]},
        "effectiveDateTime": when,
        "valueQuantity": {"value": 5, "unit": "ng/mL", "code": "ng/mL"},
    }
    if kind == 0:
        resource["status"] = "entered-in-error"
    elif kind == 1:
        del resource["effectiveDateTime"]
    elif kind == 2:
        resource["valueQuantity"] = {"value": value, "unit": unit}
    else:
        resource["valueQuantity"] = {"value": 5, "unit": unit, "code": unit}
    return resource


MALFORMED_LAB = st.builds(
    _unreadable_lab,
    codes(LOINC),
    st.integers(0, 3),
    TEXT.filter(lambda u: u.strip() not in lab_units() and u not in lab_units()),
    JUNK_VALUES,
    DATES,
)
NOT_CURRENT_CONDITION = st.fixed_dictionaries(
    {
        "resourceType": st.just("Condition"),
        "code": codeable(),
        "verificationStatus": st.sampled_from(["refuted", "entered-in-error"]).map(
            lambda c: {"coding": [{"code": c}]}
        ),
    }
)
NOT_CURRENT_MEDICATION = st.fixed_dictionaries(
    {
        "resourceType": st.sampled_from(["MedicationStatement", "MedicationRequest"]),
        "status": st.sampled_from(["stopped", "completed", "entered-in-error", "cancelled"]),
        "medicationCodeableConcept": codeable(st.just(RXNORM)),
    }
)
UNRELATED_RESOURCE = st.fixed_dictionaries(
    {"resourceType": st.sampled_from(["Patient", "Encounter", "AllergyIntolerance", "Procedure", "Basic"])},
    optional={"code": codeable(), "status": TEXT, "note": JSON},
)
JUNK = st.one_of(
    UNRELATED_OBSERVATION, MALFORMED_LAB, NOT_CURRENT_CONDITION, NOT_CURRENT_MEDICATION, UNRELATED_RESOURCE
)
JUNK_ENTRY = st.one_of(
    JUNK.map(lambda r: {"resource": r}),
    st.sampled_from([None, 5, "x", {}, {"resource": []}, {"resource": None}]),
    JSON.map(lambda j: {"resource": j}),
)


@cache
def _baseline(name: str) -> set[str]:
    alerts = _alerts(_call(_base(name)))
    assert alerts, f"{name} has no warning or critical card to keep"
    return alerts


# Statuses a copy of a record may have that, alone, would not support a caution.
NOT_CURRENT = {
    "MedicationStatement": ["stopped", "completed", "not-taken", "entered-in-error", "unknown"],
    "MedicationRequest": ["stopped", "completed", "cancelled", "entered-in-error"],
    "Observation": ["entered-in-error", "cancelled", "registered"],
}
CONDITION_CHANGES = [
    ("clinicalStatus", "resolved"),
    ("clinicalStatus", "inactive"),
    ("verificationStatus", "refuted"),
    ("verificationStatus", "entered-in-error"),
]


def _copy_of(original: dict[str, Any], kind: str, data: st.DataObject) -> dict[str, Any]:
    """Another copy of one record (same type and id), without a version that makes it the newer one."""
    bare = {"resourceType": original["resourceType"], "id": original["id"]}
    if kind == "bare":
        return bare
    if kind == "subsetted":
        kept = data.draw(st.sets(st.sampled_from(sorted(original)), max_size=2))
        return {**{k: original[k] for k in kept}, **bare, "meta": {"tag": [{"code": "SUBSETTED"}]}}
    changed = copy.deepcopy(original)
    meta = changed.get("meta")
    if isinstance(meta, dict):
        meta.pop("versionId", None)
        meta.pop("lastUpdated", None)
    if original["resourceType"] == "Condition":
        field, code = data.draw(st.sampled_from(CONDITION_CHANGES))
        changed[field] = {"coding": [{"code": code}]}
    elif original["resourceType"] in NOT_CURRENT:
        changed["status"] = data.draw(st.sampled_from(NOT_CURRENT[original["resourceType"]]))
    return changed


def _inject(request: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    request = copy.deepcopy(request)
    counter = 0
    bundles = [
        v for v in request["prefetch"].values() if isinstance(v, dict) and isinstance(v.get("entry"), list)
    ]
    originals = [
        entry["resource"]
        for bundle in bundles
        for entry in bundle["entry"]
        if isinstance(entry, dict)
        and isinstance(entry.get("resource"), dict)
        and isinstance(entry["resource"].get("id"), str)
    ]
    for _ in range(data.draw(st.integers(0, 3)) if originals else 0):
        original = data.draw(st.sampled_from(originals))
        duplicate = _copy_of(original, data.draw(st.sampled_from(["bare", "subsetted", "status"])), data)
        bundle = data.draw(st.sampled_from(bundles))
        bundle["entry"].insert(data.draw(st.integers(0, len(bundle["entry"]))), {"resource": duplicate})
    for bundle in bundles:
        for entry in data.draw(st.lists(JUNK_ENTRY, max_size=4)):
            if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                counter += 1
                entry["resource"]["id"] = f"junk-{counter}"
            position = data.draw(st.integers(0, len(bundle["entry"])))
            bundle["entry"].insert(position, entry)
    return request


@PROPERTY
@given(st.sampled_from(CONTRAINDICATED), st.data())
def test_unrelated_or_malformed_resources_or_copies_never_remove_a_contraindication(name, data) -> None:
    before = _baseline(name)
    after = _alerts(_call(_inject(_base(name), data)))
    assert before <= after, f"{name}: lost {before - after}"


# ---- unit conversion


@PROPERTY
@given(
    st.sampled_from(sorted(ruleset().facts.labs)),
    st.floats(min_value=0.01, max_value=1e4, allow_nan=False),
    st.sampled_from([None, "<", "<=", ">", ">="]),
)
def test_unit_conversion_round_trips(lab_name, value, comparator) -> None:
    lab = ruleset().facts.labs[lab_name]
    for factor in set(lab.units.values()):
        reported = Interval.from_comparator(value, comparator)
        back = reported.scaled(factor).scaled(1 / factor)
        assert math.isclose(back.lo, reported.lo, rel_tol=1e-9) or back.lo == reported.lo
        assert math.isclose(back.hi, reported.hi, rel_tol=1e-9) or back.hi == reported.hi
        assert (back.lo_open, back.hi_open) == (reported.lo_open, reported.hi_open)
        # The rules use the converted value unrounded; the card shows it rounded to the lab's decimals (or
        # with more digits near a threshold): the error is at most half a unit of them.
        marks = next(lab.marks[unit] for unit, f in lab.units.items() if f == factor)
        for exact in (reported.lo * factor, reported.hi * factor):
            if not math.isinf(exact):
                shown = float(format_beside(exact, lab.decimals, marks).replace(",", ""))
                assert abs(shown - exact) <= 0.5 * 10**-lab.decimals + 1e-9


@PROPERTY
@given(
    st.sampled_from(["vitd", "calcium"]),
    st.floats(min_value=0.1, max_value=500, allow_nan=False).map(lambda v: round(v, 1)),
    st.sampled_from([None, "<", ">"]),
)
def test_a_result_in_another_unit_reads_as_its_canonical_value(lab_name, value, comparator) -> None:
    lab = ruleset().facts.labs[lab_name]
    floor = lab.plausible.above_by_kind.get("total", lab.plausible.above)
    assume(floor + 0.01 < value < lab.plausible.most)  # others are not used (see test_lab_reading)
    code = {"vitd": "62292-8", "calcium": "17861-6"}[lab_name]
    canonical = facts([_lab(code, value, lab.canonical_unit, comparator)])
    other_unit, factor = next((u, f) for u, f in lab.units.items() if f != 1.0)
    converted = facts([_lab(code, value / factor, other_unit, comparator)])
    got, want = getattr(converted, lab_name), getattr(canonical, lab_name)
    assert got is not None and want is not None
    assert abs(got.value.lo - want.value.lo) <= 10**-lab.decimals or got.value.lo == want.value.lo
    assert abs(got.value.hi - want.value.hi) <= 10**-lab.decimals or got.value.hi == want.value.hi
    assert (got.value.lo_open, got.value.hi_open) == (want.value.lo_open, want.value.hi_open)
    assert format_interval(got.value, lab.canonical_unit).split()[-1] == lab.canonical_unit.split()[-1]


def _lab(code: str, value: float, unit: str, comparator: str | None) -> dict[str, Any]:
    quantity: dict[str, Any] = {"value": value, "unit": unit, "code": unit}
    if comparator:
        quantity["comparator"] = comparator
    return {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "effectiveDateTime": "2026-11-01",
        "valueQuantity": quantity,
    }


# ---- every suggested resource is valid R4

VITD_VALUES = st.floats(min_value=1, max_value=250).map(lambda v: round(v, 1))
PATIENT_IDS = st.from_regex(r"\A[A-Za-z0-9\-.]{1,64}\Z")


@PROPERTY
@given(
    VITD_VALUES,
    st.lists(st.one_of(RESOURCE, MALFORMED_LAB), max_size=4),
    PATIENT_IDS,
    st.dates(min_value=date(2024, 1, 1), max_value=date(2030, 12, 31)),
    st.sampled_from(sorted(ruleset().profiles)),
)
def test_every_suggested_resource_is_valid_r4(vitd, others, patient, today, profile) -> None:
    resources = with_ids(
        [_lab("62292-8", vitd, "ng/mL", None) | {"effectiveDateTime": today.isoformat()}, *others]
    )
    rs = ruleset()
    evaluation = evaluate(rs, facts(resources, today), hook="patient-view", profile=profile)
    for card in build_cards(
        rs, evaluation, hook="patient-view", card_key=OFFLINE_CARD_KEY, patient_id=patient
    ):
        for suggestion in card.get("suggestions", []):
            assert suggestion["label"] and suggestion["uuid"]
            for action in suggestion["actions"]:
                resource = action.get("resource")
                if resource is None:
                    assert action["type"] == "delete" and action["resourceId"]
                    continue
                MODELS[resource["resourceType"]].model_validate(resource)
                assert fhirkit.validate(resource) == [], (card["source"]["topic"]["code"], resource)
                assert resource["subject"] == {"reference": f"Patient/{patient}"}


@pytest.mark.parametrize("name", CONTRAINDICATED)
def test_contraindication_fixtures_have_alerts_to_keep(name) -> None:
    assert _baseline(name)


def test_same_day_results_without_ids_do_not_depend_on_order() -> None:
    low = _lab("62292-8", 10, "ng/mL", None)
    high = _lab("62292-8", 80, "ng/mL", None)
    for resource in (low, high):
        del resource["id"]
    assert facts([low, high]) == facts([high, low])


def test_two_versions_with_one_id_do_not_depend_on_order() -> None:
    first = _lab("62292-8", 10, "ng/mL", None)
    second = _lab("62292-8", 80, "ng/mL", None)
    second["id"] = first["id"]
    assert facts([first, second]) == facts([second, first])


def test_later_time_on_the_same_day_wins() -> None:
    morning = _lab("62292-8", 10, "ng/mL", None)
    evening = _lab("62292-8", 80, "ng/mL", None)
    morning["effectiveDateTime"] = "2026-11-01T08:00:00+01:00"
    evening["effectiveDateTime"] = "2026-11-01T18:00:00Z"
    evening["id"] = "o2"
    for order in ([morning, evening], [evening, morning]):
        result = facts(order).vitd
        assert result is not None and result.value.lo == 80


# ---- a usable result always gets a band, and a card


# Without a Patient the age is unknown: a low value gets the card that shows it without a dose.
VITD_CARDS = {
    "vitd-deficient",
    "vitd-insufficient",
    "vitd-low-age-unknown",
    "vitd-target",
    "vitd-high",
    "vitd-very-high",
    "vitd-toxicity",
    "vitd-band-uncertain",
}
COMPARATORS = st.sampled_from([None, "<", "<=", ">", ">="])


@PROPERTY
@given(
    st.floats(min_value=0.1, max_value=999, allow_nan=False).map(lambda v: round(v, 2)),
    COMPARATORS,
    st.sampled_from(["ng/mL", "nmol/L"]),
    st.sampled_from(sorted(ruleset().profiles)),
)
@example(100, ">", "ng/mL", "seed")
@example(35, "<", "ng/mL", "seed")
@example(150, ">=", "ng/mL", "endocrine-2011")
@example(25, ">", "ng/mL", "seed")
def test_every_usable_vitd_result_gets_a_band_or_is_uncertain_and_a_card(
    value, comparator, unit, profile
) -> None:
    # In nmol/L the same numbers cover 0.04–400 ng/mL.
    lab = ruleset().facts.labs["vitd"]
    reading = Interval.from_comparator(value, comparator).scaled(lab.units[unit])
    assume(reading.le(lab.plausible.above) is not True)  # 1 ng/mL or less is not used (see test_lab_review)
    resources = [_lab("62292-8", value, unit, comparator) | {"effectiveDateTime": TODAY.isoformat()}]
    rs = ruleset()
    evaluation = evaluate(rs, facts(resources), hook="patient-view", profile=profile)
    assert evaluation.values["vitd.usable"] is True
    band = evaluation.values["vitd.band"]
    assert band in {b.id for b in rs.profiles[profile].bands} or (
        # Straddling the lowest band from above (`>25`): no band, never the lowest and its dose.
        band is None and comparator in (">", ">=") and evaluation.values["vitd.band_certain"] is False
    )
    cards = build_cards(rs, evaluation, hook="patient-view", card_key=OFFLINE_CARD_KEY, patient_id="p1")
    shown = [c for c in cards if c["source"]["topic"]["code"] in VITD_CARDS]
    assert shown, f"no 25(OH)D card for {comparator or ''}{value} {unit} ({profile})"
    reported = format_interval(Interval.from_comparator(value, comparator), unit, None)
    assert all(reported in c["detail"] for c in shown), reported


@PROPERTY
@given(st.floats(min_value=1, max_value=200, allow_nan=False).map(lambda v: round(v, 1)), COMPARATORS)
@example(60, ">")
@example(45, "<")
@example(30, "<")
@example(15, "<")
@example(90, ">")
@example(30, ">=")
def test_every_egfr_result_decides_the_kidney_check(value, comparator) -> None:
    resources = [_lab("98979-8", value, "mL/min/{1.73_m2}", comparator)]
    rs = ruleset()
    evaluation = evaluate(rs, facts(resources), hook="patient-view", profile=rs.default_profile)
    reading = Interval.from_comparator(value, comparator)
    band = evaluation.values["egfr.lowest_band"]
    assert band in {"G1", "G2", "G3a", "G3b", "G4", "G5"}
    # A category only when certain (`<30` is G4 or G5: none, never "G5").
    certain = reading.is_exact or reading.lt(15) is True or reading.ge(90) is True
    assert evaluation.values["egfr.band"] == (band if certain else None)
    # A value that may be below 30 may be in G4 or G5: the caution shows.
    below_30 = band in ("G4", "G5")
    assert below_30 == (reading.lt(30) is not False)
    topics = topics_of(
        build_cards(rs, evaluation, hook="patient-view", card_key=OFFLINE_CARD_KEY, patient_id="p1")
    )
    kidney = "kidney-advanced" in topics or "kidney-possible" in topics
    assert kidney == below_30
    if reading.ge(30) is True:
        assert not kidney, "a value certainly at or above 30 (such as >60) is not < 30"
    # Certainly below 30 (`<30` too): CKD 4–5 said; only possibly below (`<45`): "may be below 30" said.
    assert ("kidney-advanced" in topics) == (reading.lt(30) is True)
    assert ("kidney-possible" in topics) == (reading.lt(30) is None)


@PROPERTY
@given(st.floats(min_value=2, max_value=25, allow_nan=False).map(lambda v: round(v, 2)), COMPARATORS)
@example(10.5, ">")
@example(11, "<")
def test_every_calcium_result_decides_whether_it_is_high(value, comparator) -> None:
    reading, plausible = (
        Interval.from_comparator(value, comparator),
        ruleset().facts.labs["calcium"].plausible,
    )
    # Certainly outside 3–25 mg/dL (total) is not used at all (named on the data card; see test_lab_reading).
    floor = plausible.above_by_kind["total"]
    assume(reading.le(floor) is not True and reading.gt(plausible.most) is not True)
    resources = [_lab("17861-6", value, "mg/dL", comparator)]
    rs = ruleset()
    evaluation = evaluate(rs, facts(resources), hook="patient-view", profile=rs.default_profile)
    high = evaluation.values["calcium.high"]
    assert high is (Interval.from_comparator(value, comparator).gt(10.5) is True)
    cards = build_cards(rs, evaluation, hook="patient-view", card_key=OFFLINE_CARD_KEY, patient_id="p1")
    assert ("hypercalcemia" in topics_of(cards)) == high


def topics_of(cards: list[dict[str, Any]]) -> set[str]:
    return {c["source"]["topic"]["code"] for c in cards}
