"""The governance report: per rule, the cards shown and what clinicians did with them, and the trend by
ISO week.

Feedback names only a card uuid, so every served card is recorded with its rule (``source.topic.code``):
the report joins the two. A card's uuid is the same for the same patient, hook, rule and draft order on
one day (d3k2.core.cards.card_uuid), so "shown" counts decisions, not calls: the sandbox's order-select
fires on every keystroke. ``d3k2 feedback report`` prints ``Report.to_text``, ``Report.to_json`` or the
HTML page (d3k2.tools.governance).

An acceptance from a hook whose suggestions the EHR does not apply (``Names.not_applied``: patient-view;
the CDS Hooks sandbox sends "accepted" feedback there although nothing is applied) is counted apart:
"accepted, not applied".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from d3k2.core.ruleset import RuleSet
from d3k2.store.schema import cards_served, feedback

TOP_REASONS = 3
NO_REASON = "(no reason given)"
UNKNOWN_CARD = "(cards not on record)"
# Hooks at which an "accepted" outcome does not mean the suggestion was applied: the CDS Hooks sandbox
# never applies patient-view suggestions, but sends the feedback (shared/sandbox/README.md, "Feedback
# shape" and "When feedback is sent").
NOT_APPLIED_HOOKS = frozenset({"patient-view"})


@dataclass(frozen=True)
class Names:
    """What the database does not hold: each rule's title, each override reason's words, each service's
    hook (from the rule set: ``names_of``). Without them the report shows ids and counts every acceptance
    as applied."""

    rules: Mapping[str, str] = field(default_factory=dict)
    reasons: Mapping[tuple[str | None, str], str] = field(default_factory=dict)
    hooks: Mapping[str, str] = field(default_factory=dict)
    not_applied: frozenset[str] = NOT_APPLIED_HOOKS

    def applied(self, service_id: str) -> bool:
        return self.hooks.get(service_id) not in self.not_applied


def names_of(ruleset: RuleSet) -> Names:
    reasons: dict[tuple[str | None, str], str] = {}
    for rule in ruleset.rules:
        for reason in rule.override_reasons:
            if reason.code and reason.display:
                reasons[(reason.system, reason.code)] = reason.display
    return Names(
        rules={rule.id: rule.topic.display for rule in ruleset.rules},
        reasons=reasons,
        hooks={service.id: service.hook for service in ruleset.services.values()},
    )


@dataclass(frozen=True)
class ReasonCount:
    code: str | None  # None: overridden without a reason (the sandbox's plain "Dismiss")
    system: str | None
    count: int
    display: str | None = None

    @property
    def label(self) -> str:
        return self.display or self.code or NO_REASON


@dataclass(frozen=True)
class WeekCounts:
    """Cards first shown in an ISO week (``2026-W48``), and what was done with them."""

    week: str
    shown: int = 0
    accepted: int = 0
    not_applied: int = 0
    overridden: int = 0


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


@dataclass(frozen=True)
class RuleReport:
    rule: str | None  # None: feedback on cards this store never saw served
    title: str | None = None
    served: int = 0  # times served (calls)
    shown: int = 0  # distinct cards
    accepted: int = 0  # distinct cards with a suggestion accepted where the EHR applies it
    not_applied: int = 0  # distinct cards "accepted" where the EHR does not apply suggestions
    overridden: int = 0
    feedback: int = 0  # feedback items
    top_reasons: list[ReasonCount] = field(default_factory=list)
    weeks: list[WeekCounts] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.title or self.rule or UNKNOWN_CARD

    @property
    def acceptance_rate(self) -> float | None:
        return _rate(self.accepted, self.shown)

    @property
    def not_applied_rate(self) -> float | None:
        return _rate(self.not_applied, self.shown)

    @property
    def override_rate(self) -> float | None:
        return _rate(self.overridden, self.shown)


def _percent(rate: float | None) -> str:
    return f"{rate * 100:.1f}" if rate is not None else "-"


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    """Columns padded; the first left-aligned, the last free, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(w) for cell, w in zip(row[1:-1], widths[1:], strict=True)
        ]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return lines


