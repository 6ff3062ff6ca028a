"""The operator GUI in a real browser (Debian's Chromium driven by Playwright; never `playwright
install`), against the whole appliance: VMs created in vcsim and discovered, replications started
from the dashboard against the CloudStack simulator, progress reported through the API.

Screenshots of each screen are taken; with OMA_GUI_SCREENSHOTS=1 they refresh docs/gui/ (docs/gui.md shows them)."""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import quote, urlparse

import pytest
import uvicorn
from axe_playwright_python.async_playwright import Axe
from playwright.async_api import Browser, ConsoleMessage, Page, Request, async_playwright, expect

from conftest import free_port, login, running, wait_for
from oma.plugins.ossea.simulator import DEFAULT_VM_ID, CloudStackSimulator
from oma.services.auth import operators
from oma.shared.settings import SERVICES, Settings
from tests.test_replication import API_KEY, SECRET
from tests.vcsim import DiskSpec, create_vm, running_vcsim



CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Screenshots refresh docs/gui/ only when asked (OMA_GUI_SCREENSHOTS=1): a test run must not
# rewrite tracked files. Otherwise they go to a scratch folder, still taken (and so still tested).
SHOTS = (Path(__file__).resolve().parent.parent / "docs" / "gui" if os.environ.get("OMA_GUI_SCREENSHOTS")
         else Path(tempfile.mkdtemp(prefix="oma-gui-shots-")))
SHOTS.mkdir(exist_ok=True)
HOSTILE = "<img src=x onerror=alert(1)>"
VMS = ("gui-alpha", "gui-beta", "gui-gamma", HOSTILE)
PASSWORDS = {"olivia": "operator-password-1", "victor": "viewer-password-1"}
GiB = 2**30
ACTIONS = re.compile("Sync now|Cancel the replication|Start replication|Discover now|Test connection|Test failover|Clean up|Cut over|Roll back")  # what only an operator gets


class Gui:
    """The running appliance, its HTTP address and an API client for the VMA's side."""

    def __init__(self, url: str, client: Any, headers: dict[str, str], vc: Any):
        self.url, self.client, self.headers, self.vc = url, client, headers, vc

    async def job_of(self, vm: str, status: str | None = None) -> str:
        async def current():
            r = await self.client.get(f"/api/v1/vm-contexts/{quote(vm, safe='')}", headers=self.headers)
            job = r.json().get("current_job") if r.status_code == 200 else None
            return job["id"] if job and (status is None or job["status"] == status) else None
        return await wait_for(current, timeout=30)

    async def progress(self, job_id: str, **body: Any) -> None:
        r = await self.client.post(f"/api/v1/replication/jobs/{job_id}/progress", headers=self.headers, json=body)
        assert r.status_code == 200, r.text


