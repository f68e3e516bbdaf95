"""A simulated crowd worker: headless Chromium opens the survey, counts, submits.

Run inside a lab namespace (``ip netns exec NS python -m probe_server.labworker
URL``), so the browser resolves names through the namespace's resolver (our
DNS) and reaches the server over whatever families the namespace has. Prints
one JSON object: what loaded, what the worker counted, where the submit went.

With ``--hit``, URL is a (fake) MTurk worker site: the worker accepts the HIT
there first and opens the task URL it is given (with ``assignmentId``,
``hitId``, ``workerId`` and ``turkSubmitTo``), as MTurk's frame does; after
the survey's answer, the answer page hands the assignment on to
``{turkSubmitTo}/mturk/externalSubmit`` (by its script, or by its button
when JavaScript is off), and the worker ends on MTurk's page.

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


def accept_hit(worker_site: str, hit: str, worker: str, country: str, timeout: float) -> Any:
    """Accept a HIT on the fake MTurk's worker site: its assignment and task URL."""
    import urllib.request

    request = urllib.request.Request(  # noqa: S310 - the lab's own http:// worker site
        f"{worker_site}/_fake/accept",
        data=json.dumps({"hitId": hit, "workerId": worker, "country": country}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        return json.load(response)


def work(
    url: str,
    screenshot: str | None,
    submit: bool,
    timeout_ms: int,
    *,
    javascript: bool = True,
    early: bool = False,
) -> dict[str, Any]:
    """One visit. ``javascript=False``: the browser runs no script (no
    beacon; the worker counts once the page has loaded). ``early``: the worker
    answers as soon as the red balls are in, before the beacon's timeout."""
    from urllib.parse import parse_qs, urlsplit

    from playwright.sync_api import Error, sync_playwright

    result: dict[str, Any] = {"url": url}
    handoff = parse_qs(urlsplit(url).query).get("turkSubmitTo", [None])[0]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(
                viewport={"width": 800, "height": 600}, java_script_enabled=javascript
            )
            try:
                page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
                if early:
                    page.wait_for_function(
                        "Array.from(document.querySelectorAll('.balls img[src*=\"/red/\"]'))"
                        ".every(img => img.complete)",
                        timeout=timeout_ms,
                    )
                elif javascript and page.locator("#battery[data-beacon]").count():
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
                    result.update(_submit(page, handoff, javascript, early, timeout_ms))
        finally:
            browser.close()
    return result


def _submit(
    page: Any, handoff: str | None, javascript: bool, early: bool, timeout_ms: int
) -> dict[str, Any]:
    """Press the survey's submit and follow the answer to where it ends."""
    done: dict[str, Any] = {"submitted": True}
    if early:
        # Probes still loading: no report yet. Leaving the page sends it
        # (pagehide). Neither Playwright nor the page's DevTools session
        # sees that request (Chromium sends it from the browser process,
        # detached from the old document): the server's log is the witness.
        done["beacon_before_submit"] = page.get_attribute("#battery", "data-sent")
    with page.expect_navigation(wait_until="load", timeout=timeout_ms):
        page.click("button[type=submit]")
    done["answered_at"] = page.url
    if handoff:
        # The answer page hands the assignment on to MTurk: its script does
        # it at once; without JavaScript the worker presses its button.
        external = f"{handoff}/mturk/externalSubmit"
        if not javascript:
            page.click("#handoff button[type=submit]")
        page.wait_for_url(external, wait_until="load", timeout=timeout_ms)
    done["after_submit"] = page.url
    done["after_submit_text"] = page.inner_text("body")[:500]
    return done


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
    parser.add_argument("url", help="the survey; with --hit, the MTurk worker site")
    parser.add_argument("--hit", help="accept this HIT on the worker site URL first")
    parser.add_argument("--worker", default="ALABWORKER", help="workerId (with --hit)")
    parser.add_argument("--country", default="US", help="the worker's locale (with --hit)")
    parser.add_argument("--screenshot", help="save a full-page PNG here")
    parser.add_argument("--no-submit", dest="submit", action="store_false")
    parser.add_argument("--no-javascript", dest="javascript", action="store_false")
    parser.add_argument(
        "--early", action="store_true", help="answer once the red balls are in, not later"
    )
    parser.add_argument("--timeout", type=float, default=30, help="seconds per page load")
    parser.add_argument("--plain", action="store_true", help="urllib instead of a browser")
    args = parser.parse_args(argv)
    url = args.url
    accepted: dict[str, Any] = {}
    if args.hit:
        accepted = accept_hit(url, args.hit, args.worker, args.country, args.timeout)
        url = accepted["url"]
    if args.plain:
        result = work_plain(url, args.submit, args.timeout)
    else:
        result = work(
            url,
            args.screenshot,
            args.submit,
            int(args.timeout * 1000),
            javascript=args.javascript,
            early=args.early,
        )
    if accepted:
        result["assignment_id"] = accepted["assignmentId"]
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
