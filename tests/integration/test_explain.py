"""`d3k2 explain` and d3k2.whatif: facts with their sources, every rule's verdict, cards, what-ifs."""

from __future__ import annotations

import json
import shutil
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from builders import FIXTURES, bundle_from_request, off_the_network
from d3k2.config import default_cards_dir
from d3k2.core.errors import BadRequest
from d3k2.core.loader import load_ruleset
from d3k2.core.ruleset import RuleSet
from d3k2.tools.cli import main
from d3k2.whatif import OverrideError, apply_overrides, parse_override, request_from_bundle

REPO = Path(__file__).resolve().parents[2]
SANDBOX_VIEW = REPO / "fixtures" / "patient-view" / "sandbox-patient-view" / "request.json"
TODAY = "2026-11-24"


@pytest.fixture(scope="module")
def ruleset() -> RuleSet:
    return load_ruleset(default_cards_dir())


def sandbox_bundle() -> dict[str, Any]:
    """The recorded sandbox patient (25(OH)D 18 ng/mL, eGFR 25, warfarin, sarcoidosis) as a plain Bundle."""
    return bundle_from_request(SANDBOX_VIEW)


@pytest.fixture
def bundle_file(tmp_path: Path) -> Path:
    path = tmp_path / "export.json"
    path.write_text(json.dumps(sandbox_bundle()), encoding="utf-8")
    return path


def explain(*args: str) -> Result:
    return CliRunner().invoke(main, ["explain", *args], catch_exceptions=False)


def report(*args: str) -> dict[str, Any]:
    result = explain(*args, "--format", "json")
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def verdicts(data: dict[str, Any]) -> dict[str, str]:
    return {r["rule"]: r["verdict"] for r in data["rules"] if r["draft"] is None}


# ---------------------------------------------------------------- the command


def test_explain_shows_facts_with_sources_fired_and_silent_rules_and_cards(bundle_file: Path) -> None:
    result = explain(str(bundle_file), "--today", TODAY)
    assert result.exit_code == 0, result.output
    text = result.output
    assert "d3k2-patient-view: patient d3k2-pt-1, today 2026-11-24, profile seed" in text
    assert "Observation/d3k2-vitd-1" in text
    assert "MedicationStatement/d3k2-warfarin-1" in text
    assert "Condition/d3k2-sarcoid-1" in text
    rules_table = text.split("Rules for patient-view", 1)[1].split("Cards", 1)[0]
    rows = {
        line.split("│")[2].strip(): line.split("│")[1].strip()
        for line in rules_table.splitlines()
        if line.startswith("│") and line.split("│")[2].strip()
    }
    assert rows["granulomatous"] == "FIRED"
    assert rows["vitd-toxicity"] == "silent"
    # Warfarin, but kidney disease and sarcoidosis keep K2 off: no warfarin/K2 card (CLINICAL.md 6a).
    assert rows["vka-k2"] == "silent"
    assert "k2.active eq False: False → true" in text
    assert "Cards" in text
    assert "Granulomatous disease on record" in text
    assert "On warfarin: no vitamin K2 supplement" not in text


def test_json_report(bundle_file: Path) -> None:
    data = report(str(bundle_file), "--today", TODAY)
    assert data["facts"]["vitd"]["source"] == "Observation/d3k2-vitd-1"
    assert data["facts"]["vitd"]["value"] == "18 ng/mL"
    assert data["facts"]["egfr"]["date"] == "2026-10-15"
    assert [m["category"] for m in data["facts"]["medications"]] == ["vka"]
    assert data["facts"]["conditions"]["sarcoidosis"][0]["source"] == "Condition/d3k2-sarcoid-1"
    assert verdicts(data)["kidney-advanced"] == "fired"
    assert verdicts(data)["vitd-deficient"] == "silent"
    assert {c["topic"] for c in data["cards"]} == {"granulomatous", "kidney-advanced"}
    assert data["response"]["cards"][0]["uuid"] == data["cards"][0]["uuid"]


