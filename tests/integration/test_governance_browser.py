"""The governance page (``d3k2 feedback report --format html``) in headless Debian Chromium: its charts
render, it loads nothing and breaks no rule of its own Content-Security-Policy; the screenshot is saved
under artifacts/. Needs what test_preview_browser.py needs, and is skipped as loudly without it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_governance_report import html_page, seeded_cli

# `browser` is the preview test's fixture: skipped loudly without Chromium, a failure where CI requires it.
from test_preview_browser import ARTIFACTS, browser  # noqa: F401 (a fixture)

pytestmark = pytest.mark.browser


def _page_file(tmp_path: Path) -> Path:
    return html_page(seeded_cli(tmp_path), tmp_path / "governance.html")


def test_the_governance_page_renders_its_charts(
    browser: Any,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    page_file = _page_file(tmp_path)
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    requests: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("request", lambda req: requests.append(req.url))
    try:
        page.goto(page_file.as_uri())
        page.wait_for_load_state("load")
        for chart in ("chart-rates", "chart-reasons", "chart-weeks"):
            box = page.locator(f"#{chart}").bounding_box()
            assert box is not None and box["width"] > 300 and box["height"] > 50, chart
            bars = page.locator(f"#{chart} rect.bar")
            assert bars.count() > 0
            boxes = [bars.nth(i).bounding_box() for i in range(bars.count())]
            assert all(b["width"] > 0 and b["height"] > 0 for b in boxes), chart
            assert max(max(b["width"], b["height"]) for b in boxes) > 100, chart  # drawn to scale
        # The stylesheet applied (admitted by its hash): the header is the dark band, not unstyled text.
        colour = page.eval_on_selector("header", "h => getComputedStyle(h).backgroundColor")
        assert colour == "rgb(15, 59, 87)"
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "governance-report.png"), full_page=True)
    finally:
        context.close()
    assert errors == []
    assert requests == [page_file.as_uri()]  # self-contained: nothing else is fetched
