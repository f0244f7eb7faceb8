"""``d3k2 feedback report``: the governance report as text, JSON, or one self-contained HTML page.

The page is one file a clinical governance committee can open anywhere: inline CSS (admitted by its hash
in the page's own Content-Security-Policy, which forbids everything else: no script, no request), and
SVG charts drawn here, server-side. Every chart has a table with the same numbers beside it, bars carry
their numbers as text, and the series differ by pattern as well as colour.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, date, datetime
from html import escape
from pathlib import Path

import click

from d3k2.config import Settings
from d3k2.core.errors import D3K2Error
from d3k2.store.report import NO_REASON, Report, RuleReport, WeekCounts, names_of

# (key, legend, fill, pattern): the pattern tells the series apart without colour.
SERIES = (
    ("accepted", "Accepted (suggestion applied)", "#1b6e3a", None),
    ("not_applied", "Accepted at patient-view (not applied by the EHR)", "#b26a00", "hatch"),
    ("overridden", "Overridden (dismissed)", "#a4262c", "dots"),
)
SHOWN_FILL = "#4a5a6a"

CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; color: #1d2430; background: #f4f6f8;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background: #0f3b57; color: #fff; padding: 24px 40px 20px; }
header h1 { margin: 0 0 4px; font-size: 26px; font-weight: 600; }
header p { margin: 0; opacity: .9; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 40px 48px; }
section { background: #fff; border: 1px solid #d8dee4; border-radius: 6px; padding: 20px 24px;
  margin: 0 0 22px; }
h2 { margin: 0 0 6px; font-size: 19px; color: #0f3b57; }
.lead { margin: 0 0 14px; color: #4a5563; }
.totals { display: grid; grid-template-columns: repeat(5, 1fr); gap: 12px; margin: 0; }
.totals div { border: 1px solid #d8dee4; border-radius: 6px; padding: 10px 12px; background: #fafbfc; }
.totals dt { font-size: 13px; color: #4a5563; }
.totals dd { margin: 0; font-size: 24px; font-weight: 600; }
table { border-collapse: collapse; width: 100%; margin: 10px 0 0; font-size: 14px; }
caption { text-align: left; font-weight: 600; padding: 0 0 6px; }
th, td { border-bottom: 1px solid #e3e7eb; padding: 6px 8px; text-align: left; vertical-align: top; }
th { background: #eef2f5; font-weight: 600; }
tbody th { background: none; min-width: 240px; }
thead th.n { white-space: normal; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.rule-id { display: block; color: #5b6675; font-size: 12px;
  font-family: ui-monospace, Menlo, Consolas, monospace; }
svg { display: block; max-width: 100%; height: auto; margin: 6px 0 4px; }
svg text { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; fill: #1d2430; }
.legend { display: flex; flex-wrap: wrap; gap: 18px; margin: 4px 0 0; padding: 0; list-style: none;
  font-size: 13px; }
.legend svg { display: inline-block; vertical-align: middle; margin: 0 6px 0 0; }
.note { font-size: 13px; color: #4a5563; margin: 10px 0 0; }
footer { max-width: 1100px; margin: 0 auto; padding: 0 40px 32px; font-size: 12px; color: #5b6675; }
@media print { body { background: #fff; } section { break-inside: avoid; border-color: #bbb; } }
"""


def _csp() -> str:
    digest = base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()
    return f"default-src 'none'; style-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"


def _percent(rate: float | None) -> str:
    return f"{rate * 100:.0f}%" if rate is not None else "–"


def _patterns(prefix: str) -> str:
    """Fill patterns of the series, ids unique per chart."""
    defs = []
    for key, _legend, fill, pattern in SERIES:
        if pattern == "hatch":
            defs.append(
                f'<pattern id="{prefix}-{key}" width="6" height="6" patternUnits="userSpaceOnUse" '
                f'patternTransform="rotate(45)"><rect width="6" height="6" fill="{fill}"/>'
                '<rect width="2.2" height="6" fill="#fff" fill-opacity=".55"/></pattern>'
            )
        elif pattern == "dots":
            defs.append(
                f'<pattern id="{prefix}-{key}" width="5" height="5" patternUnits="userSpaceOnUse">'
                f'<rect width="5" height="5" fill="{fill}"/><circle cx="2.5" cy="2.5" r="1.1" fill="#fff" '
                'fill-opacity=".6"/></pattern>'
            )
    return f"<defs>{''.join(defs)}</defs>"


def _fill(prefix: str, key: str) -> str:
    for name, _legend, fill, pattern in SERIES:
        if name == key:
            return f"url(#{prefix}-{key})" if pattern else fill
    return SHOWN_FILL