def test_what_if_egfr_and_warfarin(bundle_file: Path) -> None:
    healthier = report(str(bundle_file), "--today", TODAY, "--set", "egfr=60", "--set", "warfarin=off")
    assert verdicts(healthier)["kidney-advanced"] == "silent"
    assert verdicts(healthier)["vka-k2"] == "silent"
    # K2 on the list beside the warfarin: the INR card; without the warfarin it goes.
    taking = report(str(bundle_file), "--today", TODAY, "--set", "k2=on")
    assert verdicts(taking)["vka-k2-taking"] == "fired"
    stopped = report(str(bundle_file), "--today", TODAY, "--set", "k2=on", "--set", "warfarin=off")
    assert verdicts(stopped)["vka-k2-taking"] == "silent"
    assert healthier["facts"]["egfr"]["source"] == "Observation/whatif-egfr"
    assert healthier["overrides"][1] == {
        "override": "warfarin=off",
        "added": None,
        "removed": ["MedicationStatement/d3k2-warfarin-1"],
    }
    worse = report(str(bundle_file), "--today", TODAY, "--set", "egfr=60", "--set", "egfr=25")
    assert verdicts(worse)["kidney-advanced"] == "fired"


def test_what_if_vitd_in_nmol_pregnancy_and_calcium(bundle_file: Path) -> None:
    data = report(
        str(bundle_file),
        "--today",
        TODAY,
        "--set",
        "vitd=150nmol/L",
        "--set",
        "pregnant=yes",
        "--set",
        "calcium=11.2mg/dL",
    )
    assert data["facts"]["vitd"]["reported"] == "150 nmol/L"
    assert data["facts"]["vitd"]["date"] == TODAY
    assert data["facts"]["vitd"]["value"].startswith("60.")  # 150 nmol/L ÷ 2.496
    assert data["values"]["vitd.band"] == "high"
    assert data["facts"]["pregnancy"][0]["source"] == "Condition/whatif-pregnant"
    # "As per prenatal care" never stands beside a card that blocks or stops vitamin D (CLINICAL.md 3b).
    assert verdicts(data)["pregnancy-d3"] == "silent"
    assert verdicts(data)["hypercalcemia"] == "fired"


def test_a_converted_value_is_never_shown_across_a_threshold(bundle_file: Path) -> None:
    # 74.87 nmol/L is 29.996 ng/mL, below 30 (seed: deficient); shown rounded to one digit it would be "30".
    data = report(str(bundle_file), "--today", TODAY, "--set", "vitd=74.87nmol/L")
    assert data["facts"]["vitd"]["value"] == "29.996 ng/mL"
    assert data["values"]["vitd.value"] == "29.995992" and data["values"]["vitd.band"] == "deficient"


def off_the_network_copy(request: Path, tmp_path: Path) -> Path:
    """A recorded fixture copied with its request off the network and its golden beside it."""
    folder = tmp_path / request.parent.name
    folder.mkdir()
    shutil.copy(request.parent / "expected.json", folder / "expected.json")
    recorded = json.loads(request.read_text(encoding="utf-8"))
    (folder / "request.json").write_text(json.dumps(off_the_network(recorded)), encoding="utf-8")
    return folder / "request.json"


def test_explain_a_fixture_uses_its_golden_today(tmp_path: Path) -> None:
    data = report(str(off_the_network_copy(SANDBOX_VIEW, tmp_path)))
    assert data["today"] == json.loads((SANDBOX_VIEW.parent / "expected.json").read_text())["today"]
    assert data["service"] == "d3k2-patient-view"


