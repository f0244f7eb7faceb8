"""Card wording and clinical vocabulary come from cards/, checked at startup like the rest of the rule set:
the words around the data (texts.toml) and the condition facts each {evidence.<name>} lists (facts.toml)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from datetime import date
from pathlib import Path

import pytest

from builders import CARDS, TODAY, fixtures, ruleset
from d3k2.core.engine import fact_values
from d3k2.core.errors import RuleSetError
from d3k2.core.facts import Facts
from d3k2.core.fields import template_fields
from d3k2.core.hooks import parse_request
from d3k2.core.labs import Measurement
from d3k2.core.loader import load_ruleset
from d3k2.core.quantities import Interval
from d3k2.core.ruleset import RuleSet
from d3k2.core.texts import PLACEHOLDERS, Texts, load_texts
from d3k2.fhir.prefetch import resolve
from d3k2.service import call_service, facts_for


@pytest.fixture
def texts_file(tmp_path: Path) -> Path:
    target = tmp_path / "texts.toml"
    shutil.copy(CARDS / "texts.toml", target)
    return target


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, old
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_the_shipped_texts_keep_their_wording() -> None:
    texts = ruleset().texts
    assert texts.not_on_record == "not on record" and texts.no_date == "no date"
    assert texts.stale.format(days=400) == " (stale: 400 days old)"
    assert texts.daily_dose.format(amount="8,000", unit="IU") == "8,000 IU/day"
    assert texts.thresholds.format(title="T") == "\n\n25(OH)D bands: T."
    assert texts.units == {
        "{tbl}": "tablet",
        "{capsule}": "capsule",
        "{drop}": "drop",
        "[iU]": "IU",
        "ug": "mcg",
    }


@pytest.mark.parametrize(
    ("old", "new", "field", "message"),
    [
        ('no_date = "no date"\n', "", "cards.no_date", "missing"),
        ('none = "none"', 'none = "none"\nnothing = "-"', "cards.nothing", "unknown key"),
        ("{days} days old", "{day} days old", "cards.stale", "must use {days}, uses ['day']"),
        ("{days} days old", "days old", "cards.stale", "must use {days}, uses []"),
        ('unknown_dose = "unknown dose"', 'unknown_dose = "{x}"', "cards.unknown_dose", "no placeholders"),
        ('unknown_dose = "unknown dose"', 'unknown_dose = "a { b"', "cards.unknown_dose", "not a valid"),
        ('unknown_dose = "unknown dose"', "unknown_dose = 5", "cards.unknown_dose", "must be a string"),
        ('ug = "mcg"', "ug = 1", "units.ug", "must be a string"),
        ('count_unit = "unit"', 'count_unit = "{x}"', "dosage.count_unit", "no placeholders"),
        ('no_timing = "no timing"\n', "", "dosage.no_timing", "missing"),
        ("[units]", "[unit]", "units", "missing"),
        ("[ceilings]", "[ceiling]", "ceilings", "missing"),
        ('infant = "2,000', 'toddler = "2,000', "ceilings.infant", "missing"),
        (
            'adult = "10,000 IU/day, the supervised',
            'adult = "{x} IU/day, the supervised',
            "ceilings.adult",
            "no placeholders",
        ),
        ('by_name = "{name} (recognised', 'by_name = "(recognised', "cards.by_name", "must use {name}"),
        ('none = "none"', '[other]\nnone = "none"', "other", "unknown key"),
    ],
)
def test_a_broken_text_stops_startup_naming_file_and_key(
    texts_file: Path, old: str, new: str, field: str, message: str
) -> None:
    _edit(texts_file, old, new)
    with pytest.raises(RuleSetError) as raised:
        load_texts(texts_file)
    assert raised.value.extra == {"file": str(texts_file), "field": field}
    assert str(raised.value).startswith(f"texts.toml: {field}: ")
    assert message in str(raised.value)


def test_the_two_tables_must_be_tables(texts_file: Path) -> None:
    texts_file.write_text(
        'cards = 1\nnotes = 1\nskipped = 1\nunits = "x"\nfetch = 1\ndoses = 1\ndosage = 1\nceilings = 1\n',
        encoding="utf-8",
    )
    with pytest.raises(RuleSetError, match=r"texts\.toml: cards: missing or not a table"):
        load_texts(texts_file)


def test_a_missing_or_unreadable_texts_file_stops_startup(tmp_path: Path) -> None:
    cards = tmp_path / "cards"
    shutil.copytree(CARDS, cards)
    (cards / "texts.toml").unlink()
    with pytest.raises(RuleSetError, match=r"texts\.toml: file missing"):
        load_ruleset(cards)
    (cards / "texts.toml").write_text("[cards\n", encoding="utf-8")
    with pytest.raises(RuleSetError, match=r"texts\.toml: not valid TOML"):
        load_ruleset(cards)


def test_every_text_reaches_the_cards_from_the_file() -> None:
    """Each text marked, every fixture answered again: each mark shows on some card, in its place."""
    rs = ruleset()
    marked = {
        key: f"«{key}»" + "".join(f"{{{name}}}" for name in sorted(names))
        for key, names in PLACEHOLDERS.items()
    }
    texts = Texts(
        **marked,
        notes=rs.texts.notes,
        skipped=rs.texts.skipped,
        units={**rs.texts.units, "{tbl}": "«tablet»"},
        fetch=rs.texts.fetch,
        doses=rs.texts.doses,
        dosage=rs.texts.dosage,
        ceilings={band: f"«ceilings.{band}»" for band in rs.texts.ceilings},
    )
    changed = dataclasses.replace(rs, texts=texts)
    answers = []
    for fixture in fixtures():
        if fixture.expected.get("status", 200) != 200:
            continue
        outcome = call_service(
            changed,
            fixture.expected["service"],
            fixture.request,
            today=date.fromisoformat(fixture.expected["today"]),
            profile=fixture.expected["profile"],
            fetcher=None,
            smart_url="https://cds.example.org/smart/launch",  # the smart link's label is a text too
        )
        answers.append(json.dumps(outcome.response, ensure_ascii=False))
    seen = "\n".join(answers)
    # "stale" shows on calcium-high-old's hypercalcemia card (an old calcium named as old); not_on_record
    # on d3-high-dose-no-calcium; current_total and current_unknown on current-two-d3-products and
    # current-two-d3-products-one-dose-unknown. The date and band of an absent 25(OH)D are fallbacks no card
    # shows: a card that may fire without a result names it by {vitd.line} ("no result on record").
    unreached = {"no_date", "vitd_no_band"}
    assert [key for key in marked if f"«{key}»" not in seen] == sorted(unreached, key=list(marked).index)
    assert '"unit": "«tablet»"' in seen
    assert "25(OH)D bands:" not in seen and "not on record" not in seen
    # [ceilings] on current-d3-5000-child, current-d3-20000-adult and current-d3-20000-no-birthdate.
    assert all(f"«ceilings.{band}»" in seen for band in ("child", "adult", "unknown"))


def test_the_words_of_a_dose_reach_the_cards_from_the_file() -> None:
    """[dosage]: a draft's arithmetic, where its dose was read, and why a dose is unknown."""
    rs = ruleset()
    marked = {
        "count_one": "«count_one» {count} {noun} {strength} {unit}",
        "adverb_d": "«daily»",
        "basis_structured": "«structured»",
        "unknown": "«unknown» {reason}",
        "text_no_dose": "«no dose found»",
    }
    changed = dataclasses.replace(
        rs, texts=dataclasses.replace(rs.texts, dosage={**rs.texts.dosage, **marked})
    )
    seen = []
    for fixture in fixtures():
        if fixture.expected.get("status", 200) == 200:
            outcome = call_service(
                changed,
                fixture.expected["service"],
                fixture.request,
                today=date.fromisoformat(fixture.expected["today"]),
                profile=fixture.expected["profile"],
                fetcher=None,
            )
            seen.append(json.dumps(outcome.response, ensure_ascii=False))
    shown = "\n".join(seen)
    for mark in ("«count_one» 1 tablet", "«daily»", "(«structured»)", "«unknown» «no dose found»"):
        assert mark in shown
    assert "dose unknown" not in shown