@contextlib.asynccontextmanager
async def http_server(app: Any) -> AsyncIterator[str]:
    """The gateway on a real port for the browser (its lifespan already runs)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning"))
    task = asyncio.create_task(server.serve())
    await wait_for(lambda: asyncio.sleep(0, server.started), timeout=10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@pytest.fixture(scope="module")
async def gui(nats_url: str, tmp_path_factory) -> AsyncIterator[Gui]:
    tmp = tmp_path_factory.mktemp("gui")
    (tmp / "dev").mkdir()
    settings = Settings(nats_url=nats_url, data_dir=tmp / "data", nbd_port=free_port(), startup_timeout=20,
                        appliance_tokens="test-vma=vma_test_token_abc123def456789012345678",
                        export_backend="nbdkit", device_by_id_dir=tmp / "dev", cloud_timeout=2.0,
                        cloud_job_timeout=5.0, device_wait=5.0, provision_wait=30.0)
    sim = CloudStackSimulator(API_KEY, SECRET, device_dir=tmp / "dev", job_latency=0.05)
    cloud = await sim.start()
    try:
        with running_vcsim() as vc:
            with vc.service_instance() as si:
                for name in VMS:
                    create_vm(si, name, disks=(DiskSpec(1, unit=0),), cbt=True)
            async with running(settings, SERVICES) as client:
                h = await login(client)
                r = await client.post("/api/v1/ossea/config", headers=h, json={"action": "create", "configuration": {
                    "name": "simulated-cloud", "api_url": cloud, "api_key": API_KEY, "secret_key": SECRET,
                    "zone": "OSSEA-Zone", "oma_vm_id": DEFAULT_VM_ID}})
                assert r.status_code == 201, r.text
                r = await client.post("/api/v1/vcenter/config", headers=h, json={"action": "create", "configuration": {
                    "host": vc.host, "port": vc.port, "username": vc.username, "password": vc.password,
                    "verify_tls": False}})
                assert r.status_code == 201, r.text
                r = await client.get("/api/v1/vms/discover", params={"vcenter": vc.host}, headers=h)
                assert r.status_code == 200, r.text
                async with client.appliance.services["auth"].sessions.begin() as db:
                    await operators.add_operator(db, "olivia", PASSWORDS["olivia"], "operator")
                    await operators.add_operator(db, "victor", PASSWORDS["victor"], "viewer")
                gui = Gui("", client, h, vc)
                for name in VMS:  # every discovered VM has a context before the browser looks
                    await wait_for(lambda n=name: _has_context(gui, n), timeout=20)
                async with http_server(client.app) as url:
                    gui.url = url
                    yield gui
    finally:
        await sim.stop()


async def _has_context(gui: Gui, vm: str) -> bool:
    r = await gui.client.get(f"/api/v1/vm-contexts/{quote(vm, safe='')}", headers=gui.headers)
    return r.status_code == 200


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM,
                                     args=["--headless", "--no-sandbox", "--disable-gpu",
                                           "--disable-background-networking"])
        yield b
        await b.close()


class Watch:
    """What a page did that it must not: console errors, dialogs (script ran), other origins."""

    def __init__(self, page: Page, origin: str):
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.foreign: list[str] = []

        def on_console(msg: ConsoleMessage) -> None:
            if msg.type == "error":
                self.errors.append(msg.text)

        def on_request(req: Request) -> None:
            u = urlparse(req.url)
            if u.scheme not in ("data", "about") and f"{u.scheme}://{u.netloc}" != origin:
                self.foreign.append(req.url)

        async def on_dialog(dialog) -> None:
            self.dialogs.append(dialog.message)
            await dialog.dismiss()

        page.on("console", on_console)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("request", on_request)
        page.on("dialog", on_dialog)

    def expect_error(self, status: str) -> None:
        """Chromium's own console line for a response with this status, expected once."""
        seen = [e for e in self.errors if f"status of {status}" in e]
        assert len(seen) == 1, self.errors
        self.errors.remove(seen[0])

    def expect_htmx_error(self, status: str, path: str) -> None:
        """An htmx request answered with an error status: Chromium's line and htmx's own."""
        self.expect_error(status)
        seen = [e for e in self.errors if e.startswith(f"Response Status Error Code {status} from {path}")]
        assert len(seen) == 1, self.errors
        self.errors.remove(seen[0])

    def assert_clean(self) -> None:
        assert (self.errors, self.dialogs, self.foreign) == ([], [], [])


@contextlib.asynccontextmanager
async def signed_in(browser: Browser, gui: Gui, user: str) -> AsyncIterator[tuple[Page, Watch]]:
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    watch = Watch(page, gui.url)
    await page.goto(gui.url + "/ui/")
    await expect(page).to_have_url(gui.url + "/ui/login")
    await page.get_by_label("Username").fill(user)
    await page.get_by_label("Password").fill(PASSWORDS[user])
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", name="Dashboard", level=1)).to_be_visible()
    try:
        yield page, watch
    finally:
        await context.close()


def row(page: Page, vm: str):
    return page.locator("tbody tr").filter(has=page.get_by_role("rowheader", name=vm, exact=True))


