"""Make docs/dashboard.png: a workflow page while the workflow runs.

Skipped unless ``BATON_DASHBOARD_SCREENSHOT=1``: run it by hand after changing the pages
(``BATON_DASHBOARD_SCREENSHOT=1 pytest tests/test_dashboard_screenshot.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import baton
from baton.testing import running_worker, wait_for_job
from tests.apps import dash

if not os.environ.get("BATON_DASHBOARD_SCREENSHOT"):
    pytest.skip("set BATON_DASHBOARD_SCREENSHOT=1 to remake docs/dashboard.png",
                allow_module_level=True)

from playwright.async_api import expect

from tests.test_dashboard_browser import WAIT_MS, app, base_url, browser  # noqa: F401

PICTURE = Path(__file__).parent.parent / "docs" / "dashboard.png"


async def test_screenshot(app: baton.Baton, base_url: str) -> None:  # noqa: F811
    wf = baton.Workflow("patent:US1234567")
    wf.add("fetch", dash.work.new(item="fetch"))
    wf.add("parse", dash.work.new(item="parse"), deps=["fetch"])
    wf.add_fan_out("summarize", dash.ask.new(question="what is claimed?"),
                   models=["small", "large"], deps=["parse"])
    wf.add("claims", dash.work.new(item="claims", gate="shot"), deps=["parse"])
    wf.add("citations", dash.explode.new(reason="HTTP 404 from the citation service"),
           deps=["parse"])
    wf.add("report", dash.work.new(item="report"), deps=["summarize", "claims"],
           ignore_discarded=True)
    wf.add("notify", dash.work.new(item="notify"), deps=["report"])
    await app.insert(wf)
    claims = next(s.job_id for s in (await app.query.workflow(wf.id)).steps
                  if s.step_name == "claims")
    async with running_worker(app), browser() as chromium:
        await wait_for_job(app, claims, "executing")
        page = await chromium.new_page(viewport={"width": 1280, "height": 760})
        await page.goto(f"{base_url}/workflows/{wf.id}")
        await expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
        await expect(page.locator('g.node[data-step="citations"]')).to_have_attribute(
            "data-state", "discarded", timeout=WAIT_MS)
        await page.screenshot(path=str(PICTURE))
        dash.GATES["shot"].set()
