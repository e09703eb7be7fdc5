"""The dashboard in a real browser (headless Chromium driven by Playwright): live workflow
steps without a reload, the action buttons, and user data that must stay text."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

import baton
from baton.dashboard import create_app
from baton.testing import running_worker, wait_for_job, wait_for_workflow
from tests.apps import dash
from tests.conftest import bound
from tests.test_dashboard import serving

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
HOSTILE = "<img src=x onerror=window.__pwned=1>"
WAIT_MS = 20_000
"""How long an expectation waits for the page to show a state (it passes as soon as it
does)."""

if not CHROMIUM.exists():
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the browser tests: install Debian's chromium "
                           "(.ci/run does)")
    pytest.skip("no /usr/bin/chromium (apt-get install chromium); CI runs these",
                allow_module_level=True)

from playwright.async_api import Browser, Page, async_playwright, expect  # noqa: E402


@asynccontextmanager
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def app(dsn: str) -> AsyncIterator[baton.Baton]:
    dash.reset()
    async with bound(dash.app, dsn) as bound_app:
        bound_app.pricing = dash.PRICING  # bound() leaves an app unpriced after each test
        yield bound_app
    dash.reset()


@pytest.fixture
def base_url(dsn: str) -> Iterator[str]:
    """The dashboard, served by its own app object (it runs in the server's thread and
    event loop), on the test's database."""
    with serving(create_app(baton.Baton(dsn), close_app=True)) as url:
        yield url


async def _open(chromium: Browser, url: str) -> Page:
    page = await chromium.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    await page.goto(url)
    return page


async def test_workflow_steps_turn_completed_live(app: baton.Baton, base_url: str) -> None:
    wf = baton.Workflow("live")
    wf.add("fetch", dash.work.new(item="fetch", gate="fetch"))
    wf.add("left", dash.work.new(item="left", gate="later"), deps=["fetch"])
    wf.add("right", dash.work.new(item="right", gate="later"), deps=["fetch"])
    wf.add("join", dash.work.new(item="join"), deps=["left", "right"])
    await app.insert(wf)
    view = await app.query.workflow(wf.id)
    first = next(s.job_id for s in view.steps if s.step_name == "fetch")
    async with running_worker(app), browser() as chromium:
        await wait_for_job(app, first, "executing")
        page = await _open(chromium, f"{base_url}/workflows/{wf.id}")
        await expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
        node = page.locator("svg g.node")
        await expect(node).to_have_count(4)
        await expect(page.locator('g.node[data-step="join"]')).to_have_attribute(
            "data-state", "pending")
        await page.evaluate("window.__same_page = true")

        dash.GATES["fetch"].set()
        for name in ("left", "right"):  # these wait on a gate: the page shows them running
            await expect(page.locator(f'g.node[data-step="{name}"]')).to_have_attribute(
                "data-state", "executing", timeout=WAIT_MS)
        await expect(page.locator('g.node[data-step="fetch"]')).to_have_attribute(
            "data-state", "completed", timeout=WAIT_MS)
        dash.GATES["later"].set()
        for name in ("fetch", "left", "right", "join"):
            await expect(page.locator(f'g.node[data-step="{name}"]')).to_have_attribute(
                "data-state", "completed", timeout=WAIT_MS)
            await expect(page.locator(f'tr[data-step="{name}"] .cell-state')).to_have_text(
                "completed")
        await expect(page.locator("#wf-state")).to_have_text("completed", timeout=WAIT_MS)
        await expect(page.locator("#wf-progress")).to_have_text("4 / 4")
        finished = page.locator('tr[data-step="join"] .cell-finished')
        await expect(finished).to_have_text(re.compile(r"^\d\d:\d\d:\d\d$"))
        assert await page.evaluate("window.__same_page") is True, "the page was reloaded"