def _legend(prefix: str, keys: Sequence[str]) -> str:
    items = []
    for key in keys:
        words = next((legend for name, legend, _f, _p in SERIES if name == key), "Cards shown")
        own = f"{prefix}-{key}"  # pattern ids unique in the page
        swatch = (
            f'<svg width="16" height="12" aria-hidden="true">{_patterns(own)}'
            f'<rect width="16" height="12" fill="{_fill(own, key)}"/></svg>'
        )
        items.append(f"<li>{swatch}{escape(words)}</li>")
    return f'<ul class="legend">{"".join(items)}</ul>'


def rates_chart(rules: Sequence[RuleReport]) -> str:
    """Per rule, three bars: the share of its cards shown that were accepted, accepted where nothing is
    applied, and overridden; each labelled with its percentage and counts."""
    label_w, bar_w, row_h, group_gap = 340, 520, 18, 16
    height = 30 + len(rules) * (3 * row_h + group_gap)
    parts = [
        f'<svg id="chart-rates" role="img" aria-labelledby="chart-rates-title chart-rates-desc" '
        f'width="{label_w + bar_w + 150}" height="{height}" viewBox="0 0 {label_w + bar_w + 150} {height}">',
        '<title id="chart-rates-title">Acceptance and override rates by rule</title>',
        '<desc id="chart-rates-desc">Horizontal bars, one group per rule: the percentage of its cards shown '
        "that were accepted, accepted at patient-view without being applied, and overridden. The table "
        "below gives the same numbers.</desc>",
        _patterns("r"),
    ]
    for tick in (0, 25, 50, 75, 100):
        x = label_w + bar_w * tick / 100
        parts.append(f'<line x1="{x:.1f}" y1="18" x2="{x:.1f}" y2="{height - 6}" stroke="#d8dee4"/>')
        parts.append(f'<text x="{x:.1f}" y="12" font-size="11" text-anchor="middle">{tick}%</text>')
    y = 24
    for rule in rules:
        parts.append(
            f'<text x="{label_w - 10}" y="{y + 1.5 * row_h + 4:.1f}" font-size="13" text-anchor="end">'
            f"{escape(_short(rule.label, 48))}</text>"
        )
        for key, *_ in SERIES:
            count = getattr(rule, key)
            rate = count / rule.shown if rule.shown else 0.0
            width = bar_w * min(rate, 1.0)
            parts.append(
                f'<rect class="bar" data-series="{key}" x="{label_w}" y="{y + 2}" '
                f'width="{max(width, 1):.1f}" height="{row_h - 4}" fill="{_fill("r", key)}"/>'
            )
            parts.append(
                f'<text x="{label_w + max(width, 1) + 6:.1f}" y="{y + row_h - 5}" font-size="12">'
                f"{_percent(rate if rule.shown else None)} ({count} of {rule.shown})</text>"
            )
            y += row_h
        y += group_gap
    parts.append("</svg>")
    return "".join(parts) + _legend("rl", [key for key, *_ in SERIES])


def weeks_chart(weeks: Sequence[WeekCounts]) -> str:
    """Per ISO week, grouped columns: cards shown, accepted, not applied, overridden (counts on top)."""
    keys = ("shown", *(key for key, *_ in SERIES))
    step = -(-max([1, *(getattr(w, k) for w in weeks for k in keys)]) // 4)  # whole numbers on the axis
    top = step * 4
    col_w, group_gap, plot_h, left = 28, 30, 220, 44
    width = left + max(1, len(weeks)) * (len(keys) * col_w + group_gap) + 10
    height = plot_h + 60
    parts = [
        f'<svg id="chart-weeks" role="img" aria-labelledby="chart-weeks-title chart-weeks-desc" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        '<title id="chart-weeks-title">Cards and responses by ISO week</title>',
        '<desc id="chart-weeks-desc">Columns per week: cards first shown that week, and how many of them '
        "were accepted, accepted without being applied, and overridden. The table below gives the same "
        "numbers.</desc>",
        _patterns("w"),
    ]
    base = 20 + plot_h
    for tick in range(5):
        value = step * tick
        y = base - plot_h * tick / 4
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - 6}" y2="{y:.1f}" stroke="#e3e7eb"/>')
        parts.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{value:.0f}</text>'
        )
    x = left + group_gap / 2
    for week in weeks:
        for key in keys:
            count = getattr(week, key)
            h = plot_h * count / top
            parts.append(
                f'<rect class="bar" data-series="{key}" x="{x:.1f}" y="{base - max(h, 1):.1f}" '
                f'width="{col_w - 3}" height="{max(h, 1):.1f}" fill="{_fill("w", key)}"/>'
            )
            parts.append(
                f'<text x="{x + (col_w - 3) / 2:.1f}" y="{base - max(h, 1) - 4:.1f}" font-size="11" '
                f'text-anchor="middle">{count}</text>'
            )
            x += col_w
        centre = x - len(keys) * col_w / 2
        parts.append(
            f'<text x="{centre:.1f}" y="{base + 18}" font-size="12" text-anchor="middle">{week.week}</text>'
        )
        x += group_gap
    parts.append(f'<line x1="{left}" y1="{base}" x2="{width - 6}" y2="{base}" stroke="#4a5563"/>')
    parts.append("</svg>")
    return "".join(parts) + _legend("wl", keys)


