"""The loader checks every rule and named condition against cards/vocabulary.toml and against the rest of
the rule set, and names every problem at once: file, field path, what is wrong."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from builders import CARDS, FIXTURES, edit_card_file
from d3k2.core.errors import RuleSetError
from d3k2.core.loader import load_ruleset

BANDS = "deficient, insufficient, target, high, very-high, toxicity"
BAND_OPS = "use eq, ne or in with its values, or present"
BOOL_OPS = "use eq or ne with true or false, or present"


@pytest.fixture
def cards(tmp_path: Path) -> Path:
    target = tmp_path / "cards"
    shutil.copytree(CARDS, target)
    return target


edit = edit_card_file


def problems(cards: Path, fixtures: Path | None = None) -> list[str]:
    with pytest.raises(RuleSetError) as raised:
        load_ruleset(cards, fixtures)
    return list(raised.value.extra.get("problems", [raised.value.detail]))


# One case per kind of mistake: (file, old, new) edits, and the one problem line expected.
MISTAKES = {
    "unknown fact": (
        [("rules/vitd-toxicity.toml", 'fact = "vitd.band"', 'fact = "vitd.bnd"')],
        "rules/vitd-toxicity.toml: when.fact: unknown fact 'vitd.bnd' (known: age.band, ",
    ),
    "unknown named condition in an indicator case": (
        [
            (
                "rules/hypercalcemia.toml",
                '{ ref = "hypercalcemia-below-severe-off-d" }',
                '{ ref = "hypercalcemia-below-severe" }',
            )
        ],
        "rules/hypercalcemia.toml: indicator_when[0].when.ref: unknown named condition "
        "'hypercalcemia-below-severe'",
    ),
    "ordering operator on a band": (
        [("rules/vitd-high.toml", '{ fact = "vitd.band", in = ["high"] }', '{ fact = "vitd.band", lt = 3 }')],
        f"rules/vitd-high.toml: when.all[1].lt: lt = 3.0 does not fit vitd.band, a band ({BAND_OPS})",
    ),
    "value a band cannot take": (
        [("rules/vitd-toxicity.toml", 'in = ["toxicity"]', 'eq = "toxic"')],
        f"rules/vitd-toxicity.toml: when.eq: unknown value 'toxic' for vitd.band (allowed: {BANDS})",
    ),
    "unknown value in `in` of a named condition": (
        [
            (
                "conditions.toml",
                'in = ["high", "very-high", "toxicity"]',
                'in = ["high", "very high", "toxicity"]',
            )
        ],
        "conditions.toml: conditions.vitd-high.in: unknown value 'very high' for vitd.band "
        f"(allowed: {BANDS})",
    ),
    "string compared with a bool fact": (
        [("rules/vka-k2.toml", '{ fact = "vka.active", eq = true }', '{ fact = "vka.active", eq = "yes" }')],
        f"rules/vka-k2.toml: when.all[0].eq: eq = 'yes' does not fit vka.active, a bool ({BOOL_OPS})",
    ),
    "bool compared with a number fact": (
        [
            (
                "conditions.toml",
                '{ fact = "egfr.lowest_band", in = ["G4", "G5"] }',
                '{ fact = "egfr.value", eq = true }',
            )
        ],
        "conditions.toml: conditions.kidney-advanced.any[0].eq: eq = True does not fit egfr.value, a number "
        "(use lt, le, gt, ge, eq with a number, or present)",
    ),
    "unknown value of an enum in a suggestion's condition": (
        [
            (
                "rules/order-k2-vka.toml",
                'when = { fact = "draft.has_vitamin_d", eq = true }',
                'when = { fact = "draft.concept", ne = "vitamin-e" }',
            )
        ],
        "rules/order-k2-vka.toml: suggestions[1].when.ne: unknown value 'vitamin-e' for draft.concept "
        "(allowed: vitamin-d, vitamin-d-analog, vitamin-k2, vitamin-k1, vka, doac)",
    ),
    "unknown template field in a suggestion label": (
        [
            (
                "rules/order-k2-vka.toml",
                'label = "Remove the draft order of {draft.name}"',
                'label = "Remove the draft order of {draft.nam}"',
            )
        ],
        "rules/order-k2-vka.toml: suggestions[0].label: unknown template field {draft.nam}",
    ),
    "unknown template field in a detail": (
        [("rules/vka-k2.toml", "**{vka.names}** ({vka.sources})", "**{vka.name}** ({vka.sources})")],
        "rules/vka-k2.toml: detail: unknown template field {vka.name}",
    ),
    "draft template field in a patient rule": (
        [("rules/vka-k2.toml", "On {vka.names}:", "On {draft.name}:")],
        "rules/vka-k2.toml: summary: template field {draft.name} exists only for draft orders; "
        "this is a patient rule",
    ),
    "broken template": (
        [("rules/vka-k2.toml", "On {vka.names}:", "On {vka.names:")],
        "rules/vka-k2.toml: summary: not a valid template: ",
    ),
    "draft fact in a patient rule": (
        [
            (
                "rules/vka-k2.toml",
                '{ fact = "k2.active", eq = false }',
                '{ fact = "draft.dose_known", eq = false }',
            )
        ],
        "rules/vka-k2.toml: when.all[1].fact: draft.dose_known exists only for draft orders; "
        "this is a patient rule",
    ),
    "named condition on draft facts in a patient rule": (
        [
            (
                "conditions.toml",
                "vitd-high = {",
                'draft-d = { fact = "draft.concept", eq = "vitamin-d" }\nvitd-high = {',
            ),
            (
                "rules/vitd-high.toml",
                '{ fact = "vitd.usable", eq = true },',
                '{ not = { ref = "draft-d" } },',
            ),
        ],
        "rules/vitd-high.toml: when.all[0].not.ref: 'draft-d' tests draft-order facts; "
        "this is a patient rule",
    ),
    "unknown named condition": (
        [("rules/k2-with-d3.toml", '{ ref = "k2-blocked" }', '{ ref = "k2-blockd" }')],
        "rules/k2-with-d3.toml: when.all[1].not.ref: unknown named condition 'k2-blockd' "
        "(known: adult-regimen, child-regimen, dosing-blocked, ",
    ),
    "named condition referring to itself": (
        [
            (
                "conditions.toml",
                'vitd-high = { fact = "vitd.band"',
                'vitd-high = { any = [{ ref = "vitd-high" }] }\nx = { fact = "vitd.band"',
            )
        ],
        "conditions.toml: conditions.vitd-high: refers to itself through named conditions",
    ),
    "unknown band in a profile": (
        [
            (
                "profiles.toml",
                '{ id = "toxicity", label = "possible toxicity (> 150 ng/mL)"',
                '{ id = "toxic", label = "possible toxicity (> 150 ng/mL)"',
            )
        ],
        "profiles.toml: profiles.seed.bands[5].id: unknown band 'toxic' "
        "(known: deficient, high, insufficient, target, toxicity, very-high)",
    ),
    "unknown product": (
        [("rules/k2-with-d3.toml", 'product = "k2-100-daily"', 'product = "k2-1000"')],
        "rules/k2-with-d3.toml: suggestions[0].product: unknown product 'k2-1000'",
    ),
    "unknown source": (
        [("rules/vka-k2.toml", 'sources = ["theuwissen-2013"', 'sources = ["seed-article"')],
        "rules/vka-k2.toml: sources[0]: unknown source 'seed-article'",
    ),
    "unknown profile": (
        [("rules/vitd-deficient.toml", 'profiles = ["seed", "iom-2011"]', 'profiles = ["seed", "iom-2012"]')],
        "rules/vitd-deficient.toml: suggestions[0].profiles: unknown profile 'iom-2012'",
    ),
    "unknown category blocked": (
        [
            (
                "rules/hypercalcemia.toml",
                'blocks = ["vitamin-d", "vitamin-k2"]',
                'blocks = ["vitamin-d", "vitamin-k3"]',
            )
        ],
        "rules/hypercalcemia.toml: blocks[1]: unknown medication category 'vitamin-k3'",
    ),
    "no fixture where it fires": (
        [
            (
                "rules/vka-k2.toml",
                'fires = ["patient-view/warfarin-active", "patient-view/warfarin-by-reference", '
                '"patient-view/warfarin-contained",\n  "patient-view/warfarin-no-birthdate", '
                '"patient-view/warfarin-pregnancy-status-missing"]',
                "fires = []",
            )
        ],
        "rules/vka-k2.toml: tests.fires: no fixture where it fires",
    ),
    "no fixture where it stays silent": (
        [
            (
                "rules/vka-k2.toml",
                'silent = ["patient-view/warfarin-with-k2", "patient-view/warfarin-stopped", '
                '"patient-view/warfarin-target",\n  "patient-view/sandbox-patient-view"]',
                "",
            )
        ],
        "rules/vka-k2.toml: tests.silent: no fixture where it stays silent",
    ),
    "unknown key in the vocabulary": (
        [
            (
                "vocabulary.toml",
                'scope = "draft", values = ["vitamin-d", ',
                'scope = "draft", valuez = ["vitamin-d", ',
            )
        ],
        "vocabulary.toml: facts.draft.concept.valuez: Extra inputs are not permitted",
    ),
}


@pytest.mark.parametrize(("edits", "line"), MISTAKES.values(), ids=MISTAKES.keys())
def test_each_kind_of_mistake_is_named_with_file_and_field(
    cards: Path, edits: list[tuple[str, str, str]], line: str
) -> None:
    for file, old, new in edits:
        edit(cards, file, old, new)
    found = problems(cards)
    assert len(found) == 1, found
    assert found[0].startswith(line), found[0]


def test_a_rule_without_fixture_lists_is_refused(cards: Path) -> None:
    edit(cards, "rules/vka-k2.toml", "[tests]\n", "[nothing]\n")
    assert problems(cards) == [
        "rules/vka-k2.toml: nothing: Extra inputs are not permitted",
    ]
    text = (cards / "rules/vka-k2.toml").read_text(encoding="utf-8")
    (cards / "rules/vka-k2.toml").write_text(text.split("\n[nothing]\n")[0] + "\n", encoding="utf-8")
    assert problems(cards) == [
        "rules/vka-k2.toml: tests.fires: no fixture where it fires",
        "rules/vka-k2.toml: tests.silent: no fixture where it stays silent",
    ]


def test_a_value_set_enum_needs_values(cards: Path) -> None:
    edit(cards, "vocabulary.toml", '"pregnant" = { type = "bool" }', '"pregnant" = { type = "enum" }')
    assert problems(cards) == [
        "vocabulary.toml: facts.pregnant: Value error, enum and band facts list their values; "
        "bool and number facts have none"
    ]


def test_fitting_tests_load(cards: Path) -> None:
    # A number compared for equality, a band compared with eq and ne, `present` on any fact.
    edit(
        cards,
        "conditions.toml",
        '{ fact = "egfr.lowest_band", in = ["G4", "G5"] }',
        '{ fact = "egfr.value", eq = 29 }',
    )
    edit(cards, "rules/vitd-toxicity.toml", 'in = ["toxicity"]', 'eq = "toxicity"')
    edit(
        cards,
        "rules/vitd-high.toml",
        '{ fact = "vitd.usable", eq = true }',
        '{ fact = "vitd.band", ne = "target" }',
    )
    edit(
        cards,
        "rules/vka-k2.toml",
        '{ fact = "k2.active", eq = false }',
        '{ fact = "draft.concept", present = false }',
    )
    problem = problems(cards)
    # the last one is refused for its scope only, not for its operator
    assert problem == [
        "rules/vka-k2.toml: when.all[1].fact: draft.concept exists only for draft orders; "
        "this is a patient rule"
    ]


def test_several_mistakes_are_named_together(cards: Path) -> None:
    edit(cards, "rules/vitd-toxicity.toml", 'fact = "vitd.band"', 'fact = "vitd.bnd"')
    edit(cards, "rules/vka-k2.toml", 'indicator = "warning"', 'indicator = "loud"')
    edit(cards, "rules/k2-with-d3.toml", 'product = "k2-100-daily"', 'product = "k2-1000"')
    edit(
        cards,
        "conditions.toml",
        '{ fact = "egfr.lowest_band", in = ["G4", "G5"] }',
        '{ fact = "egfr.value", in = ["low"] }',
    )
    with pytest.raises(RuleSetError) as raised:
        load_ruleset(cards)
    found = raised.value.extra["problems"]
    assert [line.split(": ")[0:2] for line in found] == [
        ["rules/vka-k2.toml", "indicator"],
        ["conditions.toml", "conditions.kidney-advanced.any[0].in"],
        ["rules/k2-with-d3.toml", "suggestions[0].product"],
        ["rules/vitd-toxicity.toml", "when.fact"],
    ]
    assert raised.value.detail == f"4 problems in the rule set {cards}:\n" + "\n".join(found)


def test_a_shared_file_that_cannot_be_read_stops_before_the_cross_checks(cards: Path) -> None:
    # Every rule would fail against a missing vocabulary; only the files themselves are named.
    (cards / "vocabulary.toml").unlink()
    (cards / "facts.toml").unlink()
    edit(cards, "rules/vka-k2.toml", 'indicator = "warning"', 'indicator = "loud"')
    edit(cards, "rules/vitd-toxicity.toml", 'fact = "vitd.band"', 'fact = "vitd.bnd"')
    assert problems(cards) == [
        "facts.toml: file missing",
        "vocabulary.toml: file missing",
        "rules/vka-k2.toml: indicator: Input should be 'info', 'warning' or 'critical'",
    ]


def test_a_broken_facts_file_is_named(cards: Path) -> None:
    edit(cards, "facts.toml", "[labs.egfr]", "[labs.egfr]\nbroken = [")
    assert problems(cards)[0].startswith("facts.toml: not valid TOML: ")


def test_fixtures_named_by_rules_are_checked_when_asked(cards: Path) -> None:
    edit(
        cards, "rules/vka-k2.toml", '"patient-view/warfarin-contained",', '"patient-view/warfarin-contianed",'
    )
    edit(cards, "rules/vitd-high.toml", 'silent = ["patient-view/target"', 'silent = ["order-sign/k2-no-vka"')
    load_ruleset(cards)  # the service itself does not look for fixtures
    assert problems(cards, FIXTURES) == [
        "rules/vitd-high.toml: tests.silent[0]: fixture 'order-sign/k2-no-vka' is a order-sign call; "
        "the rule runs on patient-view",
        f"rules/vka-k2.toml: tests.fires[2]: no fixture 'patient-view/warfarin-contianed' in {FIXTURES}",
    ]


def test_the_shipped_rule_set_passes_every_check() -> None:
    ruleset = load_ruleset(CARDS, FIXTURES)
    assert len(ruleset.rules) == len(list((CARDS / "rules").glob("*.toml")))
    assert ruleset.vocabulary.bands() == set(BANDS.split(", "))


def test_a_medication_fact_must_be_declared(tmp_path: Path) -> None:
    cards = tmp_path / "cards"
    shutil.copytree(CARDS, cards)
    path = cards / "medications.toml"
    path.write_text(path.read_text(encoding="utf-8").replace('fact = "k2.active"', 'fact = "k2.actve"'))
    with pytest.raises(
        RuleSetError, match=r"medications.toml: categories\.vitamin-k2\.fact: 'k2.actve' is not declared"
    ):
        load_ruleset(cards)