async def test_retry_and_cancel_buttons(app: baton.Baton, base_url: str) -> None:
    failed = await app.enqueue(dash.explode.new(reason="first try fails"))
    async with running_worker(app):
        await wait_for_job(app, failed, "discarded")
    async with browser() as chromium:
        page = await _open(chromium, f"{base_url}/jobs/{failed}")
        await expect(page.locator("h1 .state")).to_have_text("discarded")
        await expect(page.locator("pre.traceback")).to_contain_text("RuntimeError")
        await page.get_by_role("button", name="Retry").click()
        await expect(page.get_by_role("status")).to_have_text("Job made available again.")
        await expect(page.locator("h1 .state")).to_have_text("available")
        assert (await app.get_job(failed)).state == "available"
        await page.get_by_role("button", name="Cancel").click()
        await expect(page.get_by_role("status")).to_have_text("Cancelled.")
        await expect(page.locator("h1 .state")).to_have_text("cancelled")
        assert (await app.get_job(failed)).state == "cancelled"

        wf = baton.Workflow("to cancel")
        wf.add("slow", dash.work.new(item="slow", gate="never"))
        wf.add("after", dash.work.new(item="after"), deps=["slow"])
        await app.insert(wf)
        slow = next(s.job_id for s in (await app.query.workflow(wf.id)).steps
                    if s.step_name == "slow")
        async with running_worker(app):
            await wait_for_job(app, slow, "executing")
            page = await _open(chromium, f"{base_url}/workflows/{wf.id}")
            await page.get_by_role("button", name="Cancel workflow").click()
            await expect(page.get_by_role("status")).to_have_text("Cancelled.")
            await expect(page.locator("#wf-state")).to_have_text("failed", timeout=WAIT_MS)
            info = await wait_for_workflow(app, wf.id)
            assert info.state == "failed" and sorted(info.failed_steps) == ["after", "slow"]
            dash.GATES["never"].set()
            await page.get_by_role("button", name="Resume").click()
            await expect(page.get_by_role("status")).to_have_text("Workflow resumed.")
            await expect(page.locator("#wf-state")).to_have_text("completed", timeout=WAIT_MS)

        page = await _open(chromium, base_url + "/")
        row = page.locator('tr[data-queue="default"]')
        await row.get_by_role("button", name="Pause").click()
        await expect(page.get_by_role("status")).to_have_text("Queue paused.")
        await expect(row.locator(".badge.paused")).to_be_visible()
        assert [q.paused for q in await app.list_queues() if q.name == "default"] == [True]
        await row.get_by_role("button", name="Resume").click()
        await expect(row.locator(".badge.paused")).to_have_count(0)


async def test_hostile_names_and_arguments_stay_text(app: baton.Baton, base_url: str) -> None:
    wf = baton.Workflow(HOSTILE)
    wf.add("first", dash.work.new(item=HOSTILE, gate="hostile"))
    wf.add("last", dash.explode.new(reason=HOSTILE), deps=["first"])
    await app.insert(wf)
    async with app.connection() as conn:  # a name no API would take, as SQL could write it
        await conn.execute("UPDATE baton.nodes SET name = %s WHERE workflow_id = %s "
                           "AND name = 'last'", (HOSTILE, wf.id))
        await conn.execute("UPDATE baton.jobs SET workflow_step = %s WHERE workflow_id = %s "
                           "AND workflow_step = 'last'", (HOSTILE, wf.id))
        await conn.execute("UPDATE baton.edges SET node = %s WHERE workflow_id = %s "
                           "AND node = 'last'", (HOSTILE, wf.id))
    async with running_worker(app), browser() as chromium:
        page = await _open(chromium, f"{base_url}/workflows/{wf.id}")
        await expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
        dash.GATES["hostile"].set()
        await expect(page.locator("#wf-state")).to_have_text("failed", timeout=WAIT_MS)
        hostile_row = page.locator("tr[data-step]").filter(has_text="src=x")
        await expect(hostile_row.locator(".cell-state")).to_have_text("discarded")
        await expect(hostile_row.locator(".cell-error")).to_have_text(
            f"RuntimeError: {HOSTILE}")
        await expect(page.locator("h1 .label")).to_have_text(HOSTILE)
        await expect(hostile_row.locator("td").first).to_have_text(HOSTILE)

        job_id = (await app.query.workflow(wf.id)).steps[0].job_id
        job_page = await _open(chromium, f"{base_url}/jobs/{job_id}")
        await expect(job_page.locator("pre.args")).to_contain_text(HOSTILE)
        for shown in (page, job_page):
            assert await shown.locator('img[src="x"]').count() == 0
            assert await shown.evaluate("window.__pwned === undefined")