@dataclass(frozen=True)
class Report:
    since: datetime | None
    rules: list[RuleReport]
    first: datetime | None = None  # the earliest card served or feedback received in the period
    last: datetime | None = None

    @property
    def weeks(self) -> list[WeekCounts]:
        """All rules together, by ISO week."""
        totals: dict[str, Counter[str]] = {}
        for rule in self.rules:
            for week in rule.weeks:
                totals.setdefault(week.week, Counter()).update(
                    {k: v for k, v in asdict(week).items() if k != "week"}
                )
        return [WeekCounts(week, **counts) for week, counts in sorted(totals.items())]

    @property
    def period(self) -> str:
        if self.first is None or self.last is None:
            return "no activity"
        return f"{self.first.date().isoformat()} to {self.last.date().isoformat()}"

    def to_json(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat() if self.since else None,
            "first": self.first.isoformat() if self.first else None,
            "last": self.last.isoformat() if self.last else None,
            "rules": [
                {
                    **asdict(rule),
                    "acceptance_rate": rule.acceptance_rate,
                    "not_applied_rate": rule.not_applied_rate,
                    "override_rate": rule.override_rate,
                }
                for rule in self.rules
            ],
            "weeks": [asdict(week) for week in self.weeks],
        }

    def to_text(self) -> str:
        since = f" since {self.since.date().isoformat()}" if self.since else ""
        lines = [f"Feedback per rule{since} (activity: {self.period})", ""]
        table = [
            (
                "rule",
                "shown",
                "served",
                "accepted",
                "accept%",
                "not applied",
                "overridden",
                "override%",
                "top override reasons",
            ),
        ]
        for rule in self.rules:
            table.append(
                (
                    rule.rule or UNKNOWN_CARD,
                    str(rule.shown),
                    str(rule.served),
                    str(rule.accepted),
                    _percent(rule.acceptance_rate),
                    str(rule.not_applied),
                    str(rule.overridden),
                    _percent(rule.override_rate),
                    ", ".join(f"{r.label} ({r.count})" for r in rule.top_reasons) or "-",
                )
            )
        lines += _table(table)
        if not self.rules:
            lines.append("(no cards served and no feedback in this period)")
            return "\n".join(lines)
        lines += [
            "",
            "shown: distinct cards (one per patient, hook, rule and order a day); served: times sent.",
            "accepted: a suggestion accepted where the EHR applies it; not applied: accepted at",
            "patient-view, where the EHR does not apply suggestions. Rates are of cards shown.",
            "",
            "Per ISO week (all rules; feedback counted in the week its card was first shown)",
            "",
        ]
        weekly = [("week", "shown", "accepted", "not applied", "overridden", "")]
        weekly += [
            (w.week, str(w.shown), str(w.accepted), str(w.not_applied), str(w.overridden), "")
            for w in self.weeks
        ]
        lines += _table(weekly)
        return "\n".join(lines)


def iso_week(day: date) -> str:
    year, week, _ = day.isocalendar()
    return f"{year}-W{week:02d}"


