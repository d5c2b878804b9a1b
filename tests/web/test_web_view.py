"""The web view in a real headless browser (Debian's chromium, driven by Playwright) against a
real server subprocess with real sessions: a session spawned through MCP appears in the tree, its
events stream into the open session page live, the Stop button stops it (its process is gone).
Plus the door: no cookie and no token see nothing, a wrong token is refused, the cookie is
HttpOnly and SameSite=Strict, a POST without the CSRF header is refused, and the event stream
resumes after Last-Event-ID."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.conftest import ROOT, unavailable
from tests.orchestrator.spine import answer_field, process_alive
from tests.web.live_server import TURN_BUDGET_S, LiveServer, live_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = ROOT / "docs" / "screenshots"
UI_TIMEOUT_MS = TURN_BUDGET_S * 1000


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    if shutil.which(CHROMIUM) is None:
        unavailable(f"{CHROMIUM} is missing: run scripts/setup-system.sh (it installs Debian's chromium)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def signed_in_page(browser: Browser, server: LiveServer) -> Page:
    page = await browser.new_page(viewport={"width": 1280, "height": 720})
    page.set_default_timeout(UI_TIMEOUT_MS)
    await page.goto(f"{server.base_url}/?token={server.token}")
    # Signed in, the token is gone from the address bar (a redirect to /).
    await expect(page).to_have_url(f"{server.base_url}/")
    return page


def save(name: str) -> Path | None:
    """Screenshots are refreshed for docs/ when MCP_SANDBOXES_SCREENSHOTS=1 (not in every run)."""
    return SCREENSHOTS / name if os.environ.get("MCP_SANDBOXES_SCREENSHOTS") == "1" else None


async def test_a_spawned_session_appears_streams_live_and_the_stop_button_stops_it(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    async with live_server(tmp_path) as server, chromium() as browser:
        page = await signed_in_page(browser, server)
        await expect(page.locator("#empty")).to_be_visible()

        # Spawned through MCP while the tree is open: it appears without a reload.
        finished = await server.spawn("quick task")
        await server.wait_for_event(finished, "echo quick task")
        session_id = await server.spawn(f"GATE {gate}")
        row = page.locator(f'tr[data-session="{session_id}"]')
        await expect(row).to_be_visible()
        await expect(page.locator(f'tr[data-session="{finished}"] .status')).to_have_text("idle")
        await expect(row.locator("td").nth(2)).to_have_text("custom")
        if (path := save("tree.png")) is not None:
            await page.screenshot(path=path)

        await row.locator("a").click()
        await expect(page).to_have_url(f"{server.base_url}/sessions/{session_id}")
        events = page.locator("#events li")
        await expect(page.locator('#events li[data-type="agent.message"]')).to_contain_text("echo GATE")
        await expect(page.locator("body")).to_have_attribute("data-status", "running")
        shown_before = await events.count()

        # The page stays open; the next turn's events arrive in it live.
        await server.mcp.call("send_message", {"session_id": session_id, "text": "SLEEP then stop me"})
        await anyio.to_thread.run_sync(gate.write_text, "open\n")
        second = page.locator('#events li[data-type="agent.message"]', has_text="echo SLEEP then stop me")
        await expect(second).to_be_visible()
        assert await events.count() > shown_before
        await expect(page.locator("#transcript")).to_contain_text("SLEEP then stop me")
        await expect(page.locator("body")).to_have_attribute("data-status", "running")
        answer = await second.locator(".text").inner_text()
        pid = int(answer_field(answer, "pid"))
        assert process_alive(pid)
        if (path := save("session.png")) is not None:
            await page.screenshot(path=path)

        await page.locator("#stop").click()
        await expect(page.locator("body")).to_have_attribute("data-status", "stopped")
        await expect(page.locator("#stop")).to_be_disabled()
        await expect(page.locator('#events li[data-type="session.status_terminated"]')).to_be_visible()
        view = await server.mcp.call("get_session", {"session_id": session_id})
        assert view["status"] == "stopped"
        # The stop answered only once the agent's process was ended.
        assert not process_alive(pid)


async def test_the_door_admits_the_operator_token_only_and_guards_posts(tmp_path: Path) -> None:
    async with live_server(tmp_path) as server, httpx.AsyncClient(base_url=server.base_url) as http:
        session_id = await server.spawn("hello")
        await server.wait_for_event(session_id, "echo hello")

        assert (await http.get("/api/sessions")).status_code == 401
        page = await http.get("/")
        assert page.status_code == 401 and 'name="token"' in page.text
        assert (await http.get("/", params={"token": "wrong-token-wrong-token"})).status_code == 401
        bearer = {"Authorization": "Bearer wrong-token-wrong-token"}
        assert (await http.get("/api/sessions", headers=bearer)).status_code == 401
        # The MCP endpoint still wants its bearer header: the web cookie is no key to it.
        assert (await http.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})).status_code == 401

        signed = await http.get("/", params={"token": server.token})
        assert signed.status_code == 303 and signed.headers["location"] == "/"
        cookie = signed.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert server.token not in signed.headers["set-cookie"]
        listed = await http.get("/api/sessions")
        assert listed.status_code == 200
        assert [s["session_id"] for s in listed.json()["sessions"]] == [session_id]

        refused = await http.post(f"/api/sessions/{session_id}/stop")
        assert refused.status_code == 403 and "x-csrf-token" in refused.json()["error"]
        assert (await http.get(f"/api/sessions/{session_id}")).json()["status"] == "idle"
        csrf = (await http.get("/api/me")).json()["csrf"]
        stopped = await http.post(f"/api/sessions/{session_id}/stop", headers={"X-CSRF-Token": csrf})
        assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"


async def test_the_event_stream_resumes_after_the_last_event_id(tmp_path: Path) -> None:
    async with live_server(tmp_path) as server:
        session_id = await server.spawn("resume me")
        await server.wait_for_event(session_id, "echo resume me")
        await server.mcp.call("stop_session", {"session_id": session_id})
        page = await server.mcp.call("read_events", {"session_id": session_id})
        seqs = [event["seq"] for event in page["events"]]
        assert len(seqs) > 4
        headers = {"Authorization": f"Bearer {server.token}"}
        async with httpx.AsyncClient(base_url=server.base_url, headers=headers) as http:
            with anyio.fail_after(TURN_BUDGET_S):
                whole = await http.get(f"/api/sessions/{session_id}/events")
                resumed = await http.get(f"/api/sessions/{session_id}/events", headers={"Last-Event-ID": str(seqs[2])})
                after = await http.get(f"/api/sessions/{session_id}/events", params={"after": str(seqs[-2])})
        assert whole.headers["content-type"].startswith("text/event-stream")

        def ids(body: str) -> list[int]:
            return [int(line.removeprefix("id: ")) for line in body.splitlines() if line.startswith("id: ")]

        # A stopped session's stream sends everything, then `end`, and closes.
        assert ids(whole.text) == seqs and whole.text.rstrip().endswith('data: {"status": "stopped"}')
        assert ids(resumed.text) == seqs[3:]
        assert ids(after.text) == seqs[-1:]
        async with httpx.AsyncClient(base_url=server.base_url) as anonymous:
            assert (await anonymous.get(f"/api/sessions/{session_id}/events")).status_code == 401
