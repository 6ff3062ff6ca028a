"""`oma-api -demo` (issue 23), started as a subprocess as a newcomer would, with its printed URL
and password. In Chromium: the sign-in, the demo banner, the discovered VMs, two of them replicated
from the dashboard to Completed, a guest write and an incremental from the demo panel, then on the
VM page's buttons (each through its confirmation page) a test failover and its cleanup, a live
cutover (the source powered off) and its rollback. Through the API: the incremental copied exactly
the bytes written, and the source's power state. Then the cloud holds nothing left over (no VM but
the appliance's, no snapshot, every volume a replica on the appliance), and after SIGTERM no
process is left behind and nothing in TMPDIR."""
from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

import httpx
import pytest
from axe_playwright_python.async_playwright import Axe
from playwright.async_api import Browser, Page, async_playwright, expect

from oma.plugins.ossea.client import CloudStackClient
from tests.conftest import free_port, wait_for
from tests.demo_util import DemoProcess, launch
from tests.test_openapi_contract import Contract

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
DOCS = Path(__file__).resolve().parent.parent / "docs"
MIGRATED = ("app01", "web01")  # app01: a SCSI and a SATA disk, two NICs, Windows; web01: one of each


async def job_done(c: httpx.AsyncClient, path: str, *statuses: str, timeout: float = 90) -> dict:
    async def check():
        body = (await c.get(path)).json()
        return body if body.get("status") in statuses else None
    return await wait_for(check, timeout=timeout, interval=0.2)


async def latest_job(c: httpx.AsyncClient, vm_name: str, kind: str) -> dict:
    """The VM's newest job, once it is of this kind and has ended; it must have completed."""
    async def ended():
        [job] = (await c.get("/api/v1/replication/jobs", params={"vm_name": vm_name, "limit": 1})).json()["jobs"]
        return job if job["replication_type"] == kind and job["status"] in ("completed", "failed") else None
    job = await wait_for(ended, timeout=90, interval=0.2)
    assert job["status"] == "completed", job
    return (await c.get(f"/api/v1/replication/jobs/{job['job_id']}")).json()


async def power_state(c: httpx.AsyncClient, vm_name: str) -> str:
    r = await c.get("/api/v1/vms/discover", params={"vcenter": "demo-vcenter"})
    assert r.status_code == 200, r.text
    return next(v for v in r.json()["vms"] if v["name"] == vm_name)["power_state"]


async def signed_in(browser: Browser, demo: DemoProcess) -> Page:
    """The printed password signs in; the banner is on the sign-in page and the dashboard, which
    lists the discovered VMs (no axe violation with the banner)."""
    page = await (await browser.new_context(viewport={"width": 1280, "height": 800})).new_page()
    await page.goto(demo.url + "/ui/")
    await expect(page).to_have_url(demo.url + "/ui/login")
    await expect(page.get_by_role("complementary", name="Demo")).to_contain_text("Demo.")
    await page.get_by_label("Username").fill("demo")
    await page.get_by_label("Password").fill(demo.password)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", name="Dashboard", level=1)).to_be_visible()
    await expect(page.get_by_role("complementary", name="Demo")).to_contain_text("simulated")
    for name in MIGRATED:
        await expect(page.get_by_role("rowheader", name=name, exact=True)).to_be_visible()
    result = await Axe().run(page)
    assert result.violations_count == 0, result.generate_report()
    return page


async def start_from_the_dashboard(page: Page, demo: DemoProcess) -> None:
    """An operator selects the two VMs and starts them; the rows reach Completed live."""
    await page.goto(demo.url + "/ui/")
    for name in MIGRATED:
        await page.get_by_label(f"Select {name}", exact=True).check()
    await page.get_by_role("button", name=re.compile("Start replication")).click()
    await expect(page.get_by_role("status")).to_contain_text("Started 2 replications.")
    for name in MIGRATED:
        row = page.locator("tbody tr").filter(has=page.get_by_role("rowheader", name=name, exact=True))
        await expect(row).to_contain_text("Completed", timeout=90_000)
    await expect(page.locator("#counters")).to_contain_text("Completed")  # refreshed every 2 s at most
    if os.environ.get("OMA_GUI_SCREENSHOTS"):
        await page.screenshot(path=DOCS / "gui" / "demo.png", full_page=True)


async def change_and_copy_in_panel(page: Page, demo: DemoProcess, label: str, vm_name: str, percent: str) -> str:
    """The demo panel (no axe violation on it): a guest write, then an incremental of the VM; returns
    what the status region announced of the write."""
    await page.goto(demo.url + "/ui/demo")
    await page.wait_for_load_state("load")
    result = await Axe().run(page)
    assert result.violations_count == 0, result.generate_report()
    await page.get_by_role("combobox", name=re.compile("^VM and disk")).select_option(label=label)
    await page.get_by_label("Share of the disk (%)").fill(percent)
    await page.get_by_role("button", name="Write to the disk").click()
    announce = page.get_by_role("status")
    await expect(announce).to_contain_text("An incremental replication copies just that")
    written = await announce.inner_text()
    if os.environ.get("OMA_GUI_SCREENSHOTS"):
        await page.screenshot(path=DOCS / "gui" / "demo-panel.png", full_page=True)
    await page.get_by_role("combobox", name="VM", exact=True).select_option(vm_name)
    await page.get_by_role("button", name="Start an incremental replication").click()
    await expect(announce).to_contain_text("Started 1 replication.")
    return written