async def replicate_to_the_end(gui: Gui, page: Page, vm: str) -> str:
    """Report a ready job's progress as the VMA does (half, then complete with the disk's new change
    id) and see its row's bar follow to 100% over the event stream. Returns the job id."""
    job = await gui.job_of(vm, "ready_for_sync")
    bar = page.get_by_role("progressbar", name=f"Progress of {vm}")
    await gui.progress(job, status="replicating", current_operation="Transferring Data",
                       bytes_transferred=GiB // 2, total_bytes=GiB)
    await expect(bar).to_have_attribute("value", "50.0", timeout=15_000)
    await expect(bar).to_have_attribute("aria-valuetext", re.compile(r"^50%"))
    await gui.progress(job, status="completed", bytes_transferred=GiB, total_bytes=GiB,
                       disks=[{"unit_number": 0, "change_id": f"52 {vm}/7"}])
    await expect(bar).to_have_attribute("value", "100.0", timeout=15_000)
    await expect(row(page, vm)).to_contain_text("Completed")
    await expect(page.get_by_role("status")).to_contain_text(f"{vm}: replication completed.")
    return job


def create_vms(gui: Gui, *names: str) -> None:
    with gui.vc.service_instance() as si:
        for name in names:
            create_vm(si, name, disks=(DiskSpec(1, unit=0),), cbt=True)


async def test_operator_discovers_vms_and_watches_two_replications_live(gui: Gui, browser: Browser):
    """The issue's "done when": sign in, discover from vcsim, select two, start, and watch both
    bars reach 100% with no reload while another row stays as it was, its checkbox still checked."""
    new = ("found-delta", "found-epsilon", "found-zeta")
    await asyncio.to_thread(create_vms, gui, *new)
    async with signed_in(browser, gui, "olivia") as (page, watch):
        await page.get_by_role("navigation", name="Main").get_by_role("link", name="Discovery").click()
        await expect(page.get_by_role("heading", name="Discovery", level=1)).to_be_visible()
        await page.get_by_role("button", name=re.compile("^Discover now on ")).click()
        await expect(page.locator("#run-summary")).to_contain_text("3 new, 0 changed, 0 gone", timeout=30_000)
        for vm in new:
            await expect(row(page, vm)).to_contain_text("New")
        await expect(row(page, "gui-alpha")).to_contain_text("Seen")
        await page.get_by_label("Select found-delta").check()
        await page.get_by_label("Select found-epsilon").check()
        await expect(page.locator("#selected-count")).to_have_text("2")
        await page.get_by_role("button", name=re.compile("Start replication")).click()
        await expect(page.get_by_role("status")).to_contain_text("Started 2 replications.")
        for vm in ("found-delta", "found-epsilon"):
            await expect(row(page, vm)).to_contain_text("Ready for sync", timeout=30_000)

        await page.get_by_label("Select found-zeta").check()
        await page.evaluate("window.__notReloaded = true")
        zeta_before = await row(page, "found-zeta").inner_text()
        jobs = [await replicate_to_the_end(gui, page, vm) for vm in ("found-delta", "found-epsilon")]

        assert await page.evaluate("window.__notReloaded") is True
        for vm in new:
            await expect(page.get_by_label(f"Select {vm}")).to_be_checked()
        assert await row(page, "found-zeta").inner_text() == zeta_before
        await _check(page, Axe(), "discovery")
        watch.assert_clean()

        # The Jobs screen lists both, filtered by VM and by state.
        await page.get_by_role("navigation", name="Main").get_by_role("link", name="Jobs").click()
        await page.get_by_label("VM name (exact)").fill("found-delta")
        await page.get_by_label("State").select_option("completed")
        await page.get_by_role("button", name="Apply filters").click()
        table = page.get_by_role("table", name=re.compile("^Replication jobs"))
        await expect(table.get_by_role("rowheader")).to_have_text([jobs[0]])
        await expect(table).to_contain_text("Completed")
        await page.goto(gui.url + "/ui/jobs?status=completed")
        for job in jobs:
            await expect(table.get_by_role("rowheader", name=job, exact=True)).to_have_count(1)
        await _check(page, Axe(), "jobs")
        watch.assert_clean()


async def test_operator_starts_replications_and_watches_progress_live(gui: Gui, browser: Browser):
    async with signed_in(browser, gui, "olivia") as (page, watch):
        for vm in VMS:
            await expect(row(page, vm)).to_have_count(1)
            await expect(row(page, vm)).to_contain_text("Discovered")
        await page.get_by_label("Select gui-alpha").check()
        await page.get_by_label("Select gui-beta").check()
        await expect(page.locator("#selected-count")).to_have_text("2")
        await page.get_by_role("button", name=re.compile("Start replication")).click()
        await expect(page.get_by_role("status")).to_contain_text("Started 2 replications.")

        # The jobs provision their volumes and exports; the rows follow over SSE.
        for vm in ("gui-alpha", "gui-beta"):
            await expect(row(page, vm)).to_contain_text("Ready for sync", timeout=30_000)
        alpha = await gui.job_of("gui-alpha", "ready_for_sync")
        # Another row is picked now and must stay picked while the others change.
        await page.get_by_label("Select gui-gamma").check()
        await page.evaluate("window.__notReloaded = true")
        gamma_before = await row(page, "gui-gamma").inner_text()

        assert await replicate_to_the_end(gui, page, "gui-alpha") == alpha

        assert await page.evaluate("window.__notReloaded") is True
        await expect(page.get_by_label("Select gui-gamma")).to_be_checked()
        await expect(page.get_by_label("Select gui-alpha")).to_be_checked()
        assert await row(page, "gui-gamma").inner_text() == gamma_before
        await expect(page.locator("#counters")).to_contain_text("Completed")
        await page.screenshot(path=SHOTS / "dashboard.png", full_page=True)
        watch.assert_clean()

        # The VM page: the job, its disk and the change id recorded by the completion.
        await row(page, "gui-alpha").get_by_role("link", name="gui-alpha").click()
        await expect(page.get_by_role("heading", name="gui-alpha", level=1)).to_be_visible()
        await expect(page).to_have_title("gui-alpha · OMA")
        await expect(page.get_by_role("region", name="Failover history")).to_contain_text("No failovers yet")
        await expect(page.get_by_role("table", name=re.compile("^Change ids"))).to_contain_text("52 gui-alpha/7")
        await expect(page.get_by_role("table", name=re.compile("^Jobs"))).to_contain_text(alpha)
        await page.screenshot(path=SHOTS / "vm-detail.png", full_page=True)
        watch.assert_clean()

        # Failover actions: enabled only where allowed, each behind a confirmation page.
        await expect(page.get_by_role("button", name="Clean up the test…")).to_be_disabled()
        await expect(page.get_by_role("button", name="Roll back the cutover…")).to_be_disabled()
        await page.get_by_role("button", name="Test failover…").click()
        await expect(page.get_by_role("heading", name="Test failover: gui-alpha?", level=1)).to_be_visible()
        await _check(page, Axe(), "confirm-failover")
        await page.get_by_role("button", name="Test failover", exact=True).click()
        # The failover service refuses it: vcsim's VM has no NIC to map to a cloud network.
        await expect(page.get_by_role("alert")).to_contain_text("lists no nics to map")
        watch.expect_htmx_error("400", "/ui/failover")
        watch.assert_clean()


async def test_viewer_sees_no_actions_and_forged_posts_are_refused(gui: Gui, browser: Browser):
    async with signed_in(browser, gui, "victor") as (page, watch):
        await expect(row(page, "gui-gamma")).to_have_count(1)
        await expect(page.get_by_role("checkbox")).to_have_count(0)
        await expect(page.get_by_role("button", name=re.compile("Start replication"))).to_have_count(0)
        await expect(page.locator("header")).to_contain_text("victor (viewer)")
        await page.screenshot(path=SHOTS / "dashboard-viewer.png", full_page=True)

        for path in ("/ui/discovery", "/ui/jobs", "/ui/vms/gui-gamma", "/ui/settings"):
            await page.goto(gui.url + path)
            await expect(page.get_by_role("heading", level=1)).to_be_visible()
            await expect(page.locator("main").get_by_role("button", name=ACTIONS)).to_have_count(0)
            await expect(page.locator("main").get_by_role("checkbox")).to_have_count(0)
        await expect(page.get_by_role("table", name="OSSEA configurations")).to_contain_text("simulated-cloud")

        for path, form in (("/ui/discovery", {"vcenter": gui.vc.host}),
                           ("/ui/settings/test", {"kind": "ossea", "config_id": "1"}),
                           ("/ui/failover", {"vm": "gui-gamma", "action": "test"}),
                           ("/ui/replication", {"vm": "gui-gamma", "action": "sync", "config_id": "1"})):
            r = await page.request.post(gui.url + path, form=form)
            assert r.status == 403 and (await r.json())["error"] == "CSRF check failed"
        r = await page.goto(gui.url + "/ui/failover?vm=gui-gamma&action=test")
        assert r.status == 403
        await expect(page.get_by_role("heading", name="Not allowed", level=1)).to_be_visible()
        watch.expect_error("403")
        form = {"vm": "gui-gamma", "config_id": "1"}
        r = await page.request.post(gui.url + "/ui/replications", form=form)  # the session cookie, no token
        assert r.status == 403 and (await r.json())["error"] == "CSRF check failed"
        token = (await page.locator("body").get_attribute("hx-headers") or "")
        csrf = re.search(r'"X-CSRF-Token": ?"([^"]+)"', token).group(1)
        r = await page.request.post(gui.url + "/ui/replications", form={**form, "csrf_token": csrf})
        assert r.status == 403 and (await r.json())["error"] == "Not allowed"
        watch.assert_clean()

    async with signed_in(browser, gui, "olivia") as (page, watch):
        r = await page.request.post(gui.url + "/ui/replications", form={"vm": "gui-gamma", "config_id": "1"})
        assert r.status == 403  # an operator's forged request fails just the same
        r = await page.request.post(gui.url + "/ui/replications", headers={"X-CSRF-Token": "forged"},
                                    form={"vm": "gui-gamma", "config_id": "1"})
        assert r.status == 403
    ctx = (await gui.client.get("/api/v1/vm-contexts/gui-gamma", headers=gui.headers)).json()
    assert ctx["current_job"] is None  # nothing was started


async def test_hostile_vm_name_is_shown_as_text(gui: Gui, browser: Browser):
    async with signed_in(browser, gui, "olivia") as (page, watch):
        await expect(page.get_by_role("rowheader", name=HOSTILE, exact=True)).to_be_visible()
        await expect(page.locator("main img")).to_have_count(0)
        await page.goto(gui.url + "/ui/discovery")
        await expect(page.get_by_role("rowheader", name=HOSTILE, exact=True)).to_be_visible()
        await expect(page.get_by_label(f"Select {HOSTILE}")).to_have_count(1)
        await expect(page.locator("main img")).to_have_count(0)
        await page.get_by_role("link", name=HOSTILE, exact=True).click()
        await expect(page.get_by_role("heading", name=HOSTILE, level=1)).to_be_visible()
        await expect(page.locator("main img")).to_have_count(0)
        await page.wait_for_timeout(300)  # an onerror would have fired by now
        watch.assert_clean()  # no alert() dialog, no request for "x"


async def test_every_screen_is_accessible_and_stays_on_its_origin(gui: Gui, browser: Browser):
    axe = Axe()
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    watch = Watch(page, gui.url)
    try:
        await page.goto(gui.url + "/ui/login")
        await _check(page, axe, "login")
        await page.get_by_label("Username").fill("olivia")
        await page.get_by_label("Password").fill("wrong password!")
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.get_by_role("alert").filter(has_text="Wrong username or password")).to_be_visible()
        watch.expect_error("401")  # Chromium logs the failed sign-in's status
        await page.get_by_label("Password").fill(PASSWORDS["olivia"])
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.get_by_role("heading", name="Dashboard", level=1)).to_be_visible()
        await expect(page.locator("#health-badge")).to_contain_text("Health:")
        await _check(page, axe, None)
        await page.goto(gui.url + "/ui/?q=no-such-vm")
        await expect(page.get_by_role("heading", name="No VMs match these filters")).to_be_visible()
        await _check(page, axe, "dashboard-empty-filter")
        await page.goto(gui.url + "/ui/?sort=-name")
        await expect(page.locator("th[aria-sort]")).to_have_attribute("aria-sort", "descending")
        await page.get_by_label("Name contains").fill("GUI-")
        await page.get_by_label("Name contains").press("Enter")  # keeps the order
        await expect(page.get_by_role("rowheader")).to_have_text(["gui-gamma", "gui-beta", "gui-alpha"])
        await page.get_by_role("button", name="Name").click()  # the sorted column's button flips it
        await expect(page.get_by_role("rowheader")).to_have_text(["gui-alpha", "gui-beta", "gui-gamma"])
        await expect(page.get_by_role("columnheader", name="Name")).to_have_attribute("aria-sort", "ascending")
        await page.goto(gui.url + "/ui/vms/gui-gamma")
        await expect(page.get_by_role("heading", name="gui-gamma", level=1)).to_be_visible()
        await _check(page, axe, None)
        r = await page.goto(gui.url + "/ui/vms/no-such-vm")  # an HTML page for a browser
        assert r.status == 404
        await expect(page.get_by_role("heading", name="VM context not found", level=1)).to_be_visible()
        await _check(page, axe, None)
        watch.expect_error("404")  # Chromium logs the 404 itself
        await page.goto(gui.url + "/ui/jobs?kind=failover")
        await expect(page.get_by_role("heading", name="No failover jobs yet")).to_be_visible()
        await _check(page, axe, None)
        await page.goto(gui.url + "/ui/jobs?vm=no-such-vm")
        await expect(page.get_by_role("heading", name="No replication jobs match these filters")).to_be_visible()
        await _check(page, axe, None)
        await page.goto(gui.url + "/ui/discovery?vcenter=" + gui.vc.host + "&q=no-such-vm")
        await expect(page.get_by_role("heading", name="No VMs match this filter")).to_be_visible()
        await _check(page, axe, None)
        await page.goto(gui.url + "/ui/health")
        await expect(page.get_by_role("table", name="Services")).to_contain_text("context_aggregator")
        await _check(page, axe, "health")
        await page.get_by_role("button", name="Sign out").click()
        await expect(page).to_have_url(gui.url + "/ui/login")
        await page.goto(gui.url + "/ui/")
        await expect(page).to_have_url(gui.url + "/ui/login")  # the session has ended
        watch.assert_clean()
    finally:
        await context.close()