def test_order_hook_rules_are_listed_per_draft(tmp_path: Path) -> None:
    request = REPO / "fixtures" / "order-select" / "sandbox-order-select" / "request.json"
    data = report(str(off_the_network_copy(request, tmp_path)), "--today", TODAY)
    drafts = [r for r in data["rules"] if r["draft"]]
    assert drafts
    assert any(r["rule"] == "order-k2-vka" and r["verdict"] == "fired" for r in drafts)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "vitd=abc"], "vitd takes a number"),
        (["--set", "vitd=18furlongs"], "unit 'furlongs' not understood"),
        (["--set", "warfarin=maybe"], "warfarin takes on or off"),
        (["--set", "height=180"], "unknown name 'height'"),
        (["--profile", "nope"], "unknown profile 'nope'"),
        (["--today", "24.11.2026"], "must be a date"),
    ],
)
def test_bad_options_give_one_error_line(bundle_file: Path, args: list[str], message: str) -> None:
    result = explain(str(bundle_file), *args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{oops", "not JSON"),
        ('{"resourceType": "Patient"}', "not a CDS Hooks request and not a FHIR Bundle"),
    ],
)
def test_bad_files_give_one_error_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "input.json"
    path.write_text(content, encoding="utf-8")
    result = explain(str(path), "--today", TODAY)
    assert result.exit_code == 1
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


# ---------------------------------------------------------------- d3k2.whatif


def test_request_from_bundle_is_deterministic_and_carries_everything(ruleset: RuleSet) -> None:
    bundle = sandbox_bundle()
    keys = list(ruleset.services["d3k2-patient-view"].prefetch)
    content = json.dumps(bundle).encode()
    first = request_from_bundle(
        bundle, hook="patient-view", patient_id=None, prefetch_keys=keys, content=content
    )
    second = request_from_bundle(
        bundle, hook="patient-view", patient_id=None, prefetch_keys=keys, content=content
    )
    assert first["hookInstance"] == second["hookInstance"]
    assert first["context"] == {"patientId": "d3k2-pt-1"}
    assert first["prefetch"][keys[0]]["entry"] == bundle["entry"]
    assert all(first["prefetch"][k] is None for k in keys[1:])


def test_request_from_bundle_rejects_other_patients(ruleset: RuleSet) -> None:
    bundle = sandbox_bundle()
    keys = list(ruleset.services["d3k2-patient-view"].prefetch)
    with pytest.raises(BadRequest, match="no Patient/other"):
        request_from_bundle(bundle, hook="patient-view", patient_id="other", prefetch_keys=keys, content=b"")
    bundle["entry"].append({"resource": {"resourceType": "Patient", "id": "second"}})
    with pytest.raises(BadRequest, match="2 Patient resources"):
        request_from_bundle(bundle, hook="patient-view", patient_id=None, prefetch_keys=keys, content=b"")


def test_request_from_bundle_moves_drafts_to_draft_orders(ruleset: RuleSet) -> None:
    bundle = sandbox_bundle()
    draft = {
        "resourceType": "MedicationRequest",
        "id": "draft-1",
        "status": "draft",
        "intent": "proposal",
        "subject": {"reference": "Patient/d3k2-pt-1"},
        "medicationCodeableConcept": {"text": "vitamin K2"},
    }
    bundle["entry"].append({"resource": draft})
    keys = list(ruleset.services["d3k2-order-select"].prefetch)
    request = request_from_bundle(
        bundle, hook="order-select", patient_id=None, prefetch_keys=keys, content=b"x"
    )
    assert request["context"]["selections"] == ["MedicationRequest/draft-1"]
    assert request["context"]["draftOrders"]["entry"] == [{"resource": draft}]
    assert {"resource": draft} not in request["prefetch"][keys[0]]["entry"]


