"""From `oma-api -demo` to the GUI showing the discovered VMs (goal: under 10 s).

    python bench/bench_demo.py [rounds]

Each round launches the demo from this checkout, reads the printed URL and password, then a real
browser (Debian's Chromium, as tests/test_demo.py) signs in and waits for the dashboard to list all
twelve VMs of the synthetic vCenter. Printed per round: seconds to the printed URL (and the CPU
seconds the demo's process tree used until then), to the VMs on screen, and to a clean exit after
SIGTERM; then the medians. The machine's load average is printed
too: on two shared cores the start-up (mostly Python imports) stretches with it.
"""
from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time

from common import ROOT, free_port

sys.path.insert(0, str(ROOT))
from playwright.async_api import async_playwright, expect  # noqa: E402

from tests.demo_util import launch  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


async def one_round(browser) -> tuple[float, float, float, float]:
    demo = launch(free_port())
    try:
        printed = await asyncio.to_thread(demo.wait_ready)
        cpu = demo.cpu_seconds()
        page = await (await browser.new_context()).new_page()
        await page.goto(demo.url + "/ui/")
        await page.get_by_label("Username").fill("demo")
        await page.get_by_label("Password").fill(demo.password)
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.get_by_text("VMs 1–12 of 12")).to_be_visible(timeout=60_000)
        shown = time.monotonic() - demo.started
        await page.context.close()
    finally:
        stopping = time.monotonic()
        code = demo.stop()
    if code != 0:
        raise SystemExit(f"oma-api -demo exited {code}")
    return printed, shown, time.monotonic() - stopping, cpu


async def main(rounds: int) -> None:
    print(f"load average before: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})")
    results = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox",
                                                                           "--disable-gpu"])
        for i in range(rounds):
            printed, shown, stopped, cpu = await one_round(browser)
            results.append((printed, shown, stopped, cpu))
            print(f"round {i + 1}: URL printed {printed:.2f} s ({cpu:.2f} CPU s), VMs on screen {shown:.2f} s, "
                  f"SIGTERM to exit {stopped:.2f} s")
        await browser.close()
    med = [statistics.median(r[i] for r in results) for i in range(4)]
    print(f"median: URL printed {med[0]:.2f} s, GUI showing the discovered VMs {med[1]:.2f} s (goal < 10 s), "
          f"exit {med[2]:.2f} s; CPU to the URL {med[3]:.2f} s; load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
