"""`d3k2 check-rules [DIR]`: one line per problem naming file and field, exit 1; or one OK line, exit 0."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from builders import CARDS, FIXTURES, edit_card_file, ruleset
from d3k2.tools.cli import main


@pytest.fixture
def cards(tmp_path: Path) -> Path:
    target = tmp_path / "cards"
    shutil.copytree(CARDS, target)
    return target


edit = edit_card_file


def check(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, ["check-rules", *args], env=env)
    return result.exit_code, result.output.splitlines()


def test_the_shipped_rule_set_is_ok_and_its_fixtures_are_checked() -> None:
    code, lines = check(str(CARDS))
    assert code == 0
    rs = ruleset()
    fields = len(rs.vocabulary.fields.patient) + len(rs.vocabulary.fields.draft)
    assert lines == [
        f"OK {CARDS}: {len(rs.rules)} rules, {len(rs.conditions)} named conditions, "
        f"{len(rs.vocabulary.facts)} facts, {fields} template fields, {len(rs.products)} products, "
        f"{len(rs.sources)} sources, "
        f"{len(rs.profiles)} profiles, {len(rs.services)} services; fixtures checked in {FIXTURES}"
    ]


def test_without_a_directory_the_configured_cards_are_checked(cards: Path) -> None:
    edit(cards, "rules/vitd-toxicity.toml", 'fact = "vitd.band"', 'fact = "vitd.bnd"')
    code, lines = check(env={"D3K2_CARDS_DIR": str(cards)})
    assert code == 1
    assert lines[0].startswith("rules/vitd-toxicity.toml: when.fact: unknown fact 'vitd.bnd' (known: ")


def test_a_copy_without_fixtures_next_to_it_says_so(cards: Path) -> None:
    code, lines = check(str(cards))
    assert code == 0
    assert lines[0].endswith("; fixtures not checked (none found)")


# One kind of mistake each: (file, old, new) and the "file: field" the line must start with.
MISTAKES = {
    "unknown fact": ("rules/vitd-toxicity.toml", 'fact = "vitd.band"', 'fact = "vitd.bnd"', "when.fact"),
    "operator that does not fit": (
        "rules/vitd-high.toml",
        '{ fact = "vitd.band", in = ["high"] }',
        '{ fact = "vitd.band", lt = 80 }',
        "when.all[1].lt",
    ),
    "value the fact cannot take": (
        "rules/vitd-toxicity.toml",
        'in = ["toxicity"]',
        'eq = "toxic"',
        "when.eq",
    ),
    "unknown value in a named condition": (
        "conditions.toml",
        'in = ["high", "very-high", "toxicity"]',
        'in = ["high", "veryhigh", "toxicity"]',
        "conditions.vitd-high.in",
    ),
    "unknown template field": ("rules/vka-k2.toml", "On {vka.names}:", "On {vka.nmes}:", "summary"),
    "unknown template field in a suggestion": (
        "rules/order-k2-vka.toml",
        "of {draft.name}",
        "of {draft.nme}",
        "suggestions[0].label",
    ),
    "unknown band": ("profiles.toml", '{ id = "target"', '{ id = "normal"', "profiles.seed.bands[2].id"),
    "unknown product": (
        "rules/k2-with-d3.toml",
        'product = "k2-100-daily"',
        'product = "k2-1000"',
        "suggestions[0].product",
    ),
    "unknown source": ("rules/vka-k2.toml", 'sources = ["theuwissen-2013"', 'sources = ["x"', "sources[0]"),
    "unknown condition reference": (
        "rules/k2-with-d3.toml",
        '{ ref = "k2-blocked" }',
        '{ ref = "k2-blockd" }',
        "when.all[1].not.ref",
    ),
    "unknown profile": (
        "rules/vitd-deficient.toml",
        'profiles = ["seed", "iom-2011"]',
        'profiles = ["seed", "iom"]',
        "suggestions[0].profiles",
    ),
    "draft fact in a patient rule": (
        "rules/vka-k2.toml",
        '{ fact = "k2.active", eq = false }',
        '{ fact = "draft.concept", eq = "vka" }',
        "when.all[1].fact",
    ),
    "no fixture where it fires": ("rules/vitd-high.toml", 'fires = ["patient-view/high"]', "", "tests.fires"),
    "fixture that does not exist": (
        "rules/vitd-high.toml",
        'fires = ["patient-view/high"]',
        'fires = ["patient-view/hihg"]',
        "tests.fires[0]",
    ),
    "broken TOML": ("rules/vitd-high.toml", "[tests]", "[tests", None),
}


@pytest.mark.parametrize(("file", "old", "new", "field"), MISTAKES.values(), ids=MISTAKES.keys())
def test_each_kind_of_mistake_gives_a_line_naming_file_and_field(
    cards: Path, file: str, old: str, new: str, field: str | None
) -> None:
    edit(cards, file, old, new)
    code, lines = check(str(cards), "--fixtures", str(FIXTURES))
    assert code == 1
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{file}: {field}: " if field else f"{file}: not valid TOML"), lines[0]


def test_several_mistakes_give_several_lines(cards: Path) -> None:
    edit(cards, "rules/vitd-toxicity.toml", 'fact = "vitd.band"', 'fact = "vitd.bnd"')
    edit(cards, "rules/vka-k2.toml", "On {vka.names}:", "On {vka.nmes}:")
    edit(cards, "profiles.toml", 'default = "seed"', 'default = "sed"')
    code, lines = check(str(cards))
    assert code == 1
    assert [line.split(": ")[:2] for line in lines] == [
        ["profiles.toml", "default"],
        ["rules/vitd-toxicity.toml", "when.fact"],
        ["rules/vka-k2.toml", "summary"],
    ]
