"""Replay's reports: lines per input for the terminal, a JSON document and JUnit XML for CI."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any

from d3k2.tools.replay import Result
from d3k2.tools.replay_diff import card_summary, describe, topic


def count(results: Sequence[Result]) -> tuple[int, int, int]:
    passed = sum(r.status == "passed" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    return passed, len(results) - passed - skipped, skipped


def summary_line(results: Sequence[Result]) -> str:
    passed, failed, skipped = count(results)
    line = f"{passed} passed, {failed} failed"
    return line + (f", {skipped} skipped" if skipped else "")


def text_report(result: Result) -> list[str]:
    """Lines for one fixture: a status line, then its diff, error or (without a golden) its cards."""
    if result.status == "error":
        return [f"error: {result.message}"]
    head = {"passed": "ok     ", "failed": "FAIL   ", "skipped": "skip   "}[result.status]
    detail = f" ({result.service}, today {result.today}, profile {result.profile})"
    lines = [head + result.name + detail + (" [golden updated]" if result.updated else "")]
    if result.message:
        lines.append(f"  {result.message}")
    for difference in result.differences:
        lines.extend("  " + line for line in describe(difference))
    if result.message.startswith("no golden"):
        lines.extend(f"  {card_summary(card)} {topic(card)}" for card in result.cards)
    return lines


def json_report(results: Sequence[Result]) -> dict[str, Any]:
    passed, failed, skipped = count(results)
    return {
        "fixtures": [
            {
                "name": r.name,
                "status": r.status,
                "service": r.service or None,
                "today": r.today or None,
                "profile": r.profile or None,
                "message": r.message or None,
                "updated": r.updated,
                "seconds": round(r.seconds, 4),
                "differences": [
                    {
                        "card": d.card,
                        "path": d.path,
                        "expected": d.expected,
                        "actual": d.actual,
                        "note": d.note,
                    }
                    for d in r.differences
                ],
                "cards": [
                    {"indicator": c.get("indicator"), "topic": topic(c), "summary": c.get("summary")}
                    for c in r.cards
                ],
            }
            for r in results
        ],
        "summary": {"passed": passed, "failed": failed, "skipped": skipped},
    }


def junit_report(results: Sequence[Result]) -> str:
    failures = sum(r.status == "failed" for r in results)
    errors = sum(r.status == "error" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    suite = ET.Element(
        "testsuite",
        name="d3k2-replay",
        tests=str(len(results)),
        failures=str(failures),
        errors=str(errors),
        skipped=str(skipped),
        time=f"{sum(r.seconds for r in results):.3f}",
    )
    for r in results:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"replay.{r.service or 'input'}",
            name=r.name,
            time=f"{r.seconds:.3f}",
        )
        body = "\n".join(line for d in r.differences for line in describe(d))
        if r.status == "failed":
            ET.SubElement(
                case, "failure", message=r.message or f"{len(r.differences)} difference(s)"
            ).text = body
        elif r.status == "error":
            ET.SubElement(case, "error", message=r.message)
        elif r.status == "skipped":
            ET.SubElement(case, "skipped", message=r.message)
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True)
