"""Facts read in two stages (every result triaged, only the newest read in full): the same Facts as
reading every result in full — unreadable old results, ties, fallbacks, fractions, duplicates."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import date
from types import MappingProxyType
from typing import Any

import pytest

import d3k2.core.facts as facts_module
from builders import TODAY, ruleset
from d3k2.core.calcium import calcium_high
from d3k2.core.facts import Facts, extract_facts
from d3k2.core.labs import Measurement
from d3k2.core.quantities import Interval
from d3k2.core.record import Evidence, MedicationFact, UnknownMedication
from d3k2.core.terminology import LOINC, spellings
from d3k2.service import facts_for

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
VITD, D3, D2 = "62292-8", "1989-3", "49054-0"
EGFR, LEGACY_EGFR, CALCIUM, IONIZED = "98979-8", "88294-4", "17861-6", "17863-2"


def obs(
    code: str,
    value: float | str,
    unit: str | None = "ng/mL",
    *,
    when: Any = "2026-11-01",
    oid: Any = "o1",
    status: str = "final",
    **extra: Any,
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "status": status,
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "effectiveDateTime": when,
    }
    if oid is not None:
        resource["id"] = oid
    if isinstance(value, str):
        resource["valueString"] = value
    else:
        resource["valueQuantity"] = {"value": value, "unit": unit}
    resource.update(extra)
    return resource


def facts(*resources: Any, today: date = TODAY) -> Facts:
    return facts_for(ruleset(), list(resources), today)


def vitd(
    value: Interval,
    reported: str,
    *,
    when: date = date(2026, 11, 1),
    source: str = "Observation/o1",
    code: str = VITD,
    status: str = "final",
    notes: tuple[str, ...] = (),
) -> Measurement:
    age = (TODAY - when).days
    return Measurement(
        "vitd", value, "ng/mL", reported, when, status, source, code, age > 365, age, notes, None
    )


def test_an_unreadable_old_result_is_reported_beside_the_newest() -> None:
    result = facts(
        obs(VITD, 20, "furlongs", when="2020-01-01", oid="old"),
        obs(VITD, 31, when="2026-11-01", oid="new"),
        obs(VITD, 40, when="2019-01-01T10:00:00Z", oid="older", valueString="x"),
        obs(VITD, 12, when="nope", oid="undated"),
    )
    assert result.vitd == vitd(Interval.exact(31), "31 ng/mL", source="Observation/new")
    assert result.issues == (
        "25(OH)D of 2020-01-01 (unit 'furlongs' not understood)",
        "a 25(OH)D result (no date)",
    )


@pytest.mark.parametrize(
    ("resource", "reason"),
    [
        (obs(VITD, True), "the value is not a number"),
        (obs(VITD, 10**400), "could not be read"),
        (
            obs(VITD, 5, valueQuantity={"value": 5, "unit": "ng/mL", "comparator": "~"}),
            "comparator '~' not understood",
        ),
        (obs(VITD, 5, valueQuantity={"value": 5, "comparator": "<"}), "the value has no unit"),
        (obs(VITD, "12 furlongs"), "unit 'furlongs' not understood"),
        # A code whose LOINC property names no unit (ionized calcium, "property not confirmed").
        (obs("12180-6", "4.5"), "the value has no unit"),
        (obs(VITD, 18, when="0001-01-01T00:00:00+01:00"), "could not be read"),
        (
            obs(VITD, 18, referenceRange=[{"high": {"value": 10**400, "unit": "ng/mL"}}]),
            "could not be read",
        ),
    ],
)
def test_unreadable_results_keep_their_reason(resource: dict[str, Any], reason: str) -> None:
    result = facts(resource)
    assert result.vitd is None and result.egfr is None
    assert len(result.issues) == 1 and result.issues[0].endswith(f" ({reason})"), result.issues
    assert "Observation/" not in result.issues[0]


def test_a_result_without_a_value_is_skipped_silently() -> None:
    absent = obs(VITD, 18, dataAbsentReason={"text": "not done"})
    del absent["valueQuantity"]
    assert facts(absent) == Facts(today=TODAY)


def test_the_newest_instant_wins_across_offsets_and_keeps_its_local_date() -> None:
    late_local = obs(VITD, 20, when="2026-11-01T23:30:00-05:00", oid="a")  # 04:30 UTC on 2 November
    early_utc = obs(VITD, 30, when="2026-11-02T01:00:00Z", oid="b")
    naive = obs(VITD, 40, when="2026-11-02T02:00:00", oid="c")  # no offset: as UTC
    assert facts(late_local, early_utc).vitd == vitd(Interval.exact(20), "20 ng/mL", source="Observation/a")
    assert facts(early_utc, naive, late_local).vitd == vitd(
        Interval.exact(20), "20 ng/mL", source="Observation/a"
    )
    assert facts(naive, early_utc).vitd == vitd(
        Interval.exact(40), "40 ng/mL", when=date(2026, 11, 2), source="Observation/c"
    )
    # A date alone is midnight UTC: a timed result the same day is newer.
    day_only = obs(VITD, 50, when="2026-11-02", oid="z")
    assert facts(day_only, early_utc).vitd == vitd(
        Interval.exact(30), "30 ng/mL", when=date(2026, 11, 2), source="Observation/b"
    )


def test_period_and_issued_dates_and_their_instants() -> None:
    by_period = obs(VITD, 20, oid="p", effectivePeriod={"end": "2026-11-03T10:00:00+01:00"})
    del by_period["effectiveDateTime"]
    by_issued = obs(VITD, 30, when="bad", oid="i", issued="2026-11-03T08:00:00Z")
    result = facts(by_period, by_issued)
    assert result.vitd == vitd(Interval.exact(20), "20 ng/mL", when=date(2026, 11, 3), source="Observation/p")


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0)])
def test_ties_are_broken_by_id_then_the_cautious_value_never_by_order(order: tuple[int, int, int]) -> None:
    same_time = "2026-11-01T08:00:00Z"
    tied = [
        obs(VITD, 20, when=same_time, oid=None),
        obs(VITD, 30, when=same_time, oid=None),
        obs(VITD, 25, when=same_time, oid="a(no id)"),
    ]
    result = facts(*(tied[i] for i in order))
    # "Observation/a(no id)" > "Observation/(no id)"; alone with its (time, id).
    assert result.vitd == vitd(Interval.exact(25), "25 ng/mL", source="Observation/a(no id)")
    # Results without an id at one moment, and copies of one record, disagree: the highest 25(OH)D, named.
    disagree = "copies of this result disagree, the most cautious is used: "
    no_ids = [tied[0], tied[1]]
    for resources in (no_ids, no_ids[::-1]):
        assert facts(*resources).vitd == vitd(
            Interval.exact(30),
            "30 ng/mL",
            source="Observation/(no id)",
            notes=(f"{disagree}30 ng/mL on 2026-11-01, 20 ng/mL on 2026-11-01",),
        )
    twins = [obs(VITD, 20, when=same_time, oid="x(no id)"), obs(VITD, 21, when=same_time, oid="x(no id)")]
    for resources in (twins, twins[::-1]):
        assert facts(*resources).vitd == vitd(
            Interval.exact(21),
            "21 ng/mL",
            source="Observation/x(no id)",
            notes=(f"{disagree}21 ng/mL on 2026-11-01, 20 ng/mL on 2026-11-01",),
        )
    # An id decides between results of the same time.
    assert facts(obs(VITD, 11, oid="b"), obs(VITD, 12, oid="a")).vitd == vitd(
        Interval.exact(11), "11 ng/mL", source="Observation/b"
    )


def test_preliminary_only_as_a_fallback_and_labelled() -> None:
    preliminary = obs(VITD, 50, when="2026-11-10", oid="p", status="preliminary")
    final = obs(VITD, 18, when="2026-10-01", oid="f")
    assert facts(preliminary, final).vitd == vitd(
        Interval.exact(18), "18 ng/mL", when=date(2026, 10, 1), source="Observation/f"
    )
    assert facts(preliminary, obs(VITD, 18, oid="x", status="cancelled")).vitd == vitd(
        Interval.exact(50),
        "50 ng/mL",
        when=date(2026, 11, 10),
        source="Observation/p",
        status="preliminary",
        notes=("preliminary result",),
    )


def test_d3_fraction_with_d2_on_a_date_without_a_total() -> None:
    d3 = obs(D3, 20, when="2026-11-05T09:00:00Z", oid="d3")
    d2_same_day = obs(D2, 12.5, "nmol/L", when="2026-11-05", oid="d2")
    d2_other_day = obs(D2, 9, when="2026-11-04", oid="d2-old")
    older_total = obs(VITD, 31, when="2026-11-01", oid="t")
    total_same_day_as_old_d3 = obs(VITD, 33, when="2026-10-01", oid="t2")
    old_d3 = obs(D3, 80, when="2026-10-01", oid="d3-old")
    result = facts(older_total, d2_other_day, d3, d2_same_day, total_same_day_as_old_d3, old_d3)
    assert result.vitd == vitd(
        Interval.exact(20 + 12.5 * 0.400641),  # unrounded: 25.0080125
        "20 ng/mL + D2 12.5 nmol/L",
        when=date(2026, 11, 5),
        source="Observation/d3",
        code=D3,
        notes=("sum of 25(OH)D3 and 25(OH)D2",),
    )
    d3_only = facts(older_total, d3, d2_other_day).vitd
    assert d3_only == vitd(
        Interval.exact(20),
        "20 ng/mL",
        when=date(2026, 11, 5),
        source="Observation/d3",
        code=D3,
        notes=("25(OH)D3 only; low unless the patient takes vitamin D2",),
    )
    # A total the same day as the newest D3 wins; an older D3 on a total's date never counts.
    total_that_day = obs(VITD, 31, when="2026-11-05", oid="t3")
    assert facts(d3, d2_same_day, total_that_day).vitd == vitd(
        Interval.exact(31), "31 ng/mL", when=date(2026, 11, 5), source="Observation/t3"
    )
    assert facts(total_same_day_as_old_d3, old_d3).vitd == vitd(
        Interval.exact(33), "33 ng/mL", when=date(2026, 10, 1), source="Observation/t2"
    )


def test_summed_fractions_keep_comparators() -> None:
    d3 = obs(D3, "<5", oid="d3")
    d2 = obs(D2, 4, oid="d2")
    d2["valueQuantity"]["comparator"] = ">"
    measured = facts(d3, d2).vitd
    assert measured is not None
    assert measured.value == Interval(-math.inf, math.inf, True, True)
    assert measured.reported == "<5 ng/mL + D2 >4 ng/mL"


def test_ionized_calcium_uses_a_usable_lab_range_else_the_default_and_the_newest_kind_wins() -> None:
    lab = ruleset().facts.labs["calcium"]
    no_range = obs(IONIZED, 5.6, "mg/dL", oid="none", when="2026-11-10")
    not_a_list = obs(IONIZED, 5.2, "mg/dL", oid="text", when="2026-11-09", referenceRange="4.5-5.3")
    unknown_unit = obs(
        IONIZED,
        5.6,
        "mg/dL",
        oid="unit",
        when="2026-11-08",
        referenceRange=[{"high": {"value": 5, "unit": "%"}}],
    )
    ranged = obs(
        IONIZED,
        1.4,
        "mmol/L",
        oid="ranged",
        when="2026-11-01",
        referenceRange=[{"low": {"value": 1.1}}, "x", {"high": {"value": 1.3, "code": "mmol/L"}}],
    )
    newest = facts(no_range, ranged, not_a_list, unknown_unit).calcium
    assert newest is not None and newest.source == "Observation/none" and newest.kind == "ionized"
    assert newest.upper_limit is None and calcium_high(newest, lab) is True  # above 1.32 mmol/L
    for unusable in (not_a_list, unknown_unit):
        read = facts(unusable).calcium
        assert read is not None and read.upper_limit is None
    assert calcium_high(facts(not_a_list).calcium, lab) is False
    assert facts(ranged).calcium == Measurement(
        "calcium",
        Interval.exact(1.4 * 4.008),
        "mg/dL",
        "1.4 mmol/L",
        date(2026, 11, 1),
        "final",
        "Observation/ranged",
        IONIZED,
        False,
        23,
        (),
        1.3 * 4.008,  # 1.3 mmol/L converted as a result is, unrounded
        "ionized",
    )
    # An older total calcium does not beat a newer ionized one; its own range is kept when it is newest.
    total = obs(
        CALCIUM,
        9.9,
        "mg/dL",
        oid="total",
        when="2025-01-01",
        referenceRange=[{"high": {"value": 10.2, "unit": "mg/dL"}}],
    )
    assert facts(ranged, total).calcium.source == "Observation/ranged"  # type: ignore[union-attr]
    measured = facts(total).calcium
    assert measured is not None and measured.kind == "total" and measured.upper_limit == 10.2
    assert measured.stale is True and measured.age_days == 692


def test_legacy_egfr_only_without_a_race_free_result() -> None:
    legacy = obs(LEGACY_EGFR, 25, "mL/min/1.73m2", oid="legacy", when="2026-11-10")
    assert facts(legacy).egfr == Measurement(
        "egfr",
        Interval.exact(25),
        "mL/min/1.73 m²",
        "25 mL/min/1.73 m²",
        date(2026, 11, 10),
        "final",
        "Observation/legacy",
        LEGACY_EGFR,
        False,
        14,
        ("legacy sex/race-specific equation",),
        None,
    )
    # An older race-free result never hides a newer legacy one; one of the same day does.
    free = obs(EGFR, 40, "mL/min/{1.73_m2}", oid="free", when="2026-01-01", status="preliminary")
    measured = facts(legacy, free).egfr
    assert measured is not None and measured.source == "Observation/legacy"
    free = obs(EGFR, 40, "mL/min/{1.73_m2}", oid="free", when="2026-11-10", status="preliminary")
    measured = facts(legacy, free).egfr
    assert measured is not None and measured.source == "Observation/free"
    assert measured.notes == ("preliminary result",)


def test_the_same_result_under_two_keys_counts_once_and_versions_never_depend_on_order() -> None:
    first = obs(VITD, "bad", oid="dup")
    copy = obs(VITD, "bad", oid="dup")
    assert facts(first, copy).issues == ("25(OH)D of 2026-11-01 (the value is not a number)",)
    version_a = obs(VITD, 20, oid="v")
    version_b = obs(VITD, 25, oid="v")
    for resources in ((version_a, version_b), (version_b, version_a), (version_a, version_b, version_a)):
        assert facts(*resources).vitd == vitd(
            Interval.exact(25),
            "25 ng/mL",
            source="Observation/v",
            notes=(
                "copies of this result disagree, the most cautious is used: 25 ng/mL on 2026-11-01, "
                "20 ng/mL on 2026-11-01",
            ),
        )


def test_type_and_id_are_one_reference_text() -> None:
    # "Observation/a" + "b" and "Observation" + "a/b" are both Observation/a/b: two copies of one record,
    # both read (neither has a version), and named as copies.
    odd = {"resourceType": "Observation/a", "id": "b", "status": "final"}
    real = obs(VITD, 20, oid="a/b")
    for resources in ((odd, real), (real, odd)):
        found = facts(*resources)
        assert found.vitd == vitd(Interval.exact(20), "20 ng/mL", source="Observation/a/b")
        assert found.copies == ("Observation/a/b",)
    untyped = {"id": "a/b", "resourceType": 5}
    typed = {"id": "a/b", "resourceType": "Resource"}
    assert facts(untyped, typed, real).vitd == vitd(Interval.exact(20), "20 ng/mL", source="Observation/a/b")


def test_codings_other_than_loinc_and_odd_codings_are_passed_over() -> None:
    resource = obs(VITD, 20)
    resource["code"]["coding"] = [
        "text",
        {"system": LOINC},
        {"system": "http://snomed.info/sct", "code": "1989-3"},
        {"system": 5, "code": EGFR},
        {"system": "urn:oid:2.16.840.1.113883.6.1", "code": VITD},
    ]
    assert facts(resource).vitd == vitd(Interval.exact(20), "20 ng/mL")
    resource["code"]["coding"] = [{"code": VITD}]
    assert facts(resource).vitd is None


def test_loinc_spellings() -> None:
    assert spellings(LOINC) == {LOINC, "http://loinc.org/", "urn:oid:2.16.840.1.113883.6.1"}
    assert spellings("http://loinc.org/") == frozenset()


def test_mappings_other_than_dicts_read_alike() -> None:
    resource = obs(VITD, 20, referenceRange=[{"high": {"value": 40, "unit": "ng/mL"}}])
    resource["code"] = MappingProxyType({"coding": [MappingProxyType({"system": LOINC, "code": VITD})]})
    resource["valueQuantity"] = MappingProxyType({"value": 20, "code": "ng/mL"})
    expected = vitd(Interval.exact(20), "20 ng/mL")
    assert facts(MappingProxyType(resource)).vitd == Measurement(**{**expected.__dict__, "upper_limit": 40.0})


def test_what_code_lists_mean_is_remembered_boundedly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(facts_module, "MAX_ROLES", 1)
    total, d3 = obs(VITD, 20, oid="t"), obs(D3, 30, oid="d3", when="2026-11-02")
    # Code lists no other test sends: each is looked up here first.
    total["code"]["coding"].append({"system": LOINC, "code": "bounded-1"})
    d3["code"]["coding"].insert(0, {"system": LOINC, "code": "bounded-2"})
    expected = vitd(
        Interval.exact(30),
        "30 ng/mL",
        when=date(2026, 11, 2),
        source="Observation/d3",
        code=D3,
        notes=("25(OH)D3 only; low unless the patient takes vitamin D2",),
    )
    for _ in range(2):
        assert facts(total, d3).vitd == expected
        assert facts(d3, total).vitd == expected


def test_rule_sets_are_remembered_boundedly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(facts_module, "LOOKUPS", {})
    monkeypatch.setattr(facts_module, "MAX_LOOKUPS", 1)
    rs = ruleset()
    resource = obs(VITD, 20)
    for config in (rs.facts, replace(rs.facts, accepted_status=("amended",)), rs.facts):
        found = extract_facts(
            [resource], today=TODAY, config=config, terminology=rs.terminology, classify=lambda _c: ()
        )
        assert (found.vitd is not None) is (config is rs.facts)
        assert len(facts_module.LOOKUPS) == 1


def test_medication_references_resolve_from_one_index() -> None:
    warfarin = {
        "resourceType": "Medication",
        "id": "w",
        "code": {"coding": [{"system": RXNORM, "code": "855332"}]},
    }
    requests = [
        {
            "resourceType": "MedicationRequest",
            "id": f"r{i}",
            "status": "active",
            "medicationReference": {"reference": f"http://ehr/fhir/Medication/{target}"},
        }
        for i, target in enumerate(("w", "w", "gone"))
    ]
    result = facts({"resourceType": "Medication", "id": 7}, warfarin, *requests)
    assert [(m.category, m.source) for m in result.medications] == [
        ("vka", "MedicationRequest/r0"),
        ("vka", "MedicationRequest/r1"),
    ]
    assert result.unknown_medications == (
        UnknownMedication("", "medication not found", "MedicationRequest/r2"),
    )


def test_everything_at_once_is_exact() -> None:
    resources = [
        obs(VITD, 45, "nmol/L", oid="v", when="2025-11-01T10:00:00+02:00"),
        obs(EGFR, 58, "mL/min/{1.73_m2}", oid="e", when="2026-11-20T07:00:00Z"),
        obs(CALCIUM, 2.7, "mmol/L", oid="c", when="2026-11-20T07:00:00Z"),
        obs("82810-3", 0, oid="preg", valueCodeableConcept={"coding": [{"code": "LA15173-0"}]}),
        {
            "resourceType": "Condition",
            "id": "sarc",
            "code": {
                "coding": [{"system": "http://snomed.info/sct", "code": "31541009"}],
                "text": "Sarcoidosis",
            },
            "onsetDateTime": "2019-03-01",
        },
        {
            "resourceType": "MedicationStatement",
            "id": "m",
            "status": "active",
            "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "855332"}]},
        },
    ]
    result = facts(*resources)
    assert result == Facts(
        today=TODAY,
        vitd=Measurement(
            "vitd",
            Interval.exact(45 * 0.400641),  # 18.028845: the rules decide on it unrounded
            "ng/mL",
            "45 nmol/L",
            date(2025, 11, 1),
            "final",
            "Observation/v",
            VITD,
            True,
            388,
            (),
            None,
        ),
        egfr=Measurement(
            "egfr",
            Interval.exact(58),
            "mL/min/1.73 m²",
            "58 mL/min/1.73 m²",
            date(2026, 11, 20),
            "final",
            "Observation/e",
            EGFR,
            False,
            4,
            (),
            None,
        ),
        calcium=Measurement(
            "calcium",
            Interval.exact(2.7 * 4.008),
            "mg/dL",
            "2.7 mmol/L",
            date(2026, 11, 20),
            "final",
            "Observation/c",
            CALCIUM,
            False,
            4,
            (),
            None,
            "total",
        ),
        pregnancy=(
            Evidence("pregnancy", "pregnancy status: pregnant", "Observation/preg", date(2026, 11, 1)),
        ),
        conditions={
            "sarcoidosis": (Evidence("sarcoidosis", "Sarcoidosis", "Condition/sarc", date(2019, 3, 1)),)
        },
        medications=(MedicationFact("vka", "warfarin", "active", "MedicationStatement/m", "code"),),
    )
