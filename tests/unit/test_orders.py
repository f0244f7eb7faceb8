"""d3k2.core.drafts, dosage, medications, catalog: lenient reading of draftOrders and the daily-dose
arithmetic, against the real cards/."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest

from builders import SANDBOX
from d3k2.config import default_cards_dir
from d3k2.core.catalog import MedicationCatalog, load_medication_catalog
from d3k2.core.dosage import IngredientDose
from d3k2.core.drafts import DraftOrder, DraftReading, read_draft_orders
from d3k2.core.errors import RuleSetError
from d3k2.core.medication_reader import MedicationReader
from d3k2.core.medications import classify_medication, medication_codeable
from d3k2.core.terminology import RXNORM, UCUM, Terminology, load_terminology
from d3k2.core.texts import load_texts

CARDS = default_cards_dir()

# cards/texts.toml [dosage]: the words of the arithmetic and of every reason a dose is unknown.
WORDS = load_texts(CARDS / "texts.toml").dosage


def reader(terminology: Terminology, catalog: MedicationCatalog) -> MedicationReader:
    return MedicationReader(terminology, catalog, WORDS, maxsize=0)


COMBO = "Cholecalciferol 1000 UNT / Vitamin K 2 0.09 MG Disintegrating Oral Tablet"


@pytest.fixture(scope="module")
def terminology() -> Terminology:
    return load_terminology(CARDS / "valuesets")


@pytest.fixture(scope="module")
def catalog(terminology: Terminology) -> MedicationCatalog:
    return load_medication_catalog(CARDS / "medications.toml", terminology)


def sandbox_context(name: str) -> dict[str, Any]:
    context: dict[str, Any] = json.loads((SANDBOX / f"{name}.request.json").read_text(encoding="utf-8"))[
        "context"
    ]
    return context


def rx(code: str, display: str | None = None) -> dict[str, Any]:
    coding: dict[str, Any] = {"system": RXNORM, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding], **({"text": display} if display else {})}


def dosage(
    value: Any = 1, code: Any = "{pill}", frequency: Any = 1, period: Any = 1, unit: Any = "d"
) -> dict[str, Any]:
    return {
        "timing": {"repeat": {"frequency": frequency, "period": period, "periodUnit": unit}},
        "doseAndRate": [{"doseQuantity": {"value": value, "system": UCUM, "code": code}}],
    }


def request(medication: dict[str, Any] | None, *dosages: dict[str, Any], rid: str = "r1") -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "id": rid,
        "status": "draft",
        "intent": "order",
    }
    if medication is not None:
        resource["medicationCodeableConcept"] = medication
    if dosages:
        resource["dosageInstruction"] = list(dosages)
    return resource


def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "entry": [{"resource": r} for r in resources]}


def read_one(
    resource: dict[str, Any], terminology: Terminology, catalog: MedicationCatalog
) -> tuple[IngredientDose, ...]:
    reading = read_draft_orders(bundle(resource), None, reader(terminology, catalog))
    assert len(reading.orders) == 1
    return reading.orders[0].ingredients


def only(ingredients: tuple[IngredientDose, ...]) -> IngredientDose:
    assert len(ingredients) == 1, ingredients
    return ingredients[0]


# --- the recorded sandbox requests ---------------------------------------------------------------------


def test_sandbox_recordings_are_present() -> None:
    assert sorted(p.name for p in SANDBOX.glob("order-*.request.json")) == [
        "order-select.after-suggestion.request.json",
        "order-select.invalid-date.request.json",
        "order-select.no-medication.request.json",
        "order-select.request.json",
        "order-sign.after-suggestion.request.json",
        "order-sign.request.json",
    ]


@pytest.mark.parametrize("name", ["order-select", "order-sign", "order-select.invalid-date"])
def test_sandbox_combination_tablet(name: str, terminology: Terminology, catalog: MedicationCatalog) -> None:
    context = sandbox_context(name)
    reading = read_draft_orders(
        context["draftOrders"], context.get("selections"), reader(terminology, catalog)
    )
    assert reading.skipped == ()
    (order,) = reading.orders
    assert (order.reference, order.rxnorm_code, order.medication_text) == (
        "MedicationRequest/request-123",
        "804617",
        COMBO,
    )
    d3, k2 = order.ingredients
    assert (d3.concept, d3.name, d3.strength, d3.unit, d3.daily, d3.weekly) == (
        "vitamin-d",
        "cholecalciferol",
        1000,
        "IU",
        4000,
        28000,
    )
    assert d3.arithmetic == "4,000 IU/day: 2 tablets of 1,000 IU twice daily"
    # 2 tablets x 90 mcg x twice daily: the same regimen that gives 4,000 IU of D3.
    assert (k2.concept, k2.name, k2.strength, k2.unit, k2.daily) == (
        "vitamin-k2",
        "vitamin K2",
        90,
        "mcg",
        360,
    )
    assert k2.arithmetic == "360 mcg/day: 2 tablets of 90 mcg twice daily"
    assert {d3.basis, k2.basis} == {"structured"}
    assert {d3.matched_by, k2.matched_by} == {"code"}


def test_sandbox_invalid_date_reads_like_the_final_draft(
    terminology: Terminology, catalog: MedicationCatalog
) -> None:
    def read(name: str) -> DraftOrder:
        context = sandbox_context(name)
        return read_draft_orders(
            context["draftOrders"], context["selections"], reader(terminology, catalog)
        ).orders[0]

    typing, final = read("order-select.invalid-date"), read("order-select")
    assert typing.ingredients == final.ingredients
    assert typing.problems == ("boundsPeriod.start 'Invalid date' ignored",)
    assert final.problems == ()


def test_sandbox_draft_without_medication(terminology: Terminology, catalog: MedicationCatalog) -> None:
    context = sandbox_context("order-select.no-medication")
    reading = read_draft_orders(context["draftOrders"], context["selections"], reader(terminology, catalog))
    (order,) = reading.orders
    assert order.ingredients == ()
    assert order.problems == ("no medication",)
    assert (order.medication_text, order.rxnorm_code) == (None, None)


@pytest.mark.parametrize("name", ["order-select.after-suggestion", "order-sign.after-suggestion"])
def test_sandbox_after_suggestion(name: str, terminology: Terminology, catalog: MedicationCatalog) -> None:
    context = sandbox_context(name)
    reading = read_draft_orders(
        context["draftOrders"], context.get("selections"), reader(terminology, catalog)
    )
    (order,) = reading.orders
    assert order.rxnorm_code == "801663"
    d3 = only(order.ingredients)
    assert (d3.concept, d3.strength, d3.daily) == ("vitamin-d", 2000, 8000)
    assert d3.arithmetic == "8,000 IU/day: 2 tablets of 2,000 IU twice daily"


def test_strictly_valid_r4_reads_like_the_sandbox_shape(
    terminology: Terminology, catalog: MedicationCatalog
) -> None:
    context = sandbox_context("order-select")
    valid = copy.deepcopy(context["draftOrders"])
    valid["type"] = "collection"
    entry = valid["entry"][0]
    entry["fullUrl"] = "urn:uuid:6f1c1b0e-0d0a-4a53-9f39-2f1b3c3b9b1e"
    entry["resource"]["category"] = [entry["resource"]["category"]]
    entry["resource"]["reasonCode"] = [entry["resource"]["reasonCode"]]
    as_sent = read_draft_orders(context["draftOrders"], context["selections"], reader(terminology, catalog))
    as_valid = read_draft_orders(valid, context["selections"], reader(terminology, catalog))
    assert as_valid == as_sent


def test_plain_list_of_resources(terminology: Terminology, catalog: MedicationCatalog) -> None:
    resource = sandbox_context("order-sign")["draftOrders"]["entry"][0]["resource"]
    from_list = read_draft_orders([resource], None, reader(terminology, catalog))
    from_bundle = read_draft_orders(bundle(resource), None, reader(terminology, catalog))
    assert from_list == from_bundle
    assert len(from_list.orders[0].ingredients) == 2


# --- dose arithmetic --------------------------------------------------------------------------------


def test_strength_times_count_times_frequency(terminology: Terminology, catalog: MedicationCatalog) -> None:
    d3 = only(read_one(request(rx("857466"), dosage(3, "{capsule}", frequency=1)), terminology, catalog))
    # 857466 is a tablet: the product's dose form names the unit, whatever count unit the EHR used.
    assert (d3.strength, d3.daily) == (5000, 15000)
    assert d3.arithmetic == "15,000 IU/day: 3 tablets of 5,000 IU once daily"


def test_weekly_schedule(terminology: Terminology, catalog: MedicationCatalog) -> None:
    d3 = only(read_one(request(rx("705728"), dosage(1, "{capsule}", unit="wk")), terminology, catalog))
    assert d3.weekly == 50000
    assert d3.daily == pytest.approx(7142.857, abs=0.001)
    assert d3.arithmetic == "50,000 IU/week: 1 capsule of 50,000 IU once weekly"


def test_every_n_days_with_a_fraction(terminology: Terminology, catalog: MedicationCatalog) -> None:
    d3 = only(read_one(request(rx("199362"), dosage(1, "tablet", period=3)), terminology, catalog))
    assert d3.daily == pytest.approx(333.333, abs=0.001)
    assert d3.arithmetic == "333.33 IU/day: 1 tablet of 1,000 IU every 3 days"


@pytest.mark.parametrize(
    ("value", "code", "unit", "daily", "arithmetic"),
    [
        (50, "ug", "d", 2000, "2,000 IU/day: 50 ug (2,000 IU) once daily"),
        (50, "mcg", "d", 2000, "2,000 IU/day: 50 mcg (2,000 IU) once daily"),
        (1.25, "mg", "wk", 50000 / 7, "50,000 IU/week: 1.25 mg (50,000 IU) once weekly"),
        (5000, "[iU]", "d", 5000, "5,000 IU/day: 5,000 IU once daily"),
    ],
)
def test_dose_quantity_in_an_amount_unit(
    value: float,
    code: str,
    unit: str,
    daily: float,
    arithmetic: str,
    terminology: Terminology,
    catalog: MedicationCatalog,
) -> None:
    d3 = only(read_one(request(rx("801663"), dosage(value, code, unit=unit)), terminology, catalog))
    assert d3.daily == pytest.approx(daily)
    assert d3.arithmetic == arithmetic.replace("ug (", "mcg (")
    assert d3.basis == "structured"


def test_dose_in_iu_for_a_combination_applies_to_vitamin_d_only(
    terminology: Terminology, catalog: MedicationCatalog
) -> None:
    d3, k2 = read_one(request(rx("804617"), dosage(2000, "[IU]")), terminology, catalog)
    assert d3.daily == 2000
    assert k2.daily is None
    assert k2.arithmetic == "dose unknown: unit 'IU' not understood for vitamin K2"
    assert k2.basis == "unknown"


def test_mass_dose_for_a_combination_is_not_split(
    terminology: Terminology, catalog: MedicationCatalog
) -> None:
    ingredients = read_one(request(rx("804617"), dosage(100, "ug")), terminology, catalog)
    assert [i.daily for i in ingredients] == [None, None]
    assert "cannot be split" in ingredients[0].arithmetic


@pytest.mark.parametrize(
    ("text", "product", "daily", "arithmetic"),
    [
        ("2 tablets twice daily", "801663", 8000, "8,000 IU/day: 2 tablets of 2,000 IU twice daily"),
        ("50,000 IU once weekly", "705728", 50000 / 7, "50,000 IU/week: 50,000 IU once weekly"),
        ("1 capsule daily", "705728", 50000, "50,000 IU/day: 1 capsule of 50,000 IU once daily"),
        ("take 5000 IU every day", "801663", 5000, "5,000 IU/day: 5,000 IU once daily"),
        (
            "Take one tablet by mouth every other day",
            "801663",
            1000,
            "1,000 IU/day: 1 tablet of 2,000 IU every 2 days",
        ),
        ("1 tab PO BID with food", "801663", 4000, "4,000 IU/day: 1 tablet of 2,000 IU twice daily"),
        ("1 tablet every 8 hours", "801663", 6000, "6,000 IU/day: 1 tablet of 2,000 IU every 8 hours"),
        (
            "2 tablets 3 times a day",
            "801663",
            12000,
            "12,000 IU/day: 2 tablets of 2,000 IU three times daily",
        ),
    ],
)
def test_text_only_dosage(
    text: str,
    product: str,
    daily: float,
    arithmetic: str,
    terminology: Terminology,
    catalog: MedicationCatalog,
) -> None:
    d3 = only(read_one(request(rx(product), {"text": text}), terminology, catalog))
    assert d3.daily == pytest.approx(daily)
    assert d3.arithmetic == arithmetic
    assert d3.basis == "text"


def test_text_fills_in_what_the_structure_lacks(terminology: Terminology, catalog: MedicationCatalog) -> None:
    coded_dose = {"doseAndRate": [{"doseQuantity": {"value": 1, "unit": "tablet"}}], "text": "twice daily"}
    d3 = only(read_one(request(rx("801663"), coded_dose), terminology, catalog))
    assert (d3.daily, d3.basis) == (4000, "text")


@pytest.mark.parametrize(
    ("dose", "arithmetic"),
    [
        ({"text": "inhale 2 puffs daily"}, "dose unknown: unit 'puffs' not understood"),
        (dosage(2, "puff"), "dose unknown: unit 'puff' not understood"),
        ({"text": "as directed"}, "dose unknown: no dose found in dosage text"),
        ({"text": "2 tablets sometimes"}, "dose unknown: frequency not understood in dosage text"),
        (dosage(1, "tablet", unit="min"), "dose unknown: period unit 'min' not understood"),
        (
            {"timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}}},
            "dose unknown: no dose quantity",
        ),
        ({"doseAndRate": [{"doseQuantity": {"value": 1, "code": "{pill}"}}]}, "dose unknown: no timing"),
        (
            {"doseAndRate": [{"doseQuantity": {"value": 1}}], "timing": {"code": {"text": "BID"}}},
            "dose unknown: dose quantity has no unit",
        ),
    ],
)
def test_dose_unknown(
    dose: dict[str, Any], arithmetic: str, terminology: Terminology, catalog: MedicationCatalog
) -> None:
    d3 = only(read_one(request(rx("801663"), dose), terminology, catalog))
    assert (d3.daily, d3.weekly, d3.basis) == (None, None, "unknown")
    assert d3.arithmetic == arithmetic
    assert d3.strength == 2000


def test_no_dosage_instruction(terminology: Terminology, catalog: MedicationCatalog) -> None:
    d3 = only(read_one(request(rx("801663")), terminology, catalog))
    assert (d3.daily, d3.arithmetic) == (None, "dose unknown: no dosage instruction")


def test_strength_unknown_with_a_count_dose(terminology: Terminology, catalog: MedicationCatalog) -> None:
    vitamin_d = only(read_one(request(rx("11253"), dosage(1)), terminology, catalog))
    assert (vitamin_d.concept, vitamin_d.strength, vitamin_d.daily) == ("vitamin-d", None, None)
    assert vitamin_d.arithmetic == "dose unknown: strength of vitamin D not known"


@pytest.mark.parametrize(
    ("code", "daily", "words"),
    [("BID", 4000, "twice daily"), ("Q1W", 2000 / 7, "once weekly"), ("qod", 1000, "every 2 days")],
)
def test_timing_codes(
    code: str, daily: float, words: str, terminology: Terminology, catalog: MedicationCatalog
) -> None:
    coded = {
        "timing": {
            "code": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v3-GTSAbbreviation", "code": code}
                ]
            }
        },
        "doseAndRate": [{"doseQuantity": {"value": 1, "system": UCUM, "code": "{tbl}"}}],
    }
    d3 = only(read_one(request(rx("801663"), coded), terminology, catalog))
    assert d3.daily == pytest.approx(daily)
    assert d3.arithmetic.endswith(f"1 tablet of 2,000 IU {words}")


def test_dose_range_uses_the_upper_end(terminology: Terminology, catalog: MedicationCatalog) -> None:
    ranged = dosage(frequency=2)
    ranged["doseAndRate"] = [
        {"doseRange": {"low": {"value": 1, "code": "{pill}"}, "high": {"value": 2, "code": "{pill}"}}}
    ]
    d3 = only(read_one(request(rx("801663"), ranged), terminology, catalog))
    assert d3.daily == 8000
    assert (
        d3.arithmetic == "8,000 IU/day: 2 tablets of 2,000 IU (upper end of dose range 1–2 used) twice daily"
    )
    ranged["doseAndRate"] = [{"doseRange": {"high": {"value": 2, "code": "{pill}"}}}]
    up_to = only(read_one(request(rx("801663"), ranged), terminology, catalog))
    assert up_to.arithmetic == (
        "8,000 IU/day: 2 tablets of 2,000 IU (upper end of dose range up to 2 used) twice daily"
    )


def test_frequency_max_is_used(terminology: Terminology, catalog: MedicationCatalog) -> None:
    upto = dosage()
    upto["timing"]["repeat"]["frequencyMax"] = 3
    d3 = only(read_one(request(rx("801663"), upto), terminology, catalog))
    assert d3.daily == 6000
    assert d3.arithmetic.endswith("three times daily (upper end: up to 3 times)")


def test_several_dosage_instructions_are_summed(terminology: Terminology, catalog: MedicationCatalog) -> None:
    d3 = only(read_one(request(rx("801663"), dosage(1), dosage(1, unit="wk")), terminology, catalog))
    assert d3.daily == pytest.approx(2000 + 2000 / 7)
    assert d3.arithmetic == (
        "2,285.71 IU/day: 2,000 IU/day (1 tablet of 2,000 IU once daily)"
        " + 285.71 IU/day (1 tablet of 2,000 IU once weekly)"
    )
    unknown = only(read_one(request(rx("801663"), dosage(1), dosage(1, "puff")), terminology, catalog))
    assert unknown.daily is None
    assert unknown.arithmetic == "dose unknown: dosage 2: unit 'puff' not understood"


def test_dstu2_medication_order(terminology: Terminology, catalog: MedicationCatalog) -> None:
    order = {
        "resourceType": "MedicationOrder",
        "id": "mo1",
        "status": "draft",
        "medicationCodeableConcept": rx("801663", "Cholecalciferol 2000 UNT Oral Tablet"),
        "dosageInstruction": [
            {
                "timing": {"repeat": {"frequency": 2, "period": 1, "periodUnits": "d"}},
                "doseQuantity": {"value": 2, "system": UCUM, "code": "{pill}"},
            }
        ],
    }
    reading = read_draft_orders(bundle(order), ["MedicationOrder/mo1"], reader(terminology, catalog))
    assert reading.orders[0].reference == "MedicationOrder/mo1"
    assert only(reading.orders[0].ingredients).daily == 8000


# --- which medication ------------------------------------------------------------------------------


def test_unknown_code_is_read_from_the_name(terminology: Terminology, catalog: MedicationCatalog) -> None:
    d3 = only(
        read_one(
            request(rx("999999999", "Cholecalciferol 5000 UNT Oral Capsule"), dosage()), terminology, catalog
        )
    )
    assert (d3.concept, d3.name, d3.strength, d3.matched_by, d3.daily) == (
        "vitamin-d",
        "cholecalciferol",
        5000,
        "name",
        5000,
    )
    assert d3.arithmetic == "5,000 IU/day: 1 capsule of 5,000 IU once daily"


def test_combination_read_from_text_without_code(
    terminology: Terminology, catalog: MedicationCatalog
) -> None:
    ingredients = read_one(request({"text": COMBO}, dosage(2, frequency=2)), terminology, catalog)
    assert [(i.concept, i.strength, i.daily, i.matched_by) for i in ingredients] == [
        ("vitamin-d", 1000, 4000, "name"),
        ("vitamin-k2", 90, 360, "name"),
    ]


@pytest.mark.parametrize(
    ("codeable", "expected"),
    [
        (rx("855332"), [("vka", "warfarin", 5, "mg", "code")]),
        (rx("308867"), [("vitamin-d-analog", "calcitriol", 0.25, "mcg", "code")]),
        (rx("1537458"), [("vitamin-k2", "vitamin K2", 100, "mcg", "code")]),
        (rx("847004"), [("vitamin-k2", "vitamin K2", 100, "mcg", "code")]),
        (rx("198102"), [("vitamin-k1", "phytonadione", 5000, "mcg", "code")]),
        (rx("1364445"), [("doac", "apixaban", 5, "mg", "code")]),
        (rx("11289"), [("vka", "warfarin", None, "mg", "code")]),
        (rx("1161790"), [("vka", "warfarin", None, "mg", "code")]),
        (
            {"coding": [{"system": "http://www.whocc.no/atc", "code": "B01AA03"}]},
            [("vka", "warfarin", None, "mg", "code")],
        ),
        (rx("B01AA03"), []),
        (
            rx("1156127"),
            [
                ("vitamin-d", "cholecalciferol", None, "IU", "code"),
                ("vitamin-k2", "vitamin K2", None, "mcg", "code"),
            ],
        ),
        (
            {"coding": [{"system": "urn:oid:2.16.840.1.113883.6.88", "code": "801663"}]},
            [("vitamin-d", "cholecalciferol", 2000, "IU", "code")],
        ),
        ({"text": "MK-7 100 mcg softgel"}, [("vitamin-k2", "menaquinone-7", 100, "mcg", "name")]),
        (
            {"text": "Vitamin D3 50 MCG (2000 IU) capsule"},
            [("vitamin-d", "cholecalciferol", 2000, "IU", "name")],
        ),
        (
            {"text": "Paricalcitol 0.001 MG Oral Capsule"},
            [("vitamin-d-analog", "paricalcitol", 1, "mcg", "name")],
        ),
        ({"text": "Warfarin Sodium 2 MG/ML Injectable Solution"}, [("vka", "warfarin", None, "mg", "name")]),
        ({"text": "Vitamin D 1000 IU"}, [("vitamin-d", "vitamin D", 1000, "IU", "name")]),
        ({"text": "Metformin 500 MG Oral Tablet"}, []),
        (rx("2418"), [("vitamin-d", "cholecalciferol", None, "IU", "code")]),
        ({"coding": [{"system": "http://loinc.org", "code": "62292-8"}]}, []),
        (None, []),
        ("cholecalciferol", []),
    ],
)
def test_classify_medication(
    codeable: Any, expected: list[tuple[Any, ...]], terminology: Terminology, catalog: MedicationCatalog
) -> None:
    found = classify_medication(codeable, terminology, catalog)
    assert [(i.concept, i.name, i.strength, i.unit, i.matched_by) for i in found] == expected


def test_contained_medication_reference(terminology: Terminology, catalog: MedicationCatalog) -> None:
    resource = request(None, dosage())
    resource["medicationReference"] = {"reference": "#med1"}
    resource["contained"] = [{"resourceType": "Medication", "id": "med1", "code": rx("801663")}]
    d3 = only(read_one(resource, terminology, catalog))
    assert (d3.concept, d3.daily, d3.matched_by) == ("vitamin-d", 2000, "code")


@pytest.mark.parametrize(
    ("reference", "contained", "problem"),
    [
        ({"reference": "Medication/abc"}, [], "medicationReference 'Medication/abc' not resolved"),
        ({"reference": "#nope"}, [], "medicationReference '#nope' not found in contained"),
        (
            {"reference": "#m"},
            [{"resourceType": "Medication", "id": "m"}],
            "contained Medication '#m' has no code",
        ),
        ({"display": "x"}, [], "medicationReference (empty) not resolved"),
    ],
)
def test_unresolved_medication_reference(
    reference: dict[str, Any], contained: list[Any], problem: str
) -> None:
    resource = {"medicationReference": reference, "contained": contained}
    assert medication_codeable(resource) == (None, problem)


def test_r5_codeable_reference() -> None:
    codeable = rx("801663")
    assert medication_codeable({"medication": {"concept": codeable}}) == (codeable, None)


# --- which drafts ----------------------------------------------------------------------------------


def test_selections_are_honoured(terminology: Terminology, catalog: MedicationCatalog) -> None:
    drafts = bundle(
        request(rx("801663"), dosage(), rid="d3"),
        request(rx("1537458"), dosage(), rid="k2"),
    )
    selected = read_draft_orders(drafts, ["MedicationRequest/d3"], reader(terminology, catalog))
    assert [o.reference for o in selected.orders] == ["MedicationRequest/d3"]
    assert selected.skipped == ("entry 1: 'MedicationRequest/k2' not in selections",)
    everything: list[str] | None
    for everything in (None, []):
        assert len(read_draft_orders(drafts, everything, reader(terminology, catalog)).orders) == 2
    absolute = read_draft_orders(
        drafts, ["http://ehr.example/fhir/MedicationRequest/k2"], reader(terminology, catalog)
    )
    assert [o.id for o in absolute.orders] == ["k2"]


def test_other_order_types_are_skipped(terminology: Terminology, catalog: MedicationCatalog) -> None:
    drafts = bundle(
        {"resourceType": "NutritionOrder", "id": "n"},
        {"resourceType": "ServiceRequest", "id": "s"},
        request(rx("801663"), dosage()),
    )
    reading = read_draft_orders(drafts, None, reader(terminology, catalog))
    assert [o.id for o in reading.orders] == ["r1"]
    assert reading.skipped == (
        "entry 0: 'NutritionOrder' is not a medication order",
        "entry 1: 'ServiceRequest' is not a medication order",
    )


def test_status_and_dates_are_noted_not_fatal(terminology: Terminology, catalog: MedicationCatalog) -> None:
    resource = request(rx("801663"), dosage())
    resource["status"] = "on-hold"
    resource["dosageInstruction"][0]["timing"]["repeat"]["boundsPeriod"] = {
        "start": "0002-12-01",
        "end": 20270301,
    }
    (order,) = read_draft_orders(bundle(resource), None, reader(terminology, catalog)).orders
    assert order.problems == (
        "status 'on-hold' (not draft/active): judged anyway",
        "boundsPeriod.start '0002-12-01' implausible, ignored",
        "boundsPeriod.end 'int' ignored",
    )
    assert only(order.ingredients).daily == 2000


def test_unrecognised_medication_is_a_problem(terminology: Terminology, catalog: MedicationCatalog) -> None:
    (order,) = read_draft_orders(
        bundle(request({"text": "Metformin 500 MG"}, dosage())), None, reader(terminology, catalog)
    ).orders
    assert (order.ingredients, order.problems) == ((), ("medication not recognised",))


# --- garbage in, no exception out ------------------------------------------------------------------


@pytest.mark.parametrize(
    "draft_orders",
    [
        None,
        5,
        "x",
        [],
        {},
        {"entry": "nope"},
        {"resourceType": "Bundle", "entry": [[1, 2], None, "x", {"resource": "x"}, {"resource": {}}]},
        [{"resourceType": 5}, {"resourceType": "MedicationRequest", "id": 7}],
        {
            "resourceType": "Bundle",
            "entry": [
                {
                    "resource": {
                        "resourceType": "MedicationRequest",
                        "dosageInstruction": {
                            "timing": {"repeat": {"frequency": "two", "period": [], "periodUnit": "d"}},
                            "doseAndRate": {"doseQuantity": {"value": "abc", "code": "{pill}"}},
                        },
                    }
                }
            ],
        },
        [
            request(
                rx("801663"), {"timing": "BID", "doseAndRate": [{"doseQuantity": {"value": True, "code": 5}}]}
            )
        ],
        [
            request(
                {"coding": {"system": RXNORM, "code": "801663"}},
                dosage(float("nan")),
                dosage(1e308, frequency=1e308),
            )
        ],
        [
            request(
                rx("801663"),
                dosage(frequency="two"),
                dosage(value="abc"),
                dosage(period=0),
                dosage(unit=["d"]),
            )
        ],
        [request({"coding": [None, 3, {"system": 1, "code": {}}], "text": ["x"]}, [])],  # type: ignore[arg-type]
        [{"resourceType": "MedicationRequest", "medicationReference": "#x", "contained": "x"}],
        [{"resourceType": "MedicationRequest", "medication": 3, "dosageInstruction": [{"doseRange": "x"}]}],
        [
            {
                "resourceType": "MedicationRequest",
                "dosageInstruction": [{"timing": {"code": {"coding": "BID"}}}],
            }
        ],
    ],
)
def test_garbage_never_raises(
    draft_orders: Any, terminology: Terminology, catalog: MedicationCatalog
) -> None:
    reading = read_draft_orders(draft_orders, ["MedicationRequest/x", 5, None], reader(terminology, catalog))  # type: ignore[list-item]
    assert isinstance(reading, DraftReading)
    reading = read_draft_orders(draft_orders, None, reader(terminology, catalog))
    for order in reading.orders:
        for ingredient in order.ingredients:
            assert ingredient.daily is None or ingredient.daily >= 0


_JUNK: list[Any] = [
    None,
    0,
    -1,
    2.5,
    "",
    "x",
    "two",
    "abc",
    True,
    [],
    {},
    [None],
    {"x": 1},
    "Invalid date",
    1e308,
]


def _mutate(value: Any, rng: random.Random) -> Any:
    """Replace random subtrees of a real request with junk, so every reader sees every wrong shape."""
    if rng.random() < 0.08:
        return rng.choice(_JUNK)
    if isinstance(value, dict):
        return {k: _mutate(v, rng) for k, v in value.items()}
    if isinstance(value, list):
        return [_mutate(v, rng) for v in value]
    return value


@pytest.mark.parametrize("name", ["order-select", "order-sign.after-suggestion"])
def test_random_mutations_never_raise(
    name: str, terminology: Terminology, catalog: MedicationCatalog
) -> None:
    context = sandbox_context(name)
    rng = random.Random(20261124)
    text_dose = {"text": "2 tablets twice daily", "timing": {"code": {"text": "BID"}}}
    context["draftOrders"]["entry"].append({"resource": request(rx("705728"), text_dose, dosage(unit="wk"))})
    for _ in range(400):
        mutated = _mutate(context, rng)
        draft_orders = mutated.get("draftOrders") if isinstance(mutated, dict) else mutated
        selections = mutated.get("selections") if isinstance(mutated, dict) else None
        read_draft_orders(draft_orders, selections, reader(terminology, catalog))


# --- the catalog file ------------------------------------------------------------------------------


def test_catalog_contents(catalog: MedicationCatalog) -> None:
    assert catalog.valuesets["vitamin-d3-k2-combination"] == ("vitamin-d", "vitamin-k2")
    assert set(catalog.categories()) == {
        "vitamin-d",
        "vitamin-d-analog",
        "vitamin-k2",
        "vitamin-k1",
        "vka",
        "doac",
    }
    conversion = catalog.by_category["vitamin-d"].convert["mcg"]
    assert conversion.factor == 40
    assert catalog.by_category["vka"].fact == "vka.active"
    assert catalog.by_category["vitamin-k1"].fact is None  # no rule reads it
    assert "https://ods.od.nih.gov/factsheets/VitaminD-HealthProfessional/" in conversion.source


def _broken(tmp_path: Path, old: str, new: str) -> Path:
    text = (CARDS / "medications.toml").read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / "medications.toml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ('label = "vitamin D"', 'label = "vitamin D"\ncolour = "red"', "categories.vitamin-d.colour"),
        ('unit = "IU"', "unit = 5", "categories.vitamin-d.unit"),
        ('unit = "IU"', 'unit = "furlong"', "categories.vitamin-d.unit"),
        ("factor = 40\n", "factor = -40\n", "categories.vitamin-d.convert.mcg.factor"),
        ("factor = 40\n", 'factor = "40"\n', "categories.vitamin-d.convert.mcg.factor"),
        ('vka = ["vka"]', 'vka = ["vitamin-q"]', "valuesets.vka[0]"),
        ('vka = ["vka"]', 'vka = "vka"', "valuesets.vka"),
        ('"{pill}" = "pill"', '"{PILL}" = "pill"\n"{pill}" = "pill"', "count_units.{pill}"),
        (
            'phenprocoumon = ["phenprocoumon"]',
            'phenprocoumon = ["Phenprocoumon"]',
            "categories.vka.names.phenprocoumon[0]",
        ),
        (
            'acenocoumarol = ["acenocoumarol"]',
            'acenocoumarol = ["warfarin"]',
            "categories.vka.names.acenocoumarol[0]",
        ),
        ('period_unit = "d" }', 'period_unit = "fortnight" }', "timing_codes.QD.period_unit"),
        ("QD = { frequency = 1,", "QD = { frequency = 0,", "timing_codes.QD.frequency"),
        ("[period_units]", "[period_unit]", "(top level).period_unit"),
        ("[valuesets]", "[valuesets", "(file)"),
        ('fact = "vka.active"', 'fact = ""', "categories.vka.fact"),
        ('fact = "doac.active"', 'fact = "vka.active"', "categories.doac.fact"),
    ],
)
def test_catalog_errors_name_file_and_field(tmp_path: Path, old: str, new: str, field: str) -> None:
    with pytest.raises(RuleSetError) as caught:
        load_medication_catalog(_broken(tmp_path, old, new))
    assert caught.value.extra == {"file": str(tmp_path / "medications.toml"), "field": field}
    assert str(caught.value).startswith(f"medications.toml: {field}: ")


def test_catalog_value_sets_must_exist(tmp_path: Path, terminology: Terminology) -> None:
    path = _broken(tmp_path, 'doac = ["doac"]', 'doac = ["doac"]\nnoac = ["doac"]')
    load_medication_catalog(path)
    with pytest.raises(RuleSetError, match=r"valuesets\.noac: no such value set"):
        load_medication_catalog(path, terminology)
