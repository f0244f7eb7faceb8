"""The whole order set (CLINICAL.md 6, "Also at order time"): what every draft order of the call adds up
to beside the record, so that two vitamin D drafts, a draft on top of a current product, or K2 drafted
with a vitamin K antagonist are judged together and named on one card.

Pure: no Flask, no requests. order-select judges the selected drafts, but against every draft of
`draftOrders`: the set is the judged orders and the ones not selected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from types import SimpleNamespace

from d3k2.core.dosage import IngredientDose
from d3k2.core.drafts import DraftOrder
from d3k2.core.lenient import fmt
from d3k2.core.quantities import Interval, format_number, format_total
from d3k2.core.record import MedicationFact
from d3k2.core.texts import Texts

VITAMIN_D = "vitamin-d"


@dataclass(frozen=True)
class OrderSet:
    vitamin_d: tuple[tuple[DraftOrder, IngredientDose], ...]
    judged: tuple[tuple[DraftOrder, IngredientDose], ...]  # the vitamin D drafts that are judged (selected)
    current: tuple[MedicationFact, ...]  # current vitamin D products, drafts on record left out
    concepts: frozenset[str]
    names: dict[str, tuple[str, ...]]  # concept → names of the drafts that have it

    @property
    def lead(self) -> tuple[DraftOrder, IngredientDose] | None:
        """The vitamin D draft a set card is shown on: the highest known daily dose (the first on a tie,
        or the first when no dose is known), so that a set gives one card, not one per draft. Only a judged
        draft can carry it: a card on a draft not selected would never be shown."""
        if not self.judged:
            return None
        return max(self.judged, key=lambda pair: pair[1].daily if pair[1].daily is not None else -1.0)

    @property
    def known_total(self) -> float:
        """IU/day of the set and the current products whose dose can be read: a lower bound of the total,
        so a ceiling it exceeds is certainly exceeded."""
        drafted = sum(i.daily for _, i in self.vitamin_d if i.daily is not None)
        return drafted + sum(m.daily for m in self.current if m.daily is not None)

    @property
    def complete(self) -> bool:
        return all(i.daily is not None for _, i in self.vitamin_d) and all(
            m.daily is not None for m in self.current
        )


def _name(draft: DraftOrder, ingredient: IngredientDose) -> str:
    return draft.medication_text or ingredient.name


def _vitamin_d(orders: Sequence[DraftOrder]) -> tuple[tuple[DraftOrder, IngredientDose], ...]:
    return tuple((d, i) for d in orders for i in d.ingredients if i.concept == VITAMIN_D)


def order_set(
    judged: Sequence[DraftOrder], unselected: Sequence[DraftOrder], current: Sequence[MedicationFact]
) -> OrderSet:
    orders = (*judged, *unselected)
    vitamin_d = _vitamin_d(orders)
    names: dict[str, list[str]] = {}
    for draft in orders:
        for ingredient in draft.ingredients:
            found = names.setdefault(ingredient.concept, [])
            if _name(draft, ingredient) not in found:
                found.append(_name(draft, ingredient))
    # A MedicationRequest on record in "draft" status is most often the very order being signed: counting
    # it again would call one order a duplicate.
    on_record = tuple(m for m in current if m.status != "draft")
    return OrderSet(
        vitamin_d=vitamin_d,
        judged=_vitamin_d(judged),
        current=on_record,
        concepts=frozenset(names),
        names={k: tuple(v) for k, v in names.items()},
    )


def set_values(
    the_set: OrderSet, draft: DraftOrder, ingredient: IngredientDose
) -> dict[str, bool | float | Interval | None]:
    lead = the_set.lead
    is_lead = lead is not None and lead[0] is draft and lead[1] is ingredient
    total = the_set.known_total if ingredient.concept == VITAMIN_D else None
    return {
        "drafts.vka": "vka" in the_set.concepts,
        "drafts.k2": "vitamin-k2" in the_set.concepts,
        "drafts.vitamin_d_count": float(len(the_set.vitamin_d)),
        "drafts.current_vitamin_d": bool(the_set.current),
        "draft.set_lead": is_lead,
        "draft.total_daily": Interval.exact(total) if total is not None else None,
        # The same total a week (to 0.01 IU, so that 50,000 IU once weekly is 50,000), and whether this
        # draft's dose is stated once a week: Holick 2011's weekly treatment course is judged as a course,
        # not as its daily equivalent (CLINICAL.md 3a).
        "draft.total_weekly": Interval.exact(round(total * 7, 2)) if total is not None else None,
        "draft.weekly_schedule": _weekly_lead(ingredient) is not None,
    }


def _weekly_lead(ingredient: IngredientDose) -> str | None:
    """A weekly dose's own lead ("50,000 IU/week"): weekly doses stay weekly (CLINICAL.md 6a)."""
    return ingredient.lead if ingredient.lead_period == "wk" else None