def test_overrides_replace_resources_of_their_kind(ruleset: RuleSet) -> None:
    resources = [e["resource"] for e in sandbox_bundle()["entry"]]
    overrides = [
        parse_override(t, ruleset) for t in ("vitd=45nmol/L", "k2=on", "warfarin=off", "pregnant=no")
    ]
    changed, applied = apply_overrides(
        resources, overrides, ruleset, today=date(2026, 11, 24), patient_id="p"
    )
    refs = {f"{r['resourceType']}/{r['id']}" for r in changed}
    assert "Observation/d3k2-vitd-1" not in refs
    assert "Observation/whatif-vitd" in refs
    assert "MedicationStatement/whatif-k2" in refs
    assert "MedicationStatement/d3k2-warfarin-1" not in refs
    assert "Condition/d3k2-sarcoid-1" in refs
    assert [a.removed for a in applied] == [
        ("Observation/d3k2-vitd-1",),
        (),
        ("MedicationStatement/d3k2-warfarin-1",),
        (),
    ]
    vitd = next(r for r in changed if r["id"] == "whatif-vitd")
    assert vitd["valueQuantity"]["unit"] == "nmol/L"
    assert vitd["effectiveDateTime"] == "2026-11-24"
    assert vitd["code"]["coding"][0]["code"] in {
        c for _s, c in ruleset.terminology.codes_in("vitd-25oh-total")
    }
    assert len(resources) == len(sandbox_bundle()["entry"])  # the input is left alone


def test_parse_override_defaults_to_the_canonical_unit(ruleset: RuleSet) -> None:
    override = parse_override("egfr=25", ruleset)
    assert (override.name, override.value) == ("egfr", 25.0)
    assert override.unit == ruleset.facts.labs["egfr"].canonical_unit
    with pytest.raises(OverrideError, match="expected NAME=VALUE"):
        parse_override("egfr", ruleset)


def test_explain_names_unknown_medications_and_copies() -> None:
    unknown = FIXTURES / "patient-view" / "medication-status-unknown" / "request.json"
    text = explain(str(unknown)).output
    assert (
        "medication of unknown kind: warfarin (MedicationStatement/pt-medication-status-unknown-warf:" in text
    )
    data = report(str(unknown))
    assert data["values"]["meds.unknown"] is True
    assert data["facts"]["unknown_medications"] == [
        {
            "name": "warfarin",
            "reason": "status unknown",
            "source": "MedicationStatement/pt-medication-status-unknown-warf",
        }
    ]
    copies = FIXTURES / "patient-view" / "copies-warfarin-subsetted" / "request.json"
    assert (
        "copies of one record: MedicationStatement/pt-copies-warfarin-subsetted-warf"
        in explain(str(copies)).output
    )
    assert report(str(copies))["facts"]["copies"] == ["MedicationStatement/pt-copies-warfarin-subsetted-warf"]


def test_explain_shows_the_current_vitamin_d_intake() -> None:
    request = FIXTURES / "patient-view" / "current-d3-5000" / "request.json"
    assert "current vitamin D (vitamin_d.current_daily): 5,000 IU/day" in explain(str(request)).output
    data = report(str(request))
    assert data["values"]["vitamin_d.current_daily"] == "5,000"
    (d3,) = data["facts"]["medications"]
    assert (d3["product"], d3["daily"]) == ("Cholecalciferol 5000 UNT Oral Tablet", 5000.0)
    assert d3["dose"] == "5,000 IU/day: 1 tablet of 5,000 IU once daily"


def test_explain_shows_the_age_read_from_birth_date() -> None:
    request = REPO / "fixtures" / "patient-view" / "age-infant" / "request.json"
    data = report(str(request), "--today", TODAY)
    assert data["facts"]["age"] == {
        "band": "infant",
        "months": 7,
        "birth_date": "2026-04-10",
        "why_unknown": None,
    }
    assert (data["values"]["age.band"], data["values"]["age.months"]) == ("infant", 7)
    unknown = report(str(request.parent.parent / "age-no-birthdate" / "request.json"), "--today", TODAY)
    assert unknown["facts"]["age"]["why_unknown"] == "no birth date on record"
    assert unknown["values"]["age.band"] == "unknown"


def test_explain_names_the_kind_of_calcium() -> None:
    request = REPO / "fixtures" / "patient-view" / "calcium-albumin-corrected" / "request.json"
    data = report(str(request), "--today", TODAY)
    assert data["facts"]["calcium"]["kind"] == "albumin-corrected"
    assert (data["values"]["calcium.kind"], data["values"]["calcium.grade"]) == ("albumin-corrected", "mild")
