"""The battery's beacon script in a real browser: Chromium on loopback (no root).

The namespace lab (tests/test_lab.py) runs every network; this checks what
only a browser can, on 127.0.0.1 and ::1: the times the script reports.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from probe_server.server import ProbeServer
from probe_server.testing import require_tool

from .conftest import MakeConfig

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]


@pytest.fixture
async def beacon_server(make_config: MakeConfig) -> AsyncIterator[ProbeServer]:
    server = ProbeServer(
        make_config(battery={"probes": ["literal", "mtu"], "beacon": True, "beacon_timeout": 30})
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_each_loaded_probes_time_is_when_its_response_ended(beacon_server, db):
    require_tool("chromium")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS
        )
        try:
            page = await browser.new_page()
            beacon = page.expect_response(lambda r: r.url.endswith("/beacon"))
            async with beacon as sent:
                await page.goto(beacon_server.base_urls["ipv4"] + "/")
            assert (await sent.value).status == 204
            # Resource Timing's responseEnd of the first image of each probe,
            # as the page's own clock has it.
            ended = await page.evaluate(
                """() => {
                    const first = {};
                    const images = document.querySelectorAll('.balls img, #battery img');
                    for (const img of images) {
                        const probe = img.dataset.probe
                            || (img.src.includes('/red/') ? 'ipv4' : 'ipv6');
                        if (!(probe in first)) {
                            const [entry] = performance.getEntriesByName(img.currentSrc);
                            first[probe] = entry ? entry.responseEnd : null;
                        }
                    }
                    return first;
                }"""
            )
        finally:
            await browser.close()
    rows = {r["probe"]: r for r in db("SELECT probe, state, at_ms FROM beacons")}
    assert {p: r["state"] for p, r in rows.items()} == dict.fromkeys(ended, "loaded")
    for probe, end in ended.items():
        # Not when the script got to it (the deferred script often runs
        # after the first balls are in) nor when the load event came.
        assert end is not None and end > 0, (probe, ended)
        assert rows[probe]["at_ms"] == pytest.approx(end, abs=0.06), (probe, dict(rows[probe]))
