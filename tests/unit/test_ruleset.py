"""The rule set loads once and validates strictly: a broken file names itself and the field."""

from __future__ import annotations

import shutil
from itertools import pairwise
from pathlib import Path

import pytest

from builders import CARDS, ruleset
from d3k2.core.engine import evaluate_condition
from d3k2.core.errors import RuleSetError
from d3k2.core.loader import load_ruleset
from d3k2.core.quantities import Interval
from d3k2.core.ruleset import FactTest


@pytest.fixture
def cards(tmp_path: Path) -> Path:
    target = tmp_path / "cards"
    shutil.copytree(CARDS, target)
    return target


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1))


def test_the_shipped_rule_set_loads() -> None:
    rs = ruleset()
    assert len(rs.rules) >= 20
    assert set(rs.profiles) == {"seed", "endocrine-2011", "iom-2011"}
    assert rs.default_profile == "seed"
    assert {s.hook for s in rs.services.values()} == {
        "patient-view",
        "order-select",
        "order-sign",
        "medication-prescribe",
    }


@pytest.mark.parametrize(
    ("file", "old", "new", "message"),
    [
        ("rules/vka-k2.toml", 'indicator = "warning"', 'indicator = "loud"', "vka-k2.toml: indicator"),
        ("rules/vka-k2.toml", 'id = "vka-k2"', 'id = "other"', "vka-k2.toml: id: must equal the file name"),
        (
            "rules/vka-k2.toml",
            'sources = ["theuwissen-2013"',
            'sources = ["seed-article"',
            "unknown source 'seed-article'",
        ),
        (
            "rules/vka-k2.toml",
            "{vka.names}:",
            "{vka.nmes}:",
            "vka-k2.toml: summary: unknown template field {vka.nmes}",
        ),
        ("rules/vka-k2.toml", "topic = {", "topicc = {", "vka-k2.toml: topic"),
        (
            "rules/vka-k2.toml",
            '{ fact = "vka.active", eq = true }',
            '{ fact = "vka.active", eq = true, lt = 3 }',
            "exactly one operator",
        ),
        (
            "rules/k2-with-d3.toml",
            '{ ref = "k2-blocked" }',
            '{ ref = "k2-blockd" }',
            "unknown named condition 'k2-blockd'",
        ),
        (
            "rules/k2-with-d3.toml",
            'product = "k2-100-daily"',
            'product = "k2-1000"',
            "unknown product 'k2-1000'",
        ),
        (
            "rules/k2-with-d3.toml",
            'topic = { code = "k2-with-d3"',
            'topic = { code = "vka-k2"',
            "rules/vka-k2.toml: topic.code: 'vka-k2' already used by rule k2-with-d3",
        ),
        ("profiles.toml", 'default = "seed"', 'default = "seeed"', "profiles.toml: default: unknown profile"),
        ("products.toml", 'kind = "test"', 'kind = "lab"', "products.toml: products.test-25ohd.kind"),
        ("services.toml", "{{codes:egfr,", "{{codes:egfrr,", "unknown value set 'egfrr'"),
        (
            "services.toml",
            'unknown = "pregnancy.unknown"',
            'unknown = "pregnancy.unknwn"',
            "prefetch.pregnancy.unknown: 'pregnancy.unknwn' is not a bool fact in vocabulary.toml",
        ),
        (
            "services.toml",
            'unknown = "pregnancy.unknown"',
            'unknown = "vitd.band"',
            "'vitd.band' is not a bool fact",
        ),
        ("facts.toml", "[labs.egfr]", "[labs.egfr]\nbroken = [", "facts.toml: not valid TOML"),
        ("valuesets/vka.json", '"id": "vka"', '"id": "vkaa"', "vka.json: id: must equal the file name"),
        (
            "facts.toml",
            "plausible = { above = 0, most = 250",
            "plausibl = { above = 0, most = 250",
            "'plausible'",
        ),
        ("facts.toml", 'id = "infant", from_months = 0', 'id = "infant", from_months = 1', "age.bands must"),
        (
            "facts.toml",
            'id = "adult", from_months = 216',
            'id = "adult", from_months = 100',
            "age.bands must",
        ),
    ],
)
def test_broken_file_stops_startup_naming_file_and_field(
    cards: Path, file: str, old: str, new: str, message: str
) -> None:
    edit(cards / file, old, new)
    with pytest.raises(RuleSetError) as raised:
        load_ruleset(cards)
    assert message in raised.value.detail


def test_missing_rules_directory_is_named(cards: Path) -> None:
    shutil.rmtree(cards / "rules")
    with pytest.raises(RuleSetError, match="no rules"):
        load_ruleset(cards)


def test_every_threshold_profile_names_a_known_source() -> None:
    rs = ruleset()
    for profile in rs.profiles.values():
        assert profile.sources and all(s in rs.sources for s in profile.sources)
        bands = profile.bands
        # Bands tile the line: each upper bound is the next lower bound.
        assert all(a.upper == b.lower for a, b in pairwise(bands))


def test_no_rule_cites_the_sources_that_must_never_be_cited() -> None:
    forbidden = ("10.3390/nu15051203", "38512345", "CD014633")
    for path in CARDS.rglob("*.toml"):
        text = path.read_text()
        assert not any(f in text for f in forbidden), path


@pytest.mark.parametrize(
    ("value", "test", "expected"),
    [
        (Interval.exact(25), {"lt": 30}, True),
        (Interval.exact(30), {"lt": 30}, False),
        (Interval.from_comparator(60, ">"), {"lt": 30}, False),
        (Interval.from_comparator(40, "<"), {"lt": 30}, None),
        (Interval.from_comparator(5, "<"), {"lt": 30}, True),
        (None, {"lt": 30}, False),
        (None, {"present": False}, True),
        ("deficient", {"in": ["deficient"]}, True),
        (True, {"eq": True}, True),
    ],
)
def test_three_valued_fact_tests(value, test, expected) -> None:
    condition = FactTest.model_validate({"fact": "x", **test})
    assert evaluate_condition(condition, {"x": value}, {}, []) is expected
