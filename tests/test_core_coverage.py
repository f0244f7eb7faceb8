"""Targeted behaviour tests for branches of the pure core the fixtures and property tests do not reach."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from d3k2.cards import medication_request
from d3k2.engine import evaluate_condition
from d3k2.errors import RuleSetError
from d3k2.facts import calcium_high, describe_limit
from d3k2.quantities import Interval, format_interval
from d3k2.ruleset import AllOf, Coding, FactTest, Product
from d3k2.service import facts_for
from d3k2.terminology import ICD10CM, any_in, load_terminology
from support import TODAY, ruleset

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"


def obs(code: str, oid: str = "o1", **fields: Any) -> dict[str, Any]:
    resource = {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "effectiveDateTime": "2026-11-01",
    }
    return resource | fields


def facts(*resources: Any):
    return facts_for(ruleset(), list(resources), TODAY)


# ---------------------------------------------------------------- quantities


def test_an_unknown_comparator_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown comparator"):
        Interval.from_comparator(5, "~")


def test_le_cannot_tell_when_the_interval_straddles() -> None:
    assert Interval(1, 10).le(5) is None
    assert Interval(5, 10, lo_open=True).le(5) is False


def test_a_bounded_range_is_formatted_with_a_dash() -> None:
    assert format_interval(Interval(1, 2.5), "ng/mL") == "1–2.5 ng/mL"


# ---------------------------------------------------------------- cards


def test_medication_request_without_dosage_or_patient_instruction() -> None:
    product = Product(
        kind="medication",
        code=Coding(system="http://www.nlm.nih.gov/research/umls/rxnorm", code="316965", display="D3"),
        text="Cholecalciferol 1000 UNT Oral Tablet",
        dose_text="as directed",
    )
    resource = medication_request(product, "p1")
    assert resource["dosageInstruction"] == [{"text": "Cholecalciferol 1000 UNT Oral Tablet: as directed"}]


# ---------------------------------------------------------------- engine: the condition language


def _eval(test: dict[str, Any], value: Any) -> bool | None:
    return evaluate_condition(FactTest.model_validate({"fact": "f", **test}), {"f": value}, {}, [])


@pytest.mark.parametrize(
    ("test", "value", "expected"),
    [
        ({"eq": 5.0}, Interval.exact(5), True),
        ({"eq": 5.0}, Interval.exact(6), False),
        ({"eq": 5.0}, Interval(-math.inf, 5, True, False), None),
        ({"in": ["a"]}, Interval.exact(5), False),
        ({"ne": "x"}, "y", True),
        ({"ne": "x"}, "x", False),
        ({"lt": 3.0}, 2.0, True),
        ({"le": 3.0}, 3.0, True),
        ({"gt": 3.0}, 3.0, False),
        ({"ge": 3.0}, 3.0, True),
        ({"in": ["a"]}, 3.0, False),
        ({"lt": 3.0}, "text", False),
    ],
)
def test_fact_tests_on_intervals_strings_and_plain_numbers(test, value, expected) -> None:
    assert _eval(test, value) is expected


def test_an_unknown_condition_type_is_a_bug() -> None:
    with pytest.raises(TypeError, match="unknown condition"):
        evaluate_condition(object(), {}, {}, [])  # type: ignore[arg-type]


def test_all_of_with_an_undecided_part_cannot_tell() -> None:
    condition = AllOf.model_validate({"all": [{"fact": "a", "eq": True}, {"fact": "b", "lt": 5.0}]})
    assert evaluate_condition(condition, {"a": True, "b": Interval(1, 10)}, {}, []) is None


# ---------------------------------------------------------------- facts: unreadable results are named


@pytest.mark.parametrize(
    ("resource", "issue"),
    [
        (obs("62292-8", valueQuantity={"value": 5}), "valueQuantity has no unit"),
        (obs("62292-8", valueString="positive"), "valueString is not a number"),
        (obs("33914-3", valueString="45"), "valueString has no unit"),
        (obs("62292-8", valueQuantity={"value": 5, "unit": "ng/mL", "comparator": "~"}), "comparator '~'"),
    ],
)
def test_unreadable_results_are_reported(resource, issue) -> None:
    result = facts(resource)
    assert result.vitd is None and result.egfr is None
    assert any(issue in i for i in result.issues), result.issues


def test_data_absent_without_a_value_is_skipped_silently() -> None:
    result = facts(obs("62292-8", dataAbsentReason={"text": "not done"}))
    assert result.vitd is None and result.issues == ()


def test_a_reference_range_in_an_unknown_unit_is_not_the_limit() -> None:
    calcium = facts(
        obs(
            "17861-6",
            valueQuantity={"value": 10.4, "unit": "mg/dL"},
            referenceRange=[
                {"high": {"value": 9, "unit": "furlongs"}},
                {"high": {"value": 10.2, "unit": "mg/dL"}},
            ],
        )
    ).calcium
    assert calcium is not None and calcium.upper_limit == 10.2


def test_pregnancy_status_needs_an_accepted_status_and_a_coded_answer() -> None:
    code = "82810-3"
    pregnant = {"coding": [{"system": LOINC, "code": "LA15173-0"}]}
    assert facts(obs(code, valueCodeableConcept=pregnant)).pregnancy
    assert not facts(obs(code, status="registered", valueCodeableConcept=pregnant)).pregnancy
    assert not facts(obs(code, valueCodeableConcept={"text": "pregnant"})).pregnancy


def test_condition_status_codings_without_codes_do_not_deactivate() -> None:
    condition = {
        "resourceType": "Condition",
        "id": "c1",
        "clinicalStatus": {"coding": [{"display": "active"}, "junk"]},
        "verificationStatus": {"coding": "junk"},
        "code": {"coding": [{"system": SNOMED, "code": "31541009"}]},
    }
    assert facts(condition).conditions.get("sarcoidosis")


def test_a_contained_reference_that_is_not_there_is_named() -> None:
    statement = {
        "resourceType": "MedicationStatement",
        "id": "m1",
        "status": "active",
        "contained": [{"resourceType": "Medication", "id": "other"}],
        "medicationReference": {"reference": "#warfarin"},
    }
    result = facts(statement)
    assert not result.medications
    assert any("could not be resolved" in i for i in result.issues)


def test_calcium_without_any_limit_cannot_be_judged() -> None:
    lab = ruleset().facts.labs["calcium"]
    calcium = facts(obs("17861-6", valueQuantity={"value": 10.4, "unit": "mg/dL"})).calcium
    assert calcium is not None
    assert calcium_high(None, lab) is None
    no_default = type(lab)(**{**lab.__dict__, "default_upper_limit": None})
    assert calcium_high(calcium, no_default) is None
    assert describe_limit(calcium, lab) == "10.5 mg/dL (default limit)"


# ---------------------------------------------------------------- terminology


def _valueset(directory: Path, doc: Any, name: str = "vs") -> Path:
    directory.mkdir(exist_ok=True)
    (directory / f"{name}.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return directory


def _vs(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "resourceType": "ValueSet",
        "id": "vs",
        "compose": {"include": [{"system": LOINC, "concept": [{"code": "1-8"}]}]},
    }
    return doc | changes


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("{not json", "not readable JSON"),
        ({"resourceType": "CodeSystem"}, "must be ValueSet"),
        (_vs(id="other"), "id: must equal the file name"),
        (_vs(compose={"include": {}}), "compose.include: must be a list"),
        (_vs(compose={"include": [{"concept": []}]}), "compose.include[0].system: missing"),
        (_vs(compose={"include": [{"system": LOINC, "concept": [{}]}]}), "concept[0].code: missing"),
        (
            _vs(compose={"include": [{"system": LOINC, "filter": [{"op": "=", "value": "x"}]}]}),
            "only is-a filters",
        ),
        (
            _vs(compose={"include": [{"system": LOINC, "filter": [{"op": "is-a", "value": "x"}]}]}),
            "ICD-10-CM only",
        ),
    ],
)
def test_broken_value_sets_are_named(tmp_path, doc, message) -> None:
    with pytest.raises(RuleSetError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_terminology(_valueset(tmp_path / "valuesets", doc))


def test_value_set_directory_must_exist_and_hold_value_sets(tmp_path) -> None:
    with pytest.raises(RuleSetError, match="does not exist"):
        load_terminology(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuleSetError, match="no value sets"):
        load_terminology(tmp_path / "empty")


def test_icd10_is_a_prefixes_and_codings_that_are_not_objects(tmp_path) -> None:
    doc = _vs(
        compose={
            "include": [
                {"system": ICD10CM, "filter": [{"op": "is-a", "property": "concept", "value": "D86"}]}
            ]
        }
    )
    terminology = load_terminology(_valueset(tmp_path / "valuesets", doc))
    assert terminology.concepts(ICD10CM, "D86.0") == {"vs"}
    assert terminology.concepts(ICD10CM, "E11") == frozenset()
    assert terminology.concepts_of({"coding": ["D86", {"system": ICD10CM, "code": "D86.9"}]}) == {"vs"}
    assert any_in(["a", "vs"], ["vs"]) and not any_in(["a"], ["vs"])


def test_a_known_unit_text_is_used_when_the_code_is_not_known() -> None:
    vitd = facts(obs("62292-8", valueQuantity={"value": 18, "code": "ng/mL{x}", "unit": "ng/mL"})).vitd
    assert vitd is not None and vitd.value == Interval.exact(18)


def test_a_local_reference_without_contained_resources_falls_back_to_its_display() -> None:
    statement = {
        "resourceType": "MedicationStatement",
        "id": "m1",
        "status": "active",
        "medicationReference": {"reference": "#warfarin", "display": "warfarin 5 mg"},
    }
    assert [m.category for m in facts(statement).medications] == ["vka"]


def test_concepts_without_display_load(tmp_path) -> None:
    doc = _vs(
        compose={
            "include": [{"system": LOINC, "concept": [{"code": "1-8"}, {"code": "2-6", "display": "x"}]}]
        }
    )
    terminology = load_terminology(_valueset(tmp_path / "valuesets", doc))
    assert terminology.display(LOINC, "1-8") is None and terminology.display(LOINC, "2-6") == "x"