async def failover_from_the_vm_page(page: Page, demo: DemoProcess, vm_name: str, button: str, action: str) -> str:
    """An operator's failover action on the VM page: its button, the confirmation page, then the VM
    page again, whose history (reloading itself while the failover runs) shows it completed, with
    the actions its outcome allows. Returns the failover's id."""
    vm_url = f"{demo.url}/ui/vms/{vm_name}"
    if page.url != vm_url:
        await page.goto(vm_url)
    rows = page.get_by_role("region", name="Failover history").locator("tbody tr")
    before = await rows.count()
    await page.get_by_role("button", name=f"{button}…").click()
    await expect(page.get_by_role("heading", name=f"{button}: {vm_name}?", level=1)).to_be_visible()
    await page.get_by_role("button", name=button, exact=True).click()
    await expect(page).to_have_url(vm_url)
    await expect(rows).to_have_count(before + 1)
    newest = rows.first
    await expect(newest.locator("td").first).to_have_text(action)
    await expect(newest).to_contain_text("Completed", timeout=60_000)
    return await newest.get_by_role("rowheader").inner_text()


async def a_whole_migration(demo: DemoProcess, browser: Browser) -> None:
    state = json.loads((demo.data_dir / "demo.json").read_text())
    page = await signed_in(browser, demo)
    async with httpx.AsyncClient(base_url=demo.url, timeout=60) as c:
        r = await c.post("/api/v1/auth/login", json={"appliance_id": state["appliance_id"], "token": state["token"]})
        assert r.status_code == 200, r.text
        c.headers["Authorization"] = f"Bearer {r.json()['session_token']}"

        # The synthetic inventory: a dozen VMs of 1 to 8 disks, several NICs, Linux and Windows.
        vms = {v["name"]: v for v in (await c.get("/api/v1/vms", params={"limit": 100})).json()["vms"]}
        assert len(vms) == 12
        assert {len(v["disks"]) for v in vms.values()} >= {1, 2, 3, 4, 8}
        assert {len(v["nics"]) for v in vms.values()} == {1, 2, 3}
        assert any("Windows" in v["guest_os_full_name"] for v in vms.values())
        assert any("Linux" in v["guest_os_full_name"] for v in vms.values())
        [config] = (await c.post("/api/v1/ossea/config", json={"action": "get"})).json()["configurations"]
        appliance_vm = config["oma_vm_id"]

        # The demo panel's API, its answers as the OpenAPI document says: nothing to change before a
        # replication made the disk (409), no such VM (404), a bad share (400), then a write.
        check, mutate = Contract((await c.get("/openapi.json")).json()), "/api/v1/demo/mutate"
        check(await c.post(mutate, json={"vm_name": "web01"}), mutate, 409)
        check(await c.post(mutate, json={"vm_name": "nope"}), mutate, 404)
        check(await c.post(mutate, json={"vm_name": "web01", "percent": 0}), mutate, 400)

        await start_from_the_dashboard(page, demo)
        jobs = {name: await latest_job(c, name, "initial") for name in MIGRATED}
        assert jobs["app01"]["bytes_transferred"] == (40 + 10) << 20  # 1 MiB per GiB of the source
        done = check(await c.post(mutate, json={"vm_name": "web01", "percent": 1}), mutate, 200)
        assert done["disk_id"] == "disk-2000" and done["bytes_written"] >= 64 << 10, done

        # A guest writes 2% of app01's SATA disk from the demo panel, which then starts an
        # incremental: it moves exactly the bytes written.
        text = await change_and_copy_in_panel(page, demo, "app01: Hard disk 2 (disk-16001)", "app01", "2")
        written = int(re.search(r"\((\d+) bytes\)", text)[1])
        assert "app01 disk-16001" in text and 0 < written <= 0.03 * (10 << 20), text
        inc = await latest_job(c, "app01", "incremental")
        assert inc["bytes_transferred"] == written, inc

        # On app01's page: a test failover and its cleanup; a live cutover (the source powered off)
        # and its rollback. Each undo is offered once what it undoes has completed, and no failover
        # while one holds the VM (the failover service would refuse it).
        history = page.get_by_role("region", name="Failover history")
        specs = page.get_by_role("region", name="Specifications")  # the VM's status, live
        test = await failover_from_the_vm_page(page, demo, "app01", "Test failover", "test")
        await expect(specs).to_contain_text("Failed over (test)")
        for held in ("Cut over…", "Roll back the cutover…"):
            await expect(page.get_by_role("button", name=held)).to_be_disabled()
        await expect(page.get_by_role("region", name="Actions")).to_contain_text("(clean up the test failover first)")
        await failover_from_the_vm_page(page, demo, "app01", "Clean up the test", "cleanup")
        await expect(history.locator("tr", has_text=test)).to_contain_text("Cleaned up")
        await expect(specs).to_contain_text("Ready for failover")
        await expect(page.get_by_role("button", name="Clean up the test…")).to_be_disabled()
        live = await failover_from_the_vm_page(page, demo, "app01", "Cut over", "live")
        assert await power_state(c, "app01") == "poweredOff"
        await expect(specs).to_contain_text("Failed over (cutover)")
        for held in ("Test failover…", "Clean up the test…"):
            await expect(page.get_by_role("button", name=held)).to_be_disabled()
        await failover_from_the_vm_page(page, demo, "app01", "Roll back the cutover", "rollback")
        await expect(page.get_by_role("button", name="Roll back the cutover…")).to_be_disabled()
        await expect(history.locator("tr", has_text=live)).to_contain_text("Rolled back")
        await expect(specs).to_contain_text("⟲ Rolled back")
        assert await power_state(c, "app01") == "poweredOn"
        # The page's power state is the inventory's: once the discovery's event reached the VM's
        # context, a reload shows it powered on again.
        async def powered_on():
            return (await c.get("/api/v1/vm-contexts/app01")).json()["context"]["power_state"] == "poweredOn"
        await wait_for(powered_on, timeout=30, interval=0.2)
        await page.reload()
        await expect(specs).to_contain_text("poweredOn")
        result = await Axe().run(page)
        assert result.violations_count == 0, result.generate_report()
        if os.environ.get("OMA_GUI_SCREENSHOTS"):
            await page.screenshot(path=DOCS / "gui" / "demo-failover.png", full_page=True)
        for failover_id, ended in ((test, "cleaned_up"), (live, "rolled_back")):
            assert (await c.get(f"/api/v1/failover/jobs/{failover_id}")).json()["status"] == ended

        replicas = {d["volume_id"] for name in MIGRATED
                    for d in (await c.get(f"/api/v1/replication/jobs/{jobs[name]['job_id']}")).json()["disks"]}
        assert len(replicas) == 3

    # The cloud: no VM but the appliance's, no snapshot, every volume the appliance's ROOT or a replica
    # attached to it, and no hazard.
    cs = state["cloudstack"]
    async with CloudStackClient(cs["url"], cs["api_key"], cs["secret_key"]) as cloud:
        assert [vm["id"] for vm in await cloud.list_virtual_machines()] == [appliance_vm]
        assert await cloud.list_snapshots() == []
        volumes = await cloud.list_volumes()
        assert {v["id"] for v in volumes if v["type"] == "DATADISK"} == replicas
        assert all(v.get("virtualmachineid") == appliance_vm for v in volumes), volumes
    async with httpx.AsyncClient() as sim:
        assert (await sim.get(cs["url"].removesuffix("/client/api") + "/sim/hazards")).json() == []