def test_a_stale_value_given_as_a_range_is_worded_from_the_file() -> None:
    """A stale result given as a range; a band a comparator leaves open names each band it can be."""
    rs = ruleset()
    texts = dataclasses.replace(rs.texts, stale=" [{days} d]")
    vitd = Measurement(
        "vitd",
        Interval.from_comparator(40, "<"),
        "ng/mL",
        "<40 ng/mL",
        TODAY,
        "final",
        "Observation/v",
        "",
        True,
        900,
    )
    facts = Facts(today=TODAY, vitd=vitd)
    changed = dataclasses.replace(rs, texts=texts)
    fields = template_fields(changed, facts, "seed", fact_values(changed, facts, "seed"))
    straddled = "deficient (< 30 ng/mL) or insufficient (30–39 ng/mL)"
    assert (fields["vitd"].stale, fields["vitd"].band) == (" [900 d]", straddled)
    plain = template_fields(rs, facts, "seed", fact_values(rs, facts, "seed"))
    assert (plain["vitd"].stale, plain["vitd"].band) == (" (stale: 900 days old)", straddled)


# ---------------------------------------------------------------- evidence groups (facts.toml [evidence])


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('granulomatous = ["sarcoidosis", "granulomatous"]\n', 'granulomatous = ["sarcoid"]\n', "'sarcoid'"),
        ('ckd = ["ckd_advanced"]', 'ckd = ["ckd_advanced"]\npregnancy = ["hypercalcemia"]', "pregnancy"),
        ('ckd = ["ckd_advanced"]', "ckd = []", "must list condition facts"),
    ],
)
def test_a_broken_evidence_group_stops_startup(tmp_path: Path, old: str, new: str, message: str) -> None:
    cards = tmp_path / "cards"
    shutil.copytree(CARDS, cards)
    _edit(cards / "facts.toml", old, new)
    with pytest.raises(RuleSetError) as raised:
        load_ruleset(cards)
    assert str(raised.value).startswith("facts.toml: evidence.")
    assert message in str(raised.value)


