"""Current ergocalciferol (vitamin D2) products: the facts and fields of the rules that suggest the same
amount as cholecalciferol (D3), which raises 25(OH)D more (cards/rules/vitd-d2-to-d3.toml). Pure."""

from __future__ import annotations

from types import SimpleNamespace

from d3k2.core.facts import Facts
from d3k2.core.quantities import Interval, format_number
from d3k2.core.record import MedicationFact

# The ingredient name cards/medications.toml gives vitamin D2 (its `names` table of vitamin-d).
D2 = "ergocalciferol"


def current_d2(facts: Facts) -> list[MedicationFact]:
    """Current vitamin D2 products, one per product and dose: one product on two records (a request, and
    the statement that records taking it) is one intake, not two."""
    found = (m for m in facts.meds("vitamin-d") if m.name == D2)
    return list({(m.product, m.dose, m.daily): m for m in found}.values())


def d2_values(facts: Facts) -> dict[str, Interval | None]:
    """IU per day and per week of current D2 (rounded to 0.01 IU, so that 50,000 IU once weekly is 50,000
    a week); absent without any, or when a dose cannot be read: no amount is then suggested."""
    doses = [m.daily for m in current_d2(facts)]
    if not doses or None in doses:
        return {"vitamin_d2.daily": None, "vitamin_d2.weekly": None}
    daily = sum(d for d in doses if d is not None)
    return {
        "vitamin_d2.daily": Interval.exact(round(daily, 2)),
        "vitamin_d2.weekly": Interval.exact(round(daily * 7, 2)),
    }


def d2_fields(facts: Facts) -> SimpleNamespace:
    products = current_d2(facts)
    if not products:
        return SimpleNamespace(names="none", daily="none")
    names = ", ".join(sorted({m.product for m in products}))
    # Each product's own lead ("2,000 IU/day", "50,000 IU/week") or why its dose is unknown.
    leads = sorted(m.dose.split(":", 1)[0] if m.daily is not None else m.dose for m in products)
    doses = [m.daily for m in products]
    if len(products) == 1:
        daily = leads[0]
    elif None in doses:
        daily = "unknown (" + "; ".join(leads) + ")"
    else:
        total = sum(d for d in doses if d is not None)
        daily = f"{format_number(total)} IU/day in all ({' + '.join(leads)})"
    return SimpleNamespace(names=names, daily=daily)