@pytest.fixture
async def browser():
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu",
                                                                     "--disable-background-networking"])
        yield b
        await b.close()


async def test_a_whole_migration_on_the_demo_then_sigterm_leaves_nothing(tmp_path, browser):
    tmp = tmp_path / "tmp"  # the demo's TMPDIR: it makes its data directory there, and nothing else
    tmp.mkdir()
    demo = launch(free_port(), log=tmp_path / "demo.log", tmpdir=tmp)
    try:
        demo.wait_ready()
        assert demo.descendants(), "nats-server and nbdkit run under the demo"
        assert demo.data_dir.name.startswith("oma-demo-") and (demo.data_dir / "demo.json").exists()
        await a_whole_migration(demo, browser)
        demo.descendants()
        assert list(tmp.iterdir()) == [demo.data_dir]
    finally:
        code = demo.stop()
    assert code == 0, (tmp_path / "demo.log").read_text()[-3000:]
    assert demo.left_behind() == []
    assert list(tmp.iterdir()) == []  # the temporary data directory went with it


async def test_sigterm_during_start_up_stops_it_too(tmp_path):
    """A signal that comes while the services start, before uvicorn handles signals itself, was
    lost: the demo then ran on. Now it stops as soon as the gateway is up, leaving nothing."""
    tmp, log = tmp_path / "tmp", tmp_path / "demo.log"
    tmp.mkdir()
    demo = launch(free_port(), "-debug", log=log, tmpdir=tmp)
    try:
        await wait_for(lambda: asyncio.to_thread(lambda: '"msg": "services started"' in log.read_text()),
                       timeout=90, interval=0.01)
        demo.descendants()
    finally:
        code = demo.stop()
    assert code == 0, log.read_text()[-3000:]
    assert demo.left_behind() == [] and list(tmp.iterdir()) == []


def test_the_demo_refuses_a_database_outside_its_data_directory(capsys):
    from oma.cli import oma_api

    with pytest.raises(SystemExit) as exit_:
        oma_api(["-demo", "-db-type", "mariadb"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == \
        "oma-api: -demo runs on the memory database only (it keeps nothing outside its data dir)"