def test_a_rule_may_use_only_the_evidence_groups_there_are(tmp_path: Path) -> None:
    cards = tmp_path / "cards"
    shutil.copytree(CARDS, cards)
    _edit(cards / "facts.toml", 'ckd = ["ckd_advanced"]', 'kidney = ["ckd_advanced"]')
    with pytest.raises(RuleSetError) as raised:
        load_ruleset(cards)
    assert "vocabulary.toml: fields.patient: evidence.ckd: no such group in facts.toml [evidence]" in str(
        raised.value
    )
    assert "facts.toml: evidence.kidney: not declared as a field in vocabulary.toml" in str(raised.value)
    _edit(cards / "vocabulary.toml", '"evidence.ckd"', '"evidence.kidney"')
    for rule in (cards / "rules").glob("*.toml"):
        rule.write_text(rule.read_text(encoding="utf-8").replace("{evidence.ckd}", "{evidence.kidney}"))
    rs = load_ruleset(cards)
    facts = _facts_of("ckd-stage4-condition", rs)
    evidence = template_fields(rs, facts, "seed", fact_values(rs, facts, "seed"))["evidence"]
    assert "Chronic kidney disease" in evidence.kidney and not hasattr(evidence, "ckd")
    assert evidence.granulomatous == evidence.hypercalcemia == evidence.pregnancy == "none"


def _facts_of(name: str, rs: RuleSet) -> Facts:
    fixture = next(f for f in fixtures() if f.name == name)
    request = parse_request(fixture.request)
    resolved = resolve(rs.services[fixture.expected["service"]].prefetch, request, None, rs.texts)
    return facts_for(rs, resolved.resources, TODAY, resolved)


@pytest.mark.parametrize(
    ("old", "new", "field", "message"),
    [
        ('patient = "age-specific', '# patient = "age-specific', "skipped.patient", "missing"),
        ("[skipped]\n", '[skipped]\nx = "y"\n', "skipped.x", "not a prefetch key"),
    ],
)
def test_every_prefetch_key_and_only_those_names_its_skipped_check(
    tmp_path: Path, old: str, new: str, field: str, message: str
) -> None:
    cards = tmp_path / "cards"
    shutil.copytree(CARDS, cards)
    _edit(cards / "texts.toml", old, new)
    with pytest.raises(RuleSetError) as raised:
        load_ruleset(cards)
    assert f"texts.toml: {field}: " in str(raised.value) and message in str(raised.value)
