"""Open a run's report.html in headless Chromium (the system one, through Playwright), print its size and how long
it took to render, pin the strongest circuit head and write a PNG of the circuit explorer.

    python bench/report_page.py runs/demo bench/results/explorer.png

Wall time depends on the machine's load: it is printed, never asserted on.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("png")
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright  # optional dev dependency, only for this script

    page_path = Path(args.run_dir) / "report.html"
    circuit = json.loads((Path(args.run_dir) / "circuit.json").read_text())
    heads = [n for n in circuit["nodes"] if n["kind"] == "head"]
    top = max(heads, key=lambda n: abs(n.get("exact_effect", n["score"]) or 0.0))["id"] if heads else None
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        for attempt in range(3):  # the first opening also warms the browser's caches
            page = browser.new_page(viewport={"width": args.width, "height": 1000})
            start = time.perf_counter()
            page.goto(page_path.resolve().as_uri())
            page.wait_for_selector("body[data-ready='1']", timeout=120_000)
            print(f"opening {attempt + 1}: {page_path} ({page_path.stat().st_size / 1e6:.2f} MB) ready in "
                  f"{time.perf_counter() - start:.2f} s")
            if attempt < 2:
                page.close()
        if top:
            page.evaluate("name => window.circuitlab.select(name)", top)
        page.locator("#explorer").scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        page.locator("#explorer").screenshot(path=args.png)
        stated = page.locator("#threshold-faithfulness").inner_text()
        width = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        browser.close()
    print(f"pinned {top}; {stated}")
    print(f"page width at {args.width} px: scroll {width[0]} vs client {width[1]}; screenshot {args.png}")


if __name__ == "__main__":
    main()
