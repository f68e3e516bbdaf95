"""A simulated crowd worker: headless Chromium opens the survey, counts, submits.

Run inside a lab namespace (``ip netns exec NS python -m probe_server.labworker
URL``), so the browser resolves names through the namespace's resolver (our
DNS) and reaches the server over whatever families the namespace has. Prints
one JSON object: what loaded, what the worker counted, where the submit went.

Needs the Playwright Python package (driver only) and Debian's chromium.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-quic",
    "--disable-sync",
]


def count_rendered(page: Any) -> dict[str, int]:
    """Balls the browser actually rendered, by the colour on screen.

    An image that failed to load has no natural size; a loaded one is
    photographed as rendered and its centre pixel decides its colour, as a
    worker's eye would, never the URL.
    """
    import io

    from PIL import Image

    seen = {"red": 0, "blue": 0, "other": 0, "failed": 0, "failed_area": 0}
    for image in page.locator(".balls img").all():
        if not image.evaluate("img => img.complete && img.naturalWidth > 0"):
            seen["failed"] += 1
            # Whatever a failed image still occupies on screen, a worker might count.
            box = image.bounding_box()
            if box:
                seen["failed_area"] += int(box["width"] * box["height"])
            continue
        shot = Image.open(io.BytesIO(image.screenshot())).convert("RGB")
        r, _, b = shot.getpixel((shot.width // 2, shot.height // 2))  # type: ignore[misc]
        if r > b + 60:
            seen["red"] += 1
        elif b > r + 60:
            seen["blue"] += 1
        else:
            seen["other"] += 1
    return seen


def work(url: str, screenshot: str | None, submit: bool, timeout_ms: int) -> dict[str, Any]:
    from playwright.sync_api import Error, sync_playwright

    result: dict[str, Any] = {"url": url}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 800, "height": 600})
            try:
                page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
                if page.locator("#battery[data-beacon]").count():
                    # The battery's beacon goes once every probe has settled
                    # or its timeout has passed: then the worker counts. A
                    # probe that hangs (broken IPv6, a black hole) would hold
                    # the load event back for minutes.
                    page.wait_for_selector(
                        "#battery[data-sent]", state="attached", timeout=timeout_ms
                    )
                    result["beacon"] = page.get_attribute("#battery", "data-sent")
                else:
                    page.wait_for_load_state("load", timeout=timeout_ms)
            except Error as e:
                result["error"] = str(e).splitlines()[0]
                return result
            result["title"] = page.title()
            result["seen"] = count_rendered(page)
            if screenshot:
                page.screenshot(path=screenshot, full_page=True)
            if submit and page.locator("#red").count():
                page.fill("#red", str(result["seen"]["red"]))
                page.fill("#blue", str(result["seen"]["blue"]))
                if page.locator("button[type=submit]").is_disabled():
                    result["submitted"] = False
                else:
                    with page.expect_navigation(wait_until="load", timeout=timeout_ms):
                        page.click("button[type=submit]")
                    result["submitted"] = True
                    result["after_submit"] = page.url
                    result["after_submit_text"] = page.inner_text("body")[:500]
        finally:
            browser.close()
    return result


def work_plain(url: str, submit: bool, timeout: float) -> dict[str, Any]:
    """The same visit with a plain HTTP client (urllib): for hosts a browser
    treats differently, e.g. Chromium ignores a Teredo-only IPv6 address."""
    import html
    import re
    import urllib.error
    import urllib.parse
    import urllib.request

    result: dict[str, Any] = {"url": url, "client": "urllib"}
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            page = response.read().decode()
    except (urllib.error.URLError, OSError) as e:
        result["error"] = str(e)
        return result
    seen = {"red": 0, "blue": 0, "other": 0, "failed": 0}
    for src in re.findall(r'<img src="([^"]+)"', page):
        src = html.unescape(src)
        colour = "red" if "/red/" in src else "blue" if "/blue/" in src else "other"
        try:
            with urllib.request.urlopen(src, timeout=timeout) as response:  # noqa: S310
                ok = response.status == 200 and response.read().startswith(b"\x89PNG")
        except (urllib.error.URLError, OSError):
            ok = False
        seen[colour if ok else "failed"] += 1
    result["seen"] = seen
    token = re.search(r'name="token" value="([a-z2-7]+)"', page)
    if submit and token:
        form = {"token": token.group(1), "red": str(seen["red"]), "blue": str(seen["blue"])}
        submit_url = urllib.parse.urljoin(url, "/submit")
        data = urllib.parse.urlencode(form).encode()
        with urllib.request.urlopen(submit_url, data=data, timeout=timeout) as response:  # noqa: S310
            result["submitted"] = response.status == 200
            result["after_submit_text"] = response.read().decode()[:500]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--screenshot", help="save a full-page PNG here")
    parser.add_argument("--no-submit", dest="submit", action="store_false")
    parser.add_argument("--timeout", type=float, default=30, help="seconds per page load")
    parser.add_argument("--plain", action="store_true", help="urllib instead of a browser")
    args = parser.parse_args(argv)
    if args.plain:
        result = work_plain(args.url, args.submit, args.timeout)
    else:
        result = work(args.url, args.screenshot, args.submit, int(args.timeout * 1000))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