def _daily(amount: float | None, texts: Texts) -> str:
    if amount is None:
        return texts.unknown_dose
    return texts.daily_dose.format(amount=format_number(amount), unit="IU")


def _in_all(the_set: OrderSet, texts: Texts) -> str:
    total = texts.doses["in_all"].format(total=format_total(the_set.known_total))
    return total if the_set.complete else texts.doses["at_least"].format(total=total)


def combined_text(the_set: OrderSet, texts: Texts) -> str:
    """The combined daily vitamin D dose with each part: "7,000 IU/day in all: A (5,000 IU/day) + B …"."""
    words = texts.doses
    parts = [
        words["set_part"].format(name=_name(d, i), dose=_weekly_lead(i) or _daily(i.daily, texts))
        for d, i in the_set.vitamin_d
    ]
    parts += [
        words["set_on_record"].format(name=m.product or m.name, dose=_daily(m.daily, texts))
        for m in the_set.current
    ]
    if len(parts) == 1:
        return parts[0]
    return words["set_total"].format(total=_in_all(the_set, texts), parts=" + ".join(parts))


def total_text(the_set: OrderSet, texts: Texts) -> str:
    """The set's vitamin D in a few words: one product's own lead ("50,000 IU/week", weekly doses stay
    weekly), or "7,000 IU/day in all"."""
    if len(the_set.vitamin_d) + len(the_set.current) == 1 and the_set.vitamin_d:
        only = the_set.vitamin_d[0][1]
        return only.lead if only.daily is not None else texts.unknown_dose
    return _in_all(the_set, texts)


def partner_names(the_set: OrderSet, texts: Texts, *concepts: str) -> str:
    return ", ".join(n for c in concepts for n in the_set.names.get(c, ())) or texts.none


def draft_fields(
    draft: DraftOrder, ingredient: IngredientDose, texts: Texts, the_set: OrderSet
) -> SimpleNamespace:
    """The {draft.*} template fields of one ingredient of one draft order, with the set it is judged in."""
    daily = texts.unknown_dose
    if ingredient.daily is not None and ingredient.unit:
        # The digits of the draft's own arithmetic: calcitriol 0.25 mcg/day, never "0.2 mcg/day" (6a).
        daily = texts.daily_dose.format(amount=fmt(Decimal(repr(ingredient.daily))), unit=ingredient.unit)
    # A weekly dose stays weekly ("50,000 IU weekly", not "7,142.9 IU/day"): its arithmetic leads with it.
    if ingredient.weekly is not None and _weekly_lead(ingredient):
        daily = texts.weekly_dose.format(amount=format_number(ingredient.weekly), unit=ingredient.unit)
    return SimpleNamespace(
        name=_name(draft, ingredient),
        arithmetic=ingredient.arithmetic,
        daily=daily,
        basis=texts.dosage[f"basis_{ingredient.basis}"],
        combined=combined_text(the_set, texts),
        total=total_text(the_set, texts),
        vka_drafts=partner_names(the_set, texts, "vka"),
        k_drafts=partner_names(the_set, texts, "vitamin-k2", "vitamin-k1"),
    )
