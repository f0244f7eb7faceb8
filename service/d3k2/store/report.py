"""The governance report: per rule, the cards served and what clinicians did with them.

Feedback names only a card uuid, so every served card is recorded with its rule (``source.topic.code``):
the report joins the two. ``d3k2 feedback report`` prints ``Report.to_text`` or ``Report.to_json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from d3k2.store.schema import cards_served, feedback

TOP_REASONS = 3


@dataclass(frozen=True)
class ReasonCount:
    code: str | None  # None: overridden without a reason (the sandbox's plain "Dismiss")
    system: str | None
    count: int

    @property
    def label(self) -> str:
        return self.code or "(no reason given)"


@dataclass(frozen=True)
class RuleReport:
    rule: str | None  # None: feedback on cards this store never saw served
    served: int = 0
    shown: int = 0
    accepted: int = 0
    overridden: int = 0
    feedback: int = 0
    top_reasons: list[ReasonCount] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.shown if self.shown else None


@dataclass(frozen=True)
class Report:
    since: datetime | None
    rules: list[RuleReport]

    def to_json(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat() if self.since else None,
            "rules": [
                {**asdict(rule), "acceptance_rate": rule.acceptance_rate, "rule": rule.rule}
                for rule in self.rules
            ],
        }

    def to_text(self) -> str:
        header = f"Feedback per rule since {self.since.isoformat()}" if self.since else "Feedback per rule"
        head = ("rule", "shown", "served", "accepted", "overridden", "accept%", "top override reasons")
        lines = [header, ""]
        table = [head]
        for rule in self.rules:
            rate = rule.acceptance_rate
            table.append(
                (
                    rule.rule or "(unknown card)",
                    str(rule.shown),
                    str(rule.served),
                    str(rule.accepted),
                    str(rule.overridden),
                    f"{rate * 100:.1f}" if rate is not None else "-",
                    ", ".join(f"{r.label} ({r.count})" for r in rule.top_reasons) or "-",
                )
            )
        widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
        for row in table:
            cells = [row[0].ljust(widths[0])] + [
                cell.rjust(w) for cell, w in zip(row[1:-1], widths[1:], strict=True)
            ]
            lines.append("  ".join([*cells, row[-1]]).rstrip())
        if not self.rules:
            lines.append("(no cards served and no feedback in this period)")
        return "\n".join(lines)


def query_report(connection: Connection, since: datetime | None = None) -> Report:
    """Per rule: cards served and shown (distinct uuids), cards accepted / overridden (distinct
    uuids with that outcome), feedback items, and the most frequent override reasons.

    Feedback stored without a rule takes its card's rule from ``cards_served`` when the card's row
    is there now: another worker's batch may have been written after the feedback."""
    shown_filter = [cards_served.c.served_at >= since] if since else []
    served_rule = (
        select(func.max(cards_served.c.rule_id))
        .where(cards_served.c.card_uuid == feedback.c.card_uuid)
        .scalar_subquery()
    )
    resolved = (
        select(
            func.coalesce(feedback.c.rule_id, served_rule).label("rule_id"),
            feedback.c.card_uuid,
            feedback.c.outcome,
            feedback.c.override_reason_system,
            feedback.c.override_reason_code,
        )
        .where(*([feedback.c.received_at >= since] if since else []))
        .subquery("resolved")
    )
    by_rule: dict[str | None, dict[str, Any]] = {}

    def entry(rule: str | None) -> dict[str, Any]:
        return by_rule.setdefault(rule, {"rule": rule, "top_reasons": []})

    for rule, served, shown in connection.execute(
        select(
            cards_served.c.rule_id,
            func.count(),
            func.count(cards_served.c.card_uuid.distinct()),
        )
        .where(*shown_filter)
        .group_by(cards_served.c.rule_id)
    ):
        entry(rule).update(served=served, shown=shown)
    for rule, outcome, items, cards in connection.execute(
        select(
            resolved.c.rule_id,
            resolved.c.outcome,
            func.count(),
            func.count(resolved.c.card_uuid.distinct()),
        ).group_by(resolved.c.rule_id, resolved.c.outcome)
    ):
        row = entry(rule)
        row["feedback"] = row.get("feedback", 0) + items
        if outcome in ("accepted", "overridden"):
            row[outcome] = cards
    reasons = connection.execute(
        select(
            resolved.c.rule_id,
            resolved.c.override_reason_system,
            resolved.c.override_reason_code,
            func.count(),
        )
        .where(resolved.c.outcome == "overridden")
        .group_by(resolved.c.rule_id, resolved.c.override_reason_system, resolved.c.override_reason_code)
    ).all()
    # Sorted here, not in SQL: SQLite and PostgreSQL order NULLs differently.
    for rule, system, code, items in sorted(reasons, key=lambda r: (-r[3], r[2] or "", r[1] or "")):
        top = entry(rule)["top_reasons"]
        if len(top) < TOP_REASONS:
            top.append(ReasonCount(code=code, system=system, count=items))
    rules = [RuleReport(**values) for values in by_rule.values()]
    rules.sort(key=lambda r: (r.rule is None, r.rule or ""))
    return Report(since=since, rules=rules)
