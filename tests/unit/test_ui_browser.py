"""The web UI in a real browser: Debian's Chromium, headless, driven by Playwright (never a
downloaded browser: ``executable_path`` is the system's ``chromium``, or
``$FLOWDESK_CHROMIUM``).

One server (uvicorn, in a thread, with its embedded worker, on SQLite) and one browser
serve every test of the module. Screenshots of each page go to
``test-output/screenshots/`` at the repository's root (git-ignored).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ui_invoice
import uvicorn
from playwright.sync_api import Browser, Page, expect, sync_playwright

import flowdesk
from flowdesk.documents import archive as archive_mod
from flowdesk.governance import audit as audit_log
from flowdesk.server import app as server
from flowdesk.store import people

SHOTS = Path(__file__).parents[2] / "test-output" / "screenshots"
RUNS = 2  # invoice runs waiting for review when the server starts


def chromium_path() -> str:
    found = os.environ.get("FLOWDESK_CHROMIUM") or shutil.which("chromium")
    found = found or shutil.which("chromium-browser")
    if not found:
        pytest.fail(
            "The browser tests need Chromium: `make system-deps` installs Debian's `chromium` "
            "(or point FLOWDESK_CHROMIUM at a Chromium binary).",
            pytrace=False,
        )
    return found


@dataclass
class Site:
    url: str
    run_ids: list[str]
    task_ids: list[str]


def _review_tasks(db_url: str, run_ids: list[str]) -> list[str]:
    """The review task of each run, once the server's worker has created them all."""

    async def main() -> list[str]:
        async with flowdesk.App(db_url) as reader:
            deadline = asyncio.get_running_loop().time() + 60
            while True:
                found = [
                    t.id
                    for run_id in run_ids
                    for t in (await reader.store.list_tasks(people.TaskQuery(run_id=run_id))).items
                ]
                if len(found) == len(run_ids):
                    return found
                assert asyncio.get_running_loop().time() < deadline, "no review tasks in 60 s"
                await asyncio.sleep(0.05)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # away from any running loop
        return pool.submit(asyncio.run, main()).result()