@dataclass
class _Tally:
    rule: str | None
    served: int = 0
    shown: int = 0
    feedback: int = 0
    outcomes: dict[str, set[str]] = field(
        default_factory=lambda: {"accepted": set(), "not_applied": set(), "overridden": set()}
    )
    reasons: Counter[tuple[str | None, str | None]] = field(default_factory=Counter)
    displays: dict[tuple[str | None, str | None], str] = field(default_factory=dict)
    weeks: dict[str, Counter[str]] = field(default_factory=dict)

    def count(self, week: str, what: str) -> None:
        self.weeks.setdefault(week, Counter())[what] += 1

    def report(self, names: Names) -> RuleReport:
        reasons = []
        # Most given first; on a tie, a reason before none (a plain dismiss).
        for (system, code), items in sorted(
            self.reasons.items(), key=lambda r: (-r[1], r[0][1] is None, r[0][1] or "", r[0][0] or "")
        )[:TOP_REASONS]:
            words = names.reasons.get((system, code)) if code else None
            display = words or self.displays.get((system, code))
            reasons.append(ReasonCount(code=code, system=system, count=items, display=display))
        return RuleReport(
            rule=self.rule,
            title=names.rules.get(self.rule) if self.rule else None,
            served=self.served,
            shown=self.shown,
            accepted=len(self.outcomes["accepted"]),
            not_applied=len(self.outcomes["not_applied"]),
            overridden=len(self.outcomes["overridden"]),
            feedback=self.feedback,
            top_reasons=reasons,
            weeks=[WeekCounts(week, **counts) for week, counts in sorted(self.weeks.items())],
        )


def _span(times: Iterable[datetime | None]) -> tuple[datetime | None, datetime | None]:
    known = [t for t in times if t is not None]
    return (min(known), max(known)) if known else (None, None)


def query_report(connection: Connection, since: datetime | None = None, names: Names | None = None) -> Report:
    """Per rule: times served, cards shown (distinct uuids), cards accepted (applied / not applied) and
    overridden (distinct uuids with that outcome), feedback items, the most frequent override reasons,
    and the same by ISO week of each card's first showing.

    Feedback stored without a rule takes its card's rule from ``cards_served`` when the card's row
    is there now: another worker's batch may have been written after the feedback."""
    names = names or Names()
    served_rule = (
        select(func.max(cards_served.c.rule_id))
        .where(cards_served.c.card_uuid == feedback.c.card_uuid)
        .scalar_subquery()
    )
    tallies: dict[str | None, _Tally] = {}

    def tally(rule: str | None) -> _Tally:
        return tallies.setdefault(rule, _Tally(rule))

    first_week: dict[str, str] = {}
    times: list[datetime | None] = []
    for rule, card, served, first, last in connection.execute(
        select(
            cards_served.c.rule_id,
            cards_served.c.card_uuid,
            func.count(),
            func.min(cards_served.c.served_at),
            func.max(cards_served.c.served_at),
        )
        .where(*([cards_served.c.served_at >= since] if since else []))
        .group_by(cards_served.c.rule_id, cards_served.c.card_uuid)
    ):
        entry = tally(rule)
        entry.served += served
        entry.shown += 1
        first_week[card] = iso_week(first.date())
        entry.count(first_week[card], "shown")
        times += [first, last]
    for rule, card, service, outcome, system, code, display, received in connection.execute(
        select(
            func.coalesce(feedback.c.rule_id, served_rule),
            feedback.c.card_uuid,
            feedback.c.service_id,
            feedback.c.outcome,
            feedback.c.override_reason_system,
            feedback.c.override_reason_code,
            feedback.c.override_reason_display,
            feedback.c.received_at,
        ).where(*([feedback.c.received_at >= since] if since else []))
    ):
        entry = tally(rule)
        entry.feedback += 1
        times.append(received)
        if outcome == "overridden":  # reasons count items: a card overridden twice names both reasons
            entry.reasons[(system, code)] += 1
            if display:
                entry.displays.setdefault((system, code), display)
        kind = "not_applied" if outcome == "accepted" and not names.applied(service) else outcome
        if kind in entry.outcomes and card not in entry.outcomes[kind]:
            entry.outcomes[kind].add(card)
            entry.count(first_week.get(card) or iso_week(received.date()), kind)
    rules = [entry.report(names) for entry in tallies.values()]
    rules.sort(key=lambda r: (r.rule is None, r.rule or ""))
    first, last = _span(times)
    return Report(since=since, rules=rules, first=first, last=last)