def reasons_chart(rules: Sequence[RuleReport]) -> str:
    """The override reasons of all rules together (each rule's top ones), most frequent first."""
    totals: Counter[str] = Counter()
    for rule in rules:
        for reason in rule.top_reasons:
            totals[reason.label] += reason.count
    ranked = sorted(totals.items(), key=lambda r: (-r[1], r[0] == NO_REASON, r[0]))[:8]
    if not ranked:
        return '<p class="note">No card was overridden in this period.</p>'
    label_w, bar_w, row_h = 300, 480, 24
    top = ranked[0][1]
    height = 10 + len(ranked) * row_h
    parts = [
        f'<svg id="chart-reasons" role="img" aria-labelledby="chart-reasons-title" '
        f'width="{label_w + bar_w + 60}" height="{height}" viewBox="0 0 {label_w + bar_w + 60} {height}">',
        '<title id="chart-reasons-title">Override reasons given, all rules, most frequent first</title>',
        _patterns("o"),
    ]
    for i, (label, count) in enumerate(ranked):
        y = 5 + i * row_h
        width = max(bar_w * count / top, 1)
        parts.append(
            f'<text x="{label_w - 10}" y="{y + 15}" font-size="13" text-anchor="end">'
            f"{escape(_short(label, 42))}</text>"
            f'<rect class="bar" data-series="overridden" x="{label_w}" y="{y + 3}" width="{width:.1f}" '
            f'height="{row_h - 7}" fill="{_fill("o", "overridden")}"/>'
            f'<text x="{label_w + width + 6:.1f}" y="{y + 15}" font-size="12">{count}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _rule_cell(rule: RuleReport) -> str:
    ident = f'<span class="rule-id">{escape(rule.rule)}</span>' if rule.rule and rule.title else ""
    return f'<th scope="row">{escape(rule.label)}{ident}</th>'


def _count(count: int, rate: float | None) -> str:
    return f'<td class="n">{count} <span>({_percent(rate)})</span></td>'


def rules_table(rules: Sequence[RuleReport]) -> str:
    head = (
        '<tr><th scope="col">Rule</th><th scope="col" class="n">Cards shown</th>'
        '<th scope="col" class="n">Times sent</th><th scope="col" class="n">Accepted (applied)</th>'
        '<th scope="col" class="n">Accepted at patient-view (not applied)</th>'
        '<th scope="col" class="n">Overridden</th><th scope="col" class="n">Feedback items</th></tr>'
    )
    rows = [
        f'<tr data-rule="{escape(rule.rule or "")}">{_rule_cell(rule)}<td class="n">{rule.shown}</td>'
        f'<td class="n">{rule.served}</td>{_count(rule.accepted, rule.acceptance_rate)}'
        f"{_count(rule.not_applied, rule.not_applied_rate)}{_count(rule.overridden, rule.override_rate)}"
        f'<td class="n">{rule.feedback}</td></tr>'
        for rule in rules
    ]
    return (
        '<table id="table-rules"><caption>Cards and responses by rule (percentages are of cards shown)'
        "</caption>"
        f"<thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"
    )


def reasons_table(rules: Sequence[RuleReport]) -> str:
    rows = []
    for rule in rules:
        for i, reason in enumerate(rule.top_reasons):
            first = (
                _rule_cell(rule).replace("<th", f'<th rowspan="{len(rule.top_reasons)}"', 1) if i == 0 else ""
            )
            rows.append(f'<tr>{first}<td>{escape(reason.label)}</td><td class="n">{reason.count}</td></tr>')
    if not rows:
        return ""
    return (
        '<table id="table-reasons"><caption>Top override reasons by rule</caption><thead><tr>'
        '<th scope="col">Rule</th><th scope="col">Reason</th><th scope="col" class="n">Times given</th></tr>'
        f"</thead><tbody>{''.join(rows)}</tbody></table>"
    )


def weeks_table(weeks: Sequence[WeekCounts]) -> str:
    rows = "".join(
        f'<tr><th scope="row">{w.week}</th><td class="n">{w.shown}</td><td class="n">{w.accepted}</td>'
        f'<td class="n">{w.not_applied}</td><td class="n">{w.overridden}</td></tr>'
        for w in weeks
    )
    return (
        '<table id="table-weeks"><caption>By ISO week (feedback counted in the week its card was first shown)'
        '</caption><thead><tr><th scope="col">Week</th><th scope="col" class="n">Cards shown</th>'
        '<th scope="col" class="n">Accepted (applied)</th><th scope="col" class="n">Accepted at patient-view '
        '(not applied)</th><th scope="col" class="n">Overridden</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>"
    )


def render_html(report: Report, generated: datetime) -> str:
    rules = report.rules
    shown = sum(r.shown for r in rules)
    totals = (
        ("Cards shown", shown),
        ("Times sent", sum(r.served for r in rules)),
        ("Accepted (applied)", sum(r.accepted for r in rules)),
        ("Accepted, not applied", sum(r.not_applied for r in rules)),
        ("Overridden", sum(r.overridden for r in rules)),
    )
    since = f" (from {report.since.date().isoformat()})" if report.since else ""
    period = escape(report.period) + since
    body = [
        "<header><h1>Vitamin D3 / K2 decision support: how clinicians responded</h1>",
        f'<p>Activity covered: <strong id="period">{period}</strong>. Generated '
        f"{generated.strftime('%Y-%m-%d %H:%M UTC')}.</p></header><main>",
        '<section aria-labelledby="s-totals"><h2 id="s-totals">Summary</h2>',
        '<p class="lead">A card is counted once per patient, hook, rule and order a day, however often '
        "the EHR asked again (it asks on every change to an order). Accepted means a suggestion was "
        "accepted where the EHR applies it; at patient-view the EHR sends the acceptance but applies "
        'nothing, so those are shown apart.</p><dl class="totals">',
        *(
            f'<div><dt>{escape(name)}</dt><dd data-total="{escape(name)}">{n}</dd></div>'
            for name, n in totals
        ),
        "</dl></section>",
    ]
    if not rules:
        body.append(
            '<section><h2>No activity</h2><p class="lead">No cards were served and no feedback was '
            "received in this period.</p></section>"
        )
    else:
        body += [
            '<section aria-labelledby="s-rates"><h2 id="s-rates">Acceptance and override rates by rule</h2>',
            '<p class="lead">Share of each rule\'s cards shown that clinicians accepted or overrode.</p>',
            rates_chart(rules),
            rules_table(rules),
            "</section>",
            '<section aria-labelledby="s-reasons"><h2 id="s-reasons">Why cards were overridden</h2>',
            '<p class="lead">The reasons clinicians chose when they dismissed a card (the three most '
            "frequent per rule). A plain dismiss sends no reason.</p>",
            reasons_chart(rules),
            reasons_table(rules),
            "</section>",
            '<section aria-labelledby="s-weeks"><h2 id="s-weeks">Trend by week</h2>',
            weeks_chart(report.weeks),
            weeks_table(report.weeks),
            "</section>",
        ]
    body.append(
        "</main><footer>d3k2 feedback report. Counts come from the cards the service sent and the "
        "feedback the EHR returned; no patient identifiers are stored or shown.</footer>"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_csp()}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>d3k2 feedback report</title>"
        f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )


def write_report(settings: Settings, since: date | None, fmt: str, output: Path | None) -> None:
    """What ``d3k2 feedback report`` does: read the store, name the rules from the rule set, write."""
    from d3k2.core.loader import load_ruleset
    from d3k2.store.feedback import FeedbackStore
    from d3k2.store.schema import database_url

    url = database_url(settings.database)
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        raise click.ClickException(f"no feedback database at {url.database} (set D3K2_DATA_DIR)")
    store = FeedbackStore(settings.database)
    try:
        names = names_of(load_ruleset(settings.cards_dir))
        result = store.report(datetime.combine(since, datetime.min.time(), UTC) if since else None, names)
    except D3K2Error as exc:
        raise click.ClickException(exc.detail) from exc
    finally:
        store.close()
    if fmt == "json":
        text = json.dumps(result.to_json(), indent=2)
    elif fmt == "html":
        text = render_html(result, datetime.now(UTC))
    else:
        text = result.to_text()
    if output is None:
        click.echo(text)
    else:
        output.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
        click.echo(f"d3k2: report written to {output}", err=True)