def _serve(
    db_url: str,
    archive: archive_mod.Archive,
    key: Path,
    sock: socket.socket,
    ready: threading.Event,
    box: dict[str, object],
) -> None:
    app = flowdesk.App(db_url, poll_interval=0.05)
    ui_invoice.register(app, archive)
    api = server.create_app(
        app,
        audit=audit_log.AuditLog(app, key),
        worker=True,
        documents=archive,
        session_key="browser-test-session-key-0123",
    )
    config = uvicorn.Config(api, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    box["server"] = srv

    async def main() -> None:
        async with app:
            await ui_invoice.create_users(app)
            runs = [
                await app.start("ui_test.invoice", {"path": str(ui_invoice.SAMPLE)})
                for _ in range(RUNS)
            ]
            box["runs"] = [r.id for r in runs]
        serving = asyncio.create_task(srv.serve(sockets=[sock]))
        while not srv.started and not serving.done():
            await asyncio.sleep(0.02)
        ready.set()
        await serving

    try:
        asyncio.run(main())
    finally:
        ready.set()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("ui-browser")
    archive = archive_mod.Archive(root / "documents")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    ready = threading.Event()
    box: dict[str, object] = {}
    db_url = f"sqlite:///{root / 'ui.db'}"
    thread = threading.Thread(
        target=_serve,
        args=(db_url, archive, root / "audit.key", sock, ready, box),
        daemon=True,
    )
    thread.start()
    assert ready.wait(60), "the UI server did not start within 60 s"
    assert "runs" in box and thread.is_alive(), "the UI server failed to start"
    run_ids: list[str] = box["runs"]  # type: ignore[assignment]
    try:
        tasks = _review_tasks(db_url, run_ids)
        yield Site(f"http://127.0.0.1:{port}", run_ids, tasks)
    finally:
        srv = box["server"]
        srv.should_exit = True  # type: ignore[attr-defined]
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        launched = p.chromium.launch(
            executable_path=chromium_path(), headless=True, args=["--no-sandbox"]
        )
        try:
            yield launched
        finally:
            launched.close()


UNLABELLED = """() => Array.from(document.querySelectorAll("input, select, textarea"))
  .filter(el => el.type !== "hidden" && !(el.labels && el.labels.length)
                && !el.getAttribute("aria-label") && !el.getAttribute("aria-labelledby"))
  .map(el => el.outerHTML.slice(0, 120))"""


LOW_CONTRAST = """() => {
  const parse = s => { const m = s.match(/rgba?\\(([^)]+)\\)/); if (!m) return null;
    const p = m[1].split(",").map(Number);
    return {rgb: p.slice(0, 3), a: p.length > 3 ? p[3] : 1}; };
  const lum = rgb => { const [r, g, b] = rgb.map(v => { v /= 255;
    return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
  const background = el => { for (let e = el; e; e = e.parentElement) {
    const c = parse(getComputedStyle(e).backgroundColor); if (c && c.a > 0.5) return c.rgb; }
    return [255, 255, 255]; };
  const opacity = el => { let o = 1; for (let e = el; e; e = e.parentElement)
    o *= Number(getComputedStyle(e).opacity); return o; };
  const bad = [];
  for (const el of document.querySelectorAll("body *")) {
    if (!Array.from(el.childNodes).some(n => n.nodeType === 3 && n.textContent.trim())) continue;
    if (el.closest("[disabled], svg, option, .sr-only, .skip")) continue;
    const st = getComputedStyle(el), box = el.getBoundingClientRect();
    if (st.visibility === "hidden" || box.width === 0 || opacity(el) < 0.99) continue;
    const a = lum(parse(st.color).rgb), b = lum(background(el));
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    const large = parseFloat(st.fontSize) >= 24
      || (parseFloat(st.fontSize) >= 18.66 && Number(st.fontWeight) >= 700);
    if (ratio < (large ? 3 : 4.5))
      bad.push(`${el.tagName}.${el.className} "${el.textContent.trim().slice(0, 30)}" `
               + ratio.toFixed(2));
  }
  return bad;
}"""


def shot(page: Page, name: str) -> None:
    """Save a screenshot of the page, after checking that every form field has a label and
    all text has WCAG AA contrast with its background (4.5:1; 3:1 for large text)."""
    assert page.evaluate(UNLABELLED) == [], f"form fields without a label on {page.url}"
    assert page.evaluate(LOW_CONTRAST) == [], f"text with too little contrast on {page.url}"
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def sign_in(browser: Browser, site: Site, user: str) -> Page:
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    page.goto(site.url + "/")
    expect(page).to_have_url(site.url + "/ui/login?next=/ui/")
    page.get_by_label("User").fill(user)
    page.get_by_label("Password").fill(ui_invoice.PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    return page


def test_review_an_invoice_then_see_its_run_finish(browser: Browser, site: Site) -> None:
    # the sign-in page, and a wrong password
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    page.goto(site.url + "/ui/login")
    page.get_by_label("User").fill("anna")
    page.get_by_label("Password").fill("wrong password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("Unknown user or wrong password")
    shot(page, "01-sign-in-refused")
    context.close()

    page = sign_in(browser, site, "anna")
    expect(page).to_have_url(site.url + "/ui/inbox")
    rows = page.locator("#inbox tbody tr")
    expect(rows).to_have_count(RUNS)
    shot(page, "02-inbox")

    # the keyboard alone opens the first task
    page.locator("body").press("j")
    expect(page.locator("[data-row-link]").first).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1)).to_contain_text("Review invoice")
    task_url = page.url

    # the context: summary, suggestion, reasons, and the document with its fields outlined
    expect(page.get_by_text("The vendor is new")).to_be_visible()
    expect(page.locator(".suggestion")).to_contain_text("72%")
    image = page.get_by_role("img", name="Page 1 of inv-2025-0001-L1-fr_FR.pdf")
    expect(image).to_be_visible()
    assert page.evaluate("img => img.complete && img.naturalWidth > 500", image.element_handle()), (
        "the page preview did not load"
    )
    assert page.locator(".box").count() >= 8
    total_box = page.locator('[data-box="total"]')
    box = total_box.bounding_box()
    frame = image.bounding_box()
    assert box and frame and frame["x"] < box["x"] < frame["x"] + frame["width"]
    page.get_by_label("Total").focus()  # focusing a field outlines where it was read
    expect(total_box).to_have_class("box active")
    shot(page, "03-review-task")

    # a wrong value is refused with a message at its field, and nothing moves on
    page.get_by_label("Total").fill("-1")
    page.get_by_role("button", name="Complete task").click()
    expect(page.locator("#f-total-err")).to_have_text("Must be more than 0.")
    expect(page.locator("#f-decision-err")).to_be_visible()
    shot(page, "04-review-validation")

    # correct the field, decide, complete: the run goes on and finishes
    page.get_by_role("combobox", name="Decision").select_option("approve")
    page.get_by_label("Vendor name").fill("Dextal SARL (corrected)")
    page.get_by_label("Total").fill("51633.87")
    page.get_by_role("button", name="Complete task").click()
    expect(page.get_by_role("status").first).to_contain_text("Completed by anna")
    expect(page.locator("#run-status")).to_have_text("succeeded", timeout=20_000)
    expect(page.locator("#progress")).to_contain_text("ui_test.post_invoice")
    shot(page, "05-review-completed")
    assert page.url.startswith(task_url)
    page.context.close()

    # the operator sees the finished run, its timeline and its output
    page = sign_in(browser, site, "olga")
    page.goto(site.url + "/ui/runs")
    shot(page, "06-runs")
    page.goto(site.url + "/ui/runs?status=succeeded")
    page.locator("#runs [data-row-link]").first.click()
    expect(page.locator("#run-status")).to_have_text("succeeded")
    expect(page.locator(".timeline")).to_contain_text("task:invoice-review")
    # an operator without payload:read sees the run's output masked
    output = page.get_by_role("region", name="Output")
    expect(output).to_contain_text("needs the payload:read permission")
    expect(page.get_by_role("button", name="Send signal")).to_be_visible()
    run_url = page.url
    page.context.close()

    # an admin (payload:read) sees it decrypted
    page = sign_in(browser, site, "root")
    page.goto(run_url)
    expect(page.get_by_role("region", name="Output")).to_contain_text("Dextal SARL (corrected)")
    shot(page, "07-run")

    page.goto(site.url + "/ui/dashboard")
    expect(page.locator("#stat-backlog")).to_have_text(str(RUNS - 1))
    shot(page, "08-dashboard")

    page.goto(site.url + "/ui/audit")
    page.get_by_role("button", name="Verify the chain").click()
    expect(page.locator("#verify-result")).to_contain_text("The chain is intact")
    shot(page, "09-audit")
    page.context.close()


def test_an_approver_without_rights_is_refused(browser: Browser, site: Site) -> None:
    page = sign_in(browser, site, "bob")  # an approver, but in legal, not finance
    expect(page.locator("#inbox")).to_have_count(0)  # nothing offered to him
    task_id = site.task_ids[-1]
    response = page.goto(f"{site.url}/ui/tasks/{task_id}")
    assert response is not None and response.status == 403
    expect(page.get_by_role("heading", name="Not allowed")).to_be_visible()
    expect(page.get_by_text("not offered to you")).to_be_visible()
    shot(page, "10-refused-task")
    response = page.goto(site.url + "/ui/runs")
    assert response is not None and response.status == 403
    expect(page.get_by_role("navigation", name="Main")).not_to_contain_text("Runs")
    page.context.close()