async def test_settings_show_configurations_redacted_and_test_them(gui: Gui, browser: Browser):
    async with signed_in(browser, gui, "olivia") as (page, watch):
        await page.get_by_role("navigation", name="Main").get_by_role("link", name="Settings").click()
        ossea = page.get_by_role("table", name="OSSEA configurations")
        await expect(ossea).to_contain_text("simulated-cloud")
        await expect(ossea).to_contain_text(API_KEY)
        await expect(ossea).to_contain_text("write-only, not shown")
        vcenters = page.get_by_role("table", name="vCenter connections")
        await expect(vcenters).to_contain_text(gui.vc.host)
        await expect(page.get_by_role("table", name=re.compile("^VMAs"))).to_contain_text("test-vma")
        html = await page.content()
        assert SECRET not in html and gui.vc.password not in html
        await page.get_by_role("button", name="Test connection of simulated-cloud").click()
        await expect(page.get_by_role("status")).to_contain_text("OSSEA connection test successful")
        await vcenters.get_by_role("button", name=re.compile("^Test connection")).click()
        await expect(page.get_by_role("status")).to_contain_text("vCenter connection test successful")
        await _check(page, Axe(), "settings")
        watch.assert_clean()


async def test_operator_syncs_now_and_cancels_from_the_vm_page(gui: Gui, browser: Browser):
    """After a completed first job, Sync now starts an incremental one; Cancel stops it."""
    vm = "sync-theta"
    await asyncio.to_thread(create_vms, gui, vm)
    r = await gui.client.get("/api/v1/vms/discover", params={"vcenter": gui.vc.host}, headers=gui.headers)
    assert r.status_code == 200, r.text
    await wait_for(lambda: _has_context(gui, vm), timeout=20)
    async with signed_in(browser, gui, "olivia") as (page, watch):
        await page.get_by_label(f"Select {vm}").check()
        await page.get_by_role("button", name=re.compile("Start replication")).click()
        await expect(row(page, vm)).to_contain_text("Ready for sync", timeout=30_000)
        first = await replicate_to_the_end(gui, page, vm)

        await page.goto(gui.url + "/ui/vms/" + vm)
        await expect(page.get_by_role("button", name="Cancel the replication…")).to_be_disabled()
        await page.get_by_role("button", name="Sync now…").click()
        await expect(page.get_by_role("heading", name=f"Sync now: {vm}?", level=1)).to_be_visible()
        await _check(page, Axe(), None)
        await page.get_by_role("button", name="Sync now", exact=True).click()
        await expect(page.get_by_role("status")).to_contain_text(
            re.compile(rf"Sync now of {vm} started \((job-\S+), incremental\)\."), timeout=30_000)
        job = await gui.job_of(vm, "ready_for_sync")
        assert job != first
        await page.get_by_role("button", name="Sync now", exact=True).click()  # again: refused, shown
        await expect(page.get_by_role("alert")).to_contain_text(f"Replication job already in flight: VM {vm} "
                                                                f"already has job {job}")
        watch.expect_htmx_error("409", "/ui/replication")
        await page.get_by_role("link", name="Back").click()
        jobs = page.get_by_role("table", name=re.compile("^Jobs"))
        await expect(jobs.get_by_role("row", name=re.compile(job))).to_contain_text("incremental")
        await expect(page.get_by_role("button", name="Sync now…")).to_be_disabled()
        await _check(page, Axe(), None)

        await page.get_by_role("button", name="Cancel the replication…").click()
        await page.get_by_role("button", name=f"Cancel the replication {job}").click()
        await expect(page.get_by_role("status")).to_contain_text(f"Replication {job} of {vm} cancelled.",
                                                                 timeout=30_000)
        await page.get_by_role("link", name="Back").click()
        await expect(jobs.get_by_role("row", name=re.compile(job))).to_contain_text("cancelled", timeout=30_000)
        await expect(page.get_by_role("button", name="Sync now…")).to_be_enabled()
        watch.assert_clean()


async def _check(page: Page, axe: Axe, shot: str | None) -> None:
    await page.wait_for_load_state("load")
    result = await axe.run(page)
    assert result.violations_count == 0, result.generate_report()
    if shot:
        await page.screenshot(path=SHOTS / f"{shot}.png", full_page=True)


def test_every_status_a_failover_sets_has_its_badge():
    """The VM statuses the failover service sets have their own icon and words, and the dashboard
    counts and filters them (a VM failed over showed "?" and was missing from the counters)."""
    from oma.services.context_aggregator.events import FAILOVER_STATUSES
    from oma.services.failover.service import CONTEXT_STATUS
    from oma.services.gateway.ui.render import STATUS

    assert set(CONTEXT_STATUS.values()) == set(FAILOVER_STATUSES)
    assert set(FAILOVER_STATUSES) <= set(STATUS)
    icons = [STATUS[s][0] for s in FAILOVER_STATUSES]  # none looks like another status
    assert len(set(icons)) == len(icons) and not set(icons) & {i for s, (i, _, _) in STATUS.items()
                                                               if s not in FAILOVER_STATUSES}
