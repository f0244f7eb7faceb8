"""The whole order set: lead draft, combined vitamin D dose (a lower bound when a part is unknown), names."""

from __future__ import annotations

import dataclasses

from builders import ruleset
from d3k2.core.dosage import IngredientDose
from d3k2.core.drafts import DraftOrder
from d3k2.core.orderset import combined_text, order_set, partner_names, set_values, total_text
from d3k2.core.quantities import Interval
from d3k2.core.record import MedicationFact

TEXTS = ruleset().texts


def _dose(concept: str, daily: float | None, lead: str = "") -> IngredientDose:
    arithmetic = f"{lead}: detail" if daily is not None else "dose unknown: no dosage instruction"
    weekly = daily * 7 if daily is not None else None
    period = "" if daily is None else ("wk" if lead.endswith("/week") else "d")
    return IngredientDose(
        concept, concept, None, "IU", daily, weekly, arithmetic, "structured", "code", lead, period
    )


def _draft(ref: str, text: str | None, *doses: IngredientDose) -> DraftOrder:
    return DraftOrder(ref, "MedicationRequest", ref, text, None, doses, ())


def _current(daily: float | None, status: str = "active") -> MedicationFact:
    return MedicationFact(
        "vitamin-d", "Vitamin D3", status, "MedicationStatement", "code", "D3 2000", daily, ""
    )


def test_the_lead_is_the_judged_draft_with_the_highest_known_dose() -> None:
    low, high, unknown = (
        _dose("vitamin-d", 1000, "1,000 IU/day"),
        _dose("vitamin-d", 5000, "5,000 IU/day"),
        _dose("vitamin-d", None),
    )
    a, b, c = _draft("a", "A", low), _draft("b", "B", high), _draft("c", None, unknown)
    the_set = order_set([c, a], [b], [])
    assert the_set.lead == (a, low)  # b is higher but not selected
    assert set_values(the_set, a, low)["draft.set_lead"] is True
    assert set_values(the_set, c, unknown)["draft.set_lead"] is False
    # A lower bound: the unknown dose adds nothing, and the text says "at least".
    assert set_values(the_set, a, low)["draft.total_daily"] == Interval.exact(6000)
    assert total_text(the_set, TEXTS) == "at least 6,000 IU/day in all"
    assert combined_text(the_set, TEXTS) == (
        "at least 6,000 IU/day in all: vitamin-d (unknown dose) + A (1,000 IU/day) + B (5,000 IU/day)"
    )


def test_an_unknown_dose_alone_is_unknown_and_still_leads() -> None:
    unknown = _dose("vitamin-d", None)
    draft = _draft("a", "A", unknown)
    the_set = order_set([draft], [], [])
    assert the_set.lead == (draft, unknown)
    assert total_text(the_set, TEXTS) == "unknown dose"
    assert combined_text(the_set, TEXTS) == "A (unknown dose)"


def test_a_weekly_dose_alone_stays_weekly() -> None:
    weekly = _dose("vitamin-d", 50000 / 7, "50,000 IU/week")
    the_set = order_set([_draft("a", "A", weekly)], [], [])
    assert total_text(the_set, TEXTS) == "50,000 IU/week"


def test_current_products_count_but_a_draft_on_record_is_the_order_itself() -> None:
    d3 = _dose("vitamin-d", 2000, "2,000 IU/day")
    draft = _draft("a", "A", d3)
    the_set = order_set([draft], [], [_current(5000), _current(None), _current(2000, status="draft")])
    values = set_values(the_set, draft, d3)
    assert values["drafts.current_vitamin_d"] is True
    assert values["draft.total_daily"] == Interval.exact(7000)
    assert combined_text(the_set, TEXTS) == (
        "at least 7,000 IU/day in all: A (2,000 IU/day) + D3 2000, on record (5,000 IU/day)"
        " + D3 2000, on record (unknown dose)"
    )


def test_set_facts_without_vitamin_d_and_partner_names() -> None:
    k2, vka = _dose("vitamin-k2", 100, "100 mcg/day"), _dose("vka", 5, "5 mg/day")
    k2_draft, vka_draft, again = (
        _draft("a", "K2", k2),
        _draft("b", "Warfarin", vka),
        _draft("c", "Warfarin", vka),
    )
    the_set = order_set([k2_draft], [vka_draft, again], [])
    values = set_values(the_set, k2_draft, k2)
    assert values == {
        "drafts.vka": True,
        "drafts.k2": True,
        "drafts.vitamin_d_count": 0.0,
        "drafts.current_vitamin_d": False,
        "draft.set_lead": False,
        "draft.total_daily": None,
        "draft.total_weekly": None,
        "draft.weekly_schedule": False,
    }
    assert partner_names(the_set, TEXTS, "vka") == "Warfarin"  # one name for two drafts of it
    assert partner_names(the_set, TEXTS, "vitamin-k1") == "none"
    assert the_set.lead is None


def test_the_weekly_course_is_told_from_its_daily_equivalent() -> None:
    weekly = _dose("vitamin-d", 50000 / 7, "50,000 IU/week")
    daily = _dose("vitamin-d", 50000 / 7, "7,142.86 IU/day")
    alone = order_set([_draft("w", "W", weekly)], [], [])
    values = set_values(alone, alone.judged[0][0], weekly)
    assert values["draft.weekly_schedule"] is True
    assert values["draft.total_weekly"] == Interval.exact(50000)
    same_amount_daily = order_set([_draft("d", "D", daily)], [], [])
    daily_values = set_values(same_amount_daily, same_amount_daily.judged[0][0], daily)
    assert daily_values["draft.weekly_schedule"] is False


def test_a_weekly_dose_beside_a_daily_one_has_no_fraction_of_an_iu() -> None:
    weekly = _dose("vitamin-d", 50000 / 7, "50,000 IU/week")
    the_set = order_set([_draft("w", "W", weekly)], [], [_current(2000)])
    # 7,142.857… + 2,000 IU/day: "about 9,143" (rounded up: never below a whole-number ceiling it exceeds).
    assert total_text(the_set, TEXTS) == "about 9,143 IU/day in all"
    assert combined_text(the_set, TEXTS).startswith("about 9,143 IU/day in all: W (50,000 IU/week) + ")
    assert set_values(the_set, the_set.judged[0][0], weekly)["draft.total_weekly"] == Interval.exact(64000)


def test_the_set_is_worded_from_the_texts_file() -> None:
    """Every word of the set's total comes from cards/texts.toml ([doses], unknown_dose, none)."""
    doses = {
        **TEXTS.doses,
        "in_all": "{total} «in all»",
        "at_least": "«at least» {total}",
        "set_part": "«{name}={dose}»",
        "set_on_record": "«{name} rec {dose}»",
    }
    doses["set_total"] = "{total} «:» {parts}"
    texts = dataclasses.replace(TEXTS, doses=doses, unknown_dose="«?»", none="«none»")
    d3, unknown = _dose("vitamin-d", 2000, "2,000 IU/day"), _dose("vitamin-d", None)
    the_set = order_set([_draft("a", "A", d3), _draft("b", "B", unknown)], [], [_current(1000)])
    assert total_text(the_set, texts) == "«at least» 3,000 «in all»"
    assert combined_text(the_set, texts) == (
        "«at least» 3,000 «in all» «:» «A=2,000 IU/day» + «B=«?»» + «D3 2000 rec 1,000 IU/day»"
    )
    assert partner_names(the_set, texts, "vka") == "«none»"
